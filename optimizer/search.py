"""The exact search: every selection whose Lagrangian value reaches a threshold, enumerated
model by model and merged across models, all in array operations.

Layout (`Layout`, built by `optimizer.compiled` and kept while the constraints are the
same kinds): each model's blocks are cut into consecutive *chunks*, and a chunk's *items*
are all combinations of its blocks' choices (in lexicographic order). Level l of the
search is the l-th chunk of every model at once. A partial selection is one row
``[-R_1 .. -R_K, U_1 .. U_D]``: its reduced value R_k = V - lam_k . U under every
multiplier vector of the set from `optimizer.dual` (negated, so that every test reads
"at most") and its usage per constraint.

A pass with threshold T returns every feasible selection x whose value can reach T:

1. **Bounds** (`bounds`, once per solve): per model and multiplier the best reduced value
   of each chunk, summed into the model's best (compositions included); the least usage
   likewise; the Lagrangian bounds UB_k = sum_m best_m + lam_k . limits.
2. **Per model**, level by level: a partial selection survives if, for every k, its R
   plus the best of its remaining chunks plus the other models' best reaches
   T - lam_k . limits, and its usage plus the least its remaining chunks and the other
   models can use fits every budget. Items that fail even after the best prefix are left
   out before a level is expanded, so a level multiplies the states only by the few items
   inside the gap.
3. **Compositions** join their model's set with their measured value; a free selection
   equal to a composition is dropped (its value is the composition's, not the sum).
4. **Across models**: the sets are merged one model at a time under the same tests, now
   with the remaining models' best and least taken over their sets.

Since V(x) <= V(x) + lam . (limits - U(x)) for a feasible x, every feasible selection with
V(x) >= T passes every test: the pass is complete above T. A *beam* pass keeps only the
best partial selections by bound (a heuristic for when no first threshold is known) and
reports the best bound it left out, above which it is still complete.

The arrays of a one-off solve are small, so fixed costs per operation add up: the steps
every solve runs call array methods (`x.argsort()`, `x.nonzero()[0]`, `x.cumsum()`)
rather than NumPy's functions of the same name, whose dispatch costs more than the
operation itself on a few hundred elements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from itertools import accumulate

import numpy as np

from optimizer.dominance import dominated, tied

__all__ = ["BEAM_ITEMS", "Bounds", "Layout", "PassResult", "StateLimit", "bounds", "run_pass"]

BEAM_ITEMS = 6  # items per chunk a beam pass expands
_BLOCK = 1 << 18  # candidate rows built at once (memory stays bounded whatever the limit)
CANDIDATES = 25  # candidates a step may build per state of the limit
_SMALL = 512  # steps with fewer pairs build them all
_PAIRS = 1 << 16  # merges of more pairs sort one side and visit only pairs passing the first test
COLLAPSE = 512  # a step making more states than this drops the dominated ones (`optimizer.dominance`)


class StateLimit(Exception):
    """A pass would hold more than its state limit."""


@dataclass
class Layout:
    """The threshold-, budget- and multiplier-independent arrays of one kind of constraints.
    Leading axes are columns (constraints, multipliers): reductions over them are
    elementwise operations across contiguous slices."""

    value: np.ndarray  # (L, M, I): per chunk item its value (-inf if the item does not exist)
    coef: np.ndarray  # (D, L, M, I): its coefficient per constraint
    valid: np.ndarray  # (L, M, I)
    usage_need: np.ndarray  # (D, L, M, I): an item's usage plus the least of everything else
    least_suffix: np.ndarray  # (D, L, M): least usage of a model's chunks after level l
    others_least: np.ndarray  # (D, M): least usage of the other models
    comp_value: np.ndarray  # (J,)
    comp_coef: np.ndarray  # (D, J)
    comp_need: np.ndarray  # (D, J): a composition's usage plus the other models' least
    comp_model: np.ndarray  # (J,)
    comp_path: np.ndarray  # (J, L)
    comp_worse: np.ndarray  # (J,): worth no more than its additive prediction (breaks dominance)
    floor: float  # below every selection's value
    item_dominated: dict[tuple[int, int, int], np.ndarray | None] = field(default_factory=dict)  # (level, model, k) -> (I,)

    def dominated_items(self, level: int, m: int, k: int, tie: float) -> np.ndarray | None:
        """(I,) bool: the items of model m's chunk at `level` that k smaller items dominate,
        None if none (budget-independent, so kept for every later solve of these constraints)."""
        key = (level, m, k)
        if key not in self.item_dominated:
            n = int(np.count_nonzero(self.valid[level, m]))  # the chunk's items are a prefix, then padding
            value = self.value[level, m, :n]
            gone = np.zeros(self.valid.shape[2], dtype=bool)
            if tied(value, tie):  # else `dominated` drops nothing: skip its set-up
                can = np.ones(n, dtype=bool)
                worse = self.comp_worse & (self.comp_model == m)
                can[self.comp_path[worse, level]] = False
                gone[:n] = dominated(value, self.coef[:, level, m, :n], k, tie, can)
            self.item_dominated[key] = gone if gone.any() else None
        return self.item_dominated[key]


def layout(
    value: np.ndarray, coef: np.ndarray, valid: np.ndarray, comp_value: np.ndarray, comp_coef: np.ndarray,
    comp_model: np.ndarray, comp_path: np.ndarray,
) -> Layout:
    """A `Layout` from the items' values (L, M, I), coefficients (D, L, M, I) and the
    compositions' (J,), (D, J)."""
    least = np.where(valid, coef, np.inf).min(axis=3)  # (D, L, M)
    cum = least.cumsum(axis=1)
    model_least = cum[:, -1]  # (D, M)
    others = model_least.sum(axis=1, keepdims=True) - model_least
    low = np.where(valid, value, np.inf).min(axis=2).sum(axis=0)  # (M,)
    if len(comp_model):
        np.minimum.at(low, comp_model, comp_value)
    floor = float(low.sum())
    suffix = cum[:, -1:] - cum
    L = value.shape[0]
    free = value[np.arange(L)[None, :], comp_model[:, None], comp_path].sum(axis=1) if len(comp_model) else comp_value
    return Layout(
        value=value,
        coef=coef,
        valid=valid,
        usage_need=coef + (cum - least + suffix + others[:, None, :])[..., None],
        least_suffix=suffix,
        others_least=others,
        comp_value=comp_value,
        comp_coef=comp_coef,
        comp_need=comp_coef + others[:, comp_model],
        comp_model=comp_model,
        comp_path=comp_path,
        comp_worse=comp_value <= free,
        floor=floor - 1.0 - abs(floor),
    )


@dataclass
class Bounds:
    """What every pass of one solve shares (independent of the threshold)."""

    lay: Layout
    lams: np.ndarray  # (K, D)
    limits: np.ndarray  # (D,)
    Z: np.ndarray  # (K + D, L, M, I): per item [-R_k..., U_j...]
    th: np.ndarray  # (K + D, L, M): after level l a row must be <= th (R rows: th - T)
    item_slack: np.ndarray  # (L, M, I): T above which an item cannot pass even after the best prefix
    comp_Z: np.ndarray  # (K + D, J)
    comp_slack: np.ndarray  # (J,)
    need: np.ndarray  # (K,): lam_k . limits
    upper: np.ndarray  # (K,): the Lagrangian bounds UB_k

    @property
    def upper_bound(self) -> float:
        return float(self.upper.min())


def bounds(lay: Layout, lams: np.ndarray, limits: np.ndarray) -> Bounds:
    """The pass-independent arrays of one solve under multipliers `lams` (K, D) and
    `limits` (D,) (the budgets, with their tolerance)."""
    K, D = lams.shape
    shape = lay.value.shape
    R = (lams @ lay.coef.reshape(D, lay.value.size)).reshape(K, *shape)  # (K, L, M, I)
    np.subtract(lay.value, R, out=R)  # -inf where invalid
    level_best = R.max(axis=3)  # (K, L, M)
    cum = level_best.cumsum(axis=1)
    model_best = cum[:, -1].copy()  # (K, M)
    comp_fits = (lay.comp_need <= limits[:, None]).all(axis=0)
    comp_R = np.where(comp_fits, lay.comp_value - lams @ lay.comp_coef, -np.inf)  # (K, J)
    if len(lay.comp_model):  # only compositions that fit with the other models at their least
        np.maximum.at(model_best.T, lay.comp_model, comp_R.T)
    need = lams @ limits
    total = model_best.sum(axis=1)
    # After level l: R >= T - need - (other models' best) - (best of the model's later chunks).
    free = (need + total)[:, None] - model_best  # (K, M)
    th = np.concatenate([free[:, None, :] + cum[:, -1:] - cum, limits[:, None, None] - lay.least_suffix - lay.others_least[:, None, :]])
    fits = (lay.usage_need <= limits[:, None, None, None]).all(axis=0)
    slack = (R + (free[:, None, :] + cum[:, -1:] - level_best)[..., None]).min(axis=0)
    comp_slack = (comp_R + free[:, lay.comp_model]).min(axis=0) if len(lay.comp_model) else np.zeros(0)
    return Bounds(
        lay=lay,
        lams=lams,
        limits=limits,
        Z=np.concatenate([-R, lay.coef]),
        th=th,
        item_slack=np.where(fits, slack, -np.inf),
        comp_Z=np.concatenate([np.where(comp_fits, -comp_R, np.inf), lay.comp_coef]),
        comp_slack=np.where(comp_fits, comp_slack, -np.inf),
        need=need,
        upper=total + need,
    )


@dataclass
class PassResult:
    """The feasible selections a pass found: `values` (N,), `choose` (N, M) the index of each
    model's part in `paths[m]` (its chunk items per level, (n_m, L)); `dropped` is the best
    bound among the states a beam pass left out (-inf when it left out none)."""

    values: np.ndarray
    choose: np.ndarray
    paths: list[np.ndarray]
    states: int
    dropped: float = -np.inf


@lru_cache(maxsize=64)
def _grid(L: int, M: int) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (L, 1, 1) and (1, M, 1) that pick items per (level, model)."""
    return np.arange(L)[:, None, None], np.arange(M)[None, :, None]


def _keep_best(slack: np.ndarray, model: np.ndarray, width: int) -> np.ndarray:
    """Indices (ascending) of the `width` states with the most slack per model (model-sorted input)."""
    order = np.lexsort((-slack, model))
    first = np.searchsorted(model[order], model[order])
    return np.sort(order[np.arange(len(order)) - first < width])


def _expand(
    rows: np.ndarray, items: np.ndarray, th: np.ndarray, model: np.ndarray, limit: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(parent, slot, rows) of every sum rows[:, p] + items[:, model[p], s] <= th[:, model[p]],
    over all parents p and slots s. rows (cols, N), items (cols, M, width), th (cols, M).

    Built a block of parents at a time, testing the first column on every pair and building
    only the pairs that pass it, so memory stays within a block's candidates plus `limit`
    kept rows. Raises StateLimit past `CANDIDATES` x `limit` pairs or `limit` kept rows."""
    n, width = rows.shape[1], items.shape[2]
    if n * width > CANDIDATES * limit:
        raise StateLimit
    if n * width <= _SMALL:  # few pairs: build them all
        cand = rows[:, :, None] + items.take(model, axis=1)
        flat = (cand <= th.take(model, axis=1)[:, :, None]).all(axis=0).ravel().nonzero()[0]
        parent, slot = np.divmod(flat, width)
        return parent, slot, cand.reshape(len(cand), -1).take(flat, axis=1)
    step = max(1, _BLOCK // max(width, 1))
    out, kept = [], 0
    flat_items = items.reshape(len(items), -1)  # (cols, M * width)
    for at in range(0, n, step):
        part = model[at : at + step]
        flat = (rows[0, at : at + step, None] + items[0].take(part, axis=0) <= th[0].take(part)[:, None]).ravel().nonzero()[0]
        parent, slot = np.divmod(flat, width)
        owner = part.take(parent)
        cand = rows.take(parent + at, axis=1)
        cand += flat_items.take(owner * width + slot, axis=1)
        keep = (cand <= th.take(owner, axis=1)).all(axis=0)
        out.append((parent.compress(keep) + at, slot.compress(keep), cand.compress(keep, axis=1)))
        kept += len(out[-1][0])
        if kept > limit:
            raise StateLimit
    if len(out) == 1:
        return out[0]
    parents, slots, found = zip(*out)
    return np.concatenate(parents), np.concatenate(slots), np.concatenate(found, axis=1)


def _join(merged: np.ndarray, rows: np.ndarray, th: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(parent, slot, sums) of every merged[:, p] + rows[:, s] <= th, building only the pairs
    that pass the first column's test: for small inputs found among all pairs, for larger
    ones as the prefix of `rows` sorted by that column, a block of parents at a time."""
    n, m = merged.shape[1], rows.shape[1]
    if n * m <= _SMALL:  # few pairs: build them all
        cand = merged[:, :, None] + rows[:, None, :]
        flat = (cand <= th[:, None, None]).all(axis=0).ravel().nonzero()[0]
        parent, slot = np.divmod(flat, m)
        return parent, slot, cand.reshape(len(cand), -1).take(flat, axis=1)
    if n * m <= _PAIRS:  # test the first column on every pair, build only the pairs that pass
        parent, slot = np.divmod((merged[0][:, None] + rows[0] <= th[0]).ravel().nonzero()[0], m)
        cand = merged.take(parent, axis=1)
        cand += rows.take(slot, axis=1)
        keep = (cand <= th[:, None]).all(axis=0)
        return parent.compress(keep), slot.compress(keep), cand.compress(keep, axis=1)
    order = np.argsort(rows[0], kind="stable")
    rows = rows.take(order, axis=1)
    count = np.searchsorted(rows[0], th[0] - merged[0], side="right")
    ends = np.cumsum(count)
    if ends[-1] > CANDIDATES * limit:
        raise StateLimit
    out, kept = [], 0
    lo = 0
    while lo < n:  # parents [lo, hi) make at most _BLOCK candidates (or one parent)
        hi = max(lo + 1, int(np.searchsorted(ends, ends[lo] - count[lo] + _BLOCK, side="right")))
        part = count[lo:hi]
        parent = np.repeat(np.arange(lo, hi), part)
        slot = np.arange(len(parent)) - np.repeat(np.cumsum(part) - part, part)
        cand = merged.take(parent, axis=1)
        cand += rows.take(slot, axis=1)
        keep = (cand <= th[:, None]).all(axis=0)
        out.append((parent.compress(keep), order.take(slot.compress(keep)), cand.compress(keep, axis=1)))
        kept += len(out[-1][0])
        if kept > limit:
            raise StateLimit
        lo = hi
    if len(out) == 1:
        return out[0]
    parents, slots, found = zip(*out)
    return np.concatenate(parents), np.concatenate(slots), np.concatenate(found, axis=1)


def _value(b: Bounds, rows: np.ndarray) -> np.ndarray:
    """The values of states given as rows [-R_1 .. -R_K, U_1 .. U_D]: R_1 + lam_1 . U."""
    return b.lams[0] @ rows[len(b.lams) :] - rows[0]


def _dominated_states(b: Bounds, rows: np.ndarray, model: np.ndarray, k: int, tie: float, can: np.ndarray | None) -> np.ndarray:
    """(N,) bool: the states (sorted by model, lexicographic within one) that k smaller
    states of their model dominate."""
    value, usage = _value(b, rows), rows[len(b.lams) :]
    out = np.zeros(len(model), dtype=bool)
    if not tied(value, tie):
        return out
    bounds_ = np.flatnonzero(np.diff(model)) + 1
    for lo, hi in zip([0, *bounds_.tolist()], [*bounds_.tolist(), len(model)]):
        if hi - lo > k:
            out[lo:hi] = dominated(value[lo:hi], usage[:, lo:hi], k, tie, None if can is None else can[lo:hi])
    return out


def _model_sets(
    b: Bounds, target: float, limit: int, beam: int | None, top_k: int | None = None, tie: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, float]:
    """Every model's partial selections that pass, level by level; then its compositions.
    With `top_k` (not in a beam pass), a level making more than `COLLAPSE` states drops the
    items and states that top_k others dominate. Returns (rows (cols, N), model (N,),
    path (N, L)) sorted by model, the state count and the best bound among the states a
    beam pass left out."""
    K = len(b.lams)
    lay = b.lay
    L, M, _ = lay.valid.shape
    useful = b.item_slack >= target
    dropped = -np.inf
    if beam is None:
        width = int(useful.sum(axis=2).max())
        order = (~useful).argsort(axis=2, kind="stable")[:, :, :width]  # (L, M, width): item ids
    else:  # a heuristic pass expands only the few items with the best bounds
        width = min(int(useful.sum(axis=2).max()), BEAM_ITEMS)
        order = np.argsort(-b.item_slack, axis=2, kind="stable")[:, :, :width]
        skipped = useful.copy()
        np.put_along_axis(skipped, order, False, axis=2)
        if skipped.any():
            dropped = float(b.item_slack[skipped].max())
    levels, models = _grid(L, M)
    Z = b.Z[:, levels, models, order]  # (cols, L, M, width)
    Z[0] = np.where(useful[levels, models, order], Z[0], np.inf)  # padding fails
    th = b.th.copy()
    th[:K] -= target

    rows = np.zeros((len(th), M))
    model = np.arange(M)
    history: list[tuple[np.ndarray, np.ndarray]] = []
    states = M
    collapse = beam is None and top_k is not None
    worse = np.flatnonzero(lay.comp_worse) if collapse and len(lay.comp_model) else np.zeros(0, dtype=np.intp)
    # Per state, which worse-than-predicted compositions share its prefix (it cannot dominate).
    match = model[:, None] == lay.comp_model[worse][None] if len(worse) else None
    for level in range(L):
        if width == 0:
            rows, model = rows[:, :0], model[:0]
            history.append((model, model))
            continue
        if collapse and len(model) * width > COLLAPSE:
            for m in np.bincount(model, minlength=M).nonzero()[0].tolist():
                gone = lay.dominated_items(level, m, top_k, tie)  # type: ignore[arg-type]
                if gone is not None:
                    Z[0, level, m, gone[order[level, m]]] = np.inf
        parent, slot, rows = _expand(rows, Z[:, level], th[:, level], model, limit - states)
        model = model.take(parent)
        if match is not None:
            match = match[parent] & (order[level, model, slot][:, None] == lay.comp_path[worse, level][None])
        if collapse and len(model) > COLLAPSE:
            keep = ~_dominated_states(b, rows, model, top_k, tie, None if match is None else ~match.any(axis=1))  # type: ignore[arg-type]
            parent, slot, rows, model = parent.compress(keep), slot.compress(keep), rows.compress(keep, axis=1), model.compress(keep)
            match = None if match is None else match[keep]
        if beam is not None and len(model) > beam and np.bincount(model).max() > beam:
            slack = (th[:K, level, model] - rows[:K]).min(axis=0)
            kept = _keep_best(slack, model, beam)
            lost = np.ones(len(model), dtype=bool)
            lost[kept] = False
            dropped = max(dropped, float(slack[lost].max()) + target)
            parent, slot, rows, model = parent[kept], slot[kept], rows[:, kept], model[kept]
        history.append((parent, slot))
        states += len(model)
        if states > limit:
            raise StateLimit
    path = np.empty((len(model), L), dtype=np.intp)
    at = np.arange(len(model))
    for level in range(L - 1, -1, -1):
        parent, slot = history[level]
        path[:, level] = order[level, model, slot[at]]
        at = parent[at]

    if len(lay.comp_model):
        if len(model):  # a free selection equal to a composition has the composition's value
            same = (path[:, None, :] == lay.comp_path[None]).all(axis=2) & (model[:, None] == lay.comp_model[None])
            free = ~same.any(axis=1)
            rows, model, path = rows[:, free], model[free], path[free]
        joins = b.comp_slack >= target
        rows = np.concatenate([rows, b.comp_Z[:, joins]], axis=1)
        model = np.concatenate([model, lay.comp_model[joins]])
        path = np.concatenate([path, lay.comp_path[joins]])
        by_model = np.argsort(model, kind="stable")
        rows, model, path = rows[:, by_model], model[by_model], path[by_model]
        states += int(joins.sum())
    return rows, model, path, states, dropped


def run_pass(
    b: Bounds, target: float, limit: int, beam: int | None = None, top_k: int | None = None, tie: float = 0.0
) -> PassResult:
    """Every feasible selection whose Lagrangian value reaches `target` for every multiplier
    vector (so every feasible selection with value >= target), merged across models.

    With `beam`, at most that many partial selections per model (and `beam` x models in
    the merge) are kept, those with the best bounds: a heuristic pass, still complete
    above `PassResult.dropped`. With `top_k`, a step that makes more than `COLLAPSE`
    states drops those that top_k lexicographically smaller ones dominate (values equal
    to `tie`; `optimizer.dominance`): the pass still holds the top_k best above `target`,
    ties resolved to the smallest. Values are recovered as R_1 + lam_1 . U.

    Raises:
        StateLimit: when more than `limit` states would be held.
    """
    K = len(b.lams)
    L, M, _ = b.lay.valid.shape
    rows, model, path, states, dropped = _model_sets(b, target, limit, beam, top_k, tie)
    if M == 1:  # the last level's test was the whole problem's
        return PassResult(_value(b, rows), np.arange(rows.shape[1])[:, None], [path], states, dropped)
    counts = np.bincount(model, minlength=M)
    if (counts == 0).any():
        return PassResult(np.zeros(0), np.zeros((0, M), dtype=np.intp), [], states, dropped)
    starts = list(accumulate(counts.tolist(), initial=0))
    sets = [rows[:, starts[m] : starts[m + 1]] for m in range(M)]
    paths = [path[starts[m] : starts[m + 1]] for m in range(M)]
    # The remaining models' best and least over their sets (tighter than over all selections).
    edge = np.minimum.reduceat(rows, starts[:-1], axis=1).T  # (M, cols): -best R, least usage
    # Smaller sets first: the partial merges stay small. After merging the first `at` sets a
    # row must leave room for the best and least of the sets still to come.
    order = counts.argsort(kind="stable")
    edge = edge[order]
    rest = np.concatenate([edge[::-1].cumsum(axis=0)[::-1], np.zeros((1, len(rows)))])[2:]
    ths = np.concatenate([(b.need - target) - rest[:, :K], b.limits - rest[:, K:]], axis=1)  # (M - 1, cols)
    merged = sets[order[0]]
    history = []
    collapse = beam is None and top_k is not None
    for at in range(1, M):
        parent, slot, merged = _join(merged, sets[order[at]], ths[at - 1], limit - states)
        if collapse and len(parent) > COLLAPSE and tied(value := _value(b, merged), tie):
            parts = _choose(history + [(parent, slot)], len(parent))  # (N, at + 1): row in each merged set
            keys = [np.argsort(np.lexsort(paths[order[c]].T[::-1]))[parts[:, c]] for c in np.argsort(order[: at + 1])]
            lex = np.lexsort(keys[::-1])  # lexicographic order of the merged selections (models in problem order)
            keep = np.ones(len(parent), dtype=bool)
            keep[lex[dominated(value[lex], merged[K:, lex], top_k, tie)]] = False  # type: ignore[arg-type]
            parent, slot, merged = parent.compress(keep), slot.compress(keep), merged.compress(keep, axis=1)
        if beam is not None and at < M - 1 and len(parent) > beam * M:
            slack = (ths[at - 1, :K, None] - merged[:K]).min(axis=0)
            kept = np.argpartition(-slack, beam * M)[: beam * M]
            lost = np.ones(len(parent), dtype=bool)
            lost[kept] = False
            dropped = max(dropped, float(slack[lost].max()) + target)
            parent, slot, merged = parent[kept], slot[kept], merged[:, kept]
        history.append((parent, slot))
        states += len(parent)
        if states > limit:
            raise StateLimit
        if not len(parent):
            return PassResult(np.zeros(0), np.zeros((0, M), dtype=np.intp), paths, states, dropped)
    choose = np.empty((merged.shape[1], M), dtype=np.intp)
    choose[:, order] = _choose(history, merged.shape[1])
    return PassResult(_value(b, merged), choose, paths, states, dropped)


def _choose(history: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """(n, len(history) + 1): per merged state its row in each merged set, in merge order."""
    out = np.empty((n, len(history) + 1), dtype=np.intp)
    at_row = np.arange(n)
    for at in range(len(history), 0, -1):
        parent, slot = history[at - 1]
        out[:, at] = slot[at_row]
        at_row = parent[at_row]
    out[:, 0] = at_row
    return out
