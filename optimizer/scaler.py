"""The runtime scaler: re-solve on a budget change and swap in only the blocks that changed.

A device runs several composed models, each through a `legoblocks.compose.BlockSwitcher`.
When its budgets change (a new app starts, the battery saver kicks in), `update(budgets)`
solves the joint problem with the running selections as `current` - so switching bytes
are budgeted or penalized against what is actually loaded - and hands each switcher its
new selection; the switcher loads only the changed blocks and reports what it did.

Hysteresis keeps a still-feasible current selection when the better one gains less than a
threshold, so budgets that jitter around a boundary do not make blocks flap in and out.

The models are validated and laid out once (`compiled`, a `CompiledProblem`); an update
re-solves it under the new budgets and the running selections. Without a switching
penalty the scaler also builds the models' frontiers once (`CompiledProblem.prepare`),
so an update without a switch budget reads them instead of searching the blocks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from optimizer.compiled import DEFAULT_NODE_LIMIT, CompiledProblem
from optimizer.evaluation import Solution, evaluate
from optimizer.problem import Model, Problem, parse_budgets, parse_models, parse_penalty

if TYPE_CHECKING:  # legoblocks (and torch) only for type checkers: the scaler just calls .switch()
    from legoblocks.compose import BlockSwitcher

__all__ = ["RuntimeScaler", "ScaleReport"]


@dataclass
class ScaleReport:
    """One update: the solution applied and what switching it cost.

    `changes` maps each model whose selection changed to its (block, old, new) triples, as
    the switcher reported them; `seconds` is the whole update (solve + switches).
    `switched` is False when nothing changed; then `kept` says why ("optimal",
    "hysteresis" or "infeasible").
    """

    solution: Solution
    changes: dict[str, list[tuple[str, str, str]]]
    bytes_loaded: int
    seconds: float
    switched: bool
    solve_seconds: float = 0.0
    kept: str = ""


class RuntimeScaler:
    """Keeps several models' selections optimal for changing budgets.

    `problem_models` are the models of the optimizer's JSON form (what
    `profiling.table.to_problem(...)["models"]` holds: names, weights, deadlines, blocks,
    choices and measured compositions), or already validated `Model` records.
    `switchers` maps each model name to the BlockSwitcher running it; their block names
    must be the model's blocks, in order.
    """

    def __init__(
        self,
        problem_models: Sequence[Mapping[str, Any] | Model],
        switchers: Mapping[str, BlockSwitcher],
        *,
        hysteresis: float = 0.0,
        switch_penalty_per_byte: float = 0.0,
        node_limit: int = DEFAULT_NODE_LIMIT,
    ) -> None:
        given = list(problem_models)
        self.models = tuple(given) if all(isinstance(m, Model) for m in given) else parse_models(given)
        names = [m.name for m in self.models]
        if set(switchers) != set(names):
            raise ValueError(
                f"switchers must cover exactly the models {names}; got {sorted(switchers)}"
            )
        for model in self.models:
            blocks = [b.name for b in model.blocks]
            have = list(switchers[model.name].block_names)
            if have != blocks:
                raise ValueError(
                    f"the switcher of {model.name!r} runs blocks {have}, but the problem lists {blocks}; "
                    "build both from the same ScalableModel / ProfileTable"
                )
        if isinstance(hysteresis, bool) or not isinstance(hysteresis, (int, float)) or not (
            math.isfinite(hysteresis) and hysteresis >= 0
        ):
            raise ValueError(f"hysteresis must be a finite number >= 0 (objective units), got {hysteresis!r}")
        self.switchers = dict(switchers)
        self.hysteresis = float(hysteresis)
        self.switch_penalty_per_byte = parse_penalty(switch_penalty_per_byte)
        self.node_limit = node_limit
        self.compiled = CompiledProblem(self.models, switch_penalty_per_byte=self.switch_penalty_per_byte)
        if not self.switch_penalty_per_byte:  # a penalty changes every value with the running selection
            self.compiled.prepare()
        self.problem({})  # validates the switchers' running selections against the choices now

    @property
    def selection(self) -> dict[str, list[str]]:
        """The running selection of every model."""
        return {m.name: list(self.switchers[m.name].selection) for m in self.models}

    def problem(self, budgets: Mapping[str, float | None]) -> Problem:
        """The scaling problem for `budgets` with the running selections as `current`."""
        return self.compiled.problem(parse_budgets(budgets), self.selection)

    def update(self, budgets: Mapping[str, float | None]) -> ScaleReport:
        """Re-solve for `budgets` ({"latency_ms", "memory_bytes", "switch_bytes"}, any may be
        missing or None) and switch every model whose selection changed.

        An infeasible problem switches nothing (the models keep running as they are) and the
        report's solution says why and how far off the budgets are.
        """
        start = time.perf_counter()
        problem = self.problem(budgets)
        solution = self.compiled.solve(problem.budgets, problem.current, node_limit=self.node_limit)
        solve_seconds = time.perf_counter() - start
        running = self.selection
        kept = ""
        if not solution.feasible:
            kept = "infeasible"
        elif solution.selection == running:
            kept = "optimal"
        elif self.hysteresis > 0:
            now = evaluate(problem, running)
            if now.feasible and solution.objective - now.objective < self.hysteresis:
                solution, kept = now, "hysteresis"

        changes: dict[str, list[tuple[str, str, str]]] = {}
        bytes_loaded = 0
        if not kept:
            for model in self.models:
                target = solution.selection[model.name]
                if target != running[model.name]:
                    report = self.switchers[model.name].switch(target)
                    changes[model.name] = list(report.changed)
                    bytes_loaded += report.bytes_loaded
        return ScaleReport(
            solution=solution,
            changes=changes,
            bytes_loaded=bytes_loaded,
            seconds=time.perf_counter() - start,
            switched=bool(changes),
            solve_seconds=solve_seconds,
            kept=kept,
        )
