"""`legodnn profile` and `legodnn table show/check` on a saved scalable model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from legoblocks.compose import ScalableModel
from pipelines.cli import main
from profiling.table import load


@pytest.fixture(scope="module")
def profiled(scalable: ScalableModel, fmnist_dir: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    scalable.save(root / "scalable")
    out = root / "table.json"
    code = main([
        "profile", "--scalable", str(root / "scalable"), "--data-dir", str(fmnist_dir),
        "--val-size", "200", "--out", str(out), "--envs", "original,largest",
        "--additivity-n", "3", "--calibration-k", "3", "--latency-repeats", "2",
        "--latency-warmup", "0", "--model-name", "tiny", "--no-progress",
    ])
    assert code == 0
    return out


def test_profile_writes_a_valid_table(profiled: Path, scalable: ScalableModel) -> None:
    table = load(profiled)
    assert table.model_name == "tiny" and table.model_ref == "resnet8"
    assert table.block_names == scalable.block_names
    assert table.settings["data"] == {**table.settings["data"], "source": "fashion-mnist", "val_size": 200}
    # Half the validation images choose (drops, ranking), half tell (the frontier's told values).
    assert table.settings["val_size"] == 100 and table.settings["held_out_size"] == 100
    assert table.measured and all(m.n == 100 and m.held_out_n == 100 for m in table.measured)
    assert [e["name"] for e in table.environments] == ["original", "largest"]
    assert table.additivity["n"] == 3 and table.calibration["k"] == 3


def test_table_show_prints_blocks_and_figures(profiled: Path, capsys) -> None:
    assert main(["table", "show", str(profiled)]) == 0
    out = capsys.readouterr().out
    table = load(profiled)
    for name in table.block_names:
        assert name in out
    assert f"teacher accuracy {100 * table.teacher_accuracy:.2f}%" in out
    assert "additivity" in out and "calibration" in out
    assert main(["table", "show", "--json", str(profiled)]) == 0
    assert json.loads(capsys.readouterr().out)["model_name"] == "tiny"


def test_bad_table_exits_2_with_the_field(profiled: Path, tmp_path: Path, capsys) -> None:
    data = json.loads(profiled.read_text())
    data["schema_version"] = 1
    bad = tmp_path / "old.json"
    bad.write_text(json.dumps(data))
    assert main(["table", "show", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "schema_version" in err and "version 1" in err


def test_console_script_check(profiled: Path, tmp_path: Path) -> None:
    legodnn = Path(sys.executable).with_name("legodnn")
    ok = subprocess.run([str(legodnn), "table", "check", str(profiled)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    data = json.loads(profiled.read_text())
    data["blocks"][1]["choices"]["0.0"]["flops"] = None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    res = subprocess.run([str(legodnn), "table", "check", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2
    assert "blocks[1].choices['0.0'].flops: expected an integer, got null" in res.stderr


def test_profile_reports_bad_input(tmp_path: Path, fmnist_dir: Path, capsys) -> None:
    code = main(["profile", "--scalable", str(tmp_path / "absent"), "--data-dir", str(fmnist_dir),
                 "--out", str(tmp_path / "t.json"), "--no-progress"])
    assert code == 2
    assert "absent" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()
    # A held-out fraction that leaves nothing to choose with is refused before anything is loaded.
    with pytest.raises(SystemExit) as exc:
        main(["profile", "--scalable", str(tmp_path / "absent"), "--out", str(tmp_path / "t.json"),
              "--held-out-fraction", "1"])
    assert exc.value.code == 2
    assert "--held-out-fraction: expected a fraction in [0, 1), got 1.0" in capsys.readouterr().err
