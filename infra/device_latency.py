"""Descendant latencies measured on this device, once per hardware fingerprint.

The server's latency column describes the server; the optimizer on a device needs the
device's own. Every descendant of a bundle is timed here once and the figures are cached
beside the bundle as `device-<fingerprint id>.json`; a later run on the same hardware
(same fingerprint) reads them and times nothing.

Latency depends on a block's architecture, not on its weight values, so a descendant that
is not downloaded is timed from a *skeleton* (`infra.skeleton`): its signed, verified
safetensors header alone (a few KB, one Range request), padded with zero bytes and loaded
with the same safe loader (`legoblocks.serialize.load_module`, allow-list only, never
unpickles). That lets the first fetch choose among all descendants while downloading only
the chosen ones. Any file that is actually run is the full, SHA-256-verified one.

Blocks timed alone do not add up to the composed model (warm caches and per-call costs
differ; the sum was 20% low on ResNet-20 and 28% high on MobileNetV2), so a few compositions are also timed end to end, from the same files, and a
scale and offset are fitted (`profiling.latency_fit`); the optimizer adds the corrected
per-choice figures, which keeps it exact.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from infra.errors import BundleVerificationError
from infra.manifest import BlockEntry, DescendantEntry

DEVICE_TABLE_SCHEMA = 1
DEVICE_CALIBRATION_K = 6


@dataclass(frozen=True)
class DeviceLatencySettings:
    """How descendants are timed (see profiling.latency.measure_latency)."""

    threads: int = 1
    warmup: int = 5
    repeats: int = 30
    batch_size: int = 1
    device: str = "cpu"  # torch device the models run on ("cuda" on a GPU device)


def device_table_name(fingerprint_id: str) -> str:
    return f"device-{fingerprint_id}.json"


@dataclass
class DeviceTable:
    """Latencies of one bundle's descendants on one device, keyed by block and choice.

    Each entry keeps the descendant's SHA-256: a figure is reused only for the same file.
    """

    fingerprint: dict[str, Any]
    settings: DeviceLatencySettings
    latency: dict[str, dict[str, dict[str, Any]]]
    calibration: dict[str, Any] | None = None  # LatencyCalibration.to_dict() of this device

    def lookup(self, block: str, d: DescendantEntry) -> float | None:
        entry = self.latency.get(block, {}).get(d.choice)
        if entry is None or entry.get("sha256") != d.sha256:
            return None
        return float(entry["median_ms"])

    def median_ms(self) -> dict[tuple[str, str], float]:
        """Each descendant's own median, as timed alone."""
        return {(b, c): float(e["median_ms"]) for b, per in self.latency.items() for c, e in per.items()}

    def choice_ms(self) -> dict[tuple[str, str], float]:
        """Each descendant's additive share of composed-model latency: the median corrected
        by this device's calibration (the offset spread over the blocks), for the optimizer."""
        from profiling.latency_fit import LatencyCalibration

        medians = self.median_ms()
        if not self.calibration:
            return medians
        fit, n = LatencyCalibration.from_dict(self.calibration), max(1, len(self.latency))
        return {key: fit.per_choice(ms, n) for key, ms in medians.items()}

    def to_bytes(self) -> bytes:
        data = {
            "schema": DEVICE_TABLE_SCHEMA,
            "fingerprint": self.fingerprint,
            "settings": asdict(self.settings),  # of the run that wrote it
            "latency": self.latency,
            "calibration": self.calibration,
        }
        return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: Any, settings: DeviceLatencySettings) -> DeviceTable | None:
        """A cached table, or None when it is unusable (other schema, threads, batch size or device)."""
        if not isinstance(data, dict) or data.get("schema") != DEVICE_TABLE_SCHEMA:
            return None
        saved = data.get("settings")
        # Threads, batch size and device change what latency *is*; warmup/repeats only its precision.
        if not isinstance(saved, dict) or not isinstance(data.get("latency"), dict) or any(
            saved.get(k, "cpu" if k == "device" else None) != getattr(settings, k)
            for k in ("threads", "batch_size", "device")
        ):
            return None
        calibration = data.get("calibration")
        return cls(dict(data.get("fingerprint") or {}), settings, data["latency"],
                   calibration if isinstance(calibration, dict) else None)


def measure_missing(
    table: DeviceTable,
    pairs: Sequence[tuple[BlockEntry, DescendantEntry]],
    module_file: Callable[[BlockEntry, DescendantEntry], tuple[Path, str]],
    *,
    where: str,
    progress: bool = False,
) -> int:
    """Time every descendant the table lacks; returns how many were timed.

    `module_file(block, descendant)` gives a loadable file (the cached object, or a
    skeleton) and how it was obtained ("file" or "header"), recorded with the figure.
    `where` (the bundle's URI) prefixes the file name in errors.
    """
    from profiling.latency import measure_latency

    todo = [(b, d) for b, d in pairs if table.lookup(b.name, d) is None]
    bar = _bar(progress, len(todo))
    for b, d in todo:
        path, source = module_file(b, d)
        module = _load(path, d, where, table.settings.device)
        s = table.settings
        stats = measure_latency(
            module, b.in_shape, batch_size=s.batch_size, warmup=s.warmup, repeats=s.repeats, threads=s.threads
        )
        table.latency.setdefault(b.name, {})[d.choice] = {
            "sha256": d.sha256,
            "median_ms": stats.median_ms,
            "p10_ms": stats.p10_ms,
            "p90_ms": stats.p90_ms,
            "cv": stats.cv,
            "measured_from": source,
        }
        bar(f"{b.name}/{d.choice}")
    return len(todo)


def _load(path: Path, d: DescendantEntry, where: str, device: str) -> Any:
    """A descendant's module through the safe loader; anything else is refused."""
    from legoblocks.serialize import load_module

    try:
        return load_module(path).to(device)
    except ValueError as e:  # UnsafeFileError included: a header that is not a safe module
        raise BundleVerificationError(f"{where}/{d.file}: does not load as a safe module ({e}); refusing it") from None


def _spread(blocks: Sequence[BlockEntry], table: DeviceTable, k: int, seed: int) -> list[tuple[str, ...]]:
    """Up to k distinct selections from the original to the smallest: at step i every block
    takes the descendant at about fraction i/(k-1) of its sparsity ladder, jittered (seeded)."""
    import random

    rng = random.Random(seed)
    ladders = [[d.choice for d in sorted(b.descendants, key=lambda d: float(d.choice))
                if table.lookup(b.name, d) is not None] for b in blocks]
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


def calibrate_composition(
    table: DeviceTable,
    blocks: Sequence[BlockEntry],
    module_file: Callable[[BlockEntry, DescendantEntry], tuple[Path, str]],
    *,
    where: str,
    k: int = DEVICE_CALIBRATION_K,
    seed: int = 0,
) -> bool:
    """Time up to k compositions end to end and store this device's latency correction.

    Returns False (and stores nothing) when fewer than 3 distinct compositions exist.
    """
    from torch import nn

    from profiling.latency import measure_latency
    from profiling.latency_fit import MIN_POINTS, fit_latency_calibration

    selections = _spread(blocks, table, k, seed)
    if len(selections) < MIN_POINTS:
        return False
    s = table.settings
    medians = table.median_ms()
    points = []
    for sel in selections:
        modules = []
        for b, choice in zip(blocks, sel):
            d = b.descendant(choice)
            modules.append(_load(module_file(b, d)[0], d, where, s.device))
        stats = measure_latency(nn.Sequential(*modules), blocks[0].in_shape, batch_size=s.batch_size,
                                warmup=s.warmup, repeats=s.repeats, threads=s.threads)
        points.append((sum(medians[(b.name, c)] for b, c in zip(blocks, sel)), stats.median_ms))
    table.calibration = fit_latency_calibration(points, str(table.fingerprint.get("id", ""))).to_dict()
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
