"""Descendant latencies measured on this device, once per runtime and hardware fingerprint,
and checked every time they are read back.

The server's latency column describes the server; the optimizer on a device needs the
device's own. Every descendant of a bundle is timed here once and the figures are cached
beside the bundle as `device-<fingerprint id>.json`; a later run on the same hardware and
runtime reads them and times nothing. A descendant that is not downloaded yet is timed from
a zero-weight skeleton (its verified safetensors header for torch, its ONNX graph for ONNX
Runtime): latency depends on the architecture, not on the weight values, so the first fetch
chooses among all descendants while downloading only the chosen ones.

Blocks timed alone do not add up to the composed model (warm caches and per-call costs
differ; the sum was 20% low on ResNet-20 and 28% high on MobileNetV2), so a few
compositions are also timed end to end and a scale and offset are fitted
(`profiling.latency_fit`); the optimizer adds the corrected per-choice figures, which keeps
it exact.

The cached file decides what the device may run, so it is trusted only after three checks:
its HMAC with the cache's device key (`DeviceCache.seal`), its ranges (every median
positive and finite, p10 <= median <= p90, the correction's scale and offset plausible), and
its consistency with this bundle, runtime and fingerprint. A file that fails any of them is
reported and the device is timed again.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from msgspec import Meta

from infra.device.cache import DeviceCache
from infra.device.runtime import BlockFiles, DeviceLatencySettings, Runtime
from infra.manifest import BlockEntry, DescendantEntry
from legoblocks.schema import Finite, NonNegative, Sha256, convert
from profiling.latency_fit import MIN_POINTS, LatencyCalibration, fit_latency_calibration

DEVICE_TABLE_SCHEMA = 2
DEVICE_CALIBRATION_K = 6
MAX_MS = 600_000.0  # ten minutes for one block is not a latency, it is a broken file
Ms = Annotated[float, Meta(gt=0.0, le=MAX_MS)]


def device_table_name(fingerprint_id: str) -> str:
    return f"device-{fingerprint_id}.json"


@dataclass(frozen=True)
class LatencyEntry:
    """One descendant timed here; `sha256` names the file it was timed from (a figure is reused
    only for the same file), `measured_from` whether real weights or a skeleton."""

    sha256: Sha256
    median_ms: Ms
    p10_ms: Ms
    p90_ms: Ms
    cv: Annotated[float, Meta(ge=0.0, le=1000.0)]
    measured_from: Literal["file", "header", "graph"]


@dataclass(frozen=True)
class _Calibration:
    """The range checks of a stored `LatencyCalibration`."""

    method: Literal["affine", "scale", "identity"]
    scale: Annotated[float, Meta(gt=0.0, le=100.0)]
    offset_ms: Annotated[float, Meta(ge=0.0, le=MAX_MS)]
    k: Annotated[int, Meta(ge=MIN_POINTS)]
    loo_mae_raw_ms: NonNegative
    loo_max_raw_ms: NonNegative
    loo_mae_calibrated_ms: NonNegative
    loo_max_calibrated_ms: NonNegative
    fingerprint: str
    fitted_scale: Finite
    fitted_offset_ms: Finite
    points: list[tuple[Ms, Ms]]


@dataclass(frozen=True)
class _Stored:
    schema: Literal[2]
    runtime: str
    fingerprint: dict[str, Any]
    settings: DeviceLatencySettings
    latency: dict[str, dict[str, Any]]  # LatencyEntry each, checked one by one for a readable path
    calibration: _Calibration | None


@dataclass
class DeviceTable:
    """Latencies of one bundle's descendants on one device and runtime, by block and choice."""

    runtime: str
    fingerprint: dict[str, Any]
    settings: DeviceLatencySettings
    latency: dict[str, dict[str, LatencyEntry]] = field(default_factory=dict)
    calibration: LatencyCalibration | None = None  # this device's composed-latency correction

    def lookup(self, block: str, choice: str, sha256: str) -> float | None:
        entry = self.latency.get(block, {}).get(choice)
        return entry.median_ms if entry is not None and entry.sha256 == sha256 else None

    def median_ms(self) -> dict[tuple[str, str], float]:
        """Each descendant's own median, as timed alone."""
        return {(b, c): e.median_ms for b, per in self.latency.items() for c, e in per.items()}

    def choice_ms(self) -> dict[tuple[str, str], float]:
        """Each descendant's additive share of composed-model latency: the median corrected
        by this device's calibration (the offset spread over the blocks), for the optimizer."""
        medians = self.median_ms()
        if self.calibration is None:
            return medians
        n = max(1, len(self.latency))
        return {key: self.calibration.per_choice(ms, n) for key, ms in medians.items()}

    def body(self) -> dict[str, Any]:
        """What `DeviceCache.seal` stores."""
        return {
            "schema": DEVICE_TABLE_SCHEMA,
            "runtime": self.runtime,
            "fingerprint": self.fingerprint,
            "settings": asdict(self.settings),  # of the run that wrote it
            "latency": {b: {c: asdict(e) for c, e in per.items()} for b, per in self.latency.items()},
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
        }

    @classmethod
    def from_body(cls, body: Any, runtime: str, fingerprint: dict[str, Any],
                  settings: DeviceLatencySettings) -> DeviceTable | None:
        """A stored table checked for ranges and consistency (ValueError says what is wrong),
        or None when it was timed with other settings (then it is simply timed again)."""
        def error(path: str, msg: str) -> ValueError:
            return ValueError(f"{path}: {msg}")

        stored = convert(body, _Stored, error=error)
        if stored.runtime != runtime or stored.fingerprint.get("id") != fingerprint.get("id"):
            raise ValueError(f"timed for {stored.runtime} on {stored.fingerprint.get('id')}, not {runtime} on "
                             f"{fingerprint.get('id')} (copied from another device?)")
        latency: dict[str, dict[str, LatencyEntry]] = {}
        for block, per in stored.latency.items():
            for choice, raw in per.items():
                e = convert(raw, LatencyEntry, error=error, path=f"latency.{block}.{choice}")
                if not e.p10_ms <= e.median_ms <= e.p90_ms:
                    raise ValueError(f"latency.{block}.{choice}: p10 <= median <= p90 does not hold")
                latency.setdefault(block, {})[choice] = e
        cal = stored.calibration
        if cal is not None and cal.fingerprint != fingerprint.get("id"):
            raise ValueError("calibration: fitted for another fingerprint")
        if any(getattr(stored.settings, k) != getattr(settings, k) for k in ("threads", "batch_size", "device")):
            return None
        return cls(runtime, dict(stored.fingerprint), settings, latency,
                   None if cal is None else LatencyCalibration(**{**asdict(cal), "points": list(cal.points)}))


def load_device_table(cache: DeviceCache, path: Path, runtime: Runtime, fingerprint: dict[str, Any],
                      warn: Callable[[str], None]) -> DeviceTable:
    """The cached timings at `path` if they verify, else an empty table (and a warning)."""
    empty = DeviceTable(runtime.name, dict(fingerprint), runtime.settings)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return empty
    try:
        table = DeviceTable.from_body(cache.unseal(data), runtime.name, fingerprint, runtime.settings)
    except ValueError as e:
        warn(f"{path}: device timings do not verify ({e}); timing this device again")
        return empty
    return table or empty


def timing_key(runtime: Runtime, d: DescendantEntry) -> str:
    """The SHA-256 a descendant's figure belongs to: the first file the runtime runs it from."""
    return runtime.needs(d)[0].sha256


def measure_missing(table: DeviceTable, runtime: Runtime, pairs: Sequence[tuple[BlockEntry, DescendantEntry]],
                    files: BlockFiles, *, progress: bool = False) -> int:
    """Time every descendant the table lacks; returns how many were timed."""
    todo = [(b, d) for b, d in pairs if table.lookup(b.name, d.choice, timing_key(runtime, d)) is None]
    bar = _bar(progress, len(todo))
    for b, d in todo:
        block, source = runtime.load_for_timing(b, d, files)
        stats = runtime.time(block, b.in_shape)
        table.latency.setdefault(b.name, {})[d.choice] = LatencyEntry(
            timing_key(runtime, d), stats.median_ms, stats.p10_ms, stats.p90_ms, stats.cv, source)  # type: ignore[arg-type]
        bar(f"{b.name}/{d.choice}")
    return len(todo)


def _spread(blocks: Sequence[BlockEntry], table: DeviceTable, k: int, seed: int) -> list[tuple[str, ...]]:
    """Up to k distinct selections from the original to the smallest: at step i every block
    takes the descendant at about fraction i/(k-1) of its sparsity ladder, jittered (seeded)."""
    rng = random.Random(seed)
    ladders = [[d.choice for d in sorted(b.descendants, key=lambda d: float(d.choice))
                if d.choice in table.latency.get(b.name, {})] for b in blocks]
    chosen: list[tuple[str, ...]] = []
    for i in range(k):
        f = i / max(1, k - 1)
        sel = []
        for ladder in ladders:
            j = round(f * (len(ladder) - 1) + (rng.uniform(-0.5, 0.5) if 0 < i < k - 1 else 0.0))
            sel.append(ladder[min(len(ladder) - 1, max(0, j))])
        if tuple(sel) not in chosen:
            chosen.append(tuple(sel))
    return chosen


def calibrate_composition(table: DeviceTable, runtime: Runtime, blocks: Sequence[BlockEntry], files: BlockFiles, *,
                          k: int = DEVICE_CALIBRATION_K, seed: int = 0) -> bool:
    """Time up to k compositions end to end and store this device's latency correction.

    Returns False (and stores nothing) when fewer than 3 distinct compositions exist.
    """
    selections = _spread(blocks, table, k, seed)
    if len(selections) < MIN_POINTS:
        return False
    medians = table.median_ms()
    points = []
    for sel in selections:
        model = runtime.chain([runtime.load_for_timing(b, b.descendant(c), files)[0] for b, c in zip(blocks, sel)])
        points.append((sum(medians[(b.name, c)] for b, c in zip(blocks, sel)),
                       runtime.time(model, blocks[0].in_shape).median_ms))
    table.calibration = fit_latency_calibration(points, str(table.fingerprint.get("id", "")))
    return True


def _bar(enabled: bool, total: int) -> Callable[[str], None]:
    """A tqdm bar if asked for and installed (optional on devices), else a no-op."""
    if not enabled or total == 0:
        return lambda _label: None
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda _label: None
    bar = tqdm(total=total, desc="timing descendants", unit="block", leave=False)

    def step(label: str) -> None:
        bar.set_postfix_str(label)
        bar.update(1)
        if bar.n >= total:
            bar.close()

    return step
