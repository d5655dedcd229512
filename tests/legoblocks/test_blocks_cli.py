"""`legodnn blocks`: the table, JSON, --verify, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from legoblocks.flops import count_flops
from legoblocks.modelref import load_model
from legoblocks.zoo import build_zoo_model
from pipelines.cli import main

MODELS = Path(__file__).with_name("models_for_tests.py")
REPO = Path(__file__).resolve().parents[2]


def test_table_lists_every_block(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["blocks", "resnet20", "--input-shape", "1,28,28"]) == 0
    out = capsys.readouterr().out
    assert "resnet20: 11 blocks for input 1x28x28" in out
    for name in ("stem", "layer1.0", "layer3.2", "head", "total"):
        assert name in out
    assert "8x28x28" in out and "32x7x7" in out  # the run's model: the default width 8


def test_no_model_shows_the_runs_model_and_set_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["blocks"]) == 0
    assert "resnet20: 11 blocks for input 1x28x28" in capsys.readouterr().out
    assert main(["blocks", "--set", "model.options.width=16"]) == 0
    assert "64x7x7" in capsys.readouterr().out
    assert main(["blocks", "--input-shape", "1,28,32"]) == 2
    assert "H == W" in capsys.readouterr().err


def test_json_with_target_blocks_and_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = build_zoo_model("vgg11", in_channels=3, num_classes=5, input_size=32)
    ckpt = tmp_path / "vgg.pt"
    torch.save(model.state_dict(), ckpt)
    rc = main(["blocks", "vgg11", "--input-shape", "3,32,32", "--num-classes", "5", "--checkpoint", str(ckpt),
               "--target-blocks", "4", "--json"])
    assert rc == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["input_shape"] == [3, 32, 32]
    assert [b["name"] for b in payload["blocks"]][0] == "stem" and len(payload["blocks"]) == 4
    assert payload["blocks"][-1]["out_shape"] == [5]
    assert sum(b["params"] for b in payload["blocks"]) == sum(p.numel() for p in model.parameters())


def test_verify_passes_on_a_user_model(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["blocks", f"{MODELS}:concat_net", "--input-shape", "1,28,28", "--verify", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)["verify"]
    assert report["ok"] and report["max_abs_diff"] < 1e-5
    assert report["descendants"] == {"cat1": ["0.0", "0.2", "0.4", "0.6", "0.8"],
                                     "cat2": ["0.0", "0.2", "0.4", "0.6", "0.8"]}
    flops = report["composition_flops"]
    model = load_model(f"{MODELS}:concat_net")
    assert flops["largest"] == count_flops(model, (1, 28, 28))
    assert 0 < flops["smallest"] < flops["largest"]
    assert flops["smallest_fraction"] == pytest.approx(flops["smallest"] / flops["largest"])


def test_verify_prints_the_scaling_range(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["blocks", f"{MODELS}:concat_net", "--input-shape", "1,28,28", "--verify"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("composition FLOPs:"))
    assert "smallest" in line and "largest" in line and "(100%)" in line


def test_verify_fails_with_the_reason_when_the_chain_differs(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["blocks", f"{MODELS}:noisy_net", "--input-shape", "1,28,28", "--verify"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "verify: FAILED" in captured.out
    assert "verification failed: chain: the chain of" in captured.err and "differs from the model" in captured.err


@pytest.mark.parametrize("shape", ["1,28", "a,b,c", "1,0,28", "1x28x28x2"])
def test_bad_input_shape_is_an_argparse_error(shape: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["blocks", "resnet20", "--input-shape", shape])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --input-shape" in err and "write C,H,W" in err


@pytest.mark.parametrize(
    ("model", "shape", "message"),
    [
        (f"{MODELS}:data_dependent_net", "1,28,28", "control flow"),
        (f"{MODELS}:fixed_size_net", "1,32,32", "expects 784 input features"),
        ("resnet19", "1,28,28", "resnet19"),
    ],
)
def test_model_errors_exit_2_with_the_reason(model: str, shape: str, message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["blocks", model, "--input-shape", shape]) == 2
    err = capsys.readouterr().err
    assert err.startswith("legodnn blocks: error:") and message in err


def test_console_script_runs_in_a_subprocess() -> None:
    legodnn = Path(sys.executable).with_name("legodnn")
    proc = subprocess.run([str(legodnn), "blocks", "mobilenetv2", "--input-shape", "1,28,28", "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    names = [b["name"] for b in json.loads(proc.stdout)["blocks"]]
    assert names[-1] == "head" and "features.3" in names and 4 <= len(names) <= 20
