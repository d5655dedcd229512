"""Data sources: the embedded Fashion-MNIST, an image folder (local or s3://), a user's factory.

Every stage opens its data the same way, from the stage job's `DataRef`: `load_splits(ref)`
returns map-style datasets that decode one sample when it is asked for (a torch DataLoader
with `ref.workers` worker processes streams them), so no process holds the data set in
memory and every Ray task reads the source itself; no bulk data crosses the object store.
`describe(cfg)` runs once, in preflight: it lists and checks the source (naming the file or
folder and the fix), computes the normalization when it is not configured (cached), and
returns what keys the stages (the fingerprint) and what the bundle records (preprocessing,
class names).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from legoblocks.files import sha256_file, write_atomic, write_json_atomic
from pipelines.data.folders import DataError, FolderIndex, Reader, cached_index, verify_images
from pipelines.data.transforms import Preprocess
from pipelines.stage import NOT_KEYED

FASHION_MNIST = "fashion-mnist"
IMAGEFOLDER = "imagefolder"
FACTORY = "factory"
SOURCES = (FASHION_MNIST, IMAGEFOLDER, FACTORY)
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
_IDX = {True: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        False: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
STATS_SAMPLE = 1000  # training images the normalization is computed from


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "legodnn" / "data"


@dataclass(frozen=True)
class DataRef:
    """How a unit opens the data and what identifies it (the fingerprint, splits, preprocessing)."""

    source: str
    fingerprint: str
    train_size: int | None
    val_size: int
    test_size: int | None
    check_size: int
    seed: int
    preprocess: Preprocess
    location: str = field(default="", metadata=NOT_KEYED)
    factory: str | None = field(default=None, metadata=NOT_KEYED)
    workers: int = field(default=0, metadata=NOT_KEYED)
    cache_dir: str = field(default="", metadata=NOT_KEYED)


@dataclass
class Splits:
    """Disjoint seeded parts: train (teacher, retraining, joint stage), val (profile and
    choice), check (never trained on, profiled or chosen on: prediction checks) and test."""

    train: Dataset
    val: Dataset
    check: Dataset | None
    test: Dataset


@dataclass(frozen=True)
class SourceInfo:
    """What preflight learned about the source."""

    fingerprint: str
    classes: list[str]
    preprocess: Preprocess
    counts: dict[str, int]


class Epochs:
    """Datasets that augment per (seed, epoch, index) take the epoch from the trainer."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class Images(Epochs, Dataset):
    """Images of a folder decoded on demand: (C x size x size float tensor, class index)."""

    def __init__(self, reader: Reader, items: list[tuple[str, int]], preprocess: Preprocess, *, train: bool,
                 seed: int) -> None:
        self.reader, self.items, self.preprocess, self.train, self.seed = reader, items, preprocess, train, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        key, label = self.items[i]
        image = self.reader.open(key)
        return self.preprocess(image, train=self.train, seed=self.seed, epoch=self.epoch, index=i), label


class IdxImages(Epochs, Dataset):
    """Fashion-MNIST images from the uncompressed IDX file, memory-mapped (28 x 28 uint8)."""

    def __init__(self, images: Path, labels: Path, index: np.ndarray, preprocess: Preprocess, *, train: bool,
                 seed: int) -> None:
        self.images_path, self.labels_path, self.index = images, labels, index
        self.preprocess, self.train, self.seed = preprocess, train, seed
        self._images: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._plain = preprocess.channels == 1 and preprocess.size == preprocess.resize == 28

    def __getstate__(self) -> dict[str, Any]:  # memory maps are reopened in each worker
        return {**self.__dict__, "_images": None, "_labels": None}

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._images is None:
            self._images = np.memmap(self.images_path, dtype=np.uint8, mode="r", offset=16).reshape(-1, 28, 28)
            self._labels = np.memmap(self.labels_path, dtype=np.uint8, mode="r", offset=8)
        return self._images, self._labels  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        images, labels = self._arrays()
        j = int(self.index[i])
        pixels = np.array(images[j])
        if self._plain and not (self.train and self.preprocess.augment):
            return self.preprocess.normalize(pixels), int(labels[j])
        x = self.preprocess(Image.fromarray(pixels, mode="L"), train=self.train, seed=self.seed, epoch=self.epoch, index=i)
        return x, int(labels[j])


def _permutation(n: int, seed: int) -> np.ndarray:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()


def _parts(n: int, sizes: list[int | None], seed: int, where: str) -> list[np.ndarray]:
    """Disjoint seeded index sets of the given sizes (None: all that is left)."""
    if sum(s is None for s in sizes) > 1:
        raise DataError(f"{where}: at most one of the sizes {sizes} may be null (all that is left)")
    fixed = sum(s for s in sizes if s is not None)
    if fixed > n:
        raise DataError(f"{where} has {n} images, fewer than the {fixed} the configured sizes ask for "
                        f"({sizes}); lower data.train_size / val_size / check_size / test_size")
    perm, out, start = _permutation(n, seed), [], 0
    for size in sizes:
        size = n - fixed if size is None else size
        out.append(perm[start:start + size])
        start += size
    return out


# --------------------------------------------------------------------------- Fashion-MNIST


def _unpacked(data_dir: Path, name: str, cache_dir: Path, magic: int, ndim: int) -> Path:
    """The IDX file gunzipped into the cache (once), header checked; errors name the file."""
    src = data_dir / name
    if not src.is_file():
        raise DataError(f"Fashion-MNIST not found: {src} is missing. Install the Debian package "
                        "dataset-fashion-mnist (`apt-get install -y dataset-fashion-mnist`) or point data.dir "
                        f"at a folder holding {', '.join(n for pair in _IDX.values() for n in pair)}")
    stat = src.stat()
    out = cache_dir / "fashion-mnist" / f"{name[:-3]}-{stat.st_size}-{stat.st_mtime_ns}"
    if not out.is_file():
        try:
            with gzip.open(src, "rb") as fh:
                raw = fh.read()
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise DataError(f"{src} is corrupt ({type(exc).__name__}: {exc}); reinstall dataset-fashion-mnist "
                            "or replace the file") from exc
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)] if len(raw) >= 4 + 4 * ndim else []
        if found != magic or not dims or len(raw) - 4 * (1 + ndim) != int(np.prod(dims)):
            raise DataError(f"{src} is not a complete IDX file (magic {found}, expected {magic}); replace the file")
        write_atomic(out, raw)
    return out


def _fashion_splits(ref: DataRef) -> Splits:
    data_dir, cache = Path(ref.location), Path(ref.cache_dir)
    files = {train: [_unpacked(data_dir, n, cache, m, d) for n, m, d in zip(_IDX[train], (2051, 2049), (3, 1))]
             for train in (True, False)}
    n_train = (files[True][1].stat().st_size - 8)
    train, val, check = _parts(n_train, [ref.train_size, ref.val_size, ref.check_size], ref.seed,
                               f"{data_dir}/{_IDX[True][0]}")
    (test,) = _parts(files[False][1].stat().st_size - 8, [ref.test_size], ref.seed, f"{data_dir}/{_IDX[False][0]}")

    def part(index: np.ndarray, which: bool, train_mode: bool = False) -> IdxImages:
        return IdxImages(*files[which], index, ref.preprocess, train=train_mode, seed=ref.seed)

    return Splits(part(train, True, True), part(val, True), part(check, True) if len(check) else None, part(test, False))


def _fashion_fingerprint(data_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in (*_IDX[True], *_IDX[False]):
        path = data_dir / name
        if not path.is_file():
            _unpacked(data_dir, name, Path("/nonexistent"), 0, 1)  # raises the missing-file error
        digest.update(f"{name}\0{path.stat().st_size}\0{sha256_file(path)}\0".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- image folders


def _folder_splits(ref: DataRef) -> Splits:
    cache = Path(ref.cache_dir)
    index = cached_index(ref.location, cache, ref.fingerprint)
    reader = Reader(ref.location, cache)
    train_items = index.splits["train"]
    has_val, has_test = "val" in index.splits, "test" in index.splits
    sizes: list[int | None] = [ref.train_size]
    if not has_val:
        sizes += [ref.val_size, ref.check_size]
    if not has_test:
        sizes.append(ref.test_size)
    cuts = _parts(len(train_items), sizes, ref.seed, f"{ref.location}/train")
    train = [train_items[i] for i in cuts[0]]
    rest = cuts[1:]
    if has_val:
        val_cut, check_cut = _parts(len(index.splits["val"]), [ref.val_size, ref.check_size], ref.seed,
                                    f"{ref.location}/val")
        val = [index.splits["val"][i] for i in val_cut]
        check = [index.splits["val"][i] for i in check_cut]
    else:
        val, check = ([train_items[i] for i in rest[0]], [train_items[i] for i in rest[1]])
        rest = rest[2:]
    if has_test:
        (test_cut,) = _parts(len(index.splits["test"]), [ref.test_size], ref.seed, f"{ref.location}/test")
        test = [index.splits["test"][i] for i in test_cut]
    else:
        test = [train_items[i] for i in rest[0]]

    def part(items: list[tuple[str, int]], train_mode: bool = False) -> Images:
        return Images(reader, items, ref.preprocess, train=train_mode, seed=ref.seed)

    return Splits(part(train, True), part(val), part(check) if check else None, part(test))


# --------------------------------------------------------------------------- factories


def _factory_datasets(ref: str, options: dict[str, Any]) -> dict[str, Dataset]:
    """The user's factory called (with the options it declares); its datasets by split name."""
    from legoblocks.modelref import ModelRefError, call_with_accepted, resolve_factory

    try:
        result = call_with_accepted(resolve_factory(ref), options)
    except ModelRefError as exc:
        raise DataError(f"data.factory: {exc}") from exc
    except Exception as exc:
        raise DataError(f"data.factory {ref} raised {type(exc).__name__}: {exc}") from exc
    if isinstance(result, Dataset):
        return {"train": result}
    if isinstance(result, (tuple, list)) and 1 <= len(result) <= 3:
        return {name: ds for name, ds in zip(("train", "val", "test"), result) if ds is not None}
    if isinstance(result, dict) and "train" in result:
        return {k: v for k, v in result.items() if k in ("train", "val", "test") and v is not None}
    raise DataError(f"data.factory {ref}: return a torch Dataset (split into train/val/test for you), a tuple "
                    f"(train, val, test) or a dict with 'train' (and 'val', 'test'); got {type(result).__name__}")


def _factory_splits(ref: DataRef) -> Splits:
    from torch.utils.data import Subset

    sets = _factory_datasets(ref.factory or "", {"seed": ref.seed, "train": True, "input_size": ref.preprocess.size,
                                                 "in_channels": ref.preprocess.channels})
    train = sets["train"]
    sizes: list[int | None] = [ref.train_size]
    if "val" not in sets:
        sizes += [ref.val_size, ref.check_size]
    if "test" not in sets:
        sizes.append(ref.test_size)
    cuts = _parts(len(train), sizes, ref.seed, f"data.factory {ref.factory} train")
    parts = [Subset(train, c.tolist()) for c in cuts]
    out = {"train": parts[0]}
    rest = parts[1:]
    if "val" in sets:
        val_cut, check_cut = _parts(len(sets["val"]), [ref.val_size, ref.check_size], ref.seed, "data.factory val")
        out.update(val=Subset(sets["val"], val_cut.tolist()), check=Subset(sets["val"], check_cut.tolist()))
    else:
        out.update(val=rest[0], check=rest[1])
        rest = rest[2:]
    out["test"] = sets["test"] if "test" in sets else rest[0]
    if ref.test_size is not None and "test" in sets:
        (cut,) = _parts(len(sets["test"]), [ref.test_size], ref.seed, "data.factory test")
        out["test"] = Subset(sets["test"], cut.tolist())
    return Splits(out["train"], out["val"], out["check"] if len(out["check"]) else None, out["test"])


def _factory_fingerprint(ref: str) -> str:
    """The factory's source file (and its size): a changed factory gives new keys."""
    path = Path(ref.rsplit(":", 1)[0])
    if path.suffix == ".py" and path.is_file():
        return hashlib.sha256(f"{ref}\0".encode() + path.read_bytes()).hexdigest()
    return hashlib.sha256(ref.encode()).hexdigest()


# --------------------------------------------------------------------------- entry points


def load_splits(ref: DataRef) -> Splits:
    """The splits a `DataRef` names, opened here (no sample is decoded until it is read)."""
    if ref.source == FASHION_MNIST:
        return _fashion_splits(ref)
    if ref.source == IMAGEFOLDER:
        return _folder_splits(ref)
    if ref.source == FACTORY:
        return _factory_splits(ref)
    raise DataError(f"data.source {ref.source!r}: use one of {', '.join(SOURCES)}")


def _stats(ds: Dataset, channels: int, seed: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of up to STATS_SAMPLE images (pixels in [0, 1], before normalizing)."""
    n = min(len(ds), STATS_SAMPLE)  # type: ignore[arg-type]
    pick = _permutation(len(ds), seed)[:n]  # type: ignore[arg-type]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    count = 0
    for i in pick:
        x = ds[int(i)][0].numpy().reshape(channels, -1).astype(np.float64)
        total += x.sum(1)
        squares += (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 1e-12))
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def _check_sizes(d: Any, counts: dict[str, int], where: str) -> None:
    """The configured split sizes fit the images there are (the same carving as `load_splits`)."""
    from_train = [d.train_size or 0]
    if "val" in counts:
        _fits(counts["val"], d.val_size + d.check_size, f"{where}: val", "data.val_size + data.check_size")
    else:
        from_train += [d.val_size, d.check_size]
    if "test" in counts:
        _fits(counts["test"], d.test_size or 0, f"{where}: test", "data.test_size")
    elif d.train_size is None and d.test_size is None:
        raise DataError(f"{where} has no test split, so test images come from the training images: give "
                        "data.train_size or data.test_size (both null would leave one of them empty)")
    else:
        from_train.append(d.test_size or 1)
    _fits(counts["train"], sum(from_train) + (1 if d.train_size is None else 0), f"{where}: train",
          "data.train_size + val_size + check_size (+ test_size without a test split)")


def _fits(have: int, need: int, where: str, what: str) -> None:
    if need > have:
        raise DataError(f"{where} has {have} images, fewer than the {need} that {what} ask for; lower the sizes "
                        "(data.train_size: null takes all that is left)")


def describe(cfg: Any, cache_dir: Path) -> SourceInfo:
    """Check the configured source before any work and say what it is.

    Raises DataError naming the file or folder and the fix.
    """
    d, m = cfg.data, cfg.model
    resize = d.resize if d.resize is not None else m.input_size
    augment = d.augment if d.augment is not None else d.source == IMAGEFOLDER
    mean, std = d.mean, d.std
    if d.source == FASHION_MNIST:
        fingerprint = _fashion_fingerprint(Path(d.dir))
        for train in (True, False):  # unpacked into the cache once; a corrupt file is named now
            for name, magic, ndim in zip(_IDX[train], (2051, 2049), (3, 1)):
                _unpacked(Path(d.dir), name, cache_dir, magic, ndim)
        classes = list(FASHION_CLASSES)
        mean = mean or [FASHION_MEAN] * m.in_channels
        std = std or [FASHION_STD] * m.in_channels
        counts = {"train": 60000, "test": 10000}
    elif d.source == IMAGEFOLDER:
        index = cached_index(d.dir, cache_dir)
        verify_images(index, Reader(d.dir, cache_dir))
        fingerprint, classes = index.fingerprint, index.classes
        counts = {s: len(items) for s, items in index.splits.items()}
    else:
        if not d.factory:
            raise DataError("data.source factory needs data.factory: package.module:factory or file.py:factory")
        sets = _factory_datasets(d.factory, {"seed": d.seed, "train": True, "input_size": m.input_size,
                                             "in_channels": m.in_channels})
        train = sets["train"]
        classes = [str(c) for c in getattr(train, "classes", range(m.num_classes))]
        fingerprint = _factory_fingerprint(d.factory)
        counts = {k: len(v) for k, v in sets.items()}  # type: ignore[arg-type]
        mean, std = mean or [0.0] * m.in_channels, std or [1.0] * m.in_channels
    _check_sizes(d, counts, d.dir if d.source != FACTORY else f"data.factory {d.factory}")
    if len(classes) != m.num_classes:
        raise DataError(f"the data has {len(classes)} classes ({', '.join(classes[:12])}"
                        f"{', ...' if len(classes) > 12 else ''}) but model.num_classes is {m.num_classes}; "
                        "set model.num_classes to match")
    if mean is None or std is None:  # an image folder without configured statistics: computed once, cached
        stats_path = cache_dir / f"stats-{fingerprint[:32]}-{m.in_channels}-{m.input_size}-{resize}.json"
        if stats_path.is_file():
            cached = json.loads(stats_path.read_text(encoding="utf-8"))
            mean, std = cached["mean"], cached["std"]
        else:
            probe = Preprocess(m.in_channels, m.input_size, resize, (0.0,) * m.in_channels, (1.0,) * m.in_channels)
            items = cached_index(d.dir, cache_dir, fingerprint).splits["train"]
            mean, std = _stats(Images(Reader(d.dir, cache_dir), items, probe, train=False, seed=d.seed),
                               m.in_channels, d.seed)
            write_json_atomic(stats_path, {"mean": list(mean), "std": list(std)})
    try:
        preprocess = Preprocess(m.in_channels, m.input_size, resize, tuple(mean), tuple(std), augment)
    except ValueError as exc:
        raise DataError(str(exc)) from exc
    return SourceInfo(fingerprint, classes, preprocess, counts)


def data_ref(cfg: Any, info: SourceInfo, cache_dir: Path) -> DataRef:
    d = cfg.data
    return DataRef(d.source, info.fingerprint, d.train_size, d.val_size, d.test_size, d.check_size, d.seed,
                   info.preprocess, location=d.dir, factory=d.factory,
                   workers=d.workers if d.workers is not None else (0 if d.source == FASHION_MNIST else 2),
                   cache_dir=str(cache_dir))


def export_fashion_mnist(fmnist_dir: Path, root: Path, *, per_class: dict[str, int], size: int = 64,
                         mode: str = "RGB") -> Path:
    """Fashion-MNIST as an image folder: `root/<split>/<class>/i.png`, each image resized to
    `size` x `size` (bilinear) and converted to `mode` ("L" or "RGB"); `per_class[split]`
    images of each of the 10 classes, from the IDX training file for train/ and val/ and the
    test file for test/. For trying the image-folder path and for measuring it against the
    IDX path on the same images."""
    from PIL import Image

    def idx(name: str, offset: int) -> np.ndarray:
        with gzip.open(fmnist_dir / name, "rb") as fh:
            return np.frombuffer(fh.read(), dtype=np.uint8, offset=offset)

    sources = {True: (idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28), idx("train-labels-idx1-ubyte.gz", 8)),
               False: (idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28), idx("t10k-labels-idx1-ubyte.gz", 8))}
    taken: dict[bool, int] = {True: 0, False: 0}  # images of each class already used, per file
    for split, count in per_class.items():
        train_file = split != "test"
        images, labels = sources[train_file]
        for label, name in enumerate(FASHION_CLASSES):
            folder = root / split / name.replace("/", "_")
            folder.mkdir(parents=True, exist_ok=True)
            for i, j in enumerate(np.flatnonzero(labels == label)[taken[train_file]:][:count]):
                Image.fromarray(images[j], mode="L").resize((size, size), Image.Resampling.BILINEAR).convert(mode) \
                    .save(folder / f"{i:05d}.png")
        taken[train_file] += count
    return root


def as_dict(preprocess: Preprocess) -> dict[str, Any]:
    return dataclasses.asdict(preprocess)
