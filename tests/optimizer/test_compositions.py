"""Measured compositions: a model whose selection is one of its compositions is worth the
measured accuracy (the higher, if listed twice), never the additive prediction. Checked
against brute force, against the MILP (whose formulation is itself checked against brute
force), and on hand-made cases where the prediction and the measurement disagree."""

from __future__ import annotations

import math
import random

import pytest

from optimizer import evaluate, parse_problem, solve
from optimizer.compiled import METHOD
from optimizer.milp import solve_milp, solve_milp_top_k


def _choice(cid: str, drop: float, latency: float) -> dict:
    return {"id": cid, "accuracy_drop": drop, "latency_ms": latency, "memory_bytes": 100}


def _two_block_model(compositions: list[dict]) -> dict:
    blocks = [
        {"name": f"b{b}", "choices": [_choice("0.0", 0.0, 2.0), _choice("0.5", 0.01, 1.0), _choice("0.8", 0.03, 0.5)]}
        for b in range(2)
    ]
    return {"name": "m", "base_accuracy": 0.9, "blocks": blocks, "compositions": compositions}


@pytest.mark.parametrize("seed", range(6))
def test_equals_brute_force_with_compositions(gen, seed):
    rng = random.Random(500 + seed)
    for _ in range(20):
        raw = gen.random(rng, rng.randint(1, 3), (1, 3), (1, 4), deadlines=rng.random() < 0.3,
                         switch_budget=rng.random() < 0.3, penalty=rng.random() < 0.3)
        gen.compositions(rng, raw)
        gen.assert_top_k_is_brute_force(raw, rng.randint(1, 4))


@pytest.mark.parametrize("seed", range(3))
def test_milp_models_compositions_exactly(gen, seed):
    # The cross-check itself: HiGHS's k best against brute force, compositions included.
    rng = random.Random(700 + seed)
    for _ in range(8):
        raw = gen.compositions(rng, gen.random(rng, rng.randint(1, 2), (2, 3), (2, 3), penalty=rng.random() < 0.5), (2, 5))
        every = gen.brute_force(raw)
        found = solve_milp_top_k(parse_problem(raw), 3)
        assert len(found) == min(3, len(every))
        for (value, _), expected in zip(found, every):
            assert math.isclose(value, expected[0], rel_tol=0, abs_tol=1e-9)


@pytest.mark.parametrize("tightness", [0.1, 0.3, 0.6])
def test_equals_milp_with_compositions_on_realistic_tables(gen, tightness):
    rng = random.Random(int(tightness * 1000))
    for shape in [(1, 8, 6), (3, 8, 6), (5, 10, 8)]:
        raw = gen.compositions(rng, gen.realistic(rng, *shape, tightness), (2, 6))
        problem = parse_problem(raw)
        solution = solve(problem)
        reference = solve_milp(problem)
        assert solution.method == METHOD and reference is not None
        assert math.isclose(solution.objective, reference[0], rel_tol=0, abs_tol=1e-9)
        feasible, objective, _ = gen.check(raw, solution.selection)
        assert feasible and math.isclose(objective, solution.objective, rel_tol=0, abs_tol=1e-12)


def test_a_composition_measured_below_its_prediction_is_worth_the_measurement():
    # Unconstrained, the additive optimum is the original everywhere (0.9); measured, it is 0.85,
    # so the best is a free selection one step down (0.89).
    raw = {"models": [_two_block_model([{"selection": ["0.0", "0.0"], "accuracy": 0.85}])]}
    solution = solve(parse_problem(raw))
    assert solution.selection == {"m": ["0.0", "0.5"]}
    assert solution.objective == pytest.approx(0.89)
    assert solution.accuracy_source == {"m": "predicted"}
    measured = evaluate(parse_problem(raw), {"m": ["0.0", "0.0"]})
    assert measured.objective == pytest.approx(0.85) and measured.accuracy_source == {"m": "measured"}


def test_a_composition_measured_above_its_prediction_wins_and_says_so():
    # Under a latency budget of 1.5 ms the additive best is 0.8/0.8 (0.84) or 0.5/0.8 (0.86);
    # the measured 0.5/0.8 at 0.88 must be chosen and reported as measured.
    raw = {
        "models": [_two_block_model([{"selection": ["0.5", "0.8"], "accuracy": 0.88}])],
        "budgets": {"latency_ms": 1.5},
    }
    solution = solve(parse_problem(raw), top_k=2)
    assert solution.selection == {"m": ["0.5", "0.8"]} and solution.objective == pytest.approx(0.88)
    assert solution.accuracy_source == {"m": "measured"}
    runner_up = solution.alternatives[0]
    assert runner_up.selection == {"m": ["0.8", "0.5"]} and runner_up.accuracy_source == {"m": "predicted"}
    assert runner_up.objective == pytest.approx(0.86)


def test_a_selection_listed_twice_counts_at_its_higher_accuracy():
    comps = [{"selection": ["0.5", "0.5"], "accuracy": 0.80}, {"selection": ["0.5", "0.5"], "accuracy": 0.95}]
    raw = {"models": [_two_block_model(comps)]}
    solution = solve(parse_problem(raw))
    assert solution.selection == {"m": ["0.5", "0.5"]} and solution.objective == pytest.approx(0.95)


def test_weights_scale_measured_accuracy():
    model = _two_block_model([{"selection": ["0.8", "0.8"], "accuracy": 0.9}])
    model["weight"] = 2.0
    raw = {"models": [model], "budgets": {"latency_ms": 1.0}}  # only 0.8/0.8 fits
    solution = solve(parse_problem(raw))
    assert solution.objective == pytest.approx(1.8) and solution.per_model["m"]["accuracy"] == pytest.approx(0.9)
