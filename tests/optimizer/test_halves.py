"""Meet in the middle (`optimizer.halves`): one constraint, values nearly proportional to
usage (where Lagrangian pruning holds millions of states), ties, top-k; the same answers as
brute force, first while the halves are small and after the search passes its state limit."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

import optimizer.compiled as compiled
from optimizer import parse_problem, solve
from optimizer.compiled import HALVES_METHOD
from optimizer.halves import half_rows, split, top_pairs

# A real pipeline's table (ResNet-20 on Fashion-MNIST, the table stage's FLOPs-budget
# re-ranking without measured compositions): its drops are almost exactly proportional to
# the FLOPs a choice removes, so every selection that fills the budget ties with the
# Lagrangian bound. The block search passed its state limit on it, then the MILP's top 10
# took 275 s.
FLAT = Path(__file__).parent / "data" / "flops_calibrated_problem.json"


def _proportional(rng: random.Random, n_models: int, n_blocks: int, n_choices: int, noise: float) -> dict:
    """Drops proportional to the latency a choice saves, plus `noise`; one latency budget."""
    models = []
    for m in range(n_models):
        blocks = []
        for b in range(n_blocks):
            full = rng.uniform(2.0, 8.0)
            choices = []
            for c in range(n_choices):
                lat = full * (1 - c / n_choices)
                drop = 3e-4 * (full - lat) + (rng.uniform(0, noise) if c else 0.0)
                choices.append({"id": f"{c}", "accuracy_drop": drop, "latency_ms": lat, "memory_bytes": 100 - c})
            blocks.append({"name": f"b{b}", "choices": choices})
        models.append({"name": f"m{m}", "blocks": blocks})
    total = sum(max(c["latency_ms"] for c in b["choices"]) for m in models for b in m["blocks"])
    return {"models": models, "budgets": {"latency_ms": rng.uniform(0.3, 0.9) * total}}


def test_split_balances_the_halves():
    assert split([5] * 9) in (4, 5)
    assert half_rows([5] * 9) == 5**5
    assert split([2, 100, 2]) in (1, 2)
    assert half_rows([8] * 12) == 8**6


@pytest.mark.parametrize("noise", [0.0, 1e-7, 1e-5])
def test_proportional_drops_equal_brute_force(gen, noise):
    rng = random.Random(f"prop-{noise}")
    for _ in range(6):
        shape = rng.choice([(1, 6, 4), (1, 5, 5), (2, 3, 4)])
        raw = _proportional(rng, *shape, noise)
        solution = gen.assert_top_k_is_brute_force(raw, rng.choice([1, 3, 6]))
        assert solution.method == HALVES_METHOD


def test_ties_resolve_lexicographically(gen):
    rng = random.Random(4)
    for kind in ("zero", "equal", "identical"):
        raw = gen.degenerate(rng, 1, 5, 4, kind)
        raw["budgets"] = {"latency_ms": raw["budgets"].get("latency_ms") or 10.0}
        solution = gen.assert_top_k_is_brute_force(raw, 4)
        assert solution.method in (HALVES_METHOD, compiled.METHOD)  # many ties: the search may answer


def test_after_the_search_passes_its_state_limit(gen, monkeypatch):
    monkeypatch.setattr(compiled, "HALF_ROWS", 0)  # never first: only as the search's fallback
    rng = random.Random(7)
    raw = _proportional(rng, 1, 6, 5, 1e-6)
    solution = gen.assert_top_k_is_brute_force(raw, 5, lambda p, k: solve(parse_problem(p), top_k=k, node_limit=1))
    assert solution.method == HALVES_METHOD


def test_two_constraints_or_a_fitting_composition_keep_searching(gen):
    rng = random.Random(2)
    raw = _proportional(rng, 1, 5, 4, 1e-5)
    raw["budgets"]["memory_bytes"] = 10_000
    assert solve(parse_problem(raw)).method == compiled.METHOD
    del raw["budgets"]["memory_bytes"]
    assert solve(parse_problem(raw)).method == HALVES_METHOD
    # The smallest selection, measured well above its prediction: it fits any budget, and its
    # value is not a sum over blocks.
    model = raw["models"][0]
    model["base_accuracy"] = 0.9
    model["compositions"] = [{"selection": [b["choices"][-1]["id"] for b in model["blocks"]], "accuracy": 0.9}]
    solution = gen.assert_top_k_is_brute_force(raw, 3)
    assert solution.method == compiled.METHOD
    assert solution.selection[model["name"]] == model["compositions"][0]["selection"]


def test_top_pairs_cap_and_empty():
    values = [np.array([0.0, 0.0])] * 6
    usage = [np.array([1.0, 0.5])] * 6
    assert top_pairs(values, usage, 100.0, 1, 1e-12, pair_rows=10) is None  # every selection ties
    choices, value = top_pairs(values, usage, 1.0, 1, 1e-12)
    assert choices.shape == (0, 6) and not len(value)


def test_the_pipeline_table_that_took_minutes():
    raw = json.loads(FLAT.read_text())
    model = raw["models"][0]
    solution = solve(parse_problem(raw), top_k=10)
    assert solution.method == HALVES_METHOD
    # Brute force over all 5^9 selections, in NumPy: best value first, ties (float noise)
    # in lexicographic order of the choice indices.
    blocks = model["blocks"]
    value, usage = np.zeros(1), np.zeros(1)
    for b in blocks:
        value = (value[:, None] - np.array([c["accuracy_drop"] for c in b["choices"]])[None]).ravel()
        usage = (usage[:, None] + np.array([c["latency_ms"] for c in b["choices"]])[None]).ravel()
    fits = np.flatnonzero(usage <= raw["budgets"]["latency_ms"])
    best = fits[np.lexsort((fits, -np.round(value[fits], 11)))][:10]
    sizes = [len(b["choices"]) for b in blocks]
    want = [[b["choices"][d]["id"] for b, d in zip(blocks, np.unravel_index(i, sizes))] for i in best]
    got = [s.selection[model["name"]] for s in (solution, *solution.alternatives)]
    assert got == want
    assert all(math.isclose(s.objective, model["base_accuracy"] + value[i], abs_tol=1e-12) for s, i in zip(
        (solution, *solution.alternatives), best))


def test_fewer_feasible_selections_than_top_k(gen):
    raw = _proportional(random.Random(11), 1, 4, 3, 1e-6)
    blocks = raw["models"][0]["blocks"]
    smallest = sorted(sum(c) for c in itertools.product(*[[x["latency_ms"] for x in b["choices"]] for b in blocks]))
    raw["budgets"]["latency_ms"] = smallest[2]  # three selections fit (four if two tie)
    solution = gen.assert_top_k_is_brute_force(raw, 8)
    assert solution.method == HALVES_METHOD and 3 <= 1 + len(solution.alternatives) < 8
