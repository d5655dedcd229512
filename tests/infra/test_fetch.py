"""The device fetch path against a real S3-compatible server (moto) with real tiny bundles,
on the torch runtime (`test_device_onnx.py` runs the ONNX Runtime side)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path

import boto3
import pytest
import torch

from infra.bundle import publish_bundle
from infra.device.runtime import DeviceLatencySettings
from infra.device.session import DeviceBudgets, fetch
from infra.errors import BundleVerificationError, DownloadInterruptedError, InfeasibleBudgetError
from infra.signing import sign
from legoblocks.compose import ScalableModel
from profiling.table import load as load_table

FAST = DeviceLatencySettings(warmup=1, repeats=3)
REPO = Path(__file__).resolve().parents[2]


def _memory_range(*table_paths: Path) -> tuple[int, int]:
    """Smallest and largest total peak memory over all selections of these models."""
    lo = hi = 0
    for path in table_paths:
        for b in load_table(path).blocks:
            mem = [c.peak_bytes for c in b.choices.values()]
            lo, hi = lo + min(mem), hi + max(mem)
    return lo, hi


def _snapshot(cache: Path) -> dict[str, str]:
    """Everything in the cache except scratch space, by content hash."""
    return {
        p.relative_to(cache).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(cache.rglob("*"))
        if p.is_file() and "staging" not in p.relative_to(cache).parts
    }


def _block_gets(proxy) -> list[str]:
    return [path for method, path, _ in proxy.requests if method == "GET" and "/blocks/" in path]


def _assert_same_outputs(result, model_id: str, scalable_dir: Path, images: torch.Tensor,
                         selection: list[str] | None = None) -> None:
    """The device's assembled model computes exactly what the server's composed model does."""
    server = ScalableModel.load(scalable_dir).compose(selection or result.solution.selection[model_id])
    with torch.inference_mode():
        assert torch.equal(result.switchers[model_id].model(images), server(images))


def test_s3_fetch_equals_server_compose_then_caches(built_models, keypair, bucket, dropping_proxy, tmp_path,
                                                    monkeypatch, val_ds):
    rn = built_models["resnet"]
    root = f"s3://{bucket}/bundles"
    publish_bundle(rn.scalable_dir, rn.table_path, root, keypair.private_key, "rn8")
    monkeypatch.setenv("AWS_ENDPOINT_URL", dropping_proxy.endpoint)  # see every request the device makes
    cache = tmp_path / "cache"
    lo, hi = _memory_range(rn.table_path)
    tight = DeviceBudgets(None, lo + 0.2 * (hi - lo))

    first = fetch([f"{root}/rn8"], tight, public_key=keypair.public_key, cache=cache, settings=FAST)
    sel = first.solution.selection["rn8"]
    assert any(c != "0.0" for c in sel), "the tight budget must force pruned blocks"
    assert first.models[0].memory_bytes <= tight.memory_bytes
    _assert_same_outputs(first, "rn8", rn.scalable_dir, val_ds.tensors[0][:32])
    names = first.session.bundles["rn8"].manifest.block_names
    chosen = {f"rn8/v1/blocks/{b}/{c}.safetensors" for b, c in zip(names, sel)}
    assert set(first.session.stats.downloaded) == chosen | {"rn8/v1/profile.json"}
    n_desc = len(first.session.bundles["rn8"].manifest.descendants())
    assert first.session.stats.measured == n_desc, "every descendant is timed on the device once"
    # Compositions were also timed end to end (from headers, nothing extra downloaded), and the
    # reported latency is the device's corrected composed-model figure, not the bare sum.
    device = first.session.bundles["rn8"].device
    cal = device.calibration
    assert cal is not None and cal.k >= 3 and all(m > 0 for _, m in cal.points)
    summed = sum(device.median_ms()[(b, c)] for b, c in zip(names, sel))
    assert first.models[0].latency_ms == pytest.approx(cal.scale * summed + cal.offset_ms)

    # same budget again: nothing downloaded (not even a header) and nothing timed
    before = len(_block_gets(dropping_proxy))
    second = fetch([f"{root}/rn8"], tight, public_key=keypair.public_key, cache=cache, settings=FAST)
    assert second.session.stats.downloaded == [] and second.session.stats.measured == 0
    assert len(_block_gets(dropping_proxy)) == before
    assert second.solution.selection == first.solution.selection
    assert second.session.bundles["rn8"].device.calibration == cal, "the device's fit is cached, not re-timed"

    # a looser budget downloads only the newly chosen blocks that are not cached yet
    before = len(_block_gets(dropping_proxy))
    loose = fetch([f"{root}/rn8"], DeviceBudgets(None, None), public_key=keypair.public_key, cache=cache,
                  settings=FAST)
    sel2 = loose.solution.selection["rn8"]
    wanted = {f"rn8/v1/blocks/{b}/{c}.safetensors" for b, c in zip(names, sel2)}
    assert set(loose.session.stats.downloaded) == wanted - chosen
    assert loose.session.stats.measured == 0
    assert len(_block_gets(dropping_proxy)) - before == len(wanted - chosen)
    _assert_same_outputs(loose, "rn8", rn.scalable_dir, val_ds.tensors[0][:32])


def _s3_key(root: str, rel: str) -> tuple[str, str]:
    bucket, _, prefix = root[len("s3://"):].partition("/")
    return bucket, f"{prefix}/{rel}"


def _tamper(kind: str, root: str, version: int, keypair, other_keypair) -> str:
    """Change one thing in a published version on the server; returns what the refusal must name."""
    s3 = boto3.client("s3")
    vkey = f"rn8/v{version}"

    def edit(rel: str, change):
        bucket, key = _s3_key(root, f"{vkey}/{rel}")
        data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        s3.put_object(Bucket=bucket, Key=key, Body=change(data))

    bucket, key = _s3_key(root, f"{vkey}/manifest.json")
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    first = manifest["blocks"][0]["descendants"][0]["file"]
    if kind == "descendant-weights":  # one byte in the weights, past the header
        edit(first, lambda d: d[:-1] + bytes([d[-1] ^ 1]))
        return f"{first}: SHA-256 mismatch"
    if kind == "descendant-header":  # one byte inside the JSON header
        edit(first, lambda d: d[:20] + bytes([d[20] ^ 1]) + d[21:])
        return f"{first}: header does not match the signed manifest"
    if kind == "manifest":
        edit("manifest.json", lambda d: d.replace(b'"model_ref": "', b'"model_ref": "x', 1))
        return "manifest.json: signature does not verify"
    if kind == "other-key":
        data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        sig_bucket, sig_key = _s3_key(root, f"{vkey}/manifest.sig")
        s3.put_object(Bucket=sig_bucket, Key=sig_key, Body=sign(data, other_keypair.private_key))
        return f"manifest.json: signature does not verify with public key {keypair.key_id}"
    if kind == "table":
        edit("profile.json", lambda d: d.replace(b"0", b"1", 1))
        return "profile.json: SHA-256 mismatch"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["descendant-weights", "descendant-header", "manifest", "other-key", "table"])
def test_tampered_bundle_is_refused_and_cache_unchanged(kind, built_models, keypair, other_keypair, bucket,
                                                         tmp_path):
    rn, rn_b = built_models["resnet"], built_models["resnet_b"]
    root = f"s3://{bucket}/bundles"
    publish_bundle(rn.scalable_dir, rn.table_path, root, keypair.private_key, "rn8")
    cache = tmp_path / "cache"
    good = fetch([f"{root}/rn8"], DeviceBudgets(None, None), public_key=keypair.public_key, cache=cache,
                 settings=FAST)
    assert good.models[0].version == 1
    before = _snapshot(cache)
    pb = publish_bundle(rn_b.scalable_dir, rn_b.table_path, root, keypair.private_key, "rn8")
    must_name = _tamper(kind, root, pb.version, keypair, other_keypair)
    with pytest.raises(BundleVerificationError) as refused:
        fetch([f"{root}/rn8"], DeviceBudgets(None, None), public_key=keypair.public_key, cache=cache, settings=FAST)
    assert must_name in str(refused.value)
    assert "Refusing it" in str(refused.value) or "refusing" in str(refused.value).lower()
    assert _snapshot(cache) == before, "a refused fetch must leave the cache as it was"


def test_dropped_download_fails_cleanly_then_resumes(built_models, keypair, bucket, dropping_proxy, tmp_path,
                                                     monkeypatch):
    rn = built_models["resnet"]
    root = f"s3://{bucket}/bundles"
    publish_bundle(rn.scalable_dir, rn.table_path, root, keypair.private_key, "rn8")
    monkeypatch.setenv("AWS_ENDPOINT_URL", dropping_proxy.endpoint)
    cache = tmp_path / "cache"
    dropping_proxy.drop("/blocks/", times=1, keep=0.5)
    with pytest.raises(DownloadInterruptedError, match=r"blocks/.*connection dropped.*run again to resume"):
        fetch([f"{root}/rn8"], DeviceBudgets(None, None), public_key=keypair.public_key, cache=cache,
              settings=FAST, attempts=1)
    assert not (cache / "objects").exists() and not (cache / "bundles").exists()
    parts = list((cache / "staging").glob("*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size > 0
    kept = parts[0].stat().st_size
    result = fetch([f"{root}/rn8"], DeviceBudgets(None, None), public_key=keypair.public_key, cache=cache,
                   settings=FAST, attempts=1)
    assert result.models[0].selection and not list((cache / "staging").glob("*.part"))
    assert ("GET", f"/{bucket}/bundles/rn8/v1/{_file_of(parts[0], result)}", f"bytes={kept}-") in \
        dropping_proxy.requests, "the retry continues the partial file with a Range request"


def _file_of(part: Path, result) -> str:
    sha = part.name.removesuffix(".part")
    for _, d in result.session.bundles["rn8"].manifest.descendants():
        if d.sha256 == sha:
            return d.file
    raise AssertionError("no descendant with that hash")


def test_two_bundles_solved_jointly(built_models, keypair, bucket, tmp_path, val_ds):
    rn, vg = built_models["resnet"], built_models["vgg"]
    root = f"s3://{bucket}/bundles"
    publish_bundle(rn.scalable_dir, rn.table_path, root, keypair.private_key, "rn8")
    publish_bundle(vg.scalable_dir, vg.table_path, root, keypair.private_key, "vgg11")
    lo, hi = _memory_range(rn.table_path, vg.table_path)
    budget = DeviceBudgets(None, lo + 0.4 * (hi - lo))
    result = fetch([f"{root}/rn8", f"{root}/vgg11"], budget, public_key=keypair.public_key,
                   cache=tmp_path / "cache", settings=FAST)
    assert set(result.switchers) == {"rn8", "vgg11"}
    total = sum(m.memory_bytes for m in result.models)
    assert total <= budget.memory_bytes < hi
    images = val_ds.tensors[0][:16]
    _assert_same_outputs(result, "rn8", rn.scalable_dir, images)
    _assert_same_outputs(result, "vgg11", vg.scalable_dir, images)
    # joint optimum: no pair of selections under the shared budget is served at more total
    # accuracy (a measured composition at its ranking value, any other at its corrected prediction)
    from profiling.serving import base_accuracy, rank_value

    tables = {"rn8": load_table(rn.table_path), "vgg11": load_table(vg.table_path)}

    def options(t):
        return itertools.product(*[list(b.choices) for b in t.blocks])

    def value(t, sel):
        m = t.measured_by_selection().get(tuple(sel))
        return rank_value(m) if m else base_accuracy(t) - (t.teacher_accuracy - t.predicted_accuracy(list(sel)))

    best = max(
        value(tables["rn8"], a) + value(tables["vgg11"], b)
        for a in options(tables["rn8"])
        for b in options(tables["vgg11"])
        if tables["rn8"].total(list(a), "peak_bytes") + tables["vgg11"].total(list(b), "peak_bytes")
        <= budget.memory_bytes
    )
    assert result.solution.objective == pytest.approx(best, abs=1e-9)
    with pytest.raises(InfeasibleBudgetError, match="smallest achievable"):
        fetch([f"{root}/rn8", f"{root}/vgg11"], DeviceBudgets(None, lo * 0.9), public_key=keypair.public_key,
              cache=tmp_path / "cache", settings=FAST)


def test_verify_latency_times_the_assembled_model_and_keeps_what_it_reports(built_models, keypair, bucket, tmp_path,
                                                                            val_ds):
    rn = built_models["resnet"]
    root = f"s3://{bucket}/bundles"
    publish_bundle(rn.scalable_dir, rn.table_path, root, keypair.private_key, "rn8")
    cache = tmp_path / "cache"
    full = fetch([f"{root}/rn8"], DeviceBudgets(None, None), public_key=keypair.public_key, cache=cache,
                 settings=FAST)
    shares = full.session.bundles["rn8"].device.choice_ms()
    names = full.session.bundles["rn8"].manifest.block_names
    lo = sum(min(v for (b, _), v in shares.items() if b == n) for n in names)
    budget = DeviceBudgets((lo + full.models[0].latency_ms) / 2, None)
    result = fetch([f"{root}/rn8"], budget, public_key=keypair.public_key, cache=cache, settings=FAST,
                   verify_latency_rounds=3)
    m = result.measured
    assert m is not None and 1 <= len(m.rounds) <= 3 and m.measured_ms > 0
    assert m.fits == (m.measured_ms <= budget.latency_ms)
    targets = [r.target_ms for r in m.rounds]
    assert targets[0] == budget.latency_ms and targets == sorted(targets, reverse=True)
    # what runs is what was chosen and reported
    assert result.switchers["rn8"].selection == m.solution.selection["rn8"]
    assert list(result.models[0].selection.values()) == m.solution.selection["rn8"]
    _assert_same_outputs(result, "rn8", rn.scalable_dir, val_ds.tensors[0][:16])
    report = result.to_dict()["verified_latency"]
    assert report["measured_ms"] == m.measured_ms and len(report["rounds"]) == len(m.rounds)
    assert full.to_dict()["verified_latency"] is None


def test_offline_uses_only_the_cache(built_models, keypair, bucket, tmp_path, monkeypatch):
    rn = built_models["resnet"]
    root = f"s3://{bucket}/bundles"
    publish_bundle(rn.scalable_dir, rn.table_path, root, keypair.private_key, "rn8")
    cache = tmp_path / "cache"
    lo, hi = _memory_range(rn.table_path)
    online = fetch([f"{root}/rn8"], DeviceBudgets(None, lo + 0.2 * (hi - lo)), public_key=keypair.public_key,
                   cache=cache, settings=FAST)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    offline = fetch([f"{root}/rn8"], DeviceBudgets(None, None), public_key=keypair.public_key, cache=cache,
                    settings=FAST, offline=True)
    assert offline.session.stats.downloaded == [] and offline.session.stats.measured == 0
    # unlimited budget, but only the cached descendants are candidates
    assert offline.solution.selection == online.solution.selection
    with pytest.raises(FileNotFoundError, match="run legodnn-fetch once online"):
        fetch([f"{root}/other"], DeviceBudgets(None, None), public_key=keypair.public_key, cache=cache,
              offline=True)


def test_cli_fetch_imports_no_ray_mlflow_optuna(built_models, keypair, bucket, tmp_path, s3_env, run_device_cli):
    """The torch device path in a fresh interpreter: JSON output, and none of the heavy server packages."""
    rn = built_models["resnet"]
    root = f"s3://{bucket}/bundles"
    publish_bundle(rn.scalable_dir, rn.table_path, root, keypair.private_key, "rn8")
    args = [f"{root}/rn8", "--public-key", str(keypair.public_key), "--cache", str(tmp_path / "cache"),
            "--memory-mb", "1", "--latency-ms", "1000", "--verify-latency", "2", "--json", "--repeats", "3",
            "--runtime", "torch"]
    rc, top, stdout, stderr = run_device_cli(args, {**os.environ, **s3_env}, REPO)
    assert rc == 0, stderr
    assert top and not {"ray", "mlflow", "optuna"} & set(top), top
    out = json.loads(stdout)
    assert out["models"][0]["model_id"] == "rn8" and out["total"]["memory_bytes"] <= 1 << 20
    assert len(out["downloaded"]) == len(out["models"][0]["selection"]) + 1
    assert out["verified_latency"]["fits"] and len(out["verified_latency"]["rounds"]) == 1  # 1 s is plenty


def test_cli_refusal_exit_code_and_message(built_models, keypair, other_keypair, tmp_path, capsys):
    from infra.device.cli import main

    rn = built_models["resnet"]
    publish_bundle(rn.scalable_dir, rn.table_path, str(tmp_path / "store"), keypair.private_key, "rn8")
    rc = main([str(tmp_path / "store" / "rn8"), "--public-key", str(other_keypair.public_key),
               "--cache", str(tmp_path / "cache")])
    assert rc == 3
    err = capsys.readouterr().err
    assert "REFUSED" in err and "manifest.json: signature does not verify" in err
    assert not (tmp_path / "cache" / "objects").exists()


def _fetched_for_watch(rn, keypair, bucket: str, tmp_path: Path, first_budgets: dict,
                       settings: DeviceLatencySettings = FAST):
    """rn8 published to S3 and fetched at unlimited budgets, with a budget file for watch()."""
    root = f"s3://{bucket}/bundles"
    publish_bundle(rn.scalable_dir, rn.table_path, root, keypair.private_key, "rn8")
    budget_file = tmp_path / "budgets.json"
    budget_file.write_text(json.dumps(first_budgets))
    result = fetch([f"{root}/rn8"], DeviceBudgets(None, None), public_key=keypair.public_key,
                   cache=tmp_path / "cache", settings=settings)
    return result, budget_file


def test_watch_reacts_to_budget_file_and_swaps_only_changed_blocks(built_models, keypair, bucket, tmp_path,
                                                                   val_ds):
    import io
    import threading

    from infra.device.watch import watch

    rn = built_models["resnet"]
    result, budget_file = _fetched_for_watch(rn, keypair, bucket, tmp_path, {"memory_mb": None})
    start_sel = list(result.switchers["rn8"].selection)
    names = result.session.bundles["rn8"].manifest.block_names
    lo, hi = _memory_range(rn.table_path)
    tight_mb = (lo + 0.05 * (hi - lo)) / (1 << 20)
    out = io.StringIO()

    def change_to(data: dict) -> None:
        # the watcher reads the file at start; write the change once it is polling
        threading.Timer(0.3, lambda: budget_file.write_text(json.dumps(data))).start()

    change_to({"memory_mb": tight_mb})
    assert watch(result, budget_file, out=out, poll_s=0.05, max_changes=1, max_seconds=120) == 1
    new_sel = list(result.switchers["rn8"].selection)
    assert new_sel != start_sel
    changed = [(b, o, n) for b, o, n in zip(names, start_sel, new_sel) if o != n]
    text = out.getvalue()
    for b, o, n in changed:
        assert f"switch rn8 {b}: {o} -> {n}" in text
    assert text.count("switch rn8") == len(changed), "only changed blocks are swapped"
    assert result.models[0].memory_bytes > tight_mb * (1 << 20) >= result.session.report(
        {"rn8": new_sel})[0].memory_bytes
    # newly chosen blocks were downloaded (and verified) on demand, nothing else
    assert result.session.stats.downloaded[-len(changed):] == [f"rn8/v1/blocks/{b}/{n}.safetensors"
                                                                for b, _, n in changed]
    _assert_same_outputs(result, "rn8", rn.scalable_dir, val_ds.tensors[0][:16], new_sel)

    # a malformed file is reported and the models keep running as they are
    out = io.StringIO()
    change_to({"memory_mb": "lots"})
    assert watch(result, budget_file, out=out, as_json=True, poll_s=0.05, max_changes=1, max_seconds=120) == 1
    assert json.loads(out.getvalue())["event"] == "error"
    assert list(result.switchers["rn8"].selection) == new_sel



def test_watch_with_verify_latency_times_each_change_and_runs_what_it_reports(built_models, keypair, bucket,
                                                                               tmp_path, val_ds):
    import io
    import threading

    from infra.device.watch import watch

    rn = built_models["resnet"]
    # Timed at batch 16 so that compute, not per-call overhead, sets each block's latency: at
    # batch 1 this width-4 model's pruned blocks can time no faster than the original's, and then
    # no budget lies between the fastest composition and the original.
    settings = DeviceLatencySettings(warmup=1, repeats=5, batch_size=16)
    result, budget_file = _fetched_for_watch(rn, keypair, bucket, tmp_path, {"latency_ms": None}, settings)
    start_sel = list(result.switchers["rn8"].selection)
    names = result.session.bundles["rn8"].manifest.block_names
    shares = result.session.bundles["rn8"].device.choice_ms()
    lo = sum(min(v for (b, _), v in shares.items() if b == n) for n in names)
    assert lo < result.models[0].latency_ms, f"no descendant timed faster than the original: {shares}"
    budget_ms = (lo + result.models[0].latency_ms) / 2
    threading.Timer(0.3, lambda: budget_file.write_text(json.dumps({"latency_ms": budget_ms}))).start()
    out = io.StringIO()
    assert watch(result, budget_file, out=out, as_json=True, poll_s=0.05, max_changes=1, max_seconds=120,
                 verify_latency_rounds=3) == 1
    event = json.loads(out.getvalue())
    verified = event["verified_latency"]
    assert event["event"] == "switch" and 1 <= len(verified["rounds"]) <= 3
    assert verified["fits"] == (verified["measured_ms"] <= budget_ms)
    targets = [r["target_ms"] for r in verified["rounds"]]
    assert targets[0] == budget_ms and targets == sorted(targets, reverse=True)
    # what runs is the answer, and the event's changes are the net ones from where it started
    running = list(result.switchers["rn8"].selection)
    chosen = min(verified["rounds"], key=lambda r: r["measured_ms"]) if not verified["fits"] else next(
        r for r in verified["rounds"] if r["measured_ms"] <= budget_ms)
    assert running == chosen["selection"]["rn8"] != start_sel
    assert [tuple(c) for c in event["changes"]["rn8"]] == [
        (b, o, n) for b, o, n in zip(names, start_sel, running) if o != n]
    assert event["bytes_loaded"] > 0
    _assert_same_outputs(result, "rn8", rn.scalable_dir, val_ds.tensors[0][:16], running)


def test_corrupted_cached_block_is_removed_and_refused(built_models, keypair, tmp_path):
    rn = built_models["resnet"]
    publish_bundle(rn.scalable_dir, rn.table_path, str(tmp_path / "store"), keypair.private_key, "rn8")
    cache = tmp_path / "cache"
    uri = str(tmp_path / "store" / "rn8")
    fetch([uri], DeviceBudgets(None, None), public_key=keypair.public_key, cache=cache, settings=FAST)
    victim = sorted((cache / "objects").iterdir())[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(BundleVerificationError, match="corrupted on this device and has been removed"):
        fetch([uri], DeviceBudgets(None, None), public_key=keypair.public_key, cache=cache, settings=FAST,
              offline=True)
    assert not victim.exists()
    again = fetch([uri], DeviceBudgets(None, None), public_key=keypair.public_key, cache=cache, settings=FAST)
    assert len(again.session.stats.downloaded) == 1 and victim.exists()
