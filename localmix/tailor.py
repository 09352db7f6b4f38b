"""Types chosen for the machine a file will run on (`quantize --for`): pure, from a tensor table, the
sensitivity table of its tensors (quantize.sensitivity) and a budget, to a type per tensor and its plan.

The search: quantize.allocate's Lagrangian frontier with each option priced in seconds per token under
the planner's own cost model, for the placement the planner gives the current types:

    price(unit, option) = nbytes x seconds per token one byte of the unit costs where it lives

A byte in RAM costs read_fraction / cpu_bandwidth (an expert tensor is read n_expert_used / n_expert per
token, a dense one whole). A byte in VRAM costs read_fraction / gpu_bandwidth plus what it displaces: when
the card is full, the planner pushes the marginal expert bytes (or, with only some layers offloaded, dense
ones) to RAM, so every byte there costs read_fraction(displaced) x (1 / cpu - 1 / gpu) more. Under a full
card an expert byte therefore costs the same wherever it lands, and an attention byte on the GPU about as
much as an expert byte: the planner refills the card either way.

The frontier's prefix length k is then chosen with the real planner (placement, per-layer costs, what
fits), never with the linear prices alone: with a target speed, the largest k whose plan fits and
predicts at least that speed (bisection; decode speed falls as k grows); without one, the smallest k whose
error is at most uniform Q4_K_M's. The chosen types change the placement (a tensor that shrinks may move
to the GPU), so the prices are taken again from the new plan and the frontier rebuilt, until the types
repeat (a few rounds); the best round wins: the least error at the target speed, or the fastest file at
the reference's quality.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gguf import GGMLQuantizationType as T

from quantize.allocate import Frontier
from quantize.sensitivity import Option, Unit, total_error

from .errors import DoesNotFit, LocalmixError
from .model_info import ModelInfo, Tensor, layer_of, role
from .planner import UBATCH, Budget, Plan, plan, reads_on_gpu
from .units import GiB

MAX_ROUNDS = 6  # placement and types settle in two or three; an oscillating pair stops here
UNBOUNDED_RAM = 1 << 62  # placements for pricing: the GPU side alone decides them, RAM is checked on the result


@dataclass(frozen=True)
class Tailored:
    types: dict[str, T]  # a type for every unit
    info: ModelInfo  # the table with the chosen types' sizes
    plan: Plan  # its plan on the budget: plan.decode_tps is the predicted decode speed
    error: float  # predicted mean-KLD estimate (sum of the chosen options' errors)
    reference_error: float  # the same estimate for the reference (uniform Q4_K_M)


def info_from_plan(hp, tensors, name: str) -> ModelInfo:
    """The ModelInfo of a file not written yet: hyper-parameters (quantize.metadata.HParams) and the
    converter's planned tensors (quantize.convert.OutTensor, each with its type)."""
    return ModelInfo(
        path="", arch=hp.arch, n_layer=hp.n_layer, n_embd=hp.n_embd, n_head=hp.n_head, n_head_kv=hp.n_head_kv,
        head_dim=hp.head_dim, n_ff=hp.n_ff, n_expert=hp.n_expert, n_expert_used=hp.n_expert_used,
        n_ctx_train=hp.n_ctx, n_vocab=hp.vocab_size,
        tensors=tuple(Tensor(t.name, t.nbytes, layer_of(t.name), role(t.name), t.type.name, t.n_elements) for t in tensors),
        name=name,
    )


def table_info(base: ModelInfo, sizes: dict[str, int], types: dict[str, T] | None = None) -> ModelInfo:
    """The same model with the tensors named in `sizes` resized (and retyped, where `types` names them)."""
    types = types or {}
    return replace(base, tensors=tuple(
        replace(t, nbytes=sizes[t.name], type=types[t.name].name if t.name in types else t.type) if t.name in sizes else t
        for t in base.tensors
    ))


def sized(base: ModelInfo, units: list[Unit], types: dict[str, T]) -> ModelInfo:
    """`base` with every unit at its type in `types`."""
    return table_info(base, {u.name: u.option(types[u.name]).nbytes for u in units}, types)


def byte_prices(m: ModelInfo, p: Plan, b: Budget) -> dict[str, float]:
    """Seconds per token one more byte of each tensor costs under placement p (see the module's docstring)."""
    gap = 1 / b.cpu_bandwidth - 1 / b.gpu_bandwidth
    if p.n_gpu_layers and p.n_gpu_layers < m.n_layer:
        displaced = gap  # the card cannot hold every layer's dense part: a byte there pushes dense bytes out
    else:
        spilled = next((t for t in m.tensors if t.role == "expert" and t.name not in p.gpu), None)
        displaced = m.read_fraction(spilled) * gap if spilled is not None and p.n_gpu_layers else 0.0
    # Every byte costs a little, so that among options of the same time the smaller file wins (an input
    # embedding, of which decode reads one row, is otherwise free at any type).
    floor = 1e-3 / b.cpu_bandwidth
    out = {}
    for t in m.tensors:
        if reads_on_gpu(m, t, p.gpu, p.n_gpu_layers):
            price = m.read_fraction(t) / b.gpu_bandwidth + displaced
        else:
            price = m.read_fraction(t) / b.cpu_bandwidth
        out[t.name] = max(price, floor)
    return out


def tailor(base: ModelInfo, units: list[Unit], reference: dict[str, T], budget: Budget, ctx: int, kv_type: str = "f16",
           tps: float | None = None, *, reference_name: str = "uniform Q4_K_M") -> Tailored:
    """The types for `units` that run best on `budget`: with `tps`, the least error whose plan predicts at
    least tps tokens/s of decode; without, the fastest file whose error is at most the reference's
    (`reference`: a type for every unit, e.g. uniform Q4_K_M's recipe types). LocalmixError (one line) when
    no file reaches tps, or none as good as the reference fits."""
    reference_error = total_error(units, reference)

    def planned(types: dict[str, T], b: Budget = budget) -> tuple[ModelInfo, Plan | None]:
        info = sized(base, units, types)
        try:
            # Decode is the target, so the file is chosen under the decode-best micro-batch (the smallest): at run
            # time the planner may trade up to UBATCH_DECODE_TOLERANCE of it for prefill. With the runtime's
            # choice, more RAM (room for a larger micro-batch) could mean a worse file.
            return info, plan(info, b, ctx, kv_type, ubatch=UBATCH)
        except DoesNotFit:
            return info, None

    smallest = {u.name: u.options[0].type for u in units}
    if tps is not None:
        info, fastest = planned(smallest)
        if fastest is None:
            why = _no_fit(info, budget, ctx, kv_type)
            raise LocalmixError(f"no file fits this budget: even with the smallest type for every tensor {why}")
        if fastest.decode_tps < tps:
            raise LocalmixError(f"{tps:g} tok/s is out of reach on this budget: the fastest file (the smallest type for every tensor, "
                                f"{info.weight_bytes / GiB:.1f} GiB) is predicted at {fastest.decode_tps:.1f} tok/s")

    loose = replace(budget, ram=UNBOUNDED_RAM)
    info, placement = planned(reference, loose)
    best: tuple[dict[str, T], ModelInfo, Plan, float] | None = None
    seen: list[dict[str, T]] = []
    for _ in range(MAX_ROUNDS):
        prices = byte_prices(info, placement, budget)
        frontier = Frontier(units, lambda u, o, prices=prices: _price(u, o, prices))
        k = _by_speed(frontier, tps, planned) if tps is not None else frontier.reaching(reference_error)
        types = frontier.types(k)
        if types in seen:
            break
        seen.append(types)
        info, p = planned(types)
        if p is not None:
            got = (types, info, p, total_error(units, types))
            best = got if best is None or _better(got, best, tps is not None) else best
        info, placement = planned(types, loose)
    # The reference itself is a candidate: the frontier is optimal only at its hull points, and the planner's
    # per-layer costs are not in the prices, so on some budgets uniform is as fast at its own error.
    info, p = planned(reference)
    if p is not None and (tps is None or p.decode_tps >= tps):
        got = (dict(reference), info, p, reference_error)
        best = got if best is None or _better(got, best, tps is not None) else best
    if best is None:  # without tps: no round's file at the reference's quality fit
        raise LocalmixError(f"no file as good as {reference_name} fits this budget: {_no_fit(info, budget, ctx, kv_type)}")
    types, info, p, error = best
    return Tailored(types, info, p, error, reference_error)


def _price(u: Unit, o: Option, prices: dict[str, float]) -> float:
    return o.nbytes * prices[u.name]


def _by_speed(frontier: Frontier, tps: float, planned) -> int:
    """The largest k whose plan fits and predicts at least tps (k = 0 does: the caller checked). Bisection:
    more steps mean more bytes, which fit less and read slower."""
    def ok(k: int) -> bool:
        _, p = planned(frontier.types(k))
        return p is not None and p.decode_tps >= tps

    lo, hi = 0, frontier.n_steps + 1  # ok(lo); hi is past the end, or fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _better(a, b, by_error: bool) -> bool:
    """Is round result a better than b: less error (then faster) at a target speed, else faster (then less error)."""
    ka = (a[3], -a[2].decode_tps) if by_error else (-a[2].decode_tps, a[3])
    kb = (b[3], -b[2].decode_tps) if by_error else (-b[2].decode_tps, b[3])
    return ka < kb


def _no_fit(info: ModelInfo, budget: Budget, ctx: int, kv_type: str) -> str:
    """The planner's own words for why info does not fit ('it needs 80.1 GiB (...), but the budget is ...')."""
    try:
        plan(info, budget, ctx, kv_type, ubatch=UBATCH)
    except DoesNotFit as e:
        return str(e).partition(" does not fit: ")[2]
    return "it fits"  # not reached: called for a table that did not fit
