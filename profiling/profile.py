"""Profile a ScalableModel end to end, in-process: costs, latency, drops, additivity, calibration.

The steps are separate functions so the pipeline can run the expensive middle (accuracy
of many compositions) on Ray workers and still assemble the same table:

    costs = measure_costs(model); latencies, host = measure_latencies(model, ...)
    plan = plan_profile(model, flops, envs=..., additivity_n=..., calibration_k=...)
    measured = {sel: accuracy(sel) for sel in plan.selections}      # fan-out point
    table = table_from_measurements(model, plan, measured, costs=..., latencies=..., host=...)

`profile_model` runs them all in this process with one SelectionEvaluator (shared prefixes
computed once); the pipeline's cost, accuracy and table stages run the same functions.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset
from tqdm.auto import tqdm

from legoblocks.choices import ORIGINAL
from legoblocks.train import EVAL_BATCH_SIZE
from profiling.accuracy import (
    DEFAULT_ENVIRONMENTS,
    AdditivityReport,
    Environment,
    ScalableLike,
    Selection,
    SelectionEvaluator,
    accuracy_drops,
    plan_units,
    resolve_environments,
    sorted_choices,
    unit_selections,
)
from profiling.calibrate import DEFAULT_K, Calibration
from profiling.cost import Cost, measure_cost
from profiling.latency import LatencyStats, fingerprint, measure_latency
from profiling.latency_fit import DEFAULT_LATENCY_K, LatencyCalibration, measure_latency_calibration
from profiling.serving import HELD_OUT_FRACTION, held_out_count
from profiling.table import BlockProfile, ChoiceProfile, LatencyColumn, Measured, ProfileTable

Drops = Mapping[str, Mapping[str, float]]


@dataclass(frozen=True)
class LatencySettings:
    """How per-block latency is measured (see `profiling.latency.measure_latency`)."""

    batch_size: int = 1
    warmup: int = 5
    repeats: int = 30
    threads: int = 1


def _spec(model: ScalableLike, block: str) -> Any:
    for spec in model.specs:  # type: ignore[attr-defined]
        if spec.name == block:
            return spec
    raise KeyError(block)


def measure_costs(model: ScalableLike, *, progress: bool = False) -> dict[str, dict[str, Cost]]:
    """Cost of every (block, choice), each measured on the block's own input shape."""
    pairs = [(b, c) for b in model.block_names for c in sorted_choices(model, b)]
    costs: dict[str, dict[str, Cost]] = {b: {} for b in model.block_names}
    for block, choice in tqdm(pairs, desc="cost", disable=not progress, unit="block"):
        costs[block][choice] = measure_cost(model.variant(block, choice), _spec(model, block).in_shape)  # type: ignore[attr-defined]
    return costs


def measure_latencies(
    model: ScalableLike, settings: LatencySettings = LatencySettings(), *, progress: bool = False
) -> tuple[dict[str, dict[str, LatencyStats]], dict]:
    """Latency of every (block, choice) on this host, and the host's fingerprint."""
    pairs = [(b, c) for b in model.block_names for c in sorted_choices(model, b)]
    stats: dict[str, dict[str, LatencyStats]] = {b: {} for b in model.block_names}
    for block, choice in tqdm(pairs, desc="latency", disable=not progress, unit="block"):
        stats[block][choice] = measure_latency(
            model.variant(block, choice),  # type: ignore[attr-defined]
            _spec(model, block).in_shape,
            batch_size=settings.batch_size,
            warmup=settings.warmup,
            repeats=settings.repeats,
            threads=settings.threads,
        )
    return stats, fingerprint(threads=settings.threads)


def default_model_name(model_ref: str) -> str:
    """A readable name from a model reference: "resnet20", "path/net.py:build" -> "build"."""
    ref = model_ref.strip()
    if not ref:
        return "model"
    return ref.rsplit(":", 1)[-1].rsplit("/", 1)[-1].rsplit(".", 1)[-1] or "model"


def assemble_table(
    model: ScalableLike,
    *,
    teacher_accuracy: float,
    costs: Mapping[str, Mapping[str, Cost]],
    latencies: Mapping[str, Mapping[str, LatencyStats]],
    host: dict,
    drops_raw: Drops,
    additivity: AdditivityReport | None,
    calibration: Calibration | None,
    environments: Sequence[dict[str, Any]],
    bn_recalibration_batches: int = 0,
    model_name: str | None = None,
    settings: Mapping[str, Any] | None = None,
    latency_calibration: LatencyCalibration | None = None,
    measured: Sequence[Measured] = (),
) -> ProfileTable:
    """Build the ProfileTable from the measured parts (no measuring happens here).

    The optimizer's drops are the raw drops clipped at 0 (a swap that measured better than
    the original is noise the optimizer must not count on), calibrated when a calibration is
    given; the raw drops are kept as measured.
    """
    flops = {b: {c: cost.flops for c, cost in per.items()} for b, per in costs.items()}
    clipped = clip_drops(drops_raw)
    drops = calibration.apply(clipped, flops) if calibration else clipped
    model_ref = str(getattr(model, "model_ref", "") or "")
    blocks = []
    for name in model.block_names:
        choices = {}
        for cid in sorted_choices(model, name):
            cost, lat = costs[name][cid], latencies[name][cid]
            choices[cid] = ChoiceProfile(
                id=cid,
                sparsity=float(cid),
                params=cost.params,
                weight_bytes=cost.weight_bytes,
                flops=cost.flops,
                activation_bytes=cost.activation_bytes,
                peak_bytes=cost.peak_bytes,
                accuracy_drop=float(drops[name][cid]),
                accuracy_drop_raw=float(drops_raw[name][cid]),
                latency=LatencyColumn(lat.median_ms, lat.p10_ms, lat.p90_ms, lat.cv, host["id"]),
            )
        blocks.append(BlockProfile(name=name, spec=_spec(model, name).to_dict(), choices=choices))
    return ProfileTable(
        model_ref=model_ref,
        model_name=model_name or default_model_name(model_ref),
        input_shape=tuple(int(d) for d in model.input_shape),  # type: ignore[attr-defined]
        teacher_accuracy=float(teacher_accuracy),
        blocks=blocks,
        fingerprints={host["id"]: dict(host)},
        environments=[dict(e) for e in environments],
        additivity=additivity.to_dict() if additivity else None,
        calibration=calibration.to_dict() if calibration else None,
        latency_calibration=latency_calibration.to_dict() if latency_calibration else None,
        bn_recalibration_batches=bn_recalibration_batches,
        settings=dict(settings or {}),
        measured=list(measured),
    )


@dataclass(frozen=True)
class ProfilePlan:
    """Every composition a profile measures: the single swaps of each environment, the
    additivity check's random compositions (held out from the calibration) and the
    FLOPs-spread compositions the calibration fits. `selections` is all of them, once each,
    the original first: measure them in any order or process, then `table_from_measurements`."""

    environments: list[Environment]
    additivity: list[Selection]
    calibration: list[Selection]
    selections: list[Selection]


def plan_profile(model: ScalableLike, flops: Mapping[str, Mapping[str, float]], *,
                 envs: int | Sequence[Any] = DEFAULT_ENVIRONMENTS, additivity_n: int = 20,
                 calibration_k: int = DEFAULT_K, seed: int = 0) -> ProfilePlan:
    """The compositions to measure (deterministic for a seed; `model` needs only block names
    and choices, so a planner can run without weights).

    Args:
        model: the scalable model (or anything with `block_names`, `choices`, `normalize_selection`).
        flops: FLOPs per block and choice (spreads the calibration compositions).
        envs: background environments of the single-swap drops.
        additivity_n: random compositions for the held-out additivity check.
        calibration_k: FLOPs-spread compositions the calibration fits (0: no calibration).
        seed: every draw's seed (the calibration's is seed + 1).
    """
    from profiling.accuracy import random_compositions
    from profiling.calibrate import spread_compositions

    if additivity_n < 0 or calibration_k < 0:
        raise ValueError(f"additivity_n ({additivity_n}) and calibration_k ({calibration_k}) must be >= 0")
    if calibration_k > 0 and additivity_n == 0:
        raise ValueError("calibration is scored on the additivity compositions: set additivity_n >= 1 "
                         "or calibration_k = 0")
    environments = resolve_environments(model, envs)
    additivity = random_compositions(model, additivity_n, seed)
    calibration = (spread_compositions(model, flops, calibration_k, seed + 1, exclude=additivity)
                   if calibration_k else [])
    wanted: dict[Selection, None] = {tuple(ORIGINAL for _ in model.block_names): None}
    for sel in [*unit_selections(plan_units(model, environments)), *additivity, *calibration]:
        wanted.setdefault(tuple(sel))
    return ProfilePlan(environments, list(additivity), list(calibration), list(wanted))


def table_from_measurements(
    model: ScalableLike,
    plan: ProfilePlan,
    measured: Mapping[Selection, float],
    *,
    costs: Mapping[str, Mapping[str, Cost]],
    latencies: Mapping[str, Mapping[str, LatencyStats]],
    host: dict,
    bn_recalibration_batches: int = 0,
    model_name: str | None = None,
    settings: Mapping[str, Any] | None = None,
    latency_calibration: LatencyCalibration | None = None,
    val_size: int = 1,
    held_out: Mapping[Selection, float] | None = None,
    held_out_size: int = 0,
) -> ProfileTable:
    """The ProfileTable from a plan's measured accuracies: drops averaged over environments,
    the additivity check, the calibration fit, costs and latencies (nothing is measured here);
    every measured composition joins the table's measured frontier (`profiling.serving`).

    Args:
        model: the scalable model the plan was made for.
        plan: from `plan_profile`.
        measured: validation accuracy of every selection in `plan.selections`, on the
            images that choose.
        costs, latencies, host: per block and choice, and the host that timed them.
        val_size: the validation images each accuracy was measured on.
        held_out: the same selections' accuracy on `held_out_size` held-out images (what a
            served composition is told, `profiling.serving`); None when none were held out.
    """
    from profiling.accuracy import AdditivityPoint, results_from_accuracies, summed_drop
    from profiling.calibrate import fit_calibration

    names = model.block_names
    teacher = measured[tuple(ORIGINAL for _ in names)]
    raw = accuracy_drops(model, results_from_accuracies(plan_units(model, plan.environments), measured))
    drops = clip_drops(raw)

    def points(selections: Sequence[Selection]) -> list[AdditivityPoint]:
        return [AdditivityPoint(tuple(s), teacher - summed_drop(names, drops, s), measured[tuple(s)])
                for s in selections]

    additivity = AdditivityReport.from_points(points(plan.additivity)) if plan.additivity else None
    calibration = None
    if plan.calibration and additivity is not None:
        flops = {b: {c: cost.flops for c, cost in per.items()} for b, per in costs.items()}
        calibration = fit_calibration(names, drops, teacher, points(plan.calibration), additivity.points, flops=flops)
    original = tuple(ORIGINAL for _ in names)
    frontier = [Measured(tuple(sel), float(measured[tuple(sel)]), val_size,
                         "original" if tuple(sel) == original else "measured",
                         None if held_out is None else float(held_out[tuple(sel)]), held_out_size if held_out else 0)
                for sel in plan.selections]
    return assemble_table(
        model, teacher_accuracy=teacher, costs=costs, latencies=latencies, host=host, drops_raw=raw,
        additivity=additivity, calibration=calibration, environments=[e.to_dict() for e in plan.environments],
        bn_recalibration_batches=bn_recalibration_batches, model_name=model_name, settings=settings,
        latency_calibration=latency_calibration, measured=frontier,
    )


def clip_drops(drops: Drops) -> dict[str, dict[str, float]]:
    """Drops below 0 set to 0: a swap cannot be counted on to gain accuracy."""
    return {b: {c: max(0.0, float(d)) for c, d in per.items()} for b, per in drops.items()}


def profile_model(
    model: ScalableLike,
    val_ds: Dataset,
    *,
    envs: int | Sequence[Any] = DEFAULT_ENVIRONMENTS,
    latency: LatencySettings = LatencySettings(),
    additivity_n: int = 20,
    calibration_k: int = DEFAULT_K,
    latency_calibration_k: int = DEFAULT_LATENCY_K,
    seed: int = 0,
    bn_recalibration_batches: int = 0,
    bn_data: Dataset | None = None,
    bn_batch_size: int = 128,
    batch_size: int = EVAL_BATCH_SIZE,
    model_name: str | None = None,
    held_out_fraction: float = HELD_OUT_FRACTION,
    progress: bool = False,
) -> ProfileTable:
    """Profile every descendant of `model` on `val_ds` in this process and return its table.

    The same plan and assembly as the pipeline's cost, accuracy and table stages
    (`plan_profile`, `table_from_measurements`), with every composition measured here by one
    SelectionEvaluator. val_ds must not be the retraining data. `bn_recalibration_batches > 0`
    re-estimates BatchNorm of every composed model on that many batches of `bn_batch_size`
    images of `bn_data` (a training split) before evaluating it, teacher included.
    `held_out_fraction` of `val_ds` (a seeded random draw) chooses nothing: the frontier's told
    values are measured there (`profiling.serving`).
    Everything but latency is deterministic given the seed; `settings["seconds"]` holds the
    seconds of each phase (costs, latency, accuracy).
    """
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[phase] = round(now - clock, 3)
        clock = now

    costs = measure_costs(model, progress=progress)
    lap("costs")
    latencies, host = measure_latencies(model, latency, progress=progress)
    latency_calibration = None
    if latency_calibration_k:
        latency_calibration = measure_latency_calibration(
            model, {b: {c: st.median_ms for c, st in per.items()} for b, per in latencies.items()},
            fingerprint=host["id"], k=latency_calibration_k, seed=seed, batch_size=latency.batch_size,
            warmup=latency.warmup, repeats=latency.repeats, threads=latency.threads, progress=progress,
        )
    lap("latency")
    flops = {b: {c: float(cost.flops) for c, cost in per.items()} for b, per in costs.items()}
    plan = plan_profile(model, flops, envs=envs, additivity_n=additivity_n, calibration_k=calibration_k, seed=seed)
    evaluator = SelectionEvaluator(
        model, val_ds, batch_size=batch_size, bn_data=bn_data,
        bn_recalibration_batches=bn_recalibration_batches, bn_batch_size=bn_batch_size, seed=seed,
        held_out=held_out_count(len(val_ds), held_out_fraction),  # type: ignore[arg-type]
    )
    # All selections in one pass, so shared prefixes are computed once.
    measured = dict(zip(plan.selections, evaluator.accuracy_many(plan.selections, progress=progress)))
    held_out = dict(zip(plan.selections, evaluator.held_out_many(plan.selections))) if evaluator.held_out else None
    lap("accuracy")
    settings = {
        "seed": seed, "val_size": evaluator.choosing, "held_out_size": evaluator.held_out,
        "envs": [e.name for e in plan.environments], "additivity_n": len(plan.additivity),
        "calibration_k": len(plan.calibration), "latency_calibration_k": latency_calibration_k,
        "latency": dataclasses.asdict(latency), "evaluations": evaluator.evaluations, "seconds": seconds,
    }
    if bn_recalibration_batches:
        settings["bn_batch_size"] = bn_batch_size
    return table_from_measurements(
        model, plan, measured, costs=costs, latencies=latencies, host=host,
        bn_recalibration_batches=bn_recalibration_batches, model_name=model_name, settings=settings,
        latency_calibration=latency_calibration, val_size=evaluator.choosing, held_out=held_out,
        held_out_size=evaluator.held_out,
    )
