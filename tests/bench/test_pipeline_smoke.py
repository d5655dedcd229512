"""bench/pipeline.py in its --quick setting, on a real local Ray and real Fashion-MNIST: the
retrain stage runs to the end on 1 and on 2 Ray CPUs, the report holds both rows and a
speed-up figure consistent with them, and Ray is shut down afterwards. About a minute on
the shared 2-core machine (three Ray starts); the timings themselves are not asserted."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "pipeline.py"


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_pipeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # Not registered in sys.modules: cloudpickle then ships the script's Ray task functions
    # by value, as it does when the script runs as __main__ (workers cannot import it).
    spec.loader.exec_module(module)
    return module


def test_quick_run_times_both_cpu_counts_and_shuts_ray_down(
    tmp_path: Path, fmnist_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import ray

    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):  # a local Ray and a workdir store only
        monkeypatch.delenv(name, raising=False)
    bench = _load_bench()
    report = tmp_path / "pipeline.md"

    code = bench.main(["--quick", "--data-dir", str(fmnist_dir), "--workdir", str(tmp_path / "work"),
                       "--write", str(report)])

    assert code == 0
    assert not ray.is_initialized(), "the benchmark left Ray running"
    text = report.read_text()
    assert "bench/pipeline.py --quick" in text
    rows = {int(m[1]): (float(m[2]), float(m[3])) for m in
            re.finditer(r"^\| (\d) \| ([\d.]+) \| [\d., ]+ \| ([\d.]+) \|$", text, re.MULTILINE)}
    assert set(rows) == {1, 2}, text  # the stage finished on 1 and on 2 CPUs
    tasks = int(re.search(r"(\d+) Ray tasks \(one per", text)[1])
    assert tasks >= 2  # something to run in parallel
    for cpus, (best, busy) in rows.items():
        assert best > 0 and 0 < busy <= cpus + 0.05, (cpus, best, busy)
    speedup = float(re.search(r"Speedup 2 vs 1 CPU: \*\*([\d.]+)x\*\*", text)[1])
    assert speedup == pytest.approx(rows[1][0] / rows[2][0], abs=0.01)
    capacity = float(re.search(r"Parallel capacity of the host at the time: \*\*([\d.]+)x\*\*", text)[1])
    assert capacity > 0
    assert f"speedup 2 vs 1 CPU: {speedup:.2f}x" in capsys.readouterr().out
