"""solve_measured: re-solve under a tightened budget until the timed selection fits."""

from __future__ import annotations

import random

import pytest

from optimizer import evaluate, parse_problem, solve, solve_measured
from optimizer.problem import synthetic_problem


def _problem(tightness: float = 0.5, seed: int = 3):
    raw = synthetic_problem(random.Random(seed), n_models=2, n_blocks=4, n_choices=5, tightness=tightness)
    raw["budgets"]["memory_bytes"] = None
    return parse_problem(raw)


def _timer(problem, factor: float, overhead: float = 0.0):
    """A machine whose real latency is `factor` x the table's sum plus `overhead` ms."""
    calls: list[dict] = []

    def measure(selection):
        calls.append({k: list(v) for k, v in selection.items()})
        return factor * evaluate(problem, selection).latency_ms + overhead

    return measure, calls


def test_an_accurate_table_takes_one_round() -> None:
    problem = _problem()
    measure, calls = _timer(problem, 1.0)
    result = solve_measured(problem, measure)
    assert result.fits and len(result.rounds) == 1 == len(calls)
    assert result.solution.selection == solve(problem).selection


def test_an_optimistic_table_is_re_solved_until_the_measured_latency_fits() -> None:
    problem = _problem()
    plain = solve(problem)
    measure, calls = _timer(problem, 1.08)
    assert measure(plain.selection) > problem.budgets.latency_ms  # the plain pick runs over
    result = solve_measured(problem, measure)
    assert result.fits and result.measured_ms <= problem.budgets.latency_ms
    assert result.first_measured_ms > problem.budgets.latency_ms
    assert len(result.rounds) >= 2
    targets = [r.target_ms for r in result.rounds]
    assert targets == sorted(targets, reverse=True) and targets[0] == problem.budgets.latency_ms
    assert len({tuple(sum(r.selection.values(), [])) for r in result.rounds}) == len(result.rounds)
    # Nothing predicted to fit the tightened budget was left: the optimizer stays exact for it.
    assert result.solution.selection == result.rounds[-1].selection
    assert result.solution.objective <= plain.objective


def test_a_budget_no_selection_meets_returns_the_fastest_timed_and_says_so() -> None:
    problem = _problem(tightness=0.05)
    measure, _ = _timer(problem, 3.0)
    result = solve_measured(problem, measure, max_rounds=3)
    assert not result.fits
    assert result.measured_ms == min(r.measured_ms for r in result.rounds)
    assert result.measured_ms > problem.budgets.latency_ms


def test_bad_input_is_refused() -> None:
    problem = _problem()
    measure, _ = _timer(problem, 1.0)
    no_latency = parse_problem({**problem.to_dict(), "budgets": {"latency_ms": None}})
    with pytest.raises(ValueError, match="latency budget"):
        solve_measured(no_latency, measure)
    with pytest.raises(ValueError, match="max_rounds"):
        solve_measured(problem, measure, max_rounds=0)
    impossible = parse_problem({**problem.to_dict(), "budgets": {"latency_ms": 1e-6}})
    with pytest.raises(ValueError, match="no selection fits"):
        solve_measured(impossible, measure)
