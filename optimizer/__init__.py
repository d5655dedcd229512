"""The scaling optimizer: the problem, its exact solver, a measured-latency loop and the runtime scaler.

Imports NumPy (and msgspec for validation) only: the MILP cross-check (`optimizer.milp`,
SciPy) is imported where it is used, and `RuntimeScaler` / `ScaleReport` on first use, so
`from optimizer import solve` (the device's hot path, `legodnn solve`) imports neither
SciPy, torch nor legoblocks' models.
"""

from __future__ import annotations

from typing import Any

from optimizer.compiled import CompiledProblem, SearchLimitError, compile_problem
from optimizer.evaluation import Solution, evaluate
from optimizer.measured import MeasuredSolution, solve_measured
from optimizer.problem import Composition, Problem, ProblemError, parse_problem
from optimizer.solver import solve

__all__ = [
    "CompiledProblem",
    "Composition",
    "MeasuredSolution",
    "Problem",
    "ProblemError",
    "RuntimeScaler",
    "ScaleReport",
    "SearchLimitError",
    "Solution",
    "compile_problem",
    "evaluate",
    "parse_problem",
    "solve",
    "solve_measured",
]


def __getattr__(name: str) -> Any:
    if name in ("RuntimeScaler", "ScaleReport"):
        from optimizer import scaler

        return getattr(scaler, name)
    raise AttributeError(f"module 'optimizer' has no attribute {name!r}")
