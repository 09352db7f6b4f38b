"""The long fuzz sweep: every generator under tests/fuzz at a larger size than the test suite runs it,
each in its own process, totals printed per generator. Exit status 1 when any case failed.

    .venv/bin/python benchmarks/fuzz_sweep.py                 # the sizes benchmarks/README.md reports
    .venv/bin/python benchmarks/fuzz_sweep.py --scale 0.2     # a quicker look
    .venv/bin/python benchmarks/fuzz_sweep.py --only gguf --seed 7

What each generator makes and checks is in its module's docstring; every case must end in success or
one line on stderr with exit status 1 (2 for a usage error), with no traceback, hang, signal or file left
behind, and (store) no other model's file touched.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# generator module -> cases at scale 1 (gguf: files, each with info and plan cases, some with run)
SWEEPS = {"gguf": 1000, "checkpoints": 200, "templates": 300, "tools": 200, "store": 1000}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--only", choices=sorted(SWEEPS), action="append")
    args = p.parse_args()
    failed = []
    for name, n in SWEEPS.items():
        if args.only and name not in args.only:
            continue
        n = max(10, round(n * args.scale))
        print(f"== tests.fuzz.{name} --seed {args.seed} --n {n}", flush=True)
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", f"tests.fuzz.{name}", "--seed", str(args.seed), "--n", str(n)], cwd=ROOT)
        print(f"   ({time.monotonic() - t0:.0f} s, exit {r.returncode})", flush=True)
        if r.returncode:
            failed.append(name)
    print("failed: " + ", ".join(failed) if failed else "all sweeps clean")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
