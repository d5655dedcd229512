"""Benchmark: what page faults cost a CNN on CPU, and what the pipeline's two fixes save.

    .venv/bin/python bench/allocator.py                  # about 3 minutes on 2 cores
    .venv/bin/python bench/allocator.py --models resnet20 --images 512

Per model of the zoo (ResNet-20 width 16, MobileNetV2 width 0.5, 28x28 inputs) it times, each
case in a fresh process because the allocator setting is process-wide:

- **evaluate**: `legoblocks.train.evaluate` over `--images` images at batch 512 (the old
  default) and at `EVAL_BATCH_SIZE`, with glibc's default allocator and after
  `pipelines.allocator.keep_freed_memory` (what every pipeline unit now runs under);
- **train**: `legoblocks.train.train_teacher` for one epoch of `--images` images at batch
  128 (the recipe's teacher and joint batch), default allocator and kept memory.

Each row: wall, user and system CPU seconds and minor page faults of the timed part (one
warm-up pass first). Images are random: timing does not depend on their content.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the packages live in the repo root
    sys.path.insert(0, str(REPO))

MODELS = {"resnet20": ("resnet", {"depth": 20, "width": 16}), "mobilenetv2": ("mobilenetv2", {"width_mult": 0.5})}
OLD_EVAL_BATCH = 512
TRAIN_BATCH = 128


def _case(model: str, kind: str, batch: int, keep: bool, images: int, threads: int) -> dict[str, float]:
    """One timed case in this process (called in a child by `main`)."""
    import resource
    import time

    import torch
    from torch.utils.data import TensorDataset

    from legoblocks import zoo
    from legoblocks.train import evaluate, train_teacher
    from pipelines.allocator import keep_freed_memory

    if keep:
        keep_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fn, options = MODELS[model]
    net = getattr(zoo, fn)(**options)
    ds = TensorDataset(torch.randn(images, 1, 28, 28), torch.randint(0, 10, (images,)))

    def work() -> None:
        if kind == "evaluate":
            evaluate(net, ds, batch_size=batch)
        else:
            train_teacher(net, ds, epochs=1, lr=0.01, batch_size=batch, weight_decay=0.0, seed=0, progress=False)

    work()  # warm-up: first-touch of weights, kernels' one-off set-up
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    work()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    return {"wall_s": t1 - t0, "user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime,
            "minor_faults": r1.ru_minflt - r0.ru_minflt}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    p.add_argument("--images", type=int, default=2048, help="images per timed pass (default 2048)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, as the pipeline's units (default 2)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = p.parse_args(argv)
    if args.images < 1 or args.threads < 1:
        p.error(f"--images and --threads must be >= 1, got {args.images} and {args.threads}")
    if args.case:
        model, kind, batch, keep = args.case.split(",")
        print(json.dumps(_case(model, kind, int(batch), keep == "keep", args.images, args.threads)))
        return 0

    from legoblocks.train import EVAL_BATCH_SIZE

    cases = [(kind, batch, keep) for kind, batches in (("evaluate", (OLD_EVAL_BATCH, EVAL_BATCH_SIZE)), ("train", (TRAIN_BATCH,)))
             for batch in batches for keep in ("default", "keep")]
    print(f"{platform.processor() or platform.machine()}, {args.threads} torch threads, {args.images} images per pass, "
          f"glibc {platform.libc_ver()[1]}\n")
    print("| model | work | batch | allocator | wall s | user s | sys s | minor faults | vs default at batch 512 / 128 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        base: dict[str, float] = {}
        for kind, batch, keep in cases:
            out = subprocess.run([sys.executable, __file__, "--case", f"{model},{kind},{batch},{keep}",
                                  "--images", str(args.images), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if keep == "default" and batch in (OLD_EVAL_BATCH, TRAIN_BATCH):
                base[kind] = r["wall_s"]
            print(f"| {model} | {kind} | {batch} | {'kept (keep_freed_memory)' if keep == 'keep' else 'glibc default'} "
                  f"| {r['wall_s']:.2f} | {r['user_s']:.2f} | {r['sys_s']:.2f} | {r['minor_faults']:,} "
                  f"| {base[kind] / r['wall_s']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
