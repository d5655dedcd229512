"""Meet in the middle: the exact top selections under one constraint, however flat the values.

The block search prunes with Lagrangian bounds. Where every choice's value is nearly
proportional to its usage (a profile whose drops were calibrated against FLOPs, say), every
selection that fills the budget sits within float noise of the bound: nothing is pruned and
the search holds millions of states. With a single constraint the problem has a structure
that does not care: split the groups in two, enumerate each half's selections, and sort one
half by usage. The best completion of a left selection is then the best right selection in
the prefix that still fits (a prefix maximum found by binary search), so the k-th best of
the left selections' best completions is a value the top k reach, and only the pairs above
it are built. Exact for any values, ties included (the caller picks among the pairs as the
search does); the cost is the two halves, so it is used where they are small.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

HALF_ROWS = 1 << 12  # the larger half may hold this many selections for a solve to start here
FALLBACK_HALF_ROWS = 1 << 21  # ... and this many (about 150 MB at most) once the block search has passed its state limit
PAIR_ROWS = 1 << 22  # the most (left, right) pairs the candidates' scan may visit


def split(sizes: Sequence[int]) -> int:
    """The group index that splits `sizes` (choices per group) into two halves whose
    numbers of selections are closest (the left half is groups [0, index))."""
    logs = np.cumsum(np.log(np.asarray(sizes, dtype=float)))
    total = logs[-1] if len(logs) else 0.0
    return int(np.argmin(np.abs(2 * logs - total))) + 1 if len(logs) else 0


def half_rows(sizes: Sequence[int]) -> int:
    """How many selections the larger half of `sizes` holds (`split`)."""
    at = split(sizes)
    return max(math.prod(sizes[:at]), math.prod(sizes[at:]))


def _enumerate(values: Sequence[np.ndarray], usage: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Every selection of the groups as (value, usage), in lexicographic order of the choices
    (the first group most significant)."""
    v, u = np.zeros(1), np.zeros(1)
    for gv, gu in zip(values, usage):
        v = (v[:, None] + gv[None, :]).ravel()
        u = (u[:, None] + gu[None, :]).ravel()
    return v, u


def top_pairs(
    values: Sequence[np.ndarray], usage: Sequence[np.ndarray], limit: float, top_k: int, eps: float,
    pair_rows: int = PAIR_ROWS,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The feasible selections that can be among the top_k best (within the tie window).

    Args:
        values: per group, its choices' values (to maximize).
        usage: per group, its choices' usage of the one constraint.
        limit: the constraint's limit (usage summed over groups must not exceed it).
        top_k: how many best distinct selections the caller picks.
        eps: the tie window: the caller treats values closer than this as equal.
        pair_rows: the most pairs the scan may visit; past it, None.

    Returns:
        (choices, values): per candidate its choice index per group and its value; every
        selection among the top_k best, and every selection tied with one of them, is a
        candidate. Empty where nothing fits; None past `pair_rows`.
    """
    sizes = [len(v) for v in values]
    at = split(sizes)
    v_left, u_left = _enumerate(values[:at], usage[:at])
    v_right, u_right = _enumerate(values[at:], usage[at:])
    order = np.argsort(u_right, kind="stable")
    u_sorted, v_sorted = u_right[order], v_right[order]
    best_prefix = np.maximum.accumulate(v_sorted)
    fits = np.searchsorted(u_sorted, limit - u_left, side="right")  # right selections each left one may take
    live = np.flatnonzero(fits > 0)
    if not len(live):
        return np.zeros((0, len(sizes)), dtype=np.intp), np.zeros(0)
    best = v_left[live] + best_prefix[fits[live] - 1]  # each left selection's best completion
    # Each left selection gives a distinct selection worth `best`: the k-th largest is reached by k.
    floor = np.partition(best, len(best) - top_k)[len(best) - top_k] if len(best) >= top_k else -np.inf
    floor -= 3 * eps
    rel = live[best >= floor]
    # Only right selections worth enough next to the best relevant left one can pair above the
    # floor: scan those (positions in the usage order, ascending), each left one its prefix.
    scan = np.flatnonzero(v_sorted >= floor - v_left[rel].max())
    spans = np.searchsorted(scan, fits[rel])
    if int(spans.sum()) > pair_rows:
        return None
    left = np.repeat(rel, spans)
    starts = np.cumsum(spans) - spans
    pos = scan[np.arange(len(left)) - np.repeat(starts, spans)]  # position in the usage order
    value = v_left[left] + v_sorted[pos]
    keep = value >= floor
    left, right, value = left[keep], order[pos[keep]], value[keep]
    return np.concatenate([_digits(left, sizes[:at]), _digits(right, sizes[at:])], axis=1), value


def _digits(index: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """(n, len(sizes)): the choice per group of each selection's position in `_enumerate`'s order."""
    if not sizes:
        return np.zeros((len(index), 0), dtype=np.intp)
    return np.stack(np.unravel_index(index, tuple(sizes)), axis=1)
