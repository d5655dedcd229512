"""`legodnn-fetch --watch FILE`: re-solve and swap blocks whenever the budget file changes."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

from infra.device.report import emit, print_switch
from infra.device.session import DeviceBudgets, DeviceSession, FetchResult
from infra.errors import BundleError


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
    baseline: str | None = None,
) -> int:
    """Re-solve and swap blocks whenever `budget_file` changes; returns the number of changes handled.

    `baseline` is the file's text the running models already reflect (default: its text now);
    the CLI reads it before printing the fetch result, so a change written as soon as that
    result appears is not missed.

    Stops after `max_changes` changes or `max_seconds` (both unbounded by default: a device
    daemon). A file that does not parse, infeasible budgets, or a block that fails to
    download or verify are reported and skipped: the models keep running as they were
    (a switch loads every new block before swapping any in). Only the changed blocks are
    loaded: new torch modules, or new ONNX Runtime sessions.

    With `verify_latency_rounds` > 0, each change with a latency budget is then timed end
    to end and re-solved under a tightened budget while it runs over, as `fetch` does
    (`DeviceSession.verify_running`); the event reports the rounds and net block changes.
    """
    from optimizer.scaler import RuntimeScaler

    session = result.session
    scaler = RuntimeScaler(session.problem(result.budgets)["models"], session.switchers)
    path = Path(budget_file)
    last = read_budget_text(path) if baseline is None else baseline
    start = time.monotonic()
    handled = 0
    while (max_changes is None or handled < max_changes) and (
        max_seconds is None or time.monotonic() - start < max_seconds
    ):
        time.sleep(poll_s)
        text = read_budget_text(path)
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
                measured, extra = session.verify_running(scaler.compiled, verify_latency_rounds,
                                                         budgets=budgets.as_problem_budgets(), current=scaler.selection)
                changes = _net_changes(session, before, scaler.selection)
                report = dataclasses.replace(
                    report, solution=measured.solution, changes=changes, switched=bool(changes),
                    bytes_loaded=report.bytes_loaded + extra, kept="" if changes else report.kept or "optimal")
            session.commit()  # blocks downloaded for the switch join the cache
        except (ValueError, BundleError, OSError) as e:
            emit(out, as_json, {"event": "error", "error": str(e)}, [f"budgets not applied: {e}"])
            continue
        downloaded = session.stats.downloaded[downloads_before:]
        print_switch(report, budgets, session, scaler.selection, downloaded, out, as_json, measured)
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


def read_budget_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
        return None
