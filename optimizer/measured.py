"""Meet a latency budget as *measured*, not only as predicted.

The optimizer sums per-block latencies (corrected by a fitted scale and offset). The sum
is right on average, but the optimizer picks exactly the compositions whose prediction
sits at the budget, so the ones whose latency is underestimated are the ones it picks:
on our hosts 8-10 of 10 latency-budget picks ran 5-17% over when timed end to end.

`solve_measured` closes that loop on the machine that runs the model: solve, time the
chosen composition, and when it runs over, solve again under a budget tightened by the
measured overrun. It stops at the first selection that fits, or after `max_rounds`, and
then returns the fastest one it timed (and says it does not fit). The optimizer stays
exact for each round's budget; only the budget moves. The rounds re-solve one compiled
problem (`optimizer.compiled`), so the tables are validated and laid out once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from optimizer.compiled import DEFAULT_NODE_LIMIT, CompiledProblem, compile_problem
from optimizer.evaluation import Solution
from optimizer.problem import Budgets, Problem

__all__ = ["MeasuredRound", "MeasuredSolution", "solve_measured"]

Selection = Mapping[str, list[str]]


@dataclass(frozen=True)
class MeasuredRound:
    """One solve and its timing: the budget the optimizer was given, what it predicted, what ran."""

    target_ms: float
    predicted_ms: float
    measured_ms: float
    selection: dict[str, list[str]]


@dataclass
class MeasuredSolution:
    """The selection to run, and every round that led to it.

    `fits` is True when `measured_ms` <= the budget. When no round fitted, `solution` is
    the round with the smallest measured latency and `fits` is False.
    """

    solution: Solution
    measured_ms: float
    fits: bool
    budget_ms: float
    rounds: list[MeasuredRound] = field(default_factory=list)

    @property
    def first_measured_ms(self) -> float:
        """What the plain optimizer's pick measured (round 1)."""
        return self.rounds[0].measured_ms


def solve_measured(
    problem: Problem | CompiledProblem,
    measure: Callable[[Selection], float],
    *,
    budgets: Budgets | Mapping[str, Any] | None = None,
    current: Any = None,
    max_rounds: int = 4,
    node_limit: int = DEFAULT_NODE_LIMIT,
) -> MeasuredSolution:
    """Solve `problem` so that `measure(selection)` (ms, all models together) meets its latency budget.

    `measure` times the selection on this machine (e.g. the assembled models through
    `profiling.latency.measure_latency`). Each round that runs over tightens the budget by
    the measured overrun (target * budget / measured), and at least below the prediction
    that failed, so the next round cannot return the same selection.

    Args:
        problem: a `Problem`, or a `CompiledProblem` to re-solve without re-validating.
        measure: times a selection (model name -> choice ids) here, in ms.
        budgets, current: override the problem's (a compiled problem's defaults otherwise).
        max_rounds: the most solves (and timings).
        node_limit: passed to each solve.

    Raises:
        ValueError: when there is no latency budget or nothing fits from the start.
    """
    compiled = problem if isinstance(problem, CompiledProblem) else compile_problem(problem)
    base = compiled.problem(budgets, current)
    budget = base.budgets.latency_ms
    if budget is None:
        raise ValueError("solve_measured needs a latency budget: set budgets.latency_ms")
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    rounds: list[MeasuredRound] = []
    solutions: list[Solution] = []
    target = budget
    for _ in range(max_rounds):
        round_budgets = Budgets(target, base.budgets.memory_bytes, base.budgets.switch_bytes)
        solution = compiled.solve(round_budgets, base.current, node_limit=node_limit)
        if not solution.feasible:
            if not rounds:
                raise ValueError(f"no selection fits the budgets: {solution.reason}")
            break  # tightened past the fastest composition: keep the fastest timed one
        measured = float(measure(solution.selection))
        predicted = float(solution.latency_ms or 0.0)
        rounds.append(MeasuredRound(target, predicted, measured, {k: list(v) for k, v in solution.selection.items()}))
        solutions.append(solution)
        if measured <= budget:
            return MeasuredSolution(solution, measured, True, budget, rounds)
        # A selection predicted at p ran at m > budget: ask for one predicted at p * budget / m,
        # and strictly below p, so the same selection cannot come back.
        target = min(target * budget / measured, predicted * budget / measured, predicted * (1 - 1e-6))
    best = min(range(len(rounds)), key=lambda i: rounds[i].measured_ms)
    return MeasuredSolution(solutions[best], rounds[best].measured_ms, False, budget, rounds)
