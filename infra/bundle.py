"""Signed block bundles: publishing a ScalableModel + ProfileTable to a store, listing, resolving.

Layout in a store (file:// or s3://):

    <root>/<model_id>/latest                   {"version": N}: moved forward only, by compare-and-swap
    <root>/<model_id>/v<N>/CLAIM               created with a conditional create: owns version N
    <root>/<model_id>/v<N>/blocks/<block>/<choice>.safetensors     torch runtime
    <root>/<model_id>/v<N>/blocks/<block>/<choice>.onnx            ONNX graph (weights external)
    <root>/<model_id>/v<N>/blocks/<block>/<choice>.onnx.data       its weights
    <root>/<model_id>/v<N>/profile.json        the ProfileTable, byte for byte
    <root>/<model_id>/v<N>/manifest.json       lists every file above with size and SHA-256
    <root>/<model_id>/v<N>/manifest.sig        Ed25519 signature of manifest.json's bytes

Publishing protocol (why each step is safe with concurrent publishers and readers):

1. Claim a version: create `v<N>/CLAIM` only if absent (S3 `If-None-Match: *`, on disk
   `os.link`), N = highest existing + 1, retrying N+1 on conflict. Two publishers can never
   own the same N, so they never write into each other's prefix (no mixed files).
2. Upload descendant files (safetensors, ONNX graph and data), then the table, then the manifest, then the signature.
   Readers consider a version only once `manifest.sig` exists, and the signature is written
   last, so a half-published version is invisible. A publisher that dies leaves an unsigned
   claimed prefix that everyone ignores; the next publisher takes the next number.
3. Move `latest` with compare-and-swap (S3 `If-Match: <ETag>`), and only forward: a slower
   publisher of a lower version never moves `latest` back. It always names a complete version.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import socket
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.errors import BundleError, BundleVerificationError, ObjectNotFoundError
from infra.manifest import (
    MANIFEST_NAME,
    ONNX_OPSET,
    SCHEMA_VERSION,
    SIGNATURE_NAME,
    TABLE_NAME,
    BlockEntry,
    DescendantEntry,
    FileEntry,
    Manifest,
    OnnxFiles,
    Preprocessing,
    check_preprocessing,
    descendant_file,
    onnx_files,
)
from infra.signing import key_id, load_private_key, sign, verify
from infra.skeleton import file_header
from infra.store import Store, open_store
from legoblocks.files import sha256_file

CLAIM_NAME = "CLAIM"
LATEST_NAME = "latest"
_VERSION = re.compile(r"^v([0-9]+)$")
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CLAIM_ATTEMPTS = 1000


def version_dir(version: int) -> str:
    return f"v{version}"


def parse_version(name: str) -> int | None:
    m = _VERSION.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class PublishedBundle:
    """What publish_bundle made: the version's URI (give it, or the model URI, to legodnn-fetch)."""

    uri: str
    version: int
    manifest: dict[str, Any]


@dataclass(frozen=True)
class BundleRef:
    """One complete (signed) version in a store."""

    model_id: str
    version: int
    uri: str
    latest: bool


def _check_model_id(model_id: str) -> str:
    if not _MODEL_ID.match(model_id) or parse_version(model_id) is not None:
        raise ValueError(
            f"model id {model_id!r} is not usable: use letters, digits, '.', '_' or '-' "
            "(at most 128, not starting with a symbol, and not of the form v<digits>)"
        )
    return model_id


def _read_scalable(scalable_dir: Path) -> dict[str, Any]:
    """scalable.json of a ScalableModel directory (the format docs/ARCHITECTURE.md fixes)."""
    path = scalable_dir / "scalable.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: --scalable must be a directory written by ScalableModel.save()"
        ) from None
    if not isinstance(meta, dict) or not {"blocks", "choices", "input_shape"} <= set(meta):
        raise ValueError(f"{path}: expected keys blocks, choices and input_shape (a ScalableModel.save() directory)")
    return meta


def _file_entry(key: str, path: Path) -> FileEntry:
    return FileEntry(key, sha256_file(path), path.stat().st_size)


def _export_onnx(scalable_dir: Path, meta: dict[str, Any], out: Path, progress: bool) -> dict[tuple[str, str], OnnxFiles]:
    """Every descendant as a checked ONNX graph + data file under `out` (infra.onnx_blocks)."""
    from infra.onnx_blocks import export_block

    specs = [(spec, choice) for spec in meta["blocks"] for choice in meta["choices"][spec["name"]]]
    bar = _progress_bar(progress, len(specs), "export ONNX blocks")
    files = {}
    for spec, choice in specs:
        name = spec["name"]
        source = scalable_dir / name / f"{choice}.safetensors"
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing: the ScalableModel directory is incomplete")
        exported = export_block(source, spec["in_shape"], out / name, choice, where=f"{name}/{choice}")
        graph_key, data_key = onnx_files(name, choice)
        files[(name, choice)] = OnnxFiles(_file_entry(graph_key, exported.graph), _file_entry(data_key, exported.data))
        bar.update(1)
    bar.close()
    return files


def _build_manifest(
    scalable_dir: Path, table_path: Path, model_id: str, signer: str, onnx: dict[tuple[str, str], OnnxFiles],
    preprocessing: Preprocessing | None, classes: Sequence[str] | None,
) -> Manifest:
    """Cross-check the ScalableModel directory against its ProfileTable and describe both (as version 1)."""
    from profiling.table import load as load_table

    meta = _read_scalable(scalable_dir)
    table = load_table(table_path)
    names = [b["name"] for b in meta["blocks"]]
    if names != table.block_names:
        raise ValueError(
            f"{table_path} profiles blocks {table.block_names} but {scalable_dir} has {names}; "
            "publish the table that was made from this ScalableModel"
        )
    blocks = []
    for spec in meta["blocks"]:
        name = spec["name"]
        choices = list(meta["choices"][name])
        profiled = table.block(name).choices
        if sorted(choices) != sorted(profiled):
            raise ValueError(
                f"block {name!r}: {scalable_dir} has choices {choices} but {table_path} profiles {list(profiled)}"
            )
        entries = []
        for choice in choices:
            path = scalable_dir / name / f"{choice}.safetensors"
            p = profiled[choice]
            header = file_header(path)
            entries.append(
                DescendantEntry(
                    choice=choice,
                    file=descendant_file(name, choice),
                    sha256=sha256_file(path),
                    bytes=path.stat().st_size,
                    header_bytes=len(header),
                    header_sha256=hashlib.sha256(header).hexdigest(),
                    params=p.params,
                    flops=p.flops,
                    memory_bytes=p.peak_bytes,
                    accuracy_drop=p.accuracy_drop,
                    server_latency_ms=p.latency.median_ms,
                    onnx=onnx[(name, choice)],
                )
            )
        blocks.append(BlockEntry(name=name, in_shape=tuple(spec["in_shape"]), out_shape=tuple(spec["out_shape"]),
                                 scalable=bool(spec["scalable"]), descendants=tuple(entries)))
    input_shape = tuple(meta["input_shape"])
    if preprocessing is not None:
        check_preprocessing(preprocessing, input_shape)
    outputs = blocks[-1].out_shape[-1] if blocks else 0
    if classes is not None and (len(classes) != outputs or len(set(classes)) != len(classes)):
        raise ValueError(f"classes: {len(classes)} names given, the model has {outputs} outputs; give one unique "
                         "name per output")
    return Manifest(
        schema_version=SCHEMA_VERSION,
        model_id=model_id,
        model_ref=str(meta.get("model_ref") or table.model_ref),
        version=1,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        signer_key_id=signer,
        input_shape=input_shape,
        blocks=tuple(blocks),
        table=_file_entry(TABLE_NAME, table_path),
        preprocessing=preprocessing,
        classes=None if classes is None else tuple(classes),
        onnx_opset=ONNX_OPSET,
    )


def _versions(model_store: Store, *, signed_only: bool) -> list[int]:
    """Version numbers under a model prefix: all claimed ones, or only complete (signed) ones."""
    wanted = SIGNATURE_NAME if signed_only else CLAIM_NAME
    found = set()
    for key in model_store.list("v"):
        head, _, rest = key.partition("/")
        n = parse_version(head)
        if n is not None and rest == wanted:
            found.add(n)
    return sorted(found)


def _claim_version(model_store: Store) -> int:
    """Own the next free version number (conditional create of its CLAIM object)."""
    token = json.dumps(
        {"publisher": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
         "claimed": dt.datetime.now(dt.timezone.utc).isoformat()}
    ).encode()
    n = max(_versions(model_store, signed_only=False), default=0) + 1
    for _ in range(_CLAIM_ATTEMPTS):
        key = f"{version_dir(n)}/{CLAIM_NAME}"
        # Read-back guards against a server that ignores If-None-Match: only the holder of the
        # stored token owns the version.
        if model_store.create_exclusive(key, token) and model_store.get_bytes(key) == token:
            return n
        n += 1
    raise BundleError(f"could not claim a version under {model_store.uri} after {_CLAIM_ATTEMPTS} attempts")


def _move_latest(model_store: Store, version: int) -> None:
    """Point `latest` at `version` unless it already names a newer one (compare-and-swap loop)."""
    body = json.dumps({"version": version}).encode()
    for _ in range(_CLAIM_ATTEMPTS):  # each failed attempt means another publisher moved it meanwhile
        current = model_store.get_with_tag(LATEST_NAME)
        if current is None:
            if model_store.create_exclusive(LATEST_NAME, body):
                return
            continue
        data, tag = current
        if _parse_latest(data, model_store.key_uri(LATEST_NAME)) >= version:
            return
        if model_store.replace_if_match(LATEST_NAME, body, tag):
            return
    raise BundleError(
        f"could not move {model_store.key_uri(LATEST_NAME)} to v{version} after {_CLAIM_ATTEMPTS} attempts; "
        "does the store support If-Match conditional writes? The version itself is published and signed."
    )


def _parse_latest(data: bytes, where: str) -> int:
    try:
        version = json.loads(data)["version"]
    except (ValueError, KeyError, TypeError):
        raise BundleVerificationError(f"{where}: not a latest pointer ({data[:80]!r}); expected {{\"version\": N}}") from None
    if not isinstance(version, int) or version < 1:
        raise BundleVerificationError(f"{where}: version must be a positive integer, got {version!r}")
    return version


def publish_bundle(
    scalable_dir: str | Path,
    table_path: str | Path,
    store_uri: str,
    private_key: str | Path,
    model_id: str,
    *,
    preprocessing: Preprocessing | None = None,
    classes: Sequence[str] | None = None,
    progress: bool = False,
) -> PublishedBundle:
    """Publish a ScalableModel directory and its ProfileTable as the next signed version.

    Args:
        scalable_dir: a directory written by `ScalableModel.save()`.
        table_path: the ProfileTable JSON made from it.
        store_uri: `file:///dir`, a plain path, or `s3://bucket/prefix` (boto3 credential
            chain, `AWS_ENDPOINT_URL`).
        private_key: the PEM file from `legodnn keys init`.
        model_id: the name devices fetch it by (`<store_uri>/<model_id>`).
        preprocessing: how a device turns an image into the model's input (e.g.
            `infra.manifest.FASHION_MNIST_PREPROCESSING`); None leaves it out, and
            `legodnn-fetch predict` then refuses the bundle.
        classes: one name per model output (e.g. `FASHION_MNIST_CLASSES`); None: indices.
        progress: show tqdm bars.

    Returns:
        The version URI, the version number and the manifest (log both to MLflow).

    Every descendant is also exported to ONNX and checked against its torch block before
    anything is claimed (`infra.onnx_blocks`). Safe to run concurrently with other
    publishers of the same model (see module docstring).
    """
    scalable_dir, table_path = Path(scalable_dir), Path(table_path)
    _check_model_id(model_id)
    key = load_private_key(private_key)
    signer = key_id(key.public_key())
    with tempfile.TemporaryDirectory(prefix="legodnn-onnx-") as tmp:
        # Validate and export everything before claiming, so bad input never burns a version number.
        onnx = _export_onnx(scalable_dir, _read_scalable(scalable_dir), Path(tmp), progress)
        manifest = _build_manifest(scalable_dir, table_path, model_id, signer, onnx, preprocessing, classes)
        model_store = open_store(store_uri).child(model_id)
        version = _claim_version(model_store)
        manifest = dataclasses.replace(manifest, version=version)
        vstore = model_store.child(version_dir(version))
        files = []
        for b, d in manifest.descendants():
            files.append((d.file, scalable_dir / b.name / f"{d.choice}.safetensors"))
            assert d.onnx is not None
            files += [(e.file, Path(tmp) / b.name / Path(e.file).name) for e in (d.onnx.graph, d.onnx.data)]
        files.append((TABLE_NAME, table_path))
        bar = _progress_bar(progress, len(files) + 2, f"publish {model_id} v{version}")
        for key_name, path in files:
            vstore.put_file(key_name, path)
            bar.update(1)
    manifest_bytes = manifest.to_bytes()
    vstore.put_bytes(MANIFEST_NAME, manifest_bytes)
    bar.update(1)
    vstore.put_bytes(SIGNATURE_NAME, sign(manifest_bytes, key))  # last: the version becomes visible
    bar.update(1)
    bar.close()
    _move_latest(model_store, version)
    return PublishedBundle(uri=vstore.uri, version=version, manifest=manifest.to_dict())


def _progress_bar(enabled: bool, total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="file", disable=not enabled, leave=False)


def list_bundles(uri: str) -> list[BundleRef]:
    """Every complete (signed) version under `uri`: a store root, a model URI or a version URI."""
    store = open_store(uri)
    trail = store.uri.rstrip("/").split("/")
    refs: list[BundleRef] = []
    by_model: dict[str, list[int]] = {}
    for key in store.list(""):
        parts = key.split("/")
        if parts[-1] != SIGNATURE_NAME:
            continue
        if len(parts) == 1 and parse_version(trail[-1]) is not None:  # uri is a version
            by_model.setdefault(trail[-2], []).append(parse_version(trail[-1]) or 0)
        elif len(parts) == 2 and parse_version(parts[0]) is not None:  # uri is a model
            by_model.setdefault(trail[-1], []).append(parse_version(parts[0]) or 0)
        elif len(parts) == 3 and parse_version(parts[1]) is not None:  # uri is a store root
            by_model.setdefault(parts[0], []).append(parse_version(parts[1]) or 0)
    for model_id, versions in sorted(by_model.items()):
        model_store = _model_store_for(store, model_id, trail)
        latest = model_store.get_with_tag(LATEST_NAME)
        latest_n = _parse_latest(latest[0], model_store.key_uri(LATEST_NAME)) if latest else max(versions)
        for v in sorted(versions):
            refs.append(BundleRef(model_id, v, f"{model_store.uri}/{version_dir(v)}", v == latest_n))
    return refs


def _model_store_for(store: Store, model_id: str, trail: list[str]) -> Store:
    """The model-level store, whichever level `store` was opened at."""
    if parse_version(trail[-1]) is not None and trail[-2] == model_id:
        return open_store("/".join(trail[:-1]))
    if trail[-1] == model_id:
        return store
    return store.child(model_id)


@dataclass(frozen=True)
class ResolvedBundle:
    """A version chosen for fetching: its store, and the model id and number it claims to be."""

    store: Store
    model_id: str
    version: int


def resolve_bundle(uri: str) -> ResolvedBundle:
    """A version URI as is; a model URI to the version `latest` names.

    Without a `latest` pointer (a first publisher died before moving it) the highest signed
    version is used.
    """
    store = open_store(uri)
    trail = store.uri.rstrip("/").split("/")
    version = parse_version(trail[-1])
    if version is not None and len(trail) >= 2:
        return ResolvedBundle(store, trail[-2], version)
    latest = store.get_with_tag(LATEST_NAME)
    if latest is not None:
        version = _parse_latest(latest[0], store.key_uri(LATEST_NAME))
    else:
        signed = _versions(store, signed_only=True)
        if not signed:
            raise ObjectNotFoundError(
                f"no published bundle at {uri}: expected {uri}/{LATEST_NAME} or {uri}/vN/{SIGNATURE_NAME}. "
                "Give a model URI (<store>/<model_id>) or a version URI (<store>/<model_id>/vN); "
                "`legodnn bundles list <store>` shows what exists"
            )
        version = signed[-1]
    return ResolvedBundle(store.child(version_dir(version)), trail[-1], version)


def read_verified_manifest(resolved: ResolvedBundle, public_key: Any) -> tuple[Manifest, bytes, bytes]:
    """Download manifest + signature, verify the signature, parse, and check the identity.

    Returns (manifest, manifest bytes, signature bytes) so a cache can keep the exact
    signed bytes. The manifest's own model id and version must match the URI it came from,
    so a validly signed bundle cannot be replayed under another name or version.
    """
    where = resolved.store.key_uri(MANIFEST_NAME)
    try:
        signature = resolved.store.get_bytes(SIGNATURE_NAME)
    except ObjectNotFoundError:
        raise BundleVerificationError(
            f"{resolved.store.key_uri(SIGNATURE_NAME)} is missing: the version is unsigned or still "
            "being published. Refusing it."
        ) from None
    data = resolved.store.get_bytes(MANIFEST_NAME)
    verify(data, signature, public_key, what=where)
    manifest = Manifest.from_bytes(data, where=where)
    if (manifest.model_id, manifest.version) != (resolved.model_id, resolved.version):
        raise BundleVerificationError(
            f"{where}: signed for {manifest.model_id} v{manifest.version} but found at "
            f"{resolved.model_id} v{resolved.version}; refusing a bundle moved to another name or version"
        )
    return manifest, data, signature
