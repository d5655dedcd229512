"""Calibration fit: pure NumPy, checked on synthetic compositions with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from profiling.accuracy import AdditivityPoint
from profiling.calibrate import Calibration, apply_calibration, fit_calibration, fit_scale

BLOCKS = ["b0", "b1", "b2", "b3"]
CHOICES = ["0.0", "0.2", "0.4", "0.6", "0.8"]


def _drops(seed: int = 0) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(seed)
    drops = {}
    for b in BLOCKS:
        steps = np.sort(rng.uniform(0.0, 0.02, size=len(CHOICES) - 1))
        drops[b] = {"0.0": 0.0, **{c: float(d) for c, d in zip(CHOICES[1:], steps)}}
    return drops


def _points(drops, weights, n: int, seed: int, teacher: float = 0.9, noise: float = 0.0):
    rng = np.random.default_rng(seed)
    points = []
    for _ in range(n):
        sel = tuple(CHOICES[int(rng.integers(len(CHOICES)))] for _ in BLOCKS)
        true_drop = sum(weights[b] * drops[b][c] for b, c in zip(BLOCKS, sel))
        measured = teacher - true_drop + float(rng.normal(0.0, noise))
        raw_pred = teacher - sum(drops[b][c] for b, c in zip(BLOCKS, sel))
        points.append(AdditivityPoint(sel, raw_pred, measured))
    return points


def test_uniform_underestimate_is_fixed_by_one_scale() -> None:
    drops = _drops()
    truth = {b: 1.6 for b in BLOCKS}
    cal = fit_calibration(BLOCKS, drops, 0.9, _points(drops, truth, 16, 1), _points(drops, truth, 20, 2))
    assert cal.method == "scale"
    assert cal.scale == pytest.approx(1.6)
    assert cal.heldout_raw.mae > 0.005
    assert cal.heldout_calibrated.mae == pytest.approx(0.0, abs=1e-12)
    calibrated = apply_calibration(drops, cal.block_weights)
    assert all(calibrated[b]["0.0"] == 0.0 for b in BLOCKS)
    assert calibrated["b2"]["0.8"] == pytest.approx(1.6 * drops["b2"]["0.8"])


def test_per_block_weights_used_only_when_better() -> None:
    drops = _drops()
    truth = {"b0": 0.5, "b1": 3.0, "b2": 1.0, "b3": 2.0}
    cal = fit_calibration(BLOCKS, drops, 0.9, _points(drops, truth, 16, 3), _points(drops, truth, 20, 4))
    assert cal.method == "ridge"
    assert cal.cv_mae_ridge < cal.cv_mae_scale
    assert cal.block_weights["b1"] > cal.block_weights["b0"]
    assert cal.heldout_calibrated.mae < 0.5 * cal.heldout_raw.mae


def test_noise_alone_keeps_the_single_scale() -> None:
    drops = _drops()
    truth = {b: 1.2 for b in BLOCKS}
    cal = fit_calibration(BLOCKS, drops, 0.9, _points(drops, truth, 16, 5, noise=0.003),
                          _points(drops, truth, 20, 6, noise=0.003))
    assert cal.method == "scale"
    assert set(cal.block_weights.values()) == {cal.scale}


def test_round_trip_and_degenerate_inputs() -> None:
    drops = _drops()
    truth = {b: 1.3 for b in BLOCKS}
    cal = fit_calibration(BLOCKS, drops, 0.9, _points(drops, truth, 8, 7), _points(drops, truth, 5, 8))
    again = Calibration.from_dict(cal.to_dict())
    assert again.to_dict() == cal.to_dict()
    assert fit_scale(np.zeros((3, 4)), np.ones(3)) == 1.0
    with pytest.raises(ValueError, match="calibration_k"):
        fit_calibration(BLOCKS, drops, 0.9, [], [])


def test_a_fit_that_does_not_beat_raw_drops_is_not_applied() -> None:
    drops = _drops()
    truth = {b: 1.0 for b in BLOCKS}  # the raw drops are already right, up to noise
    cal = fit_calibration(BLOCKS, drops, 0.9, _points(drops, truth, 16, 9, noise=0.004),
                          _points(drops, truth, 20, 10, noise=0.004))
    # The fitted scale (about 0.98) only chases noise: leave-one-out says so, raw drops stay.
    assert cal.scale != 1.0 and cal.cv_mae_raw < cal.cv_mae_scale
    assert cal.method == "identity" and set(cal.block_weights.values()) == {1.0}
    assert cal.heldout_calibrated.mae == cal.heldout_raw.mae
    # Exactly additive truth: raw is perfect, any fitted scale equals 1, identity wins ties.
    exact = fit_calibration(BLOCKS, drops, 0.9, _points(drops, truth, 16, 11), _points(drops, truth, 5, 12))
    assert exact.method == "identity" and exact.heldout_calibrated.mae == pytest.approx(0.0, abs=1e-12)


def test_flops_term_carries_what_single_swap_drops_miss() -> None:
    # Descendants that beat the original alone (drops <= 0) yet compositions lose accuracy in
    # proportion to the FLOPs they remove: the MobileNetV2 case.
    rng = np.random.default_rng(5)
    drops = {b: {"0.0": 0.0, **{c: float(-rng.uniform(0.0, 0.004)) for c in CHOICES[1:]}} for b in BLOCKS}
    flops = {b: {c: 100.0 * (1.0 - float(c)) for c in CHOICES} for b in BLOCKS}

    def points(n: int, seed: int):
        r = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            sel = tuple(CHOICES[int(r.integers(len(CHOICES)))] for _ in BLOCKS)
            removed = sum(float(c) * 100.0 for c in sel) / 400.0
            raw = 0.9 - sum(drops[b][c] for b, c in zip(BLOCKS, sel))
            out.append(AdditivityPoint(sel, raw, 0.9 - 0.05 * removed + float(r.normal(0.0, 0.0005))))
        return out

    fit, heldout = points(16, 6), points(20, 7)
    without = fit_calibration(BLOCKS, drops, 0.9, fit, heldout)
    cal = fit_calibration(BLOCKS, drops, 0.9, fit, heldout, flops=flops)
    assert without.method != "scale+flops" and without.cv_mae_flops is None
    assert cal.method == "scale+flops"
    assert cal.flops_weight == pytest.approx(0.05, rel=0.1)
    assert cal.heldout_calibrated.mae < 0.2 * min(cal.heldout_raw.mae, without.heldout_calibrated.mae)
    calibrated = cal.apply(drops, flops)
    assert all(calibrated[b]["0.0"] == 0.0 for b in BLOCKS)
    assert calibrated["b1"]["0.8"] > 0.0 > drops["b1"]["0.8"]
    assert Calibration.from_dict(cal.to_dict()).apply(drops, flops) == calibrated
    with pytest.raises(ValueError, match="FLOPs"):
        cal.apply(drops)


def test_refit_of_a_real_table_is_stable(table) -> None:
    from profiling.calibrate import refit_table

    again = refit_table(table)
    assert again.calibration["method"] == table.calibration["method"]
    for b_old, b_new in zip(table.blocks, again.blocks):
        for c in b_old.choices:
            assert b_new.choices[c].accuracy_drop == pytest.approx(b_old.choices[c].accuracy_drop, abs=1e-12)
