"""A plan in words, for people: one summary line (chat's notice, `info`, `quantize`'s closing line), the
CPU/GPU split as `ollama ps` shows it, and the per-layer rows of `plan`'s table. Pure functions."""

from __future__ import annotations

from .model_info import ModelInfo
from .planner import Plan
from .units import GiB


def ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out, start = [], None
    for i, x in enumerate(numbers):
        if start is None:
            start = x
        if i + 1 == len(numbers) or numbers[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


def attention_on_gpu(info: ModelInfo, p: Plan, layer: int) -> bool:
    return layer >= info.n_layer - p.n_gpu_layers  # llama.cpp offloads the last layers


def layer_rows(info: ModelInfo, p: Plan) -> list[tuple[str, str, str]]:
    """(layers, attention, experts) rows, consecutive layers with the same placement grouped."""
    experts_of: dict[int, list] = {}
    for t in info.tensors:
        if t.role == "expert":
            experts_of.setdefault(t.layer, []).append((t.expert_kind, t.name in p.gpu))
    sig = []
    for layer in range(info.n_layer):
        attn = "GPU" if attention_on_gpu(info, p, layer) else "CPU"
        kinds = experts_of.get(layer, [])
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
        rows.append((ranges(list(range(i, j + 1))), *sig[i]))
        i = j + 1
    return rows


def split_label(p: Plan) -> str:
    """Where the weights are: '100% CPU', '100% GPU' or '45%/55% CPU/GPU'."""
    gpu, cpu = p.vram.get("weights", 0), p.ram["weights"]
    if not gpu:
        return "100% CPU"
    share = round(100 * cpu / (cpu + gpu))
    return "100% GPU" if share == 0 else f"{share}%/{100 - share}% CPU/GPU"


def summary_line(info: ModelInfo, p: Plan) -> str:
    """One line, e.g. 'GPU 11.8 GiB: attention + experts of layers 14-31; CPU 14.2 GiB: experts of
    layers 0-13; predicted 17.0 tok/s'."""
    cpu_w = p.ram["weights"]
    if not p.n_gpu_layers:
        return f"CPU only: {cpu_w / GiB:.1f} GiB of weights in RAM; predicted {p.decode_tps:.1f} tok/s"
    experts = [t for t in info.tensors if t.role == "expert"]
    gpu_layers = sorted({t.layer for t in experts if t.name in p.gpu})  # a layer may be split: in both
    cpu_layers = sorted({t.layer for t in experts if t.name not in p.gpu})
    on_gpu = "attention" + (f" + experts of layers {ranges(gpu_layers)}" if gpu_layers else "")
    if p.n_gpu_layers < info.n_layer:
        on_gpu = f"attention of layers {ranges(list(range(info.n_layer - p.n_gpu_layers, info.n_layer)))}"
    on_cpu = f"experts of layers {ranges(cpu_layers)}" if cpu_layers else "token embeddings"
    return (f"GPU {p.vram_total / GiB:.1f} GiB: {on_gpu}; CPU {cpu_w / GiB:.1f} GiB: {on_cpu}; "
            f"predicted {p.decode_tps:.1f} tok/s")
