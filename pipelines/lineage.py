"""MLflow lineage of a pipeline run: the parent run's results and one child run per block variant.

Lineage is a stage like the others (placement DRIVER: it is I/O against one tracking store),
keyed by the store and the outputs it logs, so a rerun that produced nothing new points its
parent run at the run holding the lineage instead of duplicating every child run.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.recipe.measure import TABLE_FILE
from pipelines.recipe.model import SCALABLE_DIR
from pipelines.recipe.serve import POINTS_FILE, PUBLISH_FILE
from pipelines.stage import NOT_KEYED, Placement, Stage, UnitContext

LINEAGE_NEEDS = ("teacher", "retrain", "joint", "table", "points", "publish")


@dataclass(frozen=True)
class LineageJob:
    tracking_uri: str
    experiment: str
    parent_run_id: str = field(default="", metadata=NOT_KEYED)
    artifact_root: str | None = field(default=None, metadata=NOT_KEYED)


def lineage(ctx: UnitContext[LineageJob]) -> dict[str, Any]:
    """Log the run's results to its parent run and one child run per block variant."""
    from infra.tracking import Tracker, pareto_plot
    from profiling.table import load as load_table

    job = ctx.job
    tracker = Tracker(job.tracking_uri, job.experiment, artifact_root=job.artifact_root)
    parent = job.parent_run_id
    inputs = ctx.inputs
    teacher = inputs.one("teacher").meta
    table_unit = inputs.one("table")
    table = load_table(table_unit.dir / TABLE_FILE)
    scalable_dir = inputs.one("joint").dir / SCALABLE_DIR
    points = json.loads((inputs.one("points").dir / POINTS_FILE).read_text(encoding="utf-8"))
    tracker.log_metrics(parent, {
        "teacher_val_accuracy": teacher.get("val_accuracy"), "teacher_test_accuracy": teacher.get("test_accuracy"),
        "num_blocks": len(table.blocks), "num_options": inputs.one("assemble").meta["num_options"]
        if inputs.all("assemble") else None,
        "additivity_mae": table_unit.meta.get("additivity_mae"), "calibrated_mae": table_unit.meta.get("calibrated_mae"),
    })
    for i, loss in enumerate(inputs.one("joint").meta.get("losses", [])):
        tracker.log_metrics(parent, {"joint_loss": loss}, step=i + 1)
    tracker.log_artifact(parent, table_unit.dir / TABLE_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        plot = Path(tmp) / "pareto.png"
        pareto_plot(points, plot, title=table.model_name)
        tracker.log_artifact(parent, plot)
    tracker.log_dict(parent, points, "points.json")
    for unit in inputs.all("publish"):
        published = json.loads((unit.dir / PUBLISH_FILE).read_text(encoding="utf-8"))
        tracker.log_dict(parent, published["manifest"], "bundle/manifest.json")
        tracker.set_tags(parent, {"legodnn.bundle_uri": published["uri"]})
        tracker.log_params(parent, {"bundle_uri": published["uri"]})
    retrain = {u.unit: u.meta.get("reports", {}) for u in inputs.all("retrain")}
    children = 0
    for block in table.blocks:
        for cid, choice in block.choices.items():
            report = retrain.get(block.name, {}).get(cid, {})
            tracker.log_variant(
                parent, model=table.model_name, block=block.name, choice=cid,
                metrics={
                    "retrain_loss_before": report.get("loss_before"), "retrain_loss_after": report.get("loss_after"),
                    "accuracy_drop": choice.accuracy_drop, "accuracy_drop_raw": choice.accuracy_drop_raw,
                    "params": choice.params, "weight_bytes": choice.weight_bytes, "peak_bytes": choice.peak_bytes,
                    "flops": choice.flops, "latency_ms": choice.latency.median_ms,
                },
                artifacts=[scalable_dir / block.name / f"{cid}.safetensors"],
                params={"scalable": block.spec.get("scalable")},
            )
            children += 1
    return {"parent_run_id": parent, "child_runs": children}


def lineage_stage(parent_run_id: str, artifact_root: str | None) -> Stage:
    """The lineage stage of one invocation (its parent run is this invocation's)."""
    return Stage(
        "lineage", lineage,
        lambda cfg, facts: LineageJob(facts.tracking_uri, cfg.mlflow.experiment, parent_run_id=parent_run_id,
                                      artifact_root=artifact_root),
        needs=("assemble", *LINEAGE_NEEDS), placement=Placement.DRIVER,
    )
