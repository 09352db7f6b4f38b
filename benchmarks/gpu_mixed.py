"""Plan-aware quantization measured on a GPU machine: a Mixtral-8x7B-shaped model at a 12 GiB VRAM budget,
uniform Q4_K_M against the file `localmix quantize --for 12G,RAM` makes for this machine (no --tps: the
fastest file at Q4_K_M's estimated quality), each run by `localmix bench` (the auto plan and the
`--n-cpu-moe` baselines), predicted beside measured.

    python3 benchmarks/gpu_mixed.py --out DIR [--shape 8x7B] [--vram 12G] [--ctx 4096] [--tokenizer FILE]

The files are sparse: real headers (real shapes, types and vocabulary), tensor data left as holes that read
as zeros, so they take no disk and no time to write. Zeros cost llama.cpp the same bytes read and the same
arithmetic as real weights (dequantizing a block does not look at its values), which is what decode speed
depends on; the types come from the same dry run as `quantize --for --dry-run` on a checkpoint whose
sampled rows are zeros, i.e. the shape-only error prior. Writes DIR/gpu_mixed.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_sparse_gguf(folder: Path, hp, tensors, out_type: str, out: Path, metadata: dict | None = None) -> int:
    """A GGUF with the checkpoint's header and vocabulary and every tensor's data a hole."""
    from quantize.convert import ALIGNMENT, _header

    w = _header(folder, hp, tensors, out_type, {}, metadata=metadata)
    w.write_header_to_file(path=out)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    start = f.tell() + (-f.tell() % ALIGNMENT)
    size = start + sum(t.nbytes + (-t.nbytes % ALIGNMENT) for t in tensors)
    w.close()
    os.truncate(out, size)
    return size


def bench(path: Path, vram: str, ctx: int, prompt: int, gen: int, logs: Path) -> dict:
    cmd = [sys.executable, "-X", "faulthandler", "-m", "localmix", "bench", str(path), "--vram", vram, "--ctx", str(ctx),
           "--prompt-tokens", str(prompt), "--gen-tokens", str(gen), "--json"]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    (logs / f"{path.stem}.log").write_text(f"rc {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
    if r.returncode:
        print(f"bench failed on {path} (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}", file=sys.stderr)
        return {"failed": r.returncode, "results": []}
    out = json.loads(r.stdout)
    out["seconds"] = time.time() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu-mixed"))
    ap.add_argument("--shape", default="8x7B")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (a quick check on a CPU machine)")
    ap.add_argument("--vram", default="12G")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--tokenizer", type=Path, default=None, help="a SentencePiece tokenizer.model (default: mistral-common's, v1 for 8x7B)")
    a = ap.parse_args()

    from localmix.loader import machine_and_budget
    from localmix.tailor import info_from_plan, tailor
    from localmix.units import parse_size
    from quantize.checkpoint import open_checkpoint
    from quantize.convert import plan_tensors
    from quantize.metadata import read_hparams
    from quantize.sensitivity import measure
    from tests.support import sparse

    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.tokenizer:  # the GPU machine has no mistral-common: its tokenizer file travels with the script
        sparse.mistral_tokenizer_file = lambda version: a.tokenizer
    ckpt = sparse.make_sparse_mixtral(a.work / f"mixtral-{a.shape}", a.shape, layers=a.layers)
    ck = open_checkpoint(ckpt)
    hp = read_hparams(ck.config)
    reference = plan_tensors(ck, hp, "Q4_K_M")
    t0 = time.time()
    units = measure(reference, None)
    t_measure = time.time() - t0
    hw, budget = machine_and_budget(vram=parse_size(a.vram))
    base = info_from_plan(hp, reference, f"mixtral-{a.shape}")
    ref_types = {t.name: t.type for t in reference}
    t0 = time.time()
    tl = tailor(base, units, {u.name: ref_types[u.name] for u in units}, budget, a.ctx, "f16")
    t_tailor = time.time() - t0
    mixed = plan_tensors(ck, hp, "Q4_K_M", types=tl.types)

    files = {}
    for label, tensors in (("uniform Q4_K_M", reference), ("plan-aware", mixed)):
        path = a.work / f"mixtral-{a.shape}-{label.split()[-1].replace('-', '')}.gguf"
        size = write_sparse_gguf(ckpt, hp, tensors, "Q4_K_M", path)
        files[label] = (path, size)
    ck.close()

    results = {"machine": {"gpus": [g.__dict__ for g in hw.gpus], "cores": hw.cores, "read_bandwidth": hw.read_bandwidth,
                           "cpu_decode_bandwidth": hw.cpu_decode_bandwidth},
               "shape": a.shape, "vram": a.vram, "ctx": a.ctx, "measure_seconds": t_measure, "tailor_seconds": t_tailor,
               "error_estimate": {"plan-aware": tl.error, "uniform Q4_K_M": tl.reference_error},
               "plan_aware_predicted_decode": tl.plan.decode_tps, "files": {}}
    for label, (path, size) in files.items():
        r = bench(path, a.vram, a.ctx, a.prompt, a.gen, a.out)
        results["files"][label] = {"bytes": size, **r}
        (a.out / "gpu_mixed.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"{'file':16} {'GiB':>6} {'config':22} {'GPU GiB':>8} {'decode':>8} {'predicted':>9} {'prefill':>8} {'predicted':>9}")
    for label, r in results["files"].items():
        for row in r["results"]:
            print(f"{label:16} {r['bytes'] / 2**30:6.2f} {row['config']:22} {row['gpu_gib']:8.1f} {row['decode_measured']:8.1f} "
                  f"{row['decode_predicted']:9.1f} {row['prefill_measured']:8.0f} {row['prefill_predicted']:9.0f}")
    print(json.dumps(results["error_estimate"]))


if __name__ == "__main__":
    main()
