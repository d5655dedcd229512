"""The device-side cache of bundles: what a device keeps between runs, and how it changes.

Layout under the cache directory:

    objects/<sha256>.safetensors      descendant files, content-addressed, verified on arrival
    bundles/<model_id>-<h>/           one model URI (h: hash of the URI, so equal model ids
                                      from different stores never mix)
        source.json                   {"uri": model URI}
        current.json                  {"version": N}: the last version fetched (for --offline)
        v<N>/manifest.json            the exact signed bytes
        v<N>/manifest.sig
        v<N>/profile.json             the ProfileTable
        v<N>/device-<fingerprint>.json   latencies measured on this device (see device_latency)
    staging/                          downloads in progress (`.part`, resumable) and verified
                                      files not yet committed

Only `commit` changes `objects/` and `bundles/`, and it runs after everything of a fetch
verified: a refused fetch leaves the cache as it was (staging is scratch space). Objects
are content-addressed, so two versions sharing a descendant store it once, and a file is
re-hashed before every use: a file corrupted on the device is refused too.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.errors import BundleVerificationError
from infra.manifest import MANIFEST_NAME, SIGNATURE_NAME
from infra.store import sha256_file

CURRENT_NAME = "current.json"
SOURCE_NAME = "source.json"


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file + fsync + rename: a crash leaves the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class BundleFiles:
    """The small per-version files a fetch writes into the cache at commit time."""

    model_dir: Path
    model_uri: str
    version: int
    files: dict[str, bytes] = field(default_factory=dict)  # name inside v<N>/ -> bytes


class DeviceCache:
    """Paths and the all-or-nothing commit of the device cache (see module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.staging = self.root / "staging"
        self.bundles = self.root / "bundles"

    # ----------------------------------------------------------------- objects

    def object_path(self, sha256: str) -> Path:
        return self.objects / f"{sha256}.safetensors"

    def has_object(self, sha256: str) -> bool:
        return self.object_path(sha256).is_file()

    def staged_path(self, sha256: str) -> Path:
        return self.staging / sha256

    def verified_object(self, sha256: str, *, what: str) -> Path:
        """The cached file for `sha256`, re-hashed now; a corrupted file is removed and refused."""
        path = self.object_path(sha256)
        if not path.is_file():
            raise FileNotFoundError(f"{what}: not in the cache ({path}); run legodnn-fetch online to download it")
        got = sha256_file(path)
        if got != sha256:
            path.unlink()
            raise BundleVerificationError(
                f"{what}: cached file {path} has SHA-256 {got[:16]}..., the signed manifest says "
                f"{sha256[:16]}...; it was corrupted on this device and has been removed. "
                "Run legodnn-fetch online to download it again."
            )
        return path

    def commit_object(self, sha256: str) -> Path:
        """Move one verified staged file into objects/ (atomic rename)."""
        self.objects.mkdir(parents=True, exist_ok=True)
        target = self.object_path(sha256)
        os.replace(self.staged_path(sha256), target)
        return target

    # ----------------------------------------------------------------- bundles

    def model_dir(self, model_uri: str, model_id: str) -> Path:
        h = hashlib.sha256(model_uri.encode()).hexdigest()[:10]
        return self.bundles / f"{model_id}-{h}"

    @staticmethod
    def version_dir(model_dir: Path, version: int) -> Path:
        return model_dir / f"v{version}"

    def current_version(self, model_dir: Path) -> int | None:
        try:
            return int(json.loads((model_dir / CURRENT_NAME).read_text())["version"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def read_bundle_file(self, model_dir: Path, version: int, name: str) -> bytes | None:
        try:
            return (self.version_dir(model_dir, version) / name).read_bytes()
        except FileNotFoundError:
            return None

    def read_json(self, path: Path) -> Any | None:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def commit(self, objects: list[str], bundles: list[BundleFiles]) -> None:
        """Make a verified fetch visible: objects first, then bundle files, then `current.json`.

        That order keeps every intermediate state consistent: a bundle's metadata only
        appears once the objects it selected are in place, and `current.json` (what
        --offline uses) moves last.
        """
        for sha in objects:
            if self.staged_path(sha).exists():
                self.commit_object(sha)
        for b in bundles:
            vdir = self.version_dir(b.model_dir, b.version)
            write_atomic(b.model_dir / SOURCE_NAME, json.dumps({"uri": b.model_uri}).encode())
            # the signature goes last: a cached version counts only with its signature present
            order = sorted(b.files, key=lambda n: (n == SIGNATURE_NAME, n == MANIFEST_NAME, n))
            for name in order:
                write_atomic(vdir / name, b.files[name])
        for b in bundles:
            write_atomic(b.model_dir / CURRENT_NAME, json.dumps({"version": b.version}).encode())

