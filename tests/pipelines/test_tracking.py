"""infra.tracking against a real MLflow sqlite store (the server is exercised in test_dag.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from infra.tracking import (
    TAG_BLOCK, TAG_MODEL, TAG_SPARSITY, Tracker, TrackingError, check_tracking, default_artifact_root,
    flatten, pareto_plot, resolve_tracking_uri, ui_command,
)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_uri_resolution_prefers_config_then_env_then_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(tmp_path) == "http://127.0.0.1:1"
    assert resolve_tracking_uri(tmp_path, "sqlite:////x.db") == "sqlite:////x.db"


@pytest.mark.timeout(60)  # a client that retries for minutes would hit this
def test_unreachable_server_fails_fast_with_a_fix(tmp_path: Path) -> None:
    with pytest.raises(TrackingError, match="unreachable.*MLFLOW_TRACKING_URI"):
        check_tracking(f"http://127.0.0.1:{_closed_port()}")
    assert not list(tmp_path.iterdir())
    with pytest.raises(TrackingError, match="unsupported scheme"):
        check_tracking("ftp://example/x")


def test_variant_runs_are_tagged_and_found_by_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # what mlflow.search_runs reads
    check_tracking(uri)
    tracker = Tracker(uri, "exp", artifact_root=default_artifact_root(tmp_path))
    parent = tracker.start_run("pipeline", kind="pipeline")
    tracker.log_params(parent, flatten({"retrain": {"lr": 0.001, "epochs": 1}, "workdir": "w"}))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not really weights")
    child = tracker.log_variant(parent, model="resnet20", block="layer1.0", choice="0.4",
                                metrics={"accuracy_drop": 0.01, "flops": 1000, "bad": float("nan")},
                                artifacts=[weights])
    tracker.finish(parent)
    runs = mlflow.search_runs(experiment_names=["exp"],
                              filter_string=f"tags.`{TAG_BLOCK}` = 'layer1.0'")
    assert list(runs["run_id"]) == [child]
    row = runs.iloc[0]
    assert row[f"tags.{TAG_MODEL}"] == "resnet20" and row[f"tags.{TAG_SPARSITY}"] == "0.4"
    assert row["tags.mlflow.parentRunId"] == parent
    assert row["metrics.accuracy_drop"] == pytest.approx(0.01)
    assert "metrics.bad" not in runs.columns or runs["metrics.bad"].isna().all()
    artifact_dir = Path(tmp_path / "mlartifacts")
    assert list(artifact_dir.rglob("w.safetensors"))
    parent_row = mlflow.search_runs(experiment_names=["exp"],
                                    filter_string="tags.`legodnn.kind` = 'pipeline'").iloc[0]
    assert parent_row["params.retrain.lr"] == "0.001"
    assert tracker.run_exists(parent) and not tracker.run_exists("0" * 32)


def test_ui_command_and_pareto_plot(tmp_path: Path) -> None:
    command = ui_command("sqlite:////w/mlflow.db", "file:///w/mlartifacts")
    assert "mlflow ui --backend-store-uri sqlite:////w/mlflow.db --host 127.0.0.1" in command
    points = {
        "latency": [{"feasible": True, "latency_ms": 1.0, "memory_bytes": 10, "told": {"accuracy": 0.8}},
                    {"feasible": True, "latency_ms": 2.0, "memory_bytes": 20, "told": {"accuracy": 0.9}}],
        "memory": [{"feasible": False}],
        "measured": [{"feasible": True, "latency_ms": 2.0, "memory_bytes": 20, "measured_test_accuracy": 0.88}],
    }
    png = pareto_plot(points, tmp_path / "p.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
