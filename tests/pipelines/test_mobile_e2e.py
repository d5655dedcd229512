"""The mobile families end to end: a MobileNetV3-like and an EfficientNet-like model (written as
the popular libraries write them, tests/legoblocks/mobile_models.py) on 64x64 RGB images, from
the image folder to a bundle fetched and run on ONNX Runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

MODELS = Path(__file__).resolve().parents[1] / "legoblocks" / "mobile_models.py"
FETCH = str(Path(sys.executable).parent / "legodnn-fetch")
TINY = {"data.train_size": 300, "data.val_size": 60, "data.test_size": "null", "teacher.epochs": 1,
        "retrain.epochs": 1, "joint.steps": 4, "joint.batch_size": 32, "profile.latency_repeats": 3,
        "profile.latency_calibration_k": 0, "profile.additivity_n": 2, "profile.calibration_k": 0,
        "model.in_channels": 3, "model.input_size": 64, "data.source": "imagefolder"}


@pytest.mark.parametrize("factory", ["mobilenetv3_small", pytest.param("efficientnet_b0", marks=pytest.mark.slow)])
def test_mobile_family_runs_to_a_bundle_fetched_on_onnxruntime(factory, image_folder, pipeline_env, pl, tmp_path):
    work = tmp_path / "work"
    sets = [a for k, v in {**TINY, "data.dir": image_folder}.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.run([pl.LEGODNN, "run", "--executor", "local", "--workdir", str(work), "--json",
                           "--model", f"{MODELS}:{factory}", *sets], env=pipeline_env, capture_output=True, text=True,
                          timeout=1200, cwd=pl.REPO)
    summary = pl.summary_of(proc)
    assert 4 <= len(summary["blocks"]) <= 24 and summary["num_options"] > 1000
    fetched = subprocess.run([FETCH, summary["bundle_uri"], "--public-key", str(work / "keys" / "bundle-signing.pub"),
                              "--cache", str(tmp_path / "device"), "--runtime", "onnxruntime", "--repeats", "3",
                              "--json"], env=pipeline_env, capture_output=True, text=True, timeout=600)
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    report = json.loads(fetched.stdout)
    assert report["models"][0]["model_id"] == factory
