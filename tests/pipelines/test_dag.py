"""End to end on real Ray, a real MLflow server and real Fashion-MNIST subsets.

Every stage runs as Ray tasks, MLflow holds the parent and one child
run per block variant, the bundle and ProfileTable exist, a second run does nothing, a
killed retrain attempt is retried with identical outputs, a killed driver resumes without
recomputing finished units, and bad input fails before anything is written.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from profiling.serving import even_selections

STAGES = ("teacher", "detect", "descend", "blockio", "retrain", "assemble", "cost", "accuracy",
          "table", "points", "publish")


def test_end_to_end_runs_every_stage_on_ray_and_tracks_lineage(clean_run, monkeypatch) -> None:
    import mlflow

    from profiling.table import load as load_table

    summary = clean_run.summary
    units = summary["units"]
    for stage in STAGES:
        assert units[stage], f"stage {stage} has no units"
        for unit in units[stage]:
            # Every unit ran inside a Ray task (a task id and a node id recorded by the task).
            assert unit["task_id"] and unit["node_id"], (stage, unit)
    assert summary["counts"]["joint"] == {"executed": 1, "skipped": 0}
    assert summary["skipped"] == 0 and summary["executed"] > 0

    # The joint stage ran under Ray Train, its worker died once and resumed from step 5.
    assert clean_run.joint_marker.exists()
    joint = json.loads(next((clean_run.workdir / "cache" / "joint").glob("*/done.json")).read_text())
    assert joint["meta"]["steps"] == 10 and joint["meta"]["resumed_from_step"] == 5
    assert len(joint["meta"]["losses"]) == 10

    table = load_table(summary["table_path"])
    assert table.block_names == summary["blocks"]
    descendants = sum(len(b.choices) for b in table.blocks)
    assert descendants == sum(len(c) for c in summary["choices"].values())
    # Measured where it matters: the frontier holds the original, the joint stage's anchor
    # and what the profile and the re-ranking measured; what each grid budget serves is what
    # the table says it is told, with its standard error and source.
    from profiling.serving import standard_error, told

    frontier = table.measured_by_selection()
    original = tuple(["0.0"] * len(table.blocks))
    (anchor,) = even_selections(table, [0.6])
    assert frontier[original].kind == "original" and frontier[tuple(anchor)].kind == "anchor"
    # Half the validation split ranks (n), the other half, which chose nothing, tells.
    val_size = clean_run.config["data"]["val_size"]
    assert all(m.n == val_size // 2 and m.held_out_n == val_size - val_size // 2 for m in frontier.values())
    assert table.settings["held_out_size"] == val_size - val_size // 2
    assert table.prediction_error is not None and table.prediction_error.sd >= 0
    assert [v["fraction"] for v in table.verified] == [0.25, 0.5, 0.75]
    for v in table.verified:
        t = told(table, v["selection"])
        assert v["told"] == t.to_dict() and t.se > 0
        if t.source == "measured":
            m = frontier[tuple(v["selection"])]
            assert (t.accuracy, t.n) == (m.held_out_accuracy, m.held_out_n)
            assert t.se == standard_error(t.accuracy, m.held_out_n)
        assert table.predicted_latency(v["selection"]) <= v["budget"]["latency_ms"] * (1 + 1e-9)
    # The summary's points are the grid and the full budget; every one says what it was told.
    assert [round(p["fraction"], 4) for p in summary["points"]] == [0.25, 0.5, 0.75, 1.0]
    assert all(p["told"]["source"] in ("measured", "predicted") for p in summary["points"])
    # The table stage timed whole compositions on the host that timed the blocks.
    fit = table.latency_calibration
    assert fit is not None and fit["fingerprint"] in table.fingerprints and fit["k"] >= 3
    assert summary["bundle_uri"].startswith("file://")
    bundle = Path(summary["bundle_uri"][len("file://"):])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert (bundle / "manifest.sig").is_file() and manifest["model_id"] == "resnet20"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", clean_run.tracking_uri)
    parent = mlflow.search_runs(experiment_names=["e2e"], filter_string="tags.`legodnn.kind` = 'pipeline'")
    assert list(parent["run_id"]) == [summary["parent_run_id"]]
    assert parent.iloc[0]["status"] == "FINISHED"
    assert parent.iloc[0]["params.code_version"].startswith("pinned:test-")
    assert parent.iloc[0]["metrics.teacher_val_accuracy"] == pytest.approx(summary["teacher"]["val_accuracy"])
    children = mlflow.search_runs(experiment_names=["e2e"], filter_string="tags.`legodnn.kind` = 'variant'")
    assert len(children) == descendants
    assert set(children["tags.mlflow.parentRunId"]) == {summary["parent_run_id"]}
    pairs = {(r["tags.legodnn.block"], r["tags.legodnn.sparsity"]) for _, r in children.iterrows()}
    assert pairs == {(b.name, c) for b in table.blocks for c in b.choices}
    assert set(children["tags.legodnn.model"]) == {"resnet20"}
    some = children[children["tags.legodnn.sparsity"] == "0.4"].iloc[0]
    assert some["metrics.flops"] > 0 and some["metrics.retrain_loss_after"] >= 0
    client = mlflow.MlflowClient()
    artifacts = [a.path for a in client.list_artifacts(some["run_id"])]
    assert artifacts == ["0.4.safetensors"]
    parent_artifacts = {a.path for a in client.list_artifacts(summary["parent_run_id"])}
    assert {"profile.json", "pareto.png", "points.json", "bundle"} <= parent_artifacts
    # The summary says how to open the UI: for a tracking server, the server itself.
    assert summary["ui_command"] == f"open {clean_run.tracking_uri} in a browser (the tracking server is the UI)"


def test_second_run_does_no_work_and_says_so(clean_run, pipeline_env, mlflow_server, pl) -> None:
    env = {**pipeline_env, "MLFLOW_TRACKING_URI": mlflow_server}
    proc = pl.run_cli(["run", "--config", str(clean_run.config_path), "--experiment", "e2e"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to do, every unit was already done" in proc.stdout
    assert "0 executed" in proc.stdout
    summary = json.loads((clean_run.workdir / "last_run.json").read_text())
    assert summary["executed"] == 0
    assert summary["skipped"] == clean_run.summary["executed"] + clean_run.summary["skipped"]
    assert summary["table_path"] == clean_run.summary["table_path"]


def test_retrain_worker_killed_is_retried_and_outputs_match_a_clean_run(clean_run, pipeline_env, pl, tmp_path) -> None:
    work = pl.copy_workdir(clean_run.workdir, tmp_path / "work", drop_stages=("retrain",))
    cfg = {**clean_run.config, "workdir": str(work)}
    config = pl.write_config(tmp_path / "c.yaml", cfg)
    marker = tmp_path / "retrain-died-once"
    env = {**pipeline_env, "LEGODNN_TEST_FAIL_ONCE": str(marker)}
    summary = pl.summary_of(pl.run_cli(["run", "--config", str(config), "--json", "--no-publish"], env))
    assert marker.exists(), "the test hook never killed a retrain attempt"
    assert summary["tracking_uri"] == f"sqlite:///{work.resolve()}/mlflow.db"  # the default store
    assert f"mlflow ui --backend-store-uri sqlite:///{work.resolve()}/mlflow.db --host 127.0.0.1" in summary["ui_command"]
    counts = summary["counts"]
    assert counts["retrain"]["executed"] == len(clean_run.summary["units"]["retrain"])
    clean = {u["unit"]: u["outputs"] for u in clean_run.summary["units"]["retrain"]}
    again = {u["unit"]: u["outputs"] for u in summary["units"]["retrain"]}
    assert again == clean  # same files, same SHA-256
    # Identical outputs give identical downstream keys: nothing after retrain re-ran.
    for stage in ("assemble", "joint", "cost", "accuracy", "table", "points"):
        assert counts[stage]["executed"] == 0, (stage, counts[stage])


def test_killed_driver_restarts_without_recomputing_finished_units(clean_run, pipeline_env, pl, tmp_path) -> None:
    later = ("cost", "accuracy", "table", "points", "publish")
    work = pl.copy_workdir(clean_run.workdir, tmp_path / "work", drop_stages=later)
    config = pl.write_config(tmp_path / "c.yaml", {**clean_run.config, "workdir": str(work)})
    cost_units = len(clean_run.summary["units"]["cost"])
    proc = subprocess.Popen([pl.LEGODNN, "run", "--config", str(config), "--no-publish", "--quiet"],
                            env=pipeline_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=pl.REPO)
    try:
        deadline = time.time() + 300
        while len(list((work / "cache" / "cost").glob("*/done.json"))) < cost_units:
            assert proc.poll() is None, "the driver ended before the cost stage was done"
            if time.time() > deadline:  # a hang guard, not a speed target
                pytest.fail("the driver never finished the cost stage")
            time.sleep(0.1)
    finally:
        pl.stop_tree(proc.pid, sig=9)  # SIGKILL: no cleanup in the driver
        proc.wait()
    assert not (work / "last_run.json").exists()  # it really died before the end
    summary = pl.summary_of(pl.run_cli(["run", "--config", str(config), "--json", "--no-publish"], pipeline_env))
    counts = summary["counts"]
    for stage in ("teacher", "detect", "descend", "blockio", "retrain", "assemble", "joint", "cost"):
        assert counts[stage]["executed"] == 0, (stage, counts[stage])
    assert counts["cost"]["skipped"] == cost_units
    assert counts["table"]["executed"] == 1 and counts["points"]["executed"] == 1


def _closed_port(pl) -> int:
    return pl.free_port()


@pytest.mark.parametrize(
    "case", ["bad-config", "missing-checkpoint", "wrong-checkpoint", "bad-model", "ray-unreachable", "mlflow-unreachable"]
)
def test_bad_input_fails_before_anything_is_written(case, tmp_path, fmnist_dir, pl, monkeypatch, capsys) -> None:
    from pipelines.cli import main

    work = tmp_path / "work"
    cfg = pl.tiny_config(fmnist_dir, work)
    expected = {
        "bad-config": "retrain.lr: expected a number, got 'fast'",
        "missing-checkpoint": "does not exist",
        "wrong-checkpoint": "does not match the model",
        "bad-model": "unknown model reference 'resnet7'",
        "ray-unreachable": "unreachable",
        "mlflow-unreachable": "unreachable",
    }[case]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if case == "bad-config":
        cfg["retrain"]["lr"] = "fast"
    elif case == "missing-checkpoint":
        cfg["model"]["checkpoint"] = str(tmp_path / "no-such.pt")
    elif case == "wrong-checkpoint":
        import torch

        from legoblocks.zoo import build_zoo_model

        torch.save(build_zoo_model("resnet20", width=8).state_dict(), tmp_path / "w8.pt")  # not width 4
        cfg["model"]["checkpoint"] = str(tmp_path / "w8.pt")
    elif case == "bad-model":
        cfg["model"] = {"ref": "resnet7"}
    elif case == "ray-unreachable":
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port(pl)}")
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port(pl)}")
    config = pl.write_config(tmp_path / "c.yaml", cfg)
    code = main(["run", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and err.startswith("legodnn run: error:")
    assert not work.exists()


def test_run_help_explains_the_flags(pl) -> None:
    proc = subprocess.run([pl.LEGODNN, "run", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for flag in ("--config", "--workdir", "--data-dir", "--model", "--checkpoint", "--ray-address", "--no-publish",
                 "ray job submit"):
        assert flag in proc.stdout
