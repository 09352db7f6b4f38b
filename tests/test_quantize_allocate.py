"""quantize/allocate.py: the Lagrangian frontier of the sensitivity table, on hand-made tables (checked against
brute force) and on the upcycled SmolLM2's measured one."""

from __future__ import annotations

import itertools
import zlib
from bisect import bisect_right
from collections.abc import Callable

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from quantize.allocate import Frontier, by_bytes, hull
from quantize.checkpoint import open_checkpoint, to_f32
from quantize.convert import plan_tensors
from quantize.errors import QuantizeError
from quantize.ggml import quantize_rows
from quantize.imatrix import Entry, Imatrix
from quantize.metadata import read_hparams
from quantize.recipe import block_size, row_bytes
from quantize.sensitivity import Option, Unit, estimate, measure, total_error

LADDER4 = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0)


def unit(name: str, points: list[tuple[int, float]]) -> Unit:
    options = tuple(Option(t, c, e) for t, (c, e) in zip(LADDER4, points, strict=False))
    return Unit(name, "ffn_down", 0, 1, tuple(sorted(options, key=lambda o: o.nbytes)), True)


def random_units(seed: int, n: int = 5) -> list[Unit]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(1, 5))
        costs = np.sort(rng.choice(np.arange(1, 40), size=k, replace=False))
        errors = rng.uniform(0, 10, k)  # not monotonic, not convex: the hull has work to do
        out.append(unit(f"u{i}", [(int(c), float(e)) for c, e in zip(costs, errors, strict=True)]))
    return out


def error_of(units: list[Unit], types: dict[str, T]) -> float:
    return sum(u.option(types[u.name]).error for u in units)


def bytes_of(units: list[Unit], types: dict[str, T]) -> int:
    return sum(u.option(types[u.name]).nbytes for u in units)


def brute_force(units: list[Unit]) -> Callable[[float], float]:
    """The least error of any assignment of at most `budget` bytes, by trying them all."""
    combos = sorted((sum(o.nbytes for o in c), sum(o.error for o in c)) for c in itertools.product(*(u.options for u in units)))
    costs, best = [c for c, _ in combos], list(itertools.accumulate((e for _, e in combos), min))
    return lambda budget: best[bisect_right(costs, budget) - 1] if costs[0] <= budget else float("inf")


def test_hull_keeps_the_lower_convex_decreasing_part():
    pts = [(1, 10.0), (2, 4.0), (3, 3.5), (4, 1.0), (5, 1.0), (6, 0.5), (7, 0.6)]
    got = [(c, e) for c, e, _ in hull([(c, e, None) for c, e in pts])]
    assert got == [(1, 10.0), (2, 4.0), (4, 1.0), (6, 0.5)]  # 3.5 lies above the chord, (5, 1.0) and (7, .6) are no better
    assert [(c, e) for c, e, _ in hull([(2, 1.0, "a"), (2, 0.5, "b"), (1, 3.0, "c")])] == [(1, 3.0), (2, 0.5)]


@pytest.mark.parametrize("seed", range(12))
def test_every_prefix_is_optimal_for_its_cost(seed):
    units = random_units(seed)
    f = Frontier(units, lambda u, o: o.nbytes)
    best_within = brute_force(units)
    assert f.cost(0) == sum(u.options[0].nbytes for u in units)
    for k in range(f.n_steps + 1):
        types = f.types(k)
        assert bytes_of(units, types) == f.cost(k) and error_of(units, types) == pytest.approx(f.error(k), abs=1e-9)
        assert f.error(k) == pytest.approx(best_within(f.cost(k)), abs=1e-9)
        if k:
            assert f.cost(k) > f.cost(k - 1) and f.error(k) < f.error(k - 1)


@pytest.mark.parametrize("seed", range(12))
def test_by_bytes_never_exceeds_and_more_bytes_never_hurt(seed):
    units = random_units(seed)
    f = Frontier(units, lambda u, o: o.nbytes)
    best_within = brute_force(units)
    last = float("inf")
    for budget in range(int(f.cost(0)), int(f.cost(f.n_steps)) + 3):
        types = by_bytes(units, budget)
        got = error_of(units, types)
        assert bytes_of(units, types) <= budget
        assert got <= last + 1e-12  # monotonic, slack filling included
        assert best_within(budget) - 1e-9 <= got <= f.error(f.within(budget)) + 1e-12
        last = got


def test_within_and_reaching():
    units = [unit("a", [(10, 5.0), (20, 1.0), (40, 0.5)]), unit("b", [(5, 2.0), (15, 0.0)])]
    f = Frontier(units, lambda u, o: o.nbytes)
    assert f.n_steps == 3 and [f.cost(k) for k in range(4)] == [15, 25, 35, 55]
    assert [f.error(k) for k in range(4)] == [7.0, 3.0, 1.0, 0.5]
    assert f.types(0) == {"a": T.Q2_K, "b": T.Q2_K} and f.types(3) == {"a": T.Q4_K, "b": T.Q3_K}
    assert (f.within(14), f.within(15), f.within(34.9), f.within(35), f.within(1e9)) == (-1, 0, 1, 2, 3)
    assert (f.reaching(100), f.reaching(7.0), f.reaching(2.0), f.reaching(0.5), f.reaching(0.4)) == (0, 0, 2, 3, -1)
    assert Frontier([], lambda u, o: o.nbytes).within(0) == 0
    for bad in (-1, 4):  # what within/reaching answer for "none" is no step
        for method in (f.cost, f.error, f.types):
            with pytest.raises(IndexError):
                method(bad)


def test_ties_go_by_unit_order():
    units = [unit("b", [(10, 2.0), (20, 1.0)]), unit("a", [(10, 2.0), (20, 1.0)])]
    f = Frontier(units, lambda u, o: o.nbytes)
    assert f.types(1) == {"b": T.Q3_K, "a": T.Q2_K}


def test_a_cost_other_than_bytes():
    """Seconds per token: a unit the plan keeps in VRAM may cost nothing; then it takes its best option."""
    units = [unit("gpu", [(10, 5.0), (20, 1.0), (30, 0.1)]), unit("ram", [(10, 5.0), (20, 1.0), (30, 0.1)])]
    f = Frontier(units, lambda u, o: 0.0 if u.name == "gpu" else o.nbytes * 1e-3)
    assert f.types(0) == {"gpu": T.Q4_K, "ram": T.Q2_K} and f.cost(0) == pytest.approx(0.01)


def test_too_small_a_budget_is_one_line():
    units = [unit("a", [(1 << 20, 1.0), (2 << 20, 0.5)])]
    with pytest.raises(QuantizeError, match="smallest types take 1.0 MiB") as e:
        by_bytes(units, (1 << 20) - 1)
    assert "\n" not in str(e.value)


# --- on the upcycled SmolLM2's real weights -------------------------------------------------------------------

@pytest.fixture(scope="module")
def real(upcycled):
    """Layers 0 to 3 and token_embd, measured with (synthetic, far from uniform) importance weights, so the
    i-quants are candidates too: (units, tensors by name)."""
    ck = open_checkpoint(upcycled)
    hp = read_hparams(ck.config)
    ts = [t for t in plan_tensors(ck, hp, "Q4_K_M", has_imatrix=True) if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < 4]
    entries = {}
    for t in ts:
        if len(t.shape) >= 2 and t.name != "token_embd.weight" and "ffn_gate_inp" not in t.name:
            sums = np.random.default_rng(zlib.crc32(t.name.encode())).lognormal(0.0, 1.0, (t.n_mat, t.ne0)).astype(np.float32)
            entries[t.name] = Entry(sums, np.ones(t.n_mat, dtype=np.int64))
    units = measure(ts, Imatrix(entries, source="synthetic"), threads=2)
    yield units, {t.name: t for t in ts}, ck, hp
    ck.close()


def test_real_budgets_kept_monotonic_and_every_type_quantizes(real):
    units, tensors, _, _ = real
    f = Frontier(units, lambda u, o: o.nbytes)
    assert f.n_steps > 3 * len(units) // 2
    lo, hi = int(f.cost(0)), int(f.cost(f.n_steps))
    last, seen = float("inf"), set()
    for budget in np.linspace(lo, hi + 1000, 41).astype(int):
        types = by_bytes(units, int(budget))
        assert bytes_of(units, types) <= budget
        err = total_error(units, types)
        assert err <= last
        last = err
        seen |= {(n, t) for n, t in types.items()}
    assert last == pytest.approx(f.error(f.n_steps)) and len({t for _, t in seen}) >= 5
    for name, ty in sorted(seen):
        t = tensors[name]
        assert t.ne0 % block_size(ty) == 0
        raw = t.parts[0].file.raw(t.parts[0])
        rows = np.ascontiguousarray(to_f32(t.parts[0], raw.reshape(-1, raw.shape[-1])[:2]))
        im = np.ones(t.ne0, dtype=np.float32)  # as the pass gives the kernel a row of weights
        assert quantize_rows(int(ty), rows, im).nbytes == 2 * row_bytes(ty, t.ne0)


def test_real_at_the_size_of_uniform_q4_k_m_the_error_is_lower(real):
    units, _, ck, hp = real
    reference = {t.name: t.type for t in plan_tensors(ck, hp, "Q4_K_M", has_imatrix=True) if t.name in {u.name for u in units}}
    size = bytes_of(units, reference)
    types = by_bytes(units, size)
    assert bytes_of(units, types) <= size
    assert total_error(units, types) < 0.8 * total_error(units, reference)  # the search beats the hand mix by far
    est = estimate([t for t in real[1].values()], has_importance=True)
    assert [u.name for u in est] == [u.name for u in units]  # the prior's units are the same, ready for a dry run
