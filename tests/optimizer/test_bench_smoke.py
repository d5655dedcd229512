"""bench/optimizer.py on a tiny setting: it runs, checks objectives against PuLP/CBC and
prints a markdown table. (Timings are not asserted: they belong to the benchmark.)"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "optimizer.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_optimizer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_agrees_with_pulp(bench, tmp_path, capsys):
    out = tmp_path / "table.md"
    rc = bench.main(["--shapes", "1x3x3,2x3x4", "--tightness", "0.2,0.7", "--instances", "1", "--repeats", "1", "--out", str(out)])
    assert rc == 0  # no objective mismatches
    text = out.read_text()
    assert "| 1 x 3 x 3 | 2 |" in text and "| 2 x 3 x 4 | 2 |" in text
    assert "machine:" in text and "command:" in text
    row = next(line for line in text.splitlines() if line.startswith("| 2 x 3 x 4"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[10] == "0"  # objective mismatches
    assert cells[6].endswith("x")  # a ratio against PuLP was measured
    assert text in capsys.readouterr().out + "\n"


def test_instances_look_like_profile_tables(bench):
    import random

    raw = bench.make_instance(random.Random(0), 2, 8, 6, 0.3)
    for model in raw["models"]:
        for block in model["blocks"]:
            drops = [c["accuracy_drop"] for c in block["choices"]]
            memory = [c["memory_bytes"] for c in block["choices"]]
            assert drops[0] == 0.0 and memory == sorted(memory, reverse=True)
            assert drops[-1] >= drops[1]


def test_script_help_runs_from_the_command_line():
    # As a script, bench/ comes first on sys.path; the script must still find the package.
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "PuLP" in result.stdout and "--shapes" in result.stdout
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--shapes", "1x2x2", "--instances", "1", "--repeats", "1", "--no-pulp", "--tightness", "0.5"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "| 1 x 2 x 2 | 1 |" in result.stdout
