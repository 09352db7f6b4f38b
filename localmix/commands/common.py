"""What several commands share: the budget flags, turning this machine (or the flags) into a planner
Budget, and describing a plan in a few words or as a table."""

from __future__ import annotations

import argparse
import re

from ..errors import UserError

GiB = 1 << 30
_UNITS = {"": GiB, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": GiB, "gb": GiB, "gib": GiB, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'24G', '24GiB', '16', '512M' -> bytes (a bare number is GiB; binary units throughout, as GPU
    vendors and `free -g` count)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 24G, 12GiB, 512M, 0)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def add_budget_arguments(p: argparse.ArgumentParser, ctx_default: int = 4096) -> None:
    p.add_argument("--vram", type=parse_size, metavar="SIZE", help="GPU memory to plan for (default: free VRAM found; 0 = CPU only)")
    p.add_argument("--ram", type=parse_size, metavar="SIZE", help="RAM to plan for (default: available RAM)")
    p.add_argument("--ctx", type=int, default=ctx_default, help=f"context length in tokens (default {ctx_default})")
    p.add_argument("--kv-type", default="f16", choices=("f16", "q8_0", "q4_0"), help="KV cache type (default f16)")


def machine_and_budget(args: argparse.Namespace):
    """(Hardware, Budget) from this machine, with --vram/--ram overriding what was found."""
    from ..hardware import PCIE_BANDWIDTH, DEFAULT_GPU_BANDWIDTH, detect
    from ..planner import Budget

    hw = detect()
    gpu = hw.gpus[0] if hw.gpus else None
    vram = args.vram if args.vram is not None else (gpu.free if gpu else 0)
    ram = args.ram if args.ram is not None else hw.ram_available
    budget = Budget(
        vram=vram,
        ram=ram,
        gpu_bandwidth=gpu.bandwidth if gpu else DEFAULT_GPU_BANDWIDTH,
        cpu_bandwidth=hw.cpu_decode_bandwidth,
        pcie_bandwidth=PCIE_BANDWIDTH,
        cpu_flops=hw.cpu_flops,
    )
    return hw, budget


def load_plan(args: argparse.Namespace):
    """Model info, hardware, budget and the auto plan for a MODEL argument."""
    from ..model_info import read_model_info
    from ..models import resolve_model
    from ..planner import plan

    info = read_model_info(resolve_model(args.model))
    if args.ctx > info.n_ctx_train:
        raise UserError(f"--ctx {args.ctx} is longer than the model's trained context ({info.n_ctx_train})")
    hw, budget = machine_and_budget(args)
    return info, hw, budget, plan(info, budget, args.ctx, args.kv_type)


def _ranges(layers: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


def layer_rows(info, p) -> list[tuple[str, str, str]]:
    """(layers, attention, experts) rows, consecutive layers with the same placement grouped."""
    first_gpu = info.n_layer - p.n_gpu_layers
    sig = []
    for layer in range(info.n_layer):
        attn = "GPU" if layer >= first_gpu else "CPU"
        kinds = [(t.name.split(".")[2].removeprefix("ffn_").removesuffix("_exps"), t.name in p.gpu)
                 for t in info.tensors if t.layer == layer and t.role == "expert"]
        if not kinds:
            experts = "-"
        elif all(g for _, g in kinds):
            experts = "GPU"
        elif not any(g for _, g in kinds):
            experts = "CPU"
        else:
            experts = "GPU: " + ", ".join(k for k, g in kinds if g) + "; CPU: " + ", ".join(k for k, g in kinds if not g)
        sig.append((attn, experts))
    rows, i = [], 0
    while i < len(sig):
        j = i
        while j + 1 < len(sig) and sig[j + 1] == sig[i]:
            j += 1
        rows.append((_ranges(list(range(i, j + 1))), *sig[i]))
        i = j + 1
    return rows


def split_label(p) -> str:
    """Where the weights are, as `ollama ps` shows it: '100% CPU' or '45%/55% CPU/GPU'."""
    gpu, cpu = p.vram.get("weights", 0), p.ram["weights"]
    if not gpu:
        return "100% CPU"
    share = round(100 * cpu / (cpu + gpu))
    return "100% GPU" if share == 0 else f"{share}%/{100 - share}% CPU/GPU"


def summary_line(info, p) -> str:
    """One line, e.g. 'GPU 11.8 GiB: attention + experts of layers 14-31; CPU 14.2 GiB: experts of
    layers 0-13; predicted 17 tok/s'."""
    cpu_w = p.ram["weights"]
    if not p.n_gpu_layers:
        return f"CPU only: {cpu_w / GiB:.1f} GiB of weights in RAM; predicted {p.decode_tps:.1f} tok/s"
    experts = [t for t in info.tensors if t.role == "expert"]
    gpu_layers = sorted({t.layer for t in experts if t.name in p.gpu})  # a layer may be split: in both
    cpu_layers = sorted({t.layer for t in experts if t.name not in p.gpu})
    on_gpu = "attention" + (f" + experts of layers {_ranges(gpu_layers)}" if gpu_layers else "")
    on_cpu = f"experts of layers {_ranges(cpu_layers)}" if cpu_layers else "token embeddings"
    return (f"GPU {p.vram_total / GiB:.1f} GiB: {on_gpu}; CPU {cpu_w / GiB:.1f} GiB: {on_cpu}; "
            f"predicted {p.decode_tps:.1f} tok/s")
