"""Calibrated accuracy drops: fix the additive model's bias without giving up additivity.

Single-swap drops underestimate what a composition loses (errors of pruned blocks
compound), so teacher accuracy minus summed drops is optimistic exactly where the
optimizer looks. We measure K compositions spread over the FLOPs range and fit

    teacher - measured  ~=  sum_b  w_b * drop_b(choice_b)

so the calibrated drop of every (b, c) is w_b * drop_b(c): still one number per choice,
still summed, so the optimizer stays exact. The fit is a single scale w_b = s (least
squares through the origin) unless a richer fit is measurably better in leave-one-out
cross-validation on the K compositions:
- "scale+flops": s * drop_b(c) + f * pruned_b(c), where pruned_b(c) is the share of the
  model's FLOPs the choice removes. Single-swap drops can be ~0 or negative when the
  retrained descendants beat an under-trained original in isolation (seen on MobileNetV2),
  yet compositions still lose accuracy as they shrink; the FLOPs term carries that.
- "ridge": per-block weights shrunk toward s.
If none beats the raw drops (w_b = 1) in that cross-validation, the raw drops are kept
(method "identity"): a correction must earn its place. The result is reported on
held-out compositions (the additivity check's random ones), raw against calibrated.
Everything here except `measure_calibration` is pure NumPy/SciPy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import nnls

from profiling.accuracy import (
    ORIGINAL,
    AdditivityPoint,
    AdditivityReport,
    ScalableLike,
    Selection,
    SelectionEvaluator,
    sorted_choices,
    summed_drop,
)

DEFAULT_K = 16
# Ridge strengths tried, as multiples of the mean diagonal of X^T X.
DEFAULT_RIDGE_LAMBDAS: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
# Per-block weights are used only when their CV error is below this fraction of the scale's,
# and only with at least RIDGE_MIN_POINTS fit compositions (fewer cannot tell blocks apart).
RIDGE_MIN_GAIN = 0.9
RIDGE_MIN_POINTS = 8

Drops = Mapping[str, Mapping[str, float]]


@dataclass(frozen=True)
class Calibration:
    """A fitted correction and its figures (accuracy fractions, x100 for points).

    method: "scale" (every block weight = scale), "scale+flops" (weights = scale plus
    `flops_weight` times each choice's pruned FLOPs share), "ridge" (per-block weights) or
    "identity" (weights 1: the fitted scale did not beat the raw drops; `scale` still
    reports the fit). cv_mae_*: leave-one-out MAE on the K fit compositions (cv_mae_raw:
    the raw drops' MAE there, which has nothing to fit). heldout: raw and calibrated
    MAE / max error on the held-out compositions (AdditivityReport dicts).
    """

    method: str
    scale: float
    block_weights: dict[str, float]
    k: int
    ridge_lambda: float | None
    cv_mae_scale: float | None
    cv_mae_ridge: float | None
    cv_mae_raw: float | None
    heldout_raw: AdditivityReport
    heldout_calibrated: AdditivityReport
    fit_points: list[AdditivityPoint] = field(default_factory=list)
    flops_weight: float = 0.0
    cv_mae_flops: float | None = None

    def apply(self, drops: Drops, flops: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, dict[str, float]]:
        """The calibrated drops of every choice (`flops` per block and choice is needed
        when `flops_weight` is not 0)."""
        if self.flops_weight and flops is None:
            raise ValueError(f"calibration {self.method!r} has a FLOPs term: pass the per-choice FLOPs")
        pruned = pruned_share(flops) if self.flops_weight else None
        return apply_calibration(drops, self.block_weights, self.flops_weight, pruned)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "scale": self.scale,
            "block_weights": dict(self.block_weights),
            "k": self.k,
            "ridge_lambda": self.ridge_lambda,
            "cv_mae_scale": self.cv_mae_scale,
            "cv_mae_ridge": self.cv_mae_ridge,
            "cv_mae_raw": self.cv_mae_raw,
            "flops_weight": self.flops_weight,
            "cv_mae_flops": self.cv_mae_flops,
            "heldout_n": self.heldout_raw.n,
            "heldout_mae_raw": self.heldout_raw.mae,
            "heldout_max_raw": self.heldout_raw.max_error,
            "heldout_mae_calibrated": self.heldout_calibrated.mae,
            "heldout_max_calibrated": self.heldout_calibrated.max_error,
            "heldout_raw": self.heldout_raw.to_dict(),
            "heldout_calibrated": self.heldout_calibrated.to_dict(),
            "fit_points": [p.to_dict() for p in self.fit_points],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        return cls(
            method=str(d["method"]),
            scale=float(d["scale"]),
            block_weights={k: float(v) for k, v in d["block_weights"].items()},
            k=int(d["k"]),
            ridge_lambda=None if d.get("ridge_lambda") is None else float(d["ridge_lambda"]),
            cv_mae_scale=None if d.get("cv_mae_scale") is None else float(d["cv_mae_scale"]),
            cv_mae_ridge=None if d.get("cv_mae_ridge") is None else float(d["cv_mae_ridge"]),
            cv_mae_raw=None if d.get("cv_mae_raw") is None else float(d["cv_mae_raw"]),
            heldout_raw=AdditivityReport.from_dict(d["heldout_raw"]),
            heldout_calibrated=AdditivityReport.from_dict(d["heldout_calibrated"]),
            fit_points=[AdditivityPoint.from_dict(p) for p in d.get("fit_points", [])],
            flops_weight=float(d.get("flops_weight") or 0.0),
            cv_mae_flops=None if d.get("cv_mae_flops") is None else float(d["cv_mae_flops"]),
        )


def pruned_share(flops: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """pruned[b][c] = FLOPs choice c removes from block b, as a share of the whole original model."""
    total = sum(per[ORIGINAL] for per in flops.values()) or 1.0
    return {b: {c: (per[ORIGINAL] - f) / total for c, f in per.items()} for b, per in flops.items()}


def apply_calibration(drops: Drops, block_weights: Mapping[str, float], flops_weight: float = 0.0,
                      pruned: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, dict[str, float]]:
    """Calibrated drops: each block's raw drops times its weight, plus `flops_weight` times
    the choice's pruned FLOPs share when given ("0.0" stays exactly 0)."""
    def one(b: str, c: str, d: float) -> float:
        if c == ORIGINAL:
            return 0.0
        extra = flops_weight * pruned[b][c] if pruned is not None and flops_weight else 0.0
        return float(block_weights[b] * d + extra)

    return {b: {c: one(b, c, d) for c, d in per.items()} for b, per in drops.items()}


# --------------------------------------------------------------------------- fitting


def _design(block_names: Sequence[str], drops: Drops, selections: Sequence[Selection]) -> np.ndarray:
    """X[k, b] = raw drop of block b at composition k's choice."""
    return np.array([[drops[b][c] for b, c in zip(block_names, sel)] for sel in selections], dtype=np.float64)


def fit_scale(X: np.ndarray, y: np.ndarray) -> float:
    """Least-squares s in y ~= s * X.sum(1) (through the origin), clipped at >= 0.

    With no signal (all summed drops 0) the scale is 1: there is nothing to correct.
    """
    s = X.sum(axis=1)
    denom = float(s @ s)
    if denom <= 1e-18:
        return 1.0
    return max(0.0, float(s @ y) / denom)


def fit_ridge(X: np.ndarray, y: np.ndarray, lam: float, prior: float) -> np.ndarray:
    """Per-block weights w minimizing |y - Xw|^2 + lam |w - prior|^2 (closed form), clipped >= 0.

    Shrinking toward the single scale (not toward 0) means a block with little data keeps
    the global correction instead of losing its drop.
    """
    n_blocks = X.shape[1]
    base = np.full(n_blocks, prior)
    A = X.T @ X + lam * np.eye(n_blocks)
    w = base + np.linalg.solve(A, X.T @ (y - X @ base))
    return np.clip(w, 0.0, None)


def fit_scale_flops(X: np.ndarray, P: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Non-negative least squares (s, f) in y ~= s * X.sum(1) + f * P.sum(1)."""
    A = np.stack([X.sum(axis=1), P.sum(axis=1)], axis=1)
    (s, f), _ = nnls(A, y)
    return float(s), float(f)


def _loo_mae_flops(X: np.ndarray, P: np.ndarray, y: np.ndarray) -> float:
    errors = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        s, f = fit_scale_flops(X[keep], P[keep], y[keep])
        errors.append(abs(s * float(X[i].sum()) + f * float(P[i].sum()) - y[i]))
    return float(np.mean(errors))


def _loo_mae(X: np.ndarray, y: np.ndarray, lam: float | None) -> float:
    """Leave-one-out MAE of the scale fit (lam None) or of ridge at strength lam."""
    errors = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        s = fit_scale(X[keep], y[keep])
        w = np.full(X.shape[1], s) if lam is None else fit_ridge(X[keep], y[keep], lam, s)
        errors.append(abs(float(X[i] @ w) - y[i]))
    return float(np.mean(errors))


def _report(block_names: Sequence[str], drops: Drops, teacher: float,
            points: Sequence[AdditivityPoint]) -> AdditivityReport:
    return AdditivityReport.from_points(
        [AdditivityPoint(p.selection, teacher - summed_drop(block_names, drops, p.selection), p.measured)
         for p in points]
    )


def fit_calibration(
    block_names: Sequence[str],
    drops: Drops,
    teacher_accuracy: float,
    fit_points: Sequence[AdditivityPoint],
    heldout_points: Sequence[AdditivityPoint],
    *,
    ridge_lambdas: Sequence[float] = DEFAULT_RIDGE_LAMBDAS,
    ridge_min_gain: float = RIDGE_MIN_GAIN,
    ridge_min_points: int = RIDGE_MIN_POINTS,
    flops: Mapping[str, Mapping[str, float]] | None = None,
) -> Calibration:
    """Fit the correction on `fit_points` (measured compositions) and score it on `heldout_points`.

    Only `selection` and `measured` of the points are used; predictions are recomputed
    from `drops`. Leave-one-out scores need at least 3 fit points; per-block weights are
    considered only with at least `ridge_min_points`, the FLOPs term only when `flops`
    (per block and choice) is given. A richer fit replaces a simpler one only when its
    leave-one-out MAE is below `ridge_min_gain` times the simpler one's.
    """
    if not fit_points:
        raise ValueError("calibration needs at least one measured composition (calibration_k >= 1)")
    names = list(block_names)
    X = _design(names, drops, [p.selection for p in fit_points])
    y = np.array([teacher_accuracy - p.measured for p in fit_points], dtype=np.float64)
    scale = fit_scale(X, y)
    weights = {b: scale for b in names}
    method: str = "scale"
    best_lam: float | None = None
    cv_scale: float | None = None
    cv_ridge: float | None = None
    cv_raw = float(np.mean(np.abs(y - X.sum(axis=1))))
    flops_weight, cv_flops = 0.0, None
    pruned = pruned_share(flops) if flops is not None else None
    if len(y) >= 3:
        cv_scale = _loo_mae(X, y, None)
        best_simple = min(cv_scale, cv_raw)
        if cv_raw <= cv_scale:
            method, weights = "identity", {b: 1.0 for b in names}
        if pruned is not None:
            P = _design(names, pruned, [p.selection for p in fit_points])
            cv_flops = _loo_mae_flops(X, P, y)
            if cv_flops < ridge_min_gain * best_simple:
                s_f, flops_weight = fit_scale_flops(X, P, y)
                method, weights, best_simple = "scale+flops", {b: s_f for b in names}, cv_flops
        unit = float(np.mean(np.diag(X.T @ X))) or 1.0
        scored = [(_loo_mae(X, y, f * unit), f * unit) for f in ridge_lambdas] if len(y) >= ridge_min_points else []
        if scored:
            cv_ridge, best_lam = min(scored)
            if cv_ridge < ridge_min_gain * best_simple:
                method, flops_weight = "ridge", 0.0
                weights = dict(zip(names, (float(w) for w in fit_ridge(X, y, best_lam, scale))))
    calibrated = apply_calibration(drops, weights, flops_weight, pruned)
    fit_report = [
        AdditivityPoint(p.selection, teacher_accuracy - summed_drop(names, calibrated, p.selection), p.measured)
        for p in fit_points
    ]
    return Calibration(
        method=method,
        scale=scale,
        block_weights=weights,
        k=len(fit_points),
        ridge_lambda=best_lam if method == "ridge" else None,
        cv_mae_scale=cv_scale,
        cv_mae_ridge=cv_ridge,
        cv_mae_raw=cv_raw,
        heldout_raw=_report(names, drops, teacher_accuracy, heldout_points),
        heldout_calibrated=_report(names, calibrated, teacher_accuracy, heldout_points),
        fit_points=fit_report,
        flops_weight=flops_weight,
        cv_mae_flops=cv_flops,
    )


# --------------------------------------------------------------------------- measuring


def spread_compositions(
    model: ScalableLike,
    flops: Mapping[str, Mapping[str, float]],
    k: int,
    seed: int,
    *,
    exclude: Sequence[Selection] = (),
    pool_factor: int = 64,
) -> list[Selection]:
    """`k` distinct compositions whose FLOPs spread evenly from the smallest to the original.

    A seeded pool of random compositions is drawn with a per-composition sparsity bias
    (so both nearly-original and nearly-smallest ones occur, not just the middle a uniform
    draw concentrates on); for each of k evenly spaced FLOPs targets the nearest unused
    pool member is taken. FLOPs of a composition are the sum of its blocks' (exact).
    """
    if k < 0:
        raise ValueError(f"calibration k must be >= 0, got {k}")
    names = model.block_names
    options = [sorted_choices(model, b) for b in names]
    rng = np.random.default_rng(seed)
    original = tuple(ORIGINAL for _ in names)
    taken = set(exclude) | {original}
    pool: dict[Selection, float] = {}
    for _ in range(pool_factor * max(k, 1)):
        bias = rng.uniform()
        sel = []
        for opts in options:
            idx = int(np.clip(np.rint(bias * (len(opts) - 1) + rng.normal(0.0, 0.75)), 0, len(opts) - 1))
            sel.append(opts[idx])
        sel_t = tuple(sel)
        if sel_t not in taken:
            pool[sel_t] = float(sum(flops[b][c] for b, c in zip(names, sel_t)))
    smallest = sum(flops[b][opts[-1]] for b, opts in zip(names, options))
    largest = sum(flops[b][ORIGINAL] for b in names)
    chosen: list[Selection] = []
    for target in np.linspace(smallest, largest, k):
        if not pool:
            break
        best = min(pool, key=lambda s: (abs(pool[s] - target), s))
        chosen.append(best)
        del pool[best]
    return chosen


def measure_calibration(
    model: ScalableLike,
    drops: Drops,
    flops: Mapping[str, Mapping[str, float]],
    evaluator: SelectionEvaluator,
    heldout: AdditivityReport,
    *,
    k: int = DEFAULT_K,
    seed: int = 0,
    teacher_accuracy: float | None = None,
    progress: bool = False,
) -> Calibration:
    """Measure k FLOPs-spread compositions (disjoint from the held-out ones) and fit.

    `heldout` is the additivity check on random compositions; its measured accuracies are
    reused, so the held-out figures cost nothing extra.
    """
    names = model.block_names
    teacher = evaluator.accuracy([ORIGINAL] * len(names)) if teacher_accuracy is None else teacher_accuracy
    selections = spread_compositions(
        model, flops, k, seed, exclude=[p.selection for p in heldout.points]
    )
    measured = evaluator.accuracy_many(selections, progress=progress)
    fit_points = [
        AdditivityPoint(sel, teacher - summed_drop(names, drops, sel), m) for sel, m in zip(selections, measured)
    ]
    return fit_calibration(names, drops, teacher, fit_points, heldout.points, flops=flops)


def refit_table(table: Any) -> Any:
    """A copy of a calibrated ProfileTable refitted with this module's current fit, from
    what the table already holds (raw drops, FLOPs, the fit and held-out compositions'
    measured accuracies): nothing is re-measured. Tables without calibration come back as is.
    """
    import dataclasses

    from profiling.profile import clip_drops

    if not table.calibration:
        return table
    old = Calibration.from_dict(table.calibration)
    heldout = AdditivityReport.from_dict(table.additivity or {"mae": 0, "max_error": 0, "n": 0})
    names = table.block_names
    # As the profile fits: on the raw drops clipped at 0 (`profiling.profile.assemble_table`).
    drops = clip_drops({b.name: {c: ch.accuracy_drop_raw for c, ch in b.choices.items()} for b in table.blocks})
    flops = {b.name: {c: float(ch.flops) for c, ch in b.choices.items()} for b in table.blocks}
    cal = fit_calibration(names, drops, table.teacher_accuracy, old.fit_points, heldout.points, flops=flops)
    calibrated = cal.apply(drops, flops)
    blocks = [dataclasses.replace(b, choices={c: dataclasses.replace(ch, accuracy_drop=calibrated[b.name][c])
                                              for c, ch in b.choices.items()}) for b in table.blocks]
    return dataclasses.replace(table, blocks=blocks, calibration=cal.to_dict())
