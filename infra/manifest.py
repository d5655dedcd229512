"""The bundle manifest: what a published version holds, and the bytes the publisher signs.

A manifest lists every file of a bundle with its size and SHA-256, plus the per-descendant
figures a device needs to decide without downloading anything else (params, FLOPs, memory,
accuracy drop, server latency), and what a device that reads no code needs to run the model:
the input preprocessing and the class names. It is serialized canonically (sorted keys,
fixed separators), signed as bytes, and parsed back with strict validation
(`legoblocks.schema`): a device trusts a manifest only after its signature verified, and
even then refuses one whose fields are malformed, naming the field
(`manifest.json.blocks[3].descendants[0].sha256: ...`).

Schema 2 adds, per descendant, the block as an ONNX graph (`onnx.graph`, weights in
`onnx.data` as ONNX external data, so a device can time a block from its graph alone) and,
per bundle, `preprocessing`, `classes` and `onnx_opset`. Schema 1 manifests (safetensors
only) are still read: the torch runtime runs them; the ONNX runtime says to republish.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from legoblocks.schema import Finite, NonNegativeInt, Positive, PositiveInt, Sha256, convert, join
from infra.errors import BundleVerificationError

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
TABLE_NAME = "profile.json"
ONNX_OPSET = 17  # ONNX Runtime (and its Mobile build) runs opset 17 everywhere since 1.13

Shape = Annotated[tuple[PositiveInt, ...], Meta(min_length=1)]


def descendant_file(block: str, choice: str) -> str:
    """Where a descendant's safetensors file lives inside a bundle version (relative key)."""
    return f"blocks/{block}/{choice}.safetensors"


def onnx_files(block: str, choice: str) -> tuple[str, str]:
    """Where a descendant's ONNX graph and its external weight data live (relative keys)."""
    return f"blocks/{block}/{choice}.onnx", f"blocks/{block}/{choice}.onnx.data"


def onnx_data_location(choice: str) -> str:
    """The external-data location the graph of `choice` names (its data file, beside it)."""
    return f"{choice}.onnx.data"


@dataclass(frozen=True)
class FileEntry:
    """One file of a bundle version: its key, SHA-256 and size."""

    file: str
    sha256: Sha256
    bytes: NonNegativeInt


@dataclass(frozen=True)
class OnnxFiles:
    """A descendant as ONNX: the graph (every initializer stored externally) and its data."""

    graph: FileEntry
    data: FileEntry


@dataclass(frozen=True)
class DescendantEntry:
    """One descendant (block variant) of a bundle: its files and what it costs and loses."""

    choice: str
    file: str  # the safetensors file (torch runtime)
    sha256: Sha256
    bytes: NonNegativeInt
    header_bytes: Annotated[int, Meta(ge=8)]  # length prefix + JSON header: what torch needs to time it
    header_sha256: Sha256
    params: NonNegativeInt
    flops: NonNegativeInt
    memory_bytes: NonNegativeInt
    accuracy_drop: Finite
    server_latency_ms: Finite
    onnx: OnnxFiles | None = None  # schema >= 2

    @property
    def safetensors(self) -> FileEntry:
        return FileEntry(self.file, self.sha256, self.bytes)


@dataclass(frozen=True)
class BlockEntry:
    """One block, in chain order, with all its descendants."""

    name: str
    in_shape: Shape
    out_shape: Shape
    scalable: bool
    descendants: tuple[DescendantEntry, ...]

    def descendant(self, choice: str) -> DescendantEntry:
        for d in self.descendants:
            if d.choice == choice:
                return d
        raise KeyError(f"block {self.name!r} has no descendant {choice!r}; it has {[d.choice for d in self.descendants]}")


@dataclass(frozen=True)
class Preprocessing:
    """How a device turns an image file into the model's input, without reading any code.

    In order: decode as `color` ("grayscale": one channel, "rgb": three); when `resize` is
    set, scale the shorter side to `resize` pixels, then (with `center_crop`) cut the central
    `size` window, else scale straight to `size`; multiply the 0..255 pixel values by
    `pixel_scale`; subtract `mean` and divide by `std`, per channel. `size` is (height,
    width) and `channels` must match the model's input shape.
    """

    channels: Literal[1, 3]
    size: tuple[PositiveInt, PositiveInt]
    mean: tuple[Finite, ...]
    std: tuple[Positive, ...]
    color: Literal["grayscale", "rgb"]
    resize: PositiveInt | None = None
    center_crop: bool = False
    pixel_scale: Positive = 1 / 255


FASHION_MNIST_PREPROCESSING = Preprocessing(
    channels=1, size=(28, 28), mean=(0.2860,), std=(0.3530,), color="grayscale"
)
"""The embedded Fashion-MNIST data source: 28x28 grayscale, [0, 1] pixels normalized as in
`legoblocks.data` (mean 0.2860, std 0.3530)."""

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest. `to_bytes()` is what gets signed."""

    schema_version: int
    model_id: str
    model_ref: str
    version: PositiveInt
    created: str
    signer_key_id: str
    input_shape: Shape
    blocks: tuple[BlockEntry, ...]
    table: FileEntry
    preprocessing: Preprocessing | None = None  # schema >= 2 (optional: a publisher may not know it)
    classes: tuple[str, ...] | None = None
    onnx_opset: int | None = None

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
        return msgspec.to_builtins(self)

    def to_bytes(self) -> bytes:
        """Canonical JSON: the same manifest always gives the same bytes (and signature)."""
        return (json.dumps(self.to_dict(), sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = MANIFEST_NAME) -> Manifest:
        """Parse and validate; BundleVerificationError names the bad field."""
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleVerificationError(f"{where}: not valid JSON ({e})") from None
        schema = raw.get("schema_version") if isinstance(raw, dict) else None
        if schema not in READABLE_SCHEMAS:
            raise BundleVerificationError(
                f"{where}.schema_version: this reader understands schemas {list(READABLE_SCHEMAS)}, the bundle has "
                f"{schema!r}; upgrade legodnn on the device"
            )
        manifest = convert(raw, cls, error=_error, path=where)
        _check(manifest, where)
        return manifest


def _error(path: str, message: str) -> BundleVerificationError:
    return BundleVerificationError(f"{path}: {message}")


def _check(m: Manifest, where: str) -> None:
    """What the types alone cannot say: names, file keys, sizes and the schema's required parts."""
    if not m.blocks:
        raise _error(join(where, "blocks"), "empty")
    seen: set[str] = set()
    for i, b in enumerate(m.blocks):
        path = join(join(where, "blocks"), i)
        if b.name in seen or not b.name or "/" in b.name:
            raise _error(join(path, "name"), f"empty, duplicate or contains '/': {b.name!r}")
        seen.add(b.name)
        if not b.descendants:
            raise _error(join(path, "descendants"), "empty; every block needs at least one")
        for j, d in enumerate(b.descendants):
            _check_descendant(b, d, m.schema_version, join(join(path, "descendants"), j))
    if m.table.file != TABLE_NAME:
        raise _error(join(join(where, "table"), "file"), f"expected {TABLE_NAME!r}")
    if m.schema_version >= 2 and m.onnx_opset is None:
        raise _error(join(where, "onnx_opset"), "missing (schema 2 bundles carry ONNX blocks)")
    if m.classes is not None and len(set(m.classes)) != len(m.classes):
        raise _error(join(where, "classes"), "class names must be unique")
    if m.preprocessing is not None:
        _check_preprocessing(m.preprocessing, m.input_shape, join(where, "preprocessing"))


def _check_descendant(b: BlockEntry, d: DescendantEntry, schema: int, path: str) -> None:
    if d.file != descendant_file(b.name, d.choice):
        raise _error(join(path, "file"), f"expected {descendant_file(b.name, d.choice)!r}, got {d.file!r}")
    if d.header_bytes > d.bytes:
        raise _error(join(path, "header_bytes"), f"larger than the file ({d.bytes} bytes)")
    if d.onnx is None:
        if schema >= 2:
            raise _error(join(path, "onnx"), "missing (schema 2 bundles carry every descendant as ONNX)")
        return
    graph, data = onnx_files(b.name, d.choice)
    if d.onnx.graph.file != graph:
        raise _error(join(join(join(path, "onnx"), "graph"), "file"), f"expected {graph!r}, got {d.onnx.graph.file!r}")
    if d.onnx.data.file != data:
        raise _error(join(join(join(path, "onnx"), "data"), "file"), f"expected {data!r}, got {d.onnx.data.file!r}")


def _check_preprocessing(p: Preprocessing, input_shape: tuple[int, ...], path: str) -> None:
    expected = (p.channels, *p.size)
    if tuple(input_shape) != expected:
        raise _error(path, f"channels and size give input {list(expected)}, the model takes {list(input_shape)}")
    if (p.color == "grayscale") != (p.channels == 1):
        raise _error(join(path, "color"), f"{p.color!r} does not give {p.channels} channel(s)")
    for name in ("mean", "std"):
        if len(getattr(p, name)) != p.channels:
            raise _error(join(path, name), f"needs one value per channel ({p.channels})")
    if p.center_crop and (p.resize is None or p.resize < min(p.size)):
        raise _error(join(path, "center_crop"), "needs resize >= the smaller side of size (the crop's source)")


def check_preprocessing(p: Preprocessing, input_shape: tuple[int, ...]) -> Preprocessing:
    """A publisher's preprocessing checked against the model input (ValueError names the field)."""
    try:
        _check_preprocessing(p, input_shape, "preprocessing")
    except BundleVerificationError as e:
        raise ValueError(str(e)) from None
    return p
