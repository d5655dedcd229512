"""An independent MILP formulation of the scaling problem (SciPy `milp`, HiGHS, zero gap).

It shares nothing with the branch and bound in `optimizer.solver` except the problem
dataclasses and the 1e-9 budget tolerance, so the tests use it as ground truth, and the
solver hands it instances whose search tree grows past the node limit.

Binary x[m,b,d], one per (m,b); minimize the weighted accuracy drop plus the switching
penalty; rows for the shared latency budget, each deadline, memory and switch bytes. Top-k
selections come from re-solving with "no-good" cuts that forbid each selection found.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from optimizer.problem import Problem
from optimizer.solver import budget_limit

__all__ = ["lp_feasible", "solve_milp", "solve_milp_top_k"]

Selection = list[list[int]]  # choice index per block, per model


def _columns(problem: Problem) -> list[tuple[int, int, int]]:
    return [
        (m, b, d)
        for m, model in enumerate(problem.models)
        for b, block in enumerate(model.blocks)
        for d in range(len(block.choices))
    ]


def _formulation(problem: Problem, exclude: Sequence[Selection] = ()):
    """(cost, one-per-block constraint, budget/cut constraint or None, columns)."""
    cols = _columns(problem)
    col_of = {key: i for i, key in enumerate(cols)}
    current = problem.current or {}
    budgets = problem.budgets
    penalty = problem.switch_penalty_per_byte

    cost = np.zeros(len(cols))
    lat = np.zeros(len(cols))
    mem = np.zeros(len(cols))
    switch = np.zeros(len(cols))
    model_of = np.zeros(len(cols), dtype=int)
    for i, (m, b, d) in enumerate(cols):
        model = problem.models[m]
        choice = model.blocks[b].choices[d]
        running = current.get(model.name)
        switch[i] = choice.load_bytes if running is not None and running[b] != choice.id else 0.0
        cost[i] = model.weight * choice.accuracy_drop + penalty * switch[i]
        lat[i] = choice.latency_ms
        mem[i] = choice.memory_bytes
        model_of[i] = m

    rows: list[np.ndarray] = []
    upper: list[float] = []

    def budget_row(coef: np.ndarray, budget: float) -> None:
        # Rows scaled to budget 1 so HiGHS's absolute tolerances act relatively.
        scale = budget if budget > 0 else 1.0
        rows.append(coef / scale)
        upper.append(budget_limit(budget) / scale)

    if budgets.latency_ms is not None:
        budget_row(lat, budgets.latency_ms)
    for m, model in enumerate(problem.models):
        if model.latency_deadline_ms is not None:
            budget_row(np.where(model_of == m, lat, 0.0), model.latency_deadline_ms)
    if budgets.memory_bytes is not None:
        budget_row(mem, budgets.memory_bytes)
    if budgets.switch_bytes is not None and current:
        budget_row(switch, budgets.switch_bytes)

    n_groups = sum(len(model.blocks) for model in problem.models)
    for selection in exclude:
        row = np.zeros(len(cols))
        for m, picks in enumerate(selection):
            for b, d in enumerate(picks):
                row[col_of[(m, b, d)]] = 1.0
        rows.append(row)
        upper.append(n_groups - 1)

    # Exactly one choice per (model, block).
    group_of: dict[tuple[int, int], int] = {}
    for m, b, _ in cols:
        group_of.setdefault((m, b), len(group_of))
    one_rows = [group_of[(m, b)] for (m, b, _) in cols]
    one = coo_matrix((np.ones(len(cols)), (one_rows, np.arange(len(cols)))), shape=(n_groups, len(cols)))
    choose_one = LinearConstraint(one, np.ones(n_groups), np.ones(n_groups))
    limits = LinearConstraint(np.vstack(rows), -np.inf, np.array(upper)) if rows else None
    return cost, choose_one, limits, cols


def solve_milp(
    problem: Problem, *, exclude: Sequence[Selection] = (), time_limit: float | None = None
) -> tuple[float, Selection] | None:
    """(objective, selection) of an optimal selection not in `exclude`, or None if infeasible."""
    cost, choose_one, limits, cols = _formulation(problem, exclude)
    options: dict[str, float] = {"mip_rel_gap": 0.0}
    if time_limit is not None:
        options["time_limit"] = time_limit
    result = milp(
        cost,
        integrality=np.ones(len(cols)),
        bounds=Bounds(0.0, 1.0),
        constraints=[c for c in (choose_one, limits) if c is not None],
        options=options,
    )
    if result.status == 2:  # infeasible
        return None
    if result.x is None:
        raise RuntimeError(f"MILP solver failed: {result.message}")
    selection: Selection = [[0] * len(model.blocks) for model in problem.models]
    for i, (m, b, d) in enumerate(cols):
        if result.x[i] > 0.5:
            selection[m][b] = d
    constant = sum(model.weight * model.base_accuracy for model in problem.models)
    return constant - float(result.fun), selection


def lp_feasible(problem: Problem) -> bool:
    """Whether the LP relaxation (fractional choices) meets every budget: when it does
    not, no selection does, which the branch and bound alone can be slow to prove."""
    cost, choose_one, limits, cols = _formulation(problem)
    result = milp(
        np.zeros(len(cols)),
        integrality=np.zeros(len(cols)),
        bounds=Bounds(0.0, 1.0),
        constraints=[c for c in (choose_one, limits) if c is not None],
    )
    return result.status != 2


def solve_milp_top_k(problem: Problem, k: int) -> list[tuple[float, Selection]]:
    """The k best distinct selections (fewer if fewer are feasible), best first."""
    found: list[tuple[float, Selection]] = []
    while len(found) < k:
        result = solve_milp(problem, exclude=[s for _, s in found])
        if result is None:
            break
        found.append(result)
    return found
