"""Pick one option per layer under a budget (multiple-choice knapsack), and reach a budget by
bisection on one parameter.

Each layer offers options ``(cost, error, payload)``; :func:`allocate` picks exactly one per layer
so that the summed cost is within ``budget`` and the summed error is (near) minimal, or, given
``max_error``, the least summed cost whose summed error stays within it. Two solvers:

- ``greedy``: from every layer's least-error option, walk down the layers' lower convex hulls of
  error vs cost, always taking the step that adds the least error per unit of cost saved.
  Optimal on convex curves up to the last step; blind to options above a hull.
- ``knapsack``: dynamic programming over a cost axis: exact in units of the costs' gcd when that
  takes at most ``steps`` units, else ``steps`` units with costs rounded to the safe side (the
  pick always fits). The axis spans the slack above the cheapest pick or the saving below the
  dearest one, whichever is shorter.
- ``best`` (default): both, the knapsack's pick kept only where strictly better.

Under a cost budget each pick then spends leftover slack and swaps one option up in one layer
for one down in another while that lowers the error (exact costs, a few ms).

Measured (2-core CPU; gap: summed error over the least any solver found at that budget, max over
targets 0.3/0.5/0.7/0.9 of MACs or params, resp. 4.5-20 average bits; time: median):

=====================================  ===============  ================  ===============
input                                  greedy           knapsack          best
=====================================  ===============  ================  ===============
rank candidates resnet18 (21 layers)   11.4 %, 30 ms    0.03 %, 280 ms    0.03 %, 250 ms
rank candidates ResNet-56 (56 layers)  2.6 %, 31 ms     0.04 %, 88 ms     0.04 %, 93 ms
mixed precision 8/4/float, 56 layers   4.7 %, 2 ms      0 (exact), 60 ms  0, 64 ms
synthetic convex, 40 x 64 options      0.005 %, 8 ms    0.10 %, 60 ms     0.005 %, 65 ms
synthetic non-convex, 40 x 64          0.55 %, 6 ms     0.08 %, 64 ms     0.02 %, 70 ms
=====================================  ===============  ================  ===============

The greedy walk loses most where a budget is met by few coarse steps (params at 0.9: 11 %); the
knapsack loses only its rounding. ``best`` is never worse than the greedy walk, and its time is
small next to building the candidates (9 s of SVDs for resnet18).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from compiler.errors import OptionError

METHODS = ("greedy", "knapsack", "best")
DEFAULT_METHOD = "best"
#: the knapsack's axis, in units: at least MIN_STEPS, more while options x units <= WORK
MIN_STEPS, MAX_STEPS, WORK = 4096, 1 << 17, 1 << 24
#: options x units per vectorised knapsack block (bounds the memory of one layer's update)
BLOCK = 1 << 21


@dataclass(frozen=True)
class Option:
    """One way to treat a layer: what it costs, the error it adds, and what the caller needs back
    (a rank choice, a bit width, None for "leave it alone")."""

    cost: float
    error: float
    payload: Any = None


@dataclass(frozen=True)
class Allocation:
    """The pick: per layer the index of its option (in the list the caller gave) and payload, the
    summed cost and error, and which solver produced it."""

    picks: tuple[int, ...]
    payloads: tuple[Any, ...]
    cost: float
    error: float
    method: str


class BudgetError(OptionError):
    """No pick meets the budget; ``least`` is the smallest summed cost (or, for ``max_error``, the
    smallest summed error) any pick reaches, for the caller's own message."""

    def __init__(self, message: str, *, least: float, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.least = least


@dataclass
class _Front:
    """A layer's Pareto front: costs ascending, errors strictly descending, and the positions
    of those options in the caller's list."""

    cost: np.ndarray
    error: np.ndarray
    index: np.ndarray
    options: list[Option]


def _front(layer: int, options: Sequence) -> _Front:
    opts = [o if isinstance(o, Option) else Option(*o) for o in options]
    if not opts:
        raise OptionError(
            f"allocate: layer {layer} offers no option",
            hint="give every layer at least one (cost, error) option",
        )
    cost = np.array([o.cost for o in opts], np.float64)
    error = np.array([o.error for o in opts], np.float64)
    if not (np.isfinite(cost).all() and np.isfinite(error).all()):
        raise OptionError(
            f"allocate: layer {layer} has an option with a non-finite cost or error",
            hint="give finite (cost, error) numbers",
        )
    # an option survives only if every cheaper one (or an equal one listed first) is worse by
    # more than rounding: nothing else is worth choosing
    order = np.lexsort((np.arange(len(opts)), error, cost))
    before = np.minimum.accumulate(np.concatenate([[np.inf], error[order][:-1]]))
    keep = order[error[order] < before - 1e-15 * max(1.0, float(np.abs(error).max()))]
    return _Front(cost[keep], error[keep], keep, opts)


def allocate(
    layers: Sequence[Sequence[Option | tuple]],
    budget: float | None = None,
    *,
    max_error: float | None = None,
    method: str = DEFAULT_METHOD,
    steps: int | None = None,
) -> Allocation:
    """Pick exactly one option per layer within a cost budget, or within an error budget.

    Args:
        layers: per layer, its options: :class:`Option` or ``(cost, error[, payload])`` tuples.
            Include the "leave it alone" option (its full cost, error 0) where there is one.
        budget: the most the summed cost may be; the summed error is minimised.
        max_error: instead of ``budget``, the most the summed error may be; the summed cost is
            minimised.
        method: "greedy", "knapsack" or "best" (both, the better kept; see the module docstring).
        steps: units of the knapsack's cost axis when exact costs would need more; None: from
            4,096 up to 131,072 as the option count allows (about 0.3 s of work).

    Returns:
        The :class:`Allocation`; among equally good picks, the cheaper (then the greedy one).

    Raises:
        BudgetError: the budget is below the cheapest pick (or ``max_error`` below the least
            error), with ``least`` set to what can be reached.
        OptionError: bad arguments.
    """
    if (budget is None) == (max_error is None):
        raise OptionError("allocate needs exactly one of budget= or max_error=")
    if method not in METHODS:
        raise OptionError(f"allocate: unknown method {method!r}", hint=f"use one of {METHODS}")
    if steps is not None and (int(steps) != steps or steps < 1):
        raise OptionError(f"allocate: steps={steps} is not a positive integer")
    fronts = [_front(li, options) for li, options in enumerate(layers)]
    if steps is None:
        steps = min(MAX_STEPS, max(MIN_STEPS, WORK // max(1, sum(len(f.cost) for f in fronts))))
    if budget is not None:
        _check_reachable(sum(f.cost[0] for f in fronts), budget, "cost", "budget")
    else:
        _check_reachable(sum(f.error[-1] for f in fronts), max_error, "error", "max_error")
    found = {}
    if method in ("greedy", "best"):
        found["greedy"] = _greedy(fronts, budget, max_error)
    if method in ("knapsack", "best"):
        found["knapsack"] = _knapsack(fronts, budget, max_error, int(steps))
    if budget is not None:
        found = {name: _improve(fronts, picks, budget) for name, picks in found.items()}
    results = [_result(fronts, picks, name) for name, picks in found.items()]
    best = results[0]
    for r in results[1:]:  # strictly better only: ties keep the first (greedy) pick
        if _better(r, best, budget is not None):
            best = r
    return best


def _better(a: Allocation, b: Allocation, by_error: bool) -> bool:
    """Whether ``a`` beats ``b``: less error (under a cost budget) or less cost (under an error
    budget) beyond rounding, else equal there and less of the other."""
    (pa, sa), (pb, sb) = [(x.error, x.cost) if by_error else (x.cost, x.error) for x in (a, b)]
    tol = 1e-12 * max(1.0, abs(pb))
    return pa < pb - tol or (abs(pa - pb) <= tol and sa < sb - 1e-12 * max(1.0, abs(sb)))


def _check_reachable(least: float, limit: float, what: str, name: str) -> None:
    if least > limit + 1e-12 * max(1.0, abs(limit)):
        raise BudgetError(
            f"allocate: {name}={limit:g} is out of reach: the least summed {what} any pick "
            f"reaches is {least:g}",
            least=float(least),
            hint=f"raise {name} to at least {least:g}, or offer layers options with less {what}",
        )


def _result(fronts: list[_Front], picks: list[int], method: str) -> Allocation:
    index = tuple(int(f.index[k]) for f, k in zip(fronts, picks))
    return Allocation(
        picks=index,
        payloads=tuple(f.options[i].payload for f, i in zip(fronts, index)),
        cost=float(sum(f.cost[k] for f, k in zip(fronts, picks))),
        error=float(sum(f.error[k] for f, k in zip(fronts, picks))),
        method=method,
    )


# -- greedy on the lower convex hulls ------------------------------------------------------------


def lower_hull(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the lower convex hull of ``(cost, error)`` points sorted by descending cost
    with ascending error: the steps a greedy allocator takes, each with a rising slope."""
    hull: list[int] = []
    for k, (cost, err) in enumerate(points):
        while len(hull) >= 2:
            (c1, e1), (c2, e2) = points[hull[-2]], points[hull[-1]]
            # drop the middle point when it lies above the segment from hull[-2] to k (points on
            # it stay: smaller steps overshoot the budget less)
            if (e2 - e1) * (c1 - cost) > (err - e1) * (c1 - c2) + 1e-15:
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


def _greedy(fronts: list[_Front], budget: float | None, max_error: float | None) -> list[int]:
    """Front positions per layer, by the hull walk."""
    paths = []  # per layer, front positions from the least error down to the cheapest
    for f in fronts:
        down = list(range(len(f.cost) - 1, -1, -1))
        paths.append([down[k] for k in lower_hull([(f.cost[i], f.error[i]) for i in down])])
    step = [0] * len(fronts)
    cost = float(sum(f.cost[-1] for f in fronts))
    error = float(sum(f.error[-1] for f in fronts))

    def slope(li: int) -> tuple[float, float, float]:
        f, path, k = fronts[li], paths[li], step[li]
        saved = f.cost[path[k]] - f.cost[path[k + 1]]
        added = f.error[path[k + 1]] - f.error[path[k]]
        return added / max(saved, 1e-30), saved, added

    heap = [(slope(li)[0], li) for li in range(len(fronts)) if len(paths[li]) > 1]
    heapq.heapify(heap)
    while heap and (budget is None or cost > budget):
        _, li = heapq.heappop(heap)
        _, saved, added = slope(li)
        if max_error is not None and error + added > max_error:
            continue  # this layer's later steps are steeper still: leave it here
        cost, error = cost - saved, error + added
        step[li] += 1
        if step[li] + 1 < len(paths[li]):
            heapq.heappush(heap, (slope(li)[0], li))
    return [path[k] for path, k in zip(paths, step)]


def _improve(fronts: list[_Front], picks: list[int], budget: float) -> list[int]:
    """Spend the slack a hull step or a rounded knapsack unit left, then swap while it helps:
    one layer one option up its front, another one down, within the budget, less error."""
    picks = _fill(fronts, picks, budget)
    n = len(fronts)
    up = np.zeros((2, n))  # cost added, error removed by moving up one option
    down = np.zeros((2, n))  # cost saved, error added by moving down one option

    def moves(li: int) -> None:
        c, e, k = fronts[li].cost, fronts[li].error, picks[li]
        up[:, li] = (c[k + 1] - c[k], e[k] - e[k + 1]) if k + 1 < len(c) else (np.inf, 0.0)
        down[:, li] = (c[k] - c[k - 1], e[k - 1] - e[k]) if k else (0.0, np.inf)

    for li in range(n):
        moves(li)
    slack = budget - float(sum(f.cost[k] for f, k in zip(fronts, picks)))
    tol = 1e-12 * max(1.0, float(sum(f.error[k] for f, k in zip(fronts, picks))))
    for _ in range(10 * n):
        gain = up[1][:, None] - down[1][None, :]
        gain[up[0][:, None] - down[0][None, :] > slack] = -np.inf
        np.fill_diagonal(gain, -np.inf)
        i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if not gain[i, j] > tol:
            break
        slack -= up[0][i] - down[0][j]
        picks[i] += 1
        picks[j] -= 1
        moves(i)
        moves(j)
    return _fill(fronts, picks, budget)


def _fill(fronts: list[_Front], picks: list[int], budget: float) -> list[int]:
    """Spend what the budget has left on the layers with the most error first: each moves to its
    best option that still fits."""
    picks = list(picks)
    slack = budget - float(sum(f.cost[k] for f, k in zip(fronts, picks)))
    if slack <= 0:
        return picks
    for li in sorted(range(len(fronts)), key=lambda i: -fronts[i].error[picks[i]]):
        f = fronts[li]
        now = f.cost[picks[li]]
        k = int(np.searchsorted(f.cost, now + slack, side="right")) - 1  # errors fall with cost
        if k > picks[li]:
            slack -= f.cost[k] - now
            picks[li] = k
    return picks


# -- knapsack by dynamic programming -------------------------------------------------------------


def _units(rel: list[np.ndarray], span: float, steps: int) -> tuple[float, bool]:
    """The cost unit of the axis and whether it is exact (the gcd of integer costs)."""
    flat = np.concatenate(rel)
    if np.all(flat == np.rint(flat)) and flat.max(initial=0) < 2**62:
        g = int(np.gcd.reduce(flat.astype(np.int64)))
        if g > 0 and span / g <= steps:
            return float(g), True
    return (span / steps if span > 0 else 1.0), False


def _knapsack(
    fronts: list[_Front], budget: float | None, max_error: float | None, steps: int
) -> list[int]:
    """Front positions per layer minimising the error within ``budget``, or the cost within
    ``max_error``.

    The axis covers the shorter of two ranges, for the finest units: the cost above every
    layer's cheapest option (``pack``: spend at most the slack), or the cost below every layer's
    dearest one (``cover``: save at least what the budget asks, savings past that count as that).
    """
    base = float(sum(f.cost[0] for f in fronts))
    top = float(sum(f.cost[-1] for f in fronts))
    cover = budget is not None and top - budget < budget - base
    if cover:
        rel, span = [f.cost[-1] - f.cost for f in fronts], top - budget
    else:
        rel = [f.cost - f.cost[0] for f in fronts]
        span = budget - base if budget is not None else top - base
    span = max(span, 0.0)  # a budget met only within rounding: the axis is one point
    unit, exact = _units(rel, span, steps)
    size = int(math.floor(span / unit + 1e-9))
    if cover:  # what must be saved rounds up, each saving (when inexact) down
        size = int(math.ceil(span / unit))
    # inexact units err on the safe side, so a pick that fits the axis fits the budget
    units = [
        np.rint(r / unit) if exact else (np.floor if cover else np.ceil)(r / unit) for r in rel
    ]
    if budget is None:  # the whole axis, however the costs rounded
        size = int(sum(u[-1] for u in units))
    units = [np.minimum(u, size + 1).astype(np.int64) for u in units]  # past the axis: all alike
    table, arg = _dp(units, [f.error for f in fronts], size, cover)
    if cover:
        end = size
    elif budget is not None:
        end = int(np.flatnonzero(table <= table[size])[0])  # the least cost at the least error
    else:
        tol = 1e-12 * max(1.0, abs(max_error))  # reachable within it: checked by allocate
        end = int(np.flatnonzero(table <= max_error + tol)[0])
    picks = []
    for li in range(len(fronts) - 1, -1, -1):
        k = int(arg[li][end])
        picks.append(k)
        end = max(end - int(units[li][k]), 0)
    return picks[::-1]


def _dp(units: list[np.ndarray], errors: list[np.ndarray], size: int, cover: bool):
    """``table[b]``: the least summed error of a pick costing at most (``cover``: saving at least)
    ``b`` units; ``arg[l][b]`` the front position layer ``l`` takes in it."""
    table = np.zeros(size + 1)
    if cover:
        table[1:] = np.inf  # no layer yet: nothing saved
    widest = max(len(u) for u in units)
    arg = np.zeros((len(units), size + 1), np.int8 if widest < 128 else np.int32)
    axis = np.arange(size + 1)
    for li, (u, e) in enumerate(zip(units, errors)):
        fits = np.arange(len(u)) if cover else np.flatnonzero(u <= size)
        best = np.full(size + 1, np.inf)
        block = max(1, BLOCK // (size + 1))
        for start in range(0, len(fits), block):
            ks = fits[start : start + block]
            at = axis[None, :] - u[ks][:, None]  # table[b - u_k] + e_k for every option k
            cand = table[np.maximum(at, 0)] + e[ks][:, None]
            if not cover:  # a pick may not cost more than b; saving more than b is fine
                cand[at < 0] = np.inf
            pos = np.argmin(cand, axis=0)  # the first of equal options (cheapest when packing)
            low = cand[pos, axis]
            better = low < best
            best[better] = low[better]
            arg[li][better] = ks[pos[better]]
        table = best
    return table, arg


# -- one parameter ---------------------------------------------------------------------------------


def bisect_budget(
    cost_at: Callable[[float], float],
    budget: float,
    lo: float = 0.0,
    hi: float = 1.0,
    *,
    steps: int = 14,
) -> float:
    """The smallest ``x`` in ``[lo, hi]`` (to ``(hi - lo) / 2**steps``) with ``cost_at(x) <=
    budget``, for a cost that does not grow with ``x`` (a pruning ratio, a threshold).

    For a search over one parameter that defines the algorithm (one ratio for every group, one
    threshold across groups), where per-layer options do not apply.

    Args:
        cost_at: the cost at ``x``, non-increasing in ``x``.
        budget: the most the cost may be.
        lo, hi: the interval; ``hi`` must meet the budget.
        steps: bisection steps (``cost_at`` is called ``steps + 1`` times).

    Returns:
        The last ``x`` found within the budget (``hi`` itself when no smaller one is).

    Raises:
        BudgetError: ``cost_at(hi)`` exceeds the budget; ``least`` holds that cost.
    """
    reached = cost_at(hi)
    if reached > budget:
        raise BudgetError(
            f"bisect_budget: budget {budget:g} is out of reach: the least cost, at {hi:g}, is "
            f"{reached:g}",
            least=float(reached),
            hint=f"raise the budget to at least {reached:g}",
        )
    for _ in range(steps):
        mid = (lo + hi) / 2
        if cost_at(mid) <= budget:
            hi = mid
        else:
            lo = mid
    return hi
