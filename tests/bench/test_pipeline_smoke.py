"""bench/pipeline.py in its --quick setting, on a real local Ray and real Fashion-MNIST: the
retrain stage runs to the end on 1 and on 2 Ray CPUs, the report holds both rows and a
speed-up figure consistent with them, and Ray is shut down afterwards. About a minute on
the shared 2-core machine (three Ray starts); the timings themselves are not asserted."""

from __future__ import annotations

import importlib.util
import json
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
    out = tmp_path / "pipeline.json"

    code = bench.main(["--quick", "--data-dir", str(fmnist_dir), "--workdir", str(tmp_path / "work"),
                       "--out", str(out)])

    assert code == 0
    assert not ray.is_initialized(), "the benchmark left Ray running"
    result = json.loads(out.read_text())
    assert "bench/pipeline.py --quick" in result["command"]
    assert set(result["runs"]) == {"1", "2"}  # the stage finished on 1 and on 2 CPUs
    assert result["tasks"] >= 2  # something to run in parallel
    for cpus, run in result["runs"].items():
        assert run["best_s"] > 0 and 0 < run["tasks_running"] <= int(cpus) + 0.05, (cpus, run)
    assert result["speedup"] == pytest.approx(result["runs"]["1"]["best_s"] / result["runs"]["2"]["best_s"], abs=0.01)
    assert result["capacity"] > 0
    assert f"speedup 2 vs 1 CPU: {result['speedup']:.2f}x" in capsys.readouterr().out
