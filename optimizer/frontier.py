"""Per-model frontiers: the selections of one model that no other of its selections beats.

A device re-solves the same tables under ever new budgets. Whatever the budgets (a shared
latency or memory budget, a model's latency deadline), a selection s of model m can be
left out of every solve if another selection s' of the same model uses no more latency
and no more memory and is

- worth more by over `margin` (more than the solver's float-noise tie window, so that
  s x never ties with s' x for any selection x of the other models), or
- worth exactly as much and lexicographically smaller (s' x then wins every tie s x could).

Both relations are transitive, so every selection left out has a kept one that beats it,
and the kept ones - the frontier - hold the answer of every solve without switching costs
and with top_k = 1. They are budget-independent: built once when a table is loaded
(`CompiledProblem.prepare`), re-read on every budget change.

Built block by block: a partial selection (the first b blocks chosen) that another beats
in that sense is beaten for every completion, so it is dropped before the next block
multiplies the count. A measured composition worth less than its additive prediction
breaks this for its prefixes (the prefix's sum overstates it), so those never count as
the one that beats another; at the end each composition enters with its measured value
and replaces the free selection equal to it.

The test is a sweep in order of value with a staircase (least memory per latency) of the
selections that may beat the current one: O(n log n) per block, in Python, so a frontier
of 10,000 selections takes about 0.1 s. Frontiers past `cap` selections (degenerate
tables where values do not separate the selections) are not built: the solver then works
on the blocks themselves.

Reading them (`best_rows`): one model's answer is its best row that fits, a few array
operations whatever the budgets. Several models' answer is a Lagrangian enumeration over
their rows, merged model by model, as `optimizer.search` does over chunks of blocks.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import numpy as np

__all__ = ["DEFAULT_CAP", "PAIR_CAP", "Frontier", "Frontiers", "best_rows", "model_frontier", "stack"]

DEFAULT_CAP = 50_000  # selections per model above which no frontier is built
_COMPARED = 1 << 22  # booleans one step of `_rows_in` may hold
PAIR_CAP = 1 << 15  # pairs a sorted merge step of `best_rows` may build before the solve is left to the block search
_ALL_PAIRS = 1 << 16  # merge steps of at most this many pairs test them all (no sort)


@dataclass(frozen=True)
class Frontier:
    """One model's frontier, rows in lexicographic order of their selections.

    `value` is the selection's weighted value (its measured one for a composition),
    `usage` its (latency, memory) totals, `choice` its choice index per block."""

    value: np.ndarray  # (n,)
    usage: np.ndarray  # (2, n)
    choice: np.ndarray  # (n, blocks)


def model_frontier(
    value: np.ndarray,
    usage: np.ndarray,
    sizes: Sequence[int],
    margin: float,
    compositions: Sequence[tuple[Sequence[int], float]] = (),
    cap: int = DEFAULT_CAP,
) -> Frontier | None:
    """The frontier of one model, or None where it would pass `cap` selections.

    Args:
        value: (C, B) each block's choices' weighted values (column b: block b).
        usage: (2, C, B) their latency and memory.
        sizes: (B,) how many choices each block has (rows past it are ignored).
        margin: a selection worth more than another by over this beats it (at least the
            solver's tie window).
        compositions: (choice index per block, gain): measured selections and their
            measured value minus their additive one.
        cap: the most selections a step may keep.
    """
    worse = [tuple(row) for row, gain in compositions if gain <= 0]
    v = np.zeros(1)
    u = np.zeros((2, 1))
    choice = np.zeros((1, 0), dtype=np.intp)
    for b, size in enumerate(sizes):
        n = len(v)
        v = (v[:, None] + value[:size, b][None]).ravel()
        u = (u[:, :, None] + usage[:, :size, b][:, None]).reshape(2, n * size)
        choice = np.concatenate([np.repeat(choice, size, axis=0), np.tile(np.arange(size), n)[:, None]], axis=1)
        can = _can_beat(choice, worse)
        keep = _unbeaten(v, u, margin, can)
        if keep.sum() > cap:
            return None
        v, u, choice = v[keep], u[:, keep], choice[keep]
    if compositions:
        v, u, choice = _with_compositions(v, u, choice, value, usage, compositions)
        order = np.lexsort(choice.T[::-1])
        v, u, choice = v[order], u[:, order], choice[order]
        keep = _unbeaten(v, u, margin, None)
        v, u, choice = v[keep], u[:, keep], choice[keep]
    return Frontier(value=v, usage=u, choice=choice)


def _can_beat(choice: np.ndarray, worse: list[tuple[int, ...]]) -> np.ndarray | None:
    """(n,) False for the prefixes of compositions worth less than their sum (None: all can)."""
    if not worse:
        return None
    depth = choice.shape[1]
    return ~_rows_in(choice, np.array([row[:depth] for row in worse], dtype=np.intp))


def _rows_in(rows: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(n,) whether each row of `rows` (n, d) is a row of `table` (J, d); compared a block
    of rows at a time, so memory stays within `_COMPARED` booleans."""
    out = np.zeros(len(rows), dtype=bool)
    step = max(1, _COMPARED // max(table.size, 1))
    for at in range(0, len(rows), step):
        out[at : at + step] = (rows[at : at + step, None, :] == table[None]).all(axis=2).any(axis=1)
    return out


def _with_compositions(
    v: np.ndarray, u: np.ndarray, choice: np.ndarray, value: np.ndarray, usage: np.ndarray,
    compositions: Sequence[tuple[Sequence[int], float]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The frontier rows plus every composition at its measured value, free rows equal to a
    composition removed (the highest gain where one is listed twice)."""
    best: dict[tuple[int, ...], float] = {}
    for row, gain in compositions:
        key = tuple(int(c) for c in row)
        best[key] = max(gain, best.get(key, -np.inf))
    rows = np.array(list(best), dtype=np.intp)
    blocks = np.arange(rows.shape[1])
    comp_v = value[rows, blocks].cumsum(axis=1)[:, -1] + np.array(list(best.values()))
    comp_u = usage[:, rows, blocks].sum(axis=2)
    free = ~_rows_in(choice, rows)
    return (np.concatenate([v[free], comp_v]), np.concatenate([u[:, free], comp_u], axis=1),
            np.concatenate([choice[free], rows]))


def _unbeaten(v: np.ndarray, u: np.ndarray, margin: float, can: np.ndarray | None) -> np.ndarray:
    """(n,) bool: the rows (given in lexicographic order) that no other row beats.

    Rows are swept by value, high first (lexicographic among equal values). `above` is the
    staircase of kept rows worth more than the current one by over `margin`; `equal` that
    of kept rows of exactly its value seen before it (lexicographically smaller)."""
    order = np.lexsort((np.arange(len(v)), -v)).tolist()
    vals, lat, mem = v.tolist(), u[0].tolist(), u[1].tolist()
    may = [True] * len(vals) if can is None else can.tolist()
    keep = [False] * len(vals)
    above_l: list[float] = []
    above_m: list[float] = []
    equal_l: list[float] = []
    equal_m: list[float] = []
    pending = 0  # next row (in sweep order) not yet in `above`
    current = None
    for i in order:
        vi, li, mi = vals[i], lat[i], mem[i]
        while pending < len(order) and vals[order[pending]] > vi + margin:
            j = order[pending]
            if keep[j] and may[j]:
                _insert(above_l, above_m, lat[j], mem[j])
            pending += 1
        if vi != current:
            current = vi
            equal_l, equal_m = [], []
        if _covered(above_l, above_m, li, mi) or _covered(equal_l, equal_m, li, mi):
            continue
        keep[i] = True
        if may[i]:
            _insert(equal_l, equal_m, li, mi)
    return np.array(keep, dtype=bool)


def _covered(stair_l: list[float], stair_m: list[float], lat: float, mem: float) -> bool:
    """Whether a point of the staircase uses no more latency and no more memory."""
    at = bisect_right(stair_l, lat)
    return at > 0 and stair_m[at - 1] <= mem


def _insert(stair_l: list[float], stair_m: list[float], lat: float, mem: float) -> None:
    """Adds a point to the staircase (latency ascending, memory strictly descending),
    removing the points it covers; a covered point is not added."""
    at = bisect_right(stair_l, lat)
    if at > 0 and stair_m[at - 1] <= mem:
        return
    end = at
    while end < len(stair_l) and stair_m[end] >= mem:
        end += 1
    if at > 0 and stair_l[at - 1] == lat:  # same latency, less memory: replaces it
        at -= 1
    stair_l[at:end] = [lat]
    stair_m[at:end] = [mem]


@dataclass(frozen=True)
class Frontiers:
    """Every model's frontier, padded to one width: arrays over (model, row)."""

    value: np.ndarray  # (M, I): -inf past a model's rows
    usage: np.ndarray  # (2, M, I): latency and memory (0 past a model's rows)
    valid: np.ndarray  # (M, I)
    choice: list[np.ndarray]  # per model (n_m, blocks)


def stack(frontiers: Sequence[Frontier]) -> Frontiers:
    """One `Frontiers` from the models' frontiers, in model order."""
    width = max(len(f.value) for f in frontiers)
    M = len(frontiers)
    value = np.full((M, width), -np.inf)
    usage = np.zeros((2, M, width))
    valid = np.zeros((M, width), dtype=bool)
    for m, f in enumerate(frontiers):
        n = len(f.value)
        value[m, :n], usage[:, m, :n], valid[m, :n] = f.value, f.usage, True
    return Frontiers(value=value, usage=usage, valid=valid, choice=[f.choice for f in frontiers])


def best_rows(
    fr: Frontiers, coef: np.ndarray, least: np.ndarray, limits: np.ndarray, lam: np.ndarray, eps: float,
    known: float = -np.inf, pair_cap: int = PAIR_CAP,
) -> tuple[list[int], int] | None:
    """Per model the frontier row of the best feasible selection (values within `eps` tie,
    the lexicographically smallest wins) and how many partial selections were held, or
    None where this path does not decide: nothing feasible (the caller's search then says
    why), no `known` value on several models, or more than `pair_cap` pairs passing the
    value test of a sorted merge step.

    One model: the best row that fits. Several: Lagrangian enumeration over the rows, as
    `optimizer.search` does over chunks of blocks. A selection worth at least T = `known`
    has a reduced value R = V - lam . U of at least T - lam . limits; so each model keeps
    the rows that leave that much with the other models at their best, and the kept rows
    are merged model by model (fewest first), a partial merge kept only if it still can
    with the models to come at their best and least. A merge step of more than
    `_ALL_PAIRS` pairs sorts the incoming model's rows by R: each partial merge's partners
    are then a prefix, and only the pairs that pass the value test are built.

    Args:
        fr: the frontiers.
        coef: (D, M, I) each row's coefficient per constraint (a deadline: its model's only).
        least: (D, M) each model's least usage per constraint.
        limits: (D,) the budgets with their tolerance.
        lam: (D,) Lagrangian multipliers: any >= 0 is exact, near the dual's minimum prunes most.
        eps: the tie window.
        known: a value some feasible selection reaches (`CompiledProblem._first_target`).
        pair_cap: the most pairs a sorted merge step may build (those that pass its value test).
    """
    D, M, I = coef.shape
    room = limits[:, None] - (least.sum(axis=1, keepdims=True) - least)  # (D, M): with the others at their least
    fits = (coef <= room[:, :, None]).all(axis=0)
    if M == 1:
        value = np.where(fits[0], fr.value[0], -np.inf)
        top = value.max()
        return None if top == -np.inf else ([int(np.argmax(value >= top - eps))], int(fits.sum()))
    if known == -np.inf:
        return None
    R = np.where(fits, fr.value - (lam @ coef.reshape(D, M * I)).reshape(M, I), -np.inf)  # -inf past a model's rows
    best = R.max(axis=1)
    best_m = best.tolist()
    if min(best_m) == -np.inf:
        return None
    floor = (known - 2 * eps) - float(lam @ limits)  # what R of a whole selection must reach
    flat = (R >= (floor - sum(best_m) + best)[:, None]).ravel().nonzero()[0]  # kept rows, model by model
    model, row = np.divmod(flat, I)
    counts = np.bincount(model, minlength=M).tolist()
    span = [slice(e - c, e) for e, c in zip(accumulate(counts), counts)]
    order = sorted(range(M), key=counts.__getitem__)
    cols = np.concatenate([-R.take(flat)[None], coef.reshape(D, M * I).take(flat, axis=1), fr.value.take(flat)[None]])
    # Columns [-R, U_1 .. U_D, V] per kept row. After merging the models order[:at + 1], what
    # the models to come leave: -R at most their best's sum less the floor, each usage at
    # most the budget less their least.
    least_m, limit_d = least.tolist(), limits.tolist()
    lims = []
    for at in range(1, M):
        later = order[at + 1 :]
        lims.append((sum(best_m[k] for k in later) - floor,
                     [limit - sum(low[k] for k in later) for limit, low in zip(limit_d, least_m)]))
    merged = cols[:, span[order[0]]]
    states = merged.shape[1]
    history = []  # per merge step, each kept state's (parent state, row of the model merged in)
    for (r_lim, u_lim), m in zip(lims, order[1:]):
        part = cols[:, span[m]]
        n, width = merged.shape[1], part.shape[1]
        if n * width <= _ALL_PAIRS:
            parent, slot = np.divmod((merged[0][:, None] + part[0] <= r_lim).ravel().nonzero()[0], width)
            merged = merged.take(parent, axis=1) + part.take(slot, axis=1)
            keep = None
        else:  # rows sorted by -R: each state's partners are a prefix, and only those are built
            by_r = np.argsort(part[0], kind="stable")
            room_r = r_lim - merged[0]
            count = np.searchsorted(part[0].take(by_r), room_r + 1e-9 * (abs(r_lim) + np.abs(room_r)), side="right")
            total = int(count.sum())
            if total > pair_cap:
                return None
            parent = np.repeat(np.arange(n), count)
            slot = by_r.take(np.arange(total) - np.repeat(np.cumsum(count) - count, count))
            merged = merged.take(parent, axis=1) + part.take(slot, axis=1)
            keep = merged[0] <= r_lim  # the test the prefixes widened by a hair
        for d in range(D):
            keep = merged[d + 1] <= u_lim[d] if keep is None else keep & (merged[d + 1] <= u_lim[d])
        if keep is not None:
            merged, parent, slot = merged.compress(keep, axis=1), parent.compress(keep), slot.compress(keep)
        if not len(parent):
            return None
        history.append((parent, slot))
        states += len(parent)
    value = merged[-1]  # not empty: an empty merge step returned above
    state = (value >= value.max() - eps).nonzero()[0]  # the states tied with the best
    rows = [np.empty(0, dtype=np.intp)] * M  # each model's frontier row in each of them
    for (parent, slot), m in zip(history[::-1], order[:0:-1]):
        rows[m] = row[span[m]].take(slot.take(state))
        state = parent.take(state)
    rows[order[0]] = row[span[order[0]]].take(state)
    at = int(np.lexsort(rows[::-1])[0]) if len(state) > 1 else 0
    return [int(r[at]) for r in rows], states
