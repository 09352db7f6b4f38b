"""On paper, with the planner: Mixtral 8x22B Q4_K_M on a desktop with a 24 GiB GPU and 64 GiB of RAM, alone
and with a second computer's 64 GiB over 1 GbE and 10 GbE (a `localmix worker` there).

The model is a split GGUF with 8x22B's real header and tensor table and no data (sparse files, as
tests/test_commands_plan.py writes it: 85 GB on paper, nothing on disk), planned by `localmix plan` exactly as
a user runs it: `--vram 24G --ram 64G --ram-bandwidth 80GB/s` for the desktop, and for the worker `--rpc HOST
--rpc-ram 64G --rpc-network 1gbe --rpc-bandwidth 80GB/s`, which plans without contacting it. The GPU's
bandwidth is the planner's default for a GPU it cannot see (0.5 TB/s) on a machine without one.

    .venv/bin/python benchmarks/rpc_paper.py            # a markdown table on stdout
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localmix.units import GiB
from tests.support.shapes import sparse_mixtral_8x22b

WORKER = "192.168.1.2:50052"  # never contacted: --rpc-ram plans for it
DESKTOP = ["--vram", "24G", "--ram-bandwidth", "80GB/s", "--ctx", "4096"]
CASES = [  # (label, RAM, worker flags)
    ("alone", "64G", []),
    ("+ worker, 1 GbE", "64G", ["--rpc", WORKER, "--rpc-ram", "64G", "--rpc-network", "1gbe", "--rpc-bandwidth", "80GB/s"]),
    ("+ worker, 10 GbE", "64G", ["--rpc", WORKER, "--rpc-ram", "64G", "--rpc-network", "10gbe", "--rpc-bandwidth", "80GB/s"]),
    # What a 64 GiB desktop has free once the OS, a browser and the desktop run (about 8 GiB of them):
    ("alone, 56 GiB free", "56G", []),
    ("+ worker, 1 GbE, 56 GiB free", "56G", ["--rpc", WORKER, "--rpc-ram", "64G", "--rpc-network", "1gbe", "--rpc-bandwidth", "80GB/s"]),
    ("+ worker, 10 GbE, 56 GiB free", "56G", ["--rpc", WORKER, "--rpc-ram", "64G", "--rpc-network", "10gbe", "--rpc-bandwidth", "80GB/s"]),
    # A 32 GiB desktop: most experts on the worker.
    ("+ worker, 1 GbE, 32 GiB", "32G", ["--rpc", WORKER, "--rpc-ram", "64G", "--rpc-network", "1gbe", "--rpc-bandwidth", "80GB/s"]),
    ("+ worker, 10 GbE, 32 GiB", "32G", ["--rpc", WORKER, "--rpc-ram", "64G", "--rpc-network", "10gbe", "--rpc-bandwidth", "80GB/s"]),
]


def mixtral_8x22b(folder: Path) -> Path:
    """The first part of a sparse split GGUF of Mixtral 8x22B at Q4_K_M."""
    return sparse_mixtral_8x22b(folder / "Mixtral-8x22B-Q4_K_M.gguf")[0]


def plan(model: Path, ram: str, flags: list[str]) -> dict | str:
    """`localmix plan --json`'s answer, or its one error line (does not fit)."""
    r = subprocess.run([sys.executable, "-m", "localmix", "plan", str(model), *DESKTOP, "--ram", ram, *flags, "--json"],
                       capture_output=True, text=True, timeout=600)
    return json.loads(r.stdout) if r.returncode == 0 else r.stderr.strip()


def row(label: str, ram: str, d: dict | str) -> str:
    if isinstance(d, str):
        return f"| {label} | {ram} | does not fit | | | {d.removeprefix('localmix plan: error: ')} |"
    there = [r for r in d["remotes"] if r["used"]]
    layers = sorted({int(n.split(".")[1]) for r in there for n in r["tensors"]})
    on_worker = f"{sum(r['used'] for r in there) / GiB:.1f} GiB ({len(layers)} layers)" if there else "nothing"
    local = (d["ram"]["weights"] + d["ram"]["kv_cache"]) / GiB
    return f"| {label} | {ram} | {d['predicted']['decode_tps']:.2f} | {local:.1f} GiB | {on_worker} | |"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model = mixtral_8x22b(Path(tmp))
        print("| Mixtral 8x22B Q4_K_M, 24 GiB GPU | RAM | predicted decode tok/s | in RAM | on the worker | note |")
        print("|---|---|---|---|---|---|")
        for label, ram, flags in CASES:
            print(row(label, ram, plan(model, ram, flags)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
