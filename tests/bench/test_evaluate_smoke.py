"""bench/evaluate.py end to end in its --quick setting: every figure, the merged JSON, the
Markdown, the PNGs and the MLflow run (a real sqlite store in tmp_path). The recipe and the
baselines are the library's, so a second invocation trains nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIGURES = {"accuracy", "latency", "options", "switching", "additivity"}


def test_help_lists_every_figure(bench_script, capsys) -> None:
    bench = bench_script("evaluate")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in [*FIGURES, "all", "--quick", "--no-mlflow", "--set"])


def test_quick_all_writes_every_figure_and_logs_to_mlflow(bench_script, tmp_path: Path, fmnist_dir: Path) -> None:
    from mlflow.tracking import MlflowClient

    bench = bench_script("evaluate")
    out, md, figs = tmp_path / "evaluation.json", tmp_path / "evaluation.md", tmp_path / "figures"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--quick", "--models", "resnet20", "--data-dir", str(fmnist_dir), "--workdir", str(tmp_path / "work"),
              "--out", str(out), "--md", str(md), "--figures-dir", str(figs)]

    assert bench.main(["all", *common, "--tracking-uri", uri]) == 0

    figures = {name: per_model["resnet20"] for name, per_model in json.loads(out.read_text())["figures"].items()}
    assert set(figures) == FIGURES
    for name, res in figures.items():
        assert "--quick" in res["command"] and Path(res["png"]).stat().st_size > 1000, name
        assert res["config"]["joint"]["steps"] == 2  # the quick recipe, recorded with every figure

    accuracy = figures["accuracy"]
    served = json.loads((tmp_path / "served.json").read_text())["rows"]  # beside --out, never in the repo's docs
    assert [r["budget"] for r in served] == accuracy["budgets"] and all(r["check_n"] > 0 for r in served)
    assert {r["method"] for r in accuracy["rows"]} == {"legodnn", "uniform", "scratch"}
    assert len(accuracy["budgets"]) == 3 and accuracy["budgets"][-1] == 1.0
    for r in accuracy["rows"]:
        assert 0.0 <= r["test_acc"] <= 100.0
        assert 0.0 < r["flops_frac"] <= r["budget"] + 1e-3, f"over budget: {r}"
    # each baseline row carries LegoDNN's paired difference on the same test images: the model
    # file the baseline saved, measured again, reads what the baseline reported
    lego = {r["budget"]: r["test_acc"] for r in accuracy["rows"] if r["method"] == "legodnn"}
    for r in (r for r in accuracy["rows"] if r["method"] != "legodnn"):
        assert r["legodnn_minus"] == pytest.approx(lego[r["budget"]] - r["test_acc"], abs=0.011)
        assert r["paired_se"] >= 0
    gap = accuracy["gaps"]["uniform"]
    assert gap["min"] == min(r["legodnn_minus"] for r in accuracy["rows"] if r["method"] == "uniform")
    assert all(b in accuracy["budgets"] for b in gap["below_2se"]) and gap["mean_se"] >= 0
    assert gap["min"] <= gap["mean"] <= gap["max"]
    # the best trained composition per budget (chosen by the test set): within the budget, never
    # worse as the budget grows (what fits only grows), at 100% at least the original
    best = {r["budget"]: r for r in accuracy["best_trained"]}
    assert sorted(best) == accuracy["budgets"]
    assert all(r["flops_frac"] <= r["budget"] + 1e-3 for r in best.values())
    tests = [best[b]["test_acc"] for b in accuracy["budgets"]]
    assert tests == sorted(tests) and tests[-1] >= accuracy["teacher_test_acc"]
    for r in (r for r in accuracy["rows"] if r["method"] != "legodnn"):
        assert r["best_trained_minus"] == pytest.approx(best[r["budget"]]["test_acc"] - r["test_acc"], abs=0.011)
    assert gap["best_trained_min"] == min(r["best_trained_minus"] for r in accuracy["rows"] if r["method"] == "uniform")
    # the joint stage's floor is the smallest budget served; the baselines got LegoDNN's time
    assert accuracy["joint_floor"] == accuracy["budgets"][0] and accuracy["config"]["joint"]["sandwich_floor"]
    assert accuracy["lego_time_s"] > 0 and accuracy["baseline_share_s"] > 0
    assert 0 < accuracy["lego_training_s"] < accuracy["lego_time_s"] and accuracy["baseline_time"] == "pipeline"

    latency = figures["latency"]
    lego = [r for r in latency["rows"] if r["method"] == "legodnn"]
    assert len(lego) == 3 and all(r["latency_ms"] > 0 for r in lego)
    # a pick that timed over its budget was re-solved under a tightened one (optimizer.solve_measured)
    assert all((r["guard_rounds"] >= 1) == (r["first_pick_ms"] > r["budget_ms"]) for r in lego)

    assert figures["options"]["num_options"] > 1 and figures["options"]["curve"]
    switching = figures["switching"]
    assert switching["n_changes"] == 5 and 0 < switching["bytes_ratio"] <= 1.0
    assert {run["penalty_points_per_mib"] for run in switching["penalties"]} == {0.0, 0.25, 1.0}
    additivity = figures["additivity"]
    assert additivity["n"] == 6 and additivity["max_calibrated"] >= additivity["mae_calibrated"] >= 0

    assert "## Verdicts" in md.read_text() and "eval-switching-resnet20.png" in md.read_text()
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("legodnn-evaluation").experiment_id])
    logged = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "figures")}
    assert logged == {f"eval-{name}-resnet20.png" for name in FIGURES}

    # One figure again: every unit comes from the recipe's cache; it merges into the JSON and
    # hand-written notes survive, and the served file keeps another model's rows.
    md.write_text(md.read_text() + "\nkept by hand\n")
    served_file = json.loads((tmp_path / "served.json").read_text())
    other = {**served[0], "model": "othernet"}
    served_file["rows"].append(other)
    served_file["runs"]["othernet"] = {"command": "elsewhere"}
    (tmp_path / "served.json").write_text(json.dumps(served_file))
    units = sorted((tmp_path / "work").rglob("done.json"))
    assert bench.main(["accuracy", *common, "--no-mlflow"]) == 0
    assert sorted((tmp_path / "work").rglob("done.json")) == units
    again = json.loads(out.read_text())["figures"]
    assert set(again) == FIGURES and again["accuracy"]["resnet20"]["rows"] == accuracy["rows"]
    assert md.read_text().count("kept by hand") == 1
    served_again = json.loads((tmp_path / "served.json").read_text())
    assert served_again["rows"] == [other, *served]  # this run's model replaced, the other kept
    assert served_again["runs"]["othernet"] == {"command": "elsewhere"}
    assert "accuracy" in served_again["runs"]["resnet20"]["command"]

    # --baselines uniform: only the uniform baseline is trained and reported (again from the cache;
    # --quick gives every baseline one second whatever --baseline-time says).
    assert bench.main(["accuracy", *common, "--no-mlflow", "--baselines", "uniform", "--baseline-time", "training"]) == 0
    assert sorted((tmp_path / "work").rglob("done.json")) == units
    uniform_only = json.loads(out.read_text())["figures"]["accuracy"]["resnet20"]
    assert {r["method"] for r in uniform_only["rows"]} == {"legodnn", "uniform"}
    assert uniform_only["baseline_time"] == "training" and "LegoDNN's training time" in md.read_text()
    assert bench.main(["accuracy", *common, "--no-mlflow", "--baselines"]) == 0  # none: LegoDNN's rows only
    assert {r["method"] for r in json.loads(out.read_text())["figures"]["accuracy"]["resnet20"]["rows"]} == {"legodnn"}
    assert "accuracy, resnet20: no baseline run" in md.read_text()


def test_unknown_baseline_is_refused() -> None:
    from pipelines.baselines import baseline_stages

    with pytest.raises(ValueError, match="unknown baseline.*'sketch'.*uniform, scratch"):
        baseline_stages([0.5, 1.0], {0.5: 1.0, 1.0: 1.0}, methods=["uniform", "sketch"])


def test_legodnn_time_counts_the_basis_stages_and_splits_over_pruned_budgets() -> None:
    from types import SimpleNamespace

    from pipelines.baselines import legodnn_seconds, time_shares

    def unit(seconds: float) -> SimpleNamespace:
        return SimpleNamespace(seconds=seconds, meta={})

    records = {"teacher": [unit(500.0)], "retrain": [unit(10.0), unit(20.0)], "joint": [unit(70.0)],
               "accuracy": [unit(300.0)], "table": [unit(100.0)], "uniform": [unit(999.0)]}
    assert legodnn_seconds(records, "training") == 100.0  # teacher and baselines never count
    assert legodnn_seconds(records) == legodnn_seconds(records, "pipeline") == 500.0
    assert time_shares([0.2, 0.6, 1.0], 500.0) == {0.2: 250.0, 0.6: 250.0, 1.0: 250.0}
    with pytest.raises(ValueError, match="unknown time basis 'gpu'.*training, pipeline"):
        legodnn_seconds(records, "gpu")
    # A joint stage resumed from its checkpoint: its last run took 30 s, its training 70 s in all.
    records["joint"] = [SimpleNamespace(seconds=30.0, meta={"train_seconds": 70.0, "resumed_from_step": 300})]
    assert legodnn_seconds(records, "training") == 100.0
