"""`localmix bench MODEL [--ubatch N] [--json]`: measured prefill and decode speed of the auto plan beside the
baselines a llama.cpp user would try at the same VRAM budget (all experts on the CPU, and the best
`--n-cpu-moe N` that fits), each with the planner's prediction."""

from __future__ import annotations

import argparse
import json

from ..units import GiB
from .common import add_budget_arguments, add_repack_argument, add_threads_argument, tokens

# Prompt text for the prefill measurement, repeated to the requested length.
TEXT = (
    "Mixture-of-Experts models route each token through a few of many feed-forward experts, so a token "
    "reads only a fraction of the weights. On a desktop, the experts that do not fit in video memory stay "
    "in system memory and run on the processor. "
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a GGUF file, or a model name in the store (localmix list)")
    add_budget_arguments(p)
    p.add_argument("--prompt-tokens", type=tokens, default=512, help="prefill length (default 512)")
    p.add_argument("--gen-tokens", type=tokens, default=64, help="tokens to decode (default 64)")
    add_threads_argument(p)
    add_repack_argument(p)
    p.add_argument("--json", action="store_true", help="results as JSON")


def configs(info, budget, ctx: int, kv_type: str, ubatch: int | None = None) -> list:
    """The auto plan (with --ubatch if given) and the whole-layer baselines that fit the same VRAM, with llama.cpp's
    default micro-batch of 512, without duplicates."""
    from dataclasses import replace

    from ..planner import n_cpu_moe, plan

    out = [plan(info, budget, ctx, kv_type, ubatch)]
    if budget.vram and info.is_moe:
        for n in (info.n_layer, *range(info.n_layer)):
            p = n_cpu_moe(info, budget, n, ctx, kv_type)
            if p is None:
                continue
            out.append(replace(p, label="all experts on CPU") if n == info.n_layer else p)
            if n != info.n_layer:
                break  # the smallest N that fits is the best whole-layer split
    unique, seen = [], set()
    for p in out:
        if (p.gpu, p.n_gpu_layers, p.n_ubatch) not in seen:
            seen.add((p.gpu, p.n_gpu_layers, p.n_ubatch))
            unique.append(p)
    return unique


def prompt_tokens(tokenizer, n: int) -> list[int]:
    """n tokens of TEXT, repeated as needed."""
    base = tokenizer.tokenize(TEXT, special=False)
    return (base * (n // len(base) + 1))[:n]


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..errors import LocalmixError
    from ..loader import load
    from ..planner import prefill_tps
    from .common import planned

    p = planned(args)
    info, hw, budget = p.info, p.hardware, p.budget
    n_prompt = min(args.prompt_tokens, p.ctx - args.gen_tokens - 1)
    if n_prompt < 1:
        raise LocalmixError(f"--ctx {p.ctx} leaves no room for a prompt beside --gen-tokens {args.gen_tokens}")
    rows = []
    for plan in configs(info, budget, p.ctx, p.kv_type, args.ubatch):
        backend = load(replace(p, plan=plan), threads=args.threads, repack=args.repack)
        try:
            got = backend.measure(prompt_tokens(backend.tokenizer, n_prompt), args.gen_tokens)
        finally:
            backend.close()
        rows.append({
            "config": plan.label, "gpu_gib": plan.vram_total / GiB, "n_gpu_layers": plan.n_gpu_layers,
            "cpu_expert_tensors": len([t for t in info.tensors if t.role == "expert" and t.name not in plan.gpu]),
            "n_batch": plan.n_batch, "n_ubatch": plan.n_ubatch,
            "predicted_decode_tps": plan.decode_tps, "measured_decode_tps": got.decode_tps,
            "predicted_prefill_tps": prefill_tps(info, plan, budget, n_prompt), "measured_prefill_tps": got.prefill_tps,
        })
        # the names before issue 15, kept for scripts that read them
        rows[-1].update(decode_predicted=rows[-1]["predicted_decode_tps"], decode_measured=got.decode_tps,
                        prefill_predicted=rows[-1]["predicted_prefill_tps"], prefill_measured=got.prefill_tps)
    if args.json:
        print(json.dumps({"model": info.path, "vram_budget": budget.vram, "ram_bandwidth": args.ram_bandwidth, "ctx": p.ctx,
                          "prompt_tokens": n_prompt, "gen_tokens": args.gen_tokens, "results": rows}, indent=1))
        return 0

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"{escape(info.name)} {escape(info.file_type)} · VRAM budget {budget.vram / GiB:.1f} GiB · {hw.cores} cores · "
                    f"{n_prompt}-token prompt", box=None,
              title_justify="left")
    for col in ("config", "GPU GiB", "ubatch", "decode tok/s", "predicted (error)", "prefill tok/s", "predicted (error)"):
        t.add_column(col, justify="left" if col == "config" else "right")
    for r in rows:
        err = (r["predicted_decode_tps"] - r["measured_decode_tps"]) / r["measured_decode_tps"]
        perr = (r["predicted_prefill_tps"] - r["measured_prefill_tps"]) / r["measured_prefill_tps"]
        t.add_row(r["config"], f"{r['gpu_gib']:.1f}", str(r["n_ubatch"]), f"{r['measured_decode_tps']:.1f}",
                  f"{r['predicted_decode_tps']:.1f} ({err:+.0%})", f"{r['measured_prefill_tps']:.0f}",
                  f"{r['predicted_prefill_tps']:.0f} ({perr:+.0%})")
    con = Console()
    con.print(t)
    if budget.vram and not hw.gpus:
        con.print("No GPU here: every placement ran on the CPU, so the predictions for GPU placements are not checked.")
    if args.ram_bandwidth is not None:
        con.print(f"Predicted for RAM at {args.ram_bandwidth / 1e9:.0f} GB/s (--ram-bandwidth), measured on this machine.")
    return 0
