"""Run the recipe: `run_pipeline` for `legodnn run`, `run_recipe` for benchmarks and tests.

Each stage's units are content-addressed (`pipelines.cache`), so a second invocation with the
same config and code executes nothing, and a driver killed mid-run and restarted recomputes
only what had not finished. Everything that can fail on bad input is checked first
(`pipelines.preflight`), so a refused run leaves nothing behind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from legoblocks.files import write_json_atomic
from pipelines.cache import Cache, UnitCounter, UnitRecord, code_version
from pipelines.config import PipelineConfig
from pipelines.preflight import Checked, preflight, with_signing_key
from pipelines.progress import PipelineProgress
from pipelines.recipe import STAGES
from pipelines.recipe.measure import TABLE_FILE
from pipelines.recipe.model import SCALABLE_DIR
from pipelines.recipe.serve import POINTS_FILE
from pipelines.stage import Stage
from pipelines.units import Executor, Observer, StageRun, UnitRunner

SUMMARY_FILE = "last_run.json"


def make_executor(cfg: PipelineConfig, kind: str, ray_address: str | None = None) -> Executor:
    """`kind` "ray" (tasks on a local Ray or the configured cluster) or "local" (this process)."""
    from pipelines.executors import LocalExecutor, RayExecutor

    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(address=ray_address, local_num_cpus=cfg.ray.local_num_cpus, num_cpus=cfg.ray.num_cpus,
                           max_retries=cfg.ray.max_retries, scheduling=cfg.ray.scheduling)
    raise ValueError(f"executor must be 'ray' or 'local', got {kind!r}")


@dataclass
class RecipeRun:
    """The finished units of a recipe run, and where they live."""

    cfg: PipelineConfig
    cache: Cache
    stages: StageRun
    checked: Checked

    @property
    def records(self) -> dict[str, list[UnitRecord]]:
        return self.stages.records

    def dir(self, stage: str, unit: str | None = None) -> Path:
        """The folder of a stage's unit (its only unit when `unit` is None)."""
        records = self.records[stage]
        record = records[0] if unit is None and len(records) == 1 else next(r for r in records if r.unit == unit)
        return self.cache.unit_dir(record.stage, record.key)

    @property
    def scalable_dir(self) -> Path:
        return self.dir("joint") / SCALABLE_DIR

    @property
    def table_path(self) -> Path:
        return self.dir("table") / TABLE_FILE


def run_recipe(cfg: PipelineConfig, *, executor: Executor | None = None, stages: Sequence[Stage] = STAGES,
               observers: Sequence[Observer] = (), checked: Checked | None = None,
               continue_from: RecipeRun | None = None) -> RecipeRun:
    """Run `stages` (default: the whole recipe) for `cfg`; units already in the cache are reused.

    Args:
        cfg: the config (its workdir holds the cache).
        executor: where units run (default: in this process).
        stages: the stage list; benchmarks append `pipelines.baselines` stages.
        observers: told about every stage and unit (progress, MLflow).
        checked: the preflight result, when the caller already ran it.
        continue_from: an earlier run whose records the new stages may read.
    """
    from pipelines.executors import LocalExecutor

    checked = checked or preflight(cfg)
    facts = checked.facts
    if any(s.name == "publish" for s in stages) and cfg.publish.enabled:
        facts = with_signing_key(cfg, facts)
        checked = Checked(facts, checked.ray_address, checked.tracking_uri)
    workdir = Path(cfg.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cache = Cache(workdir / "cache")
    runner = UnitRunner(cache, code_version(), executor or LocalExecutor(), observers=observers,
                        threads=max(1, int(cfg.ray.num_cpus)))
    earlier = StageRun(records=dict(continue_from.records)) if continue_from else None  # its counts stay its own
    result = runner.run(stages, cfg, facts, earlier)
    return RecipeRun(cfg, cache, result, checked)


@dataclass
class PipelineResult:
    """What a run produced and did; `summary_lines()` is what `legodnn run` prints."""

    workdir: Path
    counts: UnitCounter
    blocks: list[str]
    choices: dict[str, list[str]]
    num_options: int
    teacher: dict[str, Any]
    table_path: Path
    scalable_dir: Path
    points: dict[str, Any]
    bundle_uri: str | None
    tracking_uri: str
    parent_run_id: str
    ui_command: str
    seconds: float
    records: dict[str, list[UnitRecord]] = field(default_factory=dict)
    nodes: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir), "counts": self.counts.to_dict(), "executed": self.counts.executed,
            "skipped": self.counts.skipped, "blocks": self.blocks, "choices": self.choices,
            "num_options": self.num_options, "teacher": self.teacher, "table_path": str(self.table_path),
            "scalable_dir": str(self.scalable_dir), "points": self.points.get("measured", []),
            "bundle_uri": self.bundle_uri, "tracking_uri": self.tracking_uri, "parent_run_id": self.parent_run_id,
            "ui_command": self.ui_command, "seconds": self.seconds, "nodes": self.nodes,
            "units": {
                stage: [{"unit": r.unit, "key": r.key, "node_id": r.node_id, "task_id": r.task_id,
                         "outputs": r.outputs} for r in recs]
                for stage, recs in self.records.items()
            },
        }

    def summary_lines(self) -> list[str]:
        descendants = sum(len(c) for c in self.choices.values())
        lines = [
            "",
            "LegoDNN pipeline summary",
            f"  blocks:          {len(self.blocks)} ({', '.join(self.blocks)})",
            f"  descendants:     {descendants} (choices per block: "
            f"{', '.join(str(len(self.choices[b])) for b in self.blocks)})",
            f"  model options:   {self.num_options:,} compositions",
            f"  teacher:         val accuracy {self.teacher.get('val_accuracy', float('nan')):.4f}, "
            f"test accuracy {self.teacher.get('test_accuracy', float('nan')):.4f}",
            "  served compositions (latency budget -> accuracy told, ± standard error: measured on held-out "
            "validation images that chose nothing, or predicted; test accuracy, on the test split):",
        ]
        original = self.points.get("original", {})
        for p in self.points.get("measured", []):
            share = p["budget"] / original["latency_ms"] if original.get("latency_ms") else float("nan")
            if not p.get("feasible"):
                lines.append(f"    {p['budget']:8.3f} ms ({share:4.0%} of original): infeasible")
                continue
            t = p["told"]
            lines.append(
                f"    {p['budget']:8.3f} ms ({share:4.0%} of original): told {100 * t['accuracy']:.2f} ± "
                f"{100 * t['se']:.2f} % ({t['source']}), test {100 * p.get('measured_test_accuracy', float('nan')):.2f} %, "
                f"{p['flops'] / original['flops']:.0%} FLOPs, selection {','.join(p['selection'])}"
            )
        counts = self.counts
        lines += [
            f"  profile table:   {self.table_path}",
            f"  bundle:          {self.bundle_uri or 'not published (--no-publish)'}",
            f"  units:           {counts.executed} executed, {counts.skipped} skipped (cached)"
            + ("  -- nothing to do, every unit was already done" if counts.executed == 0 else ""),
            f"  MLflow:          {self.tracking_uri} (parent run {self.parent_run_id})",
            f"  open the UI:     {self.ui_command}",
            f"  wall time:       {self.seconds:.1f} s",
        ]
        return lines


def run_pipeline(cfg: PipelineConfig, *, live: bool | None = None, stream: IO[str] | None = None,
                 executor: str = "ray") -> PipelineResult:
    """Run (or resume) the whole pipeline for `cfg` on Ray (or in this process), tracked in MLflow.

    The parent run opens before the first stage (or, for a driver restarted on the same work
    directory and config, the unfinished one continues: `pipelines.live.open_parent_run`); every
    unit's results are logged as it finishes (`pipelines.live.LiveTracking`), system metrics are
    sampled while it runs, and the lineage stage adds plots, logged models and registry versions.
    """
    from infra.tracking import Tracker, default_artifact_root, flatten, is_local_store, source_tags, ui_command
    from pipelines.lineage import lineage_stage
    from pipelines.live import (
        LEDGER_FILE, LiveTracking, config_digest, data_inputs, open_parent_run, pipeline_description,
    )

    began = time.perf_counter()
    checked = preflight(cfg)
    workdir = Path(cfg.workdir).resolve()
    tracking_uri = checked.tracking_uri
    artifact_root = default_artifact_root(workdir) if is_local_store(tracking_uri) else None
    tracker, parent_id, runner_executor, tracking = None, None, None, None
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        Cache(workdir / "cache").sweep(older_than_s=3600)  # another driver may be mid-unit on this workdir
        code = code_version()
        facts = checked.facts
        tracker = Tracker(tracking_uri, cfg.mlflow.experiment, artifact_root=artifact_root)
        ledger, resumed = open_parent_run(
            tracker, workdir, config_digest(cfg), name=f"pipeline-{facts.model_name}",
            tags={**source_tags("legodnn run"), "legodnn.code_version": code}, description=pipeline_description(cfg, facts))
        parent_id = ledger.parent_run_id
        if not resumed:
            tracker.log_params(parent_id, {**flatten(cfg.to_dict(), "config."), "code_version": code,
                                           "dataset_fingerprint": facts.data.fingerprint})
            tracker.log_inputs(parent_id, data_inputs(facts.data, facts.classes))
        tracking = LiveTracking(tracker, ledger, workdir / LEDGER_FILE, Cache(workdir / "cache"), model=facts.model_name)
        runner_executor = make_executor(cfg, executor, checked.ray_address)
        with tracker.system_metrics(parent_id, resume=resumed) as sampling, \
                PipelineProgress(live=live, stream=stream) as progress:
            if not sampling:
                tracker.set_tags(parent_id, {"legodnn.system_metrics": "off: psutil is not installed"})
            run = run_recipe(cfg, executor=runner_executor, stages=(*STAGES, lineage_stage(parent_id, artifact_root)),
                             observers=[progress, tracking], checked=checked)
        records = run.records
        lineage = records["lineage"][0]
        lineage_cached = lineage.meta["parent_run_id"] != parent_id
        if lineage_cached:
            tracker.set_tags(parent_id, {"legodnn.lineage_run": lineage.meta["parent_run_id"]})
        assemble = records["assemble"][0].meta
        publish = records.get("publish") or []
        counter = run.stages.counter
        result = PipelineResult(
            workdir=workdir, counts=counter, blocks=list(assemble["blocks"]), choices=assemble["choices"],
            num_options=assemble["num_options"], teacher=records["teacher"][0].meta, table_path=run.table_path,
            scalable_dir=run.scalable_dir,
            points=json.loads((run.dir("points") / POINTS_FILE).read_text(encoding="utf-8")),
            bundle_uri=publish[0].meta["uri"] if publish else None, tracking_uri=tracking_uri,
            parent_run_id=parent_id, ui_command=ui_command(tracking_uri, artifact_root),
            seconds=time.perf_counter() - began, records=records, nodes=runner_executor.nodes(),
        )
        tracker.set_tags(parent_id, {"legodnn.executed_units": counter.executed,
                                     "legodnn.skipped_units": counter.skipped,
                                     "legodnn.lineage_cached": lineage_cached, "legodnn.stage": "done"})
        tracker.log_metrics(parent_id, {"pipeline_seconds": result.seconds})
        tracking.close()
        tracker.finish(parent_id)
        ledger.finished = True
        ledger.save(workdir / LEDGER_FILE)
        summary = result.to_dict()
        write_json_atomic(workdir / SUMMARY_FILE, summary)
        write_json_atomic(workdir / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{parent_id[:8]}.json", summary)
        return result
    except BaseException:
        if tracker is not None and parent_id is not None:
            try:
                if tracking is not None:
                    tracking.close(status="FAILED")
                tracker.finish(parent_id, status="FAILED")
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
        raise
    finally:
        if runner_executor is not None:
            runner_executor.close()
