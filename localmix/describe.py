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


def workers(p: Plan) -> list[str]:
    """The endpoints of the workers the plan uses, one table column each."""
    return list(dict.fromkeys(r.endpoint for r in p.remotes))


def _places(info: ModelInfo, p: Plan) -> dict[str, str]:
    """Expert tensor name -> 'GPU', 'CPU' or the endpoint of its worker (with ' GPU' for a worker's GPU)."""
    by_name = {r.name: r for r in p.remotes}
    out = {t.name: "GPU" if t.name in p.gpu else "CPU" for t in info.tensors if t.role == "expert"}
    for name, names in p.remote.items():
        r = by_name[name]
        out.update(dict.fromkeys(names, r.endpoint + (" GPU" if r.kind == "gpu" else "")))
    return out


def layer_rows(info: ModelInfo, p: Plan) -> list[tuple[str, ...]]:
    """(layers, attention, experts, *one cell per worker) rows, consecutive layers with the same placement
    grouped. Experts on a worker read 'worker' in the experts column and are named in the worker's."""
    places = _places(info, p)
    ends = workers(p)
    experts_of: dict[int, list] = {}
    for t in info.tensors:
        if t.role == "expert":
            experts_of.setdefault(t.layer, []).append((t.expert_kind, places[t.name]))
    sig = []
    for layer in range(info.n_layer):
        attn = "GPU" if attention_on_gpu(info, p, layer) else "CPU"
        kinds = [(k, w if w in ("GPU", "CPU") else "worker") for k, w in experts_of.get(layer, [])]
        where = list(dict.fromkeys(w for _, w in kinds))
        if not kinds:
            experts = "-"
        elif len(where) == 1:
            experts = where[0]
        else:
            experts = "; ".join(f"{w}: " + ", ".join(k for k, x in kinds if x == w) for w in where)
        cells = []
        for e in ends:
            there = [(k, w) for k, w in experts_of.get(layer, []) if w.split(" ")[0] == e]
            gpu = " (GPU)" if any(w.endswith(" GPU") for _, w in there) else ""
            cells.append("" if not there else ("experts" if len(there) == len(kinds) else ", ".join(k for k, _ in there)) + gpu)
        sig.append((attn, experts, *cells))
    rows, i = [], 0
    while i < len(sig):
        j = i
        while j + 1 < len(sig) and sig[j + 1] == sig[i]:
            j += 1
        rows.append((ranges(list(range(i, j + 1))), *sig[i]))
        i = j + 1
    return rows


def split_label(p: Plan) -> str:
    """Where the weights are: '100% CPU', '100% GPU' or '45%/55% CPU/GPU' ('30%/50%/20% CPU/GPU/workers',
    '40%/60% CPU/workers' with workers)."""
    gpu, cpu = p.vram.get("weights", 0), p.ram["weights"]
    there = sum(p.remote_memory.values())
    if there:
        parts = [(n, b) for n, b in (("CPU", cpu), ("GPU", gpu), ("workers", there)) if b]
        total = sum(b for _, b in parts)
        return "/".join(f"{round(100 * b / total)}%" for _, b in parts) + " " + "/".join(n for n, _ in parts)
    if not gpu:
        return "100% CPU"
    share = round(100 * cpu / (cpu + gpu))
    return "100% GPU" if share == 0 else f"{share}%/{100 - share}% CPU/GPU"


def summary_line(info: ModelInfo, p: Plan) -> str:
    """One line, e.g. 'GPU 11.8 GiB: attention + experts of layers 14-31; CPU 14.2 GiB: experts of
    layers 0-13; predicted 17.0 tok/s' ('; 2 workers 12.3 GiB: experts of layers ...' before the
    prediction when workers hold some)."""
    cpu_w = p.ram["weights"]
    elsewhere = {n for names in p.remote.values() for n in names}
    there = ""
    if elsewhere:
        n = len(workers(p))
        layers = sorted({t.layer for t in info.tensors if t.name in elsewhere})
        there = (f"; {n} worker{'s' if n > 1 else ''} {sum(p.remote_memory.values()) / GiB:.1f} GiB: "
                 f"experts of layers {ranges(layers)}")
    if not p.n_gpu_layers:
        return f"CPU only: {cpu_w / GiB:.1f} GiB of weights in RAM{there}; predicted {p.decode_tps:.1f} tok/s"
    experts = [t for t in info.tensors if t.role == "expert"]
    gpu_layers = sorted({t.layer for t in experts if t.name in p.gpu})  # a layer may be split: in both
    cpu_layers = sorted({t.layer for t in experts if t.name not in p.gpu and t.name not in elsewhere})
    on_gpu = "attention" + (f" + experts of layers {ranges(gpu_layers)}" if gpu_layers else "")
    if p.n_gpu_layers < info.n_layer:
        on_gpu = f"attention of layers {ranges(list(range(info.n_layer - p.n_gpu_layers, info.n_layer)))}"
    on_cpu = f"experts of layers {ranges(cpu_layers)}" if cpu_layers else "token embeddings"
    return (f"GPU {p.vram_total / GiB:.1f} GiB: {on_gpu}; CPU {cpu_w / GiB:.1f} GiB: {on_cpu}{there}; "
            f"predicted {p.decode_tps:.1f} tok/s")
