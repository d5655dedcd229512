"""Image folders on disk or in S3: the index (which files, which class), readers, validation.

The usual convention: `DIR/train/<class>/*.{png,jpg,jpeg,webp}`, and `DIR/val/...` and/or
`DIR/test/...` when present. Class index = the sorted class-folder names of `train/`. The
index (keys, labels, sizes) is built once (a listing, not the images) and cached under the
data cache keyed by its fingerprint, so every task of a run reads the same files without
listing a bucket again; an S3 object is downloaded into the cache the first time a process
reads it, so epochs after the first read local files. Nothing holds the images in memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legoblocks.files import write_atomic, write_json_atomic

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
SPLITS = ("train", "val", "test")
INDEX_FORMAT = 1


class DataError(ValueError):
    """The data cannot be used; the message names the file or folder and the fix."""


@dataclass(frozen=True)
class FolderIndex:
    """What an image folder holds: per split, (key, label) pairs in a fixed order."""

    location: str
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    fingerprint: str
    sizes: dict[str, int] = field(default_factory=dict)  # key -> bytes

    def to_json(self) -> dict[str, Any]:
        return {"format": INDEX_FORMAT, "location": self.location, "classes": self.classes,
                "splits": {s: [list(item) for item in items] for s, items in self.splits.items()},
                "fingerprint": self.fingerprint, "sizes": self.sizes}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FolderIndex:
        return cls(data["location"], list(data["classes"]),
                   {s: [(str(k), int(c)) for k, c in items] for s, items in data["splits"].items()},
                   data["fingerprint"], {str(k): int(v) for k, v in data.get("sizes", {}).items()})


def is_s3(location: str) -> bool:
    return location.startswith("s3://")


def _split_s3(location: str) -> tuple[str, str]:
    bucket, _, prefix = location[len("s3://"):].partition("/")
    if not bucket:
        raise DataError(f"data.dir {location!r}: write s3://bucket/prefix")
    return bucket, prefix.strip("/")


def s3_client() -> Any:
    """A boto3 S3 client (botocore reads AWS_ENDPOINT_URL for S3-compatible servers)."""
    import boto3

    return boto3.client("s3")


def _list(location: str) -> list[tuple[str, int, str]]:
    """(relative key, bytes, version tag) of every file under the location."""
    if is_s3(location):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = _split_s3(location)
        out = []
        try:
            pages = s3_client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(prefix) + 1:] if prefix else obj["Key"]
                    out.append((key, int(obj["Size"]), obj.get("ETag", "").strip('"')))
        except (BotoCoreError, ClientError) as exc:
            raise DataError(f"data.dir {location}: cannot list the bucket ({exc}); check the name, your "
                            "credentials and AWS_ENDPOINT_URL") from exc
        return out
    root = Path(location)
    if not root.is_dir():
        raise DataError(f"data.dir {location} does not exist or is not a folder; point data.dir at a folder "
                        "holding train/<class>/*.png (and optionally val/ and test/)")
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            st = path.stat()
            out.append((path.relative_to(root).as_posix(), st.st_size, str(st.st_mtime_ns)))
    return out


def build_index(location: str) -> FolderIndex:
    """List the folder, check its layout, and fix the class order (sorted train/ folder names).

    Raises DataError naming the folder and the fix: no train/ folder, no class folders, a class
    folder without images, a val/ or test/ class that train/ does not have.
    """
    files = _list(location)
    where = location.rstrip("/")
    by_split: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    folders: dict[str, set[str]] = {s: set() for s in SPLITS}
    digest = hashlib.sha256()
    for key, size, tag in sorted(files):
        parts = key.split("/")
        if len(parts) < 3 or parts[0] not in SPLITS:
            continue
        split, cls = parts[0], parts[1]
        folders[split].add(cls)
        if key.lower().endswith(EXTENSIONS):
            by_split[split].setdefault(cls, []).append(key)
            digest.update(f"{key}\0{size}\0{tag}\0".encode())
    if not is_s3(location):  # a class folder holding no file at all does not show in a listing of files
        for split in SPLITS:
            if (Path(location) / split).is_dir():
                folders[split] |= {p.name for p in (Path(location) / split).iterdir() if p.is_dir()}
    if not folders["train"]:
        raise DataError(f"{where}/train/ has no class folders; put one folder per class there, e.g. "
                        f"{where}/train/cat/0001.png")
    classes = sorted(folders["train"])
    for split in SPLITS:
        for cls in sorted(folders[split]):
            if not by_split[split].get(cls):
                raise DataError(f"{where}/{split}/{cls}/ has no images ({', '.join(EXTENSIONS)}); add images or "
                                "remove the folder")
        unknown = sorted(folders[split] - set(classes))
        if unknown:
            raise DataError(f"{where}/{split}/ has classes {unknown} that train/ does not; every class needs "
                            "training images")
    splits = {s: [(k, classes.index(c)) for c in sorted(by_split[s]) for k in sorted(by_split[s][c])]
              for s in SPLITS if by_split[s]}
    sizes = {key: size for key, size, _ in files}
    return FolderIndex(location, classes, splits, digest.hexdigest(), sizes)


def cached_index(location: str, cache_dir: Path, fingerprint: str | None = None) -> FolderIndex:
    """The index from the data cache when its fingerprint matches, else built (and cached)."""
    tag = hashlib.sha256(location.encode()).hexdigest()[:16]
    path = cache_dir / f"index-{tag}.json"
    if fingerprint is not None and path.is_file():
        index = FolderIndex.from_json(json.loads(path.read_text(encoding="utf-8")))
        if index.fingerprint == fingerprint:
            return index
    index = build_index(location)
    if fingerprint is not None and index.fingerprint != fingerprint:
        raise DataError(f"data.dir {location} changed while the run was going on (its listing no longer matches "
                        "the one the run started from); rerun to start over on the current files")
    write_json_atomic(path, index.to_json())
    return index


class Reader:
    """Opens one image of a folder as a PIL image; S3 objects are cached on local disk first."""

    def __init__(self, location: str, cache_dir: Path) -> None:
        self.location = location.rstrip("/")
        self.cache_dir = cache_dir
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:  # a boto3 client does not cross processes
        return {**self.__dict__, "_client": None}

    def local_path(self, key: str) -> Path:
        if not is_s3(self.location):
            return Path(self.location) / key
        bucket, prefix = _split_s3(self.location)
        path = self.cache_dir / "s3" / bucket / (f"{prefix}/{key}" if prefix else key)
        if not path.is_file():
            if self._client is None:
                self._client = s3_client()
            body = self._client.get_object(Bucket=bucket, Key=f"{prefix}/{key}" if prefix else key)["Body"].read()
            write_atomic(path, body)
        return path

    def open(self, key: str):
        from PIL import Image, UnidentifiedImageError

        path = self.local_path(key)
        try:
            with open(path, "rb") as fh:
                image = Image.open(io.BytesIO(fh.read()))
                image.load()
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"{self.location}/{key} is not a readable image ({exc}); replace or remove it") from exc
        return image


def verify_images(index: FolderIndex, reader: Reader, *, threads: int = 8) -> None:
    """Open every image's header (S3 objects are downloaded into the cache on the way); the
    first unreadable one raises DataError naming it. Done once per fingerprint."""
    from PIL import Image, UnidentifiedImageError

    marker = reader.cache_dir / f"verified-{index.fingerprint[:32]}"
    if marker.is_file():
        return

    def check(key: str) -> str | None:
        try:
            with Image.open(reader.local_path(key)) as image:
                image.size  # noqa: B018 - parsing the header is the check
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            return f"{reader.location}/{key} is not a readable image ({exc}); replace or remove it"
        return None

    keys = [k for items in index.splits.values() for k, _ in items]
    with ThreadPoolExecutor(threads) as pool:
        for problem in pool.map(check, keys):
            if problem:
                raise DataError(problem)
    write_atomic(marker, b"")
