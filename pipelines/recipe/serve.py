"""The stages that choose and ship: measured re-ranking, the Pareto points, the signed bundle."""

from __future__ import annotations

import json
from typing import Any

from legoblocks.choices import original_selection, smallest_selection
from pipelines.recipe.jobs import PointsJob, PublishJob
from pipelines.recipe.measure import TABLE_FILE
from pipelines.recipe.model import SCALABLE_DIR, load_scalable
from pipelines.stage import UnitContext
from profiling.rerank import DEFAULT_MARGIN_SE, pick_measured

POINTS_FILE = "points.json"
PUBLISH_FILE = "publish.json"


def solve_top(table: Any, budgets: dict[str, float | None], top_k: int = 1, *,
              latency_override: dict[tuple[str, str], float] | None = None) -> tuple[bool, list[list[str]]]:
    """The optimizer's feasibility and up to `top_k` best selections of one table, best first."""
    from optimizer import parse_problem, solve
    from profiling.table import to_problem

    problem = to_problem(table, budgets, latency_override=latency_override)
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


def verify_top_k(table: Any, evaluator: Any, fractions: list[float], k: int,
                 extra: list[list[str]] | None = None, margin_se: float = DEFAULT_MARGIN_SE,
                 metric: str = "latency") -> list[dict[str, Any]]:
    """Measured re-ranking: at each budget of the grid (`budget_grid`), measure the optimizer's
    top k on validation data and record the measured winner (ProfileTable.verified).

    The additive prediction ranks near-ties by noise; measuring a handful of them picks the
    composition that is actually best, and a device whose budget matches a grid point uses it.
    `extra` selections (the joint stage's anchors) join the candidates of every budget they
    fit. At the smallest grid budget an anchor fits, it was trained for about that budget:
    there it is kept unless a candidate measures better by more than `margin_se` standard
    errors of the validation accuracy (`profiling.rerank`). The original model counts as an
    anchor: single-swap drops measured within noise of zero, some negative, would otherwise let
    a pruned composition "beat" it where it fits.
    """
    original = original_selection(table.block_names)
    override = flops_override(table) if metric == "flops" else None

    def cost(sel: list[str]) -> float:
        return table.total(sel, "flops") / 1e6 if metric == "flops" else table.predicted_latency(sel)

    n = len(evaluator.val_ds)
    anchors = [list(sel) for sel in extra or []]
    if original not in anchors:
        anchors.append(original)
    grid = budget_grid(table, fractions, metric)
    home: dict[int, float] = {}  # the smallest grid budget each anchor fits: where it is preferred
    for i, sel in enumerate(anchors):
        fits = sorted(f for f, budget in grid if cost(sel) <= budget * (1 + 1e-12))
        if fits:
            home[i] = fits[0]
    verified = []
    for fraction, budget in grid:
        _, candidates = solve_top(table, {"latency_ms": budget}, top_k=k, latency_override=override)
        for sel in anchors:
            if sel not in candidates and cost(sel) <= budget * (1 + 1e-12):
                candidates.append(list(sel))
        if not candidates:
            continue
        accuracies = evaluator.accuracy_many(candidates)
        measured = [{"selection": sel, "predicted_accuracy": table.predicted_accuracy(sel), "measured_accuracy": acc}
                    for sel, acc in zip(candidates, accuracies)]
        preferred = [candidates.index(anchors[i]) for i, f in home.items() if f == fraction]
        best = pick_measured(accuracies, preferred, n=n, margin_se=margin_se)
        verified.append({
            "budget": {"flops": budget * 1e6} if metric == "flops" else {"latency_ms": budget},
            "fraction": fraction, "selection": measured[best]["selection"],
            "measured_accuracy": measured[best]["measured_accuracy"], "optimizer_rank": best + 1,
            "anchor": best in preferred, "candidates": measured,
        })
    return verified


def points(ctx: UnitContext[PointsJob]) -> dict[str, Any]:
    """Optimizer-chosen compositions across latency and memory budgets (the Pareto points),
    with test accuracy measured for the compositions at `job.fractions` of the latency range."""
    from legoblocks.train import evaluate
    from pipelines.data import load_splits
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
            entry.update(predicted_accuracy=table.predicted_accuracy(sel), latency_ms=table.predicted_latency(sel),
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
                          "flops": table.total(original, "flops"), "predicted_accuracy": table.teacher_accuracy}
    (ctx.out / POINTS_FILE).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return {"points": len(result["latency"]) + len(result["memory"]), "measured": len(result["measured"])}


def publish(ctx: UnitContext[PublishJob]) -> dict[str, Any]:
    """Sign and publish the bundle (infra.bundle); record where it went."""
    from infra.bundle import publish_bundle
    from infra.manifest import Preprocessing

    job = ctx.job
    p = job.preprocess
    preprocessing = Preprocessing(channels=p.channels, size=(p.size, p.size), mean=tuple(p.mean), std=tuple(p.std),
                                  color="grayscale" if p.channels == 1 else "rgb", resize=p.resize, center_crop=True)
    published = publish_bundle(ctx.inputs.one("joint").dir / SCALABLE_DIR, ctx.inputs.one("table").dir / TABLE_FILE,
                               job.store, job.key_path, job.model_id, preprocessing=preprocessing,
                               classes=list(job.classes))
    info = {"uri": published.uri, "version": published.version, "manifest": published.manifest}
    (ctx.out / PUBLISH_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")
    return {"uri": published.uri, "version": published.version}
