"""Direct pass against the two-step route, side by side in one run.

    .venv/bin/python benchmarks/quantize_bench.py [--repeat 2] [--src CHECKPOINT] [--llama-cpp-src DIR]

Routes, each step in its own process (wall time, peak RSS from the process's own VmHWM):
  direct     localmix quantize SRC --type Q4_K_M
  two-step   localmix quantize SRC --type BF16, then llama_model_quantize (llama-quantize) to Q4_K_M
  llama.cpp  (when --llama-cpp-src points at llama.cpp's sources, e.g. the vendored tree of the
             llama-cpp-python sdist) convert_hf_to_gguf.py --outtype bf16, then llama_model_quantize

Without --src it builds the upcycled SmolLM2 fixture (tests/support/checkpoints.py). With --mixtral-layers N it
builds a checkpoint with Mixtral 8x7B's real shapes (hidden 4096, 8 experts of 14336, vocabulary 32000)
and N layers of random bf16 weights, to show that peak memory does not grow with the expert size.
Routes alternate across repeats so that machine noise hits them alike; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs one step in a fresh interpreter and reports its time and peak memory as JSON on the last line.
STEP = r"""
import json, sys, time
t0 = time.perf_counter()
kind, args = sys.argv[1], sys.argv[2:]
if kind == "localmix":
    from localmix.cli import main
    rc = main(["quantize", *args])
elif kind == "llama-quantize":
    import ctypes, llama_cpp, os
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = 15
    p.nthread = os.cpu_count()
    rc = llama_cpp.llama_model_quantize(args[0].encode(), args[1].encode(), ctypes.byref(p))
elif kind == "convert_hf_to_gguf":
    import runpy
    sys.argv = [args[0], *args[1:]]
    try:
        runpy.run_path(args[0], run_name="__main__")
        rc = 0
    except SystemExit as e:
        rc = e.code or 0
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0, "peak_rss": hwm}))
"""


def write_safetensors(path: Path, tensors: dict) -> None:
    """A minimal safetensors writer for bf16 (numpy has no bf16): tensors maps name -> uint16 array."""
    header, offset = {}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for a in tensors.values():
            f.write(a.tobytes())


def make_mixtral_8x7b_shaped(folder: Path, layers: int) -> Path:
    import numpy as np

    sys.path.insert(0, str(ROOT))  # for tests.support, the fixtures the suite builds
    from tests.support.checkpoints import _write_mistral_tokenizer_config, mistral_tokenizer_file

    folder.mkdir(parents=True)
    d, f, e, kv, vocab = 4096, 14336, 8, 1024, 32000
    rng = np.random.default_rng(0)

    def bf16(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).view(np.uint32).__rshift__(16).astype(np.uint16)

    weight_map = {}
    shards = [("model-globals.safetensors", {"model.embed_tokens.weight": bf16(vocab, d), "lm_head.weight": bf16(vocab, d),
                                             "model.norm.weight": bf16(d)})]
    for b in range(layers):
        p = f"model.layers.{b}."
        t = {p + "input_layernorm.weight": bf16(d), p + "post_attention_layernorm.weight": bf16(d),
             p + "self_attn.q_proj.weight": bf16(d, d), p + "self_attn.k_proj.weight": bf16(kv, d),
             p + "self_attn.v_proj.weight": bf16(kv, d), p + "self_attn.o_proj.weight": bf16(d, d),
             p + "block_sparse_moe.gate.weight": bf16(e, d)}
        shards.append((f"model-layer{b}-attn.safetensors", t))
        for x in range(e):  # one shard per expert keeps the generator's own memory small
            q = p + f"block_sparse_moe.experts.{x}."
            shards.append((f"model-layer{b}-expert{x}.safetensors",
                           {q + "w1.weight": bf16(f, d), q + "w3.weight": bf16(f, d), q + "w2.weight": bf16(d, f)}))
    for fname, tensors in shards:
        write_safetensors(folder / fname, tensors)
        weight_map.update({k: fname for k in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "hidden_size": d, "intermediate_size": f, "num_hidden_layers": layers,
        "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": e, "num_experts_per_tok": 2,
        "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-5, "vocab_size": vocab,
    }))
    import shutil

    shutil.copy(mistral_tokenizer_file("v1"), folder / "tokenizer.model")
    _write_mistral_tokenizer_config(folder)
    return folder


def step(kind: str, *args: str, env: dict | None = None) -> dict:
    r = subprocess.run([sys.executable, "-c", STEP, kind, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})
    try:
        res = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise SystemExit(f"{kind} failed:\n{r.stderr[-3000:]}") from None
    if res["rc"] not in (0, None):
        raise SystemExit(f"{kind} exited {res['rc']}:\n{r.stderr[-3000:]}")
    return res


def direct(src: Path, work: Path) -> dict:
    out = work / "direct.gguf"
    s = step("localmix", str(src), "-o", str(out), "--type", "Q4_K_M", "--force")
    size = out.stat().st_size
    out.unlink()
    return {"seconds": s["seconds"], "peak_rss": s["peak_rss"], "extra_disk": 0, "out_bytes": size}


def two_step(src: Path, work: Path, first: str, llama_src: Path | None = None) -> dict:
    mid, out = work / "mid-bf16.gguf", work / "two-step.gguf"
    if first == "localmix":
        a = step("localmix", str(src), "-o", str(mid), "--type", "BF16", "--force")
    else:
        conv = llama_src / "convert_hf_to_gguf.py"
        a = step("convert_hf_to_gguf", str(conv), str(src), "--outtype", "bf16", "--outfile", str(mid),
                 env={"PYTHONPATH": f"{llama_src}:{llama_src / 'gguf-py'}"})
    b = step("llama-quantize", str(mid), str(out))
    res = {
        "seconds": a["seconds"] + b["seconds"],
        "peak_rss": max(a["peak_rss"], b["peak_rss"]),
        "extra_disk": mid.stat().st_size,
        "out_bytes": out.stat().st_size,
        "steps": [a["seconds"], b["seconds"]],
    }
    mid.unlink()
    out.unlink()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", type=Path)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--llama-cpp-src", type=Path, help="llama.cpp source tree with convert_hf_to_gguf.py")
    ap.add_argument("--mixtral-layers", type=int, default=0, help="use a Mixtral-8x7B-shaped checkpoint of N layers")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        src = args.src
        if args.mixtral_layers:
            src = make_mixtral_8x7b_shaped(work / "mixtral-8x7b-shaped", args.mixtral_layers)
        elif src is None:
            sys.path.insert(0, str(ROOT))  # for tests.support, the fixtures the suite builds
            from tests.support.checkpoints import make_upcycled_smollm

            src = make_upcycled_smollm(work / "smollm2-moe")
        routes = {
            "direct": lambda: direct(src, work),
            "two-step (localmix BF16 + llama-quantize)": lambda: two_step(src, work, "localmix"),
        }
        if args.llama_cpp_src:
            routes["two-step (convert_hf_to_gguf.py BF16 + llama-quantize)"] = lambda: two_step(src, work, "llama.cpp", args.llama_cpp_src)
        runs: dict[str, list[dict]] = {k: [] for k in routes}
        for i in range(args.repeat):
            order = list(routes) if i % 2 == 0 else list(reversed(routes))
            for name in order:
                runs[name].append(routes[name]())
                print(f"  run {i + 1} {name}: {runs[name][-1]['seconds']:.2f} s", file=sys.stderr)

    summary = {
        name: {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "peak_rss_mib": max(r["peak_rss"] for r in rs) / 2**20,
            "extra_disk_mib": rs[0]["extra_disk"] / 2**20,
            "out_mib": rs[0]["out_bytes"] / 2**20,
        }
        for name, rs in runs.items()
    }
    base = summary["direct"]["seconds"]
    for s in summary.values():
        s["direct_time_ratio"] = base / s["seconds"]
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print(f"{'route':58} {'time s':>8} {'direct/route':>13} {'peak RSS MiB':>13} {'extra disk MiB':>15}")
    for s in summary.values():
        print(f"{name:58} {s['seconds']:8.2f} {s['direct_time_ratio']:13.2f} {s['peak_rss_mib']:13.0f} {s['extra_disk_mib']:15.0f}")


if __name__ == "__main__":
    main()
