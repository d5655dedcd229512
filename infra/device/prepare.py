"""Preparing bundles on the device: verify the manifest, table and cached timings, refuse
rollbacks, and time what is not timed yet. Nothing here downloads a descendant's weights.

Online, for each bundle URI (a model URI `<store>/<model_id>` meaning its `latest`
version, or a version URI `<store>/<model_id>/vN`):

1. download `manifest.json` + `manifest.sig` and verify them with the publisher's public key;
2. refuse a version older than the one this device already runs (`current.json`) unless
   downgrades are allowed: `latest` is not signed, so a store writer could roll devices back;
3. take the ProfileTable from the cache or the store, checked against the manifest;
4. read this device's cached timings (sealed and range-checked) and time every descendant
   they lack, plus a few compositions end to end (`infra.device.latency`).

Offline the same runs from the cache only, choosing among cached descendants.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.bundle import parse_version, read_verified_manifest, resolve_bundle
from infra.device.cache import BundleFiles, DeviceCache
from infra.device.latency import (
    DeviceTable,
    calibrate_composition,
    device_table_name,
    load_device_table,
    measure_missing,
)
from infra.device.objects import FetchStats, ObjectSource
from infra.device.runtime import Runtime
from infra.errors import BundleError, BundleVerificationError, DowngradeError
from infra.manifest import MANIFEST_NAME, SIGNATURE_NAME, TABLE_NAME, BlockEntry, FileEntry, Manifest
from infra.signing import verify
from infra.store import Store, open_store
from legoblocks.files import sha256_bytes

if TYPE_CHECKING:
    from profiling.table import ProfileTable


@dataclass
class FetchedBundle:
    """One verified bundle on this device: manifest, table (named by model id), device timings,
    and where its files come from (`source`; its store is None offline)."""

    model_uri: str
    model_id: str
    version: int
    manifest: Manifest
    table: ProfileTable  # model_name == model_id
    device: DeviceTable
    files: BundleFiles
    source: ObjectSource


@dataclass(frozen=True)
class PrepareOptions:
    """What every bundle of one device run shares."""

    cache: DeviceCache
    public_key: Any
    runtime: Runtime
    fingerprint: dict[str, Any]
    stats: FetchStats
    pending: list[FileEntry]
    attempts: int = 3
    progress: bool = False
    allow_downgrade: bool = False


def model_uri_and_id(uri: str) -> tuple[str, str, int | None]:
    """(model URI, model id, version or None) of a normalized model or version URI, without I/O."""
    trail = uri.rstrip("/").split("/")
    version = parse_version(trail[-1])
    if version is not None:
        return "/".join(trail[:-1]), trail[-2], version
    return "/".join(trail), trail[-1], None


def _check_downgrade(opts: PrepareOptions, model_dir: Path, model_uri: str, version: int) -> None:
    current = opts.cache.current_version(model_dir)
    if current is not None and version < current and not opts.allow_downgrade:
        raise DowngradeError(
            f"{model_uri}: the store offers v{version} but this device already runs v{current} "
            f"({model_dir / 'current.json'}); a store writer may be rolling devices back. Refusing it: pass "
            "--allow-downgrade if the older version is wanted"
        )


def _check_runtime(opts: PrepareOptions, manifest: Manifest, where: str) -> None:
    if opts.runtime.name == "onnxruntime" and manifest.schema_version < 2:
        raise BundleError(
            f"{where}: bundle schema {manifest.schema_version} carries no ONNX blocks (published before "
            "legodnn shipped them); republish it, or run it with --runtime torch"
        )


def _load_table(data: bytes, manifest: Manifest, where: str) -> ProfileTable:
    """The ProfileTable, checked against the signed manifest (hash, blocks, choices)."""
    from profiling.table import ProfileTable, TableError

    if sha256_bytes(data) != manifest.table.sha256 or len(data) != manifest.table.bytes:
        raise BundleVerificationError(
            f"{where}: SHA-256/size do not match the signed manifest; the table was changed. Refusing it."
        )
    try:
        table = ProfileTable.from_dict(json.loads(data))
    except (ValueError, TableError) as e:
        raise BundleVerificationError(f"{where}: {e}") from None
    if table.block_names != manifest.block_names:
        raise BundleVerificationError(f"{where}: table blocks {table.block_names} != manifest blocks {manifest.block_names}")
    for b in manifest.blocks:
        if sorted(table.block(b.name).choices) != sorted(d.choice for d in b.descendants):
            raise BundleVerificationError(f"{where}: choices of block {b.name!r} differ between table and manifest")
    return dataclasses.replace(table, model_name=manifest.model_id)


def _time_bundle(opts: PrepareOptions, model_dir: Path, version: int, blocks: Sequence[BlockEntry],
                 source: ObjectSource) -> DeviceTable:
    """This device's timings of `blocks`' descendants: the verified cache, completed by timing."""
    path = opts.cache.version_dir(model_dir, version) / device_table_name(opts.fingerprint["id"])
    device = load_device_table(opts.cache, path, opts.runtime, opts.fingerprint, opts.stats.warnings.append)
    try:
        pairs = [(b, d) for b in blocks for d in b.descendants]
        measured = measure_missing(device, opts.runtime, pairs, source, progress=opts.progress)
        if measured or device.calibration is None:
            calibrate_composition(device, opts.runtime, blocks, source)
        opts.stats.measured += measured
    finally:
        for skeleton in opts.cache.staging.glob("skeleton-*"):
            skeleton.unlink()
    return device


def prepare_online(uri: str, opts: PrepareOptions) -> FetchedBundle:
    resolved = resolve_bundle(uri)
    manifest, manifest_bytes, signature = read_verified_manifest(resolved, opts.public_key)
    store: Store = resolved.store
    _check_runtime(opts, manifest, store.key_uri(MANIFEST_NAME))
    model_uri = store.uri.rsplit("/", 1)[0]
    model_dir = opts.cache.model_dir(model_uri, manifest.model_id)
    _check_downgrade(opts, model_dir, model_uri, manifest.version)
    what = f"{manifest.model_id}/v{manifest.version}"
    table_bytes = opts.cache.read_bundle_file(model_dir, manifest.version, TABLE_NAME)
    if table_bytes is None or sha256_bytes(table_bytes) != manifest.table.sha256:
        staged = opts.cache.staging / f"{manifest.table.sha256}.table"
        store.get_to_file(TABLE_NAME, staged, size=manifest.table.bytes, sha256=manifest.table.sha256,
                          attempts=opts.attempts)
        table_bytes = staged.read_bytes()
        staged.unlink()
        opts.stats.downloaded.append(f"{what}/{TABLE_NAME}")
        opts.stats.downloaded_bytes += len(table_bytes)
    table = _load_table(table_bytes, manifest, store.key_uri(TABLE_NAME))
    files = BundleFiles(model_dir, model_uri, manifest.version,
                        {MANIFEST_NAME: manifest_bytes, SIGNATURE_NAME: signature, TABLE_NAME: table_bytes})
    source = ObjectSource(opts.cache, store, opts.stats, opts.pending, what, opts.attempts, opts.progress)
    device = _time_bundle(opts, model_dir, manifest.version, manifest.blocks, source)
    files.files[device_table_name(opts.fingerprint["id"])] = opts.cache.seal(device.body())
    return FetchedBundle(model_uri, manifest.model_id, manifest.version, manifest, table, device, files, source)


def prepare_offline(uri: str, opts: PrepareOptions) -> FetchedBundle:
    cache = opts.cache
    # the store's own spelling of the URI (a plain path becomes file://...), as online runs key the cache
    model_uri, model_id, version = model_uri_and_id(open_store(uri).uri)
    model_dir = cache.model_dir(model_uri, model_id)
    if version is None:
        version = cache.current_version(model_dir)
    else:
        _check_downgrade(opts, model_dir, model_uri, version)
    found = {} if version is None else {
        name: cache.read_bundle_file(model_dir, version, name) for name in (MANIFEST_NAME, SIGNATURE_NAME, TABLE_NAME)}
    if not found or any(v is None for v in found.values()):
        raise FileNotFoundError(
            f"--offline: {uri} is not in the cache {cache.root}; run legodnn-fetch once online to fetch it"
        )
    where = f"{model_dir}/v{version}/{MANIFEST_NAME}"
    verify(found[MANIFEST_NAME], found[SIGNATURE_NAME], opts.public_key, what=where)
    manifest = Manifest.from_bytes(found[MANIFEST_NAME], where=where)
    _check_runtime(opts, manifest, where)
    table = _load_table(found[TABLE_NAME], manifest, f"{model_dir}/v{version}/{TABLE_NAME}")
    # Offline the optimizer may choose only descendants whose files are here.
    usable = dataclasses.replace(manifest, blocks=tuple(
        dataclasses.replace(b, descendants=tuple(
            d for d in b.descendants if all(cache.has_object(e) for e in opts.runtime.needs(d))))
        for b in manifest.blocks))
    empty = [b.name for b in usable.blocks if not b.descendants]
    if empty:
        raise FileNotFoundError(f"--offline: blocks {empty} of {model_id} have no cached descendant; fetch online first")
    kept = {b.name: {d.choice for d in b.descendants} for b in usable.blocks}
    table = dataclasses.replace(table, blocks=[
        dataclasses.replace(b, choices={c: p for c, p in b.choices.items() if c in kept[b.name]}) for b in table.blocks])
    source = ObjectSource(cache, None, opts.stats, opts.pending, f"{model_id}/v{version}")
    device = _time_bundle(opts, model_dir, version, usable.blocks, source)
    files = BundleFiles(model_dir, model_uri, version, {device_table_name(opts.fingerprint["id"]): cache.seal(device.body())})
    return FetchedBundle(model_uri, model_id, version, manifest, table, device, files, source)
