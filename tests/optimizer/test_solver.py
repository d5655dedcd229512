"""Exactness of the search: brute force on small instances, the independent MILP on larger
ones, constraint checks on every answer, infeasibility, top-k and ties."""

from __future__ import annotations

import json
import math
import random

import pytest

from optimizer import Solution, parse_problem, solve
from optimizer.compiled import METHOD
from optimizer.milp import solve_milp
from optimizer.solver import evaluate


def _assert_satisfies(gen, raw, solution: Solution) -> None:
    feasible, objective, totals = gen.check(raw, solution.selection)
    assert feasible, f"returned selection violates a constraint: {solution.selection}"
    assert math.isclose(objective, solution.objective, rel_tol=0, abs_tol=1e-12)
    for key, value in totals.items():
        assert math.isclose(value, getattr(solution, key), rel_tol=1e-12, abs_tol=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_equals_brute_force_on_small_random_instances(gen, seed):
    rng = random.Random(seed)
    for _ in range(25):
        raw = gen.random(
            rng,
            rng.randint(1, 3),
            (1, 3),
            (1, 4),
            deadlines=rng.random() < 0.5,
            switch_budget=rng.random() < 0.4,
            penalty=rng.random() < 0.4,
            memory=rng.random() < 0.8,
            latency=rng.random() < 0.8,
        )
        every = gen.brute_force(raw)
        solution = solve(parse_problem(raw))
        if not every:
            assert not solution.feasible
            assert solution.selection == {} and solution.objective is None
            continue
        assert solution.feasible, solution.reason
        assert solution.selection == every[0][2]
        assert math.isclose(solution.objective, every[0][0], rel_tol=0, abs_tol=1e-12)
        _assert_satisfies(gen, raw, solution)


def test_ties_resolve_to_the_lexicographically_smallest_selection(gen):
    # Drops on a 1/64 grid with unit weights make equal objectives bit-identical.
    rng = random.Random(11)
    tied = 0
    for _ in range(60):
        raw = gen.random(rng, rng.randint(1, 2), (2, 3), (2, 4), quantum=1 / 64, tightness=rng.random())
        every = gen.brute_force(raw)
        if not every:
            continue
        tied += len(every) > 1 and every[1][0] == every[0][0]
        solution = solve(parse_problem(raw))
        assert solution.selection == every[0][2]
    assert tied >= 10  # the instances really do have tied optima


@pytest.mark.parametrize("seed", range(3))
def test_top_k_alternatives_are_the_true_next_best(gen, seed):
    rng = random.Random(100 + seed)
    for _ in range(15):
        raw = gen.random(rng, rng.randint(1, 2), (2, 3), (2, 4), deadlines=rng.random() < 0.3, penalty=rng.random() < 0.3)
        k = rng.randint(2, 7)
        every = gen.brute_force(raw)
        solution = solve(parse_problem(raw), top_k=k)
        if not every:
            assert not solution.feasible and solution.alternatives == []
            continue
        expected = every[:k]
        got = [solution, *solution.alternatives]
        assert len(got) == len(expected)
        assert [s.selection for s in got] == [e[2] for e in expected]
        for s, e in zip(got, expected):
            assert math.isclose(s.objective, e[0], rel_tol=0, abs_tol=1e-12)
            _assert_satisfies(gen, raw, s)


def _milp_cases():
    flags = [
        {},
        {"deadlines": True},
        {"switch_budget": True},
        {"penalty": True},
        {"deadlines": True, "switch_budget": True, "penalty": True},
    ]
    cases = []
    for i, shape in enumerate([(2, 6, 5), (3, 8, 6), (4, 8, 8), (6, 10, 8)]):
        for j, f in enumerate(flags):
            cases.append(pytest.param(shape, f, 1000 * i + j, id=f"{shape}-{'-'.join(f) or 'budgets'}"))
    return cases


@pytest.mark.parametrize(("shape", "flags", "seed"), _milp_cases())
def test_equals_independent_milp_on_larger_instances(gen, shape, flags, seed):
    rng = random.Random(seed)
    compared = 0
    for _ in range(3):
        raw = gen.random(rng, *shape, tightness=rng.uniform(0.15, 0.7), **flags)
        problem = parse_problem(raw)
        # Uniformly random tables are far harder than real ones; a generous state limit
        # keeps the search (not its MILP fallback) answering. Not with six deadlines: their
        # LP gap (~2% of the objective) leaves millions of selections inside the bounds.
        solution = solve(problem, node_limit=500_000)
        assert solution.method == METHOD or (shape[0] >= 6 and flags.get("deadlines"))
        reference = solve_milp(problem)
        if reference is None:
            assert not solution.feasible
            continue
        compared += 1
        assert solution.feasible, solution.reason
        assert math.isclose(solution.objective, reference[0], rel_tol=0, abs_tol=1e-9)
        _assert_satisfies(gen, raw, solution)
    assert compared >= 1


@pytest.mark.parametrize("tightness", [0.05, 0.2, 0.4, 0.7])
def test_equals_milp_on_realistic_tables(gen, tightness):
    rng = random.Random(int(tightness * 100))
    for shape in [(1, 8, 6), (4, 8, 6), (6, 10, 8)]:
        raw = gen.realistic(rng, *shape, tightness)
        problem = parse_problem(raw)
        solution = solve(problem)
        reference = solve_milp(problem)
        assert solution.feasible and reference is not None
        assert solution.method == METHOD
        assert math.isclose(solution.objective, reference[0], rel_tol=0, abs_tol=1e-9)
        _assert_satisfies(gen, raw, solution)


def test_milp_fallback_past_the_node_limit_is_exact(gen):
    rng = random.Random(5)
    raw = gen.random(rng, 3, 6, 6, tightness=0.3, deadlines=True)
    problem = parse_problem(raw)
    fallback = solve(problem, node_limit=1)
    assert fallback.method.startswith("milp")
    assert math.isclose(fallback.objective, solve(problem).objective, rel_tol=0, abs_tol=1e-9)
    _assert_satisfies(gen, raw, fallback)


def test_infeasible_budget_reports_minima(gen):
    rng = random.Random(3)
    raw = gen.random(rng, 2, 4, 3)
    lat_min, mem_min = gen.minima(raw)
    raw["budgets"] = {"latency_ms": lat_min * 0.99, "memory_bytes": mem_min * 10}
    solution = solve(parse_problem(raw))
    assert not solution.feasible
    assert solution.objective is None and solution.selection == {}
    assert math.isclose(solution.min_latency_ms, lat_min, rel_tol=1e-12)
    assert math.isclose(solution.min_memory_bytes, mem_min, rel_tol=1e-12)
    assert "latency budget" in solution.reason and "smallest achievable" in solution.reason


def test_jointly_infeasible_budgets(gen):
    # Each budget alone is achievable (by different selections) but not both together.
    raw = {
        "models": [
            {
                "name": "m",
                "blocks": [
                    {
                        "name": f"b{b}",
                        "choices": [
                            {"id": "fast", "accuracy_drop": 0.1, "latency_ms": 1.0, "memory_bytes": 100},
                            {"id": "small", "accuracy_drop": 0.1, "latency_ms": 5.0, "memory_bytes": 10},
                        ],
                    }
                    for b in range(4)
                ],
            }
        ],
        "budgets": {"latency_ms": 4.0, "memory_bytes": 40},
    }
    solution = solve(parse_problem(raw))
    assert gen.brute_force(raw) == []
    assert not solution.feasible
    assert solution.min_latency_ms == 4.0 and solution.min_memory_bytes == 40
    assert "together" in solution.reason


def test_boundary_budget_is_feasible_to_relative_tolerance(gen):
    rng = random.Random(8)
    raw = gen.random(rng, 1, 4, 3, memory=False)
    lat_min, _ = gen.minima(raw)
    raw["budgets"] = {"latency_ms": lat_min}  # exactly the fastest selection
    solution = solve(parse_problem(raw))
    assert solution.feasible
    assert math.isclose(solution.latency_ms, lat_min, rel_tol=1e-12)


def test_unconstrained_picks_the_best_choice_everywhere(gen):
    raw = gen.random(random.Random(1), 3, 5, 4, latency=False, memory=False)
    solution = solve(parse_problem(raw))
    for model in raw["models"]:
        expected = [min(b["choices"], key=lambda c: c["accuracy_drop"])["id"] for b in model["blocks"]]
        assert solution.selection[model["name"]] == expected


def test_deterministic_and_json_serializable(gen):
    raw = gen.realistic(random.Random(4), 4, 8, 6, 0.3)
    problem = parse_problem(raw)
    first, second = solve(problem, top_k=3), solve(problem, top_k=3)
    assert first.as_dict() == second.as_dict()
    text = json.dumps(first.as_dict())
    back = json.loads(text)
    assert back["selection"] == first.selection and len(back["alternatives"]) == 2
    assert set(back["per_model"]["m0"]) == {"latency_ms", "memory_bytes", "accuracy", "switch_bytes"}


def test_per_model_figures_add_up(gen):
    raw = gen.random(random.Random(9), 3, 4, 3, switch_budget=True, tightness=0.7)
    s = solve(parse_problem(raw))
    assert s.feasible
    assert math.isclose(sum(m["latency_ms"] for m in s.per_model.values()), s.latency_ms, rel_tol=1e-12)
    assert math.isclose(sum(m["memory_bytes"] for m in s.per_model.values()), s.memory_bytes, rel_tol=1e-12)
    assert math.isclose(sum(m["switch_bytes"] for m in s.per_model.values()), s.switch_bytes, rel_tol=1e-12)
    weighted = sum(m["weight"] * s.per_model[m["name"]]["accuracy"] for m in raw["models"])
    assert math.isclose(weighted, s.objective, rel_tol=0, abs_tol=1e-12)


def test_switch_penalty_keeps_the_current_selection_when_gains_are_small():
    def choice(cid: str, drop: float) -> dict:
        return {"id": cid, "accuracy_drop": drop, "latency_ms": 1.0, "memory_bytes": 1000, "load_bytes": 1000}

    raw = {
        "models": [{"name": "m", "blocks": [{"name": "b", "choices": [choice("0.0", 0.0), choice("0.2", 0.001)]}]}],
        "current": {"m": ["0.2"]},
        "switch_penalty_per_byte": 2e-6,  # switching costs 0.002 > the 0.001 gained
    }
    assert solve(parse_problem(raw)).selection == {"m": ["0.2"]}
    raw["switch_penalty_per_byte"] = 5e-7  # now it costs 0.0005 < 0.001
    switched = solve(parse_problem(raw))
    assert switched.selection == {"m": ["0.0"]}
    assert switched.switch_bytes == 1000


def test_evaluate_reports_violations():
    raw = {
        "models": [
            {
                "name": "m",
                "latency_deadline_ms": 1.5,
                "blocks": [{"name": "b", "choices": [{"id": "0.0", "accuracy_drop": 0, "latency_ms": 2.0, "memory_bytes": 10}]}],
            }
        ],
        "budgets": {"memory_bytes": 5},
    }
    result = evaluate(parse_problem(raw), {"m": ["0.0"]})
    assert not result.feasible
    assert "deadline" in result.reason and "memory" in result.reason


def test_bad_arguments():
    problem = parse_problem({"models": [{"name": "m", "blocks": [{"name": "b", "choices": [
        {"id": "0.0", "accuracy_drop": 0, "latency_ms": 1, "memory_bytes": 1}]}]}]})
    with pytest.raises(ValueError, match="top_k"):
        solve(problem, top_k=0)
    with pytest.raises(TypeError, match="parse_problem"):
        solve({"models": []})  # type: ignore[arg-type]


def test_edge_cases(gen):
    def block(name: str, *choices: tuple[str, float, float, float]) -> dict:
        return {
            "name": name,
            "choices": [{"id": c, "accuracy_drop": d, "latency_ms": l, "memory_bytes": m} for c, d, l, m in choices],
        }

    # Nothing to choose: one choice per block.
    raw = {"models": [{"name": "m", "blocks": [block("a", ("0.0", 0.0, 1.0, 1.0)), block("b", ("0.0", 0.0, 2.0, 1.0))]}]}
    only = solve(parse_problem(raw), top_k=3)
    assert only.feasible and only.selection == {"m": ["0.0", "0.0"]} and only.alternatives == []
    # Zero budgets with free choices; negative drops (a descendant measured better).
    raw = {
        "models": [{"name": "m", "blocks": [block("a", ("0.0", 0.0, 1.0, 5.0), ("0.5", -0.001, 0.0, 0.0))]}],
        "budgets": {"latency_ms": 0.0, "memory_bytes": 0.0},
    }
    zero = solve(parse_problem(raw))
    assert zero.selection == {"m": ["0.5"]} and zero.objective == pytest.approx(0.001)
    # top_k beyond the number of feasible selections returns them all.
    raw = gen.random(random.Random(21), 1, 2, 2, latency=False, memory=False)
    assert len(solve(parse_problem(raw), top_k=50).alternatives) == 3


def test_many_groups(gen):
    # 900 groups: deeper than the recursive search may go unless dominance and reduced-cost
    # fixing shrink it (else the MILP answers); exact either way.
    raw = gen.random(random.Random(2), 10, 90, 3, tightness=0.5)
    problem = parse_problem(raw)
    solution = solve(problem)
    assert solution.feasible
    assert math.isclose(solution.objective, solve_milp(problem)[0], rel_tol=0, abs_tol=1e-9)
    _assert_satisfies(gen, raw, solution)


def test_a_model_of_hundreds_of_blocks_is_solved_by_the_search():
    rng = random.Random(0)
    blocks = [
        {
            "name": f"b{b}",
            "choices": [
                {"id": "0.0", "accuracy_drop": 0.0, "latency_ms": 1.0, "memory_bytes": 10},
                {"id": "0.5", "accuracy_drop": rng.uniform(1e-4, 1e-2), "latency_ms": rng.uniform(0.2, 0.8), "memory_bytes": 5},
            ],
        }
        for b in range(820)
    ]
    raw = {"models": [{"name": "m", "blocks": blocks}], "budgets": {"latency_ms": 700.0}}
    problem = parse_problem(raw)
    solution = solve(problem)
    assert solution.method == METHOD and solution.feasible
    assert solution.latency_ms <= 700.0 * (1 + 1e-9)
    assert math.isclose(solution.objective, solve_milp(problem)[0], rel_tol=0, abs_tol=1e-9)
