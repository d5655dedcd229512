"""A compiled problem: validated once, arrays built once, re-solved under any budgets.

`compile_problem(problem)` turns the models of a `Problem` into the arrays the exact
search works on; `CompiledProblem.solve(budgets=..., current=..., top_k=...)` then
re-solves without parsing or validating the tables again. A device re-solves on every
budget change (`RuntimeScaler`, `legodnn-fetch --watch`) and several times per change
(`solve_measured`): they keep one compiled problem.

The method (exact; see `optimizer.dual` and `optimizer.search` for the parts):

1. **Items.** Value per choice ``-w * drop - penalty * switch``, a coefficient per active
   constraint (the shared latency budget, each model's deadline, memory, switch bytes). A
   constraint whose smallest achievable total exceeds its budget makes the problem
   infeasible at once, with how far off it is.
2. **Multipliers.** A small set of Lagrangian multiplier vectors around the dual's
   minimum (batched evaluations of the dual over all groups at once).
3. **First threshold.** Feasible selections from the multipliers plus a greedy fill of the
   budgets' slack; the k-th best distinct value is the first threshold T.
4. **Passes.** A pass enumerates every feasible selection that can reach T (per model in
   chunks of blocks, then merged across models, pruned by the multipliers' bounds). When
   it holds the k best at or above T, they are exact; otherwise T drops (to the k-th best
   found, or away from the bound) and another pass runs.
5. **Ties.** Values within ``eps`` (1e-11 of the objective's scale: float noise) are
   ties; the answer is the lexicographically smallest selection by (model, block, choice
   index) among those tied with the best, so a problem always yields the same selection.

Every reported number comes from `optimizer.evaluation.evaluate_indices`. Worst case is
exponential (NP-hard): a pass that would hold more than `node_limit` states stops and the
independent MILP (`optimizer.milp`, SciPy/HiGHS) answers, or, where SciPy is not
installed (a device), `SearchLimitError` says what to raise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from optimizer.dual import core_selections, multipliers
from optimizer.evaluation import Solution, budget_limit, evaluate_indices, infeasible, minima
from optimizer.problem import (
    Budgets,
    Model,
    Problem,
    parse_budgets,
    parse_current,
    parse_problem,
)
from optimizer.search import Bounds, StateLimit, bounds, run_pass

__all__ = ["DEFAULT_NODE_LIMIT", "CompiledProblem", "SearchLimitError", "compile_problem"]

DEFAULT_NODE_LIMIT = 200_000
CHUNK_ITEMS = 64  # a chunk's blocks have at most this many combinations (pairs of 8-choice blocks)
METHOD = "lagrangian-enumeration"
BEAM = 32  # partial selections per model a heuristic pass keeps (when no first threshold was found)
CORE_GROUPS = 14  # contested groups whose two best choices the first threshold's selections try
_EPS_REL = 1e-11  # ties: values closer than this times the objective's scale are float noise
_JOINTLY_INFEASIBLE = "no selection meets all budgets and deadlines together"
_UNITS = {"latency": "ms", "memory": "B", "switch": "B"}


class SearchLimitError(RuntimeError):
    """The exact search would hold more than its state limit and no MILP fallback is installed."""


def _chunks(sizes: Sequence[int], cap: int) -> list[list[int]]:
    """Consecutive blocks grouped while the product of their choice counts stays <= cap."""
    out: list[list[int]] = []
    product = cap + 1
    for b, size in enumerate(sizes):
        if out and product * size <= cap:
            out[-1].append(b)
            product *= size
        else:
            out.append([b])
            product = size
    return out


class CompiledProblem:
    """The models of a problem as arrays, ready to be solved under any budgets.

    Build it with `compile_problem`; `budgets` and `current` are the defaults `solve` uses.
    """

    def __init__(
        self,
        models: tuple[Model, ...],
        *,
        budgets: Budgets | None = None,
        current: Mapping[str, tuple[str, ...]] | None = None,
        switch_penalty_per_byte: float = 0.0,
        chunk_items: int = CHUNK_ITEMS,
    ) -> None:
        self.models = models
        self.budgets = budgets or Budgets()
        self.current = current
        self.switch_penalty_per_byte = switch_penalty_per_byte
        self.measured = [m.measured() for m in models]
        self._bounds = minima(Problem(models))
        blocks = [b for m in models for b in m.blocks]
        n_groups = len(blocks)
        width = max(len(b.choices) for b in blocks)
        self._width, self._n_groups = width, n_groups
        self._start = np.cumsum([0] + [len(m.blocks) for m in models])
        # (choice, group) arrays plus a last all-zero group that pads chunks.
        shape = (width, n_groups + 1)
        self._valid = np.zeros(shape, dtype=bool)
        self._valid[0, n_groups] = True
        drop, lat, mem, load = (np.zeros(shape) for _ in range(4))
        for g, block in enumerate(blocks):
            n = len(block.choices)
            self._valid[:n, g] = True
            drop[:n, g] = [c.accuracy_drop for c in block.choices]
            lat[:n, g] = [c.latency_ms for c in block.choices]
            mem[:n, g] = [c.memory_bytes for c in block.choices]
            load[:n, g] = [c.load_bytes for c in block.choices]
        weight = np.append(np.repeat([m.weight for m in models], [len(m.blocks) for m in models]), 0.0)
        self._value = np.where(self._valid, -weight * drop, -np.inf)
        self._lat, self._mem, self._load = lat, mem, load
        self._index = [{c.id: i for i, c in enumerate(b.choices)} for b in blocks]
        self._build_chunks(models, chunk_items)
        self._build_compositions(models)
        self.constant = math.fsum(m.weight * m.base_accuracy for m in models)

    # ------------------------------------------------------------------ construction

    def _build_chunks(self, models: tuple[Model, ...], cap: int) -> None:
        per_model = [_chunks([len(b.choices) for b in m.blocks], cap) for m in models]
        levels = max(len(c) for c in per_model)
        sizes = [[int(np.prod([len(m.blocks[b].choices) for b in chunk])) for chunk in chunks] for m, chunks in zip(models, per_model)]
        n_items = max(max(s) for s in sizes)
        span = max(len(chunk) for chunks in per_model for chunk in chunks)
        M = len(models)
        choice = np.zeros((levels, M, n_items, span), dtype=np.intp)
        group = np.full((levels, M, n_items, span), self._n_groups, dtype=np.intp)
        valid = np.zeros((levels, M, n_items), dtype=bool)
        valid[:, :, 0] = True  # a model with fewer chunks has one all-padding item there
        for m, (model, chunks) in enumerate(zip(models, per_model)):
            for level, chunk in enumerate(chunks):
                dims = [len(model.blocks[b].choices) for b in chunk]
                combos = np.indices(dims).reshape(len(chunk), -1).T  # lexicographic order
                n = len(combos)
                choice[level, m, :n, : len(chunk)] = combos
                group[level, m, :n, : len(chunk)] = self._start[m] + np.asarray(chunk)
                valid[level, m, :n] = True
        self._chunk_choice, self._chunk_group, self._chunk_valid = choice, group, valid
        self._chunk_blocks = per_model
        self._chunk_dims = [[[len(m.blocks[b].choices) for b in chunk] for chunk in chunks] for m, chunks in zip(models, per_model)]

    def _path(self, m: int, row: Sequence[int]) -> list[int]:
        """Chunk item per level of model m's selection `row` (choice index per block)."""
        path = []
        for chunk, dims in zip(self._chunk_blocks[m], self._chunk_dims[m]):
            path.append(int(np.ravel_multi_index([row[b] for b in chunk], dims)))
        return path + [0] * (self._chunk_choice.shape[0] - len(path))

    def _build_compositions(self, models: tuple[Model, ...]) -> None:
        span = max(len(m.blocks) for m in models)
        model_of, choices, groups, gains, paths = [], [], [], [], []
        for m, (model, known) in enumerate(zip(models, self.measured)):
            for selection, accuracy in known.items():
                row = [block.index_of(cid) for block, cid in zip(model.blocks, selection)]
                predicted = math.fsum([model.base_accuracy, *(-b.choices[d].accuracy_drop for b, d in zip(model.blocks, row))])
                model_of.append(m)
                choices.append(row + [0] * (span - len(row)))
                groups.append(list(range(self._start[m], self._start[m + 1])) + [self._n_groups] * (span - len(row)))
                gains.append(model.weight * (accuracy - predicted))
                paths.append(self._path(m, row))
        self._comp_model = np.asarray(model_of, dtype=np.intp)
        self._comp_choice = np.asarray(choices, dtype=np.intp).reshape(-1, span)
        self._comp_group = np.asarray(groups, dtype=np.intp).reshape(-1, span)
        self._comp_gain = np.asarray(gains, dtype=float)
        self._comp_path = np.asarray(paths, dtype=np.intp).reshape(-1, self._chunk_choice.shape[0])

    # ------------------------------------------------------------------ one solve

    def problem(self, budgets: Budgets | Mapping[str, Any] | None = None, current: Any = None) -> Problem:
        """The `Problem` these models pose under `budgets` and `current` (defaults: the compiled ones).

        Budgets and current given as JSON-like mappings are validated with field paths.
        """
        if budgets is None:
            budgets = self.budgets
        elif not isinstance(budgets, Budgets):
            budgets = parse_budgets(budgets)
        current = self.current if current is None else parse_current(current, self.models)
        return Problem(self.models, budgets, current, self.switch_penalty_per_byte)

    def _constraints(self, problem: Problem) -> tuple[np.ndarray, np.ndarray, list[str], list[float], np.ndarray]:
        """(value (C, G'), coefficients (D, C, G'), names, budgets, switch bytes) under `problem`."""
        budgets, current = problem.budgets, problem.current or {}
        running = np.full(self._n_groups + 1, -1)
        for m, model in enumerate(self.models):
            ids = current.get(model.name)
            if ids is not None:
                start = self._start[m]
                running[start : start + len(ids)] = [self._index[start + b][cid] for b, cid in enumerate(ids)]
        rows = np.arange(self._width)[:, None]
        switch = np.where((running >= 0) & (rows != running) & self._valid, self._load, 0.0)
        value = self._value
        if current and problem.switch_penalty_per_byte:
            value = value - problem.switch_penalty_per_byte * switch
        coefs, names, limits = [], [], []
        if budgets.latency_ms is not None:
            coefs.append(self._lat)
            names.append("latency budget")
            limits.append(budgets.latency_ms)
        for m, model in enumerate(self.models):
            if model.latency_deadline_ms is not None:
                own = np.zeros_like(self._lat)
                own[:, self._start[m] : self._start[m + 1]] = self._lat[:, self._start[m] : self._start[m + 1]]
                coefs.append(own)
                names.append(f"latency deadline of {model.name}")
                limits.append(model.latency_deadline_ms)
        if budgets.memory_bytes is not None:
            coefs.append(self._mem)
            names.append("memory budget")
            limits.append(budgets.memory_bytes)
        if current and budgets.switch_bytes is not None:
            coefs.append(switch)
            names.append("switch budget")
            limits.append(budgets.switch_bytes)
        coef = np.array(coefs).reshape(len(coefs), *value.shape)
        return value, coef, names, limits, switch

    def solve(
        self,
        budgets: Budgets | Mapping[str, Any] | None = None,
        current: Any = None,
        *,
        top_k: int = 1,
        node_limit: int = DEFAULT_NODE_LIMIT,
    ) -> Solution:
        """The best selection (exact), plus up to top_k-1 next-best distinct ones.

        Args:
            budgets: a `Budgets` or its JSON form; default the compiled problem's.
            current: running selections (model name -> choice ids); default the compiled problem's.
            top_k: how many distinct selections to return, best first.
            node_limit: the most states one pass may hold before the MILP takes over.

        Returns:
            The `Solution`; objectives closer than float noise (1e-11 of the objective's
            scale) are ties, resolved to the lexicographically smallest selection.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
        problem = self.problem(budgets, current)
        value, coef, names, budget_list, _ = self._constraints(problem)
        limits = np.array([budget_limit(b) for b in budget_list])
        valid = self._valid
        least = np.where(valid[None], coef, np.inf).min(axis=1).sum(axis=1)
        over = [
            f"{name} {budget:g} {_UNITS[name.split()[0]]} is below the smallest achievable {low:g} {_UNITS[name.split()[0]]}"
            for name, budget, low, limit in zip(names, budget_list, least, limits)
            if low > limit
        ]
        if over:
            return infeasible(self._bounds, "; ".join(over), "bounds")
        # Summed in another order than `evaluate_indices`: a hair of slack, then the canonical verdict.
        spread = np.where(valid[None], coef, 0.0).max(axis=1).sum(axis=1)
        search_limits = limits + 1e-12 * (np.abs(limits) + spread)
        dual = multipliers(value, coef, limits, valid)
        stacked = np.stack([np.where(valid, value, 0.0), *coef], axis=-1)  # (C, G', 1 + D)
        items = stacked[self._chunk_choice, self._chunk_group].sum(axis=3)
        items[..., 0] = np.where(self._chunk_valid, items[..., 0], -np.inf)
        comp_items = stacked[self._comp_choice, self._comp_group].sum(axis=1)
        comp_items[:, 0] += self._comp_gain
        b = bounds(dual.lams, search_limits, items, self._chunk_valid, comp_items, self._comp_model, self._comp_path)
        scale = abs(self.constant) + float(np.abs(np.where(valid, value, 0.0)).max(axis=0).sum())
        scale += float(np.abs(b.upper).max())
        eps = _EPS_REL * max(scale, 1e-300)
        first = self._first_target(value, coef, limits, dual.lams[0], top_k)
        return self._search(problem, b, first, top_k, eps, node_limit)

    def _first_target(self, value: np.ndarray, coef: np.ndarray, limits: np.ndarray, lam: np.ndarray, top_k: int) -> float:
        """A value that top_k distinct feasible selections reach (-inf if none was found)."""
        selections, values = core_selections(value, coef, limits, lam, CORE_GROUPS, top_k + 8)
        if len(self._comp_model) and len(values):  # a composition is worth its measured value
            hit = (selections[:, self._comp_group] == self._comp_choice[None]).all(axis=2)  # (n, J)
            values = values + hit.astype(float) @ self._comp_gain
            values = np.sort(values)[::-1]
        return float(values[top_k - 1]) if len(values) >= top_k else -np.inf

    def _search(self, problem: Problem, b: Bounds, first: float, top_k: int, eps: float, limit: int) -> Solution:
        """A beam pass (the best partial selections by bound) finds near-optimal ones; an
        exact pass at the k-th best of them proves them (or finds better)."""
        # Below every selection's value: a pass at this threshold prunes by feasibility only.
        least = np.where(b.valid, b.Z[..., -1], np.inf).min(axis=2).sum(axis=0)  # (M,)
        if len(b.comp_Z):
            np.minimum.at(least, b.comp_model, b.comp_Z[:, -1])
        floor = float(least.sum())
        floor -= 1.0 + abs(floor)
        upper = b.upper_bound
        target = first if first > floor else floor
        beam: int | None = None if first > floor else BEAM
        states = 0
        while True:
            try:
                found = run_pass(b, target - 2 * eps, limit - states, beam)
            except StateLimit:
                return self._fallback(problem, top_k, states, limit)
            states += found.states
            keys = self._keys(found)
            picked = self._pick(problem, found, keys, top_k, eps)
            proven = max(target, found.dropped)
            complete = len(picked) >= top_k and picked[-1][0] >= proven - eps
            if complete or (target <= floor and found.dropped == -np.inf):
                if not picked:
                    return infeasible(self._bounds, _JOINTLY_INFEASIBLE, METHOD, states)
                return self._finish(problem, [s for _, s in picked], METHOD, states)
            if beam is not None:
                beam = None
                if len(picked) >= top_k:
                    target = max(target, picked[-1][0])
            elif len(picked) >= top_k:
                target = picked[-1][0]
            else:
                target = max(upper - 4.0 * (upper - target), floor)

    def _keys(self, found: Any) -> np.ndarray:
        """(N, M * L): each found selection's chunk items, model by model (lexicographic key)."""
        if not len(found.values):
            return np.zeros((0, 0), dtype=np.intp)
        return np.concatenate([found.paths[m][found.choose[:, m]] for m in range(len(self.models))], axis=1)

    def _decode(self, key: np.ndarray) -> list[list[int]]:
        """Choice index per block per model of a selection given by its chunk items."""
        levels = self._chunk_choice.shape[0]
        rows = []
        for m, model in enumerate(self.models):
            row = [0] * len(model.blocks)
            for level, chunk in enumerate(self._chunk_blocks[m]):
                picks = self._chunk_choice[level, m, key[m * levels + level]]
                for at, block in enumerate(chunk):
                    row[block] = int(picks[at])
            rows.append(row)
        return rows

    def _pick(
        self, problem: Problem, found: Any, keys: np.ndarray, top_k: int, eps: float
    ) -> list[tuple[float, Solution]]:
        """The top_k best canonically feasible selections found, as (search value, solution):
        first the lexicographically smallest within eps of the best, then by value."""
        values = found.values
        alive = np.ones(len(values), dtype=bool)
        out: list[tuple[float, Solution]] = []
        while len(out) < top_k and alive.any():
            idx = np.flatnonzero(alive)
            if not out:
                top = values[idx].max()
                tied = idx[values[idx] >= top - eps]
                at = tied[np.lexsort(keys[tied].T[::-1])[0]]
            else:
                at = idx[np.lexsort((*keys[idx].T[::-1], -values[idx]))[0]]
            alive[at] = False
            solution = evaluate_indices(problem, self._decode(keys[at]), self._bounds, self.measured)
            if solution.feasible:
                out.append((float(values[at]), solution))
        return out

    def _finish(self, problem: Problem, solutions: list[Solution], method: str, nodes: int) -> Solution:
        head, *rest = solutions
        rest.sort(key=lambda s: -s.objective)  # stable: equal objectives keep lexicographic order
        alternatives = [_with(s, method=method) for s in rest]
        return _with(head, alternatives=alternatives, method=method, nodes=nodes)

    def _fallback(self, problem: Problem, top_k: int, states: int, limit: int) -> Solution:
        """Past the state limit: the MILP, or a clear error where SciPy is missing."""
        try:
            from optimizer.milp import solve_milp_top_k  # SciPy only on this rare path
        except ImportError as exc:
            raise SearchLimitError(
                f"the exact search would hold more than node_limit={limit} states on this problem and the "
                "MILP fallback needs SciPy, which is not installed; pass a larger node_limit "
                "(memory grows with it) or install scipy"
            ) from exc
        method = f"milp (search passed {limit} states)"
        found = solve_milp_top_k(problem, top_k)
        if not found:
            return infeasible(self._bounds, _JOINTLY_INFEASIBLE, method, states)
        solutions = [evaluate_indices(problem, s, self._bounds, self.measured) for _, s in found]
        return self._finish(problem, solutions, method, states)


def _with(solution: Solution, **changes: Any) -> Solution:
    from dataclasses import replace

    return replace(solution, **changes)


def compile_problem(source: Problem | Mapping[str, Any] | str | Path) -> CompiledProblem:
    """A `CompiledProblem` from a `Problem`, or from its JSON form (validated first).

    The compiled problem keeps the problem's budgets, current selection and penalty as
    the defaults of `CompiledProblem.solve`.
    """
    problem = source if isinstance(source, Problem) else parse_problem(source)
    return CompiledProblem(
        problem.models,
        budgets=problem.budgets,
        current=problem.current,
        switch_penalty_per_byte=problem.switch_penalty_per_byte,
    )
