"""What `legodnn-fetch` prints: the text summary, or one JSON document / one JSON line per event."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any, TextIO

from infra.device.session import DeviceBudgets, DeviceSession, FetchResult, measured_dict, mib, ms

if TYPE_CHECKING:
    from optimizer.measured import MeasuredSolution


def measured_line(m: MeasuredSolution, budget_ms: float | None) -> str:
    verdict = "fits" if m.fits else (f"OVER the {ms(budget_ms)} budget after {len(m.rounds)} round(s) "
                                     "(the fastest timed is kept)")
    return (f"timed here: {m.measured_ms:.3f} ms end to end, {verdict}; first pick timed "
            f"{m.first_measured_ms:.3f} ms, {len(m.rounds)} timed round(s)")


def emit(out: TextIO, as_json: bool, event: dict[str, Any], lines: list[str]) -> None:
    if as_json:
        print(json.dumps(event), file=out)
    else:
        for line in lines:
            print(line, file=out)
    out.flush()


def print_result(result: FetchResult, out: TextIO) -> None:
    for m in result.models:
        print(f"{m.model_id} v{m.version}  ({m.uri})", file=out)
        print("  selection: " + " ".join(f"{b}={c}" for b, c in m.selection.items()), file=out)
        print(f"  accuracy {m.accuracy.text()}  latency {m.latency_ms:.3f} ms  "
              f"memory {mib(m.memory_bytes)}", file=out)
    d = result.to_dict()
    b = result.budgets
    print(f"total: latency {d['total']['latency_ms']:.3f} ms (budget {ms(b.latency_ms)}), memory "
          f"{mib(d['total']['memory_bytes'])} (budget {mib(b.memory_bytes)})", file=out)
    if result.measured is not None:
        print(measured_line(result.measured, b.latency_ms), file=out)
    s = result.session.stats
    healed = f", re-downloaded {len(s.healed)} corrupted cached file(s)" if s.healed else ""
    print(f"downloaded {len(s.downloaded)} files ({s.downloaded_bytes} bytes){healed}, timed {s.measured} "
          f"descendants on device {result.session.fingerprint['id']} ({result.session.runtime.name})", file=out)


def print_switch(report: Any, budgets: DeviceBudgets, session: DeviceSession, selection: dict[str, list[str]],
                 downloaded: list[str], out: TextIO, as_json: bool, measured: MeasuredSolution | None = None) -> None:
    """One budget change handled by the --watch loop."""
    models = session.report(selection)
    lines = [f"budgets: latency {ms(budgets.latency_ms)}, memory {mib(budgets.memory_bytes)}"]
    for model_id, changed in report.changes.items():
        lines += [f"  switch {model_id} {block}: {old} -> {new}" for block, old, new in changed]
    if report.kept:
        why = report.solution.reason if report.kept == "infeasible" else report.kept
        lines.append(f"  no switch ({why})")
    else:
        lines.append(f"  loaded {report.bytes_loaded} bytes in {report.seconds * 1000:.1f} ms "
                     f"(downloaded {len(downloaded)} files)")
    lines += [f"  {m.model_id}: accuracy {m.accuracy.text()}  latency {m.latency_ms:.3f} ms  "
              f"memory {mib(m.memory_bytes)}" for m in models]
    if measured is not None:
        lines.append("  " + measured_line(measured, budgets.latency_ms))
    emit(out, as_json, {
        "event": "switch",
        "budgets": dataclasses.asdict(budgets),
        "changes": report.changes,
        "kept": report.kept,
        "bytes_loaded": report.bytes_loaded,
        "seconds": report.seconds,
        "models": [dataclasses.asdict(m) for m in models],
        "downloaded": downloaded,
        "verified_latency": measured_dict(measured),
    }, lines)
