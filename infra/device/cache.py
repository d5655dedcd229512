"""The device cache: what a device keeps between runs, how it changes, and why nothing in it is
trusted without a check.

Layout under the cache directory:

    device.key                        32 random bytes (mode 0600): seals what the device wrote
    objects/<sha256>.<kind>           verified bundle files, content-addressed: .safetensors,
                                      .onnx (block graph), .onnx.data (its weights)
    bundles/<model_id>-<h>/           one model URI (h: hash of the URI, so equal model ids
                                      from different stores never mix)
        source.json                   {"uri": model URI}
        current.json                  sealed {"version": N}: the last version fetched
                                      (--offline uses it; an older version is a rollback)
        v<N>/manifest.json            the exact signed bytes
        v<N>/manifest.sig
        v<N>/profile.json             the ProfileTable
        v<N>/device-<fingerprint>.json   sealed latencies measured on this device
    staging/                          downloads in progress (`.part`, resumable) and verified
                                      files not yet committed

Every check, and what a failure does:
- bundle files (manifest, signature, table) are checked against the signature and the
  signed hashes every time they are read;
- an object is re-hashed every time it is used; a corrupted one is removed (an online fetch
  downloads it again in the same run, an offline one is refused);
- a file moves from staging into `objects/` only with the SHA-256 the signed manifest gives;
- files the device wrote itself (timings, `current.json`) carry an HMAC with the device key:
  one that was edited, truncated or copied from another cache does not verify and is
  measured again (timings) or treated as unknown (`current.json`).

Only `commit` changes `objects/` and `bundles/`, and it runs after everything of a fetch
verified: a refused fetch leaves the cache as it was (staging is scratch space).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.errors import BundleVerificationError
from infra.manifest import MANIFEST_NAME, SIGNATURE_NAME, FileEntry
from legoblocks.files import canonical_json, sha256_bytes, sha256_file, write_atomic

CURRENT_NAME = "current.json"
SOURCE_NAME = "source.json"
KEY_NAME = "device.key"
_KEY_BYTES = 32


def object_suffix(file: str) -> str:
    """The kind of a bundle file, kept on its cached object's name."""
    for suffix in (".onnx.data", ".onnx", ".safetensors"):
        if file.endswith(suffix):
            return suffix
    return ""


@dataclass
class BundleFiles:
    """The small per-version files a fetch writes into the cache at commit time."""

    model_dir: Path
    model_uri: str
    version: int
    files: dict[str, bytes] = field(default_factory=dict)  # name inside v<N>/ -> bytes


class DeviceCache:
    """Paths, checks and the all-or-nothing commit of the device cache (see module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"--cache {self.root} is a file, not a directory: give a directory (made if missing)")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--cache {self.root}: cannot create it ({e.strerror}); give a writable directory") from None
        self.objects = self.root / "objects"
        self.staging = self.root / "staging"
        self.bundles = self.root / "bundles"
        self._key: bytes | None = None

    # ----------------------------------------------------------------- objects

    def object_path(self, entry: FileEntry) -> Path:
        return self.objects / f"{entry.sha256}{object_suffix(entry.file)}"

    def has_object(self, entry: FileEntry) -> bool:
        return self.object_path(entry).is_file()

    def staged_path(self, entry: FileEntry) -> Path:
        return self.staging / entry.sha256

    def commit_object(self, entry: FileEntry) -> Path:
        """Move one staged file into objects/, only with the signed SHA-256 (else it is removed)."""
        staged = self.staged_path(entry)
        got = sha256_file(staged)
        if got != entry.sha256:
            staged.unlink()
            raise BundleVerificationError(
                f"{entry.file}: staged file {staged} has SHA-256 {got[:16]}..., the signed manifest says "
                f"{entry.sha256[:16]}...; it was removed, not cached. Run legodnn-fetch again to download it."
            )
        self.objects.mkdir(parents=True, exist_ok=True)
        target = self.object_path(entry)
        os.replace(staged, target)
        return target

    # ----------------------------------------------------------------- sealing

    def _device_key(self) -> bytes:
        """The cache's own HMAC key, made on first use (0600)."""
        if self._key is None:
            path = self.root / KEY_NAME
            try:
                key = path.read_bytes()
            except FileNotFoundError:
                key = b""
            if len(key) != _KEY_BYTES:  # missing or damaged: a new key (every sealed file is then re-made)
                key = secrets.token_bytes(_KEY_BYTES)
                tmp = path.with_name(f".{KEY_NAME}.{os.getpid()}")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(key)
                os.replace(tmp, path)
            self._key = key
        return self._key

    def _mac(self, body: Any) -> str:
        return hmac.new(self._device_key(), canonical_json(body).encode(), hashlib.sha256).hexdigest()

    def seal(self, body: dict[str, Any]) -> bytes:
        """`body` as JSON with this device's HMAC: what `unseal` accepts back."""
        return (json.dumps({"sealed": body, "hmac": self._mac(body)}, indent=1, sort_keys=True) + "\n").encode()

    def unseal(self, data: bytes) -> dict[str, Any]:
        """The body of a sealed file; ValueError says why it does not verify."""
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, ValueError):
            raise ValueError("not valid JSON") from None
        if not isinstance(doc, dict) or set(doc) != {"sealed", "hmac"} or not isinstance(doc["sealed"], dict):
            raise ValueError('not a sealed file ({"sealed": ..., "hmac": ...})')
        if not isinstance(doc["hmac"], str) or not hmac.compare_digest(doc["hmac"], self._mac(doc["sealed"])):
            raise ValueError("its HMAC does not verify with this cache's device key (edited, or not written here)")
        return doc["sealed"]

    # ----------------------------------------------------------------- bundles

    def model_dir(self, model_uri: str, model_id: str) -> Path:
        return self.bundles / f"{model_id}-{sha256_bytes(model_uri.encode())[:10]}"

    @staticmethod
    def version_dir(model_dir: Path, version: int) -> Path:
        return model_dir / f"v{version}"

    def current_version(self, model_dir: Path) -> int | None:
        """The version last fetched for this model URI, or None (never fetched, or the file
        does not verify: then nothing is assumed about it)."""
        try:
            body = self.unseal((model_dir / CURRENT_NAME).read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        version = body.get("version")
        return version if isinstance(version, int) and not isinstance(version, bool) and version >= 1 else None

    def read_bundle_file(self, model_dir: Path, version: int, name: str) -> bytes | None:
        try:
            return (self.version_dir(model_dir, version) / name).read_bytes()
        except FileNotFoundError:
            return None

    def commit(self, objects: list[FileEntry], bundles: list[BundleFiles]) -> None:
        """Make a verified fetch visible: objects first, then bundle files, then `current.json`.

        That order keeps every intermediate state consistent: a bundle's metadata only
        appears once the objects it selected are in place, and `current.json` (what
        --offline uses) moves last.
        """
        for entry in objects:
            if self.staged_path(entry).exists():
                self.commit_object(entry)
        for b in bundles:
            vdir = self.version_dir(b.model_dir, b.version)
            write_atomic(b.model_dir / SOURCE_NAME, json.dumps({"uri": b.model_uri}))
            # the signature goes last: a cached version counts only with its signature present
            for name in sorted(b.files, key=lambda n: (n == SIGNATURE_NAME, n == MANIFEST_NAME, n)):
                write_atomic(vdir / name, b.files[name])
        for b in bundles:
            write_atomic(b.model_dir / CURRENT_NAME, self.seal({"version": b.version}))
