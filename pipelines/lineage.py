"""The lineage stage: what a pipeline run adds to MLflow at its end.

Per-unit results are logged live while the stages run (`pipelines.live`); lineage logs what
exists only once everything has run: the profile table, the Pareto points and bundle manifest
as artifacts, the Pareto plot and the per-block plot, and the models. The teacher and every
served composition (the optimizer's pick at each measured latency budget of points.json)
become a child run of kind "composition" with an MLflow logged model (ONNX flavour,
`infra.logged_models`), and, when the run published a bundle, a version of the registered
model named after the bundle's model id, tagged with the bundle URI, version and budget,
with an alias per role ("teacher", "latency-33", ...) moved to the newest published version.

Lineage is a stage like the others (placement DRIVER: it is I/O against one tracking store),
keyed by the store and the outputs it logs: a rerun that produced nothing new executes no
lineage (no duplicate models, no registry version without a publish), and the parent run is
tagged with the run that holds it.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legoblocks.choices import ORIGINAL
from pipelines.data import DataRef
from pipelines.recipe.measure import TABLE_FILE
from pipelines.recipe.model import SCALABLE_DIR
from pipelines.recipe.serve import POINTS_FILE, PUBLISH_FILE
from pipelines.stage import NOT_KEYED, Placement, Stage, UnitContext

LINEAGE_NEEDS = ("teacher", "retrain", "joint", "table", "points", "publish")
EXAMPLE_IMAGES = 2  # test images stored with each logged model as its input example


@dataclass(frozen=True)
class LineageJob:
    tracking_uri: str
    experiment: str
    parent_run_id: str = field(default="", metadata=NOT_KEYED)
    artifact_root: str | None = field(default=None, metadata=NOT_KEYED)
    data: DataRef | None = field(default=None, metadata=NOT_KEYED)  # for the input examples


@dataclass(frozen=True)
class Served:
    """A composition lineage logs as a model: the teacher or a served pick."""

    role: str  # "teacher", "latency-33": the registry alias
    selection: list[str]
    metrics: dict[str, Any]
    tags: dict[str, Any]
    description: str


def served_compositions(points: dict[str, Any], table: Any, teacher: dict[str, Any]) -> list[Served]:
    """The teacher and the optimizer's pick at each measured budget of points.json."""
    original = [ORIGINAL] * len(table.blocks)
    out = [Served("teacher", original, {
        "test_accuracy": teacher.get("test_accuracy"), "val_accuracy": teacher.get("val_accuracy"),
        "predicted_latency_ms": table.predicted_latency(original), "flops": table.total(original, "flops"),
        "memory_bytes": table.total(original, "peak_bytes")}, {},
        f"The teacher of **{table.model_name}**: every block's original (`{ORIGINAL}`) variant.")]
    for p in points.get("measured", []):
        if not p.get("feasible") or not p.get("selection"):
            continue
        role = f"latency-{round(100 * p['fraction'])}"
        out.append(Served(role, list(p["selection"]), {
            "test_accuracy": p.get("measured_test_accuracy"), "told_accuracy": p["told"]["accuracy"],
            "told_se": p["told"]["se"], "told_measured": float(p["told"]["source"] == "measured"),
            "predicted_latency_ms": p.get("latency_ms"), "flops": p.get("flops"), "memory_bytes": p.get("memory_bytes")},
            {"legodnn.budget_latency_ms": p["budget"], "legodnn.budget_fraction": p["fraction"]},
            f"The composition of **{table.model_name}** served at a latency budget of {p['budget']:.3f} ms, told "
            f"{100 * p['told']['accuracy']:.2f} ± {100 * p['told']['se']:.2f} % ({p['told']['source']}) "
            f"({100 * p['fraction']:.0f}% of the way from the smallest composition to the original)."))
    return out


def latency_spread(table: Any, selection: list[str]) -> tuple[float, float]:
    """The (p10, p90) of a composition's predicted latency: its prediction scaled by the
    summed blocks' p10 and p90 over their summed medians."""
    rows = [table.block(b.name).choices[c].latency for b, c in zip(table.blocks, selection)]
    median = sum(r.median_ms for r in rows)
    predicted = table.predicted_latency(selection)
    if median <= 0:
        return predicted, predicted
    return predicted * sum(r.p10_ms for r in rows) / median, predicted * sum(r.p90_ms for r in rows) / median


def _plots(tracker: Any, parent: str, table: Any, points: dict[str, Any], teacher: dict[str, Any],
           test_size: int | None) -> None:
    from infra.plots import BlockPoint, block_plot, pareto_plot

    spread = [latency_spread(table, p["selection"]) if p.get("feasible") and p.get("selection") else None
              for p in points.get("measured", [])]
    blocks = {b.name: [BlockPoint(c.sparsity, c.accuracy_drop, c.latency.median_ms, c.latency.p10_ms, c.latency.p90_ms)
                       for c in b.choices.values()] for b in table.blocks}
    with tempfile.TemporaryDirectory() as tmp:
        pareto_plot(points, Path(tmp) / "pareto.png", title=table.model_name,
                    teacher_accuracy=teacher.get("test_accuracy"), test_size=test_size, latency_spread=spread)
        block_plot(blocks, Path(tmp) / "blocks.png", title=f"{table.model_name}: every block's variants")
        tracker.log_artifact(parent, Path(tmp) / "pareto.png")
        tracker.log_artifact(parent, Path(tmp) / "blocks.png")


def _examples(data: DataRef | None, shape: tuple[int, ...]) -> tuple[Any, int | None]:
    """A few preprocessed test images (the models' input example) and the test split's size."""
    import numpy as np

    if data is None:
        return np.zeros((EXAMPLE_IMAGES, *shape), dtype=np.float32), None
    from pipelines.data import load_splits

    test = load_splits(data).test
    images = [np.asarray(test[i][0], dtype=np.float32) for i in range(min(EXAMPLE_IMAGES, len(test)))]
    return np.stack(images), len(test)


def lineage(ctx: UnitContext[LineageJob]) -> dict[str, Any]:
    """Log the table, points, plots and models of the run to its parent run (module docstring)."""
    from mlflow.entities import LoggedModelOutput

    from infra.logged_models import CompositionExporter, log_onnx_model, register_version
    from infra.tracking import TAG_MODEL, Tracker
    from profiling.table import load as load_table

    job = ctx.job
    tracker = Tracker(job.tracking_uri, job.experiment, artifact_root=job.artifact_root)
    parent = job.parent_run_id
    inputs = ctx.inputs
    teacher = inputs.one("teacher").meta
    table_path = inputs.one("table").dir / TABLE_FILE
    table = load_table(table_path)
    points = json.loads((inputs.one("points").dir / POINTS_FILE).read_text(encoding="utf-8"))
    published = [json.loads((u.dir / PUBLISH_FILE).read_text(encoding="utf-8")) for u in inputs.all("publish")]
    tracker.log_artifact(parent, table_path)
    tracker.log_dict(parent, points, "points.json")
    for info in published:
        tracker.log_dict(parent, info["manifest"], "bundle/manifest.json")

    scalable_dir = inputs.one("joint").dir / SCALABLE_DIR
    models, versions = {}, {}
    with tempfile.TemporaryDirectory(prefix="legodnn-lineage-") as tmp:
        exporter = CompositionExporter(scalable_dir, Path(tmp))
        last = exporter.model.spec(exporter.model.block_names[-1])
        example, test_size = _examples(job.data, tuple(exporter.model.spec(exporter.model.block_names[0]).in_shape))
        _plots(tracker, parent, table, points, teacher, test_size)
        for served in served_compositions(points, table, teacher):
            selection = ",".join(served.selection)
            tags = {TAG_MODEL: table.model_name, "legodnn.role": served.role, "legodnn.selection": selection,
                    **served.tags}
            run = tracker.start_run(served.role, kind="composition", parent_id=parent, tags=tags,
                                    description=served.description)
            tracker.log_metrics(run, served.metrics)
            logged = log_onnx_model(tracker, run, f"{table.model_name}-{served.role}",
                                    exporter.composition(served.selection), input_example=example,
                                    outputs=math.prod(last.out_shape), tags=tags,
                                    params={"selection": selection}, metrics=served.metrics)
            tracker.client.log_outputs(parent, models=[LoggedModelOutput(logged.model_id, step=0)])  # listed there too
            models[served.role] = logged.model_id
            for info in published:
                version = register_version(
                    tracker, table.model_name, logged, run, alias=served.role,
                    tags={**tags, "legodnn.bundle_uri": info["uri"], "legodnn.bundle_version": info["version"]},
                    description=f"{served.description} Published as bundle version {info['version']}: {info['uri']}",
                    model_description=f"LegoDNN compositions of {table.model_name}, one version per served "
                                      "composition and publish; aliases name the newest of each role "
                                      "(teacher; latency-N: N percent of the way from the smallest composition's latency "
                                      "to the original's).")
                versions[served.role] = version.version
            tracker.finish(run)
    return {"parent_run_id": parent, "models": models, "registered_model": table.model_name if versions else None,
            "versions": versions}


def lineage_stage(parent_run_id: str, artifact_root: str | None) -> Stage:
    """The lineage stage of one invocation (its parent run is this invocation's)."""
    return Stage(
        "lineage", lineage,
        lambda cfg, facts: LineageJob(facts.tracking_uri, cfg.mlflow.experiment, parent_run_id=parent_run_id,
                                      artifact_root=artifact_root, data=facts.data),
        needs=("assemble", *LINEAGE_NEEDS), placement=Placement.DRIVER,
    )
