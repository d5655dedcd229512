"""`legodnn solve` (pipelines/commands/solve.py) through the real CLI entry point."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

from pipelines.cli import main


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "problem.json"
    path.write_text(json.dumps(raw))
    return path


def test_summary_lists_every_model(gen, tmp_path, capsys):
    raw = gen.realistic(random.Random(0), 2, 8, 6, 0.4)
    assert main(["solve", str(_write(tmp_path, raw)), "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("feasible   yes")
    for model in raw["models"]:
        assert f"{model['name']}: accuracy" in out
        assert f"{model['blocks'][0]['name']}=" in out
    assert "#2: objective" in out and "#3: objective" in out


def test_json_output_matches_the_library(gen, tmp_path, capsys):
    from optimizer import parse_problem, solve

    raw = gen.random(random.Random(2), 2, 4, 3, deadlines=True, tightness=0.6)
    assert main(["solve", str(_write(tmp_path, raw)), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = solve(parse_problem(raw)).as_dict()
    assert printed["selection"] == expected["selection"]
    assert printed["objective"] == expected["objective"]


def test_invalid_problem_exits_2_with_the_path(gen, tmp_path, capsys):
    raw = gen.random(random.Random(1), 1, 2, 2)
    raw["models"][0]["blocks"][1]["choices"][0]["latency_ms"] = -1
    assert main(["solve", str(_write(tmp_path, raw))]) == 2
    err = capsys.readouterr().err
    assert "models[0].blocks[1].choices[0].latency_ms: expected a finite number >= 0" in err
    assert main(["solve", str(tmp_path / "nope.json")]) == 2
    assert "cannot read problem file" in capsys.readouterr().err


def test_infeasible_exits_1_and_says_how_far_off(gen, tmp_path, capsys, monkeypatch):
    raw = gen.random(random.Random(3), 1, 3, 2)
    raw["budgets"] = {"memory_bytes": 1}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(raw)))
    assert main(["solve", "-"]) == 1
    out = capsys.readouterr().out
    assert "feasible   no" in out and "memory budget 1 B is below the smallest achievable" in out


def test_console_script_runs_without_ray(gen, tmp_path):
    raw = gen.random(random.Random(4), 1, 3, 3)
    path = _write(tmp_path, raw)
    code = (
        "import sys; from pipelines.cli import main; rc = main(['solve', sys.argv[1], '--json']); "
        "assert 'ray' not in sys.modules and 'torch' not in sys.modules, 'solve imported a heavy package'; "
        "raise SystemExit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["feasible"] is True
