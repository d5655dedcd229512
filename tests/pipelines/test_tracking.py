"""infra.tracking, infra.logged_models and infra.plots against a real MLflow sqlite store
(the server is exercised in test_live.py and test_dag.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from infra.plots import BlockPoint, block_plot, pareto_plot
from infra.tracking import (
    TAG_BLOCK, TAG_MODEL, TAG_SPARSITY, DatasetSplit, Tracker, TrackingError, check_tracking, default_artifact_root,
    flatten, resolve_tracking_uri, source_tags, ui_command,
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
    parent = tracker.start_run("pipeline", kind="pipeline", tags=source_tags("legodnn run"), description="**hi**")
    tracker.log_params(parent, flatten({"retrain": {"lr": 0.001, "epochs": 1}, "workdir": "w"}))
    tracker.log_inputs(parent, [DatasetSplit("fmnist/train", "f" * 64, "/data", "local", "training", 300, (1, 28, 28),
                                             {"classes": 10})])
    tracker.log_history(parent, "loss/joint", {2: 0.5, 1: 0.7, 3: float("nan")})
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not really weights")
    child = tracker.start_variant(parent, model="resnet20", block="layer1.0", choice="0.4")
    tracker.log_metrics(child, {"accuracy_drop": 0.01, "flops": 1000, "bad": float("nan")})
    tracker.log_artifact(child, weights)
    tracker.finish(child)
    assert tracker.run_status(parent) == "RUNNING"
    tracker.finish(parent, status="FAILED")
    tracker.reopen(parent)  # a resumed pipeline continues its parent run
    assert tracker.run_status(parent) == "RUNNING" and tracker.run_status("0" * 32) is None
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
    client = mlflow.MlflowClient()
    run = client.get_run(parent)
    assert run.data.params["retrain.lr"] == "0.001" and run.data.tags["mlflow.note.content"] == "**hi**"
    assert run.data.tags["mlflow.source.name"] == "legodnn run"
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40  # the tests run in a git checkout
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "fmnist/train" and '"num_rows": 300' in dataset.dataset.profile
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(parent, "loss/joint"), key=lambda m: m.step)] \
        == [(1, 0.7), (2, 0.5)]
    experiment = client.get_experiment_by_name("exp")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # not the GenAI views


def test_onnx_model_is_logged_registered_and_served_by_pyfunc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    import mlflow
    import numpy as np
    import torch

    from infra.logged_models import log_onnx_model, register_version

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = Tracker(uri, "exp", artifact_root=default_artifact_root(tmp_path))
    run = tracker.start_run("teacher", kind="composition")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2 * 6 * 6, 3)).eval()
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), buffer, dynamo=False, input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": {0: "n"}, "output": {0: "n"}})
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8), dtype=np.float32)
    logged = log_onnx_model(tracker, run, "tiny-teacher", buffer.getvalue(), input_example=x, outputs=3,
                            tags={"legodnn.role": "teacher"}, metrics={"test_accuracy": 0.5})
    versions = [register_version(tracker, "tiny", logged, run, alias="teacher", tags={"legodnn.bundle_version": v})
                for v in (1, 2)]
    assert [v.version for v in versions] == ["1", "2"]
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("tiny", "teacher").version) == "2"  # the newest
    (found,) = client.search_logged_models(experiment_ids=[tracker.experiment_id])
    assert found.model_id == logged.model_id and str(found.status).endswith("READY")
    assert [m.key for m in found.metrics] == ["test_accuracy"]
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    for model_uri in (logged.uri, versions[-1].uri):
        got = mlflow.pyfunc.load_model(model_uri).predict(x)["output"]
        assert np.abs(got - expected).max() < 1e-5
    signature = mlflow.models.get_model_info(logged.uri).signature
    assert list(signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 8, 8]


def test_ui_command_and_plots(tmp_path: Path) -> None:
    command = ui_command("sqlite:////w/mlflow.db", "file:///w/mlartifacts")
    assert "mlflow ui --backend-store-uri sqlite:////w/mlflow.db --host 127.0.0.1" in command
    points = {
        "latency": [{"feasible": True, "latency_ms": 1.0, "memory_bytes": 10, "told": {"accuracy": 0.8}},
                    {"feasible": True, "latency_ms": 2.0, "memory_bytes": 20, "told": {"accuracy": 0.9}}],
        "memory": [{"feasible": False}],
        "measured": [{"feasible": True, "latency_ms": 2.0, "memory_bytes": 20, "measured_test_accuracy": 0.88}],
    }
    png = pareto_plot(points, tmp_path / "p.png", title="t", teacher_accuracy=0.9, test_size=200,
                      latency_spread=[(1.8, 2.3)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    blocks = {"layer1.0": [BlockPoint(0.0, 0.0, 1.0, 0.9, 1.2), BlockPoint(0.4, 0.02, 0.7, 0.6, 0.8)],
              "head": [BlockPoint(0.0, 0.0, 0.1, 0.1, 0.1)]}
    png = block_plot(blocks, tmp_path / "b.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _store_and_workdir(tmp_path: Path) -> tuple[Tracker, Path]:
    """A real sqlite MLflow store and an empty work directory (for a driver's ledger)."""
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp", artifact_root=default_artifact_root(tmp_path))
    work = tmp_path / "work"
    work.mkdir()
    return tracker, work


def test_a_restarted_driver_logs_no_step_twice_even_past_its_ledger(tmp_path: Path) -> None:
    from pipelines.live import LEDGER_FILE, LiveTracking, open_parent_run

    tracker, work = _store_and_workdir(tmp_path)
    ledger, resumed = open_parent_run(tracker, work, "digest", name="p", tags={}, description="")
    assert not resumed
    first = LiveTracking(tracker, ledger, work / LEDGER_FILE, None, model="m")  # type: ignore[arg-type]
    first.unit_report("joint", "j", "step", {"step": 5, "loss": 1.0})
    # Killed after these reached the server and before its ledger said so.
    tracker.log_history(ledger.parent_run_id, "loss/joint", {1: 3.0, 2: 2.5, 3: 2.0})

    ledger, resumed = open_parent_run(tracker, work, "digest", name="p", tags={}, description="")
    assert resumed and ledger.steps == {"loss/joint": [5]}
    second = LiveTracking(tracker, ledger, work / LEDGER_FILE, None, model="m")  # type: ignore[arg-type]
    for step in range(1, 7):
        second.unit_report("joint", "j", "step", {"step": step, "loss": 1.0 / step})
    steps = sorted(m.step for m in tracker.client.get_metric_history(ledger.parent_run_id, "loss/joint"))
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_restarted_driver_adopts_a_child_run_started_past_its_ledger(tmp_path: Path) -> None:
    from pipelines.cache import UnitRecord
    from pipelines.live import LEDGER_FILE, LiveTracking, open_parent_run

    tracker, work = _store_and_workdir(tmp_path)
    ledger, _ = open_parent_run(tracker, work, "digest", name="p", tags={}, description="")
    parent = ledger.parent_run_id
    # Killed after this child run reached the server (its params not yet) and before the ledger said so.
    orphan = tracker.start_run("b1@0.5", kind="variant", parent_id=parent,
                               tags={TAG_MODEL: "m", TAG_BLOCK: "b1", TAG_SPARSITY: "0.5"})
    ledger, resumed = open_parent_run(tracker, work, "digest", name="p", tags={}, description="")
    assert resumed and ledger.children == {}
    live = LiveTracking(tracker, ledger, work / LEDGER_FILE, None, model="m")  # type: ignore[arg-type]
    record = UnitRecord("descend", "b1", "k", {}, meta={"block": "b1", "choices": ["0.0", "0.5"], "params": {}})
    live.unit_finished("descend", record, True)

    runs = tracker.client.search_runs([tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.data.tags[TAG_SPARSITY] for r in runs) == ["0.0", "0.5"]  # one child run per variant
    assert ledger.children["b1/0.5"] == orphan
    adopted = tracker.client.get_run(orphan)
    assert adopted.data.params == {"model": "m", "block": "b1", "sparsity": "0.5", "scalable": "True"}
    assert adopted.info.status == "RUNNING"
    assert tracker.variant_runs(parent) == ledger.children
