"""A live view of the pipeline: one line per stage with units done/total, the last loss a
running unit reported, elapsed time and ETA.

On a terminal it is a `rich` live progress display; otherwise (a log file, `ray job submit`,
a test) no bars, one plain line per finished stage, so logs stay readable. It is an observer
of `pipelines.units.UnitRunner`: remote Ray tasks' reports reach it through the executor.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from pipelines.cache import UnitRecord


def _note(kind: str, values: dict[str, Any]) -> str:
    """A short text of a unit's live report: "epoch 2 loss 0.412", "step 150/250 loss 0.09"."""
    parts = []
    if "epoch" in values:
        parts.append(f"epoch {values['epoch']}")
    if "step" in values:
        parts.append(f"step {values['step']}" + (f"/{values['of']}" if "of" in values else ""))
    if "loss" in values:
        parts.append(f"loss {values['loss']:.4g}")
    return " ".join(parts) or kind


class PipelineProgress:
    """Stage-level progress. `live=None` means: live bars only when the stream is a TTY."""

    def __init__(self, *, live: bool | None = None, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}
        self._started: dict[str, float] = {}

    def __enter__(self) -> "PipelineProgress":
        if self.live:
            from rich.console import Console
            from rich.progress import (
                BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"),
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
            self.advance(stage)

    def unit_report(self, stage: str, unit: str, kind: str, values: dict[str, Any]) -> None:
        if self._progress is not None and stage in self._tasks:
            self._progress.update(self._tasks[stage], note=f"{unit}: {_note(kind, values)}")

    def stage_finished(self, stage: str, executed: int, skipped: int, seconds: float) -> None:
        self.end_stage(stage, executed, skipped)

    def start_stage(self, stage: str, total: int, cached: int) -> None:
        """A stage begins with `total` units, `cached` of which are already done."""
        self._started[stage] = time.perf_counter()
        note = f"{cached} cached" if cached else ""
        if self._progress is not None:
            self._tasks[stage] = self._progress.add_task(stage, total=total, completed=cached, note=note)

    def advance(self, stage: str, n: int = 1) -> None:
        if self._progress is not None and stage in self._tasks:
            self._progress.advance(self._tasks[stage], n)

    def end_stage(self, stage: str, executed: int, skipped: int) -> None:
        seconds = time.perf_counter() - self._started.get(stage, time.perf_counter())
        if self._progress is not None and stage in self._tasks:
            self._progress.update(self._tasks[stage], note=f"{executed} run, {skipped} cached")
        else:
            self.log(f"[{stage}] {executed + skipped} units: {executed} executed, {skipped} cached ({seconds:.1f} s)")

    def log(self, message: str) -> None:
        """A message that does not disturb the live display."""
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            print(message, file=self.stream, flush=True)
