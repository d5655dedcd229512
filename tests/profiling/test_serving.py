"""What a user is told is what is served: the measured frontier competes in the exact solve,
the original wins where it fits unless beaten beyond noise, and every accuracy says where it
came from."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from optimizer import parse_problem, solve
from profiling.serving import (PREDICTED_PENALTY_SD, held_out_count, paired_difference, prediction_error, rank_value,
                               standard_error, to_problem, told)
from profiling.table import BlockProfile, ChoiceProfile, LatencyColumn, Measured, PredictionError, ProfileTable

CHOICES = ("0.0", "0.4", "0.8")


def _table(drops: dict[str, dict[str, float]], teacher: float = 0.90, measured: list[Measured] = (),
           error: PredictionError | None = None) -> ProfileTable:
    """A table of blocks whose latency is 1 ms at 0.0, 0.6 at 0.4, 0.3 at 0.8."""
    cost = {"0.0": 1.0, "0.4": 0.6, "0.8": 0.3}
    blocks = [BlockProfile(b, {"name": b, "in_shape": [1], "out_shape": [1], "params": 1, "flops": 1, "scalable": True},
                           {c: ChoiceProfile(c, float(c), 1, 4, int(100 * cost[c]), 4, 8, d, d,
                                             LatencyColumn(cost[c], cost[c], cost[c], 0.0, "host"))
                            for c, d in per.items()})
              for b, per in drops.items()]
    return ProfileTable("zoo", "m", (1, 8, 8), teacher, blocks, {"host": {"id": "host"}}, measured=list(measured),
                        prediction_error=error)


def _serve(table: ProfileTable, latency_ms: float) -> list[str]:
    return list(solve(parse_problem(to_problem(table, {"latency_ms": latency_ms}))).selection["m"])


def test_the_original_wins_at_a_full_budget_over_noise_level_gains() -> None:
    # Single swaps measured "better" than the original (negative raw drops) are clipped to 0
    # by the profile; here they are 0, and a pruned composition measured 0.3 points above the
    # teacher on 1,000 images (SE ~0.95 points) is noise: the original is served.
    drops = {b: {"0.0": 0.0, "0.4": 0.0, "0.8": 0.02} for b in ("a", "b")}
    original = Measured(("0.0", "0.0"), 0.900, 1000, "original")
    lucky = Measured(("0.4", "0.4"), 0.903, 1000, "measured")
    table = _table(drops, measured=[original, lucky])
    assert _serve(table, 2.0) == ["0.0", "0.0"]
    assert told(table, ["0.0", "0.0"]).source == "measured" and told(table, ["0.0", "0.0"]).accuracy == 0.900
    # Measurably better (beyond 1.5 standard errors): served, and told at its measurement.
    clearly = Measured(("0.4", "0.4"), 0.925, 1000, "measured")
    table = _table(drops, measured=[original, clearly])
    assert _serve(table, 2.0) == ["0.4", "0.4"]
    t = told(table, ["0.4", "0.4"])
    assert (t.accuracy, t.source, t.n) == (0.925, "measured", 1000)
    assert t.se == pytest.approx(math.sqrt(0.925 * 0.075 / 1000))


def test_a_measured_composition_beats_the_additive_prediction_where_it_fits() -> None:
    # The additive model predicts 0.80 for every composition at 1.2 ms; one of them measured 0.86.
    drops = {b: {"0.0": 0.0, "0.4": 0.05, "0.8": 0.08} for b in ("a", "b")}
    table = _table(drops, measured=[Measured(("0.0", "0.0"), 0.90, 5000, "original"),
                                    Measured(("0.8", "0.8"), 0.86, 5000, "anchor")])
    assert _serve(table, 1.25) == ["0.8", "0.8"]  # 0.6 ms, measured 0.86 > predicted 0.85 for (0.4, 0.4)
    t = told(table, ["0.4", "0.4"])
    assert t.source == "predicted" and t.accuracy == pytest.approx(0.80)


def test_a_composition_chosen_by_its_measurement_is_told_its_held_out_measurement() -> None:
    # Ranked at its value on the images that chose it (0.925 beats the original beyond noise),
    # told what the held-out images measured (0.912): the winner's curse stays with the choice.
    drops = {b: {"0.0": 0.0, "0.4": 0.0, "0.8": 0.02} for b in ("a", "b")}
    original = Measured(("0.0", "0.0"), 0.900, 1000, "original", 0.905, 1000)
    chosen = Measured(("0.4", "0.4"), 0.925, 1000, "measured", 0.912, 1000)
    table = _table(drops, measured=[original, chosen])
    assert to_problem(table, {"latency_ms": 2.0})["models"][0]["compositions"][1]["accuracy"] == pytest.approx(
        rank_value(chosen)) and rank_value(chosen) < 0.925
    assert _serve(table, 2.0) == ["0.4", "0.4"]
    t = told(table, ["0.4", "0.4"])
    assert (t.accuracy, t.source, t.n) == (0.912, "measured", 1000)
    assert t.se == pytest.approx(math.sqrt(0.912 * 0.088 / 1000))
    # A record from a profile that held nothing out tells the value that chose it.
    legacy = _table(drops, measured=[Measured(("0.0", "0.0"), 0.900, 1000, "original")])
    assert told(legacy, ["0.0", "0.0"]).accuracy == 0.900
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        held_out_count(1000, 1.0)
    assert held_out_count(1001, 0.5) == 500 and held_out_count(1000, 0.0) == 0


def test_unmeasured_compositions_rank_at_their_corrected_prediction_and_are_told_it() -> None:
    drops = {b: {"0.0": 0.0, "0.4": 0.01, "0.8": 0.05} for b in ("a", "b")}
    error = PredictionError(bias=0.02, sd=0.01, n=12)
    table = _table(drops, measured=[Measured(("0.0", "0.0"), 0.90, 5000, "original")], error=error)
    problem = to_problem(table, {"latency_ms": 1.3})
    assert problem["models"][0]["base_accuracy"] == pytest.approx(0.90 - 0.02 - PREDICTED_PENALTY_SD * 0.01)
    assert problem["models"][0]["compositions"] == [{"selection": ["0.0", "0.0"], "accuracy": 0.90}]
    served = _serve(table, 1.3)
    t = told(table, served)
    assert t.source == "predicted" and t.accuracy == pytest.approx(table.predicted_accuracy(served) - 0.02)
    assert t.se == 0.01
    assert to_problem(table, {"latency_ms": 1.3}, measured=False)["models"][0]["base_accuracy"] == 0.90


def test_a_prediction_is_never_told_surer_than_the_measurement_it_was_checked_against() -> None:
    # Picks that happened to agree give a spread of 0: the prediction is told with the standard
    # error of a measurement on the images the spread was estimated on (held-out where held out).
    drops = {b: {"0.0": 0.0, "0.4": 0.01, "0.8": 0.05} for b in ("a", "b")}
    original = Measured(("0.0", "0.0"), 0.90, 5000, "original", 0.91, 2000)
    table = _table(drops, measured=[original], error=PredictionError(bias=0.0, sd=0.0, n=3))
    t = told(table, ["0.4", "0.4"])
    assert t.source == "predicted" and t.se == pytest.approx(standard_error(t.accuracy, 2000)) and t.se > 0
    wide = _table(drops, measured=[original], error=PredictionError(bias=0.0, sd=0.05, n=3))
    assert told(wide, ["0.4", "0.4"]).se == 0.05  # a spread wider than the floor is kept
    assert told(_table(drops, error=PredictionError(bias=0.0, sd=0.0, n=0)), ["0.4", "0.4"]).se == 0.0  # nothing measured


def test_an_unmeasured_composition_needs_a_measured_picks_margin_to_displace_a_measured_one() -> None:
    # At 1.25 ms the best unmeasured composition, (0.4, 0.4), is predicted at 0.88 after its
    # bias (spread 0.01); the anchor (0.8, 0.8) measured 0.869 on 100,000 images ranks at
    # 0.868. The prediction is 1.2 spreads above: within the margin, so the anchor is served.
    drops = {b: {"0.0": 0.0, "0.4": 0.01, "0.8": 0.05} for b in ("a", "b")}
    error = PredictionError(bias=0.0, sd=0.01, n=40)
    original = Measured(("0.0", "0.0"), 0.90, 100_000, "original")
    near = _table(drops, measured=[original, Measured(("0.8", "0.8"), 0.869, 100_000, "anchor")], error=error)
    assert PREDICTED_PENALTY_SD > 1.2 and _serve(near, 1.25) == ["0.8", "0.8"]
    # 1.9 spreads above an anchor measured at 0.862: beyond the margin, the prediction is served.
    far = _table(drops, measured=[original, Measured(("0.8", "0.8"), 0.862, 100_000, "anchor")], error=error)
    assert PREDICTED_PENALTY_SD < 1.9 and _serve(far, 1.25) == ["0.4", "0.4"]
    assert told(far, ["0.4", "0.4"]).source == "predicted"


def test_served_value_never_falls_as_the_budget_grows() -> None:
    rng = random.Random(0)
    for trial in range(10):
        names = [f"b{i}" for i in range(4)]
        drops = {b: {"0.0": 0.0, "0.4": rng.uniform(0, 0.02), "0.8": rng.uniform(0.02, 0.06)} for b in names}
        measured = [Measured(tuple("0.0" for _ in names), 0.9, 2000, "original")]
        for sel in rng.sample(list(itertools.product(CHOICES, repeat=4)), 20):
            measured.append(Measured(sel, rng.uniform(0.75, 0.9), 2000, rng.choice(["anchor", "measured"])))
        table = _table(drops, measured=measured, error=PredictionError(0.005, 0.004, 20))
        values = []
        for budget in [1.2 + 0.2 * i for i in range(15)]:
            problem = parse_problem(to_problem(table, {"latency_ms": budget}))
            values.append(solve(problem).objective)
        assert all(b >= a - 1e-12 for a, b in zip(values, values[1:])), (trial, values)


def test_prediction_error_is_the_bias_and_spread_of_the_picks() -> None:
    err = prediction_error([(0.90, 0.88), (0.85, 0.84), (0.80, 0.80), (0.70, 0.67)])
    assert err.n == 4 and err.bias == pytest.approx(0.015)
    assert err.sd == pytest.approx(math.sqrt(((0.02 - 0.015) ** 2 + (0.01 - 0.015) ** 2 + 0.015 ** 2 + 0.015 ** 2) / 3))
    few = prediction_error([(0.9, 0.8)], fallback_sd=0.007)
    assert (few.bias, few.sd, few.n) == (0.0, 0.007, 1)
    assert standard_error(0.5, 100) == pytest.approx(0.05)


def test_a_paired_difference_counts_only_the_samples_the_two_disagree_on() -> None:
    # 1,000 samples, 900 right for both, a right alone on 30, b right alone on 20, both wrong on 50
    a = [True] * 900 + [True] * 30 + [False] * 20 + [False] * 50
    b = [True] * 900 + [False] * 30 + [True] * 20 + [False] * 50
    d = paired_difference(a, b)
    assert d.n == 1000 and d.difference == pytest.approx(0.01)
    per_sample = [1] * 30 + [-1] * 20 + [0] * 950
    sd = math.sqrt(sum((x - 0.01) ** 2 for x in per_sample) / 999)
    assert d.se == pytest.approx(sd / math.sqrt(1000))
    # tighter than two independent measurements of these accuracies would be
    assert d.se < 0.7 * math.hypot(standard_error(0.93, 1000), standard_error(0.92, 1000))
    assert paired_difference(a, a) == type(d)(0.0, 0.0, 1000)
    # k pairs at once: their mean difference, its error from each sample's mean over the pairs
    assert paired_difference([a, a], [b, b]) == d  # two identical pairs are no more evidence than one
    assert paired_difference([a, b], [b, a]) == type(d)(0.0, 0.0, 1000)  # opposite pairs cancel per sample
    with pytest.raises(ValueError, match="same samples"):
        paired_difference(a, b[:-1])
    with pytest.raises(ValueError, match="at least 2 samples"):
        paired_difference([True], [False])


def test_the_frontier_round_trips_and_bad_selections_are_named(tmp_path) -> None:
    from profiling.table import TableError, load, save

    drops = {b: {"0.0": 0.0, "0.4": 0.01, "0.8": 0.05} for b in ("a", "b")}
    table = _table(drops, measured=[Measured(("0.0", "0.0"), 0.9, 100, "original"),
                                    Measured(("0.4", "0.8"), 0.8, 100)], error=PredictionError(0.01, 0.02, 5))
    again = load(save(table, tmp_path / "t.json"))
    assert again.measured == table.measured and again.prediction_error == table.prediction_error
    data = table.to_dict()
    data["measured"][1]["selection"] = ["0.4", "0.9"]
    (tmp_path / "bad.json").write_text(__import__("json").dumps(data))
    with pytest.raises(TableError, match=r"measured\[1\]\.selection: .*block 'b' has no choice '0.9'"):
        load(tmp_path / "bad.json")
