"""`legodnn-fetch`: the device side. Fetch signed bundles, time them here, solve, assemble, adapt.

    legodnn-fetch URI [URI ...] --public-key KEY --cache DIR --latency-ms X --memory-mb Y
                  [--json] [--watch FILE] [--offline] [--verify-latency ROUNDS]

For each bundle URI (a model URI `<store>/<model_id>` meaning its `latest` version, or a
version URI `<store>/<model_id>/vN`):

1. download `manifest.json` + `manifest.sig` and verify them with the publisher's public
   key (nothing else is trusted before that);
2. fetch the ProfileTable (or take it from the cache), checked against the manifest;
3. time every descendant on this device once (cached per hardware fingerprint; not yet
   downloaded descendants are timed from their headers, see `infra.device_latency`);
4. solve all bundles jointly under the budgets (profiling.table.to_problem with the
   device latencies, optimizer.solve);
5. download only the chosen descendants missing from the cache (resumable, SHA-256
   checked), and commit to the cache only after everything verified;
6. assemble each model as a BlockSwitcher whose blocks load from the verified cache.

`--verify-latency ROUNDS` then times the assembled models end to end and, while they run
over the latency budget, re-solves under a budget tightened by the overrun
(optimizer.solve_measured): summed block timings are right on average, but the optimizer
picks exactly the compositions they underestimate.
`--watch FILE` then re-reads budgets from FILE (`{"latency_ms": .., "memory_mb": ..}`)
whenever it changes, re-solves and swaps only changed blocks (optimizer.RuntimeScaler); with
`--verify-latency` each change is timed and tightened the same way.
`--offline` does all of it from the cache, choosing only among cached descendants.

This module and everything it imports needs only torch, numpy, boto3, cryptography (and
safetensors/scipy through the project's loader and solver): never Ray, MLflow or Optuna,
so it runs on a device with a minimal install.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from infra.bundle import ResolvedBundle, parse_version, read_verified_manifest, resolve_bundle
from infra.device_cache import BundleFiles, DeviceCache
from infra.device_latency import (
    DeviceLatencySettings,
    DeviceTable,
    calibrate_composition,
    device_table_name,
    measure_missing,
)
from infra.errors import BundleError, BundleVerificationError
from infra.manifest import MANIFEST_NAME, SIGNATURE_NAME, TABLE_NAME, BlockEntry, DescendantEntry, Manifest
from infra.signing import load_public_key
from infra.skeleton import fetch_header, write_skeleton
from infra.store import Store, open_store

if TYPE_CHECKING:  # imported lazily at run time: `legodnn-fetch --help` stays instant
    from optimizer.measured import MeasuredSolution
    from optimizer.solver import Solution
    from profiling.table import ProfileTable

MIB = 1 << 20


class InfeasibleBudgetError(BundleError):
    """No selection of the fetched bundles fits the budgets."""


@dataclass(frozen=True)
class DeviceBudgets:
    """The device's budgets: total latency of all models (ms) and total memory (bytes); None = no limit."""

    latency_ms: float | None
    memory_bytes: float | None

    @classmethod
    def from_json(cls, data: Any, *, where: str) -> DeviceBudgets:
        """Budgets from `{"latency_ms": .., "memory_mb": ..}` (the --watch file format)."""
        if not isinstance(data, dict) or not set(data) <= {"latency_ms", "memory_mb"}:
            raise ValueError(f'{where}: expected {{"latency_ms": X, "memory_mb": Y}}, got {data!r}')
        values = {}
        for key in ("latency_ms", "memory_mb"):
            v = data.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                raise ValueError(f"{where}: {key} must be a positive number or null, got {v!r}")
            values[key] = v
        mem = values["memory_mb"]
        return cls(values["latency_ms"], None if mem is None else float(mem) * MIB)

    def as_problem_budgets(self) -> dict[str, float | None]:
        return {"latency_ms": self.latency_ms, "memory_bytes": self.memory_bytes}


@dataclass
class FetchStats:
    """What a fetch cost: files downloaded (descendants and tables) and descendants timed."""

    downloaded: list[str] = field(default_factory=list)
    downloaded_bytes: int = 0
    headers_read: int = 0
    measured: int = 0


@dataclass
class FetchedBundle:
    """One verified bundle on this device: manifest, table (named by model id), device latencies."""

    model_uri: str
    model_id: str
    version: int
    manifest: Manifest
    table: ProfileTable  # model_name == model_id
    device: DeviceTable
    files: BundleFiles
    store: Store | None  # the version's store; None offline

    def descendant(self, block: str, choice: str) -> DescendantEntry:
        return self.manifest.block(block).descendant(choice)


@dataclass
class ModelReport:
    model_id: str
    version: int
    uri: str
    selection: dict[str, str]
    predicted_accuracy: float
    latency_ms: float
    memory_bytes: float


class DeviceSession:
    """Verified bundles for one device run: solves, downloads what a selection needs, assembles.

    Use `open_session` to make one; `fetch` is the one-call form the CLI uses.
    """

    def __init__(
        self,
        bundles: list[FetchedBundle],
        cache: DeviceCache,
        stats: FetchStats,
        *,
        fingerprint: dict[str, Any],
        offline: bool,
        attempts: int,
        progress: bool,
        torch_device: str = "cpu",
        settings: DeviceLatencySettings | None = None,
    ) -> None:
        self.bundles = {b.model_id: b for b in bundles}
        self.torch_device = torch_device
        self.settings = settings or DeviceLatencySettings(device=torch_device)
        self.cache = cache
        self.stats = stats
        self.fingerprint = fingerprint
        self.offline = offline
        self.attempts = attempts
        self.progress = progress
        self.switchers: dict[str, Any] = {}

    # ------------------------------------------------------------------ solving

    def problem(self, budgets: DeviceBudgets) -> dict[str, Any]:
        """The joint optimizer problem over all bundles, with this device's latencies."""
        from profiling.table import to_problem

        tables = [b.table for b in self.bundles.values()]
        override = {b.model_id: b.device.choice_ms() for b in self.bundles.values()}
        return to_problem(tables, budgets.as_problem_budgets(), latency_override=override)

    def solve(self, budgets: DeviceBudgets) -> Solution:
        """optimizer.solve on the joint problem; InfeasibleBudgetError says what would fit."""
        from optimizer.problem import parse_problem
        from optimizer.solver import solve

        solution = solve(parse_problem(self.problem(budgets)))
        if not solution.feasible:
            raise InfeasibleBudgetError(
                f"no selection of {', '.join(self.bundles)} fits latency {_ms(budgets.latency_ms)} and memory "
                f"{_mib(budgets.memory_bytes)}: the smallest achievable latency is "
                f"{solution.min_latency_ms:.3f} ms and memory {_mib(solution.min_memory_bytes)}; "
                "raise the budgets" + (" or fetch online (offline uses only cached blocks)" if self.offline else "")
            )
        return solution

    def solve_measured(self, budgets: DeviceBudgets, max_rounds: int) -> MeasuredSolution:
        """Solve, then time the assembled models here and re-solve under a tightened latency
        budget while they run over (optimizer.solve_measured). Each round downloads and
        assembles what its selection needs; the models are left assembled with the answer."""
        from optimizer.measured import solve_measured
        from optimizer.problem import parse_problem

        self.solve(budgets)  # the clear error when nothing fits even on paper
        result = solve_measured(parse_problem(self.problem(budgets)), self.time_selection, max_rounds=max_rounds)
        if result.rounds[-1].selection != result.solution.selection:
            self.time_selection(result.solution.selection)  # assemble the chosen one again
        return result

    def time_selection(self, selection: Mapping[str, Sequence[str]]) -> float:
        """Download, commit and assemble `selection`, then time each model end to end on this
        device; returns the summed median latency (ms), what a shared latency budget limits."""
        selection = {name: list(choices) for name, choices in selection.items()}
        self.cache.commit(self.stage(selection), [b.files for b in self.bundles.values()])
        self.assemble(selection)
        return self.time_running()

    def time_running(self) -> float:
        """The summed median latency (ms) of the models as they run now, timed end to end here."""
        from profiling.latency import measure_latency

        s = self.settings
        return sum(
            measure_latency(switcher.model, self.bundles[model_id].manifest.blocks[0].in_shape,
                            batch_size=s.batch_size, warmup=s.warmup, repeats=s.repeats,
                            threads=s.threads).median_ms
            for model_id, switcher in self.switchers.items()
        )

    def verify_running(self, problem: Any, max_rounds: int) -> tuple[MeasuredSolution, int]:
        """solve_measured for models already running (the --watch loop): each round swaps only
        the blocks that differ into the running BlockSwitchers, so the models keep serving
        between rounds. Returns the answer, left running, and the bytes the extra rounds loaded."""
        from optimizer.measured import solve_measured

        loaded = 0

        def run(selection: Mapping[str, Sequence[str]]) -> None:
            nonlocal loaded
            for model_id, choices in selection.items():
                if list(self.switchers[model_id].selection) != list(choices):
                    loaded += self.switchers[model_id].switch(list(choices)).bytes_loaded

        def measure(selection: Mapping[str, Sequence[str]]) -> float:
            run(selection)
            return self.time_running()

        result = solve_measured(problem, measure, max_rounds=max_rounds)
        run(result.solution.selection)  # the fastest timed, when the last round did not fit either
        return result, loaded

    # ------------------------------------------------------------------ files

    def stage(self, selection: dict[str, Sequence[str]]) -> list[str]:
        """Download (to staging, verified) every selected descendant not in the cache."""
        shas = []
        for model_id, choices in selection.items():
            b = self.bundles[model_id]
            for block, choice in zip(b.manifest.block_names, choices):
                d = b.descendant(block, choice)
                if self.cache.has_object(d.sha256) or d.sha256 in shas:
                    continue
                self._download(b, d)
                shas.append(d.sha256)
        return shas

    def _download(self, b: FetchedBundle, d: DescendantEntry) -> None:
        if b.store is None:
            raise FileNotFoundError(
                f"{b.model_id} v{b.version} {d.file} is not in the cache and --offline forbids downloading it"
            )
        staged = self.cache.staged_path(d.sha256)
        if staged.is_file() and staged.stat().st_size == d.bytes:
            return  # verified by an earlier, interrupted fetch; re-hashed again before use
        b.store.get_to_file(
            d.file, staged, size=d.bytes, sha256=d.sha256, attempts=self.attempts, progress=self.progress
        )
        self.stats.downloaded.append(f"{b.model_id}/v{b.version}/{d.file}")
        self.stats.downloaded_bytes += d.bytes

    def load_block(self, model_id: str, block: str, choice: str) -> Any:
        """The BlockSwitcher source: a verified descendant from the cache (downloaded if online)."""
        from legoblocks.serialize import load_module

        b = self.bundles[model_id]
        d = b.descendant(block, choice)
        if not self.cache.has_object(d.sha256):
            self._download(b, d)
            self.cache.commit_object(d.sha256)
        path = self.cache.verified_object(d.sha256, what=f"{model_id} v{b.version} {d.file}")
        return load_module(path).to(self.torch_device).eval()

    # ------------------------------------------------------------------ models

    def assemble(self, selection: dict[str, Sequence[str]]) -> dict[str, Any]:
        """One BlockSwitcher per model, every block loaded from the verified cache."""
        from legoblocks.compose import BlockSwitcher

        for model_id, choices in selection.items():
            b = self.bundles[model_id]
            self.switchers[model_id] = BlockSwitcher(
                _source(self, model_id), b.manifest.block_names, list(choices)
            )
        return self.switchers

    def report(self, selection: dict[str, Sequence[str]]) -> list[ModelReport]:
        """Predicted accuracy (table), device latency and memory of each model's selection."""
        out = []
        for model_id, choices in selection.items():
            b = self.bundles[model_id]
            lat = b.device.choice_ms()
            names = b.manifest.block_names
            out.append(
                ModelReport(
                    model_id=model_id,
                    version=b.version,
                    uri=b.model_uri,
                    selection=dict(zip(names, choices)),
                    predicted_accuracy=b.table.predicted_accuracy(list(choices)),
                    latency_ms=sum(lat[(n, c)] for n, c in zip(names, choices)),
                    memory_bytes=float(b.table.total(list(choices), "peak_bytes")),
                )
            )
        return out


def _source(session: DeviceSession, model_id: str) -> Callable[[str, str], Any]:
    return lambda block, choice: session.load_block(model_id, block, choice)


def _mib(n: float | None) -> str:
    return "unlimited" if n is None else f"{n / MIB:.3f} MiB"


def _ms(n: float | None) -> str:
    return "unlimited" if n is None else f"{n:.3f} ms"


# ---------------------------------------------------------------------- preparing bundles


def _model_uri_and_id(uri: str) -> tuple[str, str, int | None]:
    """(model URI, model id, version or None) of a normalized model or version URI, without I/O."""
    trail = uri.rstrip("/").split("/")
    version = parse_version(trail[-1])
    if version is not None:
        return "/".join(trail[:-1]), trail[-2], version
    return "/".join(trail), trail[-1], None


def _check_table(table: ProfileTable, manifest: Manifest, where: str) -> None:
    """The signed manifest and the table must describe the same blocks and choices."""
    if table.block_names != manifest.block_names:
        raise BundleVerificationError(f"{where}: table blocks {table.block_names} != manifest blocks {manifest.block_names}")
    for b in manifest.blocks:
        if sorted(table.block(b.name).choices) != sorted(d.choice for d in b.descendants):
            raise BundleVerificationError(f"{where}: choices of block {b.name!r} differ between table and manifest")


def _load_table(data: bytes, manifest: Manifest, where: str) -> ProfileTable:
    from profiling.table import ProfileTable, TableError

    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.table.sha256 or len(data) != manifest.table.bytes:
        raise BundleVerificationError(
            f"{where}: SHA-256/size do not match the signed manifest; the table was changed. Refusing it."
        )
    try:
        table = ProfileTable.from_dict(json.loads(data))
    except (ValueError, TableError) as e:
        raise BundleVerificationError(f"{where}: {e}") from None
    _check_table(table, manifest, where)
    return dataclasses.replace(table, model_name=manifest.model_id)


def _prepare_online(
    uri: str, cache: DeviceCache, public_key: Any, stats: FetchStats, settings: DeviceLatencySettings,
    fp: dict[str, Any], attempts: int, progress: bool,
) -> FetchedBundle:
    resolved: ResolvedBundle = resolve_bundle(uri)
    manifest, manifest_bytes, signature = read_verified_manifest(resolved, public_key)
    model_uri = resolved.store.uri.rsplit("/", 1)[0]
    model_dir = cache.model_dir(model_uri, manifest.model_id)
    table_bytes = cache.read_bundle_file(model_dir, manifest.version, TABLE_NAME)
    if table_bytes is None or hashlib.sha256(table_bytes).hexdigest() != manifest.table.sha256:
        staged = cache.staging / f"{manifest.table.sha256}.table"
        resolved.store.get_to_file(
            TABLE_NAME, staged, size=manifest.table.bytes, sha256=manifest.table.sha256, attempts=attempts
        )
        table_bytes = staged.read_bytes()
        staged.unlink()
        stats.downloaded.append(f"{manifest.model_id}/v{manifest.version}/{TABLE_NAME}")
        stats.downloaded_bytes += len(table_bytes)
    table = _load_table(table_bytes, manifest, resolved.store.key_uri(TABLE_NAME))
    files = BundleFiles(model_dir, model_uri, manifest.version,
                        {MANIFEST_NAME: manifest_bytes, SIGNATURE_NAME: signature, TABLE_NAME: table_bytes})
    device = _device_table(cache, model_dir, manifest.version, fp, settings)

    def module_file(b: BlockEntry, d: DescendantEntry) -> tuple[Path, str]:
        if cache.has_object(d.sha256):
            return cache.verified_object(d.sha256, what=f"{manifest.model_id} {d.file}"), "file"
        header = fetch_header(resolved.store, d.file, d.header_bytes, d.header_sha256)
        stats.headers_read += 1
        return write_skeleton(header, d.bytes, cache.staging / f"skeleton-{d.sha256}"), "header"

    stats.measured += _measure(device, manifest, module_file, cache, resolved.store.uri, progress)
    files.files[device_table_name(fp["id"])] = device.to_bytes()
    return FetchedBundle(model_uri, manifest.model_id, manifest.version, manifest, table, device, files, resolved.store)


def _prepare_offline(
    uri: str, cache: DeviceCache, public_key: Any, stats: FetchStats, settings: DeviceLatencySettings,
    fp: dict[str, Any], progress: bool,
) -> FetchedBundle:
    from infra.signing import verify

    # the store's own spelling of the URI (a plain path becomes file://...), as online runs key the cache
    model_uri, model_id, version = _model_uri_and_id(open_store(uri).uri)
    model_dir = cache.model_dir(model_uri, model_id)
    if version is None:
        version = cache.current_version(model_dir)
    data = None if version is None else cache.read_bundle_file(model_dir, version, MANIFEST_NAME)
    sig = None if version is None else cache.read_bundle_file(model_dir, version, SIGNATURE_NAME)
    table_bytes = None if version is None else cache.read_bundle_file(model_dir, version, TABLE_NAME)
    if data is None or sig is None or table_bytes is None:
        raise FileNotFoundError(
            f"--offline: {uri} is not in the cache {cache.root}; run legodnn-fetch once online to fetch it"
        )
    where = f"{model_dir}/v{version}/{MANIFEST_NAME}"
    verify(data, sig, public_key, what=where)
    manifest = Manifest.from_bytes(data, where=where)
    table = _load_table(table_bytes, manifest, f"{model_dir}/v{version}/{TABLE_NAME}")
    # Offline the optimizer may choose only descendants whose files are here.
    cached = {b.name: {d.choice for d in b.descendants if cache.has_object(d.sha256)} for b in manifest.blocks}
    empty = [name for name, choices in cached.items() if not choices]
    if empty:
        raise FileNotFoundError(f"--offline: blocks {empty} of {model_id} have no cached descendant; fetch online first")
    table = dataclasses.replace(
        table,
        blocks=[dataclasses.replace(b, choices={c: p for c, p in b.choices.items() if c in cached[b.name]})
                for b in table.blocks],
    )
    device = _device_table(cache, model_dir, version, fp, settings)

    def module_file(b: BlockEntry, d: DescendantEntry) -> tuple[Path, str]:
        return cache.verified_object(d.sha256, what=f"{model_id} {d.file}"), "file"

    usable = dataclasses.replace(manifest, blocks=tuple(
        dataclasses.replace(b, descendants=tuple(d for d in b.descendants if d.choice in cached[b.name]))
        for b in manifest.blocks))
    stats.measured += _measure(device, usable, module_file, cache, f"{model_dir}/v{version}", progress)
    files = BundleFiles(model_dir, model_uri, version, {device_table_name(fp["id"]): device.to_bytes()})
    return FetchedBundle(model_uri, model_id, version, manifest, table, device, files, None)


def _device_table(
    cache: DeviceCache, model_dir: Path, version: int, fp: dict[str, Any], settings: DeviceLatencySettings
) -> DeviceTable:
    path = cache.version_dir(model_dir, version) / device_table_name(fp["id"])
    return DeviceTable.from_json(cache.read_json(path), settings) or DeviceTable(dict(fp), settings, {})


def _measure(
    device: DeviceTable, manifest: Manifest, module_file: Callable[[BlockEntry, DescendantEntry], tuple[Path, str]],
    cache: DeviceCache, where: str, progress: bool,
) -> int:
    try:
        measured = measure_missing(device, manifest.descendants(), module_file, where=where, progress=progress)
        if measured or device.calibration is None:
            calibrate_composition(device, manifest.blocks, module_file, where=where)
        return measured
    finally:
        for skeleton in cache.staging.glob("skeleton-*"):
            skeleton.unlink()


def open_session(
    uris: Sequence[str],
    *,
    public_key: Any,
    cache: str | Path,
    offline: bool = False,
    settings: DeviceLatencySettings = DeviceLatencySettings(),
    attempts: int = 3,
    progress: bool = False,
) -> DeviceSession:
    """Verify and prepare every bundle (manifest, table, device latencies); download no descendant."""
    import torch

    from profiling.latency import fingerprint

    if not uris:
        raise ValueError("give at least one bundle URI")
    try:
        kind = torch.device(settings.device).type
    except RuntimeError:
        raise ValueError(f"unknown torch device {settings.device!r}; use cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"torch device {settings.device!r} requested but CUDA is not available; use --torch-device cpu")
    key = load_public_key(public_key)
    dc = DeviceCache(cache)
    stats = FetchStats()
    fp = fingerprint(threads=settings.threads)
    bundles = []
    for uri in uris:
        if offline:
            bundles.append(_prepare_offline(uri, dc, key, stats, settings, fp, progress))
        else:
            bundles.append(_prepare_online(uri, dc, key, stats, settings, fp, attempts, progress))
    ids = [b.model_id for b in bundles]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the bundles must be different models, got model ids {ids}")
    return DeviceSession(bundles, dc, stats, fingerprint=fp, offline=offline, attempts=attempts, progress=progress,
                         torch_device=settings.device, settings=settings)


@dataclass
class FetchResult:
    session: DeviceSession
    solution: Solution
    models: list[ModelReport]
    budgets: DeviceBudgets
    measured: MeasuredSolution | None = None  # set by --verify-latency

    @property
    def switchers(self) -> dict[str, Any]:
        return self.session.switchers

    def to_dict(self) -> dict[str, Any]:
        s = self.session.stats
        return {
            "models": [dataclasses.asdict(m) for m in self.models],
            "total": {
                "latency_ms": sum(m.latency_ms for m in self.models),
                "memory_bytes": sum(m.memory_bytes for m in self.models),
                "objective": self.solution.objective,
            },
            "budgets": {"latency_ms": self.budgets.latency_ms, "memory_bytes": self.budgets.memory_bytes},
            "downloaded": list(s.downloaded),
            "downloaded_bytes": s.downloaded_bytes,
            "headers_read": s.headers_read,
            "measured": s.measured,
            "device": self.session.fingerprint,
            "offline": self.session.offline,
            "verified_latency": _measured_dict(self.measured),
        }


def _measured_dict(m: MeasuredSolution | None) -> dict[str, Any] | None:
    if m is None:
        return None
    return {"measured_ms": m.measured_ms, "fits": m.fits, "rounds": [dataclasses.asdict(r) for r in m.rounds]}


def _measured_line(m: MeasuredSolution) -> str:
    verdict = "fits" if m.fits else f"still over after {len(m.rounds)} rounds (the fastest timed is kept)"
    return (f"timed here: {m.measured_ms:.3f} ms end to end, {verdict}; first pick timed "
            f"{m.first_measured_ms:.3f} ms, {len(m.rounds)} timed round(s)")


def fetch(
    uris: Sequence[str],
    budgets: DeviceBudgets,
    *,
    public_key: Any,
    cache: str | Path,
    offline: bool = False,
    settings: DeviceLatencySettings = DeviceLatencySettings(),
    attempts: int = 3,
    progress: bool = False,
    verify_latency_rounds: int = 0,
) -> FetchResult:
    """Verify, time, solve, download what the selection needs, commit, assemble.

    With `verify_latency_rounds` > 0 and a latency budget, the assembled models are then
    timed here and re-solved under a tightened budget while they run over (at most that
    many timed rounds; `FetchResult.measured` says what was measured and whether it fits).

    A bundle that fails verification raises BundleVerificationError before anything is
    written to the cache; infeasible budgets raise InfeasibleBudgetError.
    """
    session = open_session(
        uris, public_key=public_key, cache=cache, offline=offline, settings=settings,
        attempts=attempts, progress=progress,
    )
    try:
        solution = session.solve(budgets)
        selection = {name: list(choices) for name, choices in solution.selection.items()}
        staged = session.stage(selection)
    except InfeasibleBudgetError:
        # everything fetched so far verified: keep the manifests and timings for next time
        session.cache.commit([], [b.files for b in session.bundles.values()])
        raise
    session.cache.commit(staged, [b.files for b in session.bundles.values()])
    measured = None
    if verify_latency_rounds > 0 and budgets.latency_ms is not None:
        measured = session.solve_measured(budgets, verify_latency_rounds)
        solution = measured.solution
        selection = {name: list(choices) for name, choices in solution.selection.items()}
    else:
        session.assemble(selection)
    return FetchResult(session, solution, session.report(selection), budgets, measured)


# ---------------------------------------------------------------------- watching budgets


def watch(
    result: FetchResult,
    budget_file: str | Path,
    *,
    out: TextIO,
    as_json: bool = False,
    poll_s: float = 0.5,
    max_changes: int | None = None,
    max_seconds: float | None = None,
    verify_latency_rounds: int = 0,
) -> int:
    """Re-solve and swap blocks whenever `budget_file` changes; returns the number of changes handled.

    Stops after `max_changes` changes or `max_seconds` (both unbounded by default: a device
    daemon). A file that does not parse, infeasible budgets, or a block that fails to
    download or verify are reported and skipped: the models keep running as they were
    (BlockSwitcher loads every new block before swapping any in).

    With `verify_latency_rounds` > 0, each change with a latency budget is then timed end
    to end and re-solved under a tightened budget while it runs over, as `fetch` does
    (`DeviceSession.verify_running`); the event reports the rounds and net block changes.
    """
    from optimizer.scaler import RuntimeScaler

    session = result.session
    scaler = RuntimeScaler(session.problem(result.budgets)["models"], session.switchers)
    path = Path(budget_file)
    last = _read_budget_text(path)
    start = time.monotonic()
    handled = 0
    while (max_changes is None or handled < max_changes) and (
        max_seconds is None or time.monotonic() - start < max_seconds
    ):
        time.sleep(poll_s)
        text = _read_budget_text(path)
        if text is None or text == last:
            continue
        last = text
        handled += 1
        downloads_before = len(session.stats.downloaded)
        before = scaler.selection
        measured = None
        try:
            budgets = DeviceBudgets.from_json(json.loads(text), where=str(path))
            report = scaler.update(budgets.as_problem_budgets())
            if verify_latency_rounds > 0 and budgets.latency_ms is not None and report.kept != "infeasible":
                measured, extra = session.verify_running(scaler.problem(budgets.as_problem_budgets()),
                                                         verify_latency_rounds)
                changes = _net_changes(session, before, scaler.selection)
                report = dataclasses.replace(
                    report, solution=measured.solution, changes=changes, switched=bool(changes),
                    bytes_loaded=report.bytes_loaded + extra, kept="" if changes else report.kept or "optimal")
        except (ValueError, BundleError, FileNotFoundError) as e:
            _emit(out, as_json, {"event": "error", "error": str(e)}, [f"budgets not applied: {e}"])
            continue
        downloaded = session.stats.downloaded[downloads_before:]
        _print_switch(report, budgets, session, scaler.selection, downloaded, out, as_json, measured)
    return handled


def _net_changes(
    session: DeviceSession, before: Mapping[str, Sequence[str]], after: Mapping[str, Sequence[str]]
) -> dict[str, list[tuple[str, str, str]]]:
    """(block, old, new) per model from one running selection to another (several timed rounds
    may swap a block more than once; what a user needs is where it ended)."""
    changes = {}
    for model_id, now in after.items():
        names = session.bundles[model_id].manifest.block_names
        diff = [(b, o, n) for b, o, n in zip(names, before[model_id], now) if o != n]
        if diff:
            changes[model_id] = diff
    return changes


def _read_budget_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _emit(out: TextIO, as_json: bool, event: dict[str, Any], lines: list[str]) -> None:
    if as_json:
        print(json.dumps(event), file=out)
    else:
        for line in lines:
            print(line, file=out)
    out.flush()


def _print_switch(
    report: Any, budgets: DeviceBudgets, session: DeviceSession, selection: dict[str, list[str]],
    downloaded: list[str], out: TextIO, as_json: bool, measured: MeasuredSolution | None = None,
) -> None:
    models = session.report(selection)
    lines = [f"budgets: latency {_ms(budgets.latency_ms)}, memory {_mib(budgets.memory_bytes)}"]
    for model_id, changed in report.changes.items():
        lines += [f"  switch {model_id} {block}: {old} -> {new}" for block, old, new in changed]
    if report.kept:
        why = report.solution.reason if report.kept == "infeasible" else report.kept
        lines.append(f"  no switch ({why})")
    else:
        lines.append(
            f"  loaded {report.bytes_loaded} bytes in {report.seconds * 1000:.1f} ms "
            f"(downloaded {len(downloaded)} files)"
        )
    lines += [
        f"  {m.model_id}: predicted accuracy {m.predicted_accuracy:.4f}  latency {m.latency_ms:.3f} ms  "
        f"memory {_mib(m.memory_bytes)}"
        for m in models
    ]
    if measured is not None:
        lines.append("  " + _measured_line(measured))
    event = {
        "event": "switch",
        "budgets": dataclasses.asdict(budgets),
        "changes": report.changes,
        "kept": report.kept,
        "bytes_loaded": report.bytes_loaded,
        "seconds": report.seconds,
        "models": [dataclasses.asdict(m) for m in models],
        "downloaded": downloaded,
        "verified_latency": _measured_dict(measured),
    }
    _emit(out, as_json, event, lines)


# ---------------------------------------------------------------------- CLI


def _print_result(result: FetchResult, out: TextIO) -> None:
    for m in result.models:
        print(f"{m.model_id} v{m.version}  ({m.uri})", file=out)
        print("  selection: " + " ".join(f"{b}={c}" for b, c in m.selection.items()), file=out)
        print(
            f"  predicted accuracy {m.predicted_accuracy:.4f}  latency {m.latency_ms:.3f} ms  "
            f"memory {_mib(m.memory_bytes)}",
            file=out,
        )
    d = result.to_dict()
    b = result.budgets
    print(
        f"total: latency {d['total']['latency_ms']:.3f} ms (budget {_ms(b.latency_ms)}), memory "
        f"{_mib(d['total']['memory_bytes'])} (budget {_mib(b.memory_bytes)})",
        file=out,
    )
    if result.measured is not None:
        print(_measured_line(result.measured), file=out)
    s = result.session.stats
    print(
        f"downloaded {len(s.downloaded)} files ({s.downloaded_bytes} bytes), timed {s.measured} descendants "
        f"on device {result.session.fingerprint['id']}",
        file=out,
    )


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _rounds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of timed rounds >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="legodnn-fetch",
        description="Fetch signed LegoDNN block bundles, time them on this device, pick the most accurate "
        "blocks that fit the budgets, and assemble the models.",
    )
    p.add_argument("uris", nargs="+", metavar="URI",
                   help="bundle URI: s3://BUCKET/PREFIX/MODEL_ID (latest version), .../MODEL_ID/vN, or file:///DIR/...")
    p.add_argument("--public-key", required=True, type=Path, help="the publisher's public key (PEM)")
    p.add_argument("--cache", required=True, type=Path, help="cache directory on this device")
    p.add_argument("--latency-ms", type=_positive, default=None, help="latency budget, all models together (ms)")
    p.add_argument("--memory-mb", type=_positive, default=None, help="memory budget, all models together (MiB)")
    p.add_argument("--json", action="store_true", help="print one JSON document (and one JSON line per switch)")
    p.add_argument("--watch", type=Path, metavar="FILE",
                   help='re-read budgets from FILE ({"latency_ms": X, "memory_mb": Y}) on change and swap blocks')
    p.add_argument("--watch-interval", type=float, default=0.5, help="seconds between checks of --watch FILE")
    p.add_argument("--watch-max-changes", type=int, default=None, help="stop watching after this many changes")
    p.add_argument("--watch-timeout", type=float, default=None, help="stop watching after this many seconds")
    p.add_argument("--offline", action="store_true", help="use only the cache; never contact the store")
    p.add_argument("--threads", type=int, default=1, help="torch threads for timing blocks (default 1)")
    p.add_argument("--torch-device", default="cpu", help="where the models run and are timed: cpu (default) or cuda")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per descendant (default 30)")
    p.add_argument("--verify-latency", type=_rounds, default=0, metavar="ROUNDS",
                   help="time the assembled models here and, while they run over --latency-ms, re-solve under a "
                   "tightened budget, at most ROUNDS timings (default 0: trust the summed block timings); "
                   "with --watch, after every budget change too")
    p.add_argument("--attempts", type=int, default=3, help="resume a dropped download this many times (default 3)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    budgets = DeviceBudgets(args.latency_ms, None if args.memory_mb is None else args.memory_mb * MIB)
    settings = DeviceLatencySettings(threads=args.threads, repeats=args.repeats, device=args.torch_device)
    try:
        result = fetch(
            args.uris, budgets, public_key=args.public_key, cache=args.cache, offline=args.offline,
            settings=settings, attempts=args.attempts, progress=sys.stderr.isatty(),
            verify_latency_rounds=args.verify_latency,
        )
    except BundleVerificationError as e:
        print(f"legodnn-fetch: REFUSED: {e}", file=sys.stderr)
        return 3
    except (BundleError, FileNotFoundError, ValueError) as e:
        print(f"legodnn-fetch: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict(), indent=None if args.watch else 1), flush=True)
    else:
        _print_result(result, sys.stdout)
    if args.watch:
        watch(result, args.watch, out=sys.stdout, as_json=args.json, poll_s=args.watch_interval,
              max_changes=args.watch_max_changes, max_seconds=args.watch_timeout,
              verify_latency_rounds=args.verify_latency)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
