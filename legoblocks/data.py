"""Fashion-MNIST from its IDX `.gz` files, plus deterministic subsets and splits.

The loader reads the four files the Debian package `dataset-fashion-mnist` installs with
gzip + NumPy only (no torchvision: the device side and the workers should not need it).
Subsets and splits are seeded so every stage of the pipeline, on every worker, sees the
same samples without shipping index lists around.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

# Channel statistics of the Fashion-MNIST training images (pixels scaled to [0, 1]).
MEAN = 0.2860
STD = 0.3530

_FILES = {
    True: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    False: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
ALL_FILES: tuple[str, ...] = _FILES[True] + _FILES[False]

_IMAGE_MAGIC = 2051
_LABEL_MAGIC = 2049


class DatasetMissingError(FileNotFoundError):
    """The Fashion-MNIST files are not where we looked; the message says how to get them."""


def _missing(data_dir: Path, names: Sequence[str]) -> DatasetMissingError:
    return DatasetMissingError(
        f"Fashion-MNIST not found in {data_dir} (missing: {', '.join(names)}). "
        "Install the Debian package dataset-fashion-mnist "
        "(`apt-get install -y dataset-fashion-mnist`, it puts the IDX files in "
        f"{DEFAULT_DATA_DIR}) or point --data-dir at a folder holding "
        f"{', '.join(ALL_FILES)}."
    )


def _require(data_dir: Path, names: Sequence[str]) -> list[Path]:
    paths = [data_dir / name for name in names]
    absent = [p.name for p in paths if not p.is_file()]
    if absent:
        raise _missing(data_dir, absent)
    return paths


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse one IDX file: big-endian magic, `ndim` big-endian sizes, then uint8 data."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise ValueError(f"{path} is not an IDX file: only {len(raw)} bytes after gunzip")
    found = int.from_bytes(raw[0:4], "big")
    if found != magic:
        raise ValueError(f"{path} has IDX magic {found}, expected {magic}: wrong or corrupt file")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(dims)):
        raise ValueError(
            f"{path} is truncated: header says {dims} ({int(np.prod(dims))} values), "
            f"found {data.size}"
        )
    return data.reshape(dims)


def load_fashion_mnist(data_dir: str | Path = DEFAULT_DATA_DIR, train: bool = True) -> TensorDataset:
    """The training (60k) or test (10k) split as float32 [N,1,28,28] normalized, int64 labels."""
    data_dir = Path(data_dir)
    image_path, label_path = _require(data_dir, _FILES[train])
    images = _read_idx(image_path, _IMAGE_MAGIC, 3)
    labels = _read_idx(label_path, _LABEL_MAGIC, 1)
    if len(images) != len(labels):
        raise ValueError(
            f"{image_path.name} has {len(images)} images but {label_path.name} has "
            f"{len(labels)} labels: the files do not belong together"
        )
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - MEAN) / STD
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x, y)


def _permutation(n: int, seed: int) -> torch.Tensor:
    # A private generator: the result depends only on (n, seed), not on global RNG state.
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)


def _take(ds: TensorDataset, index: torch.Tensor) -> TensorDataset:
    return TensorDataset(*(t[index] for t in ds.tensors))


def subset(ds: TensorDataset, n: int, seed: int) -> TensorDataset:
    """`n` samples drawn without replacement, the same ones for the same seed."""
    total = len(ds)
    if n < 0 or n > total:
        raise ValueError(f"subset size {n} is outside [0, {total}] (the dataset has {total} samples)")
    return _take(ds, _permutation(total, seed)[:n])


def split(ds: TensorDataset, sizes: Sequence[int], seed: int) -> list[TensorDataset]:
    """Disjoint parts of the given sizes from one seeded shuffle (sizes may sum to less)."""
    total = len(ds)
    if any(s < 0 for s in sizes):
        raise ValueError(f"split sizes must be >= 0, got {list(sizes)}")
    if sum(sizes) > total:
        raise ValueError(
            f"split sizes {list(sizes)} sum to {sum(sizes)}, more than the {total} samples available"
        )
    perm = _permutation(total, seed)
    parts, start = [], 0
    for size in sizes:
        parts.append(_take(ds, perm[start : start + size]))
        start += size
    return parts


def dataset_fingerprint(data_dir: str | Path = DEFAULT_DATA_DIR) -> str:
    """SHA-256 over the four files (name and bytes, fixed order): MLflow lineage of the data."""
    data_dir = Path(data_dir)
    digest = hashlib.sha256()
    for path in _require(data_dir, ALL_FILES):
        # Name and length frame each file, so moving bytes between files changes the hash.
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
