"""A live view of the pipeline: per stage, units done of total, the loss a training unit last
reported (per epoch or step), elapsed time and an ETA.

On a terminal (or with `--progress`) it is a `rich` live display: one bar per stage, and one
bar per training unit while it reports epochs or steps ("teacher: epoch 2/3 loss 0.41").
Otherwise (a log file, `ray job submit`, `--quiet`) it stays quiet: one plain line per
finished stage, and for a long stage at most one progress line every `heartbeat_s` seconds,
so a log shows no silent minutes and no control characters. It is an observer of
`pipelines.units.UnitRunner`: remote Ray tasks' reports reach it through the executor (and
from the Ray Train joint job through its relay thread, hence the lock).

The ETA of a stage counts the finished units plus the reported fraction of the running ones
(epoch 2 of 3 is two thirds of a unit): a one-unit training stage gets an ETA from its
epochs or steps.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

from pipelines.cache import UnitRecord


def _note(kind: str, values: dict[str, Any]) -> str:
    """A short text of a unit's live report: "epoch 2/3 loss 0.412", "step 150/250 loss 0.09"."""
    parts = []
    for key in ("epoch", "step"):
        if key in values:
            parts.append(f"{key} {values[key]}" + (f"/{values['of']}" if "of" in values else ""))
    if "loss" in values:
        parts.append(f"loss {values['loss']:.4g}")
    return " ".join(parts) or kind


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class _Stage:
    total: int
    cached: int
    started: float
    done: int = 0
    running: dict[str, float] = field(default_factory=dict)  # unit -> reported fraction done
    note: str = ""
    last_line: float = 0.0

    def fraction(self) -> float | None:
        """Of the units to run, how much is done (reported fractions of running units count)."""
        todo = self.total - self.cached
        if todo <= 0:
            return None
        return min(1.0, (self.done + sum(self.running.values())) / todo)

    def eta(self, now: float) -> float | None:
        frac = self.fraction()
        if not frac:
            return None
        return (now - self.started) * (1 - frac) / frac


class PipelineProgress:
    """Stage-level progress (module docstring).

    Args:
        live: bars (True), plain lines (False), or bars only when `stream` is a TTY (None).
        stream: where to write (default stderr).
        heartbeat_s: in plain-line mode, the least time between two progress lines of a stage.
    """

    def __init__(self, *, live: bool | None = None, stream: IO[str] | None = None, heartbeat_s: float = 30.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.heartbeat_s = heartbeat_s
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}
        self._unit_tasks: dict[tuple[str, str], Any] = {}
        self._stages: dict[str, _Stage] = {}
        self._lock = threading.RLock()

    def __enter__(self) -> PipelineProgress:
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description:<16}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("{task.fields[eta]}"), TextColumn("{task.fields[note]}"),
                console=Console(file=self.stream), transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    # The observer protocol of pipelines.units.UnitRunner.
    def stage_started(self, stage: str, total: int, cached: int) -> None:
        self.start_stage(stage, total, cached)

    def unit_finished(self, stage: str, record: UnitRecord, executed: bool) -> None:
        if executed:
            self.advance(stage, unit=record.unit)

    def unit_report(self, stage: str, unit: str, kind: str, values: dict[str, Any]) -> None:
        with self._lock:
            state = self._stages.get(stage)
            if state is None:
                return
            note = f"{unit}: {_note(kind, values)}"
            state.note = note
            position = values.get("epoch", values.get("step"))
            if position is not None and values.get("of"):
                state.running[unit] = min(1.0, float(position) / float(values["of"]))
            if self._progress is not None:
                self._unit_bar(stage, unit, kind, values)
                self._refresh(stage)
            else:
                self._heartbeat(stage)

    def stage_finished(self, stage: str, executed: int, skipped: int, seconds: float) -> None:
        self.end_stage(stage, executed, skipped)

    def start_stage(self, stage: str, total: int, cached: int) -> None:
        """A stage begins with `total` units, `cached` of which are already done."""
        with self._lock:
            now = time.perf_counter()
            self._stages[stage] = _Stage(total, cached, now, last_line=now)
            if self._progress is not None:
                self._tasks[stage] = self._progress.add_task(stage, total=total, completed=cached, eta="",
                                                             note=f"{cached} cached" if cached else "")

    def advance(self, stage: str, n: int = 1, *, unit: str | None = None) -> None:
        """`n` units of `stage` finished (`unit` names the one that did, to drop its bar)."""
        with self._lock:
            state = self._stages.get(stage)
            if state is None:
                return
            state.done += n
            if unit is not None:
                state.running.pop(unit, None)
            if self._progress is not None:
                task = self._unit_tasks.pop((stage, unit), None) if unit is not None else None
                if task is not None:
                    self._progress.remove_task(task)
                if stage in self._tasks:
                    self._progress.advance(self._tasks[stage], n)
                self._refresh(stage)
            elif state.done < state.total - state.cached:  # the last one: the stage's own line follows
                self._heartbeat(stage)

    def end_stage(self, stage: str, executed: int, skipped: int) -> None:
        with self._lock:
            state = self._stages.get(stage)
            seconds = time.perf_counter() - state.started if state is not None else 0.0
            if self._progress is not None and stage in self._tasks:
                for key in [k for k in self._unit_tasks if k[0] == stage]:
                    self._progress.remove_task(self._unit_tasks.pop(key))
                self._progress.update(self._tasks[stage], eta="", note=f"{executed} run, {skipped} cached")
            else:
                self.log(f"[{stage}] {executed + skipped} units: {executed} executed, {skipped} cached "
                         f"({seconds:.1f} s)")

    def log(self, message: str) -> None:
        """A message that does not disturb the live display."""
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            print(message, file=self.stream, flush=True)

    def _refresh(self, stage: str) -> None:
        state = self._stages[stage]
        eta = state.eta(time.perf_counter())
        if stage in self._tasks:
            self._progress.update(self._tasks[stage], eta=f"eta {_clock(eta)}" if eta is not None else "",
                                  note=state.note)

    def _unit_bar(self, stage: str, unit: str, kind: str, values: dict[str, Any]) -> None:
        position, of = values.get("epoch", values.get("step")), values.get("of")
        if position is None or not of:
            return
        key = (stage, unit)
        if key not in self._unit_tasks:
            self._unit_tasks[key] = self._progress.add_task(f"  {unit}"[:16], total=of, eta="", note="")
        self._progress.update(self._unit_tasks[key], completed=position, note=_note(kind, values))

    def _heartbeat(self, stage: str) -> None:
        """A plain progress line of a running stage, at most every `heartbeat_s` seconds."""
        state = self._stages[stage]
        now = time.perf_counter()
        if now - state.last_line < self.heartbeat_s:
            return
        state.last_line = now
        eta = state.eta(now)
        parts = [f"{state.cached + state.done}/{state.total} units", state.note,
                 f"{_clock(now - state.started)} elapsed", f"eta {_clock(eta)}" if eta is not None else ""]
        self.log(f"[{stage}] " + ", ".join(p for p in parts if p))
