"""All MLflow code of the project: where runs go, and how a pipeline run is recorded.

One parent run per pipeline invocation and one child run per block variant, tagged
`legodnn.model`, `legodnn.block`, `legodnn.sparsity`, so the MLflow UI can filter
"every 0.6 descendant of layer2.1" across runs. Everything goes through an explicit
`MlflowClient(tracking_uri)`: no process-wide `mlflow.set_tracking_uri`, so two pipelines
(or a test and a pipeline) in one process never write into each other's store.
"""

from __future__ import annotations

import math
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

TAG_MODEL = "legodnn.model"
TAG_BLOCK = "legodnn.block"
TAG_SPARSITY = "legodnn.sparsity"
TAG_KIND = "legodnn.kind"  # "pipeline", "variant", "tune", "trial"
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


class Tracker:
    """A handle on one MLflow store and experiment."""

    def __init__(self, tracking_uri: str, experiment: str, *, artifact_root: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.experiment = experiment
        self.artifact_root = artifact_root
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._experiment_id: str | None = None

    @property
    def experiment_id(self) -> str:
        """The experiment's id, created on first use (with artifacts under the workdir)."""
        if self._experiment_id is None:
            try:
                found = self.client.get_experiment_by_name(self.experiment)
                if found is None:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment, artifact_location=self.artifact_root
                    )
                else:
                    self._experiment_id = found.experiment_id
            except Exception as exc:  # noqa: BLE001 - any store failure gets one clear message
                raise TrackingError(f"MLflow store {self.uri} failed: {type(exc).__name__}: {exc}") from exc
        return self._experiment_id

    def start_run(
        self,
        name: str,
        *,
        kind: str,
        parent_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        all_tags = {TAG_KIND: kind, **(tags or {})}
        if parent_id:
            all_tags[_PARENT_TAG] = parent_id
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name)
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[i : i + _BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in _finite(metrics).items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + _BATCH])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_dict(self, run_id: str, data: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(run_id, data, artifact_file)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def run_exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - a missing run raises a store-specific error
            return False
        return True

    def log_variant(
        self,
        parent_id: str,
        *,
        model: str,
        block: str,
        choice: str,
        metrics: Mapping[str, Any],
        artifacts: Iterable[str | Path] = (),
        params: Mapping[str, Any] | None = None,
    ) -> str:
        """One child run for one block variant: params, metrics, its weights file."""
        tags = {TAG_MODEL: model, TAG_BLOCK: block, TAG_SPARSITY: choice}
        run_id = self.start_run(f"{block}@{choice}", kind="variant", parent_id=parent_id, tags=tags)
        self.log_params(run_id, {"model": model, "block": block, "sparsity": choice, **(params or {})})
        self.log_metrics(run_id, metrics)
        for path in artifacts:
            self.log_artifact(run_id, path)
        self.finish(run_id)
        return run_id


def pareto_plot(points: Mapping[str, Any], path: str | Path, *, title: str = "") -> Path:
    """PNG of predicted accuracy vs latency and vs memory of the optimizer's choices.

    `points` is the pipeline's points.json: for a grid of latency budgets and of memory
    budgets, the composition the optimizer chose and its predicted accuracy; measured test
    accuracies are overlaid where they exist.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    panels = (("latency", "latency_ms", "latency (ms, summed blocks)", 1.0),
              ("memory", "memory_bytes", "memory (KiB, weights + peak activation)", 1 / 1024))
    for i, (group, key, label, scale) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        rows = [p for p in points.get(group, []) if p.get("feasible")]
        ax.plot([p[key] * scale for p in rows], [100 * p["told"]["accuracy"] for p in rows],
                "o-", label="optimizer choice (predicted)")
        measured = [p for p in points.get("measured", []) if "measured_test_accuracy" in p]
        if measured:
            ax.plot([p[key] * scale for p in measured], [100 * p["measured_test_accuracy"] for p in measured],
                    "s", label="measured (test set)")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
