"""Benchmark: our exact solver against LegoDNN's formulation in PuLP + CBC, same instances.

    .venv/bin/python bench/optimizer.py                      # the full table (about a minute)
    .venv/bin/python bench/optimizer.py --shapes 4x8x6 --instances 5 --out /tmp/table.md

Instances are seeded, shaped like profile tables (`optimizer.problem.synthetic_problem`),
loaded once (`compile_problem(json, frontiers=True)`, as a device's re-solving loop does:
validation, arrays and the models' frontiers; **load** is its time) and solved under
several budget levels, as a device re-solves on every budget change. Per solve we time
**solve** (`CompiledProblem.solve(budgets)` on the loaded problem), **parse + solve**
(`compile_problem(parse_problem(json))` then solve: a one-off `legodnn solve`) and
**PuLP/CBC** (LegoDNN's optimizer: a binary per block and descendant, latency and memory
rows, built per re-solve, bundled CBC with gapAbs=0). Times are medians of `--repeats` runs
(PuLP: one); p50/p99 are over all solves of a row. Both answers are evaluated by
`optimizer.evaluate`: equal objectives (1e-9) agree; where ours is higher, it must equal
HiGHS's zero-gap optimum ("better"); anything else is a mismatch (exit status 1). Shapes
ending in "z" are degenerate (every drop 0, 200 tied or worse compositions: a tiny, badly
trained model) and also fail past `GUARD_MS` p99 solve (not with `--quick`, the smoke test's
setting), `GUARD_MB` peak allocation or any MILP fallback.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # as a script bench/ is first on sys.path, where this file would shadow `optimizer`
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from optimizer import Problem, compile_problem, evaluate, parse_problem  # noqa: E402
from optimizer.problem import synthetic_budgets, synthetic_problem  # noqa: E402

DEFAULT_SHAPES = "1x8x6,1x10x8,2x8x6,2x10x8,4x8x6,4x10x8,6x8x6,6x10x8,10x12x8,1x12x7,3x9x6,3x12x8,5x11x7,6x12x8,1x12x5z"
DEFAULT_TIGHTNESS = "0.1,0.3,0.5,0.8"
QUICK = {"shapes": "1x3x3,2x3x4,1x4x3z", "tightness": "0.2,0.7", "instances": 1, "repeats": 1}
GUARD_MS, GUARD_MB = 50.0, 100.0  # --quick: the smoke test's; a "z" row fails past this p99 solve or peak


def pulp_solve(problem: Problem) -> dict[str, list[str]] | None:
    """LegoDNN's formulation (binary x per block and descendant) in PuLP, solved by CBC."""
    import pulp

    lp = pulp.LpProblem("block_selection", pulp.LpMinimize)
    x = {(m, b, d): (pulp.LpVariable(f"x_{m}_{b}_{d}", cat=pulp.LpBinary), c, model.weight)
         for m, model in enumerate(problem.models) for b, block in enumerate(model.blocks) for d, c in enumerate(block.choices)}
    lp += pulp.lpSum(w * c.accuracy_drop * v for v, c, w in x.values())
    for group in dict.fromkeys((m, b) for m, b, _ in x):  # one choice per block
        lp += pulp.lpSum(v for (m, b, _), (v, _, _) in x.items() if (m, b) == group) == 1
    for key, budget in (("latency_ms", problem.budgets.latency_ms), ("memory_bytes", problem.budgets.memory_bytes)):
        if budget is not None:
            lp += pulp.lpSum(getattr(c, key) * v for v, c, _ in x.values()) <= budget
    if pulp.LpStatus[lp.solve(pulp.PULP_CBC_CMD(msg=False, gapAbs=0))] != "Optimal":
        return None
    return {model.name: [max(((x[(m, b, d)][0].varValue or 0.0), c.id) for d, c in enumerate(block.choices))[1]
                         for b, block in enumerate(model.blocks)] for m, model in enumerate(problem.models)}


def _timed(fn: Any, repeats: int) -> tuple[float, Any]:
    """(median seconds over `repeats` calls, the last result)."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _agreement(problem: Problem, ours: Any, theirs: dict[str, list[str]] | None) -> str:
    """"equal", "better" (ours above CBC's and equal to HiGHS's) or "mismatch"."""
    if theirs is None:
        return "equal" if not ours.feasible else "mismatch"
    reference = evaluate(problem, theirs).objective
    if ours.feasible and abs(ours.objective - reference) <= 1e-9:
        return "equal"
    from optimizer.milp import solve_milp  # SciPy: only to settle a disagreement

    exact = solve_milp(problem)
    better = ours.feasible and ours.objective > reference and exact and abs(exact[0] - ours.objective) <= 1e-9
    return "better" if better else "mismatch"


def _flatten(rng: random.Random, models: list[dict[str, Any]]) -> None:
    """A tiny, badly trained model's tables ("z" shapes): drops 0, 200 compositions tied or worse."""
    for model in models:
        for choice in (c for block in model["blocks"] for c in block["choices"]):
            choice["accuracy_drop"] = 0.0
        model["compositions"] = [{"selection": [rng.choice(b["choices"])["id"] for b in model["blocks"]],
                                  "accuracy": rng.choice([0.9, 0.85, 0.3])} for _ in range(200)]


def run_shape(shape: tuple[int, int, int, bool], tightness: list[float], instances: int, repeats: int, seed: int,
              with_pulp: bool) -> dict[str, Any]:
    """Time every solve of one shape (models, blocks, choices, degenerate): per-solve seconds,
    agreement, search states and (degenerate shapes) the peak allocation of a solve."""
    rng = random.Random(f"{seed}-{shape[:3]}{'z' * shape[3]}")  # the same instances as before "z" shapes
    out: dict[str, Any] = {"shape": shape, **{k: [] for k in ("solve", "parse", "pulp", "states", "load")}, "peak": 0.0,
                           **{k: 0 for k in ("fallbacks", "equal", "better", "mismatch")}}
    for _ in range(instances):
        models = synthetic_problem(rng, *shape[:3], 0.5)["models"]
        _flatten(rng, models) if shape[3] else None
        start = time.perf_counter()
        compiled = compile_problem({"models": models, "budgets": synthetic_budgets(models, tightness[0])}, frontiers=True)
        out["load"].append(time.perf_counter() - start)
        for t in tightness:
            raw = {"models": models, "budgets": synthetic_budgets(models, t)}
            seconds, solution = _timed(lambda: compiled.solve(raw["budgets"]), repeats)
            out["solve"].append(seconds)
            out["parse"].append(_timed(lambda: compile_problem(parse_problem(raw)).solve(), repeats)[0])
            out["states"].append(solution.nodes)
            out["fallbacks"] += solution.method.startswith("milp")
            if shape[3]:  # untimed: numpy reports its allocations to tracemalloc
                tracemalloc.start()
                compile_problem(parse_problem(raw)).solve()
                out["peak"] = max(out["peak"], tracemalloc.get_traced_memory()[1] / 1e6)
                tracemalloc.stop()
            if with_pulp:
                problem = parse_problem(raw)
                seconds, selection = _timed(lambda: pulp_solve(problem), 1)
                out["pulp"].append(seconds)
                out[_agreement(problem, solution, selection)] += 1
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def machine() -> str:
    from profiling.latency import fingerprint

    model = fingerprint()["cpu_model"]
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"{model}, {os.cpu_count()} logical cores, Python {platform.python_version()}, load average {load}"


def table(results: list[dict[str, Any]]) -> str:
    head = ("| shape (models x blocks x choices) | solves | solve p50 ms | solve p99 ms | PuLP/CBC p50 ms | PuLP/CBC p99 ms "
            "| solve vs CBC (p50) | parse+solve p50 ms | parse+solve p99 ms | parse+solve vs CBC (p50) | objective mismatches "
            "| better than CBC (= HiGHS) | median states | MILP fallbacks | peak MB (zero drops) | load p50 ms |")
    rows = [head, "|" + "---|" * 16]
    every = {"shape": None, **{k: [v for r in results for v in r[k]] for k in ("solve", "parse", "pulp", "states", "load")},
             **{k: sum(r[k] for r in results) for k in ("fallbacks", "mismatch", "better")}, "peak": max(r["peak"] for r in results)}
    med = statistics.median
    for r in [*results, every]:
        label = "all" if r["shape"] is None else " x ".join(map(str, r["shape"][:3])) + "z" * r["shape"][3]
        ours = f"{med(r['solve']) * 1e3:.3f} | {_pct(r['solve'], 0.99) * 1e3:.3f}"
        parse = f"{med(r['parse']) * 1e3:.3f} | {_pct(r['parse'], 0.99) * 1e3:.3f}"
        if r["pulp"]:
            p50 = med(r["pulp"])
            theirs = f"{p50 * 1e3:.1f} | {_pct(r['pulp'], 0.99) * 1e3:.1f} | {p50 / med(r['solve']):.0f}x"
            parse += f" | {p50 / med(r['parse']):.0f}x"
            checks = f"{r['mismatch']} | {r['better']}"
        else:
            theirs, parse, checks = "- | - | -", parse + " | -", "- | -"
        rows.append(f"| {label} | {len(r['solve'])} | {ours} | {theirs} | {parse} | {checks} | {med(r['states']):.0f} | {r['fallbacks']} "
                    f"| {r['peak']:.1f} | {med(r['load']) * 1e3:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma list of MODELSxBLOCKSxCHOICES (default {DEFAULT_SHAPES})")
    parser.add_argument("--tightness", default=DEFAULT_TIGHTNESS, help="budget levels in [0, 1], 0 = tightest (default %(default)s)")
    parser.add_argument("--instances", type=int, default=5, help="instances (tables) per shape (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of ours per solve; the median counts (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-pulp", action="store_true", help="time only our solver")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny smoke setting (seconds, meaningless timings): overrides {', '.join(f'--{k}' for k in QUICK)}")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    try:
        shapes = [(*(int(v) for v in s.lower().rstrip("z").split("x")), s.lower().endswith("z")) for s in args.shapes.split(",")]
        if any(len(s) != 4 or min(s[:3]) < 1 or s[2] < 2 for s in shapes):
            raise ValueError
        tightness = [float(t) for t in args.tightness.split(",")]
    except ValueError:
        parser.error("--shapes takes e.g. 4x8x6 (models x blocks x choices, choices >= 2; 4x8x6z: every drop 0); --tightness e.g. 0.1,0.5")
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
        print(f"{'x'.join(map(str, shape[:3]))}{'z' * shape[3]}: solve p50 {statistics.median(r['solve']) * 1e3:.3f} ms", file=sys.stderr)
    text = "\n".join([
        f"command: `{command.strip()}`", "", f"machine: {machine()}", "",
        f"budget levels {args.tightness}; {args.instances} instances per shape; wall time {time.perf_counter() - started:.0f} s",
        "", table(results),
    ])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    slow = float("inf") if args.quick else GUARD_MS  # --quick timings are meaningless
    over = [r for r in results if r["shape"][3] and (_pct(r["solve"], 0.99) * 1e3 > slow or r["peak"] > GUARD_MB or r["fallbacks"])]
    for r in over:
        print(f"guard failed: {r['shape']} p99 {_pct(r['solve'], 0.99) * 1e3:.1f} > {slow} ms, peak {r['peak']:.0f} > {GUARD_MB} MB or {r['fallbacks']} fallbacks", file=sys.stderr)
    return 1 if over or any(r["mismatch"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
