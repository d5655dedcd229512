"""Run units one after another in this process."""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any

from pipelines.cache import Cache, UnitRecord
from pipelines.stage import Stage
from pipelines.units import PipelineError, UnitTask, execute_unit


class LocalExecutor:
    """The in-process executor: no Ray, same units, same bits (threads are set per unit)."""

    def run(self, stage: Stage, tasks: Sequence[UnitTask], cache: Cache,
            done: Callable[[int, UnitRecord], None], report: Callable[[str, str, dict[str, Any]], None]) -> None:
        for index, task in enumerate(tasks):
            def unit_report(kind: str, values: dict[str, Any], unit: str = task.item.name) -> None:
                report(unit, kind, values)

            try:
                record = execute_unit(cache.root, stage.fn, task, report=unit_report,
                                      where=(socket.gethostname(), "local"))
            except Exception as exc:
                raise PipelineError(
                    f"stage {stage.name!r}, unit {task.item.name!r} failed: {type(exc).__name__}: {exc}"
                ) from exc
            done(index, record)

    def nodes(self) -> list[dict[str, Any]]:
        return []

    def close(self) -> None:
        return None
