"""The device install for real: a fresh virtual environment with only the project's base
dependencies (no torch, Ray, MLflow, Optuna, torch-pruning or SciPy), fetching from the moto
S3 server, solving, predicting on PNG files, switching budgets and exporting; every logit
is compared with the torch composition the publishing host computes.

The project is built as a wheel (from a copy of the sources, so the work tree stays clean)
and installed with pip from the package index or pip's cache, as a device would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from infra.bundle import publish_bundle
from infra.manifest import FASHION_MNIST_CLASSES, FASHION_MNIST_PREPROCESSING
from legoblocks.compose import ScalableModel
from profiling.table import load as load_table

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "legoblocks", "profiling", "optimizer", "pipelines", "infra")
ATOL = 1e-4


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the project wheel with its base dependencies only; returns its bin/."""
    root = tmp_path_factory.mktemp("device-install")
    src = root / "src"
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(source, src / name)
    quiet = ["-qq", "--disable-pip-version-check"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", *quiet, "--no-deps", "--no-build-isolation", "-w",
                    str(root / "wheels"), str(src)], check=True, timeout=300)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(root / "venv")], check=True, timeout=300)
    bin_dir = root / "venv" / "bin"
    (wheel,) = (root / "wheels").glob("*.whl")
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", *quiet, str(wheel)], check=True, timeout=900)
    return bin_dir


def _run(bin_dir: Path, args: list[str], env: dict[str, str], cwd: Path) -> dict:
    proc = subprocess.run([str(bin_dir / "legodnn-fetch"), *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _torch_logits(scalable_dir: Path, selection: list[str], images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return ScalableModel.load(scalable_dir).compose(selection)(images).numpy()


def test_fresh_device_install_fetches_predicts_switches_and_exports(device_venv, built_models, keypair, bucket,
                                                                      s3_env, tmp_path, val_ds, write_pngs):
    bin_dir = device_venv
    for heavy in ("torch", "torch_pruning", "scipy", "ray", "mlflow", "optuna", "safetensors"):
        probe = subprocess.run([str(bin_dir / "python"), "-c", f"import {heavy}"], capture_output=True, timeout=60)
        assert probe.returncode != 0, f"{heavy} must not be installed by the device install"
    rn = built_models["resnet"]
    root = f"s3://{bucket}/bundles"
    publish_bundle(rn.scalable_dir, rn.table_path, root, keypair.private_key, "rn8",
                   preprocessing=FASHION_MNIST_PREPROCESSING, classes=FASHION_MNIST_CLASSES)
    paths, images = write_pngs(val_ds, tmp_path / "png", 4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | s3_env
    cache = tmp_path / "cache"
    common = ["--public-key", str(keypair.public_key), "--cache", str(cache), "--repeats", "3", "--json"]

    # fetch + solve + predict, the runtime chosen by default (no torch here: onnxruntime)
    first = _run(bin_dir, ["predict", *map(str, paths), "--bundle", f"{root}/rn8", *common], env, tmp_path)
    assert first["runtime"] == "onnxruntime"
    sel = list(first["models"][0]["selection"].values())
    np.testing.assert_allclose(np.array([p["logits"] for p in first["predictions"]]),
                               _torch_logits(rn.scalable_dir, sel, images), atol=ATOL, rtol=0)

    # switch budgets while running: --watch swaps the changed blocks' sessions
    table = load_table(rn.table_path)
    lo = sum(min(c.peak_bytes for c in b.choices.values()) for b in table.blocks)
    tight_mb = lo * 1.01 / 2**20
    budget_file = tmp_path / "budgets.json"
    budget_file.write_text("{}")
    proc = subprocess.Popen([str(bin_dir / "legodnn-fetch"), f"{root}/rn8", *common, "--watch", str(budget_file),
                             "--watch-interval", "0.1", "--watch-max-changes", "1", "--watch-timeout", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline())["models"][0]["selection"] == first["models"][0]["selection"]
    budget_file.write_text(json.dumps({"memory_mb": tight_mb}))
    event = json.loads(proc.stdout.readline())
    assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    assert event["event"] == "switch" and event["changes"]["rn8"]
    switched = list(event["models"][0]["selection"].values())
    assert switched != sel and event["models"][0]["memory_bytes"] <= tight_mb * 2**20

    # the switched selection, offline, predicts what torch computes, and exports as one ONNX file
    export = tmp_path / "export"
    second = _run(bin_dir, ["predict", *map(str, paths), "--bundle", f"{root}/rn8", *common, "--offline",
                            "--memory-mb", str(tight_mb)], env, tmp_path)
    assert list(second["models"][0]["selection"].values()) == switched
    expected = _torch_logits(rn.scalable_dir, switched, images)
    np.testing.assert_allclose(np.array([p["logits"] for p in second["predictions"]]), expected, atol=ATOL, rtol=0)
    _run(bin_dir, [f"{root}/rn8", *common, "--offline", "--memory-mb", str(tight_mb), "--export", str(export)],
         env, tmp_path)
    import onnxruntime as ort

    plain = ort.InferenceSession(str(export / "rn8.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(plain.run(None, {"input": images.numpy()})[0], expected, atol=ATOL, rtol=0)
