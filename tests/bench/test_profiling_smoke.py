"""bench/profiling.py in its --quick setting: the whole profile runs on real Fashion-MNIST,
writes a ProfileTable that loads and a report whose additivity error is a real number, and a
rerun reuses the trained descendants and keeps hand-written notes. The numbers themselves
mean nothing at this size and are not checked against targets."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "profiling.py"


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_profiling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_a_loadable_table_and_a_finite_mae(tmp_path: Path, fmnist_dir: Path, capsys) -> None:
    import torch

    from profiling.table import load

    bench = _load_bench()
    out, table_file = tmp_path / "profiling.md", tmp_path / "table.json"
    argv = ["--quick", "--data-dir", str(fmnist_dir), "--workdir", str(tmp_path / "work"),
            "--out", str(out), "--table", str(table_file)]
    threads = torch.get_num_threads()

    assert bench.main(argv) == 0

    assert torch.get_num_threads() == threads, "the benchmark leaked its thread setting"
    table = load(table_file)
    assert len(table.blocks) == 11  # ResNet-20: stem, nine residual blocks, head
    assert 0.0 <= table.teacher_accuracy <= 1.0
    mae = table.additivity["mae"]
    assert math.isfinite(mae) and mae >= 0.0
    assert table.additivity["n"] == bench.QUICK["additivity_n"]
    held = table.calibration["heldout_calibrated"]
    assert math.isfinite(held["mae"]) and held["mae"] >= 0.0
    text = out.read_text()
    assert "- command: `python bench/profiling.py --quick" in text
    assert f"| BN as trained | raw drops | {bench.QUICK['additivity_n']} random | {bench.pts(mae)} |" in text
    assert text.count("| BN as trained | 25% |") == 1 and "## Latency" in text
    assert text.endswith(bench.NOTES_MARKER)

    out.write_text(text + "\nkept by hand\n")
    capsys.readouterr()
    assert bench.main(argv) == 0  # a rerun: the trained descendants come from the workdir
    assert "loading retrained descendants from" in capsys.readouterr().out
    again = out.read_text()
    assert again.count("kept by hand") == 1 and again.count(bench.NOTES_MARKER) == 1


def test_quick_overrides_the_size_options() -> None:
    bench = _load_bench()
    args = bench.parse_args(["--quick", "--train-size", "60000", "--out", "x.md"])
    assert args.train_size == bench.QUICK["train_size"] and args.out == Path("x.md")
    with pytest.raises(SystemExit):
        bench.parse_args(["--no-such-option"])
