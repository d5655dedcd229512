"""Session-wide test set-up shared by every package's tests.

Package-specific fixtures (servers, tiny models) live in the package's own conftest.py.
"""

from __future__ import annotations

import os
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
