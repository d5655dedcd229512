"""`legodnn solve PROBLEM.json`: solve a scaling problem exactly and print the selection.

The JSON format is documented in docs/PROBLEM.md. Exit status: 0 feasible, 1 infeasible (no
selection meets the budgets), 2 invalid problem.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("problem", help="problem JSON file (the format: docs/PROBLEM.md), or - for stdin")
    parser.add_argument("--json", action="store_true", help="print the solution as JSON instead of a summary")
    parser.add_argument(
        "--top-k",
        type=int,
        default=1,
        metavar="K",
        help="also list the next K-1 best distinct selections (default 1: only the best)",
    )


@contextlib.contextmanager
def _native_stdout_to_stderr() -> Iterator[None]:
    """HiGHS (the MILP fallback) can print debug lines straight to file descriptor 1;
    keep them off stdout, which must hold only the summary or the JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _budget(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


def _summary(problem, solution, seconds: float) -> str:  # noqa: ANN001 (types imported lazily)
    lines = []
    budgets = problem.budgets
    if not solution.feasible:
        lines += [
            "feasible   no",
            f"reason     {solution.reason}",
            f"smallest achievable: latency {solution.min_latency_ms:.4g} ms, memory {solution.min_memory_bytes:.0f} B",
        ]
        return "\n".join(lines)
    lines += [
        "feasible   yes",
        f"objective  {solution.objective:.6f}   ({solution.method}, {solution.nodes} nodes, {seconds * 1e3:.2f} ms)",
        f"latency    {solution.latency_ms:.4g} ms   (budget {_budget(budgets.latency_ms)})",
        f"memory     {solution.memory_bytes:.0f} B   (budget {_budget(budgets.memory_bytes)})",
        f"switch     {solution.switch_bytes:.0f} B   (budget {_budget(budgets.switch_bytes)})",
    ]
    for model in problem.models:
        figures = solution.per_model[model.name]
        deadline = "" if model.latency_deadline_ms is None else f" (deadline {model.latency_deadline_ms:g})"
        lines.append("")
        lines.append(
            f"{model.name}: accuracy {figures['accuracy']:.6f} ({solution.accuracy_source.get(model.name, 'predicted')}), "
            f"latency {figures['latency_ms']:.4g} ms{deadline}, "
            f"memory {figures['memory_bytes']:.0f} B, switch {figures['switch_bytes']:.0f} B"
        )
        picks = [f"{b.name}={c}" for b, c in zip(model.blocks, solution.selection[model.name])]
        lines.append("  " + "  ".join(picks))
    for rank, alt in enumerate(solution.alternatives, start=2):
        changed = [
            f"{model.name}.{b.name}={c}"
            for model in problem.models
            for b, c, best in zip(model.blocks, alt.selection[model.name], solution.selection[model.name])
            if c != best
        ]
        lines.append("")
        lines.append(
            f"#{rank}: objective {alt.objective:.6f}, latency {alt.latency_ms:.4g} ms, memory {alt.memory_bytes:.0f} B; "
            f"differs from the best in: {' '.join(changed)}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from optimizer import ProblemError, parse_problem, solve

    if args.top_k < 1:
        print(f"legodnn solve: --top-k must be >= 1, got {args.top_k}", file=sys.stderr)
        return 2
    try:
        source = sys.stdin.read() if args.problem == "-" else Path(args.problem)
        problem = parse_problem(source)
    except ProblemError as exc:
        print(f"legodnn solve: invalid problem: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    with _native_stdout_to_stderr():
        solution = solve(problem, top_k=args.top_k)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps(solution.as_dict(), indent=2))
    else:
        print(_summary(problem, solution, seconds))
    return 0 if solution.feasible else 1
