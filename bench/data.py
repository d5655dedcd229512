"""`legodnn run` on your own data: peak memory and wall time on 10k and 60k images, and the image-folder
path against the IDX path on the same images.

    .venv/bin/python bench/data.py                  # writes docs/results/data.json and prints a table
    .venv/bin/python bench/data.py --quick --workdir /tmp/d --out /tmp/d/data.json

Fashion-MNIST is exported as 64x64 RGB PNG folders (`pipelines.data.export_fashion_mnist`) of
`--sizes` training images (+ 2,000 test images), and `legodnn run --executor local` runs on
each with the embedded defaults except the data (all training images, one teacher epoch).
Peak memory is the proportional set size (PSS) of the whole process tree (the run and its
DataLoader workers), polled from /proc every 0.2 s: pages a forked worker shares with its
parent count once. The same recipe then runs on the IDX files at 64x64 RGB (same pixels,
same normalization, no augmentation on either side), and the teachers' test accuracies are
compared: the two paths must agree within the test set's noise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LEGODNN = str(Path(sys.executable).parent / "legodnn")
FMNIST = "/usr/share/datasets/fashion-mnist"
COMMON = ["--executor", "local", "--no-publish", "--json", "--set", "model.in_channels=3", "--set", "model.input_size=64",
          "--set", "data.train_size=null", "--set", "data.val_size=1000", "--set", "data.test_size=2000",
          "--set", "data.augment=false", "--set", "data.mean=[0.286,0.286,0.286]", "--set", "data.std=[0.353,0.353,0.353]",
          "--set", "teacher.epochs=1"]
QUICK = ["--set", "model.options.width=4", "--set", "data.val_size=50", "--set", "joint.steps=4",
         "--set", "profile.latency_repeats=3", "--set", "profile.additivity_n=2", "--set", "profile.calibration_k=0",
         "--set", "profile.latency_calibration_k=0", "--set", "data.test_size=200"]


def tree_pss_kb(pid: int) -> int:
    """Proportional set size of a process and all its descendants (kB), from /proc: memory a
    forked DataLoader worker shares with its parent counts once, not once per process."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            total += int(next(line.split()[1] for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()
                              if line.startswith("Pss:")))
        except (OSError, StopIteration):
            pass
    return total


def measured_run(args: list[str], workdir: Path) -> dict:
    """One `legodnn run`: wall time, peak RSS of its process tree, its JSON summary."""
    started = time.perf_counter()
    proc = subprocess.Popen([LEGODNN, "run", "--workdir", str(workdir), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_pss_kb(proc.pid))
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"legodnn run failed ({proc.returncode}): {err[-3000:]}")
    summary = json.loads(out[out.index("{"):])
    return {"wall_s": round(time.perf_counter() - started, 1), "peak_pss_mb": round(peak / 1024, 1),
            "teacher_test_accuracy": summary["teacher"]["test_accuracy"], "units": summary["executed"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 60000], help="training images per run")
    p.add_argument("--workdir", type=Path, default=REPO / ".legodnn" / "bench-data")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "data.json")
    p.add_argument("--quick", action="store_true", help="tiny smoke setting (meaningless numbers)")
    args = p.parse_args(argv)
    from pipelines.data import export_fashion_mnist

    extra = QUICK if args.quick else []
    sizes = [200, 400] if args.quick else args.sizes
    rows = []
    for n in sizes:
        folder = args.workdir / f"fmnist-{n}"
        if not (folder / "done").is_file():
            export_fashion_mnist(Path(FMNIST), folder, per_class={"train": n // 10, "test": 200 if not args.quick else 20})
            (folder / "done").write_text("")
        row = measured_run([*COMMON, *extra, "--set", "data.source=imagefolder", "--set", f"data.dir={folder}"],
                           args.workdir / f"run-folder-{n}")
        rows.append({"source": "imagefolder", "train_images": n, **row})
        print(json.dumps(rows[-1]), flush=True)
    n = sizes[-1]  # the whole training set: both paths draw from the same 60,000 images
    idx = measured_run([*COMMON, *extra, "--set", f"data.train_size={n - 1000 if not args.quick else n - 50}"],
                       args.workdir / f"run-idx-{n}")
    rows.append({"source": "fashion-mnist", "train_images": n, **idx})
    print(json.dumps(rows[-1]), flush=True)
    result = {"command": "bench/data.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "load_average": os.getloadavg()[0], "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
