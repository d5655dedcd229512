"""The stages that choose and ship: measured re-ranking, the Pareto points, the signed bundle."""

from __future__ import annotations

import json
from typing import Any

from legoblocks.choices import original_selection, smallest_selection
from pipelines.recipe.jobs import PointsJob, PublishJob
from pipelines.recipe.measure import TABLE_FILE
from pipelines.recipe.model import SCALABLE_DIR, load_scalable
from pipelines.stage import UnitContext

POINTS_FILE = "points.json"
PUBLISH_FILE = "publish.json"


def solve_top(table: Any, budgets: dict[str, float | None], top_k: int = 1, *,
              latency_override: dict[tuple[str, str], float] | None = None,
              measured: bool = True) -> tuple[bool, list[list[str]]]:
    """The optimizer's feasibility and up to `top_k` best selections of one table, best first:
    what is served (`measured`: the measured frontier competes, `profiling.serving`) or the
    additive model's own ranking (`measured=False`)."""
    from optimizer import parse_problem, solve
    from profiling.serving import to_problem

    problem = to_problem(table, budgets, latency_override=latency_override, measured=measured)
    solution = solve(parse_problem(problem), top_k=top_k)
    candidates = [list(s.selection[table.model_name]) for s in [solution, *solution.alternatives]
                  if s.feasible and s.selection]
    return bool(solution.feasible), candidates


def flops_override(table: Any) -> dict[tuple[str, str], float]:
    """Each choice's MFLOPs in the optimizer's latency column: budgets in FLOPs, solved exactly."""
    return {(b.name, cid): c.flops / 1e6 for b in table.blocks for cid, c in b.choices.items()}


def budget_grid(table: Any, fractions: list[float], metric: str) -> list[tuple[float, float]]:
    """(fraction, budget) pairs: "latency" fractions of the range smallest..original in ms,
    "flops" fractions of the original's FLOPs (in MFLOPs, see `flops_override`)."""
    names = table.block_names
    original = original_selection(names)
    if metric == "flops":
        return [(f, f * table.total(original, "flops") / 1e6) for f in fractions]
    lo = table.predicted_latency(smallest_selection(names, {b.name: b.choices for b in table.blocks}))
    hi = table.predicted_latency(original)
    return [(f, lo + f * (hi - lo)) for f in fractions]


def verify_top_k(table: Any, evaluator: Any, fractions: list[float], k: int, anchors: list[list[str]],
                 metric: str = "latency") -> None:
    """Measure what matters and record what is served, in `table` (`profiling.serving`).

    At each budget of the grid (`budget_grid`) the additive model's top k are measured on
    validation data; they and the joint stage's trained `anchors` join the measured frontier;
    the additive model's error on the top-k picks (its bias and spread) is estimated from them,
    on the held-out images where the evaluator holds some out (`SelectionEvaluator.held_out`);
    then `table.verified` records, per grid budget, the composition served and what it is told.
    """
    from profiling.serving import prediction_error, told
    from profiling.table import Measured

    override = flops_override(table) if metric == "flops" else None
    grid = budget_grid(table, fractions, metric)
    picked: dict[tuple[str, ...], None] = {}
    for _, budget in grid:
        _, candidates = solve_top(table, {"latency_ms": budget}, top_k=k, latency_override=override, measured=False)
        picked.update(dict.fromkeys(tuple(c) for c in candidates))
    selections = [list(s) for s in picked]
    kinds = ["measured"] * len(selections) + ["anchor"] * len(anchors)
    everything = selections + anchors
    accuracies = evaluator.accuracy_many(everything)
    held = evaluator.held_out_many(everything) if evaluator.held_out else [None] * len(everything)
    table.measured += [Measured(tuple(s), a, evaluator.choosing, kind, h, evaluator.held_out)
                       for s, a, h, kind in zip(everything, accuracies, held, kinds)]
    cal = table.calibration or {}
    fallback = 1.25 * float(cal.get("heldout_mae_calibrated", (table.additivity or {}).get("mae", 0.0)))
    truth = held if evaluator.held_out else accuracies
    table.prediction_error = prediction_error(
        [(table.predicted_accuracy(s), a) for s, a in zip(selections, truth)], fallback_sd=fallback)
    table.verified = []
    for fraction, budget in grid:
        feasible, served = solve_top(table, {"latency_ms": budget}, latency_override=override)
        if feasible and served:
            table.verified.append({
                "budget": {"flops": budget * 1e6} if metric == "flops" else {"latency_ms": budget},
                "fraction": fraction, "selection": served[0], "told": told(table, served[0]).to_dict(),
            })


def points(ctx: UnitContext[PointsJob]) -> dict[str, Any]:
    """What is served across latency and memory budgets (the Pareto points) and what each is
    told, with test accuracy measured for the compositions at `job.fractions` of the latency
    range (the test split is used to choose nothing: it checks what the user is told)."""
    from legoblocks.train import evaluate
    from pipelines.data import load_splits
    from profiling.serving import told
    from profiling.table import load as load_table

    table = load_table(ctx.inputs.one("table").dir / TABLE_FILE)
    names = table.block_names
    original = original_selection(names)
    smallest = smallest_selection(names, {b.name: b.choices for b in table.blocks})

    def total(sel: list[str], metric: str) -> float:
        return table.predicted_latency(sel) if metric == "latency" else table.total(sel, metric)

    def row(budget_key: str, budget: float, fraction: float) -> dict[str, Any]:
        feasible, picks = solve_top(table, {budget_key: budget})
        entry: dict[str, Any] = {"budget_key": budget_key, "budget": budget, "fraction": fraction,
                                 "feasible": feasible, "selection": picks[0] if picks else None}
        if picks:
            sel = picks[0]
            entry.update(told=told(table, sel).to_dict(), latency_ms=table.predicted_latency(sel),
                         memory_bytes=table.total(sel, "peak_bytes"), flops=table.total(sel, "flops"))
        return entry

    result: dict[str, Any] = {"latency": [], "memory": [], "measured": []}
    grid = ctx.job.grid
    for key, metric, column in (("latency_ms", "latency", "latency"), ("memory_bytes", "peak_bytes", "memory")):
        lo, hi = total(smallest, metric), total(original, metric)
        for i in range(grid):
            fraction = i / max(1, grid - 1)
            result[column].append(row(key, lo + fraction * (hi - lo), fraction))
    lo, hi = table.predicted_latency(smallest), table.predicted_latency(original)
    scalable, test = None, None
    for fraction in ctx.job.fractions:
        entry = row("latency_ms", lo + fraction * (hi - lo), fraction)
        if entry["feasible"]:
            if scalable is None:
                scalable = load_scalable(ctx.inputs.one("joint").dir)
                test = load_splits(ctx.job.data).test
            entry["measured_test_accuracy"] = evaluate(scalable.compose(entry["selection"]), test,
                                                       num_workers=ctx.job.data.workers)
        result["measured"].append(entry)
    result["original"] = {"latency_ms": hi, "memory_bytes": table.total(original, "peak_bytes"),
                          "flops": table.total(original, "flops"), "told": told(table, original).to_dict()}
    (ctx.out / POINTS_FILE).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return {"points": len(result["latency"]) + len(result["memory"]), "measured": len(result["measured"])}


def manifest_preprocessing(p: Any):
    """The data source's `Preprocess` in the bundle's words (`infra.manifest.Preprocessing`):
    what a device does to an image, without reading this code."""
    from infra.manifest import Preprocessing

    return Preprocessing(channels=p.channels, size=(p.size, p.size), mean=tuple(p.mean), std=tuple(p.std),
                         color="grayscale" if p.channels == 1 else "rgb", resize=p.resize, center_crop=True)


def publish(ctx: UnitContext[PublishJob]) -> dict[str, Any]:
    """Sign and publish the bundle (infra.bundle); record where it went."""
    from infra.bundle import publish_bundle

    job = ctx.job
    published = publish_bundle(ctx.inputs.one("joint").dir / SCALABLE_DIR, ctx.inputs.one("table").dir / TABLE_FILE,
                               job.store, job.key_path, job.model_id, preprocessing=manifest_preprocessing(job.preprocess),
                               classes=list(job.classes))
    info = {"uri": published.uri, "version": published.version, "manifest": published.manifest}
    (ctx.out / PUBLISH_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")
    return {"uri": published.uri, "version": published.version}
