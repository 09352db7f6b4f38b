"""The planner's predicted decode speed against llama.cpp's measured speed on this machine.

    .venv/bin/python benchmarks/decode_prediction.py [GGUF ...]

Without arguments it builds the upcycled SmolLM2 test model (tests/support/checkpoints.py), quantizes it to
Q4_K_M and Q8_0, and runs `localmix bench --json` on each (CPU only, context 1024, 512-token prefill,
64 decoded tokens, 3 runs, median).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench(path: Path) -> dict:
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-m", "localmix", "bench", str(path), "--vram", "0", "--ctx", "1024", "--json"],
                             capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(out)["results"][0])
    med = lambda k: statistics.median(r[k] for r in runs)
    return {k: med(k) for k in ("decode_predicted", "decode_measured", "prefill_predicted", "prefill_measured")}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(p) for p in sys.argv[1:]]
        if not paths:
            sys.path.insert(0, str(ROOT))  # for tests.support, the fixtures the suite builds
            from quantize.convert import convert
            from tests.support.checkpoints import make_upcycled_smollm

            src = make_upcycled_smollm(Path(tmp) / "smollm2-moe")
            for t in ("Q4_K_M", "Q8_0"):
                paths.append(Path(tmp) / f"smollm2-moe-{t}.gguf")
                convert(src, paths[-1], t)
        print(f"{'model':28} {'decode predicted':>17} {'measured':>9} {'error':>7} {'prefill predicted':>18} {'measured':>9}")
        for p in paths:
            r = bench(p)
            err = (r["decode_predicted"] - r["decode_measured"]) / r["decode_measured"]
            print(f"{p.name:28} {r['decode_predicted']:17.1f} {r['decode_measured']:9.1f} {err:+7.0%} "
                  f"{r['prefill_predicted']:18.0f} {r['prefill_measured']:9.0f}")


if __name__ == "__main__":
    main()
