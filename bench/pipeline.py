"""Retrain-stage wall time on a local Ray with 1 and with 2 CPUs: the same units, the same data.

    .venv/bin/python bench/pipeline.py [--config FILE] [--workdir DIR] [--repeats N] [--out docs/results/pipeline.json]
    .venv/bin/python bench/pipeline.py --quick --workdir /tmp/q --out /tmp/q/pipeline.json   # smoke setting

The stages before retraining (teacher, detect, descend, blockio) run once, cached in the
work directory. Then, for each CPU count, a fresh local Ray starts, its worker processes
are warmed up (torch and the project imported, so process start-up is not what we time),
the retrain stage's cache is cleared and the stage is timed end to end as the pipeline runs
it (driver submits one task per block, waits for all). The best of `--repeats` is reported.
Target: 2 CPUs at least 1.7x faster than 1 CPU. The host's parallel capacity (two
single-threaded torch processes together vs one alone) is measured first: on a shared host
it is the ceiling of any speedup. `--quick` shrinks the model, the data, the repeats and the
probe so the whole path runs in about a minute (meaningless timings).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROBE_ITERATIONS = 3000
# --quick: a width-4 ResNet-20 on a few hundred images, one repeat, a short capacity probe.
QUICK_CONFIG = {
    "model": {"options": {"width": 4}},
    "data": {"train_size": 256, "val_size": 64, "test_size": 64},
    "teacher": {"epochs": 1},
    "retrain": {"epochs": 1, "limit": 128},
}
QUICK_PROBE_ITERATIONS = 100


def _warm(_: int) -> int:
    import legoblocks.retrain  # noqa: F401 - what a retrain task imports first
    import legoblocks.serialize  # noqa: F401

    return os.getpid()


_PROBE = """
import sys, time, torch
torch.set_num_threads(1)
x = torch.randn(256, 256)
t = time.perf_counter()
for _ in range(int(sys.argv[1])):
    x @ x
print(time.perf_counter() - t)
"""


def parallel_capacity(iterations: int = PROBE_ITERATIONS) -> float:
    """How many cores two single-threaded torch processes actually get together (1 to 2)."""
    def run(n: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", _PROBE, str(iterations)], stdout=subprocess.PIPE, text=True)
                 for _ in range(n)]
        return max(float(p.communicate()[0]) for p in procs)

    return 2 * run(1) / run(2)


def time_retrain(cfg, prefix, cpus: int, repeats: int) -> tuple[float, list[float], float]:
    """Best-of-`repeats` wall time of the recipe's retrain stage on a fresh local Ray of `cpus` CPUs."""
    import ray

    from pipelines.executors import RayExecutor
    from pipelines.recipe import stage
    from pipelines.run import run_recipe

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
    try:
        warm = ray.remote(num_cpus=1)(_warm)
        ray.get([warm.remote(i) for i in range(4 * cpus)])  # every CPU gets a worker with torch imported
        times, busy = [], []
        for _ in range(repeats):
            shutil.rmtree(prefix.cache.root / "retrain", ignore_errors=True)
            started = time.perf_counter()
            run = run_recipe(cfg, executor=RayExecutor(num_cpus=1.0), stages=[stage("retrain")],
                             checked=prefix.checked, continue_from=prefix)
            times.append(time.perf_counter() - started)
            records = run.records["retrain"]
            assert run.stages.counter.executed == len(records) == len(trainable(prefix))
            # Task-seconds per wall-second: how many tasks Ray kept running on average.
            busy.append(sum(r.seconds for r in records) / times[-1])
        best = min(range(repeats), key=lambda i: times[i])
        return times[best], times, busy[best]
    finally:
        ray.shutdown()


def trainable(prefix) -> list[str]:
    return [r.unit for r in prefix.records["descend"] if len(r.meta["choices"]) > 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="pipeline config (default: the embedded defaults)")
    parser.add_argument("--workdir", default=str(REPO / ".legodnn" / "bench-pipeline"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "pipeline.json",
                        help="where the results go (JSON)")
    parser.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: the config's data.dir)")
    parser.add_argument("--quick", action="store_true", help="smoke setting: about a minute, meaningless timings")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    from pipelines.config import load_config, set_dotted
    from pipelines.recipe import STAGES
    from pipelines.run import run_recipe

    overrides: dict = {}
    if args.quick:
        overrides, args.repeats = copy.deepcopy(QUICK_CONFIG), 1
    overrides.update(workdir=args.workdir)
    if args.data_dir:
        set_dotted(overrides, "data.dir", args.data_dir)
    cfg = load_config(args.config, overrides)
    prefix = run_recipe(cfg, stages=STAGES[:4])  # teacher, detect, descend, blockio: in-process, cached
    capacity = parallel_capacity(QUICK_PROBE_ITERATIONS if args.quick else PROBE_ITERATIONS)
    print(f"parallel capacity of this host right now: {capacity:.2f} of 2 cores", flush=True)
    results = {}
    for cpus in (1, 2):
        best, all_times, busy = time_retrain(cfg, prefix, cpus, args.repeats)
        results[cpus] = (best, all_times, busy)
        print(f"{cpus} CPU(s): best {best:.2f} s of {[round(t, 2) for t in all_times]}, "
              f"{busy:.2f} tasks running on average", flush=True)
    speedup = round(results[1][0] / results[2][0], 3)
    print(f"speedup 2 vs 1 CPU: {speedup:.2f}x (target >= 1.7x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["bench/pipeline.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"), "load_average": os.getloadavg()[0], "capacity": round(capacity, 3),
        "tasks": len(trainable(prefix)), "speedup": speedup,
        "runs": {str(c): {"best_s": round(b, 2), "all_s": [round(t, 2) for t in ts], "tasks_running": round(u, 2)}
                 for c, (b, ts, u) in results.items()},
    }, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
