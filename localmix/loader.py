"""Read, plan, load: from a model file and a memory budget to a loaded backend. `plan`, `run`, `bench`,
`info`, `chat` and `quantize`'s closing summary all start here, with plain values (sizes in bytes, None
for "what this machine has")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .backends.llama import LlamaBackend
from .errors import LocalmixError
from .hardware import DECODE_READ_EFFICIENCY, DEFAULT_GPU_BANDWIDTH, PCIE_BANDWIDTH, Hardware, detect
from .model_info import ModelInfo, model_info
from .modelfile import ModelFile, open_model_file
from .planner import Budget, Plan, plan
from .units import DEFAULT_CTX


def machine_and_budget(vram: int | None = None, ram: int | None = None, ram_bandwidth: float | None = None, *,
                       measure: bool = False) -> tuple[Hardware, Budget]:
    """This machine, and the budget to plan for: what it has free, or the `vram`/`ram` given (bytes), and
    its RAM's read bandwidth or the `ram_bandwidth` given (bytes/s, as our probe measures it: the machine
    planned for is another one, so this one's cores do not cap it)."""
    hw = detect(measure=measure)
    gpu = hw.gpus[0] if hw.gpus else None
    budget = Budget(
        vram=vram if vram is not None else (gpu.free if gpu else 0),
        ram=ram if ram is not None else hw.ram_available,
        gpu_bandwidth=gpu.bandwidth if gpu else DEFAULT_GPU_BANDWIDTH,
        cpu_bandwidth=hw.cpu_decode_bandwidth if ram_bandwidth is None else ram_bandwidth * DECODE_READ_EFFICIENCY,
        pcie_bandwidth=PCIE_BANDWIDTH,
        cpu_flops=hw.cpu_flops,
    )
    return hw, budget


@dataclass(frozen=True)
class Planned:
    """A model read and planned for a machine."""

    model: ModelFile
    info: ModelInfo
    hardware: Hardware
    budget: Budget
    plan: Plan
    ctx: int
    kv_type: str
    notes: tuple[str, ...] = ()  # what was decided for the user that they should hear about


def prepare(path: str | Path, *, vram: int | None = None, ram: int | None = None, ctx: int | None = None,
            kv_type: str = "f16", ram_bandwidth: float | None = None, measure: bool = False) -> Planned:
    """Read and plan. `ctx` None: DEFAULT_CTX, lowered (with a note) to what the model was trained on."""
    mf = open_model_file(path)
    info = model_info(mf)
    notes = ()
    if ctx is None:
        ctx = min(DEFAULT_CTX, info.n_ctx_train)
        if ctx < DEFAULT_CTX:
            notes = (f"context {ctx} tokens, the longest this model was trained on",)
    elif ctx > info.n_ctx_train:
        raise LocalmixError(f"--ctx {ctx} is longer than the model's trained context ({info.n_ctx_train})")
    hw, budget = machine_and_budget(vram, ram, ram_bandwidth, measure=measure)
    return Planned(mf, info, hw, budget, plan(info, budget, ctx, kv_type), ctx, kv_type, notes)


def load(p: Planned, *, threads: int | None = None, progress: Callable[[float], None] | None = None,
         verbose: bool = False) -> LlamaBackend:
    """The model loaded by llama.cpp with the plan (threads: physical cores unless given)."""
    backend = LlamaBackend(p.info, p.plan, ctx=p.ctx, kv_type=p.kv_type, threads=threads or p.hardware.cores, verbose=verbose)
    backend.load(progress)
    return backend


def vocabulary(mf: ModelFile):
    """The model's vocabulary alone (no weights read), to tokenize without loading the model."""
    from .llamacpp import Engine

    try:
        return Engine.vocab_only(mf.path)
    except (ValueError, RuntimeError) as e:
        raise LocalmixError(f"llama.cpp could not read the vocabulary of {mf.path}: {e}") from None


def summary_here(info: ModelInfo, vram: int | None = None, ram: int | None = None, ram_bandwidth: float | None = None) -> str:
    """How a model would run on this machine (or on the budget given), in one line: the plan's summary
    at a 4096-token context, or why it does not fit."""
    from .describe import summary_line
    from .errors import DoesNotFit

    _, budget = machine_and_budget(vram, ram, ram_bandwidth)
    try:
        return summary_line(info, plan(info, budget, min(DEFAULT_CTX, info.n_ctx_train)))
    except DoesNotFit as e:
        return str(e)
