"""The offload planner: a pure function from a model's tensor table, a context length, a KV cache type
and memory budgets to a placement of every tensor on the GPU or the CPU, with predicted speed.

Why it works the way it does: decode reads every active weight once per token, so speed is bytes read
per token over bandwidth. Tensors read for every token (attention, norms, routers, output) go to the
GPU first. Of an expert tensor only n_expert_used / n_expert is read per token, the same share for every
expert tensor, so each byte of experts moved to the GPU saves the same time: the best placement puts as
many expert bytes on the GPU as fit. The planner starts from the best whole-layer split
(llama.cpp's `--n-cpu-moe N`) and then fills what is left tensor by tensor, so it never does worse.

Workers (llama.cpp's RPC backend: other computers' RAM or VRAM) take the experts that would stay in local
RAM, by whole layers: each layer placed there costs one network hop per token (the FFN's input there, its
result back), so a layer goes to a worker when local RAM cannot hold it or when hop + reading it there is
quicker than reading it here. The graph runs one split after another: nothing overlaps, times add up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import DoesNotFit, LocalmixError
from .model_info import ModelInfo, Tensor
from .units import MiB, fmt_bytes

# Bytes per element of the KV cache for each --kv-type (ggml block sizes: q8_0 34 bytes / 32, q4_0 18 / 32).
KV_TYPES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}

RESERVE = 512 * MiB  # VRAM left free: allocator slack, fragmentation, the driver's own growth
# Fixed cost per token and layer (kernel launches, thread synchronisation), fitted to FIELD-NOTES' H100
# anchor (200 tok/s with everything on the GPU) and to CPU decode measured with `localmix bench` on the
# project's 2-core machine (about 0.2 ms a layer there: many small ops, each a thread barrier). Refitted
# from 0.22 ms when tied embeddings began to count the output matrix's 30 MB per token of the upcycled
# SmolLM2: over benchmarks/README's four measurements the error's rms went from 10.5% to 8.7%.
GPU_LAYER_OVERHEAD = 80e-6
CPU_LAYER_OVERHEAD = 200e-6
SPLIT_LAYER_OVERHEAD = 60e-6  # a layer whose experts run on the CPU: activations go to the host and back
# What a layer on a worker costs beyond its link's hop (a one-op graph's round trip, as rpc.measure_link
# times it) and its reads: the worker deserializes the layer's graph (about 70 tensors) and runs its ~10
# ops, and the client's scheduler copies the split's inputs and synchronizes. Fitted with benchmarks/rpc.py
# on loopback workers: 0.36-0.52 ms measured per remote layer (10, 20, 30 layers) against 0.22-0.27 ms
# predicted without it.
REMOTE_LAYER_OVERHEAD = 200e-6

# Micro-batch sizes (llama.cpp's n_ubatch) the planner tries. With experts in RAM and a GPU, llama.cpp copies
# every CPU-resident expert over PCIe once per micro-batch (batches of 32 tokens or more run their matmuls on
# the GPU, and with 8 experts a batch of 32 uses practically all of them): a larger micro-batch divides that
# copy among more tokens, at the cost of a larger compute buffer in VRAM.
UBATCHES = (512, 1024, 2048, 4096)
UBATCH = 512  # without a GPU: the CPU's matmuls gain nothing from larger micro-batches (llama.cpp's default)
# The rule between candidates: decode first, within a tolerance. A larger micro-batch's compute buffer displaces
# experts to RAM, so with experts in RAM every larger micro-batch costs some decode: a strict "never a worse
# decode" would always keep 512 (on paper, 8x7B Q4_K_M on 8-24 GiB and 8x22B on 8-48 GiB). A micro-batch may cost
# at most this share of the best predicted decode (a few tokens in a hundred of a reply); among those within
# it, the quickest prefill of a 4096-token prompt, which it can make 2-3x quicker (8x7B on 12 GiB: 2048, 523
# -> 1121 tok/s for 3.9% of decode; 8x22B on 24 GiB: 4096, 151 -> 442 tok/s for 2.8%).
UBATCH_DECODE_TOLERANCE = 0.05
PROMPT = 512  # tokens of the prompt Plan.prefill_tps is predicted for
# Share of hardware.cpu_flops llama.cpp's CPU prompt processing reaches on quantized weights (dequantizing
# K-quant blocks, the MoE's per-expert gathers, a thread barrier per op). Fitted with
# benchmarks/runtime_tuning.py --parts prefill on the project's 2-core machine, quiet (load average 1.1): the smol
# fixture (Q4_K_M, 8 experts) prefilled 512 tokens at 183 tok/s and 4096 at 136 (`localmix bench --vram 0`),
# against 112 and 88 predicted at 0.5 (the 108 tok/s was measured on a busy machine: 0.5 fitted it).
# Attention's quadratic part (attention_flops) predicts 0.78x the 512-token rate at 4096; measured 0.74x.
CPU_PREFILL_EFFICIENCY = 0.8

# Networks for --rpc-network: (hop_seconds, bytes/s). A hop is one round trip of a layer's activations
# plus the worker's dispatch of its graph split (ggml-rpc's GRAPH_RECOMPUTE: waking its threads, ~50-100
# us). Typical TCP round trips: loopback 20-50 us; 10 GbE 50-100 us (NIC interrupt moderation dominates);
# 1 GbE 150-300 us on one switch. Bandwidth: TCP payload of the link (10 Gb/s and 1 Gb/s less framing,
# about 94%); loopback is a kernel memcpy, a few GB/s. `localmix` measures a real link instead when it can.
NETWORKS = {
    "loopback": (100e-6, 3e9),
    "10gbe": (200e-6, 1.17e9),
    "1gbe": (350e-6, 117e6),
}
# ggml-rpc's bytes per hop beside the activations. llama.cpp reuses a graph on a worker (GRAPH_RECOMPUTE)
# only when it is the device's last one, and each remote layer is another graph: so every hop sends its
# whole serialized graph again (about 70 rpc_tensor records of 296 bytes), plus the inputs' and output's
# commands. Measured by benchmarks/rpc.py through a counting proxy: 24.7 KB per remote layer and token
# on the demo model, 4.6 KB of it activations. The graph of a layer's experts has the same nodes in
# every llama-architecture MoE, so the constant carries over to Mixtral.
HOP_MESSAGE_BYTES = 20_000


@dataclass(frozen=True)
class Remote:
    """One device of one worker, as the planner sees it."""

    endpoint: str  # host:port
    device: int = 0  # index on the worker (a localmix worker lists its GPUs first and its CPU last)
    kind: str = "cpu"  # "cpu" (its RAM) | "gpu"
    memory: int = 0  # bytes the planner may use there
    bandwidth: float = 50e9  # bytes/s decode reads there
    hop_seconds: float = 300e-6  # a layer's activations there and back: round trip + the worker's dispatch
    link_bandwidth: float = 125e6  # bytes/s of the network between

    @property
    def name(self) -> str:
        """llama.cpp's buffer-type name, as `-ot PATTERN=NAME` spells it."""
        return f"RPC{self.device}[{self.endpoint}]"


@dataclass(frozen=True)
class Budget:
    vram: int  # bytes the planner may use on the GPU (0: no GPU)
    ram: int  # bytes it may use in RAM
    gpu_bandwidth: float = 1e12  # bytes/s
    cpu_bandwidth: float = 50e9  # bytes/s llama.cpp's decode reads from RAM
    pcie_bandwidth: float = 24e9
    gpu_flops: float = 50e12
    cpu_flops: float = 0.5e12
    remotes: tuple[Remote, ...] = ()  # workers' devices the planner may put experts on


@dataclass(frozen=True)
class Plan:
    gpu: frozenset[str]  # names of tensors in VRAM; all others stay in RAM
    n_gpu_layers: int  # repeating layers llama.cpp offloads (their dense tensors and KV cache)
    cpu_experts: tuple[str, ...]  # expert tensors of offloaded layers pinned to the CPU (the overrides)
    vram: dict = field(default_factory=dict)  # weights, kv_cache, compute, reserve -> bytes
    ram: dict = field(default_factory=dict)  # weights, kv_cache -> bytes
    decode_tps: float = 0.0
    prefill_tps: float = 0.0
    label: str = "auto"
    remote: dict = field(default_factory=dict)  # Remote.name -> expert tensor names placed there
    remotes: tuple[Remote, ...] = ()  # the Remotes used, in the order of `remote`
    remote_memory: dict = field(default_factory=dict)  # Remote.name -> bytes of weights there
    rpc_devices: tuple[tuple[str, int], ...] = ()  # each endpoint used and its device count (for llama-server's -ts)
    n_batch: int = UBATCH  # llama.cpp's n_batch: tokens per llama_decode call (= n_ubatch: one GPU, no pipelining)
    n_ubatch: int = UBATCH  # llama.cpp's n_ubatch: tokens per graph evaluation (and per copy of the RAM's experts)

    @property
    def vram_total(self) -> int:
        return sum(self.vram.values())

    @property
    def ram_total(self) -> int:
        return sum(self.ram.values())


def kv_cache_bytes(m: ModelInfo, ctx: int, kv_type: str, layers: int | None = None) -> int:
    if kv_type not in KV_TYPES:
        raise LocalmixError(f"unknown KV cache type {kv_type} (choose from {', '.join(KV_TYPES)})")
    layers = m.n_layer if layers is None else layers
    return int(2 * layers * ctx * m.n_head_kv * m.head_dim * KV_TYPES[kv_type])


def compute_bytes(m: ModelInfo, ubatch: int = 512) -> int:
    """llama.cpp's GPU compute buffer for one micro-batch: logits, the widest activations (experts'
    intermediate for the used experts), with flash attention (no n_ctx x n_ctx scores)."""
    widest = max(m.n_embd * 4, m.n_expert_used * m.n_ff * 3 if m.is_moe else m.n_ff * 3)
    return int(4 * ubatch * (m.n_vocab + widest)) + 64 * MiB


def hop_bytes(m: ModelInfo) -> int:
    """Bytes sent per token for one layer whose experts are on a worker, both ways: the FFN's input
    (n_embd f32) and the router's top-k expert ids (int32) and weights (f32) there, the result (n_embd f32)
    back, and ggml-rpc's messages around them."""
    return 4 * m.n_embd + 8 * m.n_expert_used + 4 * m.n_embd + HOP_MESSAGE_BYTES


def predict(m: ModelInfo, gpu: frozenset[str], n_gpu_layers: int, b: Budget, ubatch: int = UBATCH,
            remote: dict | None = None, prompt: int = PROMPT) -> tuple[float, float]:
    """(decode, prefill of a `prompt`-token prompt) tokens per second for a placement (`remote`: Remote.name
    -> tensor names)."""
    gpu_bytes = cpu_bytes = 0.0
    active_params = 0.0
    copied = 0  # bytes of weights in RAM whose matmuls a GPU batch runs there (copied over PCIe)
    where = _remote_of(b, remote)
    t_remote = t_remote_batch = 0.0
    hops: set[tuple[int, str]] = set()
    for t in m.tensors:
        share = m.read_fraction(t)
        r = where.get(t.name)
        if r is not None:
            t_remote += t.nbytes * share / r.bandwidth
            t_remote_batch += 2 * t.n_elements * share / b.cpu_flops  # the worker computes them (a CPU like this one)
            hops.add((t.layer, r.name))
        elif reads_on_gpu(m, t, gpu, n_gpu_layers):
            gpu_bytes += t.nbytes * share
        else:
            cpu_bytes += t.nbytes * share
            if t.role != "embed":  # token_embd is a row lookup: never copied
                copied += t.nbytes
        if r is None:
            active_params += t.n_elements * share
    remotes = {r.name: r for r in where.values()}
    hop = [remotes[name] for _, name in hops]
    t_remote += sum(hop_cost(m, r) for r in hop)
    # A micro-batch sends ubatch tokens' activations in one hop per layer.
    t_remote_batch += sum(r.hop_seconds / ubatch + hop_bytes(m) / r.link_bandwidth for r in hop)
    t_decode = t_remote + (
        (gpu_bytes / b.gpu_bandwidth if gpu_bytes else 0.0)
        + cpu_bytes / b.cpu_bandwidth
        + n_gpu_layers * GPU_LAYER_OVERHEAD
        + (m.n_layer - n_gpu_layers) * CPU_LAYER_OVERHEAD
        + len(split_layers(m, gpu, n_gpu_layers)) * SPLIT_LAYER_OVERHEAD
    )
    t_prefill = prefill_seconds(m, b, 2 * active_params, copied if n_gpu_layers and b.vram else None, ubatch, prompt)
    return 1.0 / t_decode, 1.0 / (t_prefill + t_remote_batch)


def attention_flops(m: ModelInfo, prompt: int) -> float:
    """FLOPs per token of attention's scores and weighted sum (QK^T and PV) over a `prompt`-token prompt:
    a token at position i attends to i earlier ones, i = prompt / 2 on average: the quadratic part."""
    return 2 * m.n_layer * m.n_head * m.head_dim * prompt


def prefill_seconds(m: ModelInfo, b: Budget, flops: float, copied: int | None, ubatch: int, prompt: int) -> float:
    """Seconds per prompt token. `flops`: the weights' FLOPs per token; `copied`: bytes in RAM copied to the
    GPU per micro-batch (None: no GPU, the CPU computes everything at its fitted rate)."""
    flops += attention_flops(m, prompt)
    if copied is None:
        return flops / (b.cpu_flops * CPU_PREFILL_EFFICIENCY)
    ubatch = min(ubatch, prompt)  # a shorter prompt is one smaller micro-batch, and still copies every expert
    return (copied / b.pcie_bandwidth + flops * ubatch / b.gpu_flops) / ubatch


def prefill_tps(m: ModelInfo, p: Plan, b: Budget, prompt: int) -> float:
    """Plan p's predicted prefill speed for a `prompt`-token prompt (bench's prediction)."""
    return predict(m, p.gpu, p.n_gpu_layers, b, p.n_ubatch, _names(p.remote), prompt)[1]


def _names(remote: dict) -> dict:
    return {name: list(names) for name, names in remote.items()}


def _remote_of(b: Budget, remote: dict | None) -> dict[str, Remote]:
    """Tensor name -> the Remote it is placed on."""
    by_name = {r.name: r for r in b.remotes}
    return {n: by_name[name] for name, names in (remote or {}).items() for n in names}


def output_copy(m: ModelInfo, n_gpu_layers: int) -> int:
    """Bytes of VRAM taken by the copy of token_embd that llama.cpp makes as the output matrix of a model
    with tied embeddings when the output layer is offloaded (the input embedding stays in RAM)."""
    if not (m.tied_embeddings and n_gpu_layers == m.n_layer):
        return 0
    return sum(t.nbytes for t in m.tensors if t.role == "embed")


def reads_on_gpu(m: ModelInfo, t: Tensor, gpu: frozenset[str], n_gpu_layers: int) -> bool:
    """Whether decode reads tensor t from VRAM: placed there, or, for tied embeddings, read as the output
    matrix from its copy on the GPU."""
    return t.name in gpu or (t.role == "embed" and n_gpu_layers == m.n_layer and m.tied_embeddings)


def split_layers(m: ModelInfo, gpu: frozenset[str], n_gpu_layers: int) -> set[int]:
    """Offloaded layers whose experts (some or all) run on the CPU or a worker: each token's activations
    go to the host and back there. llama.cpp offloads the last n_gpu_layers layers."""
    first = _layer_offset(m, n_gpu_layers)
    return {t.layer for t in m.tensors if t.role == "expert" and t.name not in gpu and t.layer >= first}


def _layer_offset(m: ModelInfo, n_gpu_layers: int) -> int:
    return m.n_layer - n_gpu_layers  # llama.cpp offloads the last n_gpu_layers layers


def _finish(m, gpu, n_gpu_layers, ctx, kv_type, b, ubatch, label, remote: dict | None = None) -> Plan:
    gpu = frozenset(gpu)
    remote = {name: tuple(names) for name, names in (remote or {}).items() if names}
    elsewhere = {n for names in remote.values() for n in names}
    first = _layer_offset(m, n_gpu_layers)
    cpu_experts = tuple(t.name for t in m.tensors
                        if t.role == "expert" and t.layer >= first and t.name not in gpu and t.name not in elsewhere)
    gpu_weights = sum(t.nbytes for t in m.tensors if t.name in gpu)
    remote_memory = {name: _bytes(m, names) for name, names in remote.items()}
    kv_gpu = kv_cache_bytes(m, ctx, kv_type, n_gpu_layers)
    vram = {"weights": gpu_weights + output_copy(m, n_gpu_layers), "kv_cache": kv_gpu, "compute": compute_bytes(m, ubatch),
            "reserve": RESERVE} if n_gpu_layers else {}
    ram = {"weights": m.weight_bytes - gpu_weights - sum(remote_memory.values()), "kv_cache": kv_cache_bytes(m, ctx, kv_type) - kv_gpu}
    decode, prefill = predict(m, gpu, n_gpu_layers, b, ubatch, remote)
    by_name = {r.name: r for r in b.remotes}
    used = tuple(by_name[name] for name in remote)
    endpoints = dict.fromkeys(r.endpoint for r in used)
    rpc_devices = tuple((e, 1 + max(r.device for r in b.remotes if r.endpoint == e)) for e in endpoints)
    return Plan(gpu, n_gpu_layers, cpu_experts, vram, ram, decode, prefill, label, remote, used, remote_memory, rpc_devices,
                ubatch, ubatch)


def _dense_gpu(m: ModelInfo, n_gpu_layers: int) -> set[str]:
    """Dense tensors llama.cpp puts on the GPU with -ngl n_gpu_layers (the output with all layers)."""
    first = _layer_offset(m, n_gpu_layers)
    return {
        t.name for t in m.tensors
        if t.role == "dense" and ((t.layer >= first) if t.layer >= 0 else n_gpu_layers == m.n_layer)
    }


def _fixed_vram(m, ctx, kv_type, ubatch, n_gpu_layers) -> int:
    """VRAM taken with n_gpu_layers offloaded before any tensor the plan chooses."""
    return kv_cache_bytes(m, ctx, kv_type, n_gpu_layers) + compute_bytes(m, ubatch) + RESERVE + output_copy(m, n_gpu_layers)


def _bytes(m: ModelInfo, names) -> int:
    sizes = {t.name: t.nbytes for t in m.tensors}
    return sum(sizes[n] for n in names)


def _expert_layers(m: ModelInfo) -> dict[int, list[Tensor]]:
    layers: dict[int, list[Tensor]] = {}
    for t in m.tensors:
        if t.role == "expert":
            layers.setdefault(t.layer, []).append(t)
    return layers


def n_cpu_moe(m: ModelInfo, b: Budget, n: int, ctx: int, kv_type: str = "f16", ubatch: int = UBATCH) -> Plan | None:
    """llama.cpp's `-ngl 99 --n-cpu-moe n`: every layer offloaded, the experts of the first n layers on
    the CPU. None if that does not fit the VRAM budget."""
    gpu = _dense_gpu(m, m.n_layer) | {t.name for t in m.tensors if t.role == "expert" and t.layer >= n}
    if _bytes(m, gpu) + _fixed_vram(m, ctx, kv_type, ubatch, m.n_layer) > b.vram:
        return None
    return _finish(m, gpu, m.n_layer, ctx, kv_type, b, ubatch, f"--n-cpu-moe {n}")


def plan(m: ModelInfo, b: Budget, ctx: int, kv_type: str = "f16", ubatch: int | None = None) -> Plan:
    """The placement that puts the most bytes read per token on the GPU within the budgets, with its
    micro-batch (`ubatch` None: chosen by ubatch_candidates' rule; an int: that one, as --ubatch)."""
    if ctx <= 0:
        raise LocalmixError("context length must be positive")
    if ubatch is not None:
        return _checked(m, b, ctx, kv_type, _place(m, b, ctx, kv_type, ubatch))
    plans = [_place(m, b, ctx, kv_type, u) for u in ubatch_candidates(b, ctx)]
    fits = [p for p in plans if p.ram_total <= b.ram] or plans[:1]
    return _checked(m, b, ctx, kv_type, choose_ubatch(m, b, fits))


def ubatch_candidates(b: Budget, ctx: int) -> tuple[int, ...]:
    """Micro-batches worth trying: larger ones only with a GPU (see UBATCHES), none longer than the context."""
    if not b.vram:
        return (UBATCH,)
    return tuple(u for u in UBATCHES if u <= max(ctx, UBATCH))


def choose_ubatch(m: ModelInfo, b: Budget, plans: list[Plan]) -> Plan:
    """Decode first: the plans within UBATCH_DECODE_TOLERANCE of the best predicted decode; of those the
    quickest prefill of a 4096-token prompt (a pasted document), the smaller micro-batch on a tie."""
    best = max(p.decode_tps for p in plans)
    near = [p for p in plans if p.decode_tps >= best * (1 - UBATCH_DECODE_TOLERANCE)]
    return max(near, key=lambda p: (round(prefill_tps(m, p, b, 4096), 6), -p.n_ubatch))


def _checked(m: ModelInfo, b: Budget, ctx: int, kv_type: str, p: Plan) -> Plan:
    if p.ram_total > b.ram:
        raise DoesNotFit(_no_fit_message(m, b, ctx, kv_type, p))
    return p


def _place(m: ModelInfo, b: Budget, ctx: int, kv_type: str, ubatch: int) -> Plan:
    """The placement for one micro-batch size (RAM not checked)."""
    n_gpu_layers, gpu = 0, set()
    if b.vram > 0:
        # Every layer's dense part on the GPU if it fits, else as many of the last layers as fit.
        for n in range(m.n_layer, 0, -1):
            dense = _dense_gpu(m, n)
            if _bytes(m, dense) + _fixed_vram(m, ctx, kv_type, ubatch, n) <= b.vram:
                n_gpu_layers, gpu = n, dense
                break
    if n_gpu_layers == m.n_layer and m.is_moe:
        left = b.vram - _bytes(m, gpu) - _fixed_vram(m, ctx, kv_type, ubatch, n_gpu_layers)
        layers = _expert_layers(m)
        # Whole layers first, from the last one down (as --n-cpu-moe keeps the last layers' experts)...
        for layer in sorted(layers, reverse=True):
            size = sum(t.nbytes for t in layers[layer])
            if size > left:
                break
            gpu |= {t.name for t in layers[layer]}
            left -= size
        # ...then single expert tensors into what is left, largest first.
        rest = sorted((t for t in m.tensors if t.role == "expert" and t.name not in gpu), key=lambda t: (-t.nbytes, -t.layer))
        for t in rest:
            if t.nbytes <= left:
                gpu.add(t.name)
                left -= t.nbytes
    p = _finish(m, gpu, n_gpu_layers, ctx, kv_type, b, ubatch, "auto")
    if b.remotes:
        remote = place_remote(m, b, p)
        p = _finish(m, gpu, n_gpu_layers, ctx, kv_type, b, ubatch, "auto", remote)
    return p


def context_candidates(m: ModelInfo) -> list[int]:
    """Contexts `plan` shows and default_context chooses from: powers of two from 4096 up to the trained
    context, and the trained context itself."""
    out, c = [], 4096
    while c < m.n_ctx_train:
        out.append(c)
        c *= 2
    return [*out, m.n_ctx_train]


def context_speeds(m: ModelInfo, b: Budget, contexts, kv_types) -> list[tuple[int, str, float | None]]:
    """(context, KV type, the plan's predicted decode tok/s, or None when it does not fit) for each pair:
    on a GPU the KV cache takes VRAM that experts would use."""
    out = []
    for ctx in contexts:
        for kv in kv_types:
            try:
                out.append((ctx, kv, plan(m, b, ctx, kv).decode_tps))
            except DoesNotFit:
                out.append((ctx, kv, None))
    return out


CONTEXT_DECODE_TOLERANCE = 0.10  # default_context gives up at most this share of the best predicted decode


def default_context(m: ModelInfo, b: Budget, kv_type: str = "f16") -> int:
    """The largest candidate context whose plan fits and predicts decode within CONTEXT_DECODE_TOLERANCE of
    the best candidate's; the shortest candidate when none fits (plan then says why)."""
    speeds = [(ctx, tps) for ctx, _, tps in context_speeds(m, b, context_candidates(m), (kv_type,)) if tps is not None]
    if not speeds:
        return context_candidates(m)[0]
    best = max(tps for _, tps in speeds)
    return max(ctx for ctx, tps in speeds if tps >= best * (1 - CONTEXT_DECODE_TOLERANCE))


def hop_cost(m: ModelInfo, r: Remote) -> float:
    """Seconds per token of one layer's hop to worker device r and back, its reads aside."""
    return r.hop_seconds + REMOTE_LAYER_OVERHEAD + hop_bytes(m) / r.link_bandwidth


def remote_gain(m: ModelInfo, b: Budget, r: Remote, tensors: list[Tensor]) -> float:
    """Seconds per token saved by reading `tensors` (one layer's) on worker device r instead of local RAM
    (negative: slower there)."""
    read = sum(t.nbytes * m.read_fraction(t) for t in tensors)
    return read / b.cpu_bandwidth - (hop_cost(m, r) + read / r.bandwidth)


def place_remote(m: ModelInfo, b: Budget, local: Plan) -> dict[str, list[str]]:
    """Remote.name -> expert tensors moved there from local RAM, by whole layers: first every layer that
    is quicker on a worker, then, while local RAM is over budget, more layers, each where it costs least."""
    layers: dict[int, list[Tensor]] = {}
    for t in m.tensors:
        if t.role == "expert" and t.name not in local.gpu:
            layers.setdefault(t.layer, []).append(t)
    free = {r.name: r.memory for r in b.remotes}
    out: dict[str, list[str]] = {}

    def best(tensors) -> tuple[float, Remote] | None:
        size = sum(t.nbytes for t in tensors)
        fits = [(remote_gain(m, b, r, tensors), r) for r in b.remotes if free[r.name] >= size]
        return max(fits, key=lambda x: x[0]) if fits else None

    def move(layer: int, r: Remote) -> None:
        tensors = layers.pop(layer)
        free[r.name] -= sum(t.nbytes for t in tensors)
        out.setdefault(r.name, []).extend(t.name for t in tensors)

    for layer in sorted(layers):  # quicker there
        choice = best(layers[layer])
        if choice and choice[0] > 0:
            move(layer, choice[1])
    over = local.ram_total - sum(_bytes(m, names) for names in out.values()) - b.ram
    for layer in sorted(layers):  # too big for RAM: the first layers left, each where it costs least
        if over <= 0:
            break
        choice = best(layers[layer])
        if choice:
            over -= sum(t.nbytes for t in layers[layer])
            move(layer, choice[1])
    return {r.name: out[r.name] for r in b.remotes if r.name in out}  # in the budget's order


def _no_fit_message(m: ModelInfo, b: Budget, ctx: int, kv_type: str, p: Plan) -> str:
    need = p.ram_total - b.ram
    hints = []
    kv_all = kv_cache_bytes(m, ctx, kv_type)
    if kv_all > need:
        per_token = kv_all / ctx
        fits = int((kv_all - need) / per_token) // 256 * 256
        if fits >= 256:
            hints.append(f"--ctx {fits}")
        if kv_type == "f16":
            hints.append("--kv-type q8_0")
    bpw = m.weight_bytes * 8 / max(1, sum(t.n_elements for t in m.tensors))
    target_bpw = bpw * (1 - need / max(1, m.weight_bytes))
    if target_bpw > 2.5:
        hints.append(f"a smaller quantization (about {target_bpw:.1f} bits per weight instead of {bpw:.1f})")
    if b.remotes:
        hints.append("another worker (--rpc)")
    hint = "; try " + " or ".join(hints) if hints else "; it needs a machine with more memory"
    if not b.remotes:
        return (
            f"{m.name} does not fit: it needs {fmt_bytes(p.vram_total + p.ram_total)} "
            f"({fmt_bytes(p.ram_total)} in RAM after {fmt_bytes(p.vram_total)} on the GPU), "
            f"but the budget is {fmt_bytes(b.vram)} VRAM + {fmt_bytes(b.ram)} RAM{hint}"
        )
    there = sum(p.remote_memory.values())
    workers = len({r.endpoint for r in b.remotes})
    return (
        f"{m.name} does not fit: it needs {fmt_bytes(p.vram_total + p.ram_total + there)} "
        f"({fmt_bytes(p.ram_total)} in RAM after {fmt_bytes(p.vram_total)} on the GPU and {fmt_bytes(there)} on workers), "
        f"but the budget is {fmt_bytes(b.vram)} VRAM + {fmt_bytes(b.ram)} RAM + {fmt_bytes(sum(r.memory for r in b.remotes))} "
        f"on {workers} worker{'s' if workers > 1 else ''}{hint}"
    )


def gpu_layers_arg(m: ModelInfo, p: Plan) -> int:
    """llama.cpp's n_gpu_layers: one more than the layer count also offloads the output matrix."""
    return m.n_layer + 1 if p.n_gpu_layers == m.n_layer else p.n_gpu_layers


def llama_args(m: ModelInfo, p: Plan) -> list[str]:
    """The same placement as llama.cpp command-line flags, for llama-server or llama-cli."""
    args = ["-ngl", str(gpu_layers_arg(m, p))]
    if p.remote:
        args += ["--rpc", ",".join(e for e, _ in p.rpc_devices)]
        if p.n_gpu_layers:
            # RPC devices count as GPUs, listed before the local ones (llama_model_load adds them at the
            # front): a zero share each keeps the layers local, and only the overrides go to the workers.
            args += ["-ts", ",".join(["0"] * sum(n for _, n in p.rpc_devices) + ["1"])]
    for pattern in override_patterns(p):
        args += ["-ot", f"{pattern}=CPU"]
    for (endpoint, device), patterns in remote_patterns(p).items():
        args += [x for pattern in patterns for x in ("-ot", f"{pattern}=RPC{device}[{endpoint}]")]
    return args


def _patterns(names) -> list[str]:
    """Regular expressions (matched by llama.cpp with std::regex_search) naming exactly these expert
    tensors: one per expert kind, listing its layers."""
    groups: dict[str, list[int]] = {}
    for name in names:
        _, layer, kind, _ = name.split(".")
        groups.setdefault(kind, []).append(int(layer))
    return [
        rf"^blk\.({'|'.join(str(x) for x in sorted(layers))})\.{kind}\.weight$"
        for kind, layers in sorted(groups.items())
    ]


def override_patterns(p: Plan) -> list[str]:
    """The CPU-pinned experts' patterns."""
    return _patterns(p.cpu_experts)


def remote_patterns(p: Plan) -> dict[tuple[str, int], list[str]]:
    """(endpoint, device on the worker) -> patterns of the experts placed there (Engine.load's rpc_patterns)."""
    by_name = {r.name: r for r in p.remotes}
    return {(by_name[name].endpoint, by_name[name].device): _patterns(names) for name, names in p.remote.items()}
