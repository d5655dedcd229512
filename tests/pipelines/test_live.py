"""Live MLflow tracking against a real tracking server, watched while a tiny pipeline runs.

One driver is polled through the server's REST API while it runs: child runs (one per block
variant) and the joint stage's step metrics appear while the parent run is still RUNNING.
It is then SIGKILLed; the restarted driver continues the same parent run without duplicating
a child run. Afterwards the teacher and the served compositions are logged models that
`mlflow.pyfunc.load_model` runs with the served composition's predictions, registered with
one version per publish (a second publish to another store adds a version per role and moves
the aliases).
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

EXPERIMENT = "live"


def _watch(proc: subprocess.Popen, client, parent_of, until, timeout: float = 300) -> dict:
    """Poll the server every 0.2 s while `proc` runs; returns the first observation that
    satisfies `until` (taken while the parent run was RUNNING and the driver alive)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the driver ended before the live facts showed up in MLflow"
        parent = parent_of()
        if parent is not None:
            run = client.get_run(parent)
            children = client.search_runs([run.info.experiment_id],
                                          f"tags.mlflow.parentRunId = '{parent}' and tags.`legodnn.kind` = 'variant'",
                                          max_results=1000)
            seen = {"parent": parent, "status": run.info.status, "children": len(children),
                    "joint_steps": [m.step for m in client.get_metric_history(parent, "loss/joint")],
                    "teacher_steps": [m.step for m in client.get_metric_history(parent, "loss/teacher")]}
            if until(seen) and proc.poll() is None:
                return seen
        time.sleep(0.2)
    pytest.fail("the live facts never showed up in MLflow")


def test_runs_and_metrics_are_live_resume_continues_the_parent_and_models_are_registered(
        clean_run, pipeline_env, mlflow_server, pl, tmp_path, monkeypatch) -> None:
    import mlflow
    import numpy as np
    import torch

    from legoblocks.compose import ScalableModel

    # The teacher and retraining come from the clean run's cache; the joint stage and all
    # after it run again, so its loss is reported live.
    later = ("joint", "cost", "accuracy", "table", "points", "publish", "lineage")
    work = pl.copy_workdir(clean_run.workdir, tmp_path / "work", drop_stages=later)
    config = pl.write_config(tmp_path / "c.yaml", {**clean_run.config, "workdir": str(work),
                                                   "publish": {"store": (tmp_path / "store1").as_uri()}})
    env = {**pipeline_env, "MLFLOW_TRACKING_URI": mlflow_server}
    args = ["run", "--config", str(config), "--experiment", EXPERIMENT, "--executor", "local", "--json"]
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    ledger = work / "mlflow_run.json"

    def parent_of() -> str | None:
        return json.loads(ledger.read_text())["parent_run_id"] if ledger.is_file() else None

    descendants = sum(len(c) for c in clean_run.summary["choices"].values())
    first = subprocess.Popen([pl.LEGODNN, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             cwd=pl.REPO)
    try:
        seen = _watch(first, client, parent_of, lambda s: s["children"] == descendants and s["joint_steps"])
    finally:
        pl.stop_tree(first.pid, sig=9)  # SIGKILL: the parent run is left RUNNING, as after a crash
        first.wait()
    assert seen["status"] == "RUNNING" and seen["joint_steps"][0] % clean_run.config["joint"]["checkpoint_every"] == 0
    assert not (work / "last_run.json").exists()

    summary = pl.summary_of(pl.run_cli(args, env))
    parent = summary["parent_run_id"]
    assert parent == seen["parent"]  # the restarted driver continued the parent run
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["legodnn.resumes"] == "1"
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)
    kinds = [c.data.tags["legodnn.kind"] for c in children]
    assert kinds.count("variant") == descendants  # none made twice
    assert all(c.info.status == "FINISHED" for c in children)
    joint = [m.step for m in client.get_metric_history(parent, "loss/joint")]
    assert sorted(joint) == list(range(1, clean_run.config["joint"]["steps"] + 1))  # every step once
    assert {"system/cpu_utilization_percentage", "teacher_val_accuracy"} <= set(run.data.metrics)
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {f"fashion-mnist/{s}" for s in ("train", "val", "test")}
    assert {"pareto.png", "blocks.png", "profile.json", "points.json"} <= {a.path for a in client.list_artifacts(parent)}

    # Logged models: the teacher and each served composition; pyfunc runs what the pipeline serves.
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    by_role = {m.tags["legodnn.role"]: m for m in models}
    served = [p for p in summary["points"] if p["feasible"]]
    assert set(by_role) == {"teacher", *(f"latency-{round(100 * p['fraction'])}" for p in served)}
    scalable = ScalableModel.load(summary["scalable_dir"])
    x = np.random.default_rng(0).standard_normal((4, *scalable.input_shape), dtype=np.float32)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    for point in (served[0], {"fraction": None, "selection": scalable.original_selection()}):
        role = "teacher" if point["fraction"] is None else f"latency-{round(100 * point['fraction'])}"
        model = by_role[role]
        assert model.tags["legodnn.selection"] == ",".join(point["selection"])
        with torch.no_grad():
            expected = scalable.compose(point["selection"]).eval()(torch.from_numpy(x)).numpy()
        got = mlflow.pyfunc.load_model(f"models:/{model.model_id}").predict(x)["output"]
        assert np.abs(got - expected).max() < 1e-4, role

    # The registry (server-wide: the clean run registered versions too): one version per role
    # and publish; a second publish to another store adds one per role and moves the aliases.
    name = "resnet20"

    def versions_of(bundle_uri: str) -> list:
        return [v for v in client.search_model_versions(f"name = '{name}'")
                if v.tags.get("legodnn.bundle_uri") == bundle_uri]

    assert sorted(v.tags["legodnn.role"] for v in versions_of(summary["bundle_uri"])) == sorted(by_role)
    before = len(client.search_model_versions(f"name = '{name}'"))
    again = pl.summary_of(pl.run_cli([*args, "--store", (tmp_path / "store2").as_uri()], env))
    assert again["parent_run_id"] != parent  # a finished run is not continued
    assert again["bundle_uri"] != summary["bundle_uri"]
    assert len(client.search_model_versions(f"name = '{name}'")) == before + len(by_role)
    assert sorted(v.tags["legodnn.role"] for v in versions_of(again["bundle_uri"])) == sorted(by_role)
    for role in by_role:
        newest = client.get_model_version_by_alias(name, role)
        assert newest.tags["legodnn.bundle_uri"] == again["bundle_uri"] and newest.tags["legodnn.role"] == role


def test_a_restart_continues_only_an_unfinished_parent_run_of_the_same_config(tmp_path) -> None:
    from infra.tracking import Tracker, default_artifact_root
    from pipelines.live import LEDGER_FILE, RunLedger, open_parent_run

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp", artifact_root=default_artifact_root(tmp_path))

    def start(config: str) -> tuple[RunLedger, bool]:
        return open_parent_run(tracker, tmp_path, config, name="pipeline", tags={}, description="d")

    ledger, resumed = start("a")
    assert not resumed and tracker.run_status(ledger.parent_run_id) == "RUNNING"
    child = tracker.start_variant(ledger.parent_run_id, model="m", block="b", choice="0.4")
    ledger.children["b/0.4"] = child
    ledger.logged.append("teacher/m/k1")
    ledger.save(tmp_path / LEDGER_FILE)
    tracker.finish(child, status="FAILED")
    tracker.finish(ledger.parent_run_id, status="FAILED")  # the driver failed
    again, resumed = start("a")
    assert resumed and again.parent_run_id == ledger.parent_run_id and again.resumes == 1
    assert again.logged == ["teacher/m/k1"]  # what it logged before is not logged twice
    assert tracker.run_status(again.parent_run_id) == "RUNNING" and tracker.run_status(child) == "RUNNING"
    other, resumed = start("b")  # another config: another parent run
    assert not resumed and other.parent_run_id != ledger.parent_run_id
    other.finished = True
    other.save(tmp_path / LEDGER_FILE)
    assert start("b")[0].parent_run_id != other.parent_run_id  # a finished run is not continued
    (tmp_path / LEDGER_FILE).write_text("{not json")
    assert not start("b")[1]  # an unreadable ledger starts a new run
