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

`multipliers` finds that set with two batched evaluations of f (a handful of array
operations over all groups and all candidate multipliers at once):

1. each constraint alone: f along its axis on a geometric grid (mu_j);
2. one constraint: a fine grid around mu; two: with correlated resources (latency and
   memory both fall with sparsity) the dual's minimum lies near the segment from
   (mu_1, 0) to (0, mu_2), a little beyond it, so a grid over (position along the segment,
   scale) gives the best point and its cell; more (deadlines, a switching budget): a grid
   of scalings of mu / D per coordinate.

`core_selections` gives the search its first threshold: under the best multipliers each
group's best choice is fixed except in the `n_core` most contested groups (the smallest
loss from the best to the second-best choice), which try both; all 2^n_core combinations
are evaluated as sums of two halves (measured: the best feasible one is the optimum in
most instances, and within 1.6x the duality gap of it up to 6 models).
"""

from __future__ import annotations

import numpy as np

__all__ = ["Dual", "core_selections", "multipliers"]

_SCAN = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 31)])  # x the constraint's natural scale
_STEP = _SCAN[2] / _SCAN[1]
_ALONG = np.linspace(0.0, 1.0, 11)  # position on the segment (mu_1, 0) .. (0, mu_2)
_SCALE = np.geomspace(1 / _STEP, 1.6 * _STEP, 9)
_FINE = np.geomspace(1 / _STEP, _STEP, 25)
_COORD = np.array([0.0, 0.4, 0.7, 1.0, 1.4, 2.0])
_ZOOM = np.linspace(-1.0, 1.0, 7)
_ZOOMS = 2


class Dual:
    """The multiplier set (first row the best found) and the best feasible selection seen."""

    def __init__(self, lams: np.ndarray, selection: np.ndarray | None, value: float) -> None:
        self.lams = lams  # (K, D)
        self.selection = selection  # (G,) choice per group, or None
        self.value = value  # its value (-inf when none was feasible)


def _batch(V: np.ndarray, A: np.ndarray, lams: np.ndarray) -> np.ndarray:
    """(K, C, G): the reduced values V - lam . A for each row of `lams`."""
    D, C, G = A.shape
    return (V.reshape(1, -1) - lams @ A.reshape(D, -1)).reshape(len(lams), C, G)


def _natural_scale(V: np.ndarray, A: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per constraint, summed value spread over summed coefficient spread: the order of a
    multiplier that makes the constraint matter."""
    spread = (np.where(valid, V, -np.inf).max(axis=0) - np.where(valid, V, np.inf).min(axis=0)).sum()
    span = (np.where(valid, A, -np.inf).max(axis=1) - np.where(valid, A, np.inf).min(axis=1)).sum(axis=1)
    return np.where(span > 0, max(spread, 1e-12) / np.where(span > 0, span, 1.0), 0.0)


def _grid(mu: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """The second batch's multipliers around mu, and the grid's shape."""
    D = len(mu)
    if D == 1:
        return (_FINE * mu[0])[:, None], (len(_FINE),)
    if D == 2:
        pos, sc = np.meshgrid(_ALONG, _SCALE, indexing="ij")
        grid = np.stack([pos * sc * mu[0], (1.0 - pos) * sc * mu[1]], axis=-1)
        return grid.reshape(-1, 2), grid.shape[:2]
    grid = np.repeat((mu / D)[None], 1 + D * len(_COORD), axis=0)
    for j in range(D):
        grid[1 + j * len(_COORD) : 1 + (j + 1) * len(_COORD), j] = _COORD * mu[j] / D * 2
    return grid, (len(grid),)


def _bracket(grid: np.ndarray, shape: tuple[int, ...], best: int) -> np.ndarray:
    """The best grid point first, then the corners of the grid cells around it."""
    if len(shape) == 1:
        if grid.shape[1] == 1:
            lo, hi = max(best - 1, 0), min(best + 1, shape[0] - 1)
            return grid[[best, lo, hi]]
        return grid[[best]]
    i, s = np.unravel_index(best, shape)
    rows = [best]
    for di in (-1, 1):
        for ds in (-1, 1):
            rows.append(np.ravel_multi_index((min(max(i + di, 0), shape[0] - 1), min(max(s + ds, 0), shape[1] - 1)), shape))
    return grid[rows]


def _zoom(V: np.ndarray, A: np.ndarray, limits: np.ndarray, lams: np.ndarray) -> np.ndarray:
    """Refine the best point on ever finer grids spanning its bracket (each step a third)."""
    best = lams[0]
    half = np.abs(lams[1:] - best).max(axis=0)
    D = len(best)
    offsets = np.stack(np.meshgrid(*([_ZOOM] * D), indexing="ij"), axis=-1).reshape(-1, D)
    for _ in range(_ZOOMS):
        grid = np.maximum(best + offsets * half, 0.0)
        f = _batch(V, A, grid).max(axis=1).sum(axis=1) + grid @ limits
        best = grid[int(f.argmin())]
        half = half * (_ZOOM[1] - _ZOOM[0])
    corners = np.stack(np.meshgrid(*([np.array([-1.0, 1.0])] * D), indexing="ij"), axis=-1).reshape(-1, D)
    return np.concatenate([best[None], np.maximum(best + corners * half, 0.0)])


def multipliers(V: np.ndarray, A: np.ndarray, limits: np.ndarray, valid: np.ndarray) -> Dual:
    """A small set of multiplier vectors around the Lagrangian dual's minimum, and the best
    feasible selection among the best choices per group under the multipliers tried.

    Args:
        V: (C, G) values, -inf where invalid.
        A: (D, C, G) constraint coefficients (0 where invalid).
        limits: (D,) budgets.
        valid: (C, G) which entries are choices.
    """
    D, C, G = A.shape
    if D == 0:
        lams = np.zeros((1, 0))
        pick = V.argmax(axis=0)
        return Dual(lams, pick, float(V[pick, np.arange(G)].sum()))
    scale = _natural_scale(V, A, valid)
    n = len(_SCAN)
    axes = np.zeros((D, n, D))
    axes[np.arange(D), :, np.arange(D)] = _SCAN[None, :] * scale[:, None]
    axes = axes.reshape(-1, D)
    f = _batch(V, A, axes).max(axis=1).sum(axis=1) + axes @ limits
    mu = _SCAN[f.reshape(D, n).argmin(axis=1)] * scale
    grid, shape = _grid(mu)
    R = _batch(V, A, grid)
    f = R.max(axis=1).sum(axis=1) + grid @ limits
    lams = _bracket(grid, shape, int(f.argmin()))
    if D <= 2:
        lams = _zoom(V, A, limits, lams)
    # The best choice per group under each multiplier tried: the best feasible one.
    picks = R.argmax(axis=1)  # (K, G)
    cols = np.arange(G)
    values = V[picks, cols].sum(axis=1)
    used = A[:, picks, cols].sum(axis=2)  # (D, K)
    values = np.where((used <= limits[:, None]).all(axis=0), values, -np.inf)
    best = int(values.argmax())
    if not np.isfinite(values[best]):
        return Dual(lams, None, -np.inf)
    return Dual(lams, picks[best], float(values[best]))


def _subsets(n: int) -> np.ndarray:
    """(2^n, n) 0/1 rows: every subset of n items, in binary counting order."""
    return ((np.arange(2**n)[:, None] >> np.arange(n - 1, -1, -1)) & 1).astype(float)


def core_selections(
    V: np.ndarray, A: np.ndarray, limits: np.ndarray, lam: np.ndarray, n_core: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """The `count` best feasible selections that differ from the best choice per group
    (under `lam`) only by second-best choices in the most contested groups.

    Returns:
        (selections (n, G), values (n,)) best first; n <= count (0 when none is feasible).
    """
    D, C, G = A.shape
    cols = np.arange(G)
    R = V - np.tensordot(lam, A, axes=1) if D else V
    top = np.argsort(-R, axis=0, kind="stable")[:2] if C > 1 else np.zeros((2, G), dtype=np.intp)
    first, second = top
    loss = R[first, cols] - R[second, cols]
    loss = np.where(np.isfinite(loss) & (second != first), loss, np.inf)
    core = np.argsort(loss, kind="stable")[:n_core]
    core = core[np.isfinite(loss[core])]
    base_v = V[first, cols].sum()
    base_u = A[:, first, cols].sum(axis=1)
    dv = V[second[core], core] - V[first[core], core]
    du = A[:, second[core], core] - A[:, first[core], core]  # (D, n)
    half = len(core) // 2
    left, right = _subsets(half), _subsets(len(core) - half)
    value = base_v + (left @ dv[:half])[:, None] + (right @ dv[half:])[None, :]
    used = base_u[:, None, None] + (du[:, :half] @ left.T)[:, :, None] + (du[:, half:] @ right.T)[:, None, :]
    value = np.where((used <= limits[:, None, None]).all(axis=0), value, -np.inf).ravel()
    best = np.argsort(-value, kind="stable")[:count]
    best = best[np.isfinite(value[best])]
    chosen = np.concatenate([left[best // len(right)], right[best % len(right)]], axis=1).astype(bool)
    selections = np.repeat(first[None], len(best), axis=0)
    selections[:, core] = np.where(chosen, second[core], first[core])
    return selections, value[best]
