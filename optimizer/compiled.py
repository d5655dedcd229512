"""A compiled problem: validated once, arrays built once, re-solved under any budgets.

`compile_problem(problem)` turns the models of a `Problem` into the arrays the exact
search works on; `CompiledProblem.solve(budgets=..., current=..., top_k=...)` then
re-solves without parsing or validating the tables again. A device re-solves on every
budget change (`RuntimeScaler`, `legodnn-fetch --watch`) and several times per change
(`solve_measured`): they keep one compiled problem.

The method (exact; `optimizer.dual` and `optimizer.search` have the parts):

1. **Items.** Value per choice ``-w * drop - penalty * switch``, a coefficient per active
   constraint (the shared latency budget, each model's deadline, memory, switch bytes),
   laid out per chunk of blocks once per kind of constraints (`search.Layout`, cached
   while nothing that changes the coefficients changes). A constraint whose smallest
   achievable total exceeds its budget makes the problem infeasible at once, with how far
   off it is.
2. **Multipliers.** A small set of Lagrangian multiplier vectors around the dual's
   minimum (batched evaluations of the dual over all groups at once).
3. **First threshold.** Under the best multipliers, the best choice per group with the
   most contested groups free to take their second best: the k-th best feasible value
   among those combinations is the threshold T (a value k distinct selections reach).
4. **Pass.** Every feasible selection that can reach T is enumerated (per model in chunks
   of blocks, then merged across models, pruned by the multipliers' bounds): the k best
   are exact. Without a first threshold, a beam pass finds one first.
5. **Ties.** Values within ``eps`` (1e-11 of the objective's scale: float noise) are
   ties; the answer is the lexicographically smallest selection by (model, block, choice
   index) among those tied with the best, so a problem always yields the same selection.

**Prepared problems** (`prepare`, `compile_problem(..., frontiers=True)`, `RuntimeScaler`)
also keep each model's frontier (`optimizer.frontier`): the selections no other of the
same model beats under any budgets. A solve with top_k=1 and no switching cost reads them
instead of the pass over chunks: one model's best row that fits, or for several models
(while their frontiers are small: `MERGE_ROWS_PAIR`, `MERGE_ROWS_FEW`, `MERGE_ROWS`) the
same enumeration over their rows, with multipliers from a grid of the dual precomputed
per kind of constraints (`dual.DualGrid`) and step 3's threshold, whose multiplier-only
part is kept for every point of that grid (`dual.core_parts`).
Where that path does not decide (nothing feasible found, too many pairs), the search does.

**One constraint** (a single budget, FLOPs or latency, and no measured composition that
fits) has an exact method that pruning does not limit: meet in the middle
(`optimizer.halves`). Where the values are nearly proportional to usage (drops calibrated
against FLOPs), every selection that fills the budget ties with the bound and the pass
above enumerates millions; the halves do not care. It answers first while the halves are
small (`HALF_ROWS`), and before the MILP where a pass passes its state limit.

Every reported number comes from `optimizer.evaluation.evaluate_indices`. Worst case is
exponential (NP-hard): a pass that would hold more than `node_limit` states stops and the
independent MILP (`optimizer.milp`, SciPy/HiGHS) answers, or, where SciPy is not
installed (a device), `SearchLimitError` says what to raise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np

from optimizer.dual import CoreParts, DualGrid, Relaxation, axes_values, core_parts, core_selections, dual_grid, lp_infeasible, multipliers, natural_scale
from optimizer.evaluation import Solution, budget_limit, evaluate_indices, infeasible
from optimizer.frontier import DEFAULT_CAP, Frontier, Frontiers, best_rows, model_frontier, stack
from optimizer.halves import FALLBACK_HALF_ROWS, HALF_ROWS, half_rows, top_pairs
from optimizer.problem import Budgets, Model, Problem, parse_budgets, parse_current, parse_problem
from optimizer.search import Bounds, Layout, PassResult, StateLimit, bounds, layout, run_pass

__all__ = ["DEFAULT_NODE_LIMIT", "CompiledProblem", "SearchLimitError", "compile_problem"]

DEFAULT_NODE_LIMIT = 200_000
METHOD = "lagrangian-enumeration"
FRONTIER_METHOD = "frontier"
HALVES_METHOD = "meet-in-the-middle"
_MARGIN = 4.0  # frontiers keep every selection within this many tie windows of a better one
MERGE_ROWS = 14_000  # six or more models' frontiers are merged where they hold at most this many rows in all
MERGE_ROWS_FEW = 80_000  # the same for three to five models: fewer merge steps, each carrying fewer partial selections
MERGE_ROWS_PAIR = 40_000  # the same for two models: one merge, no partial selections carried into another
BEAM = 32  # partial selections per model a beam pass keeps (when no first threshold was found)
_FRUGAL_STEPS = (0, 1, 3)  # grid steps above the best point tried for a first value (x1, x1.245, x1.93)
CORE_GROUPS = (12, 14, 16)  # contested groups whose two best choices the first threshold tries (by size)
ITEM_BUDGET = 2048
PROBE_GROUPS = 90  # on more groups than this the first pass probes from the bound
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


@lru_cache(maxsize=256)
def _combinations(dims: tuple[int, ...]) -> np.ndarray:
    """(prod(dims), len(dims)): every combination of one index per dimension, lexicographic."""
    return np.indices(dims).reshape(len(dims), -1).T


@lru_cache(maxsize=256)
def _partition(sizes: tuple[tuple[int, ...], ...]) -> list[list[list[int]]]:
    """Per model (given by its blocks' choice counts) its chunks: the fewest levels whose
    items (levels x models x the largest chunk) stay within `ITEM_BUDGET`."""
    best = None
    for cap in (4096, 1296, 512, 256, 64, 16):
        parts = [_chunks(s, cap) for s in sizes]
        items = max(math.prod(s[b] for b in chunk) for s, p in zip(sizes, parts) for chunk in p)
        if max(len(p) for p in parts) * len(sizes) * items <= ITEM_BUDGET:
            return parts
        best = parts
    return best  # type: ignore[return-value]


@dataclass(frozen=True)
class _Constraints:
    """One kind of constraints laid out: which budgets and deadlines are active and the
    arrays that depend only on that (and on the running selection when switching counts)."""

    layout: Layout
    value: np.ndarray  # (C, G'): -w * drop - penalty * switch bytes; -inf where no choice
    coef: np.ndarray  # (D, C, G')
    names: list[str]  # per constraint, for messages
    sources: list[str | int]  # per constraint: the budget's field, or the model whose deadline it is
    owner: np.ndarray  # (D,): the model of a deadline, -1 for a shared budget
    least: np.ndarray  # (D,): the smallest achievable total
    largest: np.ndarray  # (D,): the largest achievable total
    scale: np.ndarray  # (D,): `dual.natural_scale`
    axes_part: np.ndarray  # `dual.axes_values` of the relaxation without compositions
    eps: float  # ties: float noise on this objective's scale

    def budgets(self, problem: Problem, models: tuple[Model, ...]) -> list[float]:
        """Each constraint's budget (or deadline) under `problem`."""
        return [
            models[s].latency_deadline_ms if isinstance(s, int) else getattr(problem.budgets, s)  # type: ignore[misc]
            for s in self.sources
        ]


@dataclass(frozen=True)
class _FrontierKind:
    """One kind of constraints on the frontiers: each row's coefficients (D, M, I), each
    model's least usage (D, M) and, for one or two constraints on several models, the dual's
    grid (the multipliers of a re-solve in one matrix product) with the first value's
    budget-independent part at each of its points."""

    coef: np.ndarray
    least: np.ndarray
    grid: DualGrid | None
    cores: CoreParts | None


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
    ) -> None:
        self.models = models
        self.budgets = budgets or Budgets()
        self.current = current
        self.switch_penalty_per_byte = switch_penalty_per_byte
        self.measured = [m.measured() for m in models]
        self.constant = math.fsum(m.weight * m.base_accuracy for m in models)
        blocks = [b for m in models for b in m.blocks]
        n_groups = len(blocks)
        sizes = [len(b.choices) for b in blocks]
        width = max(sizes)
        self._width, self._n_groups = width, n_groups
        self._n_core = CORE_GROUPS[(n_groups > 40) + (n_groups > 80)]
        starts = list(accumulate((len(m.blocks) for m in models), initial=0))
        self._start = np.array(starts)
        # (choice, group) arrays plus a last all-zero group that pads chunks, written through
        # a (group, choice) mask: its row-major order is the blocks' and their choices' order.
        choices = [c for b in blocks for c in b.choices]
        table = np.array([[c.accuracy_drop for c in choices], [c.latency_ms for c in choices],
                          [c.memory_bytes for c in choices], [c.load_bytes for c in choices]], dtype=float)
        by_group = np.arange(width) < np.array(sizes + [1])[:, None]  # (G', C)
        full = np.zeros((4, n_groups + 1, width))
        full[:, :-1][:, by_group[:-1]] = table
        drop, lat, mem, load = full.transpose(0, 2, 1).copy()
        self._valid = by_group.T.copy()
        firsts = list(accumulate(sizes[:-1], initial=0))  # each block's first choice in `table`
        least_lat, least_mem = np.minimum.reduceat(table[1:3], firsts, axis=1).tolist()
        self._minima = (math.fsum(least_lat), math.fsum(least_mem))
        weight = np.array([m.weight for m in models for _ in m.blocks] + [0.0])
        self._value_or_zero = -weight * drop  # the values, 0 where a block has no such choice
        self._value = np.where(self._valid, self._value_or_zero, -np.inf)
        self._lat, self._mem, self._load = lat, mem, load
        self._blocks = blocks
        self._index_cache: list[dict[str, int]] | None = None
        self._build_chunks(tuple(tuple(sizes[lo:hi]) for lo, hi in zip(starts, starts[1:])))
        self._build_compositions(models)
        self._cache: dict[Any, _Constraints] = {}
        self._no_compositions = (np.zeros(0), np.zeros((0, 0)), np.zeros(0, dtype=np.intp))
        self._frontiers: Frontiers | None = None
        self._kinds: dict[tuple[str | int, ...], _FrontierKind] = {}

    def prepare(self, cap: int = DEFAULT_CAP) -> bool:
        """Builds every model's frontier (`optimizer.frontier`), once, for a caller that
        re-solves: from then on a solve without switching costs and with top_k=1 reads the
        frontiers instead of searching the blocks (the same answer, ties included).

        Takes about 0.01-0.3 s per model of 8-12 blocks; call it when a table is loaded.
        Several models are read from their frontiers only while these hold at most
        `MERGE_ROWS_PAIR` selections in all for two models, `MERGE_ROWS_FEW` for three to
        five, `MERGE_ROWS` for more (past that, merging them costs more than searching the
        blocks): the build stops there.

        Args:
            cap: the most selections one model's frontier may hold; past it (degenerate
                tables, where values do not separate selections) no frontier is built.

        Returns:
            Whether solves read frontiers (False: they keep searching the blocks).
        """
        if self._frontiers is not None:
            return True
        margin = _MARGIN * self._tie_window(self._value_or_zero)
        usage = np.stack([self._lat, self._mem])
        built: list[Frontier] = []
        held = 0
        for m, model in enumerate(self.models):
            lo, hi = self._start[m], self._start[m + 1]
            comps = [(self._comp_choice[j, : hi - lo].tolist(), float(self._comp_gain[j]))
                     for j in np.flatnonzero(self._comp_model == m)]
            rows = MERGE_ROWS_PAIR if len(self.models) == 2 else MERGE_ROWS_FEW if len(self.models) <= 5 else MERGE_ROWS
            limit = cap if len(self.models) == 1 else min(cap, rows - held)
            front = model_frontier(self._value_or_zero[:, lo:hi], usage[:, :, lo:hi],
                                   [len(b.choices) for b in model.blocks], margin, comps, limit)
            if front is None:
                return False
            built.append(front)
            held += len(front.value)
        self._frontiers = stack(built)
        default = self._constraints(self.problem())
        if default.value is self._value:
            self._frontier_kind(default)  # this kind of constraints' arrays now, others on first use
        return True

    def _tie_window(self, value_or_zero: np.ndarray) -> float:
        """Values closer than this are ties (float noise): 1e-11 of the objective's scale
        (`value_or_zero`: the items' values, 0 where a block has no such choice)."""
        return _EPS_REL * (abs(self.constant) + float(np.abs(value_or_zero).max(axis=0).sum()))

    @property
    def _index(self) -> list[dict[str, int]]:
        """Per group, choice id -> index (built on first use: `current` and compositions need it)."""
        if self._index_cache is None:
            self._index_cache = [{c.id: i for i, c in enumerate(b.choices)} for b in self._blocks]
        return self._index_cache

    # ------------------------------------------------------------------ construction

    def _build_chunks(self, sizes: tuple[tuple[int, ...], ...]) -> None:
        """Per level and model its chunk's items (`sizes`: each model's choice counts): for
        each of their blocks, span first, a flat index into a (choice, group) array (padding:
        choice 0 of the all-zero last group). Chunks of equal dimensions are written
        together; a chunk's blocks are consecutive groups."""
        per_model = _partition(sizes)
        dims = [[size[chunk[0] : chunk[-1] + 1] for chunk in chunks] for size, chunks in zip(sizes, per_model)]  # chunks are consecutive
        alike: dict[tuple[int, ...], list[tuple[int, int, int]]] = {}  # dims -> (level, model, first group)
        for m, (chunks, model_dims, start) in enumerate(zip(per_model, dims, self._start.tolist())):
            for level, (chunk, d) in enumerate(zip(chunks, model_dims)):
                alike.setdefault(d, []).append((level, m, start + chunk[0]))
        levels, n_items, span = max(map(len, per_model)), max(map(math.prod, alike)), max(map(len, alike))
        shape = (span, levels, len(sizes), n_items)
        stride = self._n_groups + 1  # (choice, group) -> choice * stride + group
        flat = np.full(shape, self._n_groups, dtype=np.intp)  # padding: choice 0 of the last group
        valid = np.zeros(shape[1:], dtype=bool)
        valid[:, :, 0] = True  # a model with fewer chunks has one all-padding item there
        for d, where in alike.items():
            combos, k = _combinations(d), len(d)
            at_level, at_model, first = np.array(where).T
            flat[:k, at_level, at_model, : len(combos)] = (combos.T * stride)[:, None, :] + (first + np.arange(k)[:, None])[:, :, None]
            valid[at_level, at_model, : len(combos)] = True
        self._chunk_valid = valid  # (L, M, I)
        self._chunk_flat = flat  # (span, L, M, I)
        self._chunk_blocks, self._chunk_dims = per_model, dims

    def _path(self, m: int, row: Sequence[int]) -> list[int]:
        """Chunk item per level of model m's selection `row` (choice index per block)."""
        path = [int(np.ravel_multi_index([row[b] for b in chunk], d)) for chunk, d in zip(self._chunk_blocks[m], self._chunk_dims[m])]
        return path + [0] * (self._chunk_valid.shape[0] - len(path))

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
        self._comp_path = np.asarray(paths, dtype=np.intp).reshape(-1, self._chunk_valid.shape[0])

    # ------------------------------------------------------------------ one solve

    def problem(self, budgets: Budgets | Mapping[str, Any] | None = None, current: Any = None) -> Problem:
        """The `Problem` these models pose under `budgets` and `current` (defaults: the compiled ones).

        Budgets and current given in JSON form are validated, with field paths in errors.
        """
        if budgets is None:
            budgets = self.budgets
        elif not isinstance(budgets, Budgets):
            budgets = parse_budgets(budgets)
        return Problem(self.models, budgets, self._current(current), self.switch_penalty_per_byte)

    def _current(self, current: Any) -> Mapping[str, tuple[str, ...]] | None:
        if current is None:
            return self.current
        if isinstance(current, Mapping):  # the common case, checked by lookups; else the full check's error
            out = {}
            for m, model in enumerate(self.models):
                ids = current.get(model.name)
                if ids is None:
                    continue
                start = self._start[m]
                if (isinstance(ids, (list, tuple)) and len(ids) == len(model.blocks)
                        and all(isinstance(c, str) and c in self._index[start + b] for b, c in enumerate(ids))):
                    out[model.name] = tuple(ids)
            if len(out) == len(current):
                return out
        return parse_current(current, self.models)

    def _constraints(self, problem: Problem) -> _Constraints:
        """The arrays for the kinds of constraints `problem` has; cached unless switching counts."""
        budgets, current = problem.budgets, problem.current or {}
        switching = bool(current) and (budgets.switch_bytes is not None or problem.switch_penalty_per_byte > 0)
        key = (budgets.latency_ms is not None, budgets.memory_bytes is not None,
               tuple(sorted(current.items())) if switching else None, budgets.switch_bytes is not None)
        if key in self._cache:
            return self._cache[key]
        value = self._value
        switch = None
        if switching:
            running = np.full(self._n_groups + 1, -1)
            for m, model in enumerate(self.models):
                ids = current.get(model.name)
                if ids is not None:
                    start = self._start[m]
                    running[start : start + len(ids)] = [self._index[start + b][cid] for b, cid in enumerate(ids)]
            rows = np.arange(self._width)[:, None]
            switch = np.where((running >= 0) & (rows != running) & self._valid, self._load, 0.0)
            value = value - problem.switch_penalty_per_byte * switch
        coefs, names, sources = [], [], []
        if budgets.latency_ms is not None:
            coefs.append(self._lat)
            names.append("latency budget")
            sources.append("latency_ms")
        for m, model in enumerate(self.models):
            if model.latency_deadline_ms is not None:
                own = np.zeros_like(self._lat)
                own[:, self._start[m] : self._start[m + 1]] = self._lat[:, self._start[m] : self._start[m + 1]]
                coefs.append(own)
                names.append(f"latency deadline of {model.name}")
                sources.append(m)
        if budgets.memory_bytes is not None:
            coefs.append(self._mem)
            names.append("memory budget")
            sources.append("memory_bytes")
        if switch is not None and budgets.switch_bytes is not None:
            coefs.append(switch)
            names.append("switch budget")
            sources.append("switch_bytes")
        coef = np.array(coefs).reshape(len(coefs), *value.shape)
        valid = self._valid
        value_or_zero = self._value_or_zero if switch is None else np.where(valid, value, 0.0)
        stacked = np.concatenate([value_or_zero[None], coef]).reshape(1 + len(coef), -1)  # (1 + D, C * G')
        items = stacked.take(self._chunk_flat, axis=1).sum(axis=1)  # (1 + D, L, M, I)
        comp = stacked.take(self._comp_choice * (self._n_groups + 1) + self._comp_group, axis=1).sum(axis=2)  # (1 + D, J)
        least = np.where(valid[None], coef, np.inf).min(axis=1).sum(axis=1)
        largest = np.where(valid[None], coef, 0.0).max(axis=1).sum(axis=1)  # coefficients are >= 0
        scale = natural_scale(value, valid, least, largest)
        free = Relaxation(value, coef, np.zeros(len(coef)), self._start[:-1], *self._no_compositions)
        entry = _Constraints(
            layout=layout(np.where(self._chunk_valid, items[0], -np.inf), items[1:], self._chunk_valid,
                          comp[0] + self._comp_gain, comp[1:], self._comp_model, self._comp_path),
            value=value,
            coef=coef,
            names=names,
            sources=sources,
            owner=np.array([m if isinstance(m, int) else -1 for m in sources], dtype=np.intp),
            least=least,
            largest=largest,
            scale=scale,
            axes_part=axes_values(free, scale) if len(coef) else np.zeros(0),
            eps=self._tie_window(value_or_zero),
        )
        if not switching:
            self._cache[key] = entry
        return entry

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
            node_limit: the most states the search may hold before the MILP takes over.

        Returns:
            The `Solution`; objectives closer than float noise (1e-11 of the objective's
            scale) are ties, resolved to the lexicographically smallest selection.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
        problem = self.problem(budgets, current)
        con = self._constraints(problem)
        lay, value, coef, least, scale = con.layout, con.value, con.coef, con.least, con.scale
        budget_list = con.budgets(problem, self.models)
        limits, slack = self._limits(con, budget_list)
        if any(low > limit for low, limit in zip(least.tolist(), limits.tolist())):
            over = [
                f"{name} {budget:g} {_UNITS[name.split()[0]]} is below the smallest achievable {low:g} {_UNITS[name.split()[0]]}"
                for name, budget, low, limit in zip(con.names, budget_list, least, limits)
                if low > limit
            ]
            return infeasible(self._minima, "; ".join(over), "bounds")
        if top_k == 1 and value is self._value and self._frontiers is not None:
            solution = self._on_frontiers(problem, con, limits, slack)
            if solution is not None:
                return solution
        solution = self._on_halves(problem, con, limits, slack, top_k, HALF_ROWS)
        if solution is not None:
            return solution
        zooms = 0 if self._n_groups <= 12 else 1 if self._n_groups <= 24 else 2
        free = Relaxation(value, coef, limits, self._start[:-1], *self._no_compositions)
        lams = multipliers(free, scale, zooms, con.owner, con.axes_part)
        first = self._first_found(value, coef, limits, lams, top_k)
        # The bound with compositions that can fit at all has its own best multipliers: prune with both sets.
        if len(lay.comp_model) and (fits := (lay.comp_need <= limits[:, None]).all(axis=0)).any():
            rel = Relaxation(value, coef, limits, self._start[:-1], lay.comp_value[fits], lay.comp_coef[:, fits], lay.comp_model[fits])
            both = multipliers(rel, scale, zooms, con.owner)
            first = max(first, self._first_target(value, coef, limits, both[0], top_k))
            lams = np.concatenate([both, lams])
        # Summed in another order than `evaluate_indices`: a hair of slack, then the canonical verdict.
        b = bounds(lay, lams, slack)
        eps = max(con.eps, _EPS_REL * float(np.abs(b.upper).max()), 1e-300)
        if first == -np.inf and len(limits) and lp_infeasible(coef, self._valid, limits):
            return infeasible(self._minima, _JOINTLY_INFEASIBLE + " (not even fractionally)", METHOD)
        return self._search(problem, b, first, top_k, eps, node_limit)

    def _limits(self, con: _Constraints, budget_list: list[float]) -> tuple[np.ndarray, np.ndarray]:
        """The constraints' limits, and the same with a hair of slack: sums taken in another
        order than `evaluate_indices` (which gives the canonical verdict) differ by float noise."""
        limit_list = [budget_limit(b) for b in budget_list]
        slack = [limit + 1e-12 * (abs(limit) + most) for limit, most in zip(limit_list, con.largest.tolist())]
        return np.array(limit_list), np.array(slack)

    def _on_halves(self, problem: Problem, con: _Constraints, limits: np.ndarray, slack: np.ndarray,
                   top_k: int, rows: int) -> Solution | None:
        """The solution by meet in the middle (`optimizer.halves`), or None where it does not
        apply: more or fewer than one constraint, a measured composition that could fit (its
        value is not a sum over blocks), a larger half than `rows` selections, more
        candidates than the scan's cap, or a candidate the canonical check rejects."""
        if len(limits) != 1 or (con.layout.comp_need <= limits[:, None]).all(axis=0).any():
            return None
        sizes = [len(b.choices) for b in self._blocks]
        if half_rows(sizes) > rows:
            return None
        eps = max(con.eps, 1e-300)
        found = top_pairs([con.value[:n, g] for g, n in enumerate(sizes)], [con.coef[0, :n, g] for g, n in enumerate(sizes)],
                          float(slack[0]), top_k, eps)
        if found is None or not len(found[1]):
            return None
        choices, values = found
        picked = self._pick_keys(problem, values, choices, lambda key: self._per_model(key.tolist()),
                                 top_k, eps, len(values), HALVES_METHOD)
        if not picked:
            return None
        return self._finish([solution for _, solution in picked])

    def _per_model(self, flat: list[int]) -> list[list[int]]:
        """A flat choice index per group, split into one list per model."""
        return [flat[self._start[m] : self._start[m + 1]] for m in range(len(self.models))]

    def _frontier_kind(self, con: _Constraints) -> _FrontierKind:
        """The frontiers' arrays for the kind of constraints `con` lays out (built on first use)."""
        key = tuple(con.sources)
        if key not in self._kinds:
            fr = self._frontiers
            assert fr is not None
            rows = [fr.usage[0] if s == "latency_ms" else fr.usage[1] if s == "memory_bytes"
                    else np.where(np.arange(len(self.models))[:, None] == s, fr.usage[0], 0.0) for s in con.sources]
            coef = np.stack(rows) if rows else np.zeros((0, *fr.value.shape))
            grid, cores = None, None
            if len(self.models) > 1 and len(rows) in (1, 2):
                lay = con.layout
                rel = Relaxation(con.value, con.coef, np.zeros(len(rows)), self._start[:-1], lay.comp_value, lay.comp_coef, lay.comp_model)
                grid = dual_grid(rel, con.scale)
                cores = core_parts(con.value, con.coef, grid.lams, self._n_core)
            self._kinds[key] = _FrontierKind(coef=coef, least=np.where(fr.valid[None], coef, np.inf).min(axis=2), grid=grid, cores=cores)
        return self._kinds[key]

    def _on_frontiers(self, problem: Problem, con: _Constraints, limits: np.ndarray, slack: np.ndarray) -> Solution | None:
        """The solution read from the frontiers, or None where they do not decide it (then the
        search does: it also says why a problem is infeasible).

        Several models: multipliers from the dual's grid and a first value read from its
        `core_parts` there (else at more frugal grid points, where none of its selections
        fits) set up `frontier.best_rows`; past two constraints the multipliers are searched
        and the first value is `_first_found`'s."""
        fr = self._frontiers
        assert fr is not None
        kind = self._frontier_kind(con)
        lam, known = np.zeros(len(limits)), -np.inf
        if len(self.models) > 1 and kind.grid is not None and kind.cores is not None:
            point = kind.grid.best(limits)
            lam = kind.grid.lams[point]
            for steps in _FRUGAL_STEPS:  # the first value under the grid's best point, else under larger ones
                at = kind.grid.larger(point, steps) if steps else point
                known = self._first_target(con.value, con.coef, limits, kind.grid.lams[at], 1, (kind.cores, at))
                if known > -np.inf:
                    break
        elif len(self.models) > 1:
            free = Relaxation(con.value, con.coef, limits, self._start[:-1], *self._no_compositions)
            lam = multipliers(free, con.scale, 2, con.owner, con.axes_part)[0]
            known = self._first_found(con.value, con.coef, limits, np.array([lam, 1.25 * lam]), 1)
        found = best_rows(fr, kind.coef, kind.least, slack, lam, con.eps, known)
        if found is None:
            return None
        rows, states = found
        indices = [fr.choice[m][r].tolist() for m, r in enumerate(rows)]
        solution = evaluate_indices(problem, indices, self._minima, self.measured, FRONTIER_METHOD, states)
        return solution if solution.feasible else None

    def _first_found(self, value: np.ndarray, coef: np.ndarray, limits: np.ndarray, lams: np.ndarray, top_k: int) -> float:
        """`_first_target` under the best multipliers `lams[0]`, else under more frugal ones
        (the set's largest, then twice the best) where none of its selections fits."""
        first = self._first_target(value, coef, limits, lams[0], top_k)
        for frugal in (lambda: lams[int(lams.sum(axis=1).argmax())], lambda: 2.0 * lams[0]):
            if first > -np.inf:
                break
            first = self._first_target(value, coef, limits, frugal(), top_k)
        return first

    def _first_target(self, value: np.ndarray, coef: np.ndarray, limits: np.ndarray, lam: np.ndarray, top_k: int,
                      parts: tuple[CoreParts, int] | None = None) -> float:
        """A value that top_k distinct feasible selections reach (-inf if none was found).

        Candidates: the best combinations of the contested groups' two best choices, and
        the best of them with one model's selection replaced by each of its compositions,
        or by a greedy pick of one composition per model (best gain first, while it fits).
        """
        selections, values = core_selections(value, coef, limits, lam, self._n_core, top_k, rows=len(self._comp_model) > 0, parts=parts)
        if selections is not None and len(values):  # a composition is worth its measured value
            cols = np.arange(selections.shape[1])
            base = selections[0]
            swapped = np.repeat(base[None], len(self._comp_model) + 1, axis=0)
            rows = np.arange(len(self._comp_model))[:, None]
            swapped[rows, self._comp_group] = self._comp_choice
            own_v = np.add.reduceat(value[base, cols], self._start[:-1])  # (M,) the base's part per model
            own_u = np.add.reduceat(coef[:, base, cols], self._start[:-1], axis=1)  # (D, M)
            comp = self._comp_values(value, coef)
            gain = comp[0] - own_v[self._comp_model]
            extra = comp[1:] - own_u[:, self._comp_model]
            used, taken = coef[:, base, cols].sum(axis=1), set()
            for j in np.argsort(-gain, kind="stable"):
                m = int(self._comp_model[j])
                if gain[j] > 0 and m not in taken and (used + extra[:, j] <= limits).all():
                    taken.add(m)
                    used = used + extra[:, j]
                    swapped[-1, self._comp_group[j]] = self._comp_choice[j]
            fits = (coef[:, swapped, cols].sum(axis=2) <= limits[:, None]).all(axis=0)
            selections = np.concatenate([selections, swapped[fits]])
            values = np.concatenate([values, value[swapped[fits], cols].sum(axis=1)])
            hit = (selections[:, self._comp_group] == self._comp_choice[None]).all(axis=2)  # (n, J)
            values = values + hit.astype(float) @ self._comp_gain
            distinct = np.unique(selections, axis=0, return_index=True)[1]
            values = np.sort(values[distinct])[::-1]
        return float(values[top_k - 1]) if len(values) >= top_k else -np.inf

    def _comp_values(self, value: np.ndarray, coef: np.ndarray) -> np.ndarray:
        """(1 + D, J): each composition's (measured) value and coefficients."""
        stacked = np.concatenate([np.where(self._valid, value, 0.0)[None], coef])
        out = stacked[:, self._comp_choice, self._comp_group].sum(axis=2)
        out[0] += self._comp_gain
        return out

    def _search(self, problem: Problem, b: Bounds, first: float, top_k: int, eps: float, limit: int) -> Solution:
        """Passes at thresholds T until one holds the top_k best at or above T.

        The first T is a value top_k known selections reach (`first`); without one, a beam
        pass (the best partial selections by bound) looks for a start. A T far below the
        optimum makes a pass hold millions of selections; a T above it, only the few whose
        bound reaches it, among which are usually near-optimal ones. So a pass that runs
        past a sixteenth of the state limit, and on many groups the first pass, *probes*
        instead: from just below the bound downwards, each probe's selections raising the
        known value, until the threshold meets it. A pass with fewer than top_k
        selections lowers T: to the k-th best it found, or four times as far from the bound.
        """
        floor, upper = b.lay.floor, b.upper_bound
        states = 0
        known = first if first > floor else -np.inf  # top_k distinct feasible selections reach it
        probing = known > -np.inf and self._n_groups > PROBE_GROUPS and upper > known
        if probing:
            target, beam = upper - (upper - known) / 4, None
        else:
            target, beam = (first, None) if first > floor else (floor, BEAM)
        wide = False  # a pass at the bound (ties) may use the whole state limit
        while True:
            budget = limit - states if probing or wide or beam is not None else min(limit - states, max(limit // 16, 1))
            try:
                found = run_pass(b, target - 2 * eps, budget, beam, top_k, eps / 4)
            except StateLimit:
                if not (probing or wide or beam is not None) and (not np.isfinite(upper) or target >= upper):
                    wide = True
                    continue
                if probing or beam is not None or not np.isfinite(upper) or target >= upper:
                    return self._fallback(problem, top_k, states, limit)
                probing = True
                target = upper - (upper - target) / 8
                continue
            states += found.states
            picked = self._pick(problem, found, top_k, eps, states)
            # Above `dropped` a beam pass is complete, but a state it left out may tie there
            # (and be lexicographically smaller): its picks must beat that bound by more than a tie.
            proven = target if found.dropped == -np.inf else max(target, found.dropped + 3 * eps)
            if (len(picked) >= top_k and picked[-1][0] >= proven - eps) or (target <= floor and found.dropped == -np.inf):
                if not picked:
                    return infeasible(self._minima, _JOINTLY_INFEASIBLE, METHOD, states)
                return self._finish([s for _, s in picked])
            if len(picked) >= top_k:
                known = max(known, picked[-1][0])
            if beam is not None:
                target = known if known > -np.inf else upper - max(upper - found.dropped, 1e-9 * (1.0 + abs(upper)))
            elif probing:
                target = max(known, upper - 2.0 * (upper - target))
            else:
                target = known if len(picked) >= top_k else max(upper - 4.0 * (upper - target), floor)
            beam = None

    def _decode(self, key: np.ndarray) -> list[list[int]]:
        """Choice index per block per model of a selection given by its chunk items (an item
        is its chunk's blocks' choices in lexicographic order: digits in mixed radix)."""
        items, L = key.tolist(), self._chunk_valid.shape[0]
        out = []
        for m, dims in enumerate(self._chunk_dims):
            row: list[int] = []
            for item, d in zip(items[m * L : (m + 1) * L], dims):
                digits = []
                for size in reversed(d):
                    item, digit = divmod(item, size)
                    digits.append(digit)
                row += reversed(digits)
            out.append(row)
        return out

    def _pick(self, problem: Problem, found: PassResult, top_k: int, eps: float, states: int) -> list[tuple[float, Solution]]:
        """The top_k best canonically feasible selections found, as (search value, solution):
        each the lexicographically smallest within eps of the best of those left (values
        summed in another order differ by float noise: ties must not depend on it)."""
        values = found.values
        if not len(values):
            return []

        def keys(rows: np.ndarray) -> np.ndarray:
            return np.concatenate([found.paths[m].take(found.choose[rows, m], axis=0) for m in range(len(self.models))], axis=1)

        if top_k == 1:  # the answer is among the states tied with the best, unless the canonical check rejects one
            near = (values >= values.max() - eps).nonzero()[0]
            picked = self._pick_keys(problem, values[near], keys(near), self._decode, 1, eps, states, METHOD)
            if picked:
                return picked
        picked = self._pick_keys(problem, values, keys(np.arange(len(values))), self._decode, top_k, eps, states, METHOD, skip=True)
        assert picked is not None
        return picked

    def _pick_keys(self, problem: Problem, values: np.ndarray, keys: np.ndarray,
                   decode: Callable[[np.ndarray], list[list[int]]], top_k: int, eps: float, states: int,
                   method: str, skip: bool = False) -> list[tuple[float, Solution]] | None:
        """The top_k best of candidate selections (values, and keys in the selections'
        lexicographic order, `decode`d to choice indices per model), each the lexicographically
        smallest within eps of the best of those left. A candidate the canonical check finds
        infeasible is skipped (`skip`), else the answer is None."""
        if top_k == 1 and len(values) == 1:  # one candidate (the common case): nothing to rank
            solution = evaluate_indices(problem, decode(keys[0]), self._minima, self.measured, method, states)
            if solution.feasible:
                return [(float(values[0]), solution)]
            return [] if skip else None
        alive = np.ones(len(values), dtype=bool)
        out: list[tuple[float, Solution]] = []
        while len(out) < top_k and alive.any():
            idx = np.flatnonzero(alive)
            tied = idx[values[idx] >= values[idx].max() - eps]
            at = tied[np.lexsort(keys[tied].T[::-1])[0]] if len(tied) > 1 else tied[0]
            alive[at] = False
            solution = evaluate_indices(problem, decode(keys[at]), self._minima, self.measured, method, states)
            if solution.feasible:
                out.append((float(values[at]), solution))
            elif not skip:
                return None
        return out

    def _finish(self, solutions: list[Solution]) -> Solution:
        """The first solution, with the others as its alternatives."""
        head, *rest = solutions
        if not rest:
            return head
        rest.sort(key=lambda s: -s.objective)  # stable: equal objectives keep lexicographic order
        return replace(head, alternatives=rest)

    def _fallback(self, problem: Problem, top_k: int, states: int, limit: int) -> Solution:
        """Past the state limit: meet in the middle where it applies (NumPy only, so a device
        without SciPy gets it too), else the MILP, or a clear error where SciPy is missing."""
        con = self._constraints(problem)
        limits, slack = self._limits(con, con.budgets(problem, self.models))
        solution = self._on_halves(problem, con, limits, slack, top_k, FALLBACK_HALF_ROWS)
        if solution is not None:
            return solution
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
            return infeasible(self._minima, _JOINTLY_INFEASIBLE, method, states)
        return self._finish([evaluate_indices(problem, s, self._minima, self.measured, method, states) for _, s in found])


def compile_problem(source: Problem | Mapping[str, Any] | str | Path, *, frontiers: bool = False) -> CompiledProblem:
    """A `CompiledProblem` from a `Problem`, or from its JSON form (validated first).

    The compiled problem keeps the problem's budgets, current selection and penalty as
    the defaults of `CompiledProblem.solve`, and lays out its arrays for those kinds of
    constraints now (other kinds are laid out on first use, then kept). With `frontiers`
    it also builds the models' frontiers (`CompiledProblem.prepare`): for a caller that
    re-solves under many budgets, not for a one-off solve.
    """
    problem = source if isinstance(source, Problem) else parse_problem(source)
    compiled = CompiledProblem(
        problem.models,
        budgets=problem.budgets,
        current=problem.current,
        switch_penalty_per_byte=problem.switch_penalty_per_byte,
    )
    compiled._constraints(problem)  # the arrays for these kinds of constraints, before the first solve
    if frontiers:
        compiled.prepare()
    return compiled
