"""Benchmark: our exact solver against LegoDNN's formulation in PuLP + CBC, same instances.

    .venv/bin/python bench/optimizer.py                      # the full table (a few minutes)
    .venv/bin/python bench/optimizer.py --shapes 4x8x6 --instances 5 --out /tmp/table.md

Instances are seeded and shaped like real profile tables
(`optimizer.problem.synthetic_problem`: per block, the accuracy drop grows with sparsity
while latency and memory fall); budgets go from tight (10% of the way from the smallest to
the largest total) to loose (80%). LegoDNN's public optimizer builds a PuLP model per
re-solve (binary x per block and descendant, one per block, latency and memory rows) and
runs the bundled CBC with gapAbs=0; we time the same, per instance: building the model and
solving it. Both answers are evaluated by `optimizer.evaluate` and must agree to 1e-9 on
the objective. `--quick` is the smoke test's tiny setting.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    # Run as a script, Python puts bench/ first on sys.path, where this very file would
    # shadow the `optimizer` package: look from the repository root instead.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from optimizer import Problem, evaluate, parse_problem, solve  # noqa: E402
from optimizer.problem import synthetic_problem  # noqa: E402

DEFAULT_SHAPES = "1x8x6,1x10x8,2x8x6,2x10x8,4x8x6,4x10x8,6x8x6,6x10x8,10x12x8"
DEFAULT_TIGHTNESS = "0.1,0.3,0.5,0.8"
# --quick: two tiny shapes, two budget levels, one instance each (the smoke test's setting).
QUICK = {"shapes": "1x3x3,2x3x4", "tightness": "0.2,0.7", "instances": 1, "repeats": 1}


def pulp_solve(problem: Problem) -> dict[str, list[str]] | None:
    """LegoDNN's formulation (binary x per block and descendant) in PuLP, solved by CBC."""
    import pulp

    lp = pulp.LpProblem("block_selection", pulp.LpMinimize)
    x = {
        (m, b, d): pulp.LpVariable(f"x_{m}_{b}_{d}", cat=pulp.LpBinary)
        for m, model in enumerate(problem.models)
        for b, block in enumerate(model.blocks)
        for d in range(len(block.choices))
    }

    def choice(m: int, b: int, d: int):  # noqa: ANN202
        return problem.models[m].blocks[b].choices[d]

    lp += pulp.lpSum(problem.models[m].weight * choice(m, b, d).accuracy_drop * v for (m, b, d), v in x.items())
    for m, model in enumerate(problem.models):
        for b, block in enumerate(model.blocks):
            lp += pulp.lpSum(x[(m, b, d)] for d in range(len(block.choices))) == 1
    if problem.budgets.latency_ms is not None:
        lp += pulp.lpSum(choice(m, b, d).latency_ms * v for (m, b, d), v in x.items()) <= problem.budgets.latency_ms
    if problem.budgets.memory_bytes is not None:
        lp += pulp.lpSum(choice(m, b, d).memory_bytes * v for (m, b, d), v in x.items()) <= problem.budgets.memory_bytes
    status = lp.solve(pulp.PULP_CBC_CMD(msg=False, gapAbs=0))
    if pulp.LpStatus[status] != "Optimal":
        return None
    return {
        model.name: [
            block.choices[max(range(len(block.choices)), key=lambda d: x[(m, b, d)].varValue or 0.0)].id
            for b, block in enumerate(model.blocks)
        ]
        for m, model in enumerate(problem.models)
    }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _cpu() -> float:
    """CPU seconds of this process and its finished children (CBC runs as a child)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def run_shape(
    shape: tuple[int, int, int], tightness: list[float], instances: int, repeats: int, seed: int, with_pulp: bool
) -> dict[str, Any]:
    """Time every instance of one shape; returns per-instance timings and checks.

    Wall time is what a caller waits; CPU time (ours, and PuLP's including its CBC child)
    is what the work costs, and stays comparable on a machine shared with other jobs.
    """
    rng = random.Random(f"{seed}-{shape}")
    ours: list[float] = []
    ours_cpu: list[float] = []
    theirs: list[float] = []
    theirs_cpu: list[float] = []
    nodes: list[int] = []
    mismatches = fallbacks = 0
    for _ in range(instances):
        for t in tightness:
            problem = parse_problem(synthetic_problem(rng, *shape, t))
            runs, cpu = [], []
            for _ in range(repeats):
                start, start_cpu = time.perf_counter(), _cpu()
                solution = solve(problem)
                runs.append(time.perf_counter() - start)
                cpu.append(_cpu() - start_cpu)
            ours.append(statistics.median(runs))
            ours_cpu.append(statistics.median(cpu))
            nodes.append(solution.nodes)
            fallbacks += solution.method.startswith("milp")
            if not with_pulp:
                continue
            start, start_cpu = time.perf_counter(), _cpu()
            selection = pulp_solve(problem)
            theirs.append(time.perf_counter() - start)
            theirs_cpu.append(_cpu() - start_cpu)
            if selection is None:
                mismatches += solution.feasible
                continue
            reference = evaluate(problem, selection)
            if not (solution.feasible and abs(reference.objective - solution.objective) <= 1e-9):
                mismatches += 1
    return {
        "shape": shape,
        "ours": ours,
        "ours_cpu": ours_cpu,
        "pulp": theirs,
        "pulp_cpu": theirs_cpu,
        "nodes": nodes,
        "mismatches": mismatches,
        "fallbacks": fallbacks,
    }


def machine() -> str:
    from profiling.latency import fingerprint

    model = fingerprint()["cpu_model"]
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"{model}, {os.cpu_count()} logical cores, Python {platform.python_version()}, load average {load}"


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| shape (models x blocks x choices) | instances | ours median ms | ours p95 ms | PuLP/CBC median ms "
        "| PuLP/CBC p95 ms | median ratio | ours CPU median ms | PuLP/CBC CPU median ms | CPU ratio "
        "| objective mismatches | ours median nodes | MILP fallbacks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    med = statistics.median
    for r in results:
        m, b, c = r["shape"]
        ours = f"{med(r['ours']) * 1e3:.2f} | {_pct(r['ours'], 0.95) * 1e3:.2f}"
        ours_cpu = f"{med(r['ours_cpu']) * 1e3:.2f}"
        if r["pulp"]:
            theirs = f"{med(r['pulp']) * 1e3:.1f} | {_pct(r['pulp'], 0.95) * 1e3:.1f} | {med(r['pulp']) / med(r['ours']):.0f}x"
            cpu = f"{ours_cpu} | {med(r['pulp_cpu']) * 1e3:.1f} | {med(r['pulp_cpu']) / med(r['ours_cpu']):.0f}x"
            checks = str(r["mismatches"])
        else:
            theirs, cpu, checks = "- | - | -", f"{ours_cpu} | - | -", "-"
        rows.append(f"| {m} x {b} x {c} | {len(r['ours'])} | {ours} | {theirs} | {cpu} | {checks} | {med(r['nodes']):.0f} | {r['fallbacks']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma list of MODELSxBLOCKSxCHOICES (default {DEFAULT_SHAPES})")
    parser.add_argument("--tightness", default=DEFAULT_TIGHTNESS, help="budget levels in [0, 1], 0 = tightest (default %(default)s)")
    parser.add_argument("--instances", type=int, default=5, help="instances per shape and budget level (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of our solver per instance; the median counts (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-pulp", action="store_true", help="time only our solver")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny smoke setting (seconds, meaningless timings): overrides {', '.join(f'--{k}' for k in QUICK)}")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        if any(len(s) != 3 or min(s) < 1 or s[2] < 2 for s in shapes):
            raise ValueError
        tightness = [float(t) for t in args.tightness.split(",")]
    except ValueError:
        parser.error("--shapes takes e.g. 4x8x6 (models x blocks x choices, choices >= 2); --tightness e.g. 0.1,0.5")
    if args.instances < 1 or args.repeats < 1:
        parser.error("--instances and --repeats must be >= 1")
    if not args.no_pulp:
        try:
            import pulp  # noqa: F401
        except ImportError:
            parser.error("PuLP is not installed (it is in the dev extras: pip install -e '.[dev]'), or pass --no-pulp")

    command = "bench/optimizer.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = []
    started = time.perf_counter()
    for shape in shapes:
        r = run_shape(shape, tightness, args.instances, args.repeats, args.seed, not args.no_pulp)
        results.append(r)
        print(f"{'x'.join(map(str, shape))}: ours median {statistics.median(r['ours']) * 1e3:.2f} ms", file=sys.stderr)
    text = "\n".join(
        [
            f"command: `{command.strip()}`",
            "",
            f"machine: {machine()}",
            "",
            f"budget levels {args.tightness}; {args.instances} instances per level; wall time {time.perf_counter() - started:.0f} s",
            "",
            table(results),
        ]
    )
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 1 if any(r["mismatches"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
