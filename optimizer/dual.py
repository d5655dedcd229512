"""Lagrangian multipliers and a first feasible value, vectorized over all groups.

The problem's items are arrays over (choice, group): `V` the value of each choice (-inf
where a block has fewer choices), `A[j]` its coefficient in constraint j, `limits[j]` the
budget. For multipliers lam >= 0,

    f(lam) = sum_g max_c (V - lam . A)[c, g] + lam . limits

bounds the value of every feasible selection (Lagrangian relaxation), and a selection x
with value V(x) has "Lagrangian value" V(x) + lam . (limits - A(x)) <= f(lam). The search
(`optimizer.search`) keeps a partial selection only if that value can still reach a
threshold for *every* multiplier vector of a small set, so it prunes at least as hard as
any convex combination of them: the set brackets the dual's minimum instead of having to
hit it (measured: a 20% error in one multiplier costs the search 10-100x more states).

`multipliers` finds that set with a few batched evaluations of f (a handful of array
operations over all groups and all candidate multipliers at once):

1. each constraint alone: f along its axis on a geometric grid (mu_j);
2. one constraint: a fine grid around mu. Two: with correlated resources (latency and
   memory both fall with sparsity) the dual's minimum lies near the segment from
   (mu_1, 0) to (0, mu_2), a little beyond it, so a grid over (position along the segment,
   scale); then grids a third as wide around the best point, `zooms` times, and the last
   grid cell's corners bracket it. More constraints (deadlines, a switching budget):
   each coordinate in turn moved to the best of a line of values (a batch each).

`DualGrid` (`dual_grid`) keeps f's budget-independent part on a fixed grid of multipliers
for one or two constraints, built once: under new budgets the grid's best point is one
matrix product away (what a prepared problem's frontier merge uses, `optimizer.frontier`).

`core_selections` gives the search its first threshold: under the best multipliers each
group's best choice is fixed except in the `n_core` most contested groups (the smallest
loss from the best to the second-best choice), which try both; all 2^n_core combinations
are evaluated as sums of two halves (measured on profile-shaped tables: the best feasible
one is the optimum in most instances, and within 1.6x the duality gap of it up to six
models). All of it but the last step (which combinations fit the budgets) depends on the
multipliers alone: `core_parts` computes that part for a batch of multiplier vectors, so
a prepared problem keeps it for every point of its `DualGrid`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np

__all__ = ["CoreParts", "DualGrid", "Relaxation", "axes_values", "core_parts", "core_selections", "dual_grid", "lp_infeasible", "multipliers", "natural_scale"]

_SCAN = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 31)])  # x the constraint's natural scale
_GRID = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 64)])  # `dual_grid` per axis, x the natural scale
_GRID_BATCH = 256  # grid points evaluated at once
_STEP = _SCAN[2] / _SCAN[1]
_FINE = np.geomspace(1 / _STEP, _STEP, 13)
_ALONG = np.linspace(0.0, 1.0, 9)  # position on the segment (mu_1, 0) .. (0, mu_2)
_SCALE = np.geomspace(1 / _STEP, 1.6 * _STEP, 7)
_ZOOM = np.linspace(-1.0, 1.0, 7)
_STABLE_GROUPS = 64  # from this many groups on, zooms evaluate only the groups that change
_LINE = np.concatenate([[0.0], np.geomspace(0.25, 4.0, 13)])
_POS, _SC = (a.ravel() for a in np.meshgrid(_ALONG, _SCALE, indexing="ij"))
_SEGMENT = np.column_stack([_POS * _SC, (1.0 - _POS) * _SC])  # (points, 2) in units of mu


def _cell_halves() -> np.ndarray:
    """Per segment grid point, the half-widths (in units of mu) of the box spanning its
    neighbours on the grid."""
    shape = (len(_ALONG), len(_SCALE))
    out = np.empty_like(_SEGMENT)
    for best in range(len(_SEGMENT)):
        i, s = divmod(best, len(_SCALE))
        near = [np.ravel_multi_index((min(max(i + di, 0), shape[0] - 1), min(max(s + ds, 0), shape[1] - 1)), shape)
                for di in (-1, 1) for ds in (-1, 1)]
        out[best] = np.abs(_SEGMENT[near] - _SEGMENT[best]).max(axis=0)
    return out


_SEGMENT_HALF = _cell_halves()
# Per number of constraints D <= 2: the zoom grid's offsets and a cell's corners, (n, D).
_OFFSETS = {d: np.stack(np.meshgrid(*([_ZOOM] * d), indexing="ij"), axis=-1).reshape(-1, d) for d in (1, 2)}
_CORNERS = {d: np.stack(np.meshgrid(*([np.array([-1.0, 1.0])] * d), indexing="ij"), axis=-1).reshape(-1, d) for d in (1, 2)}


def natural_scale(V: np.ndarray, valid: np.ndarray, least: np.ndarray, largest: np.ndarray) -> np.ndarray:
    """Per constraint, summed value spread over summed coefficient spread: the order of a
    multiplier that makes the constraint matter.

    Args:
        V: (C, G) the items' values; valid: (C, G) which exist.
        least, largest: (D,) each constraint's smallest and largest achievable total.
    """
    spread = (np.where(valid, V, -np.inf).max(axis=0) - np.where(valid, V, np.inf).min(axis=0)).sum()
    span = largest - least
    return np.where(span > 0, max(spread, 1e-12) / np.where(span > 0, span, 1.0), 0.0)


class Relaxation:
    """The Lagrangian relaxation of one solve: values V (C, G) (-inf where invalid),
    coefficients A (D, C, G), budgets (D,), and the models' measured compositions (their
    values (J,), coefficients (D, J) and models (J,); groups are in model order from
    `starts`). A model's part of f is the larger of its groups' sum and its compositions'."""

    def __init__(
        self, V: np.ndarray, A: np.ndarray, limits: np.ndarray, starts: np.ndarray,
        comp_value: np.ndarray, comp_coef: np.ndarray, comp_model: np.ndarray,
    ) -> None:
        self.V, self.A, self.limits, self.starts = V, A, limits, starts
        self.comp_value, self.comp_coef, self.comp_model = comp_value, comp_coef, comp_model
        self._neg = np.ascontiguousarray(-A.transpose(1, 0, 2))  # (C, D, G)
        self._v = V[:, None, :]

    def reduced(self, lams: np.ndarray) -> np.ndarray:
        """(C, K, G): V - lam . A for each row of `lams`, choices first so that the maximum
        over them is elementwise across contiguous slices (computed in place: no second
        temporary of that size)."""
        R = lams @ self._neg
        R += self._v
        return R

    def parts(self, lams: np.ndarray) -> np.ndarray:
        """(K, M): each model's part of f at each row of `lams`."""
        parts = np.add.reduceat(self.reduced(lams).max(axis=0), self.starts, axis=1)
        if len(self.comp_model):
            np.maximum.at(parts.T, self.comp_model, (self.comp_value - lams @ self.comp_coef).T)
        return parts

    def dual(self, lams: np.ndarray) -> np.ndarray:
        """f(lam) for each row of `lams` (K, D)."""
        if len(self.comp_model):
            return self.parts(lams).sum(axis=1) + lams @ self.limits
        return self.reduced(lams).max(axis=0).sum(axis=1) + lams @ self.limits

    def dual_in_box(self, lams: np.ndarray, corners: np.ndarray) -> np.ndarray:
        """f at rows of `lams` that lie in the box spanned by `corners`: a group whose best
        choice is the same at every corner has it throughout the box (the set of multipliers
        under which a choice is best is convex), so it adds a linear term and only the other
        groups are evaluated per row."""
        G = self.A.shape[2]
        if len(self.comp_model) or G < _STABLE_GROUPS:
            return self.dual(lams)
        at = self.reduced(corners).argmax(axis=0)
        stable = (at == at[0]).all(axis=0)
        cols = np.flatnonzero(stable)
        pick = at[0, cols]
        linear = self.V[pick, cols].sum() - lams @ self.A[:, pick, cols].sum(axis=1)
        rest = np.flatnonzero(~stable)
        if not len(rest):
            return linear + lams @ self.limits
        R = lams @ self._neg.take(rest, axis=2)  # (C, K, rest)
        R += self._v.take(rest, axis=2)
        return R.max(axis=0).sum(axis=1) + linear + lams @ self.limits


def _plane(rel: Relaxation, mu: np.ndarray, zooms: int) -> np.ndarray:
    """One or two constraints: the best point and the corners of the finest cell around it."""
    D = len(mu)
    if D == 1:
        grid = (_FINE * mu[0])[:, None]
        best = int(rel.dual(grid).argmin())
        point, half = grid[best], np.array([mu[0] * (_STEP - 1) / 6])
    else:
        grid = _SEGMENT * mu
        best = int(rel.dual(grid).argmin())
        point, half = grid[best], _SEGMENT_HALF[best] * mu
    for _ in range(zooms):
        grid = np.maximum(point + _OFFSETS[D] * half, 0.0)
        point = grid[int(rel.dual_in_box(grid, np.maximum(point + _CORNERS[D] * half, 0.0)).argmin())]
        half = half * (_ZOOM[1] - _ZOOM[0])
    return np.concatenate([point[None], np.maximum(point + _CORNERS[D] * half, 0.0)])


def _coordinates(rel: Relaxation, mu: np.ndarray, sweeps: int, owner: np.ndarray) -> np.ndarray:
    """Three or more constraints: from mu / D, each shared constraint in turn set to the best
    of a geometric line of values (one batch each), then every deadline at once: a model's
    deadline touches only its own groups, so one batch of scalings, summed per model, gives
    each deadline its best value. `sweeps` times; returns the best point and, per
    coordinate, the two points a little either side."""
    D = len(mu)
    point = mu / D
    own = owner >= 0
    for _ in range(sweeps):
        for j in np.flatnonzero(~own):
            base = point[j] if point[j] > 0 else mu[j] / D
            if base > 0:
                grid = np.repeat(point[None], len(_LINE), axis=0)
                grid[:, j] = base * _LINE
                point = grid[int(rel.dual(grid).argmin())]
        if own.any():
            base = np.where(point > 0, point, mu / D)[own]
            grid = np.repeat(point[None], len(_LINE), axis=0)
            grid[:, own] = _LINE[:, None] * base
            parts = rel.parts(grid)[:, owner[own]]  # (K, deadlines)
            best = (parts + grid[:, own] * rel.limits[own]).argmin(axis=0)
            point = point.copy()
            point[own] = base * _LINE[best]
    rows = [point]
    for j in range(D):
        for factor in (0.95, 1.05):
            row = point.copy()
            row[j] *= factor
            rows.append(row)
    return np.array(rows)


def axes_values(rel: Relaxation, scale: np.ndarray) -> np.ndarray:
    """The budget-independent part of f on the axes scan, sum_g max_c (V - lam . A): what a
    re-solve under other budgets of the same kinds can reuse."""
    axes = _axes(len(scale)) * scale
    return rel.dual(axes) - axes @ rel.limits


@dataclass(frozen=True)
class DualGrid:
    """The budget-independent part of f, sum_g max_c (V - lam . A), on a fixed grid of
    multipliers: under any budgets f is that part plus lam . limits, so a re-solve finds the
    grid's best multipliers with one matrix product instead of a search."""

    lams: np.ndarray  # (P, D)
    part: np.ndarray  # (P,)

    def best(self, limits: np.ndarray) -> int:
        """The index of the grid point where f is least under `limits`."""
        return int((self.part + self.lams @ limits).argmin())

    def larger(self, point: int, steps: int) -> int:
        """The index of the grid point `steps` geometric steps (x1.245 each) above `point` on
        every nonzero axis (capped at the grid's edge): more frugal multipliers."""
        n, D = len(_GRID), self.lams.shape[1]
        at = np.unravel_index(point, (n,) * D)
        return int(np.ravel_multi_index(tuple(min(i + steps, n - 1) if i else 0 for i in at), (n,) * D))


def dual_grid(rel: Relaxation, scale: np.ndarray) -> DualGrid:
    """A `DualGrid` for one or two constraints: every combination of 0 and 64 geometric steps
    (ratio 1.24) from 1e-3 to 1e3 times each constraint's natural scale, about 4,000 points
    for two; built once per kind of constraints (a few ms)."""
    D = len(scale)
    if D not in (1, 2):
        raise ValueError(f"a dual grid is for one or two constraints, not {D}")
    lams = np.stack(np.meshgrid(*([_GRID] * D), indexing="ij"), axis=-1).reshape(-1, D) * scale
    part = np.concatenate([rel.dual(lams[at : at + _GRID_BATCH]) - lams[at : at + _GRID_BATCH] @ rel.limits
                           for at in range(0, len(lams), _GRID_BATCH)])
    return DualGrid(lams=lams, part=part)


def multipliers(
    rel: Relaxation, scale: np.ndarray, zooms: int = 2, owner: np.ndarray | None = None, axes_part: np.ndarray | None = None
) -> np.ndarray:
    """A small set of multiplier vectors (K, D) around the Lagrangian dual's minimum; the
    first row is the best one found.

    Args:
        rel: the relaxation.
        scale: (D,) `natural_scale`.
        zooms: refinements of the best point (more for more groups).
        owner: (D,) for a constraint on one model's groups only (a deadline), that model; else -1.
        axes_part: `axes_values(rel, scale)` if known (for a relaxation without compositions).
    """
    D = len(rel.limits)
    if D == 0:
        return np.zeros((1, 0))
    axes = _axes(D) * scale
    f = rel.dual(axes) if axes_part is None else axes_part + axes @ rel.limits
    mu = _SCAN[f.reshape(D, len(_SCAN)).argmin(axis=1)] * scale
    if D <= 2:
        return _plane(rel, mu, zooms)
    return _coordinates(rel, mu, 2 + zooms, np.full(D, -1) if owner is None else owner)


@lru_cache(maxsize=None)
def _simplex(D: int) -> np.ndarray:
    """Points of the unit simplex in D dimensions on a grid (a few hundred at most)."""
    if D == 1:
        return np.ones((1, 1))
    steps = next(n for n in (12, 8, 6, 4, 3, 2, 1) if math.comb(n + D - 1, D - 1) <= 600)
    combos = list(itertools.combinations(range(steps + D - 1), D - 1))
    cuts = np.array(combos, dtype=float).reshape(len(combos), D - 1)  # D == 1: one empty cut
    edges = np.concatenate([np.full((len(cuts), 1), -1.0), cuts, np.full((len(cuts), 1), steps + D - 1.0)], axis=1)
    return (np.diff(edges, axis=1) - 1.0) / steps


def lp_infeasible(A: np.ndarray, valid: np.ndarray, limits: np.ndarray) -> bool:
    """Whether not even fractional choices meet the budgets, shown by a certificate (Farkas):
    weights lam >= 0 for which the least weighted usage exceeds the weighted budgets. The
    weights are searched on a grid of the simplex (budgets scaled to 1), then around the
    best point; not finding one proves nothing."""
    D, C, G = A.shape
    unit = np.where(limits > 0, limits, 1.0)
    scaled = A.reshape(D, C * G) / unit[:, None]
    norm = limits / unit
    lams = _simplex(D)
    for _ in range(3):
        weighted = (lams @ scaled).reshape(len(lams), C, G)
        excess = np.where(valid[None], weighted, np.inf).min(axis=1).sum(axis=1) - lams @ norm
        if (excess > 1e-9 * (1.0 + np.abs(lams @ norm))).any():
            return True
        best = lams[int(excess.argmax())]
        lams = np.maximum(best + (_simplex(D) - 1.0 / D) / 4.0, 0.0)
    return False


@lru_cache(maxsize=None)
def _axes(D: int) -> np.ndarray:
    """(D * len(_SCAN), D): the scan points along each axis, for a unit natural scale."""
    axes = np.zeros((D, len(_SCAN), D))
    axes[np.arange(D), :, np.arange(D)] = _SCAN
    return axes.reshape(-1, D)


@lru_cache(maxsize=None)
def _subsets(n: int) -> np.ndarray:
    """(2^n, n) 0/1 rows: every subset of n items, in binary counting order."""
    return ((np.arange(2**n)[:, None] >> np.arange(n - 1, -1, -1)) & 1).astype(float)


@dataclass(frozen=True)
class CoreParts:
    """What `core_selections` needs that depends on the multipliers alone (not on the
    budgets), for P multiplier vectors: per vector its best choice per group, the
    contested groups (the first `n[p]` of each row count) and what taking their
    second-best choice changes."""

    first: np.ndarray  # (P, G) best choice per group
    core: np.ndarray  # (P, n_core) contested groups, most contested first
    second: np.ndarray  # (P, n_core) their second-best choices
    n: np.ndarray  # (P,) how many of a row's contested groups count (the rest have no second choice)
    base_v: np.ndarray  # (P,) the value of the best choices
    base_u: np.ndarray  # (D, P) their usage
    dv: np.ndarray  # (P, n_core) value change of the second-best choice
    du: np.ndarray  # (D, P, n_core) its usage change


def core_parts(V: np.ndarray, A: np.ndarray, lams: np.ndarray, n_core: int) -> CoreParts:
    """`CoreParts` under each multiplier vector of `lams` (P, D).

    A prepared problem's frontier solves read their multipliers from the dual's grid
    (`DualGrid`), so computing these once for every grid point leaves a solve only the
    budget-dependent part of `core_selections`. Evaluated `_GRID_BATCH` vectors at a time."""
    if len(lams) > _GRID_BATCH:  # kept for a whole grid: indices in the smallest integer type that holds them
        batches = [core_parts(V, A, lams[at : at + _GRID_BATCH], n_core) for at in range(0, len(lams), _GRID_BATCH)]
        axis = {"base_u": 1, "du": 1}  # fields whose leading axis is the constraint
        index = np.min_scalar_type(max(A.shape[1:]))
        return CoreParts(**{f.name: np.concatenate([getattr(b, f.name) for b in batches], axis=axis.get(f.name, 0))
                            .astype(index if f.name in ("first", "core", "second", "n") else float, copy=False)
                            for f in fields(CoreParts)})
    D, C, G = A.shape
    P = len(lams)
    R = V - (lams @ A.reshape(D, C * G)).reshape(P, C, G) if D else np.broadcast_to(V, (P, C, G))
    at, cols = np.arange(P)[:, None], np.arange(G)
    if C > 1:
        order = (-R).argsort(axis=1, kind="stable")
        first, second = order[:, 0], order[:, 1]  # (P, G)
        loss = R[at, first, cols] - R[at, second, cols]  # +inf where a group has one choice (its second is -inf)
    else:
        first = second = np.zeros((P, G), dtype=np.intp)
        loss = np.full((P, G), np.inf)
    core = loss.argsort(axis=1, kind="stable")[:, :n_core]  # (P, n): the finite losses first
    top, low = first[at, core], second[at, core]
    return CoreParts(
        first=first,
        core=core,
        second=low,
        n=np.minimum(np.isfinite(loss).sum(axis=1), n_core),
        base_v=V[first, cols].sum(axis=1),
        base_u=A[:, first, cols].sum(axis=2),
        dv=V[low, core] - V[top, core],
        du=A[:, low, core] - A[:, top, core],
    )


def core_selections(
    V: np.ndarray, A: np.ndarray, limits: np.ndarray, lam: np.ndarray, n_core: int, count: int, rows: bool = True,
    parts: tuple[CoreParts, int] | None = None,
) -> tuple[np.ndarray | None, np.ndarray]:
    """The `count` best feasible selections that differ from the best choice per group
    (under `lam`) only by second-best choices in the `n_core` most contested groups.

    Args:
        V, A: the items' values (C, G) and coefficients (D, C, G).
        limits: (D,) the budgets.
        lam: (D,) the multipliers.
        n_core: how many contested groups try their second-best choice.
        count: how many selections to return.
        rows: whether to return the selections (else only their values).
        parts: `core_parts` already computed for `lam` (and `n_core`), with the row to read.

    Returns:
        (selections (n, G), values (n,)) best first; n <= count (0 when none is feasible).
        Without `rows` only the values (selections None).
    """
    cp, p = parts if parts is not None else (core_parts(V, A, lam[None], n_core), 0)
    n = int(cp.n[p])
    core, dv, du = cp.core[p, :n], cp.dv[p, :n], cp.du[:, p, :n]
    D = len(limits)
    half = n // 2
    left, right = _subsets(half), _subsets(n - half)
    value = (left @ dv[:half])[:, None] + (right @ dv[half:] + cp.base_v[p])[None, :]
    room = (limits - cp.base_u[:, p])[:, None] - du[:, half:] @ right.T  # (D, right): what the left half may use
    used = du[:, :half] @ left.T  # (D, left)
    if D:
        fits = used[0][:, None] <= room[0][None, :]
        for j in range(1, D):
            fits &= used[j][:, None] <= room[j][None, :]
        value = np.where(fits, value, -np.inf)
    value = value.ravel()
    best = np.argsort(-value, kind="stable")[:count] if count > 1 else np.array([int(value.argmax())])
    best = best[np.isfinite(value[best])]
    if not rows:
        return None, value[best]
    chosen = np.concatenate([left[best // len(right)], right[best % len(right)]], axis=1).astype(bool)
    selections = np.repeat(cp.first[p][None], len(best), axis=0)
    selections[:, core] = np.where(chosen, cp.second[p, :n], cp.first[p][core])
    return selections, value[best]
