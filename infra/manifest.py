"""The bundle manifest: what a published version holds, and the bytes the publisher signs.

A manifest lists every file of a bundle with its size and SHA-256, plus the per-descendant
figures a device needs to decide without downloading anything else (params, FLOPs, memory,
accuracy drop, server latency). It is serialized canonically (sorted keys, fixed
separators), signed as bytes, and parsed back with strict validation: a device trusts a
manifest only after its signature verified, and even then refuses one whose fields are
malformed, naming the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from infra.errors import BundleVerificationError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
TABLE_NAME = "profile.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def descendant_file(block: str, choice: str) -> str:
    """Where a descendant lives inside a bundle version (relative key)."""
    return f"blocks/{block}/{choice}.safetensors"


@dataclass(frozen=True)
class DescendantEntry:
    """One descendant (block variant) of a bundle: its file and what it costs and loses."""

    choice: str
    file: str
    sha256: str
    bytes: int
    header_bytes: int  # length prefix + JSON header: what a device needs to time it
    header_sha256: str
    params: int
    flops: int
    memory_bytes: int
    accuracy_drop: float
    server_latency_ms: float


@dataclass(frozen=True)
class BlockEntry:
    """One block, in chain order, with all its descendants."""

    name: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    scalable: bool
    descendants: tuple[DescendantEntry, ...]

    def descendant(self, choice: str) -> DescendantEntry:
        for d in self.descendants:
            if d.choice == choice:
                return d
        raise KeyError(f"block {self.name!r} has no descendant {choice!r}; it has {[d.choice for d in self.descendants]}")


@dataclass(frozen=True)
class FileEntry:
    file: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest. `to_bytes()` is what gets signed."""

    schema_version: int
    model_id: str
    model_ref: str
    version: int
    created: str
    signer_key_id: str
    input_shape: tuple[int, ...]
    blocks: tuple[BlockEntry, ...]
    table: FileEntry

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def block(self, name: str) -> BlockEntry:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"bundle {self.model_id} v{self.version} has no block {name!r}")

    def descendants(self) -> list[tuple[BlockEntry, DescendantEntry]]:
        return [(b, d) for b in self.blocks for d in b.descendants]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "model_id": self.model_id,
            "model_ref": self.model_ref,
            "version": self.version,
            "created": self.created,
            "signer_key_id": self.signer_key_id,
            "input_shape": list(self.input_shape),
            "blocks": [
                {
                    "name": b.name,
                    "in_shape": list(b.in_shape),
                    "out_shape": list(b.out_shape),
                    "scalable": b.scalable,
                    "descendants": [
                        {
                            "choice": d.choice,
                            "file": d.file,
                            "sha256": d.sha256,
                            "bytes": d.bytes,
                            "header_bytes": d.header_bytes,
                            "header_sha256": d.header_sha256,
                            "params": d.params,
                            "flops": d.flops,
                            "memory_bytes": d.memory_bytes,
                            "accuracy_drop": d.accuracy_drop,
                            "server_latency_ms": d.server_latency_ms,
                        }
                        for d in b.descendants
                    ],
                }
                for b in self.blocks
            ],
            "table": {"file": self.table.file, "sha256": self.table.sha256, "bytes": self.table.bytes},
        }

    def to_bytes(self) -> bytes:
        """Canonical JSON: the same manifest always gives the same bytes (and signature)."""
        return (json.dumps(self.to_dict(), sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "manifest.json") -> Manifest:
        """Parse and validate; BundleVerificationError names the bad field."""
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleVerificationError(f"{where}: not valid JSON ({e})") from None
        return _parse(raw, where)


class _Fields:
    """Typed field access that reports `where.path.to.field` on any problem."""

    def __init__(self, raw: Any, path: str) -> None:
        if not isinstance(raw, dict):
            raise BundleVerificationError(f"{path}: expected an object, got {type(raw).__name__}")
        self.raw, self.path = raw, path

    def _get(self, name: str, types: tuple[type, ...], what: str) -> Any:
        if name not in self.raw:
            raise BundleVerificationError(f"{self.path}.{name}: missing")
        value = self.raw[name]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise BundleVerificationError(f"{self.path}.{name}: expected {what}, got {value!r}")
        return value

    def str(self, name: str) -> str:
        return self._get(name, (str,), "a string")

    def int(self, name: str, minimum: int = 0) -> int:
        value = self._get(name, (int,), "an integer")
        if value < minimum:
            raise BundleVerificationError(f"{self.path}.{name}: must be >= {minimum}, got {value}")
        return value

    def float(self, name: str) -> float:
        return float(self._get(name, (int, float), "a number"))

    def bool(self, name: str) -> bool:
        return self._get(name, (bool,), "true or false")

    def shape(self, name: str) -> tuple[int, ...]:
        value = self._get(name, (list,), "a list of positive integers")
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise BundleVerificationError(f"{self.path}.{name}: expected a list of positive integers, got {value!r}")
        return tuple(value)

    def sha256(self, name: str) -> str:
        value = self.str(name)
        if not _SHA256.match(value):
            raise BundleVerificationError(f"{self.path}.{name}: not a lowercase hex SHA-256: {value!r}")
        return value

    def list(self, name: str) -> list[Any]:
        return self._get(name, (list,), "a list")


def _parse(raw: Any, where: str) -> Manifest:
    top = _Fields(raw, where)
    schema = top.int("schema_version", 1)
    if schema != SCHEMA_VERSION:
        raise BundleVerificationError(
            f"{where}.schema_version: this reader understands schema {SCHEMA_VERSION}, the bundle has "
            f"{schema}; upgrade legodnn on the device"
        )
    blocks = []
    seen: set[str] = set()
    for i, braw in enumerate(top.list("blocks")):
        bf = _Fields(braw, f"{where}.blocks[{i}]")
        name = bf.str("name")
        if name in seen or not name or "/" in name:
            raise BundleVerificationError(f"{bf.path}.name: empty, duplicate or contains '/': {name!r}")
        seen.add(name)
        descendants = []
        for j, draw in enumerate(bf.list("descendants")):
            df = _Fields(draw, f"{bf.path}.descendants[{j}]")
            choice = df.str("choice")
            file = df.str("file")
            if file != descendant_file(name, choice):
                raise BundleVerificationError(
                    f"{df.path}.file: expected {descendant_file(name, choice)!r}, got {file!r}"
                )
            if df.int("header_bytes", 8) > df.int("bytes"):
                raise BundleVerificationError(f"{df.path}.header_bytes: larger than the file ({df.int('bytes')} bytes)")
            descendants.append(
                DescendantEntry(
                    choice=choice,
                    file=file,
                    sha256=df.sha256("sha256"),
                    bytes=df.int("bytes"),
                    header_bytes=df.int("header_bytes", 8),
                    header_sha256=df.sha256("header_sha256"),
                    params=df.int("params"),
                    flops=df.int("flops"),
                    memory_bytes=df.int("memory_bytes"),
                    accuracy_drop=df.float("accuracy_drop"),
                    server_latency_ms=df.float("server_latency_ms"),
                )
            )
        if not descendants:
            raise BundleVerificationError(f"{bf.path}.descendants: empty; every block needs at least one")
        blocks.append(
            BlockEntry(name, bf.shape("in_shape"), bf.shape("out_shape"), bf.bool("scalable"), tuple(descendants))
        )
    if not blocks:
        raise BundleVerificationError(f"{where}.blocks: empty")
    tf = _Fields(top._get("table", (dict,), "an object"), f"{where}.table")
    if tf.str("file") != TABLE_NAME:
        raise BundleVerificationError(f"{where}.table.file: expected {TABLE_NAME!r}")
    return Manifest(
        schema_version=schema,
        model_id=top.str("model_id"),
        model_ref=top.str("model_ref"),
        version=top.int("version", 1),
        created=top.str("created"),
        signer_key_id=top.str("signer_key_id"),
        input_shape=top.shape("input_shape"),
        blocks=tuple(blocks),
        table=FileEntry(TABLE_NAME, tf.sha256("sha256"), tf.int("bytes")),
    )
