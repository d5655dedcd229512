"""The offline pipeline as a DAG of cached units on Ray, with MLflow lineage at the end.

    teacher -> detect -> descend (per block) -> blockio -> retrain (per block)
      -> assemble -> [joint: Ray Train] -> cost (per block) -> accuracy (per chunk of
      selections) -> table -> points -> publish -> lineage (MLflow)

Each stage's units are content-addressed (`pipelines.cache`), so a second invocation with
the same config and code executes nothing, and a driver killed mid-run and restarted
recomputes only what had not finished. Everything that can fail on bad input (config,
checkpoint, data, MLflow store, Ray address) is checked before the work directory is
touched, so a refused run leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pipelines import stages
from pipelines.cache import Cache, UnitCounter, UnitRecord, code_version, sha256_file, unit_key, write_json_atomic
from pipelines.config import PipelineConfig
from pipelines.progress import PipelineProgress
from pipelines.runner import PipelineError, RayRunner, RayUnreachableError, Unit, check_ray_address

SUMMARY_FILE = "last_run.json"
# How many selections one accuracy task evaluates: enough to amortize loading the model.
ACCURACY_CHUNK = 8
PARETO_GRID = 9
MEASURE_FRACTIONS = [0.0, 1 / 3, 2 / 3, 1.0]


class PreflightError(ValueError):
    """The run was refused before any work: bad input or an unreachable service."""


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
            "workdir": str(self.workdir),
            "counts": self.counts.to_dict(),
            "executed": self.counts.executed,
            "skipped": self.counts.skipped,
            "blocks": self.blocks,
            "choices": self.choices,
            "num_options": self.num_options,
            "teacher": self.teacher,
            "table_path": str(self.table_path),
            "scalable_dir": str(self.scalable_dir),
            "points": self.points.get("measured", []),
            "bundle_uri": self.bundle_uri,
            "tracking_uri": self.tracking_uri,
            "parent_run_id": self.parent_run_id,
            "ui_command": self.ui_command,
            "seconds": self.seconds,
            "nodes": self.nodes,
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
            "  optimizer-chosen compositions (latency budget -> predicted / measured test accuracy):",
        ]
        original = self.points.get("original", {})
        for p in self.points.get("measured", []):
            share = p["budget"] / original["latency_ms"] if original.get("latency_ms") else float("nan")
            if not p.get("feasible"):
                lines.append(f"    {p['budget']:8.3f} ms ({share:4.0%} of original): infeasible")
                continue
            lines.append(
                f"    {p['budget']:8.3f} ms ({share:4.0%} of original): predicted {p['predicted_accuracy']:.4f}, "
                f"measured {p.get('measured_test_accuracy', float('nan')):.4f}, "
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


class _ChoiceSpace:
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


# --------------------------------------------------------------------------- preflight


def _data_identity(cfg: PipelineConfig) -> dict[str, Any]:
    """The data section as keys see it: the files' fingerprint instead of their path."""
    from legoblocks.data import dataset_fingerprint

    section = cfg.section("data")
    section["fingerprint"] = dataset_fingerprint(section.pop("dir"))
    return section


def preflight(cfg: PipelineConfig) -> dict[str, Any]:
    """Check every input and service before anything is written; returns derived facts."""
    from infra.tracking import TrackingError, check_tracking, resolve_tracking_uri
    from legoblocks.data import DatasetMissingError
    from legoblocks.modelref import ModelRefError

    facts: dict[str, Any] = {}
    checkpoint = cfg.model.checkpoint
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise PreflightError(
                f"checkpoint {checkpoint} does not exist; pass an existing state-dict file to "
                "--checkpoint (or model.checkpoint), or leave it out to train a teacher"
            )
        facts["checkpoint_sha256"] = sha256_file(path)
    try:
        # Builds the network (and loads the checkpoint) once here: a bad model reference or
        # a checkpoint of another model fails now, not minutes later inside a task.
        stages.build_model(cfg.section("model"), checkpoint)
    except (ModelRefError, ValueError, TypeError) as exc:
        raise PreflightError(f"model {cfg.model.ref!r}: {exc}") from exc
    try:
        facts["data"] = _data_identity(cfg)
    except DatasetMissingError as exc:
        raise PreflightError(str(exc)) from exc
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        try:
            check_ray_address(address)
        except RayUnreachableError as exc:
            raise PreflightError(str(exc)) from exc
    facts["ray_address"] = address
    workdir = Path(cfg.workdir).resolve()
    facts["tracking_uri"] = resolve_tracking_uri(workdir, cfg.mlflow.tracking_uri)
    try:
        check_tracking(facts["tracking_uri"])
    except TrackingError as exc:
        raise PreflightError(str(exc)) from exc
    if cfg.publish.enabled and cfg.publish.key is not None and not Path(cfg.publish.key).is_file():
        raise PreflightError(
            f"publish.key {cfg.publish.key} does not exist; create a key pair with `legodnn keys init DIR` "
            "and pass its private key file, or leave publish.key unset to use a key in the work directory"
        )
    return facts


def _ensure_key(workdir: Path, configured: str | None) -> tuple[str, str]:
    """The signing key (path, key id): the configured one, else one kept in the workdir."""
    from infra.signing import PRIVATE_KEY_NAME, generate_keypair, key_id, load_private_key

    if configured is not None:
        return configured, key_id(load_private_key(configured).public_key())
    folder = workdir / "keys"
    private = folder / PRIVATE_KEY_NAME
    if not private.is_file():
        pair = generate_keypair(folder)
        private = pair.private_key
    return str(private), key_id(load_private_key(private).public_key())


# --------------------------------------------------------------------------- the DAG


def _model_name(cfg: PipelineConfig) -> str:
    from profiling.profile import default_model_name

    return cfg.publish.model_id or default_model_name(cfg.model.ref)


def _joint_unit_run(runner: RayRunner, cfg: PipelineConfig, workdir: Path, assemble: UnitRecord,
                    data: dict[str, Any], data_key: dict[str, Any]) -> UnitRecord:
    """The joint stage runs from the driver: Ray Train schedules its own workers."""
    from pipelines.raytrain import fit_joint

    joint = cfg.section("joint")
    trainer_cfg = {k: v for k, v in joint.items() if k not in ("enabled", "num_workers", "checkpoint_every")}
    config = {"joint": trainer_cfg, "num_workers": joint["num_workers"], "data": data_key}
    key = unit_key("joint", "joint", config, [assemble.digest()], runner.code)
    stage = "joint"
    found = runner.cache.lookup(stage, key)
    runner.progress.start_stage(stage, total=1, cached=int(found is not None))
    if found is not None:
        runner.counter.add(stage, executed=False)
        runner.progress.end_stage(stage, executed=0, skipped=1)
        return found
    scalable_dir = runner.cache.unit_dir("assemble", assemble.key) / stages.SCALABLE_DIR
    runner.ensure_ray()
    started = time.perf_counter()
    try:
        run = fit_joint(
            model_dir=scalable_dir, data=data, joint=trainer_cfg,
            storage_path=workdir / "raytrain", run_name=f"joint-{key}",
            num_workers=joint["num_workers"], checkpoint_every=joint["checkpoint_every"],
            threads=max(1, int(cfg.ray.num_cpus)),
        )
    except Exception as exc:  # noqa: BLE001 - Ray Train wraps worker errors; name the stage
        raise PipelineError(f"stage 'joint' (Ray Train) failed: {type(exc).__name__}: {exc}") from exc
    tmp = runner.cache.begin(stage, key)
    try:
        stages.apply_joint_state(scalable_dir, run.state_path, tmp)
        record = UnitRecord(
            stage=stage, unit="joint", key=key, outputs={},
            meta={"steps": run.steps, "losses": run.losses, "resumed_from_step": run.resumed_from_step,
                  "train_seconds": run.seconds, "node_ids": run.node_ids},
            node_id=run.node_ids[0] if run.node_ids else None, task_id="ray-train",
            seconds=time.perf_counter() - started,
        )
        record = runner.cache.commit(tmp, record)
    except BaseException:
        runner.cache.abort(tmp)
        raise
    runner.counter.add(stage, executed=True)
    runner.progress.advance(stage)
    runner.progress.end_stage(stage, executed=1, skipped=0)
    return record


def _plan_profile(cfg: PipelineConfig, choices: dict[str, list[str]], blocks: list[str],
                  flops: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Every selection the profile needs: single swaps per environment, additivity, calibration."""
    from profiling.accuracy import plan_units, random_compositions, resolve_environments, unit_selections
    from profiling.calibrate import spread_compositions

    space = _ChoiceSpace(choices, blocks)
    envs = resolve_environments(space, cfg.profile.envs)
    units = plan_units(space, envs)
    seed = cfg.profile.seed
    additivity = random_compositions(space, cfg.profile.additivity_n, seed)
    calibration = (
        spread_compositions(space, flops, cfg.profile.calibration_k, seed + 1, exclude=additivity)
        if cfg.profile.calibration_k and additivity else []
    )
    original = tuple("0.0" for _ in blocks)
    wanted: dict[tuple[str, ...], None] = {original: None}
    for sel in [*unit_selections(units), *additivity, *calibration]:
        wanted.setdefault(tuple(sel))
    return {
        "envs": cfg.profile.envs,
        "env_names": [e.name for e in envs],
        "environments": [e.to_dict() for e in envs],
        "additivity": [list(s) for s in additivity],
        "calibration": [list(s) for s in calibration],
        "selections": [list(s) for s in wanted],
    }


def run_pipeline(
    cfg: PipelineConfig,
    *,
    live: bool | None = None,
    stream: IO[str] | None = None,
) -> PipelineResult:
    """Run (or resume) the whole pipeline for `cfg`; see the module docstring."""
    from infra.tracking import Tracker, default_artifact_root, is_local_store, ui_command

    began = time.perf_counter()
    facts = preflight(cfg)
    workdir = Path(cfg.workdir).resolve()
    tracking_uri = facts["tracking_uri"]
    artifact_root = default_artifact_root(workdir) if is_local_store(tracking_uri) else None
    parent_id = None
    tracker = None
    runner = None
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        cache = Cache(workdir / "cache")
        cache.sweep(older_than_s=3600)  # another driver may be mid-unit on this workdir
        code = code_version()
        tracker = Tracker(tracking_uri, cfg.mlflow.experiment, artifact_root=artifact_root)
        parent_id = tracker.start_run(f"pipeline-{_model_name(cfg)}", kind="pipeline")
        with PipelineProgress(live=live, stream=stream) as progress:
            runner = RayRunner(
                cache, code, ray_address=facts["ray_address"], local_num_cpus=cfg.ray.local_num_cpus,
                num_cpus=cfg.ray.num_cpus, max_retries=cfg.ray.max_retries,
                scheduling=cfg.ray.scheduling, progress=progress,
            )
            result = _run_stages(cfg, runner, workdir, facts)
        result_records, outputs = result
        lineage_cached = _lineage(cfg, runner, tracker, parent_id, facts, code, result_records, outputs)
        seconds = time.perf_counter() - began
        pipeline_result = PipelineResult(
            workdir=workdir,
            counts=runner.counter,
            blocks=outputs["blocks"],
            choices=outputs["choices"],
            num_options=outputs["num_options"],
            teacher=result_records["teacher"][0].meta,
            table_path=outputs["table_path"],
            scalable_dir=outputs["scalable_dir"],
            points=outputs["points"],
            bundle_uri=outputs["bundle_uri"],
            tracking_uri=tracking_uri,
            parent_run_id=parent_id,
            ui_command=ui_command(tracking_uri, artifact_root),
            seconds=seconds,
            records=result_records,
            nodes=runner.nodes(),
        )
        tracker.set_tags(parent_id, {"legodnn.executed_units": runner.counter.executed,
                                     "legodnn.skipped_units": runner.counter.skipped,
                                     "legodnn.lineage_cached": lineage_cached})
        tracker.log_metrics(parent_id, {"pipeline_seconds": seconds})
        tracker.finish(parent_id)
        summary = pipeline_result.to_dict()
        write_json_atomic(workdir / SUMMARY_FILE, summary)
        write_json_atomic(workdir / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{parent_id[:8]}.json", summary)
        return pipeline_result
    except BaseException:
        if tracker is not None and parent_id is not None:
            try:
                tracker.finish(parent_id, status="FAILED")
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
        raise
    finally:
        if runner is not None:
            runner.shutdown()


@dataclass
class Prefix:
    """The stages up to the teacher's block I/O: what retraining (and tuning) starts from."""

    teacher: UnitRecord
    detect: UnitRecord
    descend: list[UnitRecord]
    blockio: UnitRecord
    blocks: list[str]
    trainable: list[str]  # blocks with more than one choice

    def descend_by(self) -> dict[str, UnitRecord]:
        return {r.unit: r for r in self.descend}


def unit_folder(runner: RayRunner, record: UnitRecord) -> str:
    return str(runner.cache.unit_dir(record.stage, record.key))


def run_prefix(cfg: PipelineConfig, runner: RayRunner, facts: dict[str, Any],
               records: dict[str, list[UnitRecord]] | None = None) -> Prefix:
    """teacher -> detect -> descend -> blockio (cached like every stage)."""
    records = {} if records is None else records
    model = cfg.section("model")
    data = cfg.section("data")
    data_key = facts["data"]
    model_key = {k: v for k, v in model.items() if k != "checkpoint"}

    def stage(name: str, units: list[Unit]) -> list[UnitRecord]:
        records[name] = runner.run_stage(name, units).records
        return records[name]

    def folder(record: UnitRecord) -> str:
        return unit_folder(runner, record)

    checkpoint = cfg.model.checkpoint
    (teacher,) = stage("teacher", [Unit(
        "teacher", stages.teacher_stage,
        {"model": model, "data": data, "teacher": cfg.section("teacher"),
         "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None},
        config={"model": model_key, "data": data_key,
                "teacher": None if checkpoint else cfg.section("teacher"),
                "checkpoint_sha256": facts.get("checkpoint_sha256")},
    )])
    (detect,) = stage("detect", [Unit(
        "detect", stages.detect_stage,
        {"model": model, "teacher_dir": folder(teacher), "target_blocks": cfg.blocks.target_blocks},
        config={"model": model_key, "target_blocks": cfg.blocks.target_blocks},
        upstream=[teacher],
    )])
    blocks = detect.meta["blocks"]
    scalable = set(detect.meta["scalable"])
    descend_cfg = cfg.section("descend")
    descend = stage("descend", [Unit(
        b, stages.descend_stage,
        {"detect_dir": folder(detect), "block": b, "ladder": descend_cfg["ladder"],
         "importance": descend_cfg["importance"]},
        config={**descend_cfg, "block": b, "scalable": b in scalable}, upstream=[detect],
    ) for b in blocks])
    retrain_cfg = cfg.section("retrain")
    (blockio,) = stage("blockio", [Unit(
        "blockio", stages.blockio_stage,
        {"model": model, "detect_dir": folder(detect), "data": data, "limit": None,
         "batch_size": retrain_cfg["io_batch_size"], "seed": retrain_cfg["seed"]},
        config={"data": data_key, "batch_size": retrain_cfg["io_batch_size"], "seed": retrain_cfg["seed"]},
        upstream=[detect],
    )])
    trainable = [r.unit for r in descend if len(r.meta["choices"]) > 1]
    return Prefix(teacher, detect, descend, blockio, blocks, trainable)


def retrain_units(cfg: PipelineConfig, runner: RayRunner, prefix: Prefix) -> list[Unit]:
    """One unit per block with descendants: all its descendants distilled together."""
    retrain_cfg = cfg.section("retrain")
    train_cfg = {k: v for k, v in retrain_cfg.items() if k != "io_batch_size"}
    descend_by = prefix.descend_by()
    blockio_dir = Path(unit_folder(runner, prefix.blockio))
    return [Unit(
        b, stages.retrain_stage,
        {"descend_dir": unit_folder(runner, descend_by[b]), "blockio_file": str(blockio_dir / f"{b}.safetensors"),
         "block": b, "retrain": retrain_cfg},
        config={**train_cfg, "block": b}, upstream=[descend_by[b], prefix.blockio],
    ) for b in prefix.trainable]


def _run_stages(cfg: PipelineConfig, runner: RayRunner, workdir: Path,
                facts: dict[str, Any]) -> tuple[dict[str, list[UnitRecord]], dict[str, Any]]:
    records: dict[str, list[UnitRecord]] = {}
    model = cfg.section("model")
    data = cfg.section("data")
    data_key = facts["data"]

    def stage(name: str, units: list[Unit]) -> list[UnitRecord]:
        records[name] = runner.run_stage(name, units).records
        return records[name]

    def folder(record: UnitRecord) -> str:
        return unit_folder(runner, record)

    prefix = run_prefix(cfg, runner, facts, records)
    detect, descend, blocks = prefix.detect, prefix.descend, prefix.blocks
    descend_by = prefix.descend_by()
    trainable = prefix.trainable
    retrain = stage("retrain", retrain_units(cfg, runner, prefix))
    retrain_by = {r.unit: r for r in retrain}
    variant_dirs = {b: folder(retrain_by[b]) if b in retrain_by else folder(descend_by[b]) for b in blocks}
    (assemble,) = stage("assemble", [Unit(
        "assemble", stages.assemble_stage,
        {"model": model, "detect_dir": folder(detect), "variant_dirs": variant_dirs},
        config={"model_ref": model["ref"]}, upstream=[detect, *descend, *retrain],
    )])
    final = assemble
    if cfg.joint.enabled and trainable:
        final = _joint_unit_run(runner, cfg, workdir, assemble, data, data_key)
        records["joint"] = [final]
    scalable_dir = Path(folder(final)) / stages.SCALABLE_DIR
    choices = assemble.meta["choices"]
    profile_cfg = cfg.section("profile")
    latency_cfg = {k: v for k, v in profile_cfg.items() if k.startswith("latency_")}
    cost = stage("cost", [Unit(
        b, stages.cost_stage,
        {"scalable_dir": str(scalable_dir), "block": b, "profile": profile_cfg},
        config={**latency_cfg, "block": b}, upstream=[final],
    ) for b in blocks])
    costs = stages.read_costs([folder(r) for r in cost])
    flops = {b: {c: float(row["cost"]["flops"]) for c, row in costs[b]["choices"].items()} for b in blocks}
    plan = _plan_profile(cfg, choices, blocks, flops)
    selections = plan["selections"]
    chunks = [selections[i : i + ACCURACY_CHUNK] for i in range(0, len(selections), ACCURACY_CHUNK)]
    bn_batches = profile_cfg["bn_recalibration_batches"]
    accuracy = stage("accuracy", [Unit(
        f"chunk{i:03d}", stages.accuracy_stage,
        {"scalable_dir": str(scalable_dir), "data": data, "selections": chunk,
         "bn_recalibration_batches": bn_batches, "seed": profile_cfg["seed"]},
        config={"data": data_key, "selections": chunk, "bn": bn_batches, "seed": profile_cfg["seed"]},
        upstream=[final],
    ) for i, chunk in enumerate(chunks)])
    # The joint stage's anchor compositions are re-ranking candidates too (legoblocks.anchors).
    anchor_budgets = cfg.joint.trained_budgets() if cfg.joint.enabled and trainable else []
    (table,) = stage("table", [Unit(
        "table", stages.table_stage,
        {"scalable_dir": str(scalable_dir), "cost_dirs": [folder(r) for r in cost],
         "accuracy_dirs": [folder(r) for r in accuracy], "plan": plan, "profile": profile_cfg,
         "model_name": _model_name(cfg), "data": data, "anchor_budgets": anchor_budgets},
        config={"plan": plan, "profile": profile_cfg, "model_name": _model_name(cfg), "data": data_key,
                "anchors": anchor_budgets},
        upstream=[final, *cost, *accuracy],
    )])
    (points,) = stage("points", [Unit(
        "points", stages.points_stage,
        {"scalable_dir": str(scalable_dir), "table_dir": folder(table), "data": data,
         "grid": PARETO_GRID, "measure_fractions": MEASURE_FRACTIONS},
        config={"data": data_key, "grid": PARETO_GRID, "fractions": MEASURE_FRACTIONS},
        upstream=[final, table],
    )])
    bundle_uri = None
    if cfg.publish.enabled:
        key_path, key_id = _ensure_key(workdir, cfg.publish.key)
        store = cfg.publish.store or (workdir / "bundles").as_uri()
        (publish,) = stage("publish", [Unit(
            "publish", stages.publish_stage,
            {"scalable_dir": str(scalable_dir), "table_dir": folder(table), "store": store,
             "key": key_path, "model_id": _model_name(cfg)},
            config={"store": store, "key_id": key_id, "model_id": _model_name(cfg)},
            upstream=[final, table],
        )])
        bundle_uri = publish.meta["uri"]
    outputs = {
        "blocks": blocks,
        "choices": choices,
        "num_options": assemble.meta["num_options"],
        "table_path": Path(folder(table)) / stages.TABLE_FILE,
        "scalable_dir": scalable_dir,
        "points": json.loads((Path(folder(points)) / stages.POINTS_FILE).read_text(encoding="utf-8")),
        "bundle_uri": bundle_uri,
        "bundle_dir": folder(records["publish"][0]) if "publish" in records else None,
    }
    return records, outputs


# --------------------------------------------------------------------------- MLflow lineage


def _lineage(cfg: PipelineConfig, runner: RayRunner, tracker: Any, parent_id: str, facts: dict[str, Any],
             code: str, records: dict[str, list[UnitRecord]], outputs: dict[str, Any]) -> bool:
    """Log the parent run's lineage and one child run per block variant, once per outputs.

    The lineage is itself a cached unit (keyed by the store and the outputs' hashes): a
    rerun that produced nothing new gets a parent run that points at the run holding the
    lineage instead of duplicating every child run. Returns True when it was cached.
    """
    from infra.tracking import flatten

    upstream = [r for stage in ("teacher", "table", "points", "publish", "joint", "assemble")
                for r in records.get(stage, [])]
    config = {"tracking_uri": tracker.uri, "experiment": tracker.experiment}
    key = unit_key("lineage", "lineage", config, [r.digest() for r in upstream], code)
    stage = "lineage"
    runner.progress.start_stage(stage, total=1, cached=0)
    tracker.log_params(parent_id, {**flatten(cfg.to_dict(), "config."), "code_version": code,
                                   "dataset_fingerprint": facts["data"]["fingerprint"]})
    found = runner.cache.lookup(stage, key)
    if found is not None and tracker.run_exists(found.meta["parent_run_id"]):
        tracker.set_tags(parent_id, {"legodnn.lineage_run": found.meta["parent_run_id"]})
        runner.counter.add(stage, executed=False)
        runner.progress.end_stage(stage, executed=0, skipped=1)
        return True
    tmp = runner.cache.begin(stage, key)
    try:
        children = _log_lineage(cfg, tracker, parent_id, records, outputs)
        runner.cache.commit(tmp, UnitRecord(
            stage=stage, unit="lineage", key=key, outputs={},
            meta={"parent_run_id": parent_id, "child_runs": children},
        ))
    except BaseException:
        runner.cache.abort(tmp)
        raise
    runner.counter.add(stage, executed=True)
    runner.progress.end_stage(stage, executed=1, skipped=0)
    return False


def _log_lineage(cfg: PipelineConfig, tracker: Any, parent_id: str, records: dict[str, list[UnitRecord]],
                 outputs: dict[str, Any]) -> int:
    import tempfile

    from infra.tracking import pareto_plot
    from profiling.table import load as load_table

    teacher = records["teacher"][0].meta
    tracker.log_metrics(parent_id, {
        "teacher_val_accuracy": teacher.get("val_accuracy"),
        "teacher_test_accuracy": teacher.get("test_accuracy"),
        "num_blocks": len(outputs["blocks"]),
        "num_options": outputs["num_options"],
    })
    table_meta = records["table"][0].meta
    tracker.log_metrics(parent_id, {"additivity_mae": table_meta.get("additivity_mae"),
                                    "calibrated_mae": table_meta.get("calibrated_mae")})
    for i, loss in enumerate(records.get("joint", [UnitRecord("", "", "", {})])[0].meta.get("losses", [])):
        tracker.log_metrics(parent_id, {"joint_loss": loss}, step=i + 1)
    tracker.log_artifact(parent_id, outputs["table_path"])
    with tempfile.TemporaryDirectory() as tmp:
        plot = Path(tmp) / "pareto.png"
        pareto_plot(outputs["points"], plot, title=_model_name(cfg))
        tracker.log_artifact(parent_id, plot)
    tracker.log_dict(parent_id, outputs["points"], "points.json")
    if outputs["bundle_uri"]:
        published = json.loads((Path(outputs["bundle_dir"]) / "publish.json").read_text(encoding="utf-8"))
        tracker.log_dict(parent_id, published["manifest"], "bundle/manifest.json")
        tracker.set_tags(parent_id, {"legodnn.bundle_uri": outputs["bundle_uri"]})
        tracker.log_params(parent_id, {"bundle_uri": outputs["bundle_uri"]})

    table = load_table(outputs["table_path"])
    retrain = {r.unit: r.meta.get("reports", {}) for r in records.get("retrain", [])}
    model_name = table.model_name
    children = 0
    for block in table.blocks:
        for cid, choice in block.choices.items():
            report = retrain.get(block.name, {}).get(cid, {})
            metrics = {
                "retrain_loss_before": report.get("loss_before"),
                "retrain_loss_after": report.get("loss_after"),
                "accuracy_drop": choice.accuracy_drop,
                "accuracy_drop_raw": choice.accuracy_drop_raw,
                "params": choice.params,
                "weight_bytes": choice.weight_bytes,
                "peak_bytes": choice.peak_bytes,
                "flops": choice.flops,
                "latency_ms": choice.latency.median_ms,
            }
            tracker.log_variant(
                parent_id, model=model_name, block=block.name, choice=cid, metrics=metrics,
                artifacts=[outputs["scalable_dir"] / block.name / f"{cid}.safetensors"],
                params={"scalable": block.spec.get("scalable")},
            )
            children += 1
    return children

