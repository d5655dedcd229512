"""Atomic file writes and content hashes: the one way every package writes a file others read.

A reader (another process, a Ray worker, a device after a power cut) must never see half a
file: data goes to a temporary file in the same folder, is flushed to disk, and replaces the
target with one `os.replace`.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def temp_path(path: str | Path) -> Path:
    """A unique temporary name beside `path` (same folder, so `os.replace` is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write `data` (bytes, or text as UTF-8) to `path` atomically; returns the path.

    The parent folder is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def canonical_json(value: Any) -> str:
    """A stable text form of a JSON-able value (sorted keys, no spaces): what hashes cover."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def write_json_atomic(path: str | Path, data: Any, *, indent: int = 1) -> Path:
    """`data` as JSON (sorted keys), written atomically."""
    return write_atomic(path, json.dumps(data, indent=indent, sort_keys=True, default=str) + "\n")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
