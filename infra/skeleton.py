"""Descendant *skeletons*: the real safetensors header padded with zeros, for timing.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header (here
including the module's declarative spec), then the raw tensor bytes. Latency depends on the
architecture (in the header), not on the weight values, so a device can time a descendant
from its header alone (a few KB) before deciding whether to download the weights.

The header's length and SHA-256 are in the signed manifest, so a device checks the header
before parsing it: nothing unverified is ever loaded, not even for timing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from infra.errors import BundleVerificationError
from infra.store import Store

MAX_HEADER = 100 * 1024 * 1024  # the safe loader's own limit


def header_length(prefix: bytes, size: int, where: str) -> int:
    """8 + N for a file of `size` bytes starting with `prefix` (at least its first 8 bytes)."""
    if len(prefix) < 8:
        raise BundleVerificationError(f"{where}: too short to be a safetensors file")
    n = int.from_bytes(prefix[:8], "little")
    if n > size - 8 or n > MAX_HEADER:
        raise BundleVerificationError(f"{where}: header length {n} does not fit a {size}-byte file")
    return 8 + n


def file_header(path: Path) -> bytes:
    """The length prefix and JSON header of a local safetensors file (publisher side)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = header_length(f.read(8), size, str(path))
        f.seek(0)
        return f.read(n)


def fetch_header(store: Store, key: str, length: int, sha256: str) -> bytes:
    """Download exactly the signed header span and check it against the manifest."""
    data = b"".join(store.read_range(key, 0, length))
    got = hashlib.sha256(data).hexdigest()
    if len(data) != length or got != sha256:
        raise BundleVerificationError(
            f"{store.key_uri(key)}: header does not match the signed manifest ({len(data)} bytes, SHA-256 "
            f"{got[:16]}..., expected {length} bytes, {sha256[:16]}...); the file was changed after signing. "
            "Refusing it."
        )
    return data


def write_skeleton(header: bytes, size: int, path: Path) -> Path:
    """A file with the real header and zero bytes in place of the weights (sparse on disk)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(size)
    return path
