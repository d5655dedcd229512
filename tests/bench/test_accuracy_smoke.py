"""bench/accuracy.py end to end in its --quick setting: every method, every budget, both files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

METHODS = {"legodnn", "legodnn+bn", "legodnn-blockwise", "legodnn-blockwise+bn", "uniform", "scratch"}


def test_help_exits_cleanly(bench_script, capsys) -> None:
    bench = bench_script("accuracy")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_quick_run_writes_every_method_and_budget(bench_script, tmp_path: Path, fmnist_dir: Path) -> None:
    import torch

    bench = bench_script("accuracy")
    out, md = tmp_path / "accuracy.json", tmp_path / "accuracy.md"
    threads = torch.get_num_threads()

    code = bench.main(["--quick", "--no-progress", "--data-dir", str(fmnist_dir), "--workdir",
                       str(tmp_path / "work"), "--out", str(out), "--md", str(md)])

    assert code == 0
    assert torch.get_num_threads() == threads, "the benchmark leaked its thread setting"
    result = json.loads(out.read_text())
    assert {"machine", "command", "seed", "rows"} <= result.keys()
    assert result["seed"] == 0 and "--quick" in result["command"]
    rows = result["rows"]
    assert {(r["method"], r["budget"]) for r in rows} == {(m, b) for m in METHODS for b in (0.25, 0.5, 0.75)}
    for r in rows:
        assert r["model"] == "resnet20"
        assert 0.0 <= r["test_acc"] <= 100.0
        assert r["train_wall_s"] > 0
        assert 0.0 < r["flops_frac"] <= r["budget"] + 1e-9, f"{r['method']} over budget: {r}"
    lego = [r for r in rows if r["method"] == "legodnn"]
    assert all(len(r["selection"]) == result["models"]["resnet20"]["blocks"] for r in lego)
    text = md.read_text()
    assert "| legodnn |" in text and "| uniform |" in text and "## Verdicts" in text
    md.write_text(text + "\n## Analysis\nkept by hand\n")  # notes after the marker survive a re-render
    assert bench.main(["--render", str(out), "--md", str(md)]) == 0
    again = md.read_text()
    assert "| legodnn |" in again and "## Methods" in again
    assert again.count("kept by hand") == 1 and again.count(bench.NOTES_MARKER) == 1
    with pytest.raises(SystemExit):
        bench.main(["--budgets", "1.5", "--quick"])


def test_second_quick_run_loads_legodnn_from_cache(bench_script, tmp_path: Path, fmnist_dir: Path) -> None:
    bench = bench_script("accuracy")
    args = ["--quick", "--no-progress", "--data-dir", str(fmnist_dir), "--workdir", str(tmp_path / "work"),
            "--budgets", "0.5"]
    first, second = tmp_path / "first.json", tmp_path / "second.json"

    assert bench.main([*args, "--out", str(first), "--md", str(tmp_path / "first.md")]) == 0
    assert bench.main([*args, "--out", str(second), "--md", str(tmp_path / "second.md")]) == 0

    a, b = (json.loads(p.read_text())["models"]["resnet20"] for p in (first, second))
    assert not a["lego_cached"] and b["lego_cached"]
    assert a["lego_cache"] == b["lego_cache"] and b["timings"] == a["timings"]  # the original wall times
    assert len(list((tmp_path / "work").glob("lego-resnet20-*"))) == 1
    lego = {p: [r for r in json.loads(p.read_text())["rows"] if r["method"] == "legodnn"] for p in (first, second)}
    assert [r["selection"] for r in lego[first]] == [r["selection"] for r in lego[second]]
    assert [r["test_acc"] for r in lego[first]] == [r["test_acc"] for r in lego[second]]
    assert "loaded from the LegoRun cache" in (tmp_path / "second.md").read_text()


def test_joint_overrides_are_parsed_and_checked(bench_script, capsys) -> None:
    bench = bench_script("accuracy")
    parse = bench.build_parser().parse_args

    s = bench.settings_from(parse(["--joint", "steps=7", "--joint", "kd_weight=0.5", "--joint-lr", "0.003"]))
    cfg = bench.joint_config(s)
    assert (cfg.steps, cfg.kd_weight, cfg.lr, cfg.seed) == (7, 0.5, 0.003, s.seed)
    assert bench.settings_record(s)["joint_effective"]["steps"] == 7
    assert bench.joint_config(bench.settings_from(parse(["--quick", "--joint", "steps=5"]))).steps == 5

    with pytest.raises(SystemExit, match=r"unknown JointConfig field.*'bogus'.*valid fields: .*steps"):
        bench.settings_from(parse(["--joint", "bogus=1"]))
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        bench.settings_from(parse(["--joint", "steps"]))
    with pytest.raises(SystemExit, match="steps must be >= 0"):
        bench.settings_from(parse(["--joint", "steps=-1"]))


def test_per_model_overrides_keep_the_teacher_cache_names(bench_script) -> None:
    bench = bench_script("accuracy")
    s = bench.settings_from(bench.build_parser().parse_args(
        ["--models", "resnet20", "mobilenetv2", "--model-teacher-epochs", "mobilenetv2=4",
         "--model-kwargs", 'mobilenetv2={"width_mult": 0.5}']))
    work = Path("/w")
    assert bench.teacher_path("resnet20", s, 59000, work).name == "teacher-resnet20-default-n59000-e8-s0.pt"
    assert bench.teacher_path("mobilenetv2", s, 59000, work).name == "teacher-mobilenetv2-width_mult0.5-n59000-e4-s0.pt"
    with pytest.raises(SystemExit, match="JSON object"):
        bench.settings_from(bench.build_parser().parse_args(["--model-kwargs", "mobilenetv2=0.5"]))
    with pytest.raises(SystemExit, match="positive integer"):
        bench.settings_from(bench.build_parser().parse_args(["--model-teacher-epochs", "resnet20=x"]))


def test_joint_variants_share_the_per_block_stage_and_methods_can_be_chosen(
        bench_script, tmp_path: Path, fmnist_dir: Path) -> None:
    bench = bench_script("accuracy")
    work = tmp_path / "work"
    base = ["--quick", "--no-progress", "--data-dir", str(fmnist_dir), "--workdir", str(work),
            "--budgets", "0.5", "--methods", "legodnn"]
    runs = {}
    for tag, joint in (("a", []), ("b", ["--joint", "steps=3", "--joint", "anchor_budgets=[0.5]"]),
                       ("c", ["--joint-on-block-io"])):
        out = tmp_path / f"{tag}.json"
        assert bench.main([*base, *joint, "--out", str(out), "--md", str(tmp_path / f"{tag}.md")]) == 0
        runs[tag] = json.loads(out.read_text())
    # Three joint stages, one per-block stage: later runs report the first one's wall time.
    assert len(list(work.glob("lego-resnet20-*"))) == 3 and len(list(work.glob("blockwise-resnet20-*"))) == 1
    a, b, c = (runs[t]["models"]["resnet20"] for t in "abc")
    assert len({a["lego_cache"], b["lego_cache"], c["lego_cache"]}) == 3
    assert a["timings"]["blockwise_s"] == b["timings"]["blockwise_s"] == c["timings"]["blockwise_s"]
    for result in runs.values():
        assert {r["method"] for r in result["rows"]} == {"legodnn", "legodnn+bn"}
    # A joint stage on the per-block stage's samples redoes that stage's teacher pass when it
    # came from the cache (run c); trained in one go (run d) it reuses the pass: same weights.
    out = tmp_path / "d.json"
    fresh = [a if a != str(work) else str(tmp_path / "fresh") for a in base]
    assert bench.main([*fresh, "--joint-on-block-io", "--out", str(out), "--md", str(tmp_path / "d.md")]) == 0
    d = json.loads(out.read_text())
    assert d["models"]["resnet20"]["lego_cache"] == c["lego_cache"]
    assert [r["test_acc"] for r in d["rows"]] == [r["test_acc"] for r in runs["c"]["rows"]]
    with pytest.raises(SystemExit, match="scratch needs uniform"):
        bench.settings_from(bench.build_parser().parse_args(["--methods", "legodnn", "scratch"]))
    # The baselines alone train no LegoDNN (they can run beside a legodnn-only process).
    alone = tmp_path / "baselines"
    out = tmp_path / "u.json"
    args = [a if a != str(work) else str(alone) for a in base]
    args[args.index("legodnn")] = "uniform"
    assert bench.main([*args, "--out", str(out), "--md", str(tmp_path / "u.md")]) == 0
    assert {r["method"] for r in json.loads(out.read_text())["rows"]} == {"uniform"}
    assert not list(alone.glob("lego-*")) and not list(alone.glob("blockwise-*"))


def test_the_default_recipe_anchors_every_budget_and_floors_the_sandwich(bench_script) -> None:
    bench = bench_script("accuracy")
    parse = bench.build_parser().parse_args

    default = bench.joint_config(bench.settings_from(parse([])))
    assert (default.anchor_budgets, default.sandwich_floor) == ([0.5, 0.75], 0.25)
    assert (default.random_compositions, default.sandwich_smallest) == (0, True)
    two = bench.joint_config(bench.settings_from(parse(["--budgets", "0.6", "0.3"])))
    assert (two.anchor_budgets, two.sandwich_floor) == ([0.6], 0.3)
    one = bench.joint_config(bench.settings_from(parse(["--budgets", "0.4"])))
    assert (one.anchor_budgets, one.sandwich_floor) == ([0.4], None)
    # Session 4's recipe: the smallest composition as the floor again.
    assert bench.joint_config(bench.settings_from(parse(["--joint", "sandwich_floor=null"]))).sandwich_floor is None
    # The recipe before anchors, spelled out: --joint overrides the anchored defaults.
    old = bench.joint_config(bench.settings_from(parse(["--joint", "anchor_budgets=[]", "--joint",
                                                        "random_compositions=1", "--joint", "sandwich_floor=null"])))
    assert (old.anchor_budgets, old.random_compositions, old.sandwich_floor) == ([], 1, None)
    # Session 4's per-block stage: 15,000 pairs, 10% held out without a cap.
    s4 = bench.settings_from(parse(["--retrain-limit", "15000", "--retrain-val-limit", "none"]))
    assert (s4.retrain_limit, s4.retrain_val_limit) == (15000, None)
    with pytest.raises(SystemExit):
        parse(["--retrain-val-limit", "-3"])
