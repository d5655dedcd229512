"""Session-wide test set-up shared by every package's tests.

Package-specific fixtures (servers, tiny models) live in the package's own conftest.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Every Ray command a test runs must agree on auth and stay on loopback.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Tests share 2 cores with Ray workers and subprocesses: one intra-op thread each avoids
# oversubscription (measured 20x slower descendant generation with two threads under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")

FMNIST_DIR = Path(os.environ.get("LEGODNN_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    """The real Fashion-MNIST IDX files (installed by `make test`)."""
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(
            f"Fashion-MNIST not found in {FMNIST_DIR}: run `make test` (it installs the Debian "
            "package dataset-fashion-mnist) or set LEGODNN_FMNIST_DIR"
        )
    return FMNIST_DIR


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto_server did not listen on 127.0.0.1:{port} within {timeout}s")


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`http://127.0.0.1:PORT` of a moto S3 server running for the whole session."""
    port = _free_port()
    exe = Path(sys.executable).parent / "moto_server"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def s3_env(moto_endpoint: str) -> Iterator[dict[str, str]]:
    """boto3's environment pointing at moto (dummy credentials), set in os.environ for the session.

    Tests that need another endpoint (the dropping proxy) override AWS_ENDPOINT_URL with
    monkeypatch, which restores it afterwards.
    """
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_endpoint,
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE"]}
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3_env: dict[str, str]) -> str:
    """A fresh, empty bucket per test, so tests never see each other's objects."""
    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory, fmnist_dir: Path) -> Path:
    """A small real image folder: 64x64 RGB Fashion-MNIST PNGs, 10 classes, train/ and test/."""
    from pipelines.data import export_fashion_mnist

    return export_fashion_mnist(fmnist_dir, tmp_path_factory.mktemp("images"), per_class={"train": 40, "test": 10})
