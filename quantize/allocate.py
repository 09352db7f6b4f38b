"""Which type each unit gets: the Lagrangian frontier of the sensitivity table (pure; no I/O).

Minimising the summed error under a total cost is separable: at a Lagrange multiplier lam each unit takes the
option minimising error + lam * cost, which is always a vertex of the lower convex hull of its options in
(cost, error). Walking lam from infinity down to zero, units step from hull vertex to hull vertex in the
order of their steps' error saved per cost. So the frontier is one fixed sequence of steps: every unit starts
at its cheapest option, and the first k steps of the merged sequence minimise error + lam * cost for the lam
of step k, hence have the least error of all assignments (any options, not only the hull's) that cost at most
as much (tests check this against brute force). A larger budget takes a longer prefix, and every step lowers
the error: the choice is monotonic by construction. A budget between two prefixes leaves slack below the next
step; `Frontier.filled` spends it on later steps that fit, which keeps the monotonicity (see there).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass

from gguf import GGMLQuantizationType as T

from .errors import QuantizeError
from .sensitivity import Option, Unit


@dataclass(frozen=True)
class Step:
    unit: int  # index into the units
    option: Option  # the unit's option after the step
    cost: float  # cost added
    saved: float  # error removed (> 0)


def hull(points: list[tuple[float, float, Option]]) -> list[tuple[float, float, Option]]:
    """The lower convex hull of (cost, error, option) from the cheapest point, up to the point of least error:
    the options an error + lam * cost minimiser can take, each strictly better and dearer than the last."""
    best: dict[float, tuple[float, float, Option]] = {}
    for p in points:  # per cost the least error; the first (the ladder's lower type) on a tie
        if p[0] not in best or p[1] < best[p[0]][1]:
            best[p[0]] = p
    out: list[tuple[float, float, Option]] = []
    for p in sorted(best.values(), key=lambda p: p[0]):
        if out and p[1] >= out[-1][1]:
            continue  # dearer and no better
        while len(out) >= 2 and _cross(out[-2], out[-1], p) <= 0:
            out.pop()  # out[-1] lies on or above the segment from out[-2] to p
        out.append(p)
    return out


def _cross(a, b, c) -> float:
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


class Frontier:
    """The Lagrangian frontier of `units` under `cost(unit, option)` (bytes, or seconds per token)."""

    def __init__(self, units: list[Unit], cost: Callable[[Unit, Option], float]):
        self.units = list(units)
        start: list[Option] = []
        ranked: list[tuple[float, int, int, Step]] = []
        for i, u in enumerate(self.units):
            if not u.options:
                raise QuantizeError(f"internal error: {u.name} has no candidate types")
            h = hull([(float(cost(u, o)), o.error, o) for o in u.options])
            start.append(h[0][2])
            for j in range(1, len(h)):
                dc, de = h[j][0] - h[j - 1][0], h[j - 1][1] - h[j][1]
                ranked.append((-de / dc, i, j, Step(i, h[j][2], dc, de)))
        ranked.sort(key=lambda r: r[:3])  # most error saved per cost first; ties by unit, then its own order
        self.start = start
        self.steps = [r[3] for r in ranked]
        self._costs = [sum(float(cost(u, o)) for u, o in zip(self.units, start, strict=True))]
        self._errors = [sum(o.error for o in start)]
        for s in self.steps:
            self._costs.append(self._costs[-1] + s.cost)
            self._errors.append(self._errors[-1] - s.saved)
        self._neg_errors = [-e for e in self._errors]  # non-decreasing, for bisect

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    def _check(self, k: int) -> int:  # -1 (what within/reaching say for "none") must not index from the end
        if not 0 <= k <= self.n_steps:
            raise IndexError(f"step {k} is not in 0..{self.n_steps}")
        return k

    def cost(self, k: int) -> float:
        """Total cost after k steps (non-decreasing in k)."""
        return self._costs[self._check(k)]

    def error(self, k: int) -> float:
        """Total error after k steps (non-increasing in k)."""
        return self._errors[self._check(k)]

    def types(self, k: int) -> dict[str, T]:
        chosen = list(self.start)
        self._check(k)
        for s in self.steps[:k]:
            chosen[s.unit] = s.option
        return {u.name: o.type for u, o in zip(self.units, chosen, strict=True)}

    def filled(self, budget: float) -> dict[str, T]:
        """The prefix within `budget`, then each later step that still fits, in frontier order (a unit's steps
        in their own order): the budget's slack below the next step is spent too. Still monotonic in the budget:
        where a larger budget first takes a step s the smaller cannot, the smaller's remaining budget is below
        s's cost and every later step saves at most s's error per cost, so it saves less than s alone.
        (ValueError when even the cheapest options cost more.)"""
        k = self.within(budget)
        if k < 0:
            raise ValueError(f"budget {budget} below the cheapest options' cost {self.cost(0)}")
        chosen = self.types(k)
        left = budget - self.cost(k)
        taken = [0] * len(self.units)  # steps taken per unit
        for s in self.steps[:k]:
            taken[s.unit] += 1
        seen = list(taken)  # steps met per unit: a step is taken only if all of its unit's earlier ones were
        for s in self.steps[k:]:
            seen[s.unit] += 1
            if seen[s.unit] == taken[s.unit] + 1 and s.cost <= left:
                chosen[self.units[s.unit].name] = s.option.type
                taken[s.unit] += 1
                left -= s.cost
        return chosen

    def within(self, budget: float) -> int:
        """The largest k whose cost is at most `budget`; -1 if even the cheapest options cost more."""
        return bisect_right(self._costs, budget) - 1

    def reaching(self, max_error: float) -> int:
        """The smallest k whose error is at most `max_error`; -1 if no k gets there."""
        k = bisect_left(self._neg_errors, -max_error)
        return k if k <= self.n_steps else -1


def by_bytes(units: list[Unit], budget_bytes: int) -> dict[str, T]:
    """The least-error types whose bytes (of the units alone: the caller subtracts norms, routers and the
    like) stay within `budget_bytes`."""
    f = Frontier(units, lambda u, o: o.nbytes)
    if f.within(budget_bytes) < 0:
        raise QuantizeError(
            f"the smallest types take {_size(f.cost(0))}, more than the {_size(max(budget_bytes, 0))} the target leaves for them"
        )
    return f.filled(budget_bytes)


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
