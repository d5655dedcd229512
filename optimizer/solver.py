"""The exact multi-DNN scaling solver.

Problem: pick one choice per (model, block) to maximize
``sum_m w_m * (base_m - sum_b drop[m,b]) - penalty * switch_bytes`` under a shared latency
budget, per-model latency deadlines, a memory budget and a switching budget. It is a
multiple-choice knapsack with several constraints (NP-hard). The solver is a depth-first
branch and bound, exact, and fast on tables shaped like real profiles:

1. **Compile** each (model, block) into a group of items: value ``v = -w*drop - penalty*switch``
   and a coefficient per active constraint (total latency, the model's deadline, memory,
   switch bytes). A constraint whose smallest achievable total exceeds its budget makes
   the problem infeasible at once.
2. **Lagrangian bound.** For multipliers ``lam >= 0``, ``sum_g max_d (v - lam.a) + lam.B``
   bounds every feasible selection. Coordinate descent, each step an exact 1-D
   minimization over the breakpoints of all groups (vectorized), with an extrapolating line
   search after each sweep, gives the LP bound or close to it (for one constraint, exactly).
   The bound decomposes over groups, so in the search it is O(1) per node from suffix sums
   of the reduced values ``r = v - lam.a``.
3. **Dominance.** An item is dropped when at least ``top_k`` other items of its group cost no
   more in every active constraint and are better (by a margin, or equal with a smaller
   choice index): no top-k selection uses it. After the first incumbents, **reduced-cost
   fixing** drops every item whose loss of reduced value exceeds the gap between the bound
   and the incumbent; groups left with one item are fixed.
4. **Search**, groups with a wide reduced-value gap first (the tree stays one path until the
   contested groups), items by reduced value, so the first child that cannot beat the k-th
   best ends the loop; feasibility prunes with suffix minima per constraint. Only when that
   search does not finish within a small node budget are **exact node bounds** built for
   the (at most three) binding constraints: each keeps its constraint exact and prices the
   others at their multipliers, as the exact integer optimum of the remaining groups (a
   Pareto front of their combinations, cut by the gap, built bottom-up while it stays small).
5. **Deterministic ties.** Values within ``eps`` (1e-11 of the objective's scale: float
   noise) are ties. A last search in plain (model, block, choice index) order returns the
   lexicographically smallest selection within ``eps`` of the optimum, so the answer does
   not depend on search internals.

Worst case: exponential (NP-hard). The search counts nodes and past `node_limit` hands the
problem to the independent MILP (`optimizer.milp`, SciPy/HiGHS, zero gap), which is exact
too; `Solution.method` says which answered.

Constraints hold to a relative tolerance of 1e-9 (`budget_limit`).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from optimizer.problem import Problem, ProblemError

__all__ = [
    "DEFAULT_NODE_LIMIT",
    "REL_TOL",
    "Solution",
    "budget_limit",
    "evaluate",
    "solve",
]

REL_TOL = 1e-9
DEFAULT_NODE_LIMIT = 200_000
_EPS_REL = 1e-11  # ties: values closer than this times the objective's scale are float noise
_MAX_DEPTH = 800  # the recursive search stays well inside Python's recursion limit
_SWEEPS = 6  # coordinate descent on the multipliers: any multipliers give a valid bound
_JOINTLY_INFEASIBLE = "no selection meets all budgets and deadlines together"
_FRONT_CAP = 512  # the fronts of an exact bound stop growing (upwards) past this many points
# Node budgets of the searches with the O(1) bound alone (plus a few per free group) before
# the exact bounds, which cost about as much to build as that many nodes, are built.
_QUICK_NODES = 600
_QUICK_TIE_NODES = 100


def budget_limit(budget: float) -> float:
    """The largest total that still counts as within `budget` (relative tolerance 1e-9)."""
    return budget + REL_TOL * abs(budget)


@dataclass(frozen=True)
class Solution:
    """A selection and what it costs, or why there is none.

    `min_latency_ms` and `min_memory_bytes` are the smallest totals achievable (each alone,
    ignoring every other budget), so an infeasible answer says how far off the budget is.
    `alternatives` are the next-best distinct feasible selections, best first.
    """

    feasible: bool
    objective: float | None
    selection: dict[str, list[str]]
    latency_ms: float | None
    memory_bytes: float | None
    switch_bytes: float | None
    per_model: dict[str, dict[str, float]]
    min_latency_ms: float
    min_memory_bytes: float
    alternatives: list[Solution] = field(default_factory=list)
    reason: str = ""
    method: str = ""
    nodes: int = 0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (alternatives included)."""
        return {
            "feasible": self.feasible,
            "objective": self.objective,
            "selection": {k: list(v) for k, v in self.selection.items()},
            "latency_ms": self.latency_ms,
            "memory_bytes": self.memory_bytes,
            "switch_bytes": self.switch_bytes,
            "per_model": {k: dict(v) for k, v in self.per_model.items()},
            "min_latency_ms": self.min_latency_ms,
            "min_memory_bytes": self.min_memory_bytes,
            "alternatives": [a.as_dict() for a in self.alternatives],
            "reason": self.reason,
            "method": self.method,
            "nodes": self.nodes,
        }


# ----------------------------------------------------------------------------------------
# Evaluating a selection: the one canonical computation of objective and constraints, used
# for every reported number (and by the tests and the MILP as ground truth).


def _minima(problem: Problem) -> tuple[float, float]:
    lat = sum(min(c.latency_ms for c in b.choices) for m in problem.models for b in m.blocks)
    mem = sum(min(c.memory_bytes for c in b.choices) for m in problem.models for b in m.blocks)
    return lat, mem


def _selection_indices(problem: Problem, selection: Mapping[str, Sequence[str]]) -> list[list[int]]:
    if not isinstance(selection, Mapping):
        raise ProblemError("selection", "must map each model name to a list of choice ids")
    for name in selection:
        if all(m.name != name for m in problem.models):
            raise ProblemError(f"selection.{name}", f"unknown model {name!r}")
    indices: list[list[int]] = []
    for model in problem.models:
        if model.name not in selection:
            raise ProblemError("selection", f"missing model {model.name!r}")
        ids = list(selection[model.name])
        if len(ids) != len(model.blocks):
            raise ProblemError(
                f"selection.{model.name}",
                f"has {len(ids)} choice ids but the model has {len(model.blocks)} blocks",
            )
        row = []
        for b, (block, choice_id) in enumerate(zip(model.blocks, ids)):
            try:
                row.append(block.index_of(choice_id))
            except KeyError:
                raise ProblemError(
                    f"selection.{model.name}[{b}]", f"unknown choice id {choice_id!r} for block {block.name!r}"
                ) from None
        indices.append(row)
    return indices


def _evaluate_indices(
    problem: Problem, indices: Sequence[Sequence[int]], minima: tuple[float, float]
) -> Solution:
    budgets = problem.budgets
    current = problem.current or {}
    objective = 0.0
    total_lat = total_mem = total_switch = 0.0
    per_model: dict[str, dict[str, float]] = {}
    selection: dict[str, list[str]] = {}
    violations: list[str] = []
    for model, row in zip(problem.models, indices):
        running = current.get(model.name)
        accuracy = model.base_accuracy
        lat = mem = switch = 0.0
        for b, (block, d) in enumerate(zip(model.blocks, row)):
            choice = block.choices[d]
            accuracy -= choice.accuracy_drop
            lat += choice.latency_ms
            mem += choice.memory_bytes
            if running is not None and running[b] != choice.id:
                switch += choice.load_bytes
        objective += model.weight * accuracy
        total_lat += lat
        total_mem += mem
        total_switch += switch
        selection[model.name] = [block.choices[d].id for block, d in zip(model.blocks, row)]
        per_model[model.name] = {
            "latency_ms": lat,
            "memory_bytes": mem,
            "accuracy": accuracy,
            "switch_bytes": switch,
        }
        if model.latency_deadline_ms is not None and lat > budget_limit(model.latency_deadline_ms):
            violations.append(f"latency of {model.name} {lat:g} ms > deadline {model.latency_deadline_ms:g} ms")
    objective -= problem.switch_penalty_per_byte * total_switch
    if budgets.latency_ms is not None and total_lat > budget_limit(budgets.latency_ms):
        violations.append(f"total latency {total_lat:g} ms > budget {budgets.latency_ms:g} ms")
    if budgets.memory_bytes is not None and total_mem > budget_limit(budgets.memory_bytes):
        violations.append(f"memory {total_mem:g} B > budget {budgets.memory_bytes:g} B")
    if budgets.switch_bytes is not None and total_switch > budget_limit(budgets.switch_bytes):
        violations.append(f"switch bytes {total_switch:g} > budget {budgets.switch_bytes:g}")
    return Solution(
        feasible=not violations,
        objective=objective,
        selection=selection,
        latency_ms=total_lat,
        memory_bytes=total_mem,
        switch_bytes=total_switch,
        per_model=per_model,
        min_latency_ms=minima[0],
        min_memory_bytes=minima[1],
        reason="; ".join(violations),
        method="evaluate",
    )


def evaluate(problem: Problem, selection: Mapping[str, Sequence[str]]) -> Solution:
    """Objective, costs and feasibility of a given selection (model name -> choice ids).

    `feasible` is False when a budget or deadline is exceeded; `reason` lists which.
    """
    return _evaluate_indices(problem, _selection_indices(problem, selection), _minima(problem))


# ----------------------------------------------------------------------------------------
# Compilation: groups of items with values and per-constraint coefficients.


@dataclass
class _Group:
    """One (model, block): item d is choice d; `a[d]` is aligned with `dims`."""

    dims: tuple[int, ...]  # the constraints this group's items appear in
    v: list[float]  # value: -w*drop - penalty*switch
    a: list[tuple[float, ...]]


@dataclass
class _Compiled:
    constant: float  # sum of w*base
    names: list[str]  # constraint names, for messages
    budgets: list[float]  # as given
    limits: list[float]  # budget_limit(budget), trimmed for summation error
    groups: list[_Group]  # natural (model, block) order
    shape: list[int]  # blocks per model
    # The same as dense arrays for the vectorized steps; padding has value -inf.
    V: np.ndarray  # (groups, max choices)
    A: np.ndarray  # (constraints, groups, max choices)
    valid: np.ndarray  # (groups, max choices) bool


def _compile(problem: Problem) -> _Compiled:
    budgets = problem.budgets
    current = problem.current or {}
    names: list[str] = []
    limits: list[float] = []
    raw: list[float] = []

    def add(name: str, budget: float) -> int:
        names.append(name)
        raw.append(budget)
        # Totals are summed in another order here than in `evaluate`; trimming the limit
        # by far more than that summation error keeps both verdicts identical.
        limits.append(budget_limit(budget) - 1e-12 * abs(budget))
        return len(names) - 1

    j_lat = add("latency budget", budgets.latency_ms) if budgets.latency_ms is not None else None
    j_deadline = {
        m: add(f"latency deadline of {model.name}", model.latency_deadline_ms)
        for m, model in enumerate(problem.models)
        if model.latency_deadline_ms is not None
    }
    j_mem = add("memory budget", budgets.memory_bytes) if budgets.memory_bytes is not None else None
    j_sw = add("switch budget", budgets.switch_bytes) if current and budgets.switch_bytes is not None else None
    penalty = problem.switch_penalty_per_byte

    groups: list[_Group] = []
    constant = 0.0
    for m, model in enumerate(problem.models):
        constant += model.weight * model.base_accuracy
        running = current.get(model.name)
        kinds = [
            (j, kind)
            for j, kind in ((j_lat, 0), (j_deadline.get(m), 0), (j_mem, 1), (j_sw, 2))
            if j is not None
        ]
        dims = tuple(j for j, _ in kinds)
        w = model.weight
        for b, block in enumerate(model.blocks):
            values, coefs = [], []
            for choice in block.choices:
                switch = choice.load_bytes if running is not None and running[b] != choice.id else 0.0
                cost = (choice.latency_ms, choice.memory_bytes, switch)
                values.append(-w * choice.accuracy_drop - penalty * switch)
                coefs.append(tuple(cost[kind] for _, kind in kinds))
            groups.append(_Group(dims, values, coefs))

    # Dense arrays built from plain lists in one conversion each (per-group NumPy calls
    # would cost more than the lists).
    width = max(len(g.v) for g in groups)
    V = np.array([g.v + [-math.inf] * (width - len(g.v)) for g in groups])
    dense = [[[0.0] * width for _ in groups] for _ in names]
    for gi, g in enumerate(groups):
        for p, j in enumerate(g.dims):
            row = dense[j][gi]
            for d, a in enumerate(g.a):
                row[d] = a[p]
    A = np.array(dense).reshape(len(names), len(groups), width)
    valid = V > -math.inf
    return _Compiled(constant, names, raw, limits, groups, [len(m.blocks) for m in problem.models], V, A, valid)


def _dim_minimum_violations(comp: _Compiled) -> list[str]:
    """Constraints that no selection meets even alone (sum of per-group minima)."""
    mins = np.where(comp.valid[None], comp.A, np.inf).min(axis=2).sum(axis=1)
    unit = {"latency": "ms", "memory": "B", "switch": "B"}
    out = []
    for j, name in enumerate(comp.names):
        if mins[j] > comp.limits[j]:
            u = unit[name.split()[0]]
            out.append(f"{name} {comp.budgets[j]:g} {u} is below the smallest achievable {mins[j]:g} {u}")
    return out


# ----------------------------------------------------------------------------------------
# Lagrangian multipliers and dominance (vectorized over all groups).


_Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]


def _pairs(Ad: np.ndarray, valid: np.ndarray) -> _Pairs:
    """Item pairs (flat indices d, e in one group, and Ad[d] - Ad[e] > 0) whose swap can be
    a breakpoint of a line minimization along Ad; fixed per coordinate, so computed once."""
    dA = Ad[:, :, None] - Ad[:, None, :]
    ok = (dA > 0) & valid[:, :, None] & valid[:, None, :]
    g, d, e = np.nonzero(ok)
    width = Ad.shape[1]
    return g * width + d, g * width + e, dA[ok]


def _line_min(Rp: np.ndarray, Ad: np.ndarray, pairs: _Pairs, limit: float, t_max: float = math.inf) -> float:
    """The exact minimizer over t in [0, t_max] of ``sum_g max_d (Rp - t*Ad) + t*limit``.

    This is the Lagrangian dual along one direction (a coordinate: Ad = a_j, limit = B_j).
    It is convex and piecewise linear in t; its slope is `limit` minus the total Ad of each
    group's best item, and it changes only where two items of a group swap places: at
    t = (Rp[d] - Rp[e]) / (Ad[d] - Ad[e]) for a pair with both differences positive.
    """
    top = Rp.max(axis=1, keepdims=True)
    if np.where(Rp == top, Ad, np.inf).min(axis=1).sum() <= limit:
        return 0.0
    first, second, dA = pairs
    flat = Rp.ravel()
    dR = flat[first] - flat[second]
    ok = dR > 0
    cand = np.sort(dR[ok] / dA[ok])  # (np.unique would do, but its first call imports ~20 ms of numpy)
    if not len(cand):
        return 0.0
    cand = cand[np.append(True, cand[1:] != cand[:-1])]
    rows = np.arange(Rp.shape[0])
    # Between consecutive breakpoints the slope is constant: probe the midpoints.
    probes = np.append((cand[:-1] + cand[1:]) / 2, cand[-1] * 2 + 1)
    if len(probes) * Rp.size <= 50_000:  # small: all probes in one vectorized step
        best = np.argmax(Rp[None] - probes[:, None, None] * Ad[None], axis=2)
        totals = Ad[rows[None, :], best].sum(axis=1)
        fits = np.flatnonzero(totals <= limit)
        return min(float(cand[fits[0] if len(fits) else -1]), t_max)

    def over(x: float) -> bool:
        return Ad[rows, np.argmax(Rp - x * Ad, axis=1)].sum() > limit

    lo, hi = 0, len(cand) - 1
    if over(probes[hi]):
        return min(float(cand[hi]), t_max)
    while lo < hi:
        mid = (lo + hi) // 2
        if over(probes[mid]):
            lo = mid + 1
        else:
            hi = mid
    return min(float(cand[lo]), t_max)


def _combine(weights: np.ndarray, A: np.ndarray) -> np.ndarray:
    """sum_j weights[j] * A[j]: written out, since BLAS-backed tensordot costs far more
    in thread start-up than these few small arrays take to add."""
    out = np.zeros(A.shape[1:])
    for w, a in zip(weights.tolist(), A):
        if w:
            out += w * a
    return out


def _coordinate_optimal(R: np.ndarray, A: np.ndarray, valid: np.ndarray, lam: np.ndarray, limits: np.ndarray) -> bool:
    """Whether no single multiplier can lower the dual: for each j the dual's slope is >= 0
    going up and (unless lam_j = 0) <= 0 going down. Far cheaper than another sweep."""
    top = R.max(axis=1, keepdims=True)
    ties = valid & (R >= top - 1e-12 * (np.abs(top) + 1.0))
    least = np.where(ties[None], A, np.inf).min(axis=2).sum(axis=1)  # a_j of the ties, cheapest
    most = np.where(ties[None], A, -np.inf).max(axis=2).sum(axis=1)
    slack = 1e-12 * (np.abs(limits) + 1.0)
    return bool(np.all(least <= limits + slack) and np.all((lam == 0) | (most >= limits - slack)))


def _multipliers(comp: _Compiled) -> tuple[list[float], list[list[float]], float]:
    """Accelerated coordinate descent on the Lagrangian dual: (lam, reduced values, bound).

    Correlated constraints (latency and memory both fall with sparsity) make plain
    coordinate descent zigzag along a valley; after each sweep an exact line search along
    the sweep's own step follows the valley instead. It stops when no coordinate can
    improve (or after `_SWEEPS`; any multipliers give a valid bound, better ones a tighter).
    """
    n_dims = len(comp.names)
    lam = np.zeros(n_dims)
    limits = np.asarray(comp.limits)
    A = comp.A
    R = comp.V.copy()
    pairs = [_pairs(A[j], comp.valid) for j in range(n_dims)]
    for _ in range(_SWEEPS):
        start = lam.copy()
        for j in range(n_dims):
            Rp = R + lam[j] * A[j]
            lam[j] = _line_min(Rp, A[j], pairs[j], comp.limits[j])
            R = Rp - lam[j] * A[j]
        if n_dims < 2:
            break  # one exact line minimization is the optimum
        step = lam - start
        if step.any():
            Ad = _combine(step, A)
            shrink = step < 0
            t_max = float((lam[shrink] / -step[shrink]).min()) if shrink.any() else math.inf
            t = _line_min(R, Ad, _pairs(Ad, comp.valid), float((step * limits).sum()), t_max)
            lam = np.maximum(lam + t * step, 0.0)
            R = comp.V - _combine(lam, A)
        if not step.any() or _coordinate_optimal(R, A, comp.valid, lam, limits):
            break
    R = comp.V - _combine(lam, A)
    bound = float(R.max(axis=1).sum() + (lam * limits).sum())
    r = [row[: len(g.v)] for row, g in zip(R.tolist(), comp.groups)]
    return lam.tolist(), r, bound


def _dominance(comp: _Compiled, k: int, margin: float) -> list[list[int]]:
    """Per group, the items fewer than k others dominate (see the module docstring)."""
    V, A, valid = comp.V, comp.A, comp.valid
    width = V.shape[1]
    earlier = np.arange(width)[:, None] < np.arange(width)[None, :]  # [q, i]: q before i
    with np.errstate(invalid="ignore"):
        better = (V[:, :, None] >= V[:, None, :] + margin) | ((V[:, :, None] >= V[:, None, :]) & earlier)
    cheaper = np.all(A[:, :, :, None] <= A[:, :, None, :], axis=0)
    dominators = (better & cheaper & valid[:, :, None]).sum(axis=1)
    keep = valid & (dominators < k)
    return [np.flatnonzero(row).tolist() for row in keep]


# ----------------------------------------------------------------------------------------
# Exact node bounds.


@dataclass
class _ExactBound:
    """A node bound that keeps one constraint P exact and prices the others at fixed
    multipliers: the best w = v - sum_{j != P} lam_j a_j that the remaining groups reach
    within P's remaining capacity, exactly (not the LP: integer choices, so it also sees
    the capacity a node can no longer fill).

    It is a Pareto front of (a_P, w) over all combinations of the groups from each depth
    on, built bottom-up and cut to combinations whose reduced-value loss fits in the gap
    between the root bound and the incumbent (no other can matter). Fronts stop growing
    upwards past `_FRONT_CAP` points; above `front_from` this bound does not prune.
    """

    dim: int
    lam: float
    offset: float  # sum over j != P of lam_j * limit_j
    limit: float
    front_from: int
    front_a: list[list[float]]  # per depth >= front_from: a_P ascending
    front_w: list[list[float]]  # the best w within that a_P (strictly increasing)

    def value(self, pos: int, rs: float, used_p: float) -> float:
        """Upper bound on every completion of a node at depth `pos`."""
        if pos < self.front_from:
            return math.inf
        k = bisect.bisect_right(self.front_a[pos - self.front_from], self.limit - used_p)
        if not k:
            return -math.inf
        return rs + self.lam * used_p + self.offset + self.front_w[pos - self.front_from][k - 1]


def _exact_bound(
    comp: _Compiled,
    order: list[int],
    items: list[list[int]],
    r: list[list[float]],
    lam: list[float],
    dim: int,
    used0: float,
    suffix_r: list[float],
    gap: float,
) -> _ExactBound:
    n = len(order)
    lam_p = lam[dim]
    limit = comp.limits[dim]
    pts: list[tuple[list[float], list[float]]] = []
    for gi in order:
        g = comp.groups[gi]
        p = g.dims.index(dim) if dim in g.dims else None
        cs = [g.a[i][p] if p is not None else 0.0 for i in items[gi]]
        pts.append((cs, [r[gi][i] + lam_p * c for i, c in zip(items[gi], cs)]))
    prefix_min = [used0] * (n + 1)  # the least a_P the groups above each depth can use
    for pos, (cs, _) in enumerate(pts):
        prefix_min[pos + 1] = prefix_min[pos] + min(cs)

    front_a: list[list[float]] = [[0.0]]
    front_w: list[list[float]] = [[0.0]]
    fa, fw = np.zeros(1), np.zeros(1)
    front_from = n
    for pos in range(n - 1, -1, -1):
        cs, ws = pts[pos]
        a = (fa[:, None] + np.asarray(cs)[None, :]).ravel()
        w = (fw[:, None] + np.asarray(ws)[None, :]).ravel()
        keep = a <= limit - prefix_min[pos]
        if math.isfinite(gap):
            keep &= w - lam_p * a >= suffix_r[pos] - gap
        a, w = a[keep], w[keep]
        if len(a) > _FRONT_CAP:
            break
        if len(a):
            rank = np.lexsort((-w, a))
            a, w = a[rank], w[rank]
            pareto = np.ones(len(w), dtype=bool)
            pareto[1:] = w[1:] > np.maximum.accumulate(w)[:-1]
            a, w = a[pareto], w[pareto]
        fa, fw = a, w
        front_a.append(fa.tolist())
        front_w.append(fw.tolist())
        front_from = pos
    front_a.reverse()
    front_w.reverse()
    offset = sum(lam[j] * comp.limits[j] for j in range(len(lam)) if j != dim)
    return _ExactBound(dim, lam_p, offset, limit, front_from, front_a, front_w)


# ----------------------------------------------------------------------------------------
# The search.


class _NodeLimit(Exception):
    pass


_Item = tuple[float, float, int, tuple[tuple[int, float, float], ...]]  # (r, v, choice, checks)


@dataclass
class _Tree:
    """One search order over the free groups, with everything the search needs per depth."""

    groups: list[int]  # group per depth
    items: list[list[_Item]]
    suffix_r: list[float]  # sum of the best reduced value of the groups from this depth on
    exact: list[_ExactBound]


def _tree(
    comp: _Compiled,
    order: list[int],
    items: list[list[int]],
    r: list[list[float]],
    lam: list[float],
    used0: list[float],
    exact_dims: Sequence[int] = (),
    gap: float = math.inf,
) -> _Tree:
    """Items per depth (in the order of `items`) with feasibility checks
    `(dim, a, limit - suffix minimum of dim)`, and exact bounds for `exact_dims`."""
    n_dims = len(comp.names)
    n = len(order)
    suffix_min = [[0.0] * n_dims for _ in range(n + 1)]
    for pos in range(n - 1, -1, -1):
        row = list(suffix_min[pos + 1])
        g = comp.groups[order[pos]]
        for p, j in enumerate(g.dims):
            row[j] += min(g.a[i][p] for i in items[order[pos]])
        suffix_min[pos] = row
    levels: list[list[_Item]] = []
    suffix_r = [0.0] * (n + 1)
    for pos in range(n - 1, -1, -1):
        gi = order[pos]
        g, rg = comp.groups[gi], r[gi]
        rest = suffix_min[pos + 1]
        level = []
        for i in items[gi]:
            checks = tuple((j, g.a[i][p], comp.limits[j] - rest[j]) for p, j in enumerate(g.dims) if g.a[i][p])
            level.append((rg[i], g.v[i], i, checks))
        levels.append(level)
        suffix_r[pos] = suffix_r[pos + 1] + max(it[0] for it in level)
    levels.reverse()
    exact = [_exact_bound(comp, order, items, r, lam, j, used0[j], suffix_r, gap) for j in exact_dims]
    return _Tree(list(order), levels, suffix_r, exact)


@dataclass
class _Context:
    """What the searches share: the fixed groups' contribution and the tolerance."""

    lam_b: float  # sum of lam_j * limit_j
    used0: list[float]  # fixed groups' coefficients per constraint
    v0: float  # fixed groups' value
    r0: float  # fixed groups' reduced value
    chosen0: list[int]  # choice per group; the fixed groups' filled in
    eps: float


def _search_best(
    tree: _Tree,
    ctx: _Context,
    k: int,
    floor: float,
    node_limit: int,
    seeds: Sequence[tuple[float, tuple[int, ...]]] = (),
) -> tuple[list[tuple[float, tuple[int, ...]]], int, bool]:
    """Depth-first branch and bound keeping the k best leaves (value, choice per group).

    A node is explored only if its bounds beat the k-th best by more than eps, so ties are
    not enumerated. `floor` is a value no feasible selection falls below: until k leaves
    are known it prunes nodes that cannot be feasible at all. Returns the leaves, the node
    count and whether the search finished within `node_limit`.
    """
    n = len(tree.items)
    levels, suffix_r, lam_b, eps, exact = tree.items, tree.suffix_r, ctx.lam_b, ctx.eps, tree.exact
    best: list[tuple[float, tuple[int, ...]]] = sorted(seeds, key=lambda s: -s[0])[:k]
    keys = [-s[0] for s in best]
    seen = {s[1] for s in best}
    thr = best[-1][0] if len(best) == k else floor - 2 * eps
    used = list(ctx.used0)
    chosen = list(ctx.chosen0)
    where = tree.groups
    nodes = 0

    def rec(pos: int, rs: float, vs: float) -> None:
        nonlocal thr, nodes
        nodes += 1
        if nodes > node_limit:
            raise _NodeLimit
        if pos == n:
            if len(best) < k or vs > thr + eps:
                key = tuple(chosen)
                if key in seen:
                    return
                seen.add(key)
                at = bisect.bisect_right(keys, -vs)
                keys.insert(at, -vs)
                best.insert(at, (vs, key))
                if len(best) > k:
                    keys.pop()
                    seen.discard(best.pop()[1])
                if len(best) == k:
                    thr = best[-1][0]
            return
        for e in exact:
            if e.value(pos, rs, used[e.dim]) <= thr + eps:
                return
        base = rs + suffix_r[pos + 1] + lam_b
        g = where[pos]
        for r, v, idx, checks in levels[pos]:
            if base + r <= thr + eps:
                break  # items are in decreasing r: no later one can do better
            ok = True
            for j, a, lim in checks:
                if used[j] + a > lim:
                    ok = False
                    break
            if not ok:
                continue
            saved = [used[j] for j, _, _ in checks]
            for j, a, _ in checks:
                used[j] += a
            chosen[g] = idx
            rec(pos + 1, rs + r, vs + v)
            for (j, _, _), old in zip(checks, saved):
                used[j] = old

    try:
        rec(0, ctx.r0, ctx.v0)
    except _NodeLimit:
        return best, node_limit, False
    return best, nodes, True


def _search_first(
    tree: _Tree, ctx: _Context, target: float, node_limit: int
) -> tuple[tuple[int, ...] | None, int, bool]:
    """The first leaf, in the tree's order, whose value is >= target (None if there is
    none), the node count and whether the search finished within `node_limit`."""
    n = len(tree.items)
    levels, suffix_r, lam_b, exact = tree.items, tree.suffix_r, ctx.lam_b, tree.exact
    used = list(ctx.used0)
    chosen = list(ctx.chosen0)
    where = tree.groups
    nodes = 0

    def rec(pos: int, rs: float, vs: float) -> bool:
        nonlocal nodes
        nodes += 1
        if nodes > node_limit:
            raise _NodeLimit
        if pos == n:
            return vs >= target
        for e in exact:
            if e.value(pos, rs, used[e.dim]) < target:
                return False
        base = rs + suffix_r[pos + 1] + lam_b
        g = where[pos]
        # Fit, charge and restore are inlined as in _search_best on purpose: moved into
        # helper functions they made solve() 12-20% slower (measured on 4x10x8-10x12x8).
        for r, v, idx, checks in levels[pos]:
            if base + r < target:
                continue
            ok = True
            for j, a, lim in checks:
                if used[j] + a > lim:
                    ok = False
                    break
            if not ok:
                continue
            saved = [used[j] for j, _, _ in checks]
            for j, a, _ in checks:
                used[j] += a
            chosen[g] = idx
            found = rec(pos + 1, rs + r, vs + v)
            for (j, _, _), old in zip(checks, saved):
                used[j] = old
            if found:
                return True
        return False

    try:
        found = rec(0, ctx.r0, ctx.v0)
    except _NodeLimit:
        return None, node_limit, False
    return (tuple(chosen) if found else None), nodes, True


# ----------------------------------------------------------------------------------------
# Results.


def _infeasible(minima: tuple[float, float], reason: str, method: str, nodes: int = 0) -> Solution:
    return Solution(
        feasible=False,
        objective=None,
        selection={},
        latency_ms=None,
        memory_bytes=None,
        switch_bytes=None,
        per_model={},
        min_latency_ms=minima[0],
        min_memory_bytes=minima[1],
        reason=reason,
        method=method,
        nodes=nodes,
    )


def _unflatten(shape: Sequence[int], flat: Sequence[int]) -> list[list[int]]:
    out, at = [], 0
    for n in shape:
        out.append(list(flat[at : at + n]))
        at += n
    return out


def _finish(
    problem: Problem,
    minima: tuple[float, float],
    selections: list[list[list[int]]],
    method: str,
    nodes: int,
) -> Solution:
    """Evaluate the selections canonically; the first is the answer, the rest alternatives."""
    head, *rest = [_evaluate_indices(problem, s, minima) for s in selections]
    rest.sort(key=lambda s: -s.objective)  # stable: the search's order breaks exact ties
    alternatives = [dataclasses.replace(s, method=method) for s in rest]
    return dataclasses.replace(head, alternatives=alternatives, method=method, nodes=nodes)


def _milp_fallback(problem: Problem, minima: tuple[float, float], top_k: int, nodes: int) -> Solution:
    from optimizer.milp import solve_milp_top_k  # SciPy's MILP only when needed

    method = f"milp (branch and bound passed {nodes} nodes)"
    found = solve_milp_top_k(problem, top_k)
    if not found:
        return _infeasible(minima, _JOINTLY_INFEASIBLE, method, nodes)
    return _finish(problem, minima, [s for _, s in found], method, nodes)


def solve(problem: Problem, *, top_k: int = 1, node_limit: int = DEFAULT_NODE_LIMIT) -> Solution:
    """The best selection (exact), plus up to top_k-1 next-best distinct ones.

    Objectives closer than float noise (1e-11 of the objective's scale) are ties; among
    tied optima the answer is the lexicographically smallest by (model, block, choice
    index), so a problem always yields the same selection.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if not isinstance(problem, Problem):
        raise TypeError("solve() takes a Problem; build one with optimizer.parse_problem(dict | str | Path)")
    minima = _minima(problem)
    comp = _compile(problem)
    violated = _dim_minimum_violations(comp)
    if violated:
        return _infeasible(minima, "; ".join(violated), "bounds")

    lam, r, root_bound = _multipliers(comp)
    lam_b = sum(l * b for l, b in zip(lam, comp.limits))
    scale = abs(comp.constant) + float(np.abs(np.where(comp.valid, comp.V, 0.0)).max(axis=1).sum())
    scale += sum(max(abs(x) for x in rg) for rg in r) + abs(lam_b)
    eps = _EPS_REL * max(scale, 1e-300)
    # Constraints binding at the root are the candidates for exact node bounds.
    binding = sorted((j for j in range(len(lam)) if lam[j] > 0.0), key=lambda j: -lam[j] * comp.limits[j])
    exact_dims = binding[:3]
    items = _dominance(comp, top_k, 4 * eps)
    for gi, keep in enumerate(items):
        keep.sort(key=lambda i: -r[gi][i])  # stable: ties keep choice order

    def split() -> tuple[_Context, list[int]]:
        """Groups with one item left are fixed; the search branches over the others."""
        used0 = [0.0] * len(comp.names)
        chosen0 = [0] * len(comp.groups)
        v0 = r0 = 0.0
        free = []
        for gi, keep in enumerate(items):
            if len(keep) > 1:
                free.append(gi)
                continue
            i = keep[0]
            g = comp.groups[gi]
            chosen0[gi] = i
            v0 += g.v[i]
            r0 += r[gi][i]
            for p, j in enumerate(g.dims):
                used0[j] += g.a[i][p]
        return _Context(lam_b, used0, v0, r0, chosen0, eps), free

    def reduce(gap: float) -> None:
        """Reduced-cost fixing: an item losing more reduced value than `gap` (the root bound
        minus the value to beat) is in no selection that beats it."""
        for gi, keep in enumerate(items):
            top = r[gi][keep[0]]
            items[gi] = [i for i in keep if top - r[gi][i] <= gap]

    def contested_last(free: list[int]) -> list[int]:
        # A wide gap between a group's best and second-best reduced value means the bound
        # rarely lets the search branch there; such groups go first, so the tree is one
        # path until the decisions that matter.
        return sorted(free, key=lambda gi: (r[gi][items[gi][1]] - r[gi][items[gi][0]], gi))

    ctx, free = split()
    if len(free) > _MAX_DEPTH:
        return _milp_fallback(problem, minima, top_k, 0)
    floor = ctx.v0 + sum(min(comp.groups[gi].v[i] for i in items[gi]) for gi in free)

    # Most instances finish with the O(1) bound alone; the exact bounds are built only when
    # they do not, after reduced-cost fixing with the incumbents found so far.
    tree = _tree(comp, contested_last(free), items, r, lam, ctx.used0)
    best, nodes, finished = _search_best(tree, ctx, top_k, floor, _QUICK_NODES + 10 * len(free))
    if not finished:
        if not best:
            from optimizer.milp import lp_feasible  # SciPy only on this rare path

            # No incumbent yet: the budgets may be jointly infeasible, which the search
            # proves slowly and the LP relaxation quickly.
            if not lp_feasible(problem):
                return _infeasible(minima, _JOINTLY_INFEASIBLE + " (not even fractionally)", "lp", nodes)
        gap = math.inf
        if len(best) == top_k:
            gap = root_bound - best[-1][0] + 2 * eps
            reduce(gap)
            ctx, free = split()
        tree = _tree(comp, contested_last(free), items, r, lam, ctx.used0, exact_dims, gap)
        best, more, finished = _search_best(tree, ctx, top_k, floor, node_limit, best)
        nodes += more
        if not finished:
            return _milp_fallback(problem, minima, top_k, nodes)
    if not best:
        return _infeasible(minima, _JOINTLY_INFEASIBLE, "branch-and-bound", nodes)

    # Tie-break: the lexicographically smallest selection within eps of the optimum.
    z = best[0][0]
    gap = root_bound - z + 2 * eps
    reduce(gap)
    ctx, free = split()
    for keep in items:
        keep.sort()
    natural = _tree(comp, free, items, r, lam, ctx.used0)
    winner, more, finished = _search_first(natural, ctx, z - eps, _QUICK_TIE_NODES + 2 * len(free))
    nodes += more
    if not finished:
        natural = _tree(comp, free, items, r, lam, ctx.used0, exact_dims, gap)
        winner, more, _ = _search_first(natural, ctx, z - eps, node_limit)
        nodes += more
    selections = [s for _, s in best]
    if winner is None:  # only if the node limit ran out: keep the search's own winner
        winner = selections[0]
    rest = [s for s in selections if s != winner][: top_k - 1]
    return _finish(
        problem, minima, [_unflatten(comp.shape, s) for s in [winner, *rest]], "branch-and-bound", nodes
    )
