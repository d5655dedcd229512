"""Composition latency calibration: the fit, its additivity in the optimizer, and a real timing."""

from __future__ import annotations

import dataclasses

import pytest

from legoblocks.compose import ScalableModel
from optimizer import parse_problem, solve
from profiling.latency_fit import LatencyCalibration, fit_latency_calibration, measure_latency_calibration
from profiling.serving import to_problem
from profiling.table import ProfileTable, TableError, load, save


def test_fit_recovers_an_affine_overhead_and_beats_the_raw_sum() -> None:
    points = [(s, 1.2 * s + 0.3 + (0.001 if i % 2 else -0.001)) for i, s in enumerate([1.0, 1.5, 2.0, 2.5, 3.0])]
    fit = fit_latency_calibration(points, "host")
    assert fit.method == "affine"
    assert fit.scale == pytest.approx(1.2, abs=0.01)
    assert fit.offset_ms == pytest.approx(0.3, abs=0.02)
    assert fit.loo_mae_calibrated_ms < 0.01 < fit.loo_mae_raw_ms
    assert fit.predict(2.0) == pytest.approx(2.7, abs=0.01)
    assert LatencyCalibration.from_dict(fit.to_dict()) == fit


def test_fit_that_does_not_help_is_not_applied() -> None:
    # Measured equals the raw sum up to noise: any fit only adds leave-one-out error.
    points = [(1.0, 1.03), (2.0, 1.97), (3.0, 3.04), (4.0, 3.95)]
    fit = fit_latency_calibration(points, "host")
    assert fit.method == "identity"
    assert (fit.scale, fit.offset_ms) == (1.0, 0.0)
    assert fit.fitted_scale != 1.0  # what was found is still reported


def test_fit_through_the_origin_when_points_do_not_spread() -> None:
    fit = fit_latency_calibration([(2.0, 2.5), (2.0, 2.6), (2.0, 2.4)], "host")
    assert fit.method == "scale"
    assert fit.offset_ms == 0.0
    assert fit.scale == pytest.approx(1.25)


def test_fit_never_gives_a_negative_offset() -> None:
    # Chains that grow faster than their sums: the best line has a negative intercept, which
    # could make a small block's share negative; the fit goes through the origin instead.
    fit = fit_latency_calibration([(1.0, 0.9), (2.0, 2.2), (3.0, 3.5), (4.0, 4.8)], "host")
    assert fit.offset_ms == 0.0 and fit.fitted_offset_ms == 0.0
    assert fit.method in ("scale", "identity")


def test_fit_rejects_too_few_or_bad_points() -> None:
    with pytest.raises(ValueError, match=">= 3 compositions"):
        fit_latency_calibration([(1.0, 1.1), (2.0, 2.2)], "host")
    with pytest.raises(ValueError, match="positive"):
        fit_latency_calibration([(1.0, 1.1), (2.0, 0.0), (3.0, 3.3)], "host")


def _with_fit(table: ProfileTable, scale: float, offset: float) -> ProfileTable:
    host = next(iter(table.fingerprints))
    fit = dataclasses.replace(fit_latency_calibration([(1.0, 1.0), (2.0, 2.0), (3.0, 3.0)], host),
                              method="affine", scale=scale, offset_ms=offset)
    return dataclasses.replace(table, latency_calibration=fit.to_dict())


def _latency_from_flops(table: ProfileTable) -> ProfileTable:
    """The table with each median set from FLOPs: timings of tiny blocks are noise-dominated
    (a smaller descendant can time slower), and this test is about the fit, not the timer."""
    data = table.to_dict()
    for block in data["blocks"]:
        for choice in block["choices"].values():
            choice["latency"]["median_ms"] = 1e-6 * choice["flops"] + 0.01
    return ProfileTable.from_dict(data)


def test_table_applies_the_fit_additively_and_the_optimizer_respects_it(table: ProfileTable, tmp_path) -> None:
    table = _latency_from_flops(table)
    fitted = _with_fit(table, 1.5, 0.4)
    again = load(save(fitted, tmp_path / "t.json"))
    assert again.latency_calibration == fitted.latency_calibration
    original = ["0.0"] * len(table.blocks)
    raw = table.total(original, "latency")
    assert again.predicted_latency(original) == pytest.approx(1.5 * raw + 0.4)
    assert again.predicted_latency(original, raw=True) == pytest.approx(raw)
    shares = [again.choice_latency_ms(b.name, "0.0") for b in again.blocks]
    assert sum(shares) == pytest.approx(again.predicted_latency(original))
    # A budget the raw sum meets but the corrected latency does not: the optimizer must prune.
    smallest = [max(b.choices, key=float) for b in again.blocks]
    budget = (raw + again.predicted_latency(original)) / 2
    assert again.predicted_latency(smallest) < budget
    solution = solve(parse_problem(to_problem(again, {"latency_ms": budget})))
    assert solution.feasible
    chosen = solution.selection[again.model_name]
    assert list(chosen) != original
    assert again.predicted_latency(chosen) <= budget * (1 + 1e-9)
    unaware = solve(parse_problem(to_problem(again, {"latency_ms": budget}, raw_latency=True)))
    assert list(unaware.selection[again.model_name]) == original


def test_table_rejects_a_fit_of_an_unknown_host(table: ProfileTable, tmp_path) -> None:
    data = _with_fit(table, 1.1, 0.0).to_dict()
    data["latency_calibration"]["fingerprint"] = "elsewhere"
    with pytest.raises(TableError, match="latency_calibration.fingerprint"):
        ProfileTable.from_dict(data)
    data["latency_calibration"]["fingerprint"] = next(iter(table.fingerprints))
    data["latency_calibration"]["scale"] = 0.0
    with pytest.raises(TableError, match="latency_calibration.scale"):
        ProfileTable.from_dict(data)


def test_profiled_table_carries_a_real_fit(table: ProfileTable, scalable: ScalableModel) -> None:
    cal = table.latency_calibration
    assert cal is not None and cal["fingerprint"] in table.fingerprints
    assert cal["k"] == len(cal["points"]) >= 3
    # The original model is one of the timed compositions: its summed medians are the raw total.
    raw_original = table.total(scalable.original_selection(), "latency")
    assert any(p == pytest.approx(raw_original) for p, _ in cal["points"])
    assert all(m > 0 for _, m in cal["points"])


def test_measure_times_distinct_compositions(scalable: ScalableModel, table: ProfileTable) -> None:
    medians = {b.name: {c: ch.latency.median_ms for c, ch in b.choices.items()} for b in table.blocks}
    fit = measure_latency_calibration(scalable, medians, fingerprint="h", k=4, seed=3, warmup=1, repeats=3)
    sums = [p for p, _ in fit.points]
    assert fit.k == 4 and len(set(sums)) == 4
    with pytest.raises(ValueError, match=">= 3"):
        measure_latency_calibration(scalable, medians, fingerprint="h", k=2)
