"""`localmix bench MODEL [--json]`: measured prefill and decode speed of the auto plan beside the
baselines a llama.cpp user would try at the same VRAM budget (all experts on the CPU, and the best
`--n-cpu-moe N` that fits), each with the planner's prediction."""

from __future__ import annotations

import argparse
import json

from .common import GiB, add_budget_arguments

# Prompt text for the prefill measurement, repeated to the requested length.
TEXT = (
    "Mixture-of-Experts models route each token through a few of many feed-forward experts, so a token "
    "reads only a fraction of the weights. On a desktop, the experts that do not fit in video memory stay "
    "in system memory and run on the processor. "
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a GGUF file, or a model name in the store (localmix list)")
    add_budget_arguments(p)
    p.add_argument("--prompt-tokens", type=int, default=512, help="prefill length (default 512)")
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens to decode (default 64)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--json", action="store_true", help="results as JSON")


def configs(info, budget, args) -> list:
    """The auto plan and the whole-layer baselines that fit the same VRAM, without duplicates."""
    from dataclasses import replace

    from ..planner import n_cpu_moe, plan

    out = [plan(info, budget, args.ctx, args.kv_type)]
    if budget.vram and info.is_moe:
        for n in (info.n_layer,) + tuple(range(info.n_layer)):
            p = n_cpu_moe(info, budget, n, args.ctx, args.kv_type)
            if p is None:
                continue
            if n == info.n_layer:
                p = replace(p, label="all experts on CPU")
            out.append(p)
            if n != info.n_layer:
                break  # the smallest N that fits is the best whole-layer split
    unique, seen = [], set()
    for p in out:
        key = (p.gpu, p.n_gpu_layers)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def measure(info, p, args, threads: int) -> dict:
    """Load with placement p, prefill prompt-tokens, decode gen-tokens one by one; llama.cpp's own timers."""
    import llama_cpp

    from ..backends.llama import LlamaBackend

    b = LlamaBackend(info, p, ctx=args.ctx, kv_type=args.kv_type, threads=threads)
    b.load()
    llm = b.llm
    try:
        base = llm.tokenize(TEXT.encode(), add_bos=False)
        n_prompt = min(args.prompt_tokens, args.ctx - args.gen_tokens - 1)
        tokens = (base * (n_prompt // len(base) + 1))[:n_prompt]
        ctx = llm._ctx.ctx
        llama_cpp.llama_perf_context_reset(ctx)
        llm.reset()
        llm.eval(tokens)
        llama_cpp.llama_synchronize(ctx)  # the timers are updated when queued work is waited for
        perf = llama_cpp.llama_perf_context(ctx)
        prefill = perf.n_p_eval / (perf.t_p_eval_ms / 1000)
        llama_cpp.llama_perf_context_reset(ctx)
        for i in range(args.gen_tokens):  # one token at a time, as decode runs (which token is immaterial)
            llm.eval([base[i % len(base)]])
            llama_cpp.llama_synchronize(ctx)  # as sampling would; llama.cpp counts unsynced tokens as prompt
        perf = llama_cpp.llama_perf_context(ctx)
        decode = perf.n_eval / (perf.t_eval_ms / 1000)
    finally:
        b.close()
    return {"prefill_tps": prefill, "decode_tps": decode}


def run(args: argparse.Namespace) -> int:
    from ..model_info import read_model_info
    from ..models import resolve_model
    from .common import machine_and_budget

    info = read_model_info(resolve_model(args.model))
    hw, budget = machine_and_budget(args)
    rows = []
    for p in configs(info, budget, args):
        got = measure(info, p, args, args.threads or hw.cores)
        rows.append({
            "config": p.label, "gpu_gib": p.vram_total / GiB, "n_gpu_layers": p.n_gpu_layers,
            "cpu_expert_tensors": len([t for t in info.tensors if t.role == "expert" and t.name not in p.gpu]),
            "decode_predicted": p.decode_tps, "decode_measured": got["decode_tps"],
            "prefill_predicted": p.prefill_tps, "prefill_measured": got["prefill_tps"],
        })
    if args.json:
        print(json.dumps({"model": info.path, "vram_budget": budget.vram, "ctx": args.ctx, "results": rows}, indent=1))
        return 0

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{info.name} {info.file_type} · VRAM budget {budget.vram / GiB:.1f} GiB · {hw.cores} cores", title_justify="left")
    for col in ("config", "GPU GiB", "decode tok/s", "predicted", "error", "prefill tok/s", "predicted"):
        t.add_column(col, justify="left" if col == "config" else "right")
    for r in rows:
        err = (r["decode_predicted"] - r["decode_measured"]) / r["decode_measured"]
        t.add_row(r["config"], f"{r['gpu_gib']:.1f}", f"{r['decode_measured']:.1f}", f"{r['decode_predicted']:.1f}",
                  f"{err:+.0%}", f"{r['prefill_measured']:.0f}", f"{r['prefill_predicted']:.0f}")
    con = Console()
    con.print(t)
    if budget.vram and not hw.gpus:
        con.print("No GPU here: every placement ran on the CPU, so the predictions for GPU placements are not checked.")
    return 0
