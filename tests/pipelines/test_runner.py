"""The Ray runner on its own: address checks, cache skipping and failures that name the unit."""

from __future__ import annotations

import socket

import pytest

from pipelines import stages
from pipelines.cache import Cache, UnitRecord
from pipelines.runner import PipelineError, RayRunner, RayUnreachableError, Unit, check_ray_address


def test_ray_address_is_checked_before_ray_init() -> None:
    with pytest.raises(RayUnreachableError, match="not host:port"):
        check_ray_address("nonsense")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RayUnreachableError, match=rf"127.0.0.1:{port} is unreachable.*unset both"):
        check_ray_address(f"127.0.0.1:{port}")
    check_ray_address("auto")  # resolved by Ray itself


def test_cached_units_skip_ray_and_a_failing_unit_is_named(tmp_path) -> None:
    import ray

    cache = Cache(tmp_path / "cache")
    runner = RayRunner(cache, "code", local_num_cpus=1, max_retries=0)
    detect_dir = tmp_path / "no-detect-output"
    bad = Unit("layer9.9", stages.descend_stage,
               {"detect_dir": str(detect_dir), "block": "layer9.9", "ladder": [0.0], "importance": "magnitude"},
               config={"block": "layer9.9"})
    # A unit whose output is already committed never reaches Ray.
    tmp = cache.begin("descend", runner.key("descend", bad))
    (tmp / "0.0.safetensors").write_bytes(b"x")
    cache.commit(tmp, UnitRecord("descend", "layer9.9", runner.key("descend", bad), {}))
    result = runner.run_stage("descend", [bad])
    assert result.executed == [] and not ray.is_initialized()
    assert runner.counter.to_dict() == {"descend": {"executed": 0, "skipped": 1}}

    other = Unit("layer8.8", stages.descend_stage, {**bad.kwargs, "block": "layer8.8"}, config={"block": "layer8.8"})
    try:
        with pytest.raises(PipelineError) as info:
            runner.run_stage("descend", [other])
        message = str(info.value)
        assert "stage 'descend', unit 'layer8.8' failed" in message and "FileNotFoundError" in message
        assert not list((tmp_path / "cache" / "descend").glob(".tmp-*"))  # the failed attempt left nothing
    finally:
        runner.shutdown()
    assert not ray.is_initialized()
