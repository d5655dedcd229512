"""bench/evaluate.py end to end in its --quick setting: every figure, the merged JSON, the
Markdown, the PNGs and the MLflow run (a real sqlite store in tmp_path)."""

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
    assert all(name in text for name in [*FIGURES, "all", "--quick", "--no-mlflow", "--joint"])


def test_quick_all_writes_every_figure_and_logs_to_mlflow(bench_script, tmp_path: Path, fmnist_dir: Path) -> None:
    import torch
    from mlflow.tracking import MlflowClient

    bench = bench_script("evaluate")
    out, md, figs = tmp_path / "evaluation.json", tmp_path / "evaluation.md", tmp_path / "figures"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--quick", "--models", "resnet20", "--no-progress", "--data-dir", str(fmnist_dir),
              "--workdir", str(tmp_path / "work"), "--out", str(out), "--md", str(md), "--figures-dir", str(figs)]
    threads = torch.get_num_threads()

    assert bench.main(["all", *common, "--tracking-uri", uri]) == 0

    assert torch.get_num_threads() == threads, "the benchmark leaked its thread setting"
    result = json.loads(out.read_text())
    assert {"machine", "command", "seed", "settings", "figures"} <= result.keys()
    assert set(result["figures"]) == FIGURES
    assert result["settings"]["bench"]["joint_effective"]["resnet20"]["steps"] == 2  # quick's joint override
    figures = {name: per_model["resnet20"] for name, per_model in result["figures"].items()}
    for name, res in figures.items():
        assert res["wall_s"] >= 0 and "--quick" in res["command"], name
        png = Path(res["png"])
        assert png.is_file() and png.stat().st_size > 1000, f"{name}: {png} missing or empty"

    accuracy = figures["accuracy"]
    assert {r["method"] for r in accuracy["rows"]} == {"legodnn", "uniform", "scratch"}
    assert len(accuracy["budgets"]) == 3 and accuracy["budgets"][-1] == 1.0
    for r in accuracy["rows"]:
        assert 0.0 <= r["test_acc"] <= 100.0
        assert 0.0 < r["flops_frac"] <= r["budget"] + 1e-3, f"over budget: {r}"
    assert accuracy["lego_time_s"]["total"] > 0 and accuracy["baseline_share_s"] > 0
    # the joint stage's floor is the smallest budget served, not the accuracy bench's 25%
    assert accuracy["joint_floor"] == accuracy["budgets"][0] < 0.25
    assert result["settings"]["bench"]["joint_effective"]["resnet20"]["sandwich_floor"] == accuracy["budgets"][0]

    latency = figures["latency"]
    lego = [r for r in latency["rows"] if r["method"] == "legodnn"]
    assert len(lego) == 3 and all(r["latency_ms"] > 0 and 0 <= r["test_acc"] <= 100 for r in lego)
    # every reported latency is the fastest of its round-robin passes
    for r in latency["rows"]:
        assert len(r["latency_passes_ms"]) == 3 and r["latency_ms"] == min(r["latency_passes_ms"])
    assert latency["teacher_latency_ms"] == min(latency["teacher_latency_passes_ms"])
    # a pick that timed over its budget was re-solved under a tightened one (optimizer.solve_measured)
    assert all((r["guard_rounds"] >= 1) == (r["first_pick_ms"] > r["budget_ms"]) for r in lego)
    assert {r["method"] for r in latency["rows"]} == {"legodnn", "uniform", "scratch"}

    options = figures["options"]
    assert options["num_options"] > 1 and options["lego_train_s"] > 0 and options["curve"]
    assert options["ratio"] is None or options["ratio"] > 0

    switching = figures["switching"]
    assert switching["n_changes"] == 5 and len(switching["steps"]) == 5
    assert 0 < switching["total_full_bytes"] and 0 <= switching["total_block_bytes"] <= switching["total_full_bytes"]
    assert 0 < switching["bytes_ratio"] <= 1.0
    penalties = {run["penalty_points_per_mib"]: run for run in switching["penalties"]}
    assert set(penalties) == {0.0, 0.25, 1.0}
    assert penalties[0.0]["bytes_ratio"] == switching["bytes_ratio"]
    for run in penalties.values():  # the same budget sequence, so the reload side is comparable
        assert run["n_changes"] == 5 and 0 < run["total_full_bytes"]
        assert run["mean_predicted_cost_points"] >= -1e-9  # a penalty can only give accuracy up

    additivity = figures["additivity"]
    assert additivity["n"] == 6 and additivity["mae_raw"] >= 0 and additivity["max_calibrated"] >= additivity["mae_calibrated"]
    assert all(0 <= p["measured"] <= 100 for p in additivity["points"])

    text = md.read_text()
    assert "## Verdicts" in text and "eval-switching-resnet20.png" in text and bench.acc.NOTES_MARKER in text

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("legodnn-evaluation")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    logged = {Path(a.path).name for a in client.list_artifacts(runs[0].info.run_id, "figures")}
    assert logged == {f"eval-{name}-resnet20.png" for name in FIGURES}
    assert "resnet20.switching.bytes_ratio" in runs[0].data.metrics

    # One figure again: it comes from the caches and merges into the JSON; hand notes survive.
    md.write_text(md.read_text() + "\nkept by hand\n")
    before = figures["accuracy"]
    assert bench.main(["switching", *common, "--no-mlflow"]) == 0
    again = json.loads(out.read_text())
    assert set(again["figures"]) == FIGURES and again["figures"]["accuracy"]["resnet20"] == before
    assert again["figures"]["switching"]["resnet20"]["command"].startswith("bench/evaluate.py switching")
    assert md.read_text().count("kept by hand") == 1

    # Another LegoDNN run (another joint stage) reuses the baselines when they had at least its
    # time share; quick caps every share at 1 s, so they always had.
    work = tmp_path / "work"
    assert bench.main(["accuracy", *common, "--no-mlflow", "--joint", "lr=0.002"]) == 0
    roots = sorted(work.glob("baselines-resnet20-*"))
    assert len(roots) == 1
    cached = json.loads((roots[0] / "baselines.json").read_text())
    assert len(cached["served"]) == 2
    other = json.loads(out.read_text())["figures"]["accuracy"]["resnet20"]
    assert other["lego_time_s"] != before["lego_time_s"] or other["rows"] != before["rows"]
    assert [r for r in other["rows"] if r["method"] != "legodnn"] == [
        r for r in before["rows"] if r["method"] != "legodnn"]
    # ... and never when they had less than this run's share.
    cached["share_s"] = 0.5
    (roots[0] / "baselines.json").write_text(json.dumps(cached))
    assert bench.main(["accuracy", *common, "--no-mlflow", "--joint", "lr=0.003"]) == 0
    assert len(list(work.glob("baselines-resnet20-*"))) == 2
    # An explicit floor wins over the derived one.
    assert bench.main(["accuracy", *common, "--no-mlflow", "--joint", "sandwich_floor=0.5"]) == 0
    assert json.loads(out.read_text())["figures"]["accuracy"]["resnet20"]["joint_floor"] == 0.5
