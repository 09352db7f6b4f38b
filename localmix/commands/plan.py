"""`localmix plan MODEL [--vram] [--ram] [--ram-bandwidth] [--ctx] [--kv-type] [--ubatch] [--rpc ...] [--json] [--llama-args]`:
where every tensor goes on this machine (or the one --vram/--ram/--ram-bandwidth describe), and on the workers
--rpc names, the batch sizes, how fast it should run, and what longer contexts would cost."""

from __future__ import annotations

import argparse
import json
import shlex

from ..units import GiB
from .common import add_budget_arguments, add_threads_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a GGUF file, or a model name in the store (localmix list)")
    add_budget_arguments(p)
    add_threads_argument(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="the plan as JSON (keys in the README)")
    out.add_argument("--llama-args", action="store_true", help="print the equivalent llama.cpp flags (-ngl, -ot, --rpc, -ts)")


def threads_line(given: int | None) -> str:
    """The thread choice as run/chat would make it now (hardware.auto_threads)."""
    from ..hardware import auto_threads

    return auto_threads(given).describe()


def context_table(p) -> tuple[list[int], list[tuple[int, str, float | None]], int]:
    """(contexts, planner.context_speeds rows for each KV type, the context chat and serve would choose)."""
    from ..planner import KV_TYPES, context_candidates, context_speeds, default_context

    contexts = context_candidates(p.info)
    return contexts, context_speeds(p.info, p.budget, contexts, tuple(KV_TYPES)), default_context(p.info, p.budget, p.kv_type)


def plan_json(p, ram_bandwidth: float | None = None) -> dict:
    """The plan as data (keys in the README); `ram_bandwidth`: the --ram-bandwidth given, if any."""
    from ..describe import attention_on_gpu
    from ..planner import llama_args, prefill_tps

    info, hw, budget, plan = p.info, p.hardware, p.budget, p.plan
    _, speeds, default_ctx = context_table(p)
    device = {n: name for name, names in plan.remote.items() for n in names}  # expert -> its worker device (RPC0[h:p])
    for n in plan.gpu:
        device[n] = "gpu"
    layers = []
    for layer in range(info.n_layer):
        experts = {t.expert_kind: device.get(t.name, "cpu") for t in info.tensors if t.layer == layer and t.role == "expert"}
        layers.append({"layer": layer, "attention": "gpu" if attention_on_gpu(info, plan, layer) else "cpu", "experts": experts})
    return {
        "model": {"path": info.path, "parts": [str(x) for x in p.model.parts], "name": info.name, "type": info.file_type,
                  "bytes": info.weight_bytes, "tensors": len(info.tensors), "layers": info.n_layer,
                  "experts": info.n_expert, "experts_used": info.n_expert_used},
        "machine": {"gpus": [g.__dict__ for g in hw.gpus], "ram_total": hw.ram_total, "ram_available": hw.ram_available,
                    "cores": hw.cores, "cpu_decode_bandwidth": hw.cpu_decode_bandwidth,
                    "read_bandwidth": hw.read_bandwidth, "bandwidth_probes": hw.probes, "bandwidth_measured": hw.measured},
        "budget": {"vram": budget.vram, "ram": budget.ram, "ram_bandwidth": ram_bandwidth, "cpu_decode_bandwidth": budget.cpu_bandwidth},
        "ctx": p.ctx,
        "kv_type": p.kv_type,
        "n_gpu_layers": plan.n_gpu_layers,
        "vram": plan.vram,
        "ram": plan.ram,
        "n_batch": plan.n_batch,
        "n_ubatch": plan.n_ubatch,
        "predicted": {"decode_tps": plan.decode_tps, "prefill_tps": plan.prefill_tps,
                      "prefill_4096_tps": prefill_tps(info, plan, budget, 4096)},
        "contexts": [{"ctx": c, "kv_type": kv, "decode_tps": tps} for c, kv, tps in speeds],
        "default_ctx": default_ctx,
        "layers": layers,
        "tensors": [{"name": t.name, "part": t.part, "bytes": t.nbytes, "type": t.type,
                     "device": device.get(t.name, "cpu")} for t in info.tensors],
        "remotes": [{"name": r.name, "endpoint": r.endpoint, "device": r.device, "kind": r.kind, "memory": r.memory,
                     "bandwidth": r.bandwidth, "hop_seconds": r.hop_seconds, "link_bandwidth": r.link_bandwidth,
                     "used": plan.remote_memory.get(r.name, 0), "tensors": list(plan.remote.get(r.name, ()))}
                    for r in budget.remotes],
        "cpu_experts": list(plan.cpu_experts),
        "llama_args": llama_args(info, plan),
    }


def measured_line(hw) -> str:
    """'CPU memory 39 GB/s (best of 3 probes, measured 2026-11-28 12:03)'."""
    import time

    if not hw.probes:
        return "CPU memory not measured"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(hw.measured))
    return f"CPU memory {hw.cpu_decode_bandwidth / 1e9:.0f} GB/s (best of {hw.probes} probes, measured {when}; --measure to measure again)"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..describe import layer_rows, workers
    from ..planner import llama_args, prefill_tps
    from ..text import markup
    from .common import planned

    p = planned(args)
    info, hw, budget, plan = p.info, p.hardware, p.budget, p.plan
    if args.json:
        print(json.dumps(plan_json(p, args.ram_bandwidth), indent=1))
        return 0
    if args.llama_args:
        print(shlex.join(llama_args(info, plan)))
        return 0

    con = Console()
    moe = f"{info.n_expert} experts, top-{info.n_expert_used}" if info.is_moe else "dense"
    parts = f" · {len(p.model.parts)} files" if len(p.model.parts) > 1 else ""
    con.print(f"[bold]{markup(info.name, 1000)}[/] {markup(info.file_type)} · {info.weight_bytes / GiB:.1f} GiB{parts} · "
              f"{info.n_layer} layers · {moe}")
    gpu = ", ".join(f"{markup(g.name)} ({g.free / GiB:.1f} of {g.total / GiB:.1f} GiB free)" for g in hw.gpus) or "no GPU"
    con.print(f"Machine: {gpu} · RAM {hw.ram_available / GiB:.1f} of {hw.ram_total / GiB:.1f} GiB free · "
              f"{threads_line(args.threads)} · {measured_line(hw)}")
    given = f" at {args.ram_bandwidth / 1e9:.0f} GB/s" if args.ram_bandwidth is not None else ""
    con.print(f"Budget: VRAM {budget.vram / GiB:.1f} GiB, RAM {budget.ram / GiB:.1f} GiB{given} · context {p.ctx} ({p.kv_type} KV cache)")
    for r in budget.remotes:
        con.print(f"Worker {markup(r.name)}: {r.kind.upper()} {r.memory / GiB:.1f} GiB at {r.bandwidth / 1e9:.0f} GB/s · "
                  f"hop {r.hop_seconds * 1e6:.0f} µs, link {r.link_bandwidth / 1e6:.0f} MB/s", highlight=False)

    ends = workers(plan)
    t = Table(title="Placement", title_justify="left")
    t.add_column("layers")
    t.add_column("attention")
    t.add_column("experts")
    for e in ends:
        t.add_column(markup(e))
    pad = [""] * len(ends)
    for row in layer_rows(info, plan):
        t.add_row(*row)
    t.add_row("output", "GPU" if plan.n_gpu_layers == info.n_layer else "CPU", "", *pad)
    t.add_row("token embeddings", "CPU", "", *pad)
    con.print(t)

    m = Table(title="Memory", title_justify="left")
    m.add_column("")
    m.add_column("GPU", justify="right")
    m.add_column("CPU", justify="right")
    for name in plan.remote:
        m.add_column(markup(name), justify="right")
    there = [f"{b / GiB:.2f} GiB" for b in plan.remote_memory.values()]
    for key, label in (("weights", "weights"), ("kv_cache", "KV cache"), ("compute", "compute buffers"), ("reserve", "reserve")):
        m.add_row(label, f"{plan.vram.get(key, 0) / GiB:.2f} GiB", f"{plan.ram[key] / GiB:.2f} GiB" if key in plan.ram else "",
                  *(there if key == "weights" else [""] * len(there)))
    m.add_row("[bold]total", f"[bold]{plan.vram_total / GiB:.2f} GiB", f"[bold]{plan.ram_total / GiB:.2f} GiB",
              *(f"[bold]{x}" for x in there))
    con.print(m)
    con.print(f"Batches: {plan.n_batch} tokens per call, {plan.n_ubatch} per micro-batch{ubatch_why(args, plan)}")
    con.print(f"Predicted: decode [bold]{plan.decode_tps:.1f}[/] tok/s, prefill {plan.prefill_tps:.0f} tok/s "
              f"({prefill_tps(info, plan, budget, 4096):.0f} tok/s for a 4096-token prompt)")
    table, note = speed_table(p)
    con.print(table)
    con.print(note)
    return 0


def ubatch_why(args, plan) -> str:
    if args.ubatch is not None:
        return " (--ubatch)"
    if plan.n_ubatch > 512:
        return " (experts in RAM are copied to the GPU once per micro-batch: larger ones copy less often)"
    return ""


def speed_table(p):
    """Context lengths x KV types: the decode each plan would reach ('—': does not fit)."""
    from rich.table import Table

    from ..planner import KV_TYPES

    contexts, speeds, default_ctx = context_table(p)
    by = {(c, kv): tps for c, kv, tps in speeds}
    t = Table(title="Context against speed (predicted decode tok/s)", title_justify="left")
    t.add_column("context")
    for kv in KV_TYPES:
        t.add_column(f"{kv} KV", justify="right")
    for c in contexts:
        mark = " *" if c == p.ctx else ""
        t.add_row(f"{c}{mark}", *("—" if by[c, kv] is None else f"{by[c, kv]:.1f}" for kv in KV_TYPES))
    return t, f"chat and serve default to {default_ctx} tokens ({p.kv_type} KV): the longest within 10% of the best decode; * this plan"
