"""An independent MILP formulation of the scaling problem (SciPy `milp`, HiGHS, zero gap).

It shares nothing with the search in `optimizer.compiled` except the problem records and
the 1e-9 budget tolerance (`optimizer.evaluation`), so the tests use it as ground truth,
and the solver hands it problems whose search grows past the state limit. SciPy is
imported with this module: import it only where it is used.

Binary x[m,b,d], one per (m,b); minimize the weighted accuracy drop plus the switching
penalty; rows for the shared latency budget, each deadline, memory and switch bytes.

A composition j of model m (a selection s_j with measured accuracy A_j; a selection listed
twice counts once, at its higher accuracy) gets a binary z_j that is 1 exactly when the
model's selection is s_j:

    z_j <= x[m, b, s_j(b)]                        for every block b
    z_j >= sum_b x[m, b, s_j(b)] - (B_m - 1)

and the objective adds w_m * (A_j - predicted(s_j)) * z_j, so that selection is worth A_j,
whether A_j is above or below the additive prediction. Top-k selections come from
re-solving with "no-good" cuts on x that forbid each selection found.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from optimizer.evaluation import budget_limit
from optimizer.problem import Problem

__all__ = ["solve_milp", "solve_milp_top_k"]

Selection = list[list[int]]  # choice index per block, per model


def _columns(problem: Problem) -> list[tuple[int, int, int]]:
    return [
        (m, b, d)
        for m, model in enumerate(problem.models)
        for b, block in enumerate(model.blocks)
        for d in range(len(block.choices))
    ]


def _compositions(problem: Problem) -> list[tuple[int, list[int], float]]:
    """(model, choice index per block, objective correction) per distinct composition."""
    out = []
    for m, model in enumerate(problem.models):
        for selection, accuracy in model.measured().items():
            row = [block.index_of(cid) for block, cid in zip(model.blocks, selection)]
            predicted = math.fsum([model.base_accuracy, *(-b.choices[d].accuracy_drop for b, d in zip(model.blocks, row))])
            out.append((m, row, model.weight * (accuracy - predicted)))
    return out


def _formulation(problem: Problem, exclude: Sequence[Selection] = ()):
    """(cost, one-per-block constraint, other constraints or None, x columns, number of z)."""
    cols = _columns(problem)
    col_of = {key: i for i, key in enumerate(cols)}
    comps = _compositions(problem)
    n_x, n_z = len(cols), len(comps)
    current = problem.current or {}
    budgets = problem.budgets
    penalty = problem.switch_penalty_per_byte

    cost = np.zeros(n_x + n_z)
    lat = np.zeros(n_x + n_z)
    mem = np.zeros(n_x + n_z)
    switch = np.zeros(n_x + n_z)
    model_of = np.full(n_x + n_z, -1)
    for i, (m, b, d) in enumerate(cols):
        model = problem.models[m]
        choice = model.blocks[b].choices[d]
        running = current.get(model.name)
        switch[i] = choice.load_bytes if running is not None and running[b] != choice.id else 0.0
        cost[i] = model.weight * choice.accuracy_drop + penalty * switch[i]
        lat[i] = choice.latency_ms
        mem[i] = choice.memory_bytes
        model_of[i] = m
    for j, (_, _, gain) in enumerate(comps):
        cost[n_x + j] = -gain

    rows: list[np.ndarray] = []
    lower: list[float] = []
    upper: list[float] = []

    def budget_row(coef: np.ndarray, budget: float) -> None:
        # Rows scaled to budget 1 so HiGHS's absolute tolerances act relatively.
        scale = budget if budget > 0 else 1.0
        rows.append(coef / scale)
        lower.append(-np.inf)
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

    for j, (m, picks, _) in enumerate(comps):
        matched = [col_of[(m, b, d)] for b, d in enumerate(picks)]
        for i in matched:  # z_j <= x[m, b, s_j(b)]
            row = np.zeros(n_x + n_z)
            row[n_x + j], row[i] = 1.0, -1.0
            rows.append(row)
            lower.append(-np.inf)
            upper.append(0.0)
        row = np.zeros(n_x + n_z)  # z_j >= sum_b x[m, b, s_j(b)] - (B - 1)
        row[n_x + j] = 1.0
        row[matched] = -1.0
        rows.append(row)
        lower.append(1.0 - len(matched))
        upper.append(np.inf)

    n_groups = sum(len(model.blocks) for model in problem.models)
    for selection in exclude:
        row = np.zeros(n_x + n_z)
        for m, picks in enumerate(selection):
            for b, d in enumerate(picks):
                row[col_of[(m, b, d)]] = 1.0
        rows.append(row)
        lower.append(-np.inf)
        upper.append(n_groups - 1)

    # Exactly one choice per (model, block).
    group_of: dict[tuple[int, int], int] = {}
    for m, b, _ in cols:
        group_of.setdefault((m, b), len(group_of))
    one_rows = [group_of[(m, b)] for (m, b, _) in cols]
    one = coo_matrix((np.ones(n_x), (one_rows, np.arange(n_x))), shape=(n_groups, n_x + n_z))
    choose_one = LinearConstraint(one, np.ones(n_groups), np.ones(n_groups))
    others = LinearConstraint(np.vstack(rows), np.array(lower), np.array(upper)) if rows else None
    return cost, choose_one, others, cols, n_z


def solve_milp(
    problem: Problem, *, exclude: Sequence[Selection] = (), time_limit: float | None = None
) -> tuple[float, Selection] | None:
    """(objective, selection) of an optimal selection not in `exclude`, or None if infeasible."""
    cost, choose_one, others, cols, n_z = _formulation(problem, exclude)
    options: dict[str, float] = {"mip_rel_gap": 0.0}
    if time_limit is not None:
        options["time_limit"] = time_limit
    result = milp(
        cost,
        integrality=np.ones(len(cost)),
        bounds=Bounds(0.0, 1.0),
        constraints=[c for c in (choose_one, others) if c is not None],
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


def solve_milp_top_k(problem: Problem, k: int) -> list[tuple[float, Selection]]:
    """The k best distinct selections (fewer if fewer are feasible), best first."""
    found: list[tuple[float, Selection]] = []
    while len(found) < k:
        result = solve_milp(problem, exclude=[s for _, s in found])
        if result is None:
            break
        found.append(result)
    return found
