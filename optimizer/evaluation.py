"""What a selection is worth and costs: the one canonical computation behind every reported number.

Both exact methods (the solver in `optimizer.compiled` and the MILP in `optimizer.milp`)
report through `evaluate_indices`, so a selection has the same objective and the same
feasibility verdict whichever method found it. Sums are `math.fsum` (exactly rounded), so
they do not depend on the order in which a method happened to add things up.

A model's accuracy under a selection is the measured accuracy when the selection is one
of its compositions ("measured"), else `base_accuracy - sum(accuracy_drop)` ("predicted").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from optimizer.problem import Problem, ProblemError

__all__ = [
    "REL_TOL",
    "Solution",
    "budget_limit",
    "evaluate",
    "evaluate_indices",
    "infeasible",
    "minima",
    "selection_indices",
]

REL_TOL = 1e-9


def budget_limit(budget: float) -> float:
    """The largest total that still counts as within `budget` (relative tolerance 1e-9)."""
    return budget + REL_TOL * abs(budget)


@dataclass(frozen=True)
class Solution:
    """A selection and what it costs, or why there is none.

    `min_latency_ms` and `min_memory_bytes` are the smallest totals achievable (each alone,
    ignoring every other budget), so an infeasible answer says how far off the budget is.
    `alternatives` are the next-best distinct feasible selections, best first.
    `accuracy_source` says per model whether its accuracy is a measured composition's
    ("measured") or the additive prediction ("predicted").
    """

    feasible: bool
    objective: float | None
    selection: dict[str, list[str]]
    latency_ms: float | None
    memory_bytes: float | None
    switch_bytes: float | None
    per_model: dict[str, dict[str, float]]
    min_latency_ms: float
    min_memory_bytes: float
    alternatives: list[Solution] = field(default_factory=list)
    reason: str = ""
    method: str = ""
    nodes: int = 0
    accuracy_source: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (alternatives included)."""
        return {
            "feasible": self.feasible,
            "objective": self.objective,
            "selection": {k: list(v) for k, v in self.selection.items()},
            "latency_ms": self.latency_ms,
            "memory_bytes": self.memory_bytes,
            "switch_bytes": self.switch_bytes,
            "per_model": {k: dict(v) for k, v in self.per_model.items()},
            "accuracy_source": dict(self.accuracy_source),
            "min_latency_ms": self.min_latency_ms,
            "min_memory_bytes": self.min_memory_bytes,
            "alternatives": [a.as_dict() for a in self.alternatives],
            "reason": self.reason,
            "method": self.method,
            "nodes": self.nodes,
        }


def minima(problem: Problem) -> tuple[float, float]:
    """The smallest achievable total latency and memory, each on its own."""
    blocks = [b for m in problem.models for b in m.blocks]
    lat = math.fsum(min(c.latency_ms for c in b.choices) for b in blocks)
    mem = math.fsum(min(c.memory_bytes for c in b.choices) for b in blocks)
    return lat, mem


def infeasible(bounds: tuple[float, float], reason: str, method: str, nodes: int = 0) -> Solution:
    """The answer when no selection meets the budgets; `bounds` are `minima(problem)`."""
    return Solution(
        feasible=False,
        objective=None,
        selection={},
        latency_ms=None,
        memory_bytes=None,
        switch_bytes=None,
        per_model={},
        min_latency_ms=bounds[0],
        min_memory_bytes=bounds[1],
        reason=reason,
        method=method,
        nodes=nodes,
    )


def selection_indices(problem: Problem, selection: Mapping[str, Sequence[str]]) -> list[list[int]]:
    """Choice index per block per model (problem order) of a selection given by choice ids."""
    if not isinstance(selection, Mapping):
        raise ProblemError("selection", "must map each model name to a list of choice ids")
    for name in selection:
        if all(m.name != name for m in problem.models):
            raise ProblemError(f"selection.{name}", f"unknown model {name!r}")
    indices: list[list[int]] = []
    for model in problem.models:
        if model.name not in selection:
            raise ProblemError("selection", f"missing model {model.name!r}")
        ids = list(selection[model.name])
        if len(ids) != len(model.blocks):
            raise ProblemError(
                f"selection.{model.name}",
                f"has {len(ids)} choice ids but the model has {len(model.blocks)} blocks",
            )
        row = []
        for b, (block, choice_id) in enumerate(zip(model.blocks, ids)):
            try:
                row.append(block.index_of(choice_id))
            except KeyError:
                raise ProblemError(
                    f"selection.{model.name}[{b}]", f"unknown choice id {choice_id!r} for block {block.name!r}"
                ) from None
        indices.append(row)
    return indices


def evaluate_indices(
    problem: Problem,
    indices: Sequence[Sequence[int]],
    bounds: tuple[float, float],
    measured: Sequence[Mapping[tuple[str, ...], float]] | None = None,
    method: str = "evaluate",
    nodes: int = 0,
) -> Solution:
    """Objective, costs and feasibility of the selection given as choice indices.

    Args:
        problem: the problem (budgets, current selection and penalty included).
        indices: choice index per block, per model in problem order.
        bounds: `minima(problem)`, reported on the solution.
        measured: per model `Model.measured()`, when the caller has it already.
        method, nodes: what found the selection and how many states it held (reported).
    """
    budgets = problem.budgets
    current = problem.current or {}
    if measured is None:
        measured = [m.measured() for m in problem.models]
    lat_all: list[float] = []
    mem_all: list[float] = []
    switch_all: list[float] = []
    weighted: list[float] = []
    per_model: dict[str, dict[str, float]] = {}
    selection: dict[str, list[str]] = {}
    source: dict[str, str] = {}
    violations: list[str] = []
    for model, row, known in zip(problem.models, indices, measured):
        running = current.get(model.name)
        chosen = [block.choices[d] for block, d in zip(model.blocks, row)]
        ids = [c.id for c in chosen]
        lat = [c.latency_ms for c in chosen]
        mem = [c.memory_bytes for c in chosen]
        switch = [] if running is None else [c.load_bytes for c, was in zip(chosen, running) if was != c.id]
        key = tuple(ids)
        if key in known:
            accuracy, source[model.name] = known[key], "measured"
        else:
            accuracy = math.fsum([model.base_accuracy] + [-c.accuracy_drop for c in chosen])
            source[model.name] = "predicted"
        weighted.append(model.weight * accuracy)
        lat_all += lat
        mem_all += mem
        switch_all += switch
        model_lat = math.fsum(lat)
        selection[model.name] = ids
        per_model[model.name] = {
            "latency_ms": model_lat,
            "memory_bytes": math.fsum(mem),
            "accuracy": accuracy,
            "switch_bytes": math.fsum(switch),
        }
        if model.latency_deadline_ms is not None and model_lat > budget_limit(model.latency_deadline_ms):
            violations.append(f"latency of {model.name} {model_lat:g} ms > deadline {model.latency_deadline_ms:g} ms")
    total_lat, total_mem, total_switch = math.fsum(lat_all), math.fsum(mem_all), math.fsum(switch_all)
    objective = math.fsum(weighted) - problem.switch_penalty_per_byte * total_switch
    if budgets.latency_ms is not None and total_lat > budget_limit(budgets.latency_ms):
        violations.append(f"total latency {total_lat:g} ms > budget {budgets.latency_ms:g} ms")
    if budgets.memory_bytes is not None and total_mem > budget_limit(budgets.memory_bytes):
        violations.append(f"memory {total_mem:g} B > budget {budgets.memory_bytes:g} B")
    if budgets.switch_bytes is not None and total_switch > budget_limit(budgets.switch_bytes):
        violations.append(f"switch bytes {total_switch:g} > budget {budgets.switch_bytes:g}")
    return Solution(
        feasible=not violations,
        objective=objective,
        selection=selection,
        latency_ms=total_lat,
        memory_bytes=total_mem,
        switch_bytes=total_switch,
        per_model=per_model,
        min_latency_ms=bounds[0],
        min_memory_bytes=bounds[1],
        reason="; ".join(violations),
        method=method,
        nodes=nodes,
        accuracy_source=source,
    )


def evaluate(problem: Problem, selection: Mapping[str, Sequence[str]]) -> Solution:
    """Objective, costs and feasibility of a given selection (model name -> choice ids).

    `feasible` is False when a budget or deadline is exceeded; `reason` lists which.
    """
    return evaluate_indices(problem, selection_indices(problem, selection), minima(problem))
