"""The exact search: every selection whose Lagrangian value reaches a threshold, enumerated
model by model and merged across models, all in array operations.

Layout (built once per problem by `optimizer.compiled`): each model's blocks are cut into
consecutive *chunks* of a few blocks, and a chunk's *items* are all combinations of its
blocks' choices (in lexicographic order). Level l of the search is the l-th chunk of every
model at once. Per item the search carries one row
``[-R_1 .. -R_K, U_1 .. U_D, V]``: its reduced value R_k = V - lam_k . U under every
multiplier vector of the set from `optimizer.dual` (negated, so that every test reads
"at most"), its coefficient per constraint and its value.

A pass with threshold T returns every feasible selection x whose value can reach T:

1. **Bounds** (`bounds`, once per solve): per model and multiplier the best reduced value
   of each chunk, summed into the model's best (compositions included), and the least
   usage; the Lagrangian bounds UB_k = sum_m best_m + lam_k . limits.
2. **Per model**, level by level: a partial selection survives if, for every k, its R
   plus the best of its remaining chunks plus the other models' best reaches
   T - lam_k . limits, and its usage plus the least its remaining chunks and the other
   models can use fits every budget. Items that fail even after the best prefix are
   dropped before a level is expanded, so a level multiplies the states only by the few
   items inside the gap.
3. **Compositions** join their model's set with their measured value; a free selection
   equal to a composition is dropped (its value is the composition's, not the sum).
4. **Across models**: the sets are merged one model at a time under the same tests, now
   with the remaining models' best and least taken over their sets.

Since V(x) <= V(x) + lam . (limits - U(x)) for a feasible x, every feasible selection with
V(x) >= T passes every test: the pass is complete above T. A *beam* pass keeps only the
best partial selections by bound (a heuristic that finds near-optimal selections cheaply)
and reports the best bound it dropped, above which it is still complete.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Bounds", "PassResult", "StateLimit", "bounds", "run_pass"]

BEAM_ITEMS = 6  # items per chunk a heuristic (beam) pass expands


class StateLimit(Exception):
    """A pass would hold more than its state limit."""


@dataclass
class Bounds:
    """What every pass of one solve shares (independent of the threshold)."""

    n_lams: int  # K
    Z: np.ndarray  # (L, M, I, cols): per item [-R_k..., U_j..., V], cols = K + D + 1
    valid: np.ndarray  # (L, M, I)
    th: np.ndarray  # (L, M, cols): a partial selection's row after level l must be <= th - T (R columns)
    item_slack: np.ndarray  # (L, M, I): T above which an item cannot pass even after the best prefix
    comp_Z: np.ndarray  # (J, cols)
    comp_model: np.ndarray  # (J,)
    comp_path: np.ndarray  # (J, L)
    comp_slack: np.ndarray  # (J,): T above which a composition cannot pass
    need: np.ndarray  # (K,): lam_k . limits (the models' R must sum to T minus this)
    limits: np.ndarray  # (D,)
    upper: np.ndarray  # (K,): the Lagrangian bounds UB_k

    @property
    def upper_bound(self) -> float:
        return float(self.upper.min())


@dataclass
class PassResult:
    """The feasible selections a pass found: `values` (N,), `choose` (N, M) the index of each
    model's part in `paths[m]` (its chunk items per level, (n_m, L)); `dropped` is the best
    bound among the states a beam pass dropped (-inf when it dropped none)."""

    values: np.ndarray
    choose: np.ndarray
    paths: list[np.ndarray]
    states: int
    dropped: float = -np.inf


def bounds(
    lams: np.ndarray,
    limits: np.ndarray,
    items: np.ndarray,
    valid: np.ndarray,
    comp_items: np.ndarray,
    comp_model: np.ndarray,
    comp_path: np.ndarray,
) -> Bounds:
    """The threshold-independent arrays of one solve.

    Args:
        lams: (K, D) multiplier vectors.
        limits: (D,) budgets (already with their tolerance).
        items: (L, M, I, 1 + D) per chunk item its value and coefficients (value -inf if invalid).
        valid: (L, M, I) which items exist.
        comp_items: (J, 1 + D) per composition its (measured) value and coefficients.
        comp_model, comp_path: per composition its model and chunk item per level.
    """
    K, D = lams.shape
    L, M, _ = valid.shape
    value, coef = items[..., :1], items[..., 1:]
    R = value - coef @ lams.T  # (L, M, I, K); -inf where invalid
    level_best = R.max(axis=2)  # (L, M, K)
    cum = np.cumsum(level_best, axis=0)
    best_prefix, best_suffix = cum - level_best, cum[-1] - cum
    model_best = cum[-1].copy()  # (M, K)
    comp_R = comp_items[:, :1] - comp_items[:, 1:] @ lams.T  # (J, K)
    if len(comp_model):
        np.maximum.at(model_best, comp_model, comp_R)
    least = np.where(valid[..., None], coef, np.inf).min(axis=2)  # (L, M, D)
    lcum = np.cumsum(least, axis=0)
    least_prefix, least_suffix = lcum - least, lcum[-1] - lcum
    model_least = lcum[-1]  # (M, D)
    need = lams @ limits
    others = model_best.sum(axis=0) - model_best  # (M, K)
    others_u = model_least.sum(axis=0) - model_least  # (M, D)
    # Rows after level l: -R <= -(T - need - others - suffix); U <= limits - suffix - others.
    th = np.concatenate(
        [need + others + best_suffix, limits - least_suffix - others_u, np.full((L, M, 1), np.inf)], axis=-1
    )
    Z = np.concatenate([-R, coef, value], axis=-1)
    fits = (coef + least_prefix[:, :, None, :] <= th[:, :, None, K:-1]).all(axis=3) & valid
    item_slack = np.where(fits, (th[:, :, None, :K] - Z[..., :K] + best_prefix[:, :, None, :]).min(axis=3), -np.inf)
    comp_Z = np.concatenate([-comp_R, comp_items[:, 1:], comp_items[:, :1]], axis=1)
    comp_th = th[L - 1, comp_model]  # (J, cols)
    comp_fits = (comp_Z[:, K:-1] <= comp_th[:, K:-1]).all(axis=1)
    comp_slack = np.where(comp_fits, (comp_th[:, :K] - comp_Z[:, :K]).min(axis=1), -np.inf)
    return Bounds(
        n_lams=K,
        Z=Z,
        valid=valid,
        th=th,
        item_slack=item_slack,
        comp_Z=comp_Z,
        comp_model=comp_model,
        comp_path=comp_path,
        comp_slack=comp_slack,
        need=need,
        limits=limits,
        upper=model_best.sum(axis=0) + need,
    )


def _keep_best(slack: np.ndarray, model: np.ndarray, width: int) -> np.ndarray:
    """Indices (ascending) of the `width` states with the most slack per model (model-sorted input)."""
    order = np.lexsort((-slack, model))
    first = np.searchsorted(model[order], model[order])
    return np.sort(order[np.arange(len(order)) - first < width])


def _model_sets(
    b: Bounds, target: float, limit: int, beam: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, float]:
    """Every model's partial selections that pass, level by level; then its compositions.
    Returns (rows (N, cols), model (N,), path (N, L)) sorted by model, the state count and
    the best bound among states the beam dropped."""
    K = b.n_lams
    L, M, _ = b.valid.shape
    useful = b.item_slack >= target
    width = int(useful.sum(axis=2).max())
    if beam is None:
        order = np.argsort(~useful, axis=2, kind="stable")[:, :, :width]  # (L, M, width): item ids
    else:  # a heuristic pass expands only the few items with the best bounds
        width = min(width, BEAM_ITEMS)
        order = np.argsort(-b.item_slack, axis=2, kind="stable")[:, :, :width]
    Z = np.take_along_axis(b.Z, order[..., None], axis=2)
    expanded = np.take_along_axis(useful, order, axis=2)
    Z[..., 0] = np.where(expanded, Z[..., 0], np.inf)  # padding fails
    th = b.th.copy()
    th[..., :K] -= target
    dropped = -np.inf
    if beam is not None and useful.sum() > expanded.sum():  # the best bound of an item left out
        skipped = useful.copy()
        np.put_along_axis(skipped, order, False, axis=2)
        dropped = float(b.item_slack[skipped].max())

    rows = np.zeros((M, b.Z.shape[-1]))
    model = np.arange(M)
    history: list[tuple[np.ndarray, np.ndarray]] = []
    states = M
    for level in range(L):
        if len(model) * width > limit:
            raise StateLimit
        cand = rows[:, None, :] + Z[level, model]  # (N, width, cols)
        keep = (cand <= th[level, model][:, None, :]).all(axis=2)
        parent, slot = np.nonzero(keep)
        item = order[level, model[parent], slot]
        rows = cand[parent, slot]
        model = model[parent]
        if beam is not None and len(model) > beam and np.bincount(model).max() > beam:
            slack = (th[level, model, :K] - rows[:, :K]).min(axis=1)
            kept = _keep_best(slack, model, beam)
            lost = np.ones(len(model), dtype=bool)
            lost[kept] = False
            dropped = max(dropped, float(slack[lost].max()) + target)
            parent, item, rows, model = parent[kept], item[kept], rows[kept], model[kept]
        history.append((parent, item))
        states += len(model)
        if states > limit:
            raise StateLimit
    path = np.empty((len(model), L), dtype=np.intp)
    at = np.arange(len(model))
    for level in range(L - 1, -1, -1):
        parent, item = history[level]
        path[:, level] = item[at]
        at = parent[at]

    if len(b.comp_model):
        if len(model):  # a free selection equal to a composition has the composition's value
            same = (path[:, None, :] == b.comp_path[None]).all(axis=2) & (model[:, None] == b.comp_model[None])
            free = ~same.any(axis=1)
            rows, model, path = rows[free], model[free], path[free]
        joins = b.comp_slack >= target
        rows = np.concatenate([rows, b.comp_Z[joins]])
        model = np.concatenate([model, b.comp_model[joins]])
        path = np.concatenate([path, b.comp_path[joins]])
        by_model = np.argsort(model, kind="stable")
        rows, model, path = rows[by_model], model[by_model], path[by_model]
        states += int(joins.sum())
    return rows, model, path, states, dropped


def run_pass(b: Bounds, target: float, limit: int, beam: int | None = None) -> PassResult:
    """Every feasible selection whose Lagrangian value reaches `target` for every multiplier
    vector (so every feasible selection with value >= target), merged across models.

    With `beam`, at most that many partial selections per model (and `beam` x models in
    the merge) are kept, those with the best bounds: a heuristic pass, still complete
    above `PassResult.dropped`.

    Raises:
        StateLimit: when more than `limit` states would be held.
    """
    K = b.n_lams
    L, M, _ = b.valid.shape
    rows, model, path, states, dropped = _model_sets(b, target, limit, beam)
    if M == 1:  # the last level's test was the whole problem's
        return PassResult(rows[:, -1], np.arange(len(rows))[:, None], [path], states, dropped)
    counts = np.bincount(model, minlength=M)
    if (counts == 0).any():
        return PassResult(np.zeros(0), np.zeros((0, M), dtype=np.intp), [], states, dropped)
    cuts = np.cumsum(counts)[:-1]
    sets = np.split(rows, cuts)
    paths = np.split(path, cuts)
    # The remaining models' best and least over their sets (tighter than over all selections).
    best = np.array([-s[:, :K].min(axis=0) for s in sets])  # (M, K)
    least = np.array([s[:, K:-1].min(axis=0) for s in sets])  # (M, D)
    rest_r = np.cumsum(best[::-1], axis=0)[::-1]
    rest_u = np.cumsum(least[::-1], axis=0)[::-1]
    merged = sets[0]
    choose = np.arange(len(merged))[:, None]
    for m in range(1, M):
        after_r = rest_r[m + 1] if m + 1 < M else 0.0
        after_u = rest_u[m + 1] if m + 1 < M else 0.0
        th = np.concatenate([-(target - b.need - after_r), b.limits - after_u, [np.inf]])
        if len(merged) * len(sets[m]) > limit:
            raise StateLimit
        cand = merged[:, None, :] + sets[m][None]
        parent, slot = np.nonzero((cand <= th).all(axis=2))
        merged = cand[parent, slot]
        if beam is not None and m < M - 1 and len(merged) > beam * M:
            slack = (th[:K] - merged[:, :K]).min(axis=1)
            kept = np.argpartition(-slack, beam * M)[: beam * M]
            lost = np.ones(len(merged), dtype=bool)
            lost[kept] = False
            dropped = max(dropped, float(slack[lost].max()) + target)
            parent, slot, merged = parent[kept], slot[kept], merged[kept]
        choose = np.concatenate([choose[parent], slot[:, None]], axis=1)
        states += len(merged)
        if states > limit:
            raise StateLimit
        if not len(merged):
            break
    return PassResult(merged[:, -1], choose, paths, states, dropped)
