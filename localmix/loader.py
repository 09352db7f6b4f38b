"""Read, plan, load: from a model file and a memory budget to a loaded backend. `plan`, `run`, `bench`,
`info`, `chat` and `quantize`'s closing summary all start here, with plain values (sizes in bytes, None
for "what this machine has")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .backends.llama import LlamaBackend
from .errors import LocalmixError
from .hardware import DECODE_READ_EFFICIENCY, DEFAULT_GPU_BANDWIDTH, PCIE_BANDWIDTH, Hardware, detect
from .model_info import ModelInfo, model_info
from .modelfile import ModelFile, open_model_file
from .planner import NETWORKS, Budget, Plan, Remote, default_context, plan
from .units import DEFAULT_CTX, GiB

DEFAULT_NETWORK = "1gbe"  # a worker planned without contact: the common home network
LOOPBACK_HOSTS = ("127.", "localhost", "[::1]")
# What a probed worker keeps for itself: its compute buffers, the OS and whatever else runs there.
WORKER_HEADROOM = 1 * GiB
WORKER_HEADROOM_SHARE = 0.05


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


def _per_endpoint(values: Sequence[int] | None, n: int, flag: str) -> list[int | None]:
    """--rpc-ram/--rpc-vram values: one per endpoint, or one for all."""
    if not values:
        return [None] * n
    if len(values) == 1:
        return list(values) * n
    if len(values) != n:
        raise LocalmixError(f"{flag} has {len(values)} sizes for {n} workers: give one per --rpc endpoint, or one for all")
    return list(values)


def _network(endpoint: str, network: str | None) -> tuple[float, float]:
    """(hop_seconds, link bytes/s) of the --rpc-network named, else a guess from the address."""
    if network is not None:
        if network not in NETWORKS:
            raise LocalmixError(f"unknown network {network} (choose from {', '.join(NETWORKS)})")
        return NETWORKS[network]
    return NETWORKS["loopback" if endpoint.startswith(LOOPBACK_HOSTS) else DEFAULT_NETWORK]


def planned_remotes(endpoint: str, ram: int | None, vram: int | None, network: str | None, bandwidth: float) -> list[Remote]:
    """A worker not yet contacted, from its --rpc-ram/--rpc-vram: its GPU first (device 0), its RAM last,
    as a localmix worker lists them."""
    hop, link = _network(endpoint, network or DEFAULT_NETWORK)
    out = []
    if vram:
        out.append(Remote(endpoint, 0, "gpu", vram, DEFAULT_GPU_BANDWIDTH, hop, link))
    if ram:
        out.append(Remote(endpoint, len(out), "cpu", ram, bandwidth, hop, link))
    return out


def probed_remotes(endpoint: str, network: str | None, bandwidth: float | None, measure: bool = False) -> list[Remote]:
    """A running worker's devices: memory through the RPC protocol (less headroom), the link and each
    device's read bandwidth measured once (cached) unless --rpc-network and --rpc-bandwidth give them."""
    from . import rpc

    worker = rpc.probe(endpoint)
    out = []
    for d in worker.devices:
        memory = max(0, d.free - WORKER_HEADROOM - int(d.total * WORKER_HEADROOM_SHARE))
        hop, link = _network(endpoint, network)
        bw = bandwidth if bandwidth is not None and d.kind == "cpu" else None
        if network is None or bw is None:
            measured = rpc.measure_link(worker.endpoint, d.index, again=measure)
            hop = hop if network is not None else measured.hop_seconds
            bw = bw if bw is not None else measured.bandwidth
        out.append(Remote(worker.endpoint, d.index, d.kind, memory, bw, hop, link))
    return out


def remotes(endpoints: Sequence[str], rpc_ram: Sequence[int] | None, rpc_vram: Sequence[int] | None, rpc_network: str | None,
            rpc_bandwidth: float | None, local_bandwidth: float, measure: bool = False) -> tuple[Remote, ...]:
    """The workers' devices as the planner sees them (see prepare)."""
    rams = _per_endpoint(rpc_ram, len(endpoints), "--rpc-ram")
    vrams = _per_endpoint(rpc_vram, len(endpoints), "--rpc-vram")
    out: list[Remote] = []
    for endpoint, ram, vram in zip(endpoints, rams, vrams, strict=True):
        if ram is not None or vram is not None:
            bw = local_bandwidth if rpc_bandwidth is None else rpc_bandwidth * DECODE_READ_EFFICIENCY
            out += planned_remotes(endpoint, ram, vram, rpc_network, bw)
        else:
            bw = None if rpc_bandwidth is None else rpc_bandwidth * DECODE_READ_EFFICIENCY
            out += probed_remotes(endpoint, rpc_network, bw, measure)
    return tuple(out)


def prepare(path: str | Path, *, vram: int | None = None, ram: int | None = None, ctx: int | None = None,
            kv_type: str = "f16", ram_bandwidth: float | None = None, measure: bool = False, rpc: Sequence[str] = (),
            rpc_ram: Sequence[int] | None = None, rpc_vram: Sequence[int] | None = None, rpc_network: str | None = None,
            rpc_bandwidth: float | None = None, ubatch: int | None = None, auto_context: bool = False) -> Planned:
    """Read and plan. `ctx` None: DEFAULT_CTX, lowered (with a note) to what the model was trained on; with
    `auto_context` (chat, serve) planner.default_context instead: the longest context up to the trained one
    that keeps predicted decode within 10% of its best on this budget. `ubatch`: --ubatch (None: the plan's).
    `rpc`: workers' endpoints (host:port). One given a --rpc-ram/--rpc-vram size (`rpc_ram`/`rpc_vram`: one
    per endpoint, or one for all) is planned without contact: its link from `rpc_network` (default 1gbe),
    its RAM's bandwidth `rpc_bandwidth` (bytes/s, as --ram-bandwidth) or this machine's. The others are
    probed for their memory and their link measured, unless `rpc_network` and `rpc_bandwidth` say."""
    mf = open_model_file(path)
    info = model_info(mf)
    notes = ()
    if ctx is not None and ctx > info.n_ctx_train:
        raise LocalmixError(f"--ctx {ctx} is longer than the model's trained context ({info.n_ctx_train})")
    hw, budget = machine_and_budget(vram, ram, ram_bandwidth, measure=measure)
    if rpc:
        budget = replace(budget, remotes=remotes(rpc, rpc_ram, rpc_vram, rpc_network, rpc_bandwidth, budget.cpu_bandwidth, measure))
    if ctx is None and auto_context:
        ctx = default_context(info, budget, kv_type)  # no note: a later error must stay serve's one line
    elif ctx is None:
        ctx = min(DEFAULT_CTX, info.n_ctx_train)
        if ctx < DEFAULT_CTX:
            notes = (f"context {ctx} tokens, the longest this model was trained on",)
    p = plan(info, budget, ctx, kv_type, ubatch)
    unused = [e for e in dict.fromkeys(rpc) if e not in {r.endpoint for r in p.remotes}]
    if unused:
        notes += (f"nothing placed on {', '.join(unused)}: no layer's experts fit there, or they run quicker here",)
    return Planned(mf, info, hw, budget, p, ctx, kv_type, notes)


def load(p: Planned, *, threads: int | None = None, progress: Callable[[float], None] | None = None,
         verbose: bool = False, repack: bool = True):
    """The model loaded by llama.cpp with the plan (threads None: chosen at each reply from the cores other
    programs leave free, hardware.auto_threads; a number: that many): a LlamaBackend,
    or with experts on workers an IsolatedBackend (llama.cpp aborts the process when a worker fails: the
    model runs in a child)."""
    cls = LlamaBackend
    if p.plan.remote:
        from .backends.isolated import IsolatedBackend

        cls = IsolatedBackend
    backend = cls(p.info, p.plan, ctx=p.ctx, kv_type=p.kv_type, threads=threads, verbose=verbose,
                  repack=repack)
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
