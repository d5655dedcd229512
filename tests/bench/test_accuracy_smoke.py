"""bench/accuracy.py end to end in its --quick setting: every method, every budget, both files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "accuracy.py"
METHODS = {"legodnn", "legodnn+bn", "legodnn-blockwise", "legodnn-blockwise+bn", "uniform", "scratch"}


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_help_exits_cleanly(capsys) -> None:
    bench = _load_bench()
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_quick_run_writes_every_method_and_budget(tmp_path: Path, fmnist_dir: Path) -> None:
    import torch

    bench = _load_bench()
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
    rerendered = tmp_path / "again.md"
    assert bench.main(["--render", str(out), "--md", str(rerendered)]) == 0
    assert "| legodnn |" in rerendered.read_text() and "## Methods" in rerendered.read_text()
    with pytest.raises(SystemExit):
        bench.main(["--budgets", "1.5", "--quick"])
