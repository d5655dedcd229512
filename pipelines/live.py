"""Live MLflow tracking of a pipeline run: each unit's results are logged as the unit finishes.

`LiveTracking` is an observer of `pipelines.units.UnitRunner` (like the progress view): the
parent run is open from the start, and while the stages run it receives the teacher's loss
per epoch and the joint stage's loss per step (the units' `ctx.report` facts, from Ray tasks
too), one child run per block variant as soon as the block's descendants exist (then its
retraining losses, its cost and latency spread with its weights, its accuracy drops when the
table is made), and the table's calibration figures. Lineage (`pipelines.lineage`) adds only
what exists at the end: plots, the logged models and the registry.

A unit logs once per parent run: `RunLedger` (a JSON file in the work directory) records the
parent run, its child runs and the units already logged, so a driver restarted on the same
work directory with the same config (`open_parent_run`) continues the unfinished parent run
and logs only what it had not logged, whether the unit is recomputed or found in the cache.
A new parent run (a finished run before, or another config) gets every unit, cached ones
included, so each parent run is a complete record.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from legoblocks.files import write_json_atomic
from pipelines.cache import Cache, UnitRecord
from pipelines.recipe.measure import COST_FILE, TABLE_FILE
from pipelines.recipe.model import SCALABLE_DIR

log = logging.getLogger(__name__)

LEDGER_FILE = "mlflow_run.json"
UNFINISHED = ("RUNNING", "FAILED", "KILLED")


@dataclass
class RunLedger:
    """What the work directory's current pipeline run has logged to MLflow.

    Attributes:
        tracking_uri, experiment: the store the parent run lives in.
        config: a digest of the run's config; another config starts another parent run.
        parent_run_id: the parent run.
        finished: the pipeline finished (a later invocation starts a new parent run).
        resumes: how often a restarted driver continued this parent run.
        logged: "stage/unit/key" of every unit whose results the parent run holds.
        children: "block/choice" -> the variant's child run id.
        closed: the child runs already terminated.
        steps: metric name -> steps already logged to the parent (live reports, then the
            rest of the curve when the unit finishes, without duplicates).
    """

    tracking_uri: str
    experiment: str
    config: str
    parent_run_id: str
    finished: bool = False
    resumes: int = 0
    logged: list[str] = field(default_factory=list)
    children: dict[str, str] = field(default_factory=dict)
    closed: list[str] = field(default_factory=list)
    steps: dict[str, list[int]] = field(default_factory=dict)

    @staticmethod
    def load(path: str | Path) -> RunLedger | None:
        """The ledger at `path`, or None when there is none (or it is unreadable: start anew)."""
        try:
            return RunLedger(**json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, asdict(self))


def open_parent_run(tracker: Any, workdir: Path, config_digest: str, *, name: str, tags: dict[str, str],
                    description: str) -> tuple[RunLedger, bool]:
    """The parent run of this invocation: the unfinished one of the same store, experiment and
    config when the ledger names one (a restarted driver; marked RUNNING again), else a new one.

    Returns:
        The ledger (saved) and whether an earlier parent run was continued.
    """
    path = workdir / LEDGER_FILE
    ledger = RunLedger.load(path)
    if (ledger is not None and not ledger.finished and ledger.tracking_uri == tracker.uri
            and ledger.experiment == tracker.experiment and ledger.config == config_digest
            and tracker.run_status(ledger.parent_run_id) in UNFINISHED):
        tracker.reopen(ledger.parent_run_id)
        for key, run_id in ledger.children.items():
            if key not in ledger.closed and tracker.run_status(run_id) in UNFINISHED:
                tracker.reopen(run_id)
        ledger.resumes += 1
        tracker.set_tags(ledger.parent_run_id, {"legodnn.resumes": ledger.resumes})
        ledger.save(path)
        return ledger, True
    parent = tracker.start_run(name, kind="pipeline", tags=tags, description=description)
    ledger = RunLedger(tracker.uri, tracker.experiment, config_digest, parent)
    ledger.save(path)
    return ledger, False


class LiveTracking:
    """The observer that logs every unit to the parent run as it finishes (module docstring).

    Args:
        tracker: the store and experiment (`infra.tracking.Tracker`).
        ledger: the parent run's ledger (`open_parent_run`).
        ledger_path: where the ledger is saved after every logged unit.
        cache: the work directory's cache (the units' output folders).
        model: the model's name (the variants' `legodnn.model` tag).
    """

    def __init__(self, tracker: Any, ledger: RunLedger, ledger_path: Path, cache: Cache, *, model: str) -> None:
        self.tracker = tracker
        self.ledger = ledger
        self.ledger_path = ledger_path
        self.cache = cache
        self.model = model
        self.parent = ledger.parent_run_id
        self._lock = threading.Lock()  # reports arrive from the Ray Train relay thread too
        self._latest: dict[str, UnitRecord] = {}
        self._report_failed = False
        self._on_server: dict[str, set[int]] = {}  # per metric, the steps a continued parent run already had
        self._variants_on_server: dict[str, str] | None = None  # the child runs a continued parent run already had

    # The observer protocol of pipelines.units.UnitRunner.
    def stage_started(self, stage: str, total: int, cached: int) -> None:
        with self._lock:
            self._call(stage, "-", lambda: self.tracker.set_tags(self.parent, {"legodnn.stage": stage}))

    def unit_report(self, stage: str, unit: str, kind: str, values: dict[str, Any]) -> None:
        """Loss curves while a unit trains: teacher per epoch, joint per step, retraining per
        epoch and variant (values {"epoch", "losses": {choice: loss}}). Best effort: a failed
        write is logged once and the run goes on (the unit's results are logged when it ends)."""
        step = values.get("epoch", values.get("step"))
        if step is None:
            return
        with self._lock:
            try:
                if stage == "retrain" and isinstance(values.get("losses"), dict):
                    for choice, loss in values["losses"].items():
                        child = self.ledger.children.get(f"{unit}/{choice}")
                        if child is not None:
                            self.tracker.log_metrics(child, {"retrain_loss": loss}, step=int(step))
                elif "loss" in values:
                    metric = f"loss/{stage}" if stage in ("teacher", "joint") else f"loss/{stage}.{unit}"
                    self._log_steps(metric, {int(step): values["loss"]})
            except Exception as exc:  # noqa: BLE001 - live curves are best effort
                if not self._report_failed:
                    log.warning("MLflow: could not log a live %s report (%s); going on", stage, exc)
                    self._report_failed = True

    def unit_finished(self, stage: str, record: UnitRecord, executed: bool) -> None:
        with self._lock:
            self._latest[stage] = record
            token = f"{stage}/{record.unit}/{record.key}"
            if token in self.ledger.logged:
                return
            handler = getattr(self, f"_log_{stage}", None)
            if handler is not None:
                self._call(stage, record.unit, lambda: handler(record, executed))
            self.ledger.logged.append(token)
            self.ledger.save(self.ledger_path)

    def stage_finished(self, stage: str, executed: int, skipped: int, seconds: float) -> None:
        with self._lock:
            self._call(stage, "-", lambda: self.tracker.log_metrics(self.parent, {f"seconds/{stage}": seconds}))

    def close(self, status: str = "FINISHED") -> None:
        """Terminate the child runs still open (a run that stopped before the table)."""
        with self._lock:
            for key, run_id in self.ledger.children.items():
                if key not in self.ledger.closed:
                    self.tracker.finish(run_id, status=status)
                    if status == "FINISHED":
                        self.ledger.closed.append(key)
            self.ledger.save(self.ledger_path)

    def _call(self, stage: str, unit: str, fn: Any) -> None:
        from infra.tracking import TrackingError

        try:
            fn()
        except TrackingError:
            raise
        except Exception as exc:
            raise TrackingError(
                f"MLflow logging of stage {stage!r}, unit {unit!r} failed on {self.tracker.uri}: "
                f"{type(exc).__name__}: {exc}; finished units are cached: run again to resume"
            ) from exc

    def _log_steps(self, metric: str, values: dict[int, Any]) -> None:
        if self.ledger.resumes and metric not in self._on_server:  # the ledger may lag the server by one write
            self._on_server[metric] = self.tracker.logged_steps(self.parent, metric)
        done = set(self.ledger.steps.get(metric, [])) | self._on_server.get(metric, set())
        new = {s: v for s, v in values.items() if s not in done}
        if new:
            self.tracker.log_history(self.parent, metric, new)
            self.ledger.steps[metric] = sorted(done | set(new))
            self.ledger.save(self.ledger_path)  # a restarted driver must not log these steps again

    def _dir(self, record: UnitRecord) -> Path:
        return self.cache.unit_dir(record.stage, record.key)

    # One method per stage: what its finished unit adds to the parent and child runs.
    def _log_teacher(self, record: UnitRecord, executed: bool) -> None:
        m = record.meta
        self.tracker.log_metrics(self.parent, {
            "teacher_val_accuracy": m.get("val_accuracy"), "teacher_test_accuracy": m.get("test_accuracy"),
            "teacher_train_loss": m.get("train_loss"), "teacher_train_seconds": m.get("train_seconds")})

    def _log_descend(self, record: UnitRecord, executed: bool) -> None:
        block, choices = record.meta["block"], record.meta["choices"]
        scalable = len(choices) > 1
        for choice in choices:
            key = f"{block}/{choice}"
            if key in self.ledger.children:
                continue
            if self.ledger.resumes and self._variants_on_server is None:  # the ledger may lag the server by one child
                self._variants_on_server = self.tracker.variant_runs(self.parent)
            run_id = (self._variants_on_server or {}).get(key)
            if run_id is not None:  # started by a driver killed before its ledger said so: adopted, params completed
                self.tracker.resume_variant(run_id, model=self.model, block=block, choice=choice,
                                            params={"scalable": scalable})
            else:
                what = ("the untouched original block" if choice == "0.0" else
                        f"pruned to sparsity {choice} (channels removed by importance, I/O shapes kept)")
                run_id = self.tracker.start_variant(
                    self.parent, model=self.model, block=block, choice=choice, params={"scalable": scalable},
                    description=f"Block `{block}` of **{self.model}**, {what}. Retraining losses, cost, latency "
                                "(median, p10, p90) and accuracy drops are added as the stages finish; the weights "
                                "are the run's artifact.")
            self.ledger.children[key] = run_id
            self.ledger.save(self.ledger_path)  # a driver killed now must not make this child twice
            self.tracker.log_metrics(run_id, {"params": record.meta.get("params", {}).get(choice)})

    def _log_retrain(self, record: UnitRecord, executed: bool) -> None:
        for choice, report in record.meta.get("reports", {}).items():
            child = self.ledger.children.get(f"{record.unit}/{choice}")
            if child is not None:
                self.tracker.log_metrics(child, {"retrain_loss_before": report.get("loss_before"),
                                                 "retrain_loss_after": report.get("loss_after"),
                                                 "retrain_seconds": report.get("seconds")})

    def _log_assemble(self, record: UnitRecord, executed: bool) -> None:
        self.tracker.log_metrics(self.parent, {"num_options": record.meta.get("num_options"),
                                               "num_blocks": len(record.meta.get("blocks", []))})

    def _log_joint(self, record: UnitRecord, executed: bool) -> None:
        m = record.meta
        self._log_steps("loss/joint", {i + 1: loss for i, loss in enumerate(m.get("losses", []))})
        self.tracker.log_metrics(self.parent, {"joint_train_seconds": m.get("train_seconds"),
                                               "joint_resumed_from_step": m.get("resumed_from_step")})

    def _log_cost(self, record: UnitRecord, executed: bool) -> None:
        data = json.loads((self._dir(record) / COST_FILE).read_text(encoding="utf-8"))
        trained = self._latest.get("joint") or self._latest.get("assemble")  # joint passes assemble through
        weights = self._dir(trained) / SCALABLE_DIR / data["block"] if trained is not None else None
        for choice, row in data["choices"].items():
            child = self.ledger.children.get(f"{data['block']}/{choice}")
            if child is None:
                continue
            cost, lat = row["cost"], row["latency"]
            self.tracker.log_metrics(child, {
                "params": cost.get("params"), "weight_bytes": cost.get("weight_bytes"), "flops": cost.get("flops"),
                "activation_bytes": cost.get("activation_bytes"), "peak_bytes": cost.get("peak_bytes"),
                "latency_ms": lat.get("median_ms"), "latency_p10_ms": lat.get("p10_ms"),
                "latency_p90_ms": lat.get("p90_ms"), "latency_cv": lat.get("cv")})
            if weights is not None and (weights / f"{choice}.safetensors").is_file():
                self.tracker.log_artifact(child, weights / f"{choice}.safetensors")

    def _log_table(self, record: UnitRecord, executed: bool) -> None:
        from profiling.table import load as load_table

        table = load_table(self._dir(record) / TABLE_FILE)
        self.tracker.log_metrics(self.parent, {"additivity_mae": record.meta.get("additivity_mae"),
                                               "calibrated_mae": record.meta.get("calibrated_mae")})
        for block in table.blocks:
            for choice, profile in block.choices.items():
                key = f"{block.name}/{choice}"
                child = self.ledger.children.get(key)
                if child is None:
                    continue
                self.tracker.log_metrics(child, {"accuracy_drop": profile.accuracy_drop,
                                                 "accuracy_drop_raw": profile.accuracy_drop_raw})
                if key not in self.ledger.closed:
                    self.tracker.finish(child)
                    self.ledger.closed.append(key)

    def _log_publish(self, record: UnitRecord, executed: bool) -> None:
        self.tracker.set_tags(self.parent, {"legodnn.bundle_uri": record.meta["uri"],
                                            "legodnn.bundle_version": record.meta["version"]})


def config_digest(cfg: Any) -> str:
    """What makes two invocations "the same pipeline" for continuing a parent run: the config."""
    import hashlib

    from legoblocks.files import canonical_json

    return hashlib.sha256(canonical_json(cfg.to_dict()).encode()).hexdigest()[:16]


def data_inputs(data: Any, classes: tuple[str, ...]) -> list[Any]:
    """The run's train, validation and test splits as MLflow data set inputs (source, digest,
    rows, image shape, classes and preprocessing)."""
    from infra.tracking import DatasetSplit
    from pipelines.data import load_splits

    splits = load_splits(data)
    where = data.location or data.factory or data.source
    source_type = "s3" if str(where).startswith("s3://") else "code" if data.factory else "local"
    p = data.preprocess
    profile = {"classes": len(classes), "class_names": list(classes), "seed": data.seed,
               "preprocess": {"channels": p.channels, "size": p.size, "mean": list(p.mean), "std": list(p.std)}}
    return [DatasetSplit(name=f"{data.source}/{name}", digest=data.fingerprint, source=str(where),
                         source_type=source_type, context=context, rows=len(ds), shape=(p.channels, p.size, p.size),
                         profile=profile)
            for name, context, ds in (("train", "training", splits.train), ("val", "validation", splits.val),
                                      ("test", "test", splits.test))]


def pipeline_description(cfg: Any, facts: Any) -> str:
    """The parent run's description (markdown, shown on the run page)."""
    data = facts.data
    return (
        f"LegoDNN pipeline of **{facts.model_name}** (`{cfg.model.ref}`) on `{data.source}` "
        f"({data.location or data.factory or 'embedded'}).\n\n"
        "Child runs: one per block variant (`tags.legodnn.kind = 'variant'`: retraining losses, cost, latency "
        "median/p10/p90, accuracy drops, weights) and one per served composition "
        "(`tags.legodnn.kind = 'composition'`, each with its ONNX logged model). Artifacts: the profile table, "
        "the Pareto points and plot, the per-block plot, the bundle manifest. A restarted run of the same "
        "config continues this run."
    )
