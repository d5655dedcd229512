"""Composition latency: correct the summed block latencies without giving up additivity.

Blocks are timed one at a time, each with its own warm cache and its own per-call costs, so
the sum of their medians misses the composed model both ways (2-core CPU, batch 1: ResNet-20's
blocks 1.79 ms against its chain's 2.13-2.31 ms on an idle core; MobileNetV2's 19 small
blocks sum 28% above the chain, each paying a fixed cost per call when timed alone). The optimizer
needs a per-choice number it can add up, so we measure K compositions end to end and fit

    measured_ms  ~=  scale * sum_b latency_b(choice_b) + offset_ms

with offset_ms >= 0, then give every choice `scale * latency + offset_ms / n_blocks` (never
negative): every selection has one choice per block, so the offset is added exactly once
and the optimizer stays exact.
The fit is scored by leave-one-out error on the K compositions, against the raw sum; if the
correction does not beat the raw sum there, scale 1 / offset 0 is kept ("identity").
A table's correction belongs to the host that measured it (`fingerprint`); a device that
times its own blocks fits its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # NumPy is imported where fitting happens: tables and devices only apply a fit
    import numpy as np

Selection = tuple[str, ...]
# Leave-one-out needs a fit on k-1 points; an affine fit needs >= 2 distinct x values.
MIN_POINTS = 3
DEFAULT_LATENCY_K = 12


@dataclass(frozen=True)
class LatencyCalibration:
    """A fitted correction of summed block latencies (ms) and how well it did.

    method: "affine" (scale and offset), "scale" (through the origin: the points were too
    close together for an offset) or "identity" (the fit did not beat the raw sum in
    leave-one-out; `fitted_scale`/`fitted_offset_ms` still report what it found).
    points: (summed block medians, measured composed median) per composition.
    """

    method: str
    scale: float
    offset_ms: float
    k: int
    loo_mae_raw_ms: float
    loo_max_raw_ms: float
    loo_mae_calibrated_ms: float
    loo_max_calibrated_ms: float
    fingerprint: str
    fitted_scale: float
    fitted_offset_ms: float
    points: list[tuple[float, float]] = field(default_factory=list)

    def predict(self, summed_ms: float) -> float:
        """Composed latency for a selection whose block medians sum to `summed_ms`."""
        return self.scale * summed_ms + self.offset_ms

    def per_choice(self, latency_ms: float, n_blocks: int) -> float:
        """The additive share of one choice: summing it over a selection gives `predict`."""
        return self.scale * latency_ms + self.offset_ms / n_blocks

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "points": [list(p) for p in self.points]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyCalibration:
        return cls(
            method=str(data["method"]),
            scale=float(data["scale"]),
            offset_ms=float(data["offset_ms"]),
            k=int(data["k"]),
            loo_mae_raw_ms=float(data["loo_mae_raw_ms"]),
            loo_max_raw_ms=float(data["loo_max_raw_ms"]),
            loo_mae_calibrated_ms=float(data["loo_mae_calibrated_ms"]),
            loo_max_calibrated_ms=float(data["loo_max_calibrated_ms"]),
            fingerprint=str(data["fingerprint"]),
            fitted_scale=float(data["fitted_scale"]),
            fitted_offset_ms=float(data["fitted_offset_ms"]),
            points=[(float(p), float(m)) for p, m in data.get("points") or []],
        )


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares (scale, offset); through the origin when x has (almost) no spread or the
    offset comes out negative: spread over the blocks, a negative offset could make a small
    block's share negative, and call overhead cannot be."""
    import numpy as np

    if len(x) >= 2 and np.ptp(x) > 1e-3 * max(float(np.mean(x)), 1e-12):
        scale, offset = np.polyfit(x, y, 1)
        if scale > 0 and offset >= 0:
            return float(scale), float(offset)
    return float(np.dot(x, y) / np.dot(x, x)), 0.0


def fit_latency_calibration(
    points: Sequence[tuple[float, float]], fingerprint: str
) -> LatencyCalibration:
    """Fit measured = scale * summed + offset on (summed, measured) pairs, scored by LOO."""
    import numpy as np

    if len(points) < MIN_POINTS:
        raise ValueError(f"latency calibration needs >= {MIN_POINTS} compositions, got {len(points)}")
    x = np.array([p for p, _ in points], dtype=float)
    y = np.array([m for _, m in points], dtype=float)
    if np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("latency calibration points must be positive (ms)")
    loo = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        s, o = _fit(x[keep], y[keep])
        loo.append(abs(s * x[i] + o - y[i]))
    raw = np.abs(x - y)
    scale, offset = _fit(x, y)
    method = "affine" if offset != 0.0 else "scale"
    better = float(np.mean(loo)) < float(np.mean(raw))
    return LatencyCalibration(
        method=method if better else "identity",
        scale=scale if better else 1.0,
        offset_ms=offset if better else 0.0,
        k=len(points),
        loo_mae_raw_ms=float(np.mean(raw)),
        loo_max_raw_ms=float(np.max(raw)),
        loo_mae_calibrated_ms=float(np.mean(loo)) if better else float(np.mean(raw)),
        loo_max_calibrated_ms=float(np.max(loo)) if better else float(np.max(raw)),
        fingerprint=fingerprint,
        fitted_scale=scale,
        fitted_offset_ms=offset,
        points=[(float(a), float(b)) for a, b in zip(x, y)],
    )


def measure_latency_calibration(
    model: Any,
    latency_ms: Mapping[str, Mapping[str, float]],
    *,
    fingerprint: str,
    k: int = DEFAULT_LATENCY_K,
    seed: int = 0,
    batch_size: int = 1,
    warmup: int = 5,
    repeats: int = 30,
    threads: int = 1,
    progress: bool = False,
) -> LatencyCalibration:
    """Time k compositions of `model` (a ScalableModel) end to end and fit the correction.

    `latency_ms[block][choice]` are the block medians measured with the same settings.
    The compositions spread evenly over the summed-latency range (see
    `profiling.calibrate.spread_compositions`), the original model included.
    """
    from tqdm.auto import tqdm

    from profiling.accuracy import ORIGINAL
    from profiling.calibrate import spread_compositions
    from profiling.latency import measure_latency

    if k < MIN_POINTS:
        raise ValueError(f"latency calibration k must be >= {MIN_POINTS}, got {k}")
    names = model.block_names
    original = tuple(ORIGINAL for _ in names)
    selections = [original, *spread_compositions(model, latency_ms, k - 1, seed)]
    points = []
    for sel in tqdm(selections, desc="latency calibration", disable=not progress, unit="model"):
        summed = sum(latency_ms[b][c] for b, c in zip(names, sel))
        stats = measure_latency(
            model.compose(list(sel)), model.input_shape, batch_size=batch_size, warmup=warmup,
            repeats=repeats, threads=threads,
        )
        points.append((summed, stats.median_ms))
    return fit_latency_calibration(points, fingerprint)
