"""Attacks on the device side: a cache that trusts nothing, rollbacks, and errors that are messages.

Each test changes real files the way the attack did (tampered timings, a rewritten `latest`,
corrupted objects, garbage in staging) and runs the real `legodnn-fetch` entry point.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.bundle import publish_bundle
from infra.device.cache import DeviceCache
from infra.device.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def published(built_models, keypair, tmp_path) -> str:
    """rn8 v1 in a directory store; returns the model URI."""
    rn = built_models["resnet"]
    publish_bundle(rn.scalable_dir, rn.table_path, str(tmp_path / "store"), keypair.private_key, "rn8")
    return str(tmp_path / "store" / "rn8")


def _cli(uri: str, keypair, cache: Path, *extra: str) -> int:
    return main([uri, "--public-key", str(keypair.public_key), "--cache", str(cache), "--repeats", "3",
                 "--runtime", "onnxruntime", *extra])


def _timings_file(cache: Path) -> Path:
    (path,) = cache.glob("bundles/*/v1/device-*.json")
    return path


def test_edited_timings_do_not_verify_and_are_measured_again(published, keypair, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert _cli(published, keypair, cache) == 0
    path = _timings_file(cache)
    doc = json.loads(path.read_text())
    for per in doc["sealed"]["latency"].values():
        for entry in per.values():
            for key in ("median_ms", "p10_ms", "p90_ms"):
                entry[key] *= 0.1  # the attack: every figure ten times too fast
    path.write_text(json.dumps(doc))
    capsys.readouterr()
    assert _cli(published, keypair, cache, "--json") == 0
    captured = capsys.readouterr()
    assert f"{path}: device timings do not verify (its HMAC does not verify" in captured.err
    out = json.loads(captured.out)
    n = sum(len(b["descendants"]) for b in json.loads(
        next(cache.glob("bundles/*/v1/manifest.json")).read_text())["blocks"])
    assert out["measured"] == n, "every descendant is timed again"
    DeviceCache(cache).unseal(path.read_bytes())  # and the rewritten file verifies


def test_out_of_range_timings_are_named_and_measured_again(published, keypair, tmp_path, capsys):
    """Even a file sealed with the device's own key is range-checked (medians of -1 broke every run)."""
    cache = tmp_path / "cache"
    assert _cli(published, keypair, cache) == 0
    path = _timings_file(cache)
    dc = DeviceCache(cache)
    body = dc.unseal(path.read_bytes())
    block = next(iter(body["latency"]))
    choice = next(iter(body["latency"][block]))
    body["latency"][block][choice]["median_ms"] = -1
    path.write_bytes(dc.seal(body))
    capsys.readouterr()
    assert _cli(published, keypair, cache) == 0
    err = capsys.readouterr().err
    assert f"{path}: device timings do not verify (latency.{block}.{choice}.median_ms: expected a number > 0.0" in err


def test_pick_timed_over_budget_exits_nonzero(published, keypair, tmp_path, capsys):
    """Sealed but wrong (stale) timings that make every block look 10x faster: --verify-latency
    times the real model, re-solves, and exits 1 when nothing it can time fits."""
    cache = tmp_path / "cache"
    assert _cli(published, keypair, cache) == 0
    path = _timings_file(cache)
    dc = DeviceCache(cache)
    body = dc.unseal(path.read_bytes())
    cal, n = body["calibration"], len(body["latency"])
    real_min = sum(min(cal["scale"] * e["median_ms"] + cal["offset_ms"] / n for e in per.values())
                   for per in body["latency"].values())
    for per in body["latency"].values():
        for entry in per.values():
            for key in ("median_ms", "p10_ms", "p90_ms"):
                entry[key] *= 0.1
    cal["offset_ms"] *= 0.1
    cal["points"] = [[a * 0.1, b * 0.1] for a, b in cal["points"]]
    path.write_bytes(dc.seal(body))
    budget = f"{real_min * 0.3:.6f}"  # fits on paper (10x too fast), never on this device
    assert _cli(published, keypair, cache, "--latency-ms", budget) == 0, "trusting the timings: accepted"
    capsys.readouterr()
    assert _cli(published, keypair, cache, "--latency-ms", budget, "--verify-latency", "2") == 1
    err = capsys.readouterr().err
    assert "OVER the" in err and "raise --latency-ms" in err and "Traceback" not in err


def test_rollback_is_refused_unless_allowed(built_models, keypair, tmp_path, capsys):
    rn, rn_b = built_models["resnet"], built_models["resnet_b"]
    store = tmp_path / "store"
    publish_bundle(rn.scalable_dir, rn.table_path, str(store), keypair.private_key, "rn8")
    publish_bundle(rn_b.scalable_dir, rn_b.table_path, str(store), keypair.private_key, "rn8")
    cache = tmp_path / "cache"
    assert _cli(str(store / "rn8"), keypair, cache) == 0
    assert "rn8 v2" in capsys.readouterr().out
    (store / "rn8" / "latest").write_text(json.dumps({"version": 1}))  # the attack: a store writer rolls back
    assert _cli(str(store / "rn8"), keypair, cache) == 3
    err = capsys.readouterr().err
    assert "REFUSED" in err and "offers v1 but this device already runs v2" in err and "--allow-downgrade" in err
    assert _cli(str(store / "rn8" / "v1"), keypair, cache) == 3, "a pinned older version is a downgrade too"
    capsys.readouterr()
    assert _cli(str(store / "rn8"), keypair, cache, "--allow-downgrade") == 0
    assert "rn8 v1" in capsys.readouterr().out
    assert DeviceCache(cache).current_version(next((cache / "bundles").iterdir())) == 1


def test_edited_current_version_is_not_trusted(published, keypair, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert _cli(published, keypair, cache) == 0
    (current,) = cache.glob("bundles/*/current.json")
    current.write_text(json.dumps({"sealed": {"version": 1}, "hmac": "0" * 64}))
    assert _cli(published, keypair, cache, "--offline") == 1
    assert "run legodnn-fetch once online" in capsys.readouterr().err
    assert _cli(published, keypair, cache) == 0, "online, the store's version is taken and current.json rewritten"
    assert DeviceCache(cache).current_version(current.parent) == 1


def test_corrupted_object_heals_online_and_is_refused_offline(published, keypair, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert _cli(published, keypair, cache) == 0
    victim = sorted((cache / "objects").glob("*.onnx.data"))[0]
    good = victim.read_bytes()
    victim.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    capsys.readouterr()
    assert _cli(published, keypair, cache, "--offline") == 3
    assert "corrupted on this device and has been removed" in capsys.readouterr().err
    assert not victim.exists()
    victim.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert _cli(published, keypair, cache, "--json") == 0, "online, one corrupted object is healed in the same run"
    out = json.loads(capsys.readouterr().out)
    assert len(out["healed"]) == 1 and out["healed"] == [f for f in out["downloaded"] if f.endswith(".onnx.data")]
    assert victim.read_bytes() == good


def test_garbage_in_staging_is_never_cached(published, keypair, tmp_path, capsys):
    """A right-sized garbage file in staging/ (and a garbage partial download) is hashed, not trusted."""
    cache = tmp_path / "cache"
    dc = DeviceCache(cache)
    from infra.manifest import Manifest

    manifest = Manifest.from_bytes((Path(published) / "v1" / "manifest.json").read_bytes())
    entries = [e for _, d in manifest.descendants() for e in (d.onnx.graph, d.onnx.data)]
    dc.staging.mkdir(parents=True)
    for e in entries:
        dc.staged_path(e).write_bytes(os.urandom(e.bytes))
    part = entries[0]  # a graph: every graph is fetched (to time its descendant)
    dc.staged_path(part).unlink()
    dc.staged_path(part).with_name(part.sha256 + ".part").write_bytes(os.urandom(part.bytes // 2))
    assert _cli(published, keypair, cache, "--json") == 0
    assert f"rn8/v1/{part.file}" in json.loads(capsys.readouterr().out)["downloaded"]
    objects = list((cache / "objects").iterdir())
    assert len(objects) > len(manifest.descendants())
    for obj in objects:
        assert hashlib.sha256(obj.read_bytes()).hexdigest() == obj.name.split(".")[0], f"{obj} is garbage"


def test_cache_that_is_a_file_is_a_message(published, keypair, tmp_path, capsys):
    not_a_dir = tmp_path / "cache-file"
    not_a_dir.write_text("x")
    assert _cli(published, keypair, not_a_dir) == 1
    assert f"--cache {not_a_dir} is a file, not a directory" in capsys.readouterr().err
    missing_key = tmp_path / "nope.pub"
    assert main([published, "--public-key", str(missing_key), "--cache", str(tmp_path / "c")]) == 1
    assert str(missing_key) in capsys.readouterr().err


def test_output_into_a_closed_pipe_is_no_traceback(published, keypair, tmp_path):
    """`legodnn-fetch ... | head -1`: the reader goes away; the command stops quietly."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run(
        [sys.executable, "-m", "infra.device.cli", published, "--public-key", str(keypair.public_key), "--cache",
         str(tmp_path / "cache"), "--runtime", "onnxruntime", "--repeats", "3"],
        stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=300)
    os.close(write_end)
    assert "Traceback" not in proc.stderr and proc.stderr == "", proc.stderr
    assert proc.returncode == 1
