"""Frontiers: what a prepared problem reads instead of searching the blocks must give the
search's answer, ties and measured compositions included."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from optimizer import compile_problem
from optimizer.compiled import FRONTIER_METHOD, METHOD
from optimizer.frontier import model_frontier
from optimizer.problem import synthetic_budgets


def _brute_best(value, usage, sizes, gains, lat, mem):
    """Index tuple of the best selection within (lat, mem), ties to the lexicographically smallest."""
    best = None
    for sel in itertools.product(*[range(s) for s in sizes]):
        v = 0.0
        for b, c in enumerate(sel):
            v += value[c, b]
        v += gains.get(sel, 0.0)
        u = [sum(usage[d, c, b] for b, c in enumerate(sel)) for d in range(2)]
        if u[0] <= lat and u[1] <= mem and (best is None or v > best[0] + 1e-12):
            best = (v, sel)
    return None if best is None else best[1]


@pytest.mark.parametrize("seed", range(4))
def test_a_frontier_holds_the_best_selection_under_every_budget(seed):
    """Coarse values and usages make exact ties and equal usages common; compositions worth
    more and less than their sum are among the selections."""
    rng = np.random.default_rng(seed)
    checked = 0
    for _ in range(40):
        B, C = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        sizes = rng.integers(1, C + 1, B).tolist()
        value = -rng.integers(0, 3, (C, B)) / 1024
        usage = np.stack([rng.integers(1, 5, (C, B)) / 2, rng.integers(1, 4, (C, B)).astype(float)])
        every = list(itertools.product(*[range(s) for s in sizes]))
        comps = [(list(every[rng.integers(len(every))]), float(rng.choice([-2, 0, 1]) / 1024)) for _ in range(rng.integers(0, 3))]
        gains: dict[tuple[int, ...], float] = {}
        for row, gain in comps:
            gains[tuple(row)] = max(gain, gains.get(tuple(row), -np.inf))
        front = model_frontier(value, usage, sizes, 1e-9, comps)
        assert front is not None and len(front.value) <= len(every)
        assert (np.diff([int(np.ravel_multi_index(r, sizes)) for r in front.choice]) > 0).all()  # lexicographic
        lats = sorted({sum(usage[0, c, b] for b, c in enumerate(s)) for s in every})
        mems = sorted({sum(usage[1, c, b] for b, c in enumerate(s)) for s in every})
        for lat in lats[:: max(1, len(lats) // 4)]:
            for mem in mems[:: max(1, len(mems) // 3)]:
                expected = _brute_best(value, usage, sizes, gains, lat, mem)
                fits = (front.usage[0] <= lat) & (front.usage[1] <= mem)
                if expected is None:
                    assert not fits.any()
                    continue
                top = front.value[fits].max()
                assert tuple(front.choice[np.flatnonzero(fits & (front.value >= top - 1e-12))[0]]) == expected
                checked += 1
    assert checked > 100


def test_rows_are_matched_against_compositions_a_block_at_a_time(monkeypatch):
    from optimizer import frontier

    rng = np.random.default_rng(1)
    rows, table = rng.integers(0, 3, (50, 4)), rng.integers(0, 3, (7, 4))
    expected = [tuple(r) in set(map(tuple, table)) for r in rows]
    monkeypatch.setattr(frontier, "_COMPARED", 30)  # 1 row per block
    assert frontier._rows_in(rows, table).tolist() == expected
    monkeypatch.undo()
    assert frontier._rows_in(rows, table).tolist() == expected and any(expected)


def test_the_dual_grid_is_the_dual_under_any_budgets(gen):
    from optimizer.dual import _GRID, Relaxation, dual_grid

    compiled = compile_problem(gen.realistic(random.Random(4), 3, 5, 4, 0.5))
    V, A = compiled._value, np.stack([compiled._lat, compiled._mem])
    con = compiled._constraints(compiled.problem())
    assert con.sources == ["latency_ms", "memory_bytes"]
    scale = con.scale
    grid = dual_grid(Relaxation(V, A, np.zeros(2), compiled._start[:-1], np.zeros(0), np.zeros((2, 0)), np.zeros(0, dtype=np.intp)), scale)
    assert len(grid.lams) == 65**2 and (grid.lams >= 0).all()
    for limits in (np.array([3.0, 2e6]), np.array([9.0, 5e5])):
        rel = Relaxation(V, A, limits, compiled._start[:-1], np.zeros(0), np.zeros((2, 0)), np.zeros(0, dtype=np.intp))
        f = rel.dual(grid.lams)
        assert np.allclose(grid.part + grid.lams @ limits, f, rtol=1e-12, atol=1e-12)
        assert rel.dual(grid.lams[grid.best(limits)][None])[0] <= f.min() + 1e-9 * abs(f.min())
    n = len(_GRID)
    for i, j in ((10, 0), (5, 7), (0, 30)):  # more frugal points: each nonzero multiplier a grid ratio up per step
        point = i * n + j
        for steps in (1, 3):
            ratio = grid.lams[grid.larger(point, steps)] / np.where(grid.lams[point] > 0, grid.lams[point], 1.0)
            on = grid.lams[point] > 0
            assert np.allclose(ratio[on], (_GRID[2] / _GRID[1]) ** steps) and (ratio[~on] == 0).all()
    corner = len(grid.lams) - 1  # the largest multipliers: nothing larger; zeros stay zero
    assert grid.larger(corner, 3) == corner and grid.larger(0, 3) == 0 and grid.larger(n - 2, 3) == n - 1
    with pytest.raises(ValueError, match="one or two constraints"):
        dual_grid(rel, np.ones(3))


def test_first_values_read_from_the_grid_equal_those_computed_per_multiplier(gen):
    from optimizer.dual import core_parts, core_selections

    raw = gen.realistic(random.Random(6), 3, 5, 4, 0.5)
    raw["models"][1]["blocks"][2]["choices"] = raw["models"][1]["blocks"][2]["choices"][:1]  # a block with no second choice
    compiled = compile_problem(raw)
    V, A = compiled._value, np.stack([compiled._lat, compiled._mem])
    rng = np.random.default_rng(0)
    lams = np.concatenate([np.zeros((1, 2)), rng.uniform(0, 1, (300, 2)) * [0.05, 1e-7]])  # past one batch
    n_core = 16  # more than the 14 blocks with a second choice: the rest of each row is padding
    parts = core_parts(V, A, lams, n_core)
    assert (parts.n == 14).all()
    limits = np.array([raw["budgets"]["latency_ms"], raw["budgets"]["memory_bytes"]])
    found = 0
    for p in range(len(lams)):
        for count in (1, 5):
            alone = core_selections(V, A, limits, lams[p], n_core, count)
            read = core_selections(V, A, limits, lams[p], n_core, count, parts=(parts, p))
            assert np.array_equal(alone[0], read[0]) and np.array_equal(alone[1], read[1])
            if len(read[1]):
                found += 1
                cols = np.arange(V.shape[1])
                assert np.allclose(V[read[0], cols].sum(axis=1), read[1], rtol=0, atol=1e-12)
                assert (A[:, read[0], cols].sum(axis=2) <= limits[:, None] + 1e-9).all()
                assert len({tuple(s) for s in read[0]}) == len(read[0])  # distinct selections
    assert found > 100
    for p in range(0, len(lams), 60):  # every contested group is in the core: brute force over its two best choices
        R = V - np.tensordot(lams[p], A, axes=1)
        ranked = np.argsort(-R, axis=0, kind="stable")
        free = [g for g in range(V.shape[1]) if np.isfinite(R[ranked[1, g], g])]
        sel = np.repeat(ranked[:1], 2 ** len(free), axis=0)  # (2^n, G)
        sel[:, free] = ranked[np.array(list(itertools.product((0, 1), repeat=len(free)))), free]
        cols = np.arange(V.shape[1])
        fits = (A[:, sel, cols].sum(axis=2) <= limits[:, None]).all(axis=0)
        best = V[sel, cols].sum(axis=1)[fits].max(initial=-np.inf)
        read = core_selections(V, A, limits, lams[p], n_core, 1, parts=(parts, p))[1]
        assert (best == -np.inf and not len(read)) or abs(read[0] - best) <= 1e-12


def test_a_frontier_past_its_cap_is_not_built():
    value = np.zeros((4, 6))  # every selection worth the same: only usage separates them
    usage = np.stack([np.arange(4.0)[:, None].repeat(6, 1), 3.0 - np.arange(4.0)[:, None].repeat(6, 1)])
    assert model_frontier(value, usage, [4] * 6, 1e-9, cap=5) is None
    assert model_frontier(value, usage, [4] * 6, 1e-9) is not None


def _compare(raw) -> bool:
    """Whether the frontiers answered; asserts their answer equals the search's."""
    searched = compile_problem(raw).solve()
    prepared = compile_problem(raw, frontiers=True)
    read = prepared.solve()
    assert read.feasible == searched.feasible, (read.reason, searched.reason)
    if searched.feasible:
        assert read.selection == searched.selection
        assert math.isclose(read.objective, searched.objective, rel_tol=0, abs_tol=1e-12)
    return read.method == FRONTIER_METHOD


def _brute_force_reads(gen, rng: random.Random, models: tuple[int, int]) -> int:
    """Solves 25 random prepared problems of `models` (low, high) models, each checked against
    brute force; returns how many the frontiers answered."""
    read = 0
    for _ in range(25):
        raw = gen.random(rng, rng.randint(*models), (1, 3), (1, 4), deadlines=rng.random() < 0.4,
                         memory=rng.random() < 0.8, latency=rng.random() < 0.8,
                         quantum=1 / 64 if rng.random() < 0.4 else None)
        if rng.random() < 0.5:
            gen.compositions(rng, raw)
        solution = gen.assert_top_k_is_brute_force(raw, 1, lambda raw, k: compile_problem(raw, frontiers=True).solve(top_k=k))
        read += solution.method == FRONTIER_METHOD
    return read


@pytest.mark.parametrize("seed", range(4))
def test_a_prepared_problem_equals_brute_force(gen, seed):
    assert _brute_force_reads(gen, random.Random(300 + seed), (1, 3)) >= 15  # the frontiers answered most of them


@pytest.mark.parametrize("seed", range(2))
def test_merge_steps_sorted_by_value_equal_brute_force(gen, seed, monkeypatch):
    from optimizer import frontier

    monkeypatch.setattr(frontier, "_ALL_PAIRS", 0)  # every merge step builds only the pairs passing its value test
    assert _brute_force_reads(gen, random.Random(500 + seed), (2, 4)) >= 10


@pytest.mark.parametrize("all_pairs", [None, 0])
@pytest.mark.parametrize("shape", [(1, 10, 8), (2, 8, 6), (3, 9, 6), (4, 8, 6)])
def test_a_prepared_problem_equals_the_search_on_realistic_tables(gen, shape, all_pairs, monkeypatch):
    if all_pairs is not None:  # every merge step sorted by value, as large ones are
        monkeypatch.setattr("optimizer.frontier._ALL_PAIRS", all_pairs)
    rng = random.Random(str(shape))
    read = 0
    for measured in (False, True):
        raw = gen.realistic(rng, *shape, 0.5)
        if measured:
            gen.compositions(rng, raw)
        for tightness in (0.05, 0.2, 0.5, 0.9):
            raw["budgets"] = synthetic_budgets(raw["models"], tightness)
            read += _compare(raw)
    assert read >= 4  # at least the tables without compositions (with them a loose bound may leave it to the search)


def test_a_prepared_problem_on_a_degenerate_table_equals_the_search(gen):
    rng = random.Random(7)
    for kind in ("zero", "equal", "identical"):
        raw = gen.degenerate(rng, 1, 8, 5, kind)
        gen.tied_compositions(rng, raw, 50)
        assert _compare(raw)


def test_switching_costs_and_top_k_search_the_blocks(gen):
    rng = random.Random(5)
    raw = gen.random(rng, 2, 4, 3, penalty=True)
    prepared = compile_problem(raw, frontiers=True)
    assert prepared.solve().method == METHOD  # the penalty changes values: frontiers do not hold
    raw = gen.random(rng, 1, 4, 3)
    prepared = compile_problem(raw, frontiers=True)
    assert prepared.solve().method == FRONTIER_METHOD
    assert prepared.solve(top_k=3).method == METHOD


def test_a_model_past_the_cap_keeps_searching(gen):
    raw = gen.degenerate(random.Random(3), 1, 6, 4, "zero")
    compiled = compile_problem(raw)
    assert not compiled.prepare(cap=3)
    assert compiled.solve().method == METHOD
    assert compiled.prepare()
    assert compiled.solve().method == FRONTIER_METHOD


def test_an_infeasible_prepared_problem_says_why(gen):
    raw = gen.random(random.Random(9), 2, 3, 3)
    raw["budgets"] = {"latency_ms": 1e-6}
    solution = compile_problem(raw, frontiers=True).solve()
    assert not solution.feasible and "latency budget" in solution.reason


def test_a_merge_past_the_pair_cap_is_left_to_the_search(gen, monkeypatch):
    import functools

    from optimizer import frontier

    raw = gen.realistic(random.Random(3), 3, 6, 5, 0.3)
    assert _compare(raw)
    monkeypatch.setattr(frontier, "_ALL_PAIRS", 0)  # the cap counts the pairs a sorted step would build
    assert _compare(raw)
    monkeypatch.setattr("optimizer.compiled.best_rows", functools.partial(frontier.best_rows, pair_cap=1))
    assert not _compare(raw)  # the same answer, from the search


@pytest.mark.parametrize("models, limit", [(2, "MERGE_ROWS_PAIR"), (3, "MERGE_ROWS_FEW"), (6, "MERGE_ROWS")])
def test_several_models_past_the_merge_size_keep_searching(gen, monkeypatch, models, limit):
    raw = gen.realistic(random.Random(2), models, 6, 5, 0.4)
    assert compile_problem(raw, frontiers=True).solve().method == FRONTIER_METHOD
    monkeypatch.setattr(f"optimizer.compiled.{limit}", 10)
    compiled = compile_problem(raw, frontiers=True)
    assert compiled.solve().method == METHOD
    monkeypatch.undo()
    assert _compare(raw)
