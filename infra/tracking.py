"""All MLflow code of the project: where runs go, and how a pipeline run is recorded.

One parent run per pipeline invocation (continued when the same pipeline is restarted) and
one child run per block variant, tagged `legodnn.model`, `legodnn.block`,
`legodnn.sparsity`, so the MLflow UI can filter "every 0.6 descendant of layer2.1" across
runs. The experiment is marked as a model-training experiment (`mlflow.experimentKind`), so
the UI opens it on its runs, not on its GenAI views. Everything goes through an explicit
`MlflowClient(tracking_uri)`: no process-wide `mlflow.set_tracking_uri`, so two pipelines
(or a test and a pipeline) in one process never write into each other's store.
Logged models and the Model Registry are in `infra.logged_models`, figures in `infra.plots`.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

TAG_MODEL = "legodnn.model"
TAG_BLOCK = "legodnn.block"
TAG_SPARSITY = "legodnn.sparsity"
TAG_KIND = "legodnn.kind"  # "pipeline", "variant", "tune", "trial", "evaluation"
TAG_NOTE = "mlflow.note.content"  # the run description the UI shows (markdown)
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's "Machine learning" experiment type
_PARENT_TAG = "mlflow.parentRunId"
_MAX_PARAM_LEN = 6000  # MLflow's limit on one param value
_BATCH = 100  # MLflow's limit on params per log_batch call


class TrackingError(RuntimeError):
    """The MLflow store is unusable (unreachable server, bad URI); says which and how to fix."""


def resolve_tracking_uri(workdir: str | Path, configured: str | None = None) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else a sqlite file in the work directory."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def default_artifact_root(workdir: str | Path) -> str:
    return (Path(workdir).resolve() / "mlartifacts").as_uri()


def is_local_store(uri: str) -> bool:
    return urlparse(uri).scheme in ("sqlite", "file", "")


def check_tracking(uri: str, timeout_s: float = 5.0) -> None:
    """Fail before any work when the store cannot be used; never creates anything.

    An HTTP server is asked for /health with a short timeout (MLflow's own client retries
    for minutes); a sqlite store needs a writable folder for its file.
    """
    parsed = urlparse(uri)
    scheme = parsed.scheme
    if scheme in ("http", "https"):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout_s) as resp:  # noqa: S310 - URL is the user's tracking server
                if resp.status != 200:
                    raise TrackingError(f"MLflow server {uri} answered {resp.status} on /health")
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({getattr(exc, 'reason', exc)}); start it "
                "(`mlflow server --host 127.0.0.1 --port 5000`), fix MLFLOW_TRACKING_URI / "
                "mlflow.tracking_uri, or unset both to track into sqlite in the work directory"
            ) from exc
        return
    if scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if path is None or not str(path):
            raise TrackingError(f"MLflow URI {uri!r}: write sqlite:////absolute/path/mlflow.db")
        _check_writable(path.parent, uri)
        return
    if scheme in ("file", ""):
        _check_writable(Path(parsed.path if scheme else uri), uri)
        return
    if scheme in ("databricks", "postgresql", "mysql", "mssql"):
        return  # reachability is checked by the first client call
    raise TrackingError(
        f"MLflow tracking URI {uri!r} has an unsupported scheme {scheme!r}; use http(s)://, "
        "sqlite:///ABS/PATH or a database URI"
    )


def _check_writable(folder: Path, uri: str) -> None:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise TrackingError(f"MLflow store {uri}: {probe} is not writable; pick another work directory")


def ui_command(uri: str, artifact_root: str | None = None) -> str:
    """The exact command that opens the MLflow UI on this store (loopback only)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser (the tracking server is the UI)"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    exe = str(mlflow_bin) if mlflow_bin.exists() else "mlflow"
    try:
        exe = os.path.relpath(exe) if not os.path.relpath(exe).startswith("..") else exe
    except ValueError:
        pass
    cmd = f"{exe} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    if artifact_root:
        cmd += f" --default-artifact-root {artifact_root}"
    return cmd


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"retrain.lr": "0.001", ...}: MLflow params are flat strings."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:_MAX_PARAM_LEN]
    return out


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if value is None or isinstance(value, bool):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key] = number
    return out


@dataclass(frozen=True)
class DatasetSplit:
    """One split of the data a run read, as an MLflow data set input.

    Attributes:
        name: shown in the UI, e.g. "fashion-mnist/train".
        digest: identifies the content (the data fingerprint, shortened to MLflow's limit).
        source: where the data is (a folder, an s3:// prefix, a factory).
        source_type: MLflow's source kind: "local", "s3", "code".
        context: what the run used it for: "training", "validation", "test".
        rows: images in the split.
        shape: one image's tensor shape (C, H, W) after preprocessing.
        profile: further facts (classes, preprocessing, seed), shown as the data set's profile.
    """

    name: str
    digest: str
    source: str
    source_type: str
    context: str
    rows: int
    shape: tuple[int, ...]
    profile: Mapping[str, Any]


class Tracker:
    """A handle on one MLflow store and experiment.

    Args:
        tracking_uri: the store (`resolve_tracking_uri`).
        experiment: the experiment's name; created on first use, marked as model training.
        artifact_root: where a new experiment keeps artifacts (a local store's work directory).
    """

    def __init__(self, tracking_uri: str, experiment: str, *, artifact_root: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        # A new sqlite store's schema set-up lines, and a line per registered model version.
        for noisy in ("mlflow.store.db.utils", "alembic", "mlflow.store.model_registry.abstract_store"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # On a tracking server MLflow prints two links for every run it terminates (a pipeline
        # terminates one per block variant); the run summary names the parent run instead.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.uri = tracking_uri
        self.experiment = experiment
        self.artifact_root = artifact_root
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._experiment_id: str | None = None

    @property
    def experiment_id(self) -> str:
        """The experiment's id, created on first use (with artifacts under the workdir) and
        tagged as a model-training experiment (an existing one without a kind gets the tag)."""
        if self._experiment_id is None:
            try:
                found = self.client.get_experiment_by_name(self.experiment)
                if found is None:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment, artifact_location=self.artifact_root,
                        tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND},
                    )
                else:
                    self._experiment_id = found.experiment_id
                    if TAG_EXPERIMENT_KIND not in found.tags:
                        self.client.set_experiment_tag(found.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
            except Exception as exc:  # noqa: BLE001 - any store failure gets one clear message
                raise TrackingError(f"MLflow store {self.uri} failed: {type(exc).__name__}: {exc}") from exc
        return self._experiment_id

    def start_run(
        self,
        name: str,
        *,
        kind: str,
        parent_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        description: str | None = None,
    ) -> str:
        """A new RUNNING run; `description` is the markdown note the UI shows on the run page."""
        all_tags = {TAG_KIND: kind, **{k: str(v) for k, v in (tags or {}).items()}}
        if parent_id:
            all_tags[_PARENT_TAG] = parent_id
        if description:
            all_tags[TAG_NOTE] = description
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name)
        return run.info.run_id

    def reopen(self, run_id: str) -> None:
        """Mark an unfinished (RUNNING, FAILED or KILLED) run RUNNING again: a resumed pipeline."""
        self.client.update_run(run_id, status="RUNNING")

    def run_status(self, run_id: str) -> str | None:
        """"RUNNING", "FINISHED", "FAILED", "KILLED", or None for a missing (or deleted) run."""
        try:
            run = self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - a missing run raises a store-specific error
            return None
        return None if run.info.lifecycle_stage == "deleted" else run.info.status

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[i : i + _BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Finite numbers only: None, NaN, booleans and text are left out."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in _finite(metrics).items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + _BATCH])

    def log_history(self, run_id: str, key: str, values: Mapping[int, Any]) -> None:
        """One metric at many steps ({step: value}): a loss curve in one request per 100 points."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        finite = {step: _finite({key: value}).get(key) for step, value in values.items()}
        items = [Metric(key, v, now, step) for step, v in sorted(finite.items()) if v is not None]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + _BATCH])

    def logged_steps(self, run_id: str, key: str) -> set[int]:
        """The steps at which metric `key` is already on the run (what a restarted driver must
        not log again when it was killed between logging them and saving its ledger)."""
        return {m.step for m in self.client.get_metric_history(run_id, key)}

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:_MAX_PARAM_LEN]) for k, v in tags.items()])

    def log_inputs(self, run_id: str, splits: Sequence[DatasetSplit]) -> None:
        """The data a run read, as MLflow data set inputs (the UI's "Datasets used")."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for split in splits:
            tensor = json.dumps([{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, *split.shape]}}])
            schema = json.dumps({"mlflow_tensorspec": {"features": tensor, "targets": None}})
            profile = json.dumps({"num_rows": split.rows, **split.profile}, default=str)
            dataset = Dataset(name=split.name, digest=split.digest[:36], source_type=split.source_type,
                              source=json.dumps({"uri": split.source}), schema=schema, profile=profile)
            inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", split.context)]))
        self.client.log_inputs(run_id, datasets=inputs)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_dict(self, run_id: str, data: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(run_id, data, artifact_file)

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure as a PNG artifact (shown inline in the artifact viewer)."""
        self.client.log_figure(run_id, figure, artifact_file)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def start_variant(self, parent_id: str, *, model: str, block: str, choice: str,
                      params: Mapping[str, Any] | None = None, description: str | None = None) -> str:
        """The child run of one block variant (RUNNING until its last stage logs to it)."""
        tags = {TAG_MODEL: model, TAG_BLOCK: block, TAG_SPARSITY: choice}
        run_id = self.start_run(f"{block}@{choice}", kind="variant", parent_id=parent_id, tags=tags,
                                description=description)
        self._variant_params(run_id, model, block, choice, params)
        return run_id

    def resume_variant(self, run_id: str, *, model: str, block: str, choice: str,
                       params: Mapping[str, Any] | None = None) -> None:
        """A variant's child run RUNNING with its params (the same values again are no
        change): completes one a killed driver started (`variant_runs`)."""
        self.reopen(run_id)
        self._variant_params(run_id, model, block, choice, params)

    def _variant_params(self, run_id: str, model: str, block: str, choice: str, params: Mapping[str, Any] | None) -> None:
        self.log_params(run_id, {"model": model, "block": block, "sparsity": choice, **(params or {})})

    def variant_runs(self, parent_id: str) -> dict[str, str]:
        """"block/sparsity" -> run id of the variant child runs `parent_id` already has on the
        server (the oldest where a variant has two): what a restarted driver adopts when it
        was killed between starting a child run and saving its ledger."""
        where = f"tags.`{_PARENT_TAG}` = '{parent_id}' and tags.`{TAG_KIND}` = 'variant'"
        found: dict[str, str] = {}
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=where, max_results=1000,
                                           order_by=["attributes.start_time ASC"], page_token=token)
            for run in page:
                key = f"{run.data.tags.get(TAG_BLOCK)}/{run.data.tags.get(TAG_SPARSITY)}"
                found.setdefault(key, run.info.run_id)
            token = page.token
            if not token:
                return found

    @contextmanager
    def system_metrics(self, run_id: str, *, resume: bool = False, interval_s: float = 10.0) -> Iterator[bool]:
        """Sample CPU, memory, disk, network (and GPU where present) into `system/*` metrics of
        `run_id` while the block runs (MLflow's own monitor, every `interval_s`, or
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL). Yields False, and samples nothing, where
        psutil is not installed."""
        try:
            import psutil  # noqa: F401 - MLflow's monitors need it
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError:
            yield False
            return
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no "Started monitoring" lines
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=resume,
                                       tracking_uri=self.uri)
        monitor.start()
        try:
            yield True
        finally:
            monitor.finish()


def source_tags(entry_point: str, root: str | Path | None = None) -> dict[str, str]:
    """The tags MLflow's own fluent API sets on a run (user, source name and type, git commit,
    branch and remote), for runs made through `MlflowClient`; git tags only in a git checkout.

    Args:
        entry_point: what ran, e.g. "legodnn run".
        root: the source tree (default: this package's checkout).
    """
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    tags = {"mlflow.source.name": entry_point, "mlflow.source.type": "JOB" if os.environ.get("RAY_JOB_ID") else "LOCAL"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):
        pass

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return tags
    tags["mlflow.source.git.commit"] = commit
    if branch := git("rev-parse", "--abbrev-ref", "HEAD"):
        tags["mlflow.source.git.branch"] = branch
    if remote := git("config", "--get", "remote.origin.url"):
        tags["mlflow.source.git.repoURL"] = remote
    tags["legodnn.git.dirty"] = "true" if git("status", "--porcelain", "--untracked-files=no") else "false"
    return tags


