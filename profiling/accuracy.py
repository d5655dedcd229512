"""Accuracy drop of every descendant, and how far the additive model can be trusted.

The drop of (block b, choice c) is how much whole-model accuracy falls when b alone is
switched from its original to c, with every other block held at a background
"environment" selection, averaged over environments:

    drop(b, c) = mean over envs e of  acc(e with b := "0.0") - acc(e with b := c)

so the original choice "0.0" has drop exactly 0 in every environment. In the default
"original" environment the reference is the teacher itself. The optimizer then predicts a
composition's accuracy as teacher accuracy minus the summed drops; `additivity_check`
measures how wrong that prediction is on random compositions.

Work is split so the pipeline can fan it out to Ray: `plan_units` lists independent
`AccuracyUnit`s, `evaluate_unit` runs one of them anywhere the model is, and
`accuracy_drops` assembles the results. `SelectionEvaluator` caches accuracy by selection,
so a selection shared by several units (an environment's reference) is measured once.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from legoblocks.batches import loader
from legoblocks.choices import ORIGINAL
from legoblocks.train import EVAL_BATCH_SIZE


DEFAULT_ENVIRONMENTS: tuple[str, ...] = ("original", "middle", "largest")

Selection = tuple[str, ...]


class ScalableLike(Protocol):
    """What profiling needs from `legoblocks.compose.ScalableModel`."""

    @property
    def block_names(self) -> list[str]: ...

    def choices(self, block: str) -> list[str]: ...

    def compose(self, selection: Sequence[str] | Mapping[str, str]) -> nn.Sequential: ...

    def variant(self, block: str, choice: str) -> nn.Module: ...

    def normalize_selection(self, selection: Sequence[str] | Mapping[str, str]) -> list[str]: ...


def sorted_choices(model: ScalableLike, block: str) -> list[str]:
    """A block's choice ids from the original ("0.0") to the sparsest."""
    return sorted(model.choices(block), key=float)


@dataclass(frozen=True)
class Environment:
    """A background selection: one choice per block, in `block_names` order."""

    name: str
    selection: Selection
    block_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.selection) != len(self.block_names):
            raise ValueError(
                f"environment {self.name!r}: {len(self.selection)} choices for "
                f"{len(self.block_names)} blocks"
            )

    def with_choice(self, block: str, choice: str) -> Selection:
        """This environment's selection with `block` set to `choice`."""
        i = self.block_names.index(block)
        return self.selection[:i] + (choice,) + self.selection[i + 1 :]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "selection": list(self.selection)}


def _named_environment(model: ScalableLike, name: str) -> Environment:
    names = tuple(model.block_names)
    if name == "original":
        sel = tuple(ORIGINAL for _ in names)
    elif name == "middle":
        sel = tuple(sorted_choices(model, b)[len(sorted_choices(model, b)) // 2] for b in names)
    elif name == "largest":
        sel = tuple(sorted_choices(model, b)[-1] for b in names)
    else:
        raise ValueError(
            f"unknown environment {name!r}: use 'original', 'middle', 'largest' or an explicit "
            "selection (a list of choice ids or a {block: choice} dict)"
        )
    return Environment(name, sel, names)


def resolve_environments(
    model: ScalableLike,
    envs: int | Sequence[str | Environment | Sequence[str] | Mapping[str, str]] = DEFAULT_ENVIRONMENTS,
) -> list[Environment]:
    """Turn env names / explicit selections / an int (the first n defaults) into Environments."""
    if isinstance(envs, int):
        if not 1 <= envs <= len(DEFAULT_ENVIRONMENTS):
            raise ValueError(f"envs as a count must be in [1, {len(DEFAULT_ENVIRONMENTS)}], got {envs}")
        envs = DEFAULT_ENVIRONMENTS[:envs]
    if isinstance(envs, str) or not envs:
        raise ValueError(f"envs must be a non-empty list of environments, got {envs!r}")
    resolved = []
    for i, env in enumerate(envs):
        if isinstance(env, Environment):
            resolved.append(Environment(env.name, tuple(model.normalize_selection(list(env.selection))),
                                        tuple(model.block_names)))
        elif isinstance(env, str):
            resolved.append(_named_environment(model, env))
        else:
            sel = tuple(model.normalize_selection(env))
            resolved.append(Environment(f"custom{i}", sel, tuple(model.block_names)))
    names = [e.name for e in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"environment names must be unique, got {names}")
    return resolved


@dataclass(frozen=True)
class AccuracyUnit:
    """One independent piece of work: the drop of (block, choice) in one environment."""

    block: str
    choice: str
    env: Environment

    def reference_selection(self) -> Selection:
        return self.env.with_choice(self.block, ORIGINAL)

    def selection(self) -> Selection:
        return self.env.with_choice(self.block, self.choice)


@dataclass(frozen=True)
class UnitResult:
    """Accuracies of a unit's two selections and their difference (reference - swapped)."""

    unit: AccuracyUnit
    reference_accuracy: float
    accuracy: float

    @property
    def drop(self) -> float:
        return self.reference_accuracy - self.accuracy


def plan_units(model: ScalableLike, envs: int | Sequence[Any] = DEFAULT_ENVIRONMENTS) -> list[AccuracyUnit]:
    """Every (block, non-original choice, environment) unit, in a deterministic order.

    The original choice needs no unit: its drop is 0 by definition.
    """
    environments = resolve_environments(model, envs)
    return [
        AccuracyUnit(block, choice, env)
        for block in model.block_names
        for choice in sorted_choices(model, block)
        if choice != ORIGINAL
        for env in environments
    ]


def unit_selections(units: Iterable[AccuracyUnit]) -> list[Selection]:
    """The distinct selections a list of units needs, in first-use order (to fan out)."""
    seen: dict[Selection, None] = {}
    for unit in units:
        seen.setdefault(unit.reference_selection())
        seen.setdefault(unit.selection())
    return list(seen)


def _recalibrated_block(block: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[nn.Module, list[torch.Tensor]]:
    """A copy of `block` with BatchNorm re-estimated on `inputs`, and its outputs on them.

    Mirrors `legoblocks.bn.recalibrate_bn` for one block: BatchNorm layers reset, in train
    mode with a cumulative average (momentum None), everything else in eval mode. In a
    composed model each BatchNorm then normalizes with batch statistics, so a block's
    input during re-estimation depends only on the blocks before it: re-estimating block
    by block along a prefix gives exactly what re-estimating the whole model gives.
    """
    module = copy.deepcopy(block).eval()
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        if norm.track_running_stats:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
    outputs = [module(x) for x in inputs]
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return module.eval(), outputs


def _runs(group: Sequence[Selection], depth: int) -> Iterable[tuple[str, Sequence[Selection]]]:
    """Split a sorted group into runs that share the choice at `depth`."""
    start = 0
    while start < len(group):
        choice = group[start][depth]
        stop = start
        while stop < len(group) and group[stop][depth] == choice:
            stop += 1
        yield choice, group[start:stop]
        start = stop


class SelectionEvaluator:
    """Validation accuracy of composed selections, each measured at most once.

    Selections are evaluated together where possible (`accuracy_many`): they are sorted
    into a prefix tree and every validation batch walks the tree depth first, so a block
    output shared by several selections (same choices in all blocks before it, e.g. the
    teacher's prefix in most single-swap units) is computed once per batch, not once per
    selection. Memory is one batch activation per block on the current path. The
    arithmetic per selection is exactly that of `legoblocks.train.evaluate` on the
    composed model (same batches, same blocks in order), so results are identical.

    With `bn_recalibration_batches > 0`, each composed model's BatchNorm statistics are
    re-estimated as `legoblocks.bn.recalibrate_bn` does (on copies) on that many batches
    of `bn_data` (training inputs, never the validation set) before it is evaluated; the
    batches are drawn once, seeded, so every selection sees the same ones. Re-estimation
    follows the same prefix tree: a block's statistics depend only on the blocks before
    it, so each distinct prefix is re-estimated once.

    With `held_out > 0` a seeded random `held_out` of the images of `val_ds` (positions
    `held_out_mask`) choose nothing: every accuracy that ranks, fits or picks
    (`accuracy_many`) is measured on the others, and the same pass measures each selection
    on the held-out images too (`held_out_many`), which is what a chosen composition is
    told (`profiling.serving`): a value measured on the images that chose it carries the
    winner's curse of that choice.
    """

    def __init__(
        self,
        model: ScalableLike,
        val_ds: Dataset,
        *,
        batch_size: int = EVAL_BATCH_SIZE,
        bn_data: Dataset | None = None,
        bn_recalibration_batches: int = 0,
        bn_batch_size: int = 128,
        seed: int = 0,
        num_workers: int = 0,
        held_out: int = 0,
    ) -> None:
        if len(val_ds) == 0:  # type: ignore[arg-type]
            raise ValueError("val_ds is empty: profiling needs validation images")
        if not 0 <= held_out < len(val_ds):  # type: ignore[arg-type]
            raise ValueError(f"held_out must be in [0, {len(val_ds)}) for {len(val_ds)} validation images, "  # type: ignore[arg-type]
                             f"got {held_out}: lower the held-out fraction or raise the validation size")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if bn_recalibration_batches < 0:
            raise ValueError(f"bn_recalibration_batches must be >= 0, got {bn_recalibration_batches}")
        if bn_recalibration_batches > 0 and bn_data is None:
            raise ValueError(
                "bn_recalibration_batches > 0 needs bn_data: pass a training split (not the "
                "validation set) to re-estimate BatchNorm statistics on"
            )
        self.model = model
        self.val_ds = val_ds
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.bn_recalibration_batches = bn_recalibration_batches
        self._bn_batches: list[torch.Tensor] | None = None
        if bn_recalibration_batches > 0:
            from legoblocks.bn import calibration_batches

            self._bn_batches = calibration_batches(
                bn_data, num_batches=bn_recalibration_batches, batch_size=bn_batch_size, seed=seed
            )
        self.held_out = held_out
        self.choosing = len(val_ds) - held_out  # type: ignore[arg-type]
        self.held_out_mask = np.zeros(len(val_ds), dtype=bool)  # type: ignore[arg-type]
        self.held_out_mask[np.random.default_rng(seed).permutation(len(val_ds))[:held_out]] = True  # type: ignore[arg-type]
        self.cache: dict[Selection, float] = {}
        self.held_out_cache: dict[Selection, float] = {}
        self.evaluations = 0  # selections actually measured (cache misses)

    def key(self, selection: Sequence[str] | Mapping[str, str]) -> Selection:
        return tuple(self.model.normalize_selection(selection))

    def accuracy(self, selection: Sequence[str] | Mapping[str, str]) -> float:
        return self.accuracy_many([selection])[0]

    def accuracy_many(
        self, selections: Iterable[Sequence[str] | Mapping[str, str]], *, progress: bool = False
    ) -> list[float]:
        """Accuracies of `selections` (in order); only the uncached ones are measured."""
        keys = [self.key(s) for s in selections]
        todo = sorted(set(k for k in keys if k not in self.cache))
        if todo:
            self._measure(todo, progress)
            self.evaluations += len(todo)
        return [self.cache[k] for k in keys]

    def held_out_many(
        self, selections: Iterable[Sequence[str] | Mapping[str, str]], *, progress: bool = False
    ) -> list[float]:
        """Accuracies of `selections` on the held-out images (measured with `accuracy_many`'s pass)."""
        if not self.held_out:
            raise ValueError("this evaluator holds no images out (held_out=0): there is no held-out accuracy")
        keys = [self.key(s) for s in selections]
        missing = [k for k in keys if k not in self.held_out_cache]
        for k in missing:
            self.cache.pop(k, None)  # known on the choosing images only (`update`): measure both
        self.accuracy_many(missing, progress=progress)
        return [self.held_out_cache[k] for k in keys]

    def update(self, measured: Mapping[Selection, float], held_out: Mapping[Selection, float] | None = None) -> None:
        """Add accuracies measured elsewhere (e.g. by Ray workers) so they are not re-measured:
        on the choosing images, and on the held-out ones where given."""
        for sel, acc in measured.items():
            self.cache[self.key(list(sel))] = float(acc)
        for sel, acc in (held_out or {}).items():
            self.held_out_cache[self.key(list(sel))] = float(acc)

    def _prefix_modules(self, todo: list[Selection], device: torch.device) -> dict[Selection, nn.Module]:
        """The module to run at the end of every prefix in the tree (eval mode, copies)."""
        names = self.model.block_names
        modules: dict[Selection, nn.Module] = {}
        if self._bn_batches is None:
            # Without re-estimation a block's copy does not depend on its prefix.
            copies: dict[tuple[int, str], nn.Module] = {}
            for key in todo:
                for i, choice in enumerate(key):
                    if (i, choice) not in copies:
                        copies[(i, choice)] = copy.deepcopy(self.model.variant(names[i], choice)).eval()
                    modules[key[: i + 1]] = copies[(i, choice)]
            return modules

        def build(group: Sequence[Selection], depth: int, inputs: list[torch.Tensor]) -> None:
            if depth == len(names):
                return
            for choice, run in _runs(group, depth):
                module, outputs = _recalibrated_block(self.model.variant(names[depth], choice), inputs)
                modules[run[0][: depth + 1]] = module
                build(run, depth + 1, outputs)

        with torch.no_grad():
            build(todo, 0, [x.to(device) for x in self._bn_batches])
        return modules

    def _measure(self, todo: list[Selection], progress: bool) -> None:
        names = self.model.block_names
        first = self.model.variant(names[0], todo[0][0])
        device = next((p.device for p in first.parameters()), torch.device("cpu"))
        modules = self._prefix_modules(todo, device)
        correct = dict.fromkeys(todo, 0)
        held_correct = dict.fromkeys(todo, 0)
        seen = 0

        def visit(group: Sequence[Selection], depth: int, x: torch.Tensor, y: torch.Tensor, held_at: torch.Tensor) -> None:
            if depth == len(names):
                right = x.argmax(1) == y
                held = int(right[held_at].sum())
                hits = int(right.sum()) - held
                for key in group:
                    correct[key] += hits
                    held_correct[key] += held
                return
            for _, run in _runs(group, depth):
                visit(run, depth + 1, modules[run[0][: depth + 1]](x), y, held_at)

        batches = loader(self.val_ds, self.batch_size, num_workers=self.num_workers)
        with torch.no_grad():
            for x, y in tqdm(batches, desc=f"evaluate {len(todo)} models", disable=not progress, unit="batch"):
                x, y = x.to(device), y.to(device)
                visit(todo, 0, x, y, torch.from_numpy(self.held_out_mask[seen : seen + len(y)]).to(device))
                seen += len(y)
        for key in todo:
            self.cache[key] = correct[key] / self.choosing
            if self.held_out:
                self.held_out_cache[key] = held_correct[key] / self.held_out


def _check_unit(model: ScalableLike, unit: AccuracyUnit) -> None:
    if unit.block not in model.block_names:
        raise ValueError(f"unit names block {unit.block!r}, not in the model ({model.block_names})")
    if unit.choice not in model.choices(unit.block):
        raise ValueError(
            f"unit names choice {unit.choice!r} of block {unit.block!r}; the model has "
            f"{model.choices(unit.block)}"
        )
    if tuple(unit.env.block_names) != tuple(model.block_names):
        raise ValueError(f"unit's environment {unit.env.name!r} was planned for another block order")


def evaluate_unit(model: ScalableLike, unit: AccuracyUnit, evaluator: SelectionEvaluator) -> UnitResult:
    """Measure one unit (its reference and its swapped selection; cached by the evaluator)."""
    _check_unit(model, unit)
    return UnitResult(
        unit=unit,
        reference_accuracy=evaluator.accuracy(unit.reference_selection()),
        accuracy=evaluator.accuracy(unit.selection()),
    )


def results_from_accuracies(units: Iterable[AccuracyUnit], measured: Mapping[Selection, float]) -> list[UnitResult]:
    """Build unit results from accuracies measured per selection (e.g. fanned out by selection)."""
    results = []
    for unit in units:
        try:
            results.append(UnitResult(unit, measured[unit.reference_selection()], measured[unit.selection()]))
        except KeyError as exc:
            raise ValueError(f"no measured accuracy for selection {exc.args[0]} needed by {unit}") from None
    return results


def accuracy_drops(model: ScalableLike, results: Iterable[UnitResult]) -> dict[str, dict[str, float]]:
    """Mean drop per (block, choice) over environments; "0.0" is exactly 0 for every block.

    Every non-original choice of every block must be covered by at least one result.
    """
    sums: dict[tuple[str, str], list[float]] = {}
    for r in results:
        sums.setdefault((r.unit.block, r.unit.choice), []).append(r.drop)
    drops: dict[str, dict[str, float]] = {}
    missing = []
    for block in model.block_names:
        drops[block] = {}
        for choice in sorted_choices(model, block):
            if choice == ORIGINAL:
                drops[block][choice] = 0.0
            elif (block, choice) in sums:
                drops[block][choice] = float(np.mean(sums[(block, choice)]))
            else:
                missing.append((block, choice))
    if missing:
        raise ValueError(f"no unit results for {missing}: evaluate every unit from plan_units first")
    return drops


def summed_drop(block_names: Sequence[str], drops: Mapping[str, Mapping[str, float]], selection: Sequence[str]) -> float:
    """Sum of the per-block drops of a selection (list in block order)."""
    return float(sum(drops[b][c] for b, c in zip(block_names, selection)))


def random_compositions(
    model: ScalableLike, n: int, seed: int, *, exclude: Iterable[Selection] = ()
) -> list[Selection]:
    """`n` distinct random selections (each block's choice uniform), never the original.

    Fewer are returned only when the model has fewer distinct compositions than asked for.
    """
    rng = np.random.default_rng(seed)
    names = model.block_names
    options = [sorted_choices(model, b) for b in names]
    taken = set(exclude) | {tuple(ORIGINAL for _ in names)}
    out: list[Selection] = []
    for _ in range(100 * max(n, 1)):
        if len(out) >= n:
            break
        sel = tuple(opts[int(rng.integers(len(opts)))] for opts in options)
        if sel not in taken:
            taken.add(sel)
            out.append(sel)
    return out


@dataclass(frozen=True)
class AdditivityPoint:
    """One composition: accuracy predicted from summed drops and measured."""

    selection: Selection
    predicted: float
    measured: float

    @property
    def error(self) -> float:
        return self.predicted - self.measured

    def to_dict(self) -> dict[str, Any]:
        return {"selection": list(self.selection), "predicted": self.predicted, "measured": self.measured}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdditivityPoint:
        return cls(tuple(d["selection"]), float(d["predicted"]), float(d["measured"]))


@dataclass(frozen=True)
class AdditivityReport:
    """How well teacher accuracy minus summed drops predicts measured accuracy.

    mae and max_error are absolute errors in accuracy (fractions, x100 for points) over
    n random compositions; bias is the mean of predicted - measured (> 0: optimistic).
    """

    mae: float
    max_error: float
    n: int
    points: list[AdditivityPoint] = field(default_factory=list)
    bias: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "mae": self.mae,
            "max_error": self.max_error,
            "bias": self.bias,
            "n": self.n,
            "points": [p.to_dict() for p in self.points],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdditivityReport:
        return cls(
            mae=float(d["mae"]),
            max_error=float(d["max_error"]),
            n=int(d["n"]),
            points=[AdditivityPoint.from_dict(p) for p in d.get("points", [])],
            bias=float(d.get("bias", 0.0)),
        )

    @classmethod
    def from_points(cls, points: Sequence[AdditivityPoint]) -> AdditivityReport:
        errors = np.array([p.error for p in points], dtype=np.float64)
        if errors.size == 0:
            return cls(mae=0.0, max_error=0.0, n=0, points=[], bias=0.0)
        return cls(
            mae=float(np.abs(errors).mean()),
            max_error=float(np.abs(errors).max()),
            n=len(points),
            points=list(points),
            bias=float(errors.mean()),
        )


def additivity_check(
    model: ScalableLike,
    drops: Mapping[str, Mapping[str, float]],
    evaluator: SelectionEvaluator,
    n: int = 20,
    seed: int = 0,
    *,
    teacher_accuracy: float | None = None,
    compositions: Sequence[Selection] | None = None,
    progress: bool = False,
) -> AdditivityReport:
    """Measure `n` seeded random compositions and compare with teacher accuracy - summed drops.

    `compositions` replaces the random draw when given (e.g. the optimizer's picks).
    """
    if n < 0:
        raise ValueError(f"additivity n must be >= 0, got {n}")
    names = model.block_names
    teacher = evaluator.accuracy([ORIGINAL] * len(names)) if teacher_accuracy is None else teacher_accuracy
    chosen = list(compositions) if compositions is not None else random_compositions(model, n, seed)
    keys = [evaluator.key(list(sel)) for sel in chosen]
    measured = evaluator.accuracy_many(keys, progress=progress)
    return AdditivityReport.from_points(
        [AdditivityPoint(k, teacher - summed_drop(names, drops, k), m) for k, m in zip(keys, measured)]
    )
