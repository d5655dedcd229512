"""Shared fixtures of the pipeline tests: a tiny config, a real MLflow server, one clean run.

The clean run is session-scoped: the end-to-end, resume, fault and cluster tests all start
from copies of its work directory, so the expensive stages (teacher, joint) run once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LEGODNN = str(Path(sys.executable).parent / "legodnn")
MLFLOW = str(Path(sys.executable).parent / "mlflow")


def tiny_config(data_dir: Path, workdir: Path, **sections: Any) -> dict[str, Any]:
    """resnet20 at width 4 on a few hundred images: every stage runs in seconds."""
    cfg: dict[str, Any] = {
        "workdir": str(workdir),
        "model": {"ref": "resnet20", "options": {"width": 4}},
        "data": {"dir": str(data_dir), "train_size": 300, "val_size": 200, "test_size": 200, "seed": 0},
        "teacher": {"epochs": 3, "lr": 0.1, "batch_size": 32},
        "retrain": {"epochs": 1, "batch_size": 32},
        "joint": {"steps": 10, "checkpoint_every": 5, "batch_size": 32, "anchor_budgets": [0.6]},
        "profile": {"envs": 1, "additivity_n": 3, "calibration_k": 3, "latency_repeats": 3, "latency_warmup": 1,
                    "latency_batch_size": 1},
        "ray": {"local_num_cpus": 2},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values) if isinstance(values, dict) else cfg.__setitem__(name, values)
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pipeline_env() -> dict[str, str]:
    """Environment of every pipeline subprocess: loopback Ray, a pinned code version.

    The code version is pinned so that other edits in a shared working tree during the
    test session cannot invalidate the cache between the runs a test compares.
    """
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        LEGODNN_CODE_VERSION=f"test-{uuid.uuid4().hex[:8]}",
        PYTHONUNBUFFERED="1",
    )
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "LEGODNN_TEST_FAIL_ONCE", "LEGODNN_TEST_JOINT_FAIL_ONCE"):
        env.pop(name, None)
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([LEGODNN, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def summary_of(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    """The JSON summary `legodnn run --json` prints last on stdout."""
    assert proc.returncode == 0, f"legodnn failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    start = proc.stdout.index("{")
    return json.loads(proc.stdout[start:])


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on 127.0.0.1, stopped by PID at the end of the session."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/server.db", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    stop_tree(proc.pid, timeout=2)
    proc.wait()
    log.close()


@dataclass
class CleanRun:
    workdir: Path
    config: dict[str, Any]
    config_path: Path
    summary: dict[str, Any]
    tracking_uri: str
    joint_marker: Path
    stdout: str


@pytest.fixture(scope="session")
def clean_run(tmp_path_factory: pytest.TempPathFactory, fmnist_dir: Path, pipeline_env: dict[str, str],
              mlflow_server: str) -> CleanRun:
    """One full pipeline run, tracked on the MLflow server; its joint worker dies once after
    step 5 (test hook), so the run also proves that Ray Train resumes from a checkpoint."""
    root = tmp_path_factory.mktemp("clean")
    workdir = root / "work"
    cfg = tiny_config(fmnist_dir, workdir)
    config_path = write_config(root / "tiny.yaml", cfg)
    marker = root / "joint-failed-once"
    env = {**pipeline_env, "MLFLOW_TRACKING_URI": mlflow_server, "LEGODNN_TEST_JOINT_FAIL_ONCE": f"5:{marker}"}
    proc = run_cli(["run", "--config", str(config_path), "--json", "--experiment", "e2e"], env)
    return CleanRun(workdir, cfg, config_path, summary_of(proc), mlflow_server, marker, proc.stdout)


def copy_workdir(src: Path, dst: Path, drop_stages: tuple[str, ...] = ()) -> Path:
    """A copy of a work directory's cache (not its MLflow store or keys), minus some stages."""
    shutil.copytree(src / "cache", dst / "cache")
    for stage in drop_stages:
        shutil.rmtree(dst / "cache" / stage, ignore_errors=True)
    return dst


def _children() -> dict[int, list[int]]:
    """ppid -> pids, read from /proc (no psutil in the environment)."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent pid; the command name (field 2) may hold spaces, so split after ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_tree(pid: int, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Signal a process we started and every process it started (each by PID); SIGKILL
    whatever is still alive after `timeout`."""
    pids = [pid, *descendants(pid)]
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for p in pids:
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Helpers:
    """The helpers above, for test modules (importlib mode cannot import conftest)."""

    tiny_config = staticmethod(tiny_config)
    write_config = staticmethod(write_config)
    free_port = staticmethod(free_port)
    run_cli = staticmethod(run_cli)
    summary_of = staticmethod(summary_of)
    copy_workdir = staticmethod(copy_workdir)
    stop_tree = staticmethod(stop_tree)
    descendants = staticmethod(descendants)
    LEGODNN = LEGODNN
    REPO = REPO


@pytest.fixture(scope="session")
def pl() -> type[Helpers]:
    return Helpers
