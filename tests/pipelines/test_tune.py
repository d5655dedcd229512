"""`legodnn tune`: Optuna trials as Ray tasks against sqlite storage, pruning, write-back."""

from __future__ import annotations

import json

import pytest
import yaml


def test_tune_runs_trials_on_ray_and_writes_the_best_back(clean_run, pl, tmp_path, pipeline_env, monkeypatch) -> None:
    import mlflow
    import optuna

    work = pl.copy_workdir(clean_run.workdir, tmp_path / "work")
    config = pl.write_config(tmp_path / "c.yaml", {**clean_run.config, "workdir": str(work)})
    target = tmp_path / "tuned.yaml"
    target.write_text("workdir: /somewhere\nretrain:\n  lr: 0.5\n  seed: 3\n")
    proc = pl.run_cli(["tune", "--config", str(config), "--trials", "3", "--parallel", "2",
                       "--write-back", str(target), "--json"], pipeline_env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert len(out["trials"]) == 3
    assert all(t["node_id"] for t in out["trials"] if t["state"] != "FAIL")  # each trial ran in a Ray task
    assert out["states"]["COMPLETE"] >= 1

    study = optuna.load_study(study_name=out["study"], storage=f"sqlite:///{work}/optuna.db")
    assert len(study.trials) == 3
    blocks = len(clean_run.summary["units"]["retrain"])
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert all(len(t.intermediate_values) == blocks for t in complete)  # one report per block
    assert study.best_value == pytest.approx(out["best_value"])

    written = yaml.safe_load(target.read_text())
    assert written["workdir"] == "/somewhere" and written["retrain"]["seed"] == 3  # other keys kept
    for key in ("lr", "epochs", "batch_size", "weight_decay"):
        assert written["retrain"][key] == study.best_params[key]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["legodnn"], filter_string="tags.`legodnn.kind` = 'trial'")
    assert len(runs) == 3 and set(runs["tags.mlflow.parentRunId"]) == {out["parent_run_id"]}


def test_a_trial_worse_than_the_median_is_pruned_after_its_first_block(clean_run, tmp_path) -> None:
    import optuna

    from legoblocks.retrain import RetrainConfig
    from pipelines.tune import run_trial

    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=storage,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    for _ in range(2):  # two earlier trials that were perfect at every block
        trial = study.ask()
        for step in range(3):
            trial.report(0.0, step)
        study.tell(trial, 0.0)
    cache = clean_run.workdir / "cache"
    retrain_units = clean_run.summary["units"]["retrain"]
    descend = {u["unit"]: u["key"] for u in clean_run.summary["units"]["descend"]}
    blockio = clean_run.summary["units"]["blockio"][0]["key"]
    blocks = [{"name": u["unit"], "descend_dir": str(cache / "descend" / descend[u["unit"]]),
               "blockio_file": str(cache / "blockio" / blockio / f"{u['unit']}.safetensors")}
              for u in retrain_units[:3]]
    trial = study.ask()
    out = run_trial(storage=storage, study_name="s", trial_id=trial._trial_id,
                    params={"lr": 1e-3, "epochs": 1, "batch_size": 64, "weight_decay": 0.0},
                    retrain=RetrainConfig(**{**clean_run.config["retrain"], "limit": None, "val_fraction": 0.1,
                                             "seed": 0, "lr": 1e-3, "weight_decay": 0.0}),
                    blocks=blocks)
    assert out["state"] == "PRUNED"
    assert list(out["block_losses"]) == [blocks[0]["name"]]  # stopped after the first block
    assert out["value"] > 0
