"""Instance generators and an independent brute force for the optimizer tests.

Realistic tables come from `optimizer.problem.synthetic_problem`, the generator the
benchmark times, so the MILP comparisons check the very instances it reports on.
`add_compositions` gives models measured whole-model selections.

The brute force recomputes objective and constraints itself (it does not use the solver's
`evaluate`), so a shared bug cannot hide.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from typing import Any

import pytest

from optimizer import parse_problem, solve
from optimizer.problem import synthetic_problem

REL_TOL = 1e-9


def make_random(
    rng: random.Random,
    n_models: int,
    n_blocks: int | tuple[int, int],
    n_choices: int | tuple[int, int],
    *,
    deadlines: bool = False,
    switch_budget: bool = False,
    penalty: bool = False,
    memory: bool = True,
    latency: bool = True,
    tightness: float | None = None,
    quantum: float | None = None,
) -> dict[str, Any]:
    """Uniformly random tables (no structure): the hardest case for dominance and bounds.

    `quantum` rounds drops to a multiple (with quantum a power of two, ties are exact).
    """

    def count(spec: int | tuple[int, int]) -> int:
        return spec if isinstance(spec, int) else rng.randint(*spec)

    models = []
    for m in range(n_models):
        blocks = []
        for b in range(count(n_blocks)):
            choices = []
            for d in range(count(n_choices)):
                drop = rng.uniform(0.0, 0.05)
                if quantum:
                    drop = round(drop / quantum) * quantum
                choice = {
                    "id": f"{d / 10:.1f}",
                    "accuracy_drop": drop,
                    "latency_ms": rng.uniform(0.05, 2.0),
                    "memory_bytes": rng.randint(1_000, 200_000),
                }
                if rng.random() < 0.5:
                    choice["load_bytes"] = rng.randint(500, 200_000)
                choices.append(choice)
            blocks.append({"name": f"b{b}", "choices": choices})
        models.append(
            {
                "name": f"m{m}",
                "weight": rng.choice([0.5, 1.0, 2.0]) if not quantum else 1.0,
                "base_accuracy": rng.uniform(0.8, 0.95) if not quantum else 0.875,
                "blocks": blocks,
            }
        )

    def between(values_min: float, values_max: float) -> float:
        t = rng.random() if tightness is None else tightness
        return values_min + t * (values_max - values_min)

    def span(key: str, blocks: list[dict]) -> tuple[float, float]:
        lo = sum(min(c[key] for c in b["choices"]) for b in blocks)
        hi = sum(max(c[key] for c in b["choices"]) for b in blocks)
        return lo, hi

    every = [b for m in models for b in m["blocks"]]
    budgets: dict[str, Any] = {}
    if latency:
        budgets["latency_ms"] = between(*span("latency_ms", every))
    if memory:
        budgets["memory_bytes"] = between(*span("memory_bytes", every))
    problem: dict[str, Any] = {"models": models, "budgets": budgets}
    if deadlines:
        for m in models:
            if rng.random() < 0.7:
                m["latency_deadline_ms"] = between(*span("latency_ms", m["blocks"]))
    if switch_budget or penalty:
        problem["current"] = {
            m["name"]: [rng.choice(b["choices"])["id"] for b in m["blocks"]] for m in models if rng.random() < 0.9
        }
    if switch_budget:
        loads = [max(c.get("load_bytes", c["memory_bytes"]) for c in b["choices"]) for b in every]
        budgets["switch_bytes"] = rng.uniform(0.05, 0.6) * sum(loads)
    if penalty:
        problem["switch_penalty_per_byte"] = rng.choice([1e-8, 1e-7, 1e-6])
    return problem


def add_compositions(rng: random.Random, problem: dict[str, Any], count: tuple[int, int] = (1, 4)) -> dict[str, Any]:
    """Give each model a few measured compositions (in place; returns the problem).

    Selections are random or the model's best choices per block; their accuracy is the
    additive prediction moved up or down by up to 0.03 (so some beat every free selection
    and some are worse than their prediction), exactly the prediction, or a repeat of an
    earlier composition with another accuracy (the higher counts).
    """
    for model in problem["models"]:
        comps = []
        for _ in range(rng.randint(*count)):
            if comps and rng.random() < 0.2:
                comps.append({"selection": list(comps[-1]["selection"]), "accuracy": comps[-1]["accuracy"] + rng.uniform(-0.02, 0.02)})
                continue
            if rng.random() < 0.3:
                picks = [min(b["choices"], key=lambda c: c["accuracy_drop"]) for b in model["blocks"]]
            else:
                picks = [rng.choice(b["choices"]) for b in model["blocks"]]
            predicted = model.get("base_accuracy", 0.0) - sum(c["accuracy_drop"] for c in picks)
            shift = 0.0 if rng.random() < 0.15 else rng.uniform(-0.03, 0.03)
            comps.append({"selection": [c["id"] for c in picks], "accuracy": max(0.0, predicted + shift)})
        model["compositions"] = comps
    return problem


def _within(total: float, budget: float | None) -> bool:
    return budget is None or total <= budget + REL_TOL * abs(budget)


def check(problem: dict[str, Any], selection: dict[str, list[str]]) -> tuple[bool, float, dict[str, float]]:
    """(feasible, objective, totals) of a selection, computed from the raw JSON form."""
    budgets = problem.get("budgets") or {}
    current = problem.get("current") or {}
    objective = 0.0
    total_lat = total_mem = total_switch = 0.0
    feasible = True
    for model in problem["models"]:
        ids = selection[model["name"]]
        accuracy = model.get("base_accuracy", 0.0)
        measured = [c["accuracy"] for c in model.get("compositions", []) if list(c["selection"]) == list(ids)]
        lat = 0.0
        for b, (block, choice_id) in enumerate(zip(model["blocks"], ids)):
            choice = next(c for c in block["choices"] if c["id"] == choice_id)
            accuracy -= choice["accuracy_drop"]
            lat += choice["latency_ms"]
            total_mem += choice["memory_bytes"]
            running = current.get(model["name"])
            if running is not None and running[b] != choice_id:
                total_switch += choice.get("load_bytes", choice["memory_bytes"])
        if measured:
            accuracy = max(measured)
        objective += model.get("weight", 1.0) * accuracy
        total_lat += lat
        feasible &= _within(lat, model.get("latency_deadline_ms"))
    objective -= problem.get("switch_penalty_per_byte", 0.0) * total_switch
    feasible &= _within(total_lat, budgets.get("latency_ms"))
    feasible &= _within(total_mem, budgets.get("memory_bytes"))
    feasible &= _within(total_switch, budgets.get("switch_bytes"))
    return feasible, objective, {"latency_ms": total_lat, "memory_bytes": total_mem, "switch_bytes": total_switch}


def brute_force(problem: dict[str, Any]) -> list[tuple[float, tuple[int, ...], dict[str, list[str]]]]:
    """Every feasible selection as (objective, flat choice indices, selection), best first;
    equal objectives in lexicographic order of the indices."""
    models = problem["models"]
    ranges = [range(len(b["choices"])) for m in models for b in m["blocks"]]
    out = []
    for flat in itertools.product(*ranges):
        selection, at = {}, 0
        for m in models:
            picks = flat[at : at + len(m["blocks"])]
            selection[m["name"]] = [b["choices"][d]["id"] for b, d in zip(m["blocks"], picks)]
            at += len(m["blocks"])
        feasible, objective, _ = check(problem, selection)
        if feasible:
            out.append((objective, flat, selection))
    out.sort(key=lambda t: (-t[0], t[1]))
    return out


def assert_top_k_is_brute_force(problem: dict[str, Any], k: int, solver: Callable[[dict[str, Any], int], Any] | None = None) -> Any:
    """The solver's best k selections are brute force's first k (ties in lexicographic
    order), with their objectives, and each is feasible with the objective it claims.
    `solver(problem, k)` defaults to a one-off `solve`; returns its solution."""
    every = brute_force(problem)
    solution = solver(problem, k) if solver else solve(parse_problem(problem), top_k=k)
    if not every:
        assert not solution.feasible
        return solution
    got = [solution, *solution.alternatives]
    assert [s.selection for s in got] == [e[2] for e in every[:k]]
    for s, e in zip(got, every):
        assert math.isclose(s.objective, e[0], rel_tol=0, abs_tol=1e-12)
        feasible, objective, _ = check(problem, s.selection)
        assert feasible and math.isclose(objective, s.objective, rel_tol=0, abs_tol=1e-12)
    return solution


def minima(problem: dict[str, Any]) -> tuple[float, float]:
    blocks = [b for m in problem["models"] for b in m["blocks"]]
    lat = sum(min(c["latency_ms"] for c in b["choices"]) for b in blocks)
    mem = sum(min(c["memory_bytes"] for c in b["choices"]) for b in blocks)
    return lat, mem


@pytest.fixture
def gen() -> Any:
    """The helpers above, as a namespace (conftest modules cannot be imported by tests)."""

    class Helpers:
        random = staticmethod(make_random)
        realistic = staticmethod(synthetic_problem)  # the benchmark's generator
        compositions = staticmethod(add_compositions)
        degenerate = staticmethod(make_degenerate)
        tied_compositions = staticmethod(add_tied_compositions)
        check = staticmethod(check)
        brute_force = staticmethod(brute_force)
        assert_top_k_is_brute_force = staticmethod(assert_top_k_is_brute_force)
        minima = staticmethod(minima)

    return Helpers


def make_degenerate(rng: random.Random, n_models: int, n_blocks: int, n_choices: int, kind: str) -> dict[str, Any]:
    """Tables full of ties, as tiny or badly trained models give: `kind` "zero" (every drop
    0), "equal" (one drop per block, on a 1/64 grid), "identical" (every other choice a
    copy of the one before) or "dominant" (all drops 0, one block 20x slower than the rest).
    Latency and memory fall with the choice index (with noise); budgets random."""
    models = []
    for m in range(n_models):
        blocks = []
        for b in range(n_blocks):
            slow = 20.0 if kind == "dominant" and b == 1 else 1.0
            lat0, mem0, level = rng.uniform(0.2, 2.0) * slow, rng.randint(20_000, 600_000), rng.randint(0, 3) / 64
            choices: list[dict[str, Any]] = []
            for d in range(n_choices):
                if kind == "identical" and d % 2:
                    choices.append(dict(choices[-1], id=f"{d / 10:.1f}"))
                    continue
                s = d / max(n_choices - 1, 1)
                choices.append({
                    "id": f"{d / 10:.1f}",
                    "accuracy_drop": level if kind == "equal" and d else 0.0,
                    "latency_ms": lat0 * (1 - 0.7 * s) * rng.uniform(0.9, 1.1),
                    "memory_bytes": int(mem0 * (1 - 0.8 * s)),
                })
            blocks.append({"name": f"b{b}", "choices": choices})
        models.append({"name": f"m{m}", "base_accuracy": 0.5, "blocks": blocks})
    every = [b for m in models for b in m["blocks"]]
    budgets = {}
    for key in ("latency_ms", "memory_bytes") if rng.random() < 0.5 else ("latency_ms",):
        lo = sum(min(c[key] for c in b["choices"]) for b in every)
        hi = sum(max(c[key] for c in b["choices"]) for b in every)
        budgets[key] = lo + rng.uniform(0.05, 0.9) * (hi - lo)
    return {"models": models, "budgets": budgets}


def add_tied_compositions(rng: random.Random, problem: dict[str, Any], count: int) -> dict[str, Any]:
    """Give each model `count` random compositions measured at a few repeated accuracies
    (its base: a tie with every free selection; lower; a hair higher)."""
    for model in problem["models"]:
        base = model["base_accuracy"]
        model["compositions"] = [
            {"selection": [rng.choice(b["choices"])["id"] for b in model["blocks"]], "accuracy": rng.choice([base, base - 0.25, base + 1 / 64])}
            for _ in range(count)
        ]
    return problem
