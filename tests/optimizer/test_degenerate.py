"""Degenerate tables (ties everywhere: every drop zero or equal, identical choices, one
block dominating, many tied compositions): the same answers as brute force, ties resolved
to the lexicographically smallest selection, top-k included, without the MILP fallback;
and a state limit that bounds memory."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from optimizer import compile_problem, parse_problem, solve
from optimizer import search
from optimizer.compiled import METHOD
from optimizer.dominance import dominated

SLOW = Path(__file__).parent / "data" / "slow_problem.json"  # a real pipeline's problem: 12 blocks, all drops 0


@pytest.mark.parametrize("collapse", [0, search.COLLAPSE], ids=["dominance-everywhere", "default"])
@pytest.mark.parametrize("kind", ["zero", "equal", "identical", "dominant"])
def test_degenerate_tables_equal_brute_force(gen, monkeypatch, kind, collapse):
    # COLLAPSE 0 drops dominated states at every level and merge of every pass, so these
    # small instances check the dominance rules themselves, not only the default path.
    monkeypatch.setattr(search, "COLLAPSE", collapse)
    rng = random.Random(f"{kind}-{collapse}")
    tied = 0
    for _ in range(12):
        shape = rng.choice([(1, 5, 4), (1, 6, 3), (2, 3, 4), (3, 2, 4)])
        raw = gen.degenerate(rng, *shape, kind)
        if rng.random() < 0.5:
            gen.tied_compositions(rng, raw, rng.randint(1, 12))
        every = gen.brute_force(raw)
        tied += len(every) > 1 and every[0][0] == every[1][0]
        gen.assert_top_k_is_brute_force(raw, rng.choice([1, 1, 2, 5]))
    assert tied >= 6  # the optimum really is tied


@pytest.mark.parametrize("seed", range(3))
def test_dominance_keeps_random_tables_exact(gen, monkeypatch, seed):
    # Random tables with deadlines, switching and compositions, dominance at every step.
    monkeypatch.setattr(search, "COLLAPSE", 0)
    rng = random.Random(300 + seed)
    for _ in range(15):
        raw = gen.random(rng, rng.randint(1, 3), (1, 3), (1, 4), deadlines=rng.random() < 0.4,
                         switch_budget=rng.random() < 0.3, penalty=rng.random() < 0.3,
                         quantum=1 / 64 if rng.random() < 0.5 else None)
        if rng.random() < 0.5:
            gen.compositions(rng, raw)
        gen.assert_top_k_is_brute_force(raw, rng.randint(1, 4))


def _lexicographic_first(raw: dict, k: int) -> list[list[str]]:
    """The k lexicographically smallest selections of the slow problem's one model that meet
    the latency budget and are not measured below their prediction (every free selection
    ties there: all drops are 0): a depth-first walk in lexicographic order."""
    model = raw["models"][0]
    lat = [[c["latency_ms"] for c in b["choices"]] for b in model["blocks"]]
    ids = [[c["id"] for c in b["choices"]] for b in model["blocks"]]
    worse = {tuple(c["selection"]) for c in model.get("compositions", []) if c["accuracy"] < model["base_accuracy"]}
    budget = raw["budgets"]["latency_ms"] * (1 + 1e-9)
    least = [sum(min(x) for x in lat[g:]) for g in range(len(lat))] + [0.0]
    out: list[list[str]] = []

    def walk(g: int, picks: list[str], used: float) -> None:
        if len(out) == k:
            return
        if g == len(lat):
            if tuple(picks) not in worse:
                out.append(picks)
            return
        for c, cost in enumerate(lat[g]):
            if used + cost + least[g + 1] <= budget:
                walk(g + 1, [*picks, ids[g][c]], used + cost)

    walk(0, [], 0.0)
    return out


@pytest.mark.parametrize("compositions", [True, False])
@pytest.mark.parametrize("k", [1, 4])
def test_slow_problem_is_solved_by_the_search(compositions, k):
    raw = json.loads(SLOW.read_text())
    if not compositions:
        for model in raw["models"]:
            model["compositions"] = []
    assert all(c["accuracy_drop"] == 0 for m in raw["models"] for b in m["blocks"] for c in b["choices"])
    solution = solve(parse_problem(raw), top_k=k)
    assert solution.method == METHOD and solution.nodes < 20_000
    got = [s.selection["mobilenetv3_small"] for s in (solution, *solution.alternatives)]
    assert got == _lexicographic_first(raw, k)


def test_state_limit_bounds_memory():
    # Without dominance the slow problem's pass holds tens of millions of tied selections:
    # it must stop at the limit having allocated about that many rows (it took 1.4 GB).
    compiled = compile_problem(SLOW)
    problem = compiled.problem()
    con = compiled._constraints(problem)
    limits = np.array([problem.budgets.latency_ms * (1 + 1e-9)])
    b = search.bounds(con.layout, np.zeros((1, 1)), limits)
    tracemalloc.start()
    try:
        with pytest.raises(search.StateLimit):
            search.run_pass(b, b.upper_bound - 1e-9, 200_000)  # the default node_limit
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40e6, f"peak {peak / 1e6:.0f} MB before the state limit stopped the pass"


def test_a_levels_dominated_items_are_tested_among_its_real_items(gen, monkeypatch):
    # 7 blocks of 4 choices: chunks of 5 and 2 blocks, so level 1 holds 16 items and 1,008
    # padding (-inf) entries, which must not make distinct values look tied.
    calls = []
    monkeypatch.setattr(search, "dominated", lambda *a, **k: calls.append(a) or dominated(*a, **k))
    distinct = gen.random(random.Random(3), 1, 7, 4)
    problem = parse_problem(distinct)
    lay = compile_problem(problem)._constraints(problem).layout
    real = lay.valid.sum(axis=2)[:, 0].tolist()
    assert lay.valid.shape[:2] == (2, 1) and real == [1024, 16]
    assert [lay.dominated_items(level, 0, 1, 1e-12) for level in range(2)] == [None, None] and not calls
    # All drops 0: every item ties, and those a smaller item beats on both costs are dropped.
    zero = gen.degenerate(random.Random(3), 1, 7, 4, "zero")
    problem = parse_problem(zero)
    lay = compile_problem(problem)._constraints(problem).layout
    for level, n in enumerate(real):
        gone = lay.dominated_items(level, 0, 1, 1e-12)
        assert gone is not None and gone[:n].any() and not gone[n:].any()
    assert len(calls) == 2


def test_dominated_counts_lexicographically_smaller_dominators():
    value = np.array([0.0, 0.0, 0.0, 1.0, 0.0])
    usage = np.array([[3.0, 2.0, 2.5, 9.0, 2.0]])
    # Rows 2 and 4 have one dominator each (row 1); row 3 is worth more than every row before it ...
    assert dominated(value, usage, 1, 0.0).tolist() == [False, False, True, False, True]
    assert dominated(value, usage, 2, 0.0).tolist() == [False, False, False, False, False]
    # ... and a row that may not dominate (a prefix of a worse composition) does not count.
    can = np.array([True, False, True, True, True])
    assert dominated(value, usage, 1, 0.0, can).tolist() == [False, False, False, False, False]
