"""A two-node Ray cluster on loopback only, and the pipeline submitted to it with `ray job submit`.

Both `ray start` processes run inside a network namespace the test creates, whose only
interface is `lo`: nothing the cluster opens can be reached from outside, which is what lets
the second node join (Ray refuses multi-node with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the
setting that pins a single local node to 127.0.0.1). The cluster is stopped by PID and the
namespace deleted at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest



def _ray_bin() -> str:
    import sys

    return str(Path(sys.executable).parent / "ray")


def _wait_for(predicate, timeout: float, what: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.time() + timeout
    while not predicate():
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{what}: a ray process exited with {p.returncode}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.fixture
def netns():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        # A failure, not a skip: the multi-node path must run wherever the suite runs.
        pytest.fail("the two-node cluster test creates a network namespace: run the suite as root with iproute2 "
                    "(`make test` installs it), or deselect it with `-k 'not two_node'`")
    name = f"legodnn-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_pipeline_submitted_to_a_two_node_cluster_runs_tasks_on_both_nodes(
    netns, clean_run, pl, tmp_path, pipeline_env
) -> None:
    ray = _ray_bin()
    # Only `lo` exists in the namespace, so multi-node mode cannot bind anything external.
    env = {**pipeline_env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    # A short temp dir: Ray's unix socket paths must stay under 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="lray", dir="/tmp")
    gcs_port, dash_port = 6379, 8265  # free inside a fresh namespace
    logs = tmp_path / "logs"
    logs.mkdir()
    netns_exec = ["ip", "netns", "exec", netns]
    procs: list[subprocess.Popen] = []
    try:
        head = subprocess.Popen(
            [*netns_exec, ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", str(gcs_port), "--num-cpus", "1", "--include-dashboard", "true",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
             "--temp-dir", temp_dir, "--disable-usage-stats"],
            env=env, stdout=open(logs / "head.log", "w"), stderr=subprocess.STDOUT,
        )
        procs.append(head)
        _wait_for(lambda: "Ray runtime started" in (logs / "head.log").read_text(), 180, "the head node", procs)
        worker = subprocess.Popen(
            [*netns_exec, ray, "start", "--block", "--address", f"127.0.0.1:{gcs_port}",
             "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--resources", '{"node2": 1}',
             "--dashboard-agent-listen-port", "52400", "--metrics-export-port", "52401",
             "--disable-usage-stats"],
            env=env, stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT,
        )
        procs.append(worker)
        _wait_for(lambda: "Ray runtime started" in (logs / "worker.log").read_text(), 180, "the second node", procs)

        work = pl.copy_workdir(clean_run.workdir, tmp_path / "work", drop_stages=("retrain",))
        cfg = {**clean_run.config, "workdir": str(work)}
        cfg["ray"] = {"scheduling": "SPREAD"}  # no local_num_cpus: the cluster's CPUs
        config = pl.write_config(tmp_path / "c.yaml", cfg)
        runtime_env = json.dumps({"env_vars": {"LEGODNN_CODE_VERSION": env["LEGODNN_CODE_VERSION"]}})
        job = subprocess.run(
            [*netns_exec, ray, "job", "submit", "--address", f"http://127.0.0.1:{dash_port}",
             "--runtime-env-json", runtime_env, "--", pl.LEGODNN, "run", "--config", str(config),
             "--no-publish", "--quiet"],
            env=env, capture_output=True, text=True, timeout=480, cwd=pl.REPO,
        )
        assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, job.stdout[-4000:] + job.stderr[-4000:]
        summary = json.loads((work / "last_run.json").read_text())
        assert len(summary["nodes"]) == 2
        second = [n["node_id"] for n in summary["nodes"] if "node2" in n["resources"]]
        assert len(second) == 1
        retrain_nodes = {u["node_id"] for u in summary["units"]["retrain"]}
        assert retrain_nodes == {n["node_id"] for n in summary["nodes"]}  # tasks ran on both nodes
        assert summary["counts"]["retrain"]["executed"] == len(summary["units"]["retrain"])
        assert all(n["address"] == "127.0.0.1" for n in summary["nodes"])
    finally:
        for proc in reversed(procs):
            pl.stop_tree(proc.pid)
            proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
