"""How much each tensor suffers at each candidate type: the table the mixed-precision search chooses from.

For every quantizable tensor (a stacked expert tensor is one unit) and every type of LADDER that llama.cpp
accepts for its row length, the weights of a few evenly strided rows are quantized with llama.cpp's own
kernel (quantize.ggml, with the expert's importance row, as the pass does), dequantized (gguf.quants), and
the error is taken relative to the weights, both weighted by the importance of each column:

    nsr(type) = sum_e p_e sum_rows sum_j w_ej (x - dequant(quant(x)))^2 / sum_e p_e sum_rows sum_j w_ej x^2

p_e: the share of tokens routed to expert e (routing counts), else 1 / n_mat; w_ej: the importance weights
(1 without). The same rows serve every type, so types are compared on the same weights. An option's error
is ROLE_WEIGHTS[role] * nsr: its predicted contribution to the mean KL-divergence, so that errors add up
over tensors (small perturbations of different layers add in the residual stream).

Deterministic: the same inputs give the same floats (rows chosen by stride, sums in a fixed order, each
(unit, type) computed by one thread alone), so a dry run and the real run choose the same types.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Protocol

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from .checkpoint import to_f32
from .errors import QuantizeError, shown
from .ggml import _init as init_kernel
from .ggml import default_threads, quantize_rows
from .recipe import NEEDS_IMATRIX, allows_quantization, block_size, is_quantized, row_bytes

if TYPE_CHECKING:
    from .convert import OutTensor

# Candidate types by bits per weight (256-block types need ne0 % 256 == 0, 32-block ones ne0 % 32 == 0). It
# holds every type quantize.recipe gives a quantized tensor in the mixes localmix offers (fallbacks included),
# so a uniform mix's error comes from the same table. IQ2_XS is left out: it costs twice IQ2_XXS's time to
# measure and sits between it and IQ2_S; IQ1_* are too lossy to win anywhere.
LADDER: tuple[T, ...] = (
    T.IQ2_XXS, T.IQ2_S, T.Q2_K, T.IQ3_XXS, T.IQ3_S, T.Q3_K, T.IQ4_XS, T.IQ4_NL, T.Q4_0, T.Q4_K,
    T.Q4_1, T.Q5_0, T.Q5_K, T.Q5_1, T.Q6_K, T.Q8_0,
)
# The i-quants are offered only with an importance matrix (their advantage is the importance they use), and
# those llama.cpp requires weights for (the kernels give garbage without) only to tensors that have them:
# token_embd, which gets none, may still take IQ4_NL as the IQ mixes give it.
IQ_TYPES = frozenset(t for t in LADDER if t.name.startswith("IQ"))
NEEDS_WEIGHTS = NEEDS_IMATRIX & frozenset(LADDER)
assert NEEDS_WEIGHTS <= IQ_TYPES

# Role -> predicted mean KLD per unit of nsr, fitted once by benchmarks/fit_role_weights.py (2026-11-28) on the
# upcycled SmolLM2 MoE with its --imatrix auto imatrix: for each role, a file with every tensor Q8_0 but that
# role's (Q4_0, or Q2_K/Q4_K for the 1536-wide ffn_down; two types for the roles holding most weights, their
# mean taken), eval's mean KLD against BF16 minus the all-Q8_0 file's, over the role's summed nsr. Checked on
# files it was not fitted to: it predicts uniform Q3_K_M/Q4_K_M/Q5_K_M's measured KLD within -2%/+6%/-11%.
# Dense FFN roles take their expert kin's weight (an expert's nsr is already a per-token average). `output`
# was fitted on the tied token_embd (SmolLM2's output matrix, hence its role there, see role_of). The input
# embedding of an untied model comes from the same fit on the tiny random Mixtral (`--fixture tiny`, Q2_K and
# Q4_K points), the only fixture that has one; its expert weights agree with these (0.20-0.21 against
# 0.18-0.22), its attn_v/attn_output are 3-4x higher. KLD grows slower than linearly in nsr (a Q4_K point's
# weight is about twice a Q2_K point's), so these straight lines are a first fit.
ROLE_WEIGHTS: dict[str, float] = {
    "attn_q": 0.04934,
    "attn_k": 0.08034,
    "attn_v": 0.1667,
    "attn_output": 0.09276,
    "ffn_gate": 0.1766,
    "ffn_up": 0.1969,
    "ffn_down": 0.2223,
    "ffn_gate_exps": 0.1766,
    "ffn_up_exps": 0.1969,
    "ffn_down_exps": 0.2223,
    "output": 8.073,
    "token_embd": 1.51,  # the tiny random Mixtral's input embedding (see above)
}

# Weights sampled per unit. The cost: the upcycled SmolLM2 (211 units) takes 1.7 CPU-seconds without an imatrix
# and 13 with one (all i-quants on the 1536-wide rows), plus about 2.5 once for the i-quants' grid tables;
# Mixtral 8x7B with an imatrix about 70 CPU-seconds (by the kernels' speeds). The sampled nsr stays within a
# few percent of the whole tensor's (at most 6% on the upcycled SmolLM2's tensors checked).
SAMPLE_ELEMENTS = 1 << 16
MIN_ROWS = 32  # and at least this many rows (rows differ more than the weights of one row: rare tokens' embeddings)
_PRIOR_SHAPE = (32, 2048)  # Gaussian rows for the prior; 2048 suits every block size
_NO_IMPORTANCE_NAMES = ("token_embd.weight", "output.weight")  # llama-imatrix (and our calibration) collect none


class Importance(Protocol):
    def weights(self, name: str) -> np.ndarray | None: ...


@dataclass(frozen=True)
class Option:
    type: T
    nbytes: int  # the whole tensor at this type
    error: float  # predicted contribution to mean KLD: ROLE_WEIGHTS[role] * nsr


@dataclass(frozen=True)
class Unit:
    name: str  # GGUF tensor name; a stacked expert tensor is one unit
    role: str  # a ROLE_WEIGHTS key (e.g. "ffn_down_exps")
    layer: int  # -1 for token_embd / output
    n_elements: int
    options: tuple[Option, ...]  # by nbytes ascending; only types llama.cpp accepts for the row length
    measured: bool  # False: the errors are the Gaussian prior (shapes alone, or all-zero sampled rows)

    def option(self, t: T) -> Option:
        for o in self.options:
            if o.type == t:
                return o
        raise KeyError(f"{t.name} is not a candidate for {self.name}")


def role_of(name: str, tied: bool = False) -> str:
    """'blk.3.ffn_down_exps.weight' -> 'ffn_down_exps'; 'token_embd.weight' -> 'token_embd', or 'output' in a
    model without output.weight (`tied`), where llama.cpp uses it as the output matrix too."""
    parts = name.split(".")
    role = parts[2] if name.startswith("blk.") and len(parts) > 2 else parts[0]
    return "output" if tied and role == "token_embd" else role


def layer_of(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blk.") else -1


def candidates(ne0: int, importance: bool, weighted: bool | None = None) -> tuple[T, ...]:
    """The ladder's types llama.cpp accepts for rows of ne0 weights (the kernels write whole blocks); the
    i-quants with an importance matrix (`importance`), those that need weights only if this tensor has them."""
    weighted = importance if weighted is None else weighted

    def offered(t: T) -> bool:
        return (importance or t not in IQ_TYPES) and (weighted or t not in NEEDS_WEIGHTS)

    return tuple(t for t in LADDER if ne0 % block_size(t) == 0 and offered(t))


def is_unit(t: OutTensor) -> bool:
    """A tensor the search chooses a type for: quantizable, stored as floats, and some ladder type fits its
    rows (one that none fits keeps its recipe type, F16: a fixed cost for the search)."""
    return allows_quantization(t.name, len(t.shape)) and not is_quantized(t.stored) and bool(candidates(t.ne0, True))


def _unit(t: OutTensor, types: tuple[T, ...], nsr: dict[T, float], measured: bool, tied: bool) -> Unit:
    n_rows = t.n_elements // t.ne0
    role = role_of(t.name, tied)
    weight = ROLE_WEIGHTS.get(role, 1.0)
    options = sorted((Option(ty, n_rows * row_bytes(ty, t.ne0), float(weight * nsr[ty])) for ty in types),
                     key=lambda o: (o.nbytes, LADDER.index(o.type)))
    return Unit(t.name, role, layer_of(t.name), t.n_elements, tuple(options), measured)


# --- the prior: nsr of Gaussian rows ------------------------------------------------------------------------

@cache
def prior(t: T) -> float:
    """nsr of standard Gaussian rows at type t, with llama.cpp's kernels (unit importance for the i-quants)."""
    x = np.random.default_rng(0).standard_normal(_PRIOR_SHAPE).astype(np.float32)
    w = np.ones(x.shape[1], dtype=np.float32) if t in IQ_TYPES else None
    num, den = _errors(x, t, w)
    return float(np.sum(num) / np.sum(den))


def _tied(tensors: list[OutTensor]) -> bool:
    return not any(t.name == "output.weight" for t in tensors)


def estimate(tensors: list[OutTensor], *, has_importance: bool = False) -> list[Unit]:
    """The units from shapes alone: every option's error is the Gaussian prior (measured=False). For dry runs
    on tensor tables. `has_importance`: offer the i-quants as measure() does with an imatrix that has weights for
    every tensor but token_embd/output (as llama-imatrix and our calibration give)."""
    out, tied = [], _tied(tensors)
    for t in tensors:
        if not is_unit(t):
            continue
        types = candidates(t.ne0, has_importance, has_importance and t.name not in _NO_IMPORTANCE_NAMES)
        if types:
            out.append(_unit(t, types, {ty: prior(ty) for ty in types}, False, tied))
    return out


# --- measured on the weights --------------------------------------------------------------------------------

def _errors(x: np.ndarray, t: T, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per column: sum over rows of the squared error at type t, and of the squared weight (float64)."""
    q = quantize_rows(int(t), x, w).reshape(x.shape[0], -1)
    d = dequantize(q, t).astype(np.float32) - x
    return np.einsum("ij,ij->j", d, d, dtype=np.float64), np.einsum("ij,ij->j", x, x, dtype=np.float64)


def _sample_rows(n_rows: int, k: int) -> np.ndarray:
    """k of n_rows rows, evenly strided, centred in their strides."""
    k = min(k, n_rows)
    return (np.arange(k, dtype=np.int64) * 2 + 1) * n_rows // (2 * k)


def _samples(t: OutTensor, elements: int) -> list[np.ndarray]:
    """Per part (expert): float32 [k, ne0] of evenly strided rows, about `elements` weights over all parts (at
    least MIN_ROWS rows, one per part)."""
    n = len(t.parts)
    per_part = max(1, -(-MIN_ROWS // n), -(-elements // (t.ne0 * n)))
    out = []
    for ref in t.parts:
        raw = ref.file.raw(ref)
        rows = raw.reshape(-1, raw.shape[-1])
        ref.file.sampled(True)
        try:
            x = to_f32(ref, rows[_sample_rows(rows.shape[0], per_part)])
        finally:
            ref.file.sampled(False)
        if not np.isfinite(x).all():  # the pass refuses these too; an error estimate of NaN would choose garbage
            raise QuantizeError(f"tensor {shown(ref.name)} holds NaN or infinite values: the checkpoint is damaged")
        out.append(np.ascontiguousarray(x))
    return out


def _importance_rows(t: OutTensor, importance: Importance | None) -> np.ndarray | None:
    """[n_mat, ne0] as the pass hands the kernels, or None (no weights for this tensor, or of another size,
    which the pass ignores for token_embd and refuses for the others)."""
    w = None if importance is None else importance.weights(t.name)
    if w is None:
        return None
    w = np.asarray(w, dtype=np.float32)
    if w.size != t.n_mat * t.ne0:
        if t.name == "token_embd.weight":
            return None
        raise QuantizeError(f"importance weights for {t.name} have {w.size} values, the tensor needs {t.n_mat * t.ne0}")
    if not np.isfinite(w).all():
        raise QuantizeError(f"importance weights for {t.name} hold NaN or infinite values")
    return np.ascontiguousarray(w.reshape(t.n_mat, t.ne0))


def _expert_shares(t: OutTensor, routing: np.ndarray | None) -> np.ndarray:
    """p_e: how often each expert is chosen (routing counts of the tensor's layer), else equal shares."""
    n = len(t.parts)
    layer = layer_of(t.name)
    if routing is None or n == 1 or not 0 <= layer < routing.shape[0] or routing.shape[1] != n:
        return np.full(n, 1.0 / n)
    counts = np.asarray(routing[layer], dtype=np.float64)
    total = counts.sum()
    return counts / total if total > 0 else np.full(n, 1.0 / n)


def _nsr(xs: list[np.ndarray], t: T, w: np.ndarray | None, p: np.ndarray) -> float | None:
    """The weighted nsr of one unit at type t, or None when the sampled weights are all zero."""
    num = den = 0.0
    for e, x in enumerate(xs):
        we = None if w is None else w[e]
        err, sq = _errors(x, t, we)
        cw = np.ones(x.shape[1]) if we is None else we.astype(np.float64)
        num += p[e] * float(err @ cw)
        den += p[e] * float(sq @ cw)
    return num / den if den > 0 else None


def measure(tensors: list[OutTensor], importance: Importance | None = None, *, routing: np.ndarray | None = None,
            elements: int = SAMPLE_ELEMENTS, threads: int | None = None,
            on_unit: Callable[[int, int], None] | None = None) -> list[Unit]:
    """One Unit per quantizable tensor, in the order given, its errors measured on about `elements` sampled
    weights. `importance`: anything with .weights(name) -> float32 [n_mat, ne0] | None (an Imatrix); without
    it no i-quants are offered, with it those that need weights only for tensors it has weights for.
    `routing`: counts [n_layer, n_expert] to weight experts by. `on_unit(done, total)` after each unit. A unit
    whose sampled rows are all zero (a sparse checkpoint), or that has no weights to read (a tensor table), gets
    the prior."""
    work = [t for t in tensors if is_unit(t)]
    pool = ThreadPoolExecutor(threads or default_threads())
    try:
        jobs = []
        for t in work:
            w = _importance_rows(t, importance)
            types = candidates(t.ne0, importance is not None, w is not None)
            for ty in types:  # the i-quants' grids (seconds for IQ2_S): once, here, not in threads spinning on its lock
                init_kernel(int(ty))
            xs, p = _samples(t, elements), _expert_shares(t, routing)
            live = any(x.any() for x in xs)  # all zero (a sparse checkpoint): the prior, without quantizing zeros
            jobs.append((t, types, [pool.submit(_nsr, xs, ty, w, p) for ty in types] if live else []))
        out, tied = [], _tied(tensors)
        for i, (t, types, futures) in enumerate(jobs):
            nsr = [f.result() for f in futures]
            if not nsr or any(v is None for v in nsr):
                out.append(_unit(t, types, {ty: prior(ty) for ty in types}, False, tied))
            else:
                out.append(_unit(t, types, dict(zip(types, nsr, strict=True)), True, tied))
            if on_unit:
                on_unit(i + 1, len(jobs))
        return out
    finally:
        pool.shutdown(cancel_futures=True)


def total_error(units: list[Unit], types: dict[str, T]) -> float:
    """The summed error of the units at the given types (a uniform mix's estimate: its recipe types)."""
    return sum(u.option(types[u.name]).error for u in units)
