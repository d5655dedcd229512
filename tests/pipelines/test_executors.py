"""The unit protocol and its executors: address checks, cache skipping, failures that name the
unit, and the same recipe through Ray and in-process giving the same artifacts."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from pipelines.cache import Cache, UnitCounter, UnitRecord
from pipelines.executors import LocalExecutor, RayExecutor, RayUnreachableError, check_ray_address
from pipelines.recipe import stage
from pipelines.recipe.jobs import DescendJob
from pipelines.stage import Inputs, Item, UnitRef
from pipelines.units import PipelineError, UnitRunner

# Stages whose outputs depend only on the config, the data and the code: bit-identical
# whichever executor ran them. Cost, table, points and publish also hold timings.
DETERMINISTIC = ("teacher", "detect", "descend", "blockio", "retrain", "assemble", "joint", "accuracy")


def test_ray_address_is_checked_before_ray_init() -> None:
    with pytest.raises(RayUnreachableError, match="not host:port"):
        check_ray_address("nonsense")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RayUnreachableError, match=rf"127.0.0.1:{port} is unreachable.*unset both"):
        check_ray_address(f"127.0.0.1:{port}")
    check_ray_address("auto")  # resolved by Ray itself


@pytest.mark.parametrize("executor", [LocalExecutor, lambda: RayExecutor(local_num_cpus=1, max_retries=0)])
def test_cached_units_never_run_and_a_failing_unit_is_named(tmp_path: Path, executor) -> None:
    import ray

    cache = Cache(tmp_path / "cache")
    runner = UnitRunner(cache, "code", executor())
    descend = stage("descend")
    job = DescendJob([0.0], "magnitude")
    missing = Inputs({"detect": [UnitRef("detect", tmp_path / "no-detect-output", {})]})
    item = Item("layer9.9")
    # A unit whose output is already committed never reaches the executor.
    key = runner.key(descend, item, job, [])
    tmp = cache.begin("descend", key)
    (tmp / "0.0.safetensors").write_bytes(b"x")
    cache.commit(tmp, UnitRecord("descend", "layer9.9", key, {}))
    counter = UnitCounter()
    (record,) = runner.run_stage(descend, job, missing, [], [item], counter)
    assert record.key == key and not ray.is_initialized()
    assert counter.to_dict() == {"descend": {"executed": 0, "skipped": 1}}
    try:
        with pytest.raises(PipelineError) as info:
            runner.run_stage(descend, job, missing, [], [Item("layer8.8")], counter)
        message = str(info.value)
        assert "stage 'descend', unit 'layer8.8' failed" in message and "FileNotFoundError" in message
        assert not list((tmp_path / "cache" / "descend").glob(".tmp-*"))  # the failed attempt left nothing
    finally:
        runner.executor.close()
    assert not ray.is_initialized()


def test_local_executor_reproduces_the_ray_runs_artifacts(clean_run, pipeline_env, monkeypatch, tmp_path) -> None:
    """The clean run ran every unit on Ray (its joint stage under Ray Train, killed once and
    resumed); the same config in this process must give the same bits and the same keys."""
    from pipelines.config import from_dict
    from pipelines.recipe import STAGES
    from pipelines.run import run_recipe

    monkeypatch.setenv("LEGODNN_CODE_VERSION", pipeline_env["LEGODNN_CODE_VERSION"])
    cfg = from_dict({**clean_run.config, "workdir": str(tmp_path / "work"), "publish": {"enabled": False}})
    local = run_recipe(cfg, executor=LocalExecutor(), stages=[s for s in STAGES if s.name != "publish"])
    ray_units = {(u["unit"], stage): u for stage, units in clean_run.summary["units"].items() for u in units}
    for name in DETERMINISTIC:
        for record in local.records[name]:
            theirs = ray_units[(record.unit, name)]
            assert record.key == theirs["key"], (name, record.unit)
            assert record.outputs == theirs["outputs"], (name, record.unit)
            assert record.task_id == "local"
    # Timing-dependent stages: same structure, same FLOPs and drops, different clocks.
    ours = json.loads((local.table_path).read_text())
    theirs = json.loads(Path(clean_run.summary["table_path"]).read_text())
    for a, b in zip(ours["blocks"], theirs["blocks"]):
        assert {c: (v["flops"], v["accuracy_drop_raw"]) for c, v in a["choices"].items()} == \
               {c: (v["flops"], v["accuracy_drop_raw"]) for c, v in b["choices"].items()}
