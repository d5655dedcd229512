"""The stages that measure descendants: cost and latency per block, accuracy per chunk of
compositions, and the ProfileTable that assembles them."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.recipe.jobs import ACCURACY_CHUNK, AccuracyJob, CostJob, ProfilePlanJob, TableJob
from pipelines.recipe.model import load_scalable
from pipelines.stage import Inputs, Item, UnitContext

log = logging.getLogger(__name__)

COST_FILE = "cost.json"
ACCURACY_FILE = "accuracy.json"
TABLE_FILE = "profile.json"

Selection = tuple[str, ...]


class ChoiceSpace:
    """Block names and choices without weights: enough for the profiling planners."""

    def __init__(self, choices: dict[str, list[str]], block_names: list[str]) -> None:
        self.block_names = list(block_names)
        self._choices = choices

    def choices(self, block: str) -> list[str]:
        return list(self._choices[block])

    def normalize_selection(self, selection: Any) -> list[str]:
        if isinstance(selection, dict):
            return [str(selection[b]) for b in self.block_names]
        return [str(c) for c in selection]


def cost(ctx: UnitContext[CostJob]) -> dict[str, Any]:
    """Params, bytes, FLOPs and latency of every variant of one block."""
    from profiling.cost import measure_cost
    from profiling.latency import fingerprint, measure_latency

    scalable = load_scalable(ctx.inputs.one("joint").dir)
    block = ctx.item.name
    spec = scalable.spec(block)
    lat = ctx.job.latency
    rows = {}
    for choice in scalable.choices(block):
        module = scalable.variant(block, choice)
        latency = measure_latency(module, spec.in_shape, batch_size=lat.batch_size, warmup=lat.warmup,
                                  repeats=lat.repeats, threads=lat.threads)
        rows[choice] = {"cost": measure_cost(module, spec.in_shape).to_dict(), "latency": latency.to_dict()}
    result = {"block": block, "choices": rows, "fingerprint": fingerprint(lat.threads)}
    (ctx.out / COST_FILE).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return {"block": block, "node": result["fingerprint"].get("hostname", "")}


def read_costs(units: list[Any]) -> dict[str, dict[str, Any]]:
    """block -> cost.json content (choices with cost and latency, and the host fingerprint)."""
    rows = {}
    for unit in units:
        data = json.loads((Path(unit.dir) / COST_FILE).read_text(encoding="utf-8"))
        rows[data["block"]] = data
    return rows


def plan_from_inputs(plan: ProfilePlanJob, inputs: Inputs):
    """The profile's plan (`profiling.profile.plan_profile`) from the assembled choices and the
    cost units' FLOPs: the same in every process, no weights needed."""
    from profiling.profile import plan_profile

    assemble = inputs.one("assemble").meta
    costs = read_costs(inputs.all("cost"))
    blocks = list(assemble["blocks"])
    flops = {b: {c: float(row["cost"]["flops"]) for c, row in costs[b]["choices"].items()} for b in blocks}
    return plan_profile(ChoiceSpace(assemble["choices"], blocks), flops, envs=plan.envs,
                        additivity_n=plan.additivity_n, calibration_k=plan.calibration_k, seed=plan.seed)


def accuracy_items(plan: ProfilePlanJob, inputs: Inputs) -> list[Item]:
    """Chunks of the planned compositions: one accuracy unit each."""
    selections = [list(sel) for sel in plan_from_inputs(plan, inputs).selections]
    return [Item(f"chunk{i // ACCURACY_CHUNK:03d}", selections[i : i + ACCURACY_CHUNK])
            for i in range(0, len(selections), ACCURACY_CHUNK)]


def evaluator_for(scalable: Any, data: Any, bn_batches: int, seed: int, held_out_fraction: float = 0.0):
    """A SelectionEvaluator on the validation split (BatchNorm re-estimated on training data),
    a seeded random `held_out_fraction` of it held out of choosing (`profiling.serving`)."""
    from pipelines.data import load_splits
    from profiling.accuracy import SelectionEvaluator
    from profiling.serving import held_out_count

    splits = load_splits(data)
    return SelectionEvaluator(scalable, splits.val, bn_data=splits.train if bn_batches else None,
                              bn_recalibration_batches=bn_batches, seed=seed, num_workers=data.workers,
                              held_out=held_out_count(len(splits.val), held_out_fraction))


@dataclass(frozen=True)
class Accuracies:
    """What the accuracy units measured: per selection on the `n` images that choose, and on
    the `held_out_n` held-out ones (empty when none were held out)."""

    measured: dict[Selection, float]
    held_out: dict[Selection, float]
    n: int
    held_out_n: int


def accuracy(ctx: UnitContext[AccuracyJob]) -> dict[str, Any]:
    """Validation accuracy of a chunk of composed selections (shared prefixes computed once),
    on the choosing images and on the held-out ones."""
    job = ctx.job
    scalable = load_scalable(ctx.inputs.one("joint").dir)
    evaluator = evaluator_for(scalable, job.data, job.bn_recalibration_batches, job.seed, job.held_out_fraction)
    selections = ctx.item.payload
    accuracies = evaluator.accuracy_many(selections)
    held = evaluator.held_out_many(selections) if evaluator.held_out else [None] * len(selections)
    rows = [{"selection": sel, "accuracy": acc, "held_out": h} for sel, acc, h in zip(selections, accuracies, held)]
    result = {"n": evaluator.choosing, "held_out_n": evaluator.held_out, "rows": rows}
    (ctx.out / ACCURACY_FILE).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return {"evaluated": len(rows)}


def read_accuracies(units: list[Any]) -> Accuracies:
    """The accuracy units' results, merged."""
    measured: dict[Selection, float] = {}
    held_out: dict[Selection, float] = {}
    sizes = set()
    for unit in units:
        data = json.loads((Path(unit.dir) / ACCURACY_FILE).read_text(encoding="utf-8"))
        sizes.add((int(data["n"]), int(data["held_out_n"])))
        for row in data["rows"]:
            measured[tuple(row["selection"])] = float(row["accuracy"])
            if row["held_out"] is not None:
                held_out[tuple(row["selection"])] = float(row["held_out"])
    if len(sizes) > 1:
        raise ValueError(f"accuracy units measured on different validation splits {sorted(sizes)}: rerun the stage")
    n, held_out_n = sizes.pop() if sizes else (0, 0)
    return Accuracies(measured, held_out, n, held_out_n)


def table(ctx: UnitContext[TableJob]) -> dict[str, Any]:
    """Assemble the ProfileTable (`profiling.profile.table_from_measurements`), per-host
    latency fingerprints, the composed-latency fit, and the measured winners of a budget
    grid (`serve.verify_top_k`)."""
    from profiling.cost import Cost
    from profiling.latency import LatencyStats
    from profiling.profile import table_from_measurements
    from profiling.serving import even_selections
    from profiling.table import save as save_table
    from pipelines.recipe.serve import verify_top_k

    job = ctx.job
    scalable = load_scalable(ctx.inputs.one("joint").dir)
    names = scalable.block_names
    plan = plan_from_inputs(job.plan, ctx.inputs)
    accuracies = read_accuracies(ctx.inputs.all("accuracy"))
    measured = accuracies.measured
    costs_raw = read_costs(ctx.inputs.all("cost"))
    costs = {b: {c: Cost(**row["cost"]) for c, row in costs_raw[b]["choices"].items()} for b in names}
    latencies = {b: {c: LatencyStats(**row["latency"]) for c, row in costs_raw[b]["choices"].items()} for b in names}
    hosts = {b: costs_raw[b]["fingerprint"] for b in names}
    settings = {
        "seed": job.plan.seed, "val_size": accuracies.n, "held_out_size": accuracies.held_out_n,
        "envs": [e.name for e in plan.environments],
        "additivity_n": len(plan.additivity), "calibration_k": len(plan.calibration),
        "latency": dataclasses.asdict(job.latency), "evaluations": len(measured),
    }
    table = table_from_measurements(
        scalable, plan, measured, costs=costs, latencies=latencies, host=hosts[names[0]],
        bn_recalibration_batches=job.bn_recalibration_batches, model_name=job.model_name, settings=settings,
        val_size=accuracies.n, held_out=accuracies.held_out or None, held_out_size=accuracies.held_out_n,
    )
    # Latency units may have run on different nodes: each choice keeps its own host's id.
    table.blocks = [
        dataclasses.replace(block, choices={
            cid: dataclasses.replace(c, latency=dataclasses.replace(c.latency, fingerprint=hosts[block.name]["id"]))
            for cid, c in block.choices.items()})
        for block in table.blocks
    ]
    table.fingerprints = {h["id"]: dict(h) for h in hosts.values()}
    latency_fit = _latency_calibration(table, scalable, job)
    if job.verify_top_k and job.verify_budgets:
        evaluator = evaluator_for(scalable, job.data, job.bn_recalibration_batches, job.plan.seed,
                                  job.held_out_fraction)
        evaluator.update(measured, accuracies.held_out)
        verify_top_k(table, evaluator, job.verify_budgets, job.verify_top_k,
                     even_selections(table, job.anchor_budgets), metric=job.verify_metric)
    save_table(table, ctx.out / TABLE_FILE)
    calibration = table.calibration or {}
    return {
        "teacher_val_accuracy": table.teacher_accuracy,
        "additivity_mae": (table.additivity or {}).get("mae"),
        "calibrated_mae": calibration.get("heldout_mae_calibrated"),
        "calibration_method": calibration.get("method"),
        "latency_calibration": ({k: v for k, v in latency_fit.to_dict().items() if k != "points"}
                                if latency_fit else None),
        "drops": {b.name: {c: ch.accuracy_drop_raw for c, ch in b.choices.items()} for b in table.blocks},
        "hosts": sorted(table.fingerprints),
        "prediction_error": dataclasses.asdict(table.prediction_error) if table.prediction_error else None,
        "verified": [{"fraction": v["fraction"], **v["told"]} for v in table.verified],
    }


def _latency_calibration(table: Any, scalable: Any, job: TableJob):
    """Time a few compositions end to end here and store the fit in the table, when every
    block was timed on this same host (a fit mixes block and chain timings of one host)."""
    from profiling.latency import fingerprint
    from profiling.latency_fit import measure_latency_calibration

    if job.latency_calibration_k == 0:
        return None
    lat = job.latency
    here = fingerprint(threads=lat.threads)
    if set(table.fingerprints) != {here["id"]}:
        log.warning("latency calibration skipped: blocks were timed on %s, this host is %s",
                    sorted(table.fingerprints), here["id"])
        return None
    medians = {b.name: {c: ch.latency.median_ms for c, ch in b.choices.items()} for b in table.blocks}
    fit = measure_latency_calibration(
        scalable, medians, fingerprint=here["id"], k=job.latency_calibration_k, seed=job.plan.seed,
        batch_size=lat.batch_size, warmup=lat.warmup, repeats=lat.repeats, threads=lat.threads,
    )
    table.latency_calibration = fit.to_dict()
    return fit
