"""Dominance among partial selections: what keeps the exact search small on degenerate tables.

On tables with ties (a tiny or badly trained model: every accuracy drop ~0, or equal) the
Lagrangian bounds prune nothing: every feasible selection reaches the optimum's value, and
a pass above a threshold would enumerate them all (tens of millions on 12 blocks of 5
choices). Yet only the lexicographically smallest of a set of ties can be the answer.

Partial selections s and s' of the same model at the same level (the same blocks chosen)
share every completion x (the model's later blocks and the other models). If s' is
lexicographically smaller, worth at least as much (to `tie`) and uses no more of any
constraint, then s'x ranks above sx for every x: at least its value, no less feasible, and
the smaller one among ties. A partial selection that *k* others dominate cannot be among
the top k, so the search drops it (`dominated`). The same holds for items of a chunk
(the same prefix, another combination of the chunk's blocks) and for merged selections of
the same set of models.

A measured composition breaks the argument where it is worth less than its additive
prediction: s'x may be such a composition. A partial selection whose prefix a worse-than-
predicted composition shares therefore never counts as a dominator (`can`).

Counting only the survivors as dominators loses nothing (a dominated row's dominators
dominate what it dominates), so rows are taken in lexicographic order, a block at a time,
against the survivors so far, and the survivors are thinned to those that k others of
them do not dominate (a dominated survivor adds no dominator the others do not give):
near-linear where ties make most rows dominated. Where they
do not (distinct values: the bounds prune there), the test stops early: at once where the
first rows' values are mostly distinct, after a first block that drops fewer than half its
rows, or once the survivors pass `_POOL`: dropping
fewer rows is always exact, so the test costs at most N x `_POOL` comparisons.
"""

from __future__ import annotations

import numpy as np

__all__ = ["dominated", "tied"]

_ROWS = 256  # rows tested at first (then 4x as many at once): (rows x survivors) comparisons per operation
_POOL = 1024  # more survivors than this: the rows are not degenerate enough to pay for the test


def dominated(value: np.ndarray, usage: np.ndarray, k: int, tie: float, can: np.ndarray | None = None) -> np.ndarray:
    """Which rows at least `k` lexicographically smaller rows dominate.

    Args:
        value: (N,) each row's value, rows in lexicographic order of their selections.
        usage: (D, N) each row's usage per constraint.
        k: how many dominators make a row useless (the number of selections asked for).
        tie: values closer than this are equal.
        can: (N,) which rows may count as dominators (default all).

    Returns:
        (N,) bool: True where a row can be dropped (possibly not all such rows: see above).
    """
    n = len(value)
    out = np.zeros(n, dtype=bool)
    if not tied(value, tie):
        return out  # mostly distinct values: not degenerate, the bounds prune these rows
    pool_v, pool_u = value[:0], usage[:, :0]
    at = 0
    while at < n:
        size = _ROWS if at == 0 else 4 * _ROWS
        v, u = value[at : at + size], usage[:, at : at + size]
        # Dominators among the survivors of earlier blocks ...
        d = pool_v[None, :] >= v[:, None] - tie
        for j in range(len(u)):
            d &= pool_u[j][None, :] <= u[j][:, None]
        count = np.count_nonzero(d, axis=1)
        # ... and among the earlier rows of this block the survivors so far leave (a row they
        # drop passes its dominators on to the rows it dominates).
        rest = np.flatnonzero(count < k)
        if len(rest) > 1:
            rv, ru = v[rest], u[:, rest]
            inner = np.tri(len(rest), k=-1, dtype=bool) & (rv[None, :] >= rv[:, None] - tie)
            if can is not None:
                inner &= can[at + rest][None, :]
            for j in range(len(u)):
                inner &= ru[j][None, :] <= ru[j][:, None]
            count[rest] += np.count_nonzero(inner, axis=1)
        drop = count >= k
        out[at : at + size] = drop
        stays = ~drop if can is None else ~drop & can[at : at + size]
        pool_v = np.concatenate([pool_v, v[stays]])
        pool_u = np.concatenate([pool_u, u[:, stays]], axis=1)
        if len(pool_v) > _ROWS:
            pool_v, pool_u = _front(pool_v, pool_u, k, tie)
        if len(pool_v) > _POOL or (at == 0 and 2 * np.count_nonzero(drop) < len(drop)):
            break
        at += size
    return out


def tied(value: np.ndarray, tie: float) -> bool:
    """Whether the first rows' values are mostly ties (at most half of them distinct): a
    cheap sign that dropping dominated rows will pay."""
    head = np.sort(np.floor(value[:_ROWS] / tie) if tie > 0 else value[:_ROWS])
    distinct = int(np.count_nonzero(head[1:] != head[:-1])) + 1 if len(head) else 0
    return 2 * distinct <= len(head)


def _front(value: np.ndarray, usage: np.ndarray, k: int, tie: float) -> tuple[np.ndarray, np.ndarray]:
    """The survivors that k others of them do not dominate: every later row is later than
    all of them, so order no longer matters, except that of two equal rows the earlier
    one dominates (a later one dominates only by being strictly better somewhere)."""
    d = value[None, :] >= value[:, None] - tie  # d[i, j]: j dominates i
    strict = value[None, :] > value[:, None] + tie
    for j in range(len(usage)):
        d &= usage[j][None, :] <= usage[j][:, None]
        strict |= usage[j][None, :] < usage[j][:, None]
    d &= np.tri(len(value), k=-1, dtype=bool) | strict
    keep = np.count_nonzero(d, axis=1) < k
    return value[keep], usage[:, keep]
