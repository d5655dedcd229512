"""Fashion-MNIST loading, subsets/splits and the dataset fingerprint."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from legoblocks.data import (
    ALL_FILES,
    DEFAULT_DATA_DIR,
    MEAN,
    STD,
    DatasetMissingError,
    dataset_fingerprint,
    load_fashion_mnist,
    split,
    subset,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _fake_dir(root: Path, n_train: int = 6, n_test: int = 4) -> Path:
    """A folder of tiny but valid IDX files (pixel value = image index, label = index % 10)."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.stack([np.full((28, 28), i, dtype=np.uint8) for i in range(n)])
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", 2051, images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 2049, np.arange(n) % 10)
    return root


def test_real_test_split_has_fashion_mnist_shape_and_normalization(fmnist_test_split: TensorDataset) -> None:
    x, y = fmnist_test_split.tensors
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10_000,) and y.dtype == torch.int64
    assert set(y.unique().tolist()) == set(range(10))
    # Normalized with the training-set statistics: the test split lands near mean 0, std 1.
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1.0) < 0.05
    assert float(x.min()) == pytest.approx(-MEAN / STD, abs=1e-5)


def test_parser_reads_values_and_order_exactly(tmp_path: Path) -> None:
    ds = load_fashion_mnist(_fake_dir(tmp_path), train=True)
    x, y = ds.tensors
    assert x.shape == (6, 1, 28, 28)
    assert y.tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.allclose(x[3], torch.full((1, 28, 28), (3 / 255 - MEAN) / STD))
    assert len(load_fashion_mnist(tmp_path, train=False)) == 4


def test_missing_dataset_error_names_directory_package_and_option(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissingError) as err:
        load_fashion_mnist(tmp_path / "nowhere")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg
    assert "dataset-fashion-mnist" in msg and "apt-get install -y dataset-fashion-mnist" in msg
    assert "--data-dir" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_missing_single_file_is_named(tmp_path: Path) -> None:
    root = _fake_dir(tmp_path)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    assert len(load_fashion_mnist(root, train=True)) == 6  # the train split is complete
    with pytest.raises(DatasetMissingError, match="t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist(root, train=False)
    with pytest.raises(DatasetMissingError, match="t10k-labels-idx1-ubyte.gz"):
        dataset_fingerprint(root)


def test_corrupt_files_are_reported(tmp_path: Path) -> None:
    root = _fake_dir(tmp_path)
    _write_idx(root / "train-images-idx3-ubyte.gz", 2049, np.zeros((6, 28, 28)))  # label magic
    with pytest.raises(ValueError, match="magic 2049, expected 2051"):
        load_fashion_mnist(root)
    _fake_dir(root, n_train=5)
    _write_idx(root / "train-labels-idx1-ubyte.gz", 2049, np.zeros(7))
    with pytest.raises(ValueError, match="5 images but train-labels-idx1-ubyte.gz has 7 labels"):
        load_fashion_mnist(root)


def test_subset_is_seeded_and_without_replacement() -> None:
    ds = TensorDataset(torch.arange(100).float(), torch.arange(100))
    a, b, c = subset(ds, 30, seed=1), subset(ds, 30, seed=1), subset(ds, 30, seed=2)
    assert torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(a.tensors[1], c.tensors[1])
    assert len(set(a.tensors[1].tolist())) == 30
    assert torch.equal(a.tensors[0].long(), a.tensors[1])  # x and y stay paired
    with pytest.raises(ValueError, match="outside"):
        subset(ds, 101, seed=0)


def test_split_parts_are_disjoint_sized_and_seeded() -> None:
    ds = TensorDataset(torch.arange(50))
    parts = split(ds, [20, 10, 5], seed=3)
    ids = [set(p.tensors[0].tolist()) for p in parts]
    assert [len(s) for s in ids] == [20, 10, 5]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert [p.tensors[0].tolist() for p in split(ds, [20, 10, 5], seed=3)] == [p.tensors[0].tolist() for p in parts]
    with pytest.raises(ValueError, match="sum to 51"):
        split(ds, [40, 11], seed=0)
    with pytest.raises(ValueError, match=">= 0"):
        split(ds, [-1], seed=0)


def test_fingerprint_is_stable_and_sees_every_byte(tmp_path: Path, fmnist_dir: Path) -> None:
    root = _fake_dir(tmp_path / "a")
    first = dataset_fingerprint(root)
    assert first == dataset_fingerprint(shutil.copytree(root, tmp_path / "b"))
    assert len(first) == 64 and int(first, 16) >= 0
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", 2049, np.array([0, 1, 2, 4]))
    assert dataset_fingerprint(root) != first
    assert dataset_fingerprint(fmnist_dir) != first
    assert len(ALL_FILES) == 4 and DEFAULT_DATA_DIR == Path("/usr/share/datasets/fashion-mnist")
