"""The scaling optimizer: the problem, its exact solver, a measured-latency loop and the runtime scaler.

`RuntimeScaler` and `ScaleReport` are imported on first use, so `from optimizer import
solve` (the device's hot path, `legodnn solve`) does not import torch or legoblocks.
"""

from __future__ import annotations

from typing import Any

from optimizer.problem import Problem, ProblemError, parse_problem
from optimizer.measured import MeasuredSolution, solve_measured
from optimizer.solver import Solution, evaluate, solve

__all__ = [
    "MeasuredSolution",
    "Problem",
    "ProblemError",
    "RuntimeScaler",
    "ScaleReport",
    "Solution",
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
