"""bench/optimizer.py in its --quick setting: it runs, every optimum agrees with PuLP/CBC's,
and the table it writes has a row per shape. Timings are the benchmark's business, not
asserted here."""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from optimizer.problem import synthetic_problem

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "optimizer.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_optimizer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(text: str) -> dict[str, list[str]]:
    """The table's data rows by shape ("1 x 3 x 3"), as stripped cells."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and " x " in cells[0] and cells[1].isdigit():
            rows[cells[0]] = cells
    return rows


def test_quick_run_agrees_with_pulp_on_every_instance(bench: ModuleType, tmp_path: Path, capsys) -> None:
    out = tmp_path / "table.md"

    code = bench.main(["--quick", "--out", str(out)])

    assert code == 0  # the script exits 1 on any objective mismatch
    text = out.read_text()
    assert "command: `bench/optimizer.py --quick" in text and "machine:" in text
    rows = _rows(text)
    quick = bench.QUICK
    levels = len(quick["tightness"].split(","))
    assert set(rows) == {s.replace("x", " x ") for s in quick["shapes"].split(",")}
    for shape, cells in rows.items():
        assert int(cells[1]) == levels * quick["instances"], shape  # every instance was solved
        assert cells[10] == "0", f"{shape}: objectives differ from PuLP/CBC's"
        assert cells[6].endswith("x") and float(cells[6][:-1]) >= 0, shape  # a ratio against PuLP
    assert text.strip() in capsys.readouterr().out


def test_benchmark_instances_look_like_profile_tables() -> None:
    raw = synthetic_problem(random.Random(0), 2, 8, 6, 0.3)
    assert [m["name"] for m in raw["models"]] == ["m0", "m1"]
    for model in raw["models"]:
        assert len(model["blocks"]) == 8
        for block in model["blocks"]:
            drops = [c["accuracy_drop"] for c in block["choices"]]
            memory = [c["memory_bytes"] for c in block["choices"]]
            assert len(drops) == 6 and drops[0] == 0.0 and drops[-1] >= drops[1]
            assert memory == sorted(memory, reverse=True)
    every = [b for m in raw["models"] for b in m["blocks"]]
    smallest = sum(min(c["latency_ms"] for c in b["choices"]) for b in every)
    largest = sum(max(c["latency_ms"] for c in b["choices"]) for b in every)
    assert raw["budgets"]["latency_ms"] == pytest.approx(smallest + 0.3 * (largest - smallest))


def test_runs_as_a_script(bench: ModuleType, tmp_path: Path) -> None:
    # As a script, bench/ comes first on sys.path; the script must still find the package.
    out = tmp_path / "table.md"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-pulp", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = _rows(out.read_text())
    assert set(rows) == {s.replace("x", " x ") for s in bench.QUICK["shapes"].split(",")}  # a degenerate "z" one too
    assert all(cells[6] == "-" for cells in rows.values())  # PuLP was not run
