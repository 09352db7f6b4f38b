"""`localmix plan MODEL [--vram] [--ram] [--ctx] [--kv-type] [--json] [--llama-args]`: where every
tensor goes on this machine (or the one --vram/--ram describe) and how fast it should run."""

from __future__ import annotations

import argparse
import json
import shlex

from .common import GiB, add_budget_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a GGUF file, or a model name in the store (localmix list)")
    add_budget_arguments(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="the plan as JSON (keys in the README)")
    out.add_argument("--llama-args", action="store_true", help="print the equivalent llama.cpp flags (-ngl, -ot)")


def plan_json(info, hw, budget, p, args) -> dict:
    from ..planner import llama_args

    layers = []
    first_gpu = info.n_layer - p.n_gpu_layers
    for layer in range(info.n_layer):
        experts = {t.name.split(".")[2].removeprefix("ffn_").removesuffix("_exps"): ("gpu" if t.name in p.gpu else "cpu")
                   for t in info.tensors if t.layer == layer and t.role == "expert"}
        layers.append({"layer": layer, "attention": "gpu" if layer >= first_gpu else "cpu", "experts": experts})
    return {
        "model": {"path": info.path, "name": info.name, "type": info.file_type, "bytes": info.weight_bytes,
                  "layers": info.n_layer, "experts": info.n_expert, "experts_used": info.n_expert_used},
        "machine": {"gpus": [g.__dict__ for g in hw.gpus], "ram_total": hw.ram_total, "ram_available": hw.ram_available,
                    "cores": hw.cores, "cpu_decode_bandwidth": hw.cpu_decode_bandwidth},
        "budget": {"vram": budget.vram, "ram": budget.ram},
        "ctx": args.ctx,
        "kv_type": args.kv_type,
        "n_gpu_layers": p.n_gpu_layers,
        "vram": p.vram,
        "ram": p.ram,
        "predicted": {"decode_tps": p.decode_tps, "prefill_tps": p.prefill_tps},
        "layers": layers,
        "cpu_experts": list(p.cpu_experts),
        "llama_args": llama_args(info, p),
    }


def run(args: argparse.Namespace) -> int:
    from ..planner import llama_args
    from .common import layer_rows, load_plan

    info, hw, budget, p = load_plan(args)
    if args.json:
        print(json.dumps(plan_json(info, hw, budget, p, args), indent=1))
        return 0
    if args.llama_args:
        print(shlex.join(llama_args(info, p)))
        return 0

    from rich.console import Console
    from rich.table import Table

    con = Console()
    moe = f"{info.n_expert} experts, top-{info.n_expert_used}" if info.is_moe else "dense"
    con.print(f"[bold]{info.name}[/] {info.file_type} · {info.weight_bytes / GiB:.1f} GiB · {info.n_layer} layers · {moe}")
    gpu = ", ".join(f"{g.name} ({g.free / GiB:.1f} of {g.total / GiB:.1f} GiB free)" for g in hw.gpus) or "no GPU"
    con.print(f"Machine: {gpu} · RAM {hw.ram_available / GiB:.1f} of {hw.ram_total / GiB:.1f} GiB free · "
              f"{hw.cores} cores · CPU memory {hw.cpu_decode_bandwidth / 1e9:.0f} GB/s")
    con.print(f"Budget: VRAM {budget.vram / GiB:.1f} GiB, RAM {budget.ram / GiB:.1f} GiB · context {args.ctx} ({args.kv_type} KV cache)")

    t = Table(title="Placement", title_justify="left")
    t.add_column("layers")
    t.add_column("attention")
    t.add_column("experts")
    for row in layer_rows(info, p):
        t.add_row(*row)
    t.add_row("output", "GPU" if p.n_gpu_layers == info.n_layer else "CPU", "")
    t.add_row("token embeddings", "CPU", "")
    con.print(t)

    m = Table(title="Memory", title_justify="left")
    m.add_column("")
    m.add_column("GPU", justify="right")
    m.add_column("CPU", justify="right")
    for key, label in (("weights", "weights"), ("kv_cache", "KV cache"), ("compute", "compute buffers"), ("reserve", "reserve")):
        m.add_row(label, f"{p.vram.get(key, 0) / GiB:.2f} GiB", f"{p.ram[key] / GiB:.2f} GiB" if key in p.ram else "")
    m.add_row("[bold]total", f"[bold]{p.vram_total / GiB:.2f} GiB", f"[bold]{p.ram_total / GiB:.2f} GiB")
    con.print(m)
    con.print(f"Predicted: decode [bold]{p.decode_tps:.1f}[/] tok/s, prefill {p.prefill_tps:.0f} tok/s")
    return 0
