"""Your own data: an image folder on disk and in S3 (moto), a dataset factory, a model from a
file, each run end to end to a published (and fetched) bundle; bad input refused with exit 2
before any work, naming the file or folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FETCH = str(Path(sys.executable).parent / "legodnn-fetch")
TINY = ["--set", "model.options.width=4", "--set", "data.train_size=300", "--set", "data.val_size=60",
        "--set", "data.test_size=null", "--set", "teacher.epochs=1", "--set", "retrain.epochs=1",
        "--set", "joint.steps=4", "--set", "joint.batch_size=32", "--set", "profile.latency_repeats=3",
        "--set", "profile.latency_calibration_k=0", "--set", "profile.additivity_n=2", "--set", "profile.calibration_k=0",
        "--set", "ray.num_cpus=1"]
RGB64 = ["--set", "model.in_channels=3", "--set", "model.input_size=64"]
SMALL_CNN = '''
import torch
from torch import nn


def small_cnn(in_channels=3, num_classes=10):
    """A user's own network: conv stages with residual units, global pooling, a linear head."""
    torch.manual_seed(0)
    class Unit(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                      nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        def forward(self, x):
            return torch.relu(x + self.body(x))
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         Unit(16), nn.Conv2d(16, 32, 3, stride=2, padding=1), Unit(32), Unit(32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))
'''


def _run(pl, env: dict[str, str], work: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([pl.LEGODNN, "run", "--executor", "local", "--workdir", str(work), "--json", *args],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=pl.REPO)


def _fetch(env: dict[str, str], uri: str, key: Path, cache: Path) -> dict:
    proc = subprocess.run([FETCH, uri, "--public-key", str(key), "--cache", str(cache), "--repeats", "3", "--json"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_image_folder_runs_to_a_fetched_bundle(image_folder, pipeline_env, pl, tmp_path) -> None:
    work = tmp_path / "work"
    proc = _run(pl, pipeline_env, work, "--set", "data.source=imagefolder", "--set", f"data.dir={image_folder}",
                *RGB64, *TINY)
    summary = pl.summary_of(proc)
    assert summary["blocks"] and summary["bundle_uri"].startswith("file://")
    table = json.loads(Path(summary["table_path"]).read_text())
    assert table["input_shape"] == [3, 64, 64]
    fetched = _fetch(pipeline_env, summary["bundle_uri"], work / "keys" / "bundle-signing.pub", tmp_path / "device")
    assert fetched["models"][0]["model_id"] == "resnet20"
    # The data was streamed from the files: the teacher trained on 300 of the 400 training images.
    teacher = json.loads(next((work / "cache" / "teacher").glob("*/done.json")).read_text())
    assert teacher["keyed"]["job"]["data"]["train_size"] == 300 and teacher["keyed"]["job"]["data"]["source"] == "imagefolder"


def test_s3_image_folder_and_a_model_from_a_file(image_folder, pipeline_env, s3_env, pl, tmp_path) -> None:
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="own-data")
    for path in sorted(image_folder.rglob("*.png")):
        s3.upload_file(str(path), "own-data", f"fmnist/{path.relative_to(image_folder).as_posix()}")
    model_file = tmp_path / "my_model.py"
    model_file.write_text(SMALL_CNN)
    env = {**pipeline_env, **s3_env}
    work = tmp_path / "work"
    s3.create_bucket(Bucket="own-bundles")
    proc = _run(pl, env, work, "--model", f"{model_file}:small_cnn", "--set", "data.source=imagefolder",
                "--set", "data.dir=s3://own-data/fmnist", "--set", f"data.cache_dir={tmp_path / 'data-cache'}",
                "--store", "s3://own-bundles/models", *RGB64, *_without_width(TINY))
    summary = pl.summary_of(proc)
    assert summary["bundle_uri"].startswith("s3://own-bundles/models/small_cnn")
    # Every image was read from the bucket into the local data cache, none from the original folder.
    cached = list((tmp_path / "data-cache" / "s3" / "own-data" / "fmnist").rglob("*.png"))
    assert len(cached) == len(list(image_folder.rglob("*.png")))
    fetched = _fetch(env, summary["bundle_uri"], work / "keys" / "bundle-signing.pub", tmp_path / "device")
    assert fetched["models"][0]["model_id"] == "small_cnn"


def _without_width(args: list[str]) -> list[str]:
    out = []
    for flag, value in zip(args[::2], args[1::2]):
        if not value.startswith("model.options"):
            out += [flag, value]
    return out


DATA_FACTORY = '''
import torch
from torch.utils.data import TensorDataset


def make_data(seed=0, input_size=16, in_channels=1):
    """A user's data set in a format the pipeline does not read itself: here, tensors."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (600,), generator=gen)
    x = torch.randn(600, in_channels, input_size, input_size, generator=gen) + (2.0 * y - 1.0).view(-1, 1, 1, 1)
    return TensorDataset(x, y)
'''


def test_factory_data_source(pipeline_env, pl, tmp_path) -> None:
    factory = tmp_path / "my_data.py"
    factory.write_text(DATA_FACTORY)
    proc = _run(pl, pipeline_env, tmp_path / "work", "--no-publish", "--set", "data.source=factory",
                "--set", f"data.factory={factory}:make_data", "--set", "model.num_classes=2",
                "--set", "model.input_size=16", *TINY, "--set", "data.test_size=200", "--set", "teacher.epochs=3")
    summary = pl.summary_of(proc)
    assert summary["teacher"]["test_accuracy"] > 0.8  # two classes, told apart by their mean
    assert summary["bundle_uri"] is None


UNTRACEABLE = '''
import torch
from torch import nn


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        h = self.conv(x)
        if h.sum() > 0:  # depends on the values: no graph capture can specialize it
            h = h * 2
        return self.head(h.mean(dim=(2, 3)))


def build():
    return Gate()
'''


def _break(case: str, root: Path, image_folder: Path, fmnist_dir: Path) -> tuple[list[str], str]:
    """Arguments that make one kind of bad input, and what the error must name."""
    import shutil

    data = root / "data"
    sizes = ["--set", "data.train_size=300", "--set", "data.val_size=60", "--set", "data.test_size=null"]
    if case == "missing-folder":
        return ["--set", "data.source=imagefolder", "--set", f"data.dir={data}", *RGB64], f"{data} does not exist"
    shutil.copytree(image_folder, data)
    if case == "empty-folder":
        shutil.rmtree(data / "train")
        (data / "train").mkdir()
        return ["--set", "data.source=imagefolder", "--set", f"data.dir={data}", *RGB64, *sizes], f"{data}/train/ has no class"
    if case == "class-without-images":
        for png in (data / "train" / "Bag").glob("*.png"):
            png.unlink()
        return ["--set", "data.source=imagefolder", "--set", f"data.dir={data}", *RGB64, *sizes], f"{data}/train/Bag/ has no images"
    if case == "unreadable-image":
        (data / "train" / "Coat" / "00003.png").write_bytes(b"not a png at all")
        return (["--set", "data.source=imagefolder", "--set", f"data.dir={data}", *RGB64, *sizes],
                "train/Coat/00003.png is not a readable image")
    if case == "wrong-num-classes":
        return (["--set", "data.source=imagefolder", "--set", f"data.dir={data}", *RGB64, "--set", "model.num_classes=5", *sizes],
                "the data has 10 classes")
    if case == "wrong-channels":  # the model's first layer takes RGB; the config says grayscale
        (root / "rgb.py").write_text(SMALL_CNN + "\n\ndef rgb_only():\n    return small_cnn(in_channels=3)\n")
        return ["--model", f"{root / 'rgb.py'}:rgb_only", "--set", "data.source=imagefolder", "--set", f"data.dir={data}",
                "--set", "model.input_size=64", *sizes], "does not accept the configured input [1, 64, 64]"
    if case == "too-few-images":
        return ["--set", "data.source=imagefolder", "--set", f"data.dir={data}", *RGB64], \
            "test has 100 images, fewer than the 10000 that data.test_size ask for"
    if case == "untraceable-model":
        (root / "gate.py").write_text(UNTRACEABLE)
        return ["--model", f"{root / 'gate.py'}:build", "--set", "data.source=imagefolder", "--set", f"data.dir={data}",
                *RGB64, *sizes], "cannot be cut into blocks"
    assert case == "corrupt-idx"
    fm = root / "fm"
    shutil.copytree(fmnist_dir, fm)
    (fm / "train-labels-idx1-ubyte.gz").write_bytes((fm / "train-labels-idx1-ubyte.gz").read_bytes()[:500])
    return ["--data-dir", str(fm), "--set", f"data.cache_dir={root / 'cache'}"], "train-labels-idx1-ubyte.gz is corrupt"


@pytest.mark.parametrize("case", ["missing-folder", "empty-folder", "class-without-images", "unreadable-image",
                                  "wrong-num-classes", "wrong-channels", "untraceable-model", "corrupt-idx",
                                  "too-few-images"])
def test_bad_input_exits_2_naming_the_problem_before_any_work(case, image_folder, fmnist_dir, tmp_path, capsys,
                                                               monkeypatch) -> None:
    from pipelines.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args, expected = _break(case, tmp_path, image_folder, fmnist_dir)
    work = tmp_path / "work"
    code = main(["run", "--executor", "local", "--workdir", str(work), *args, "--set", "model.options.width=4"]
                if "--model" not in args else ["run", "--executor", "local", "--workdir", str(work), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err, err
    assert not work.exists()
