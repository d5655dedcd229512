"""The device on ONNX Runtime: the same bundles, blocks as sessions, against the torch compositions.

Real parts throughout: bundles published with their ONNX blocks to a moto S3 server or a
directory, fetched with `--runtime onnxruntime`, images written as real PNG files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from infra.bundle import publish_bundle
from infra.device.runtime import DeviceLatencySettings
from infra.device.session import DeviceBudgets, fetch
from infra.manifest import FASHION_MNIST_CLASSES, FASHION_MNIST_PREPROCESSING
from legoblocks.compose import ScalableModel
from profiling.table import load as load_table

FAST = DeviceLatencySettings(warmup=1, repeats=3)
REPO = Path(__file__).resolve().parents[2]
ATOL = 1e-4


def _publish(model, root: str, keypair, model_id: str = "rn8"):
    return publish_bundle(model.scalable_dir, model.table_path, root, keypair.private_key, model_id,
                          preprocessing=FASHION_MNIST_PREPROCESSING, classes=FASHION_MNIST_CLASSES)


def _torch_logits(scalable_dir: Path, selection: list[str], images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return ScalableModel.load(scalable_dir).compose(selection)(images).numpy()


def test_onnx_fetch_matches_torch_and_downloads_only_chosen_weights(built_models, keypair, bucket, tmp_path, val_ds):
    rn = built_models["resnet"]
    root = f"s3://{bucket}/bundles"
    _publish(rn, root, keypair)
    cache = tmp_path / "cache"
    lo = sum(min(c.peak_bytes for c in b.choices.values()) for b in load_table(rn.table_path).blocks)
    hi = sum(max(c.peak_bytes for c in b.choices.values()) for b in load_table(rn.table_path).blocks)
    tight = DeviceBudgets(None, lo + 0.2 * (hi - lo))
    first = fetch([f"{root}/rn8"], tight, public_key=keypair.public_key, cache=cache, runtime="onnxruntime",
                  settings=FAST)
    assert first.session.runtime.name == "onnxruntime"
    sel = first.solution.selection["rn8"]
    assert any(c != "0.0" for c in sel)
    images = val_ds.tensors[0][:16]
    got = first.session.predict("rn8", images.numpy())
    np.testing.assert_allclose(got, _torch_logits(rn.scalable_dir, sel, images), atol=ATOL, rtol=0)
    manifest = first.session.bundles["rn8"].manifest
    # every graph (a few KB, to time every descendant) but the weights of the chosen blocks only
    graphs = {f"rn8/v1/{d.onnx.graph.file}" for _, d in manifest.descendants()}
    weights = {f"rn8/v1/{b.descendant(c).onnx.data.file}" for b, c in zip(manifest.blocks, sel)}
    assert set(first.session.stats.downloaded) == graphs | weights | {"rn8/v1/profile.json"}
    assert first.session.stats.measured == len(manifest.descendants())
    device = first.session.bundles["rn8"].device
    sources = {e.measured_from for per in device.latency.values() for e in per.values()}
    assert sources == {"graph"}, "not-downloaded blocks are timed from their graphs with zero weights"
    assert device.calibration is not None and device.fingerprint["runtime"].startswith("onnxruntime")
    # same again: nothing downloaded, nothing timed, same answer
    second = fetch([f"{root}/rn8"], tight, public_key=keypair.public_key, cache=cache, runtime="onnxruntime",
                   settings=FAST)
    assert second.session.stats.downloaded == [] and second.session.stats.measured == 0
    assert second.solution.selection == first.solution.selection
    # the torch runtime on the same cache keeps its own timings (another fingerprint) and files
    torch_run = fetch([f"{root}/rn8"], tight, public_key=keypair.public_key, cache=cache, runtime="torch",
                      settings=FAST)
    assert torch_run.session.stats.measured == len(manifest.descendants())
    assert torch_run.session.stats.downloaded and all(f.endswith(".safetensors")
                                                      for f in torch_run.session.stats.downloaded)


def test_predict_png_and_export_give_the_torch_logits(built_models, keypair, tmp_path, val_ds, capsys,
                                                      write_pngs):
    from infra.device.cli import main

    rn = built_models["resnet"]
    store = tmp_path / "store"
    _publish(rn, str(store), keypair)
    paths, images = write_pngs(val_ds, tmp_path / "png", 3)
    common = ["--public-key", str(keypair.public_key), "--cache", str(tmp_path / "cache"), "--runtime",
              "onnxruntime", "--repeats", "3"]
    assert main(["predict", *map(str, paths), "--bundle", str(store / "rn8"), "--json", "--top", "2", *common]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["runtime"] == "onnxruntime"
    selection = list(out["models"][0]["selection"].values())
    expected = _torch_logits(rn.scalable_dir, selection, images)
    got = np.array([p["logits"] for p in out["predictions"]])
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    for p, row in zip(out["predictions"], expected):
        assert p["top"][0][0] == FASHION_MNIST_CLASSES[int(row.argmax())] and len(p["top"]) == 2
    # the text form names the classes too
    assert main(["predict", str(paths[0]), "--bundle", str(store / "rn8"), "--offline", *common]) == 0
    assert f"{paths[0]}  rn8: {FASHION_MNIST_CLASSES[int(expected[0].argmax())]}" in capsys.readouterr().out

    export = tmp_path / "export"
    assert main([str(store / "rn8"), "--export", str(export), "--offline", *common]) == 0
    assert "exported rn8" in capsys.readouterr().out
    import onnxruntime as ort

    session = ort.InferenceSession(str(export / "rn8.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": images.numpy()})[0], expected, atol=ATOL, rtol=0)
    meta = json.loads((export / "rn8.json").read_text())
    assert meta["classes"] == list(FASHION_MNIST_CLASSES) and meta["preprocessing"]["std"] == [0.353]
    assert meta["selection"] == [list(pair) for pair in out["models"][0]["selection"].items()]
    assert [c for _, c in meta["selection"]] == selection and meta["input"]["name"] == "input"


def test_onnx_watch_replaces_only_changed_sessions(built_models, keypair, tmp_path, val_ds):
    import io
    import threading

    from infra.device.watch import watch

    rn = built_models["resnet"]
    _publish(rn, str(tmp_path / "store"), keypair)
    budget_file = tmp_path / "budgets.json"
    budget_file.write_text("{}")
    result = fetch([str(tmp_path / "store" / "rn8")], DeviceBudgets(None, None), public_key=keypair.public_key,
                   cache=tmp_path / "cache", runtime="onnxruntime", settings=FAST)
    switcher = result.switchers["rn8"]
    before_sel, before_blocks = list(switcher.selection), list(switcher.model.blocks)
    table = load_table(rn.table_path)
    lo = sum(min(c.peak_bytes for c in b.choices.values()) for b in table.blocks)
    threading.Timer(0.3, lambda: budget_file.write_text(json.dumps({"memory_mb": lo * 1.01 / 2**20}))).start()
    out = io.StringIO()
    assert watch(result, budget_file, out=out, as_json=True, poll_s=0.05, max_changes=1, max_seconds=120) == 1
    event = json.loads(out.getvalue())
    changed = {b for b, _, _ in event["changes"]["rn8"]}
    assert changed and event["bytes_loaded"] > 0
    for name, old, new in zip(result.session.bundles["rn8"].manifest.block_names, before_blocks,
                              switcher.model.blocks):
        assert (old is new) == (name not in changed), f"{name}: only changed blocks get new sessions"
    images = val_ds.tensors[0][:8]
    np.testing.assert_allclose(result.session.predict("rn8", images.numpy()),
                               _torch_logits(rn.scalable_dir, list(switcher.selection), images), atol=ATOL, rtol=0)
    assert list(switcher.selection) != before_sel


def test_onnx_device_path_imports_no_torch(built_models, keypair, tmp_path, val_ds, s3_env, bucket, write_pngs,
                                           run_device_cli):
    """The ONNX device path in a fresh interpreter: fetch, predict, export, and none of torch,
    torch-pruning, safetensors, SciPy, Ray, MLflow or Optuna."""
    rn = built_models["resnet"]
    root = f"s3://{bucket}/bundles"
    _publish(rn, root, keypair)
    paths, _ = write_pngs(val_ds, tmp_path / "png", 1)
    args = ["predict", str(paths[0]), "--bundle", f"{root}/rn8", "--public-key", str(keypair.public_key),
            "--cache", str(tmp_path / "cache"), "--runtime", "onnxruntime", "--memory-mb", "1", "--latency-ms", "1000",
            "--verify-latency", "2", "--json", "--repeats", "3"]
    rc, top, stdout, stderr = run_device_cli(args, {**os.environ, **s3_env}, REPO)
    assert rc == 0, stderr
    heavy = {"torch", "torch_pruning", "safetensors", "scipy", "ray", "mlflow", "optuna"}
    assert top and not heavy & set(top), sorted(heavy & set(top))
    assert json.loads(stdout)["predictions"][0]["model_id"] == "rn8"


def test_schema_1_bundle_on_onnxruntime_says_to_republish(built_models, keypair, tmp_path, capsys):
    """A validly signed schema-1 bundle (no ONNX blocks) still runs on torch; ONNX says why not."""
    from infra.device.cli import main
    from infra.signing import sign

    rn = built_models["resnet"]
    _publish(rn, str(tmp_path / "store"), keypair)
    vdir = tmp_path / "store" / "rn8" / "v1"
    raw = json.loads((vdir / "manifest.json").read_bytes())
    raw["schema_version"] = 1
    for key in ("preprocessing", "classes", "onnx_opset"):
        raw.pop(key)
    for block in raw["blocks"]:
        for d in block["descendants"]:
            d.pop("onnx")
    data = json.dumps(raw).encode()
    (vdir / "manifest.json").write_bytes(data)
    (vdir / "manifest.sig").write_bytes(sign(data, keypair.private_key))
    common = [str(tmp_path / "store" / "rn8"), "--public-key", str(keypair.public_key), "--repeats", "3"]
    assert main([*common, "--cache", str(tmp_path / "c1"), "--runtime", "onnxruntime"]) == 1
    assert "schema 1 carries no ONNX blocks" in capsys.readouterr().err
    assert main([*common, "--cache", str(tmp_path / "c2"), "--runtime", "torch"]) == 0


def test_a_graph_naming_another_data_file_is_refused(built_models, keypair, tmp_path):
    """ONNX Runtime only ever reads the verified data bytes: a graph that points its weights at
    any other file (a path on the device) or past the data's end is refused before loading."""
    import onnx

    from infra.device.runtime_onnx import load_session
    from infra.errors import BundleVerificationError

    rn = built_models["resnet"]
    _publish(rn, str(tmp_path / "store"), keypair)
    vdir = tmp_path / "store" / "rn8" / "v1"
    graph = (vdir / "blocks" / "stem" / "0.0.onnx").read_bytes()
    data = (vdir / "blocks" / "stem" / "0.0.onnx.data").read_bytes()
    assert load_session(graph, data, "0.0.onnx.data", threads=1, where="stem/0.0") is not None
    for key, value, message in (("location", "/etc/passwd", "points at '/etc/passwd'"),
                                ("length", str(len(data) + 1), "only '0.0.onnx.data'")):
        model = onnx.load_model_from_string(graph)
        entry = next(e for e in model.graph.initializer[0].external_data if e.key == key)
        entry.value = value
        with pytest.raises(BundleVerificationError, match=message):
            load_session(model.SerializeToString(), data, "0.0.onnx.data", threads=1, where="stem/0.0")
    with pytest.raises(BundleVerificationError, match="not an ONNX graph"):
        load_session(b"\x00garbage", data, "0.0.onnx.data", threads=1, where="stem/0.0")


def test_export_pte_where_executorch_is_installed(built_models, keypair, tmp_path, val_ds):
    """With --runtime torch and ExecuTorch importable, --export also writes a .pte that the
    ExecuTorch runtime runs to the same logits (skipped where ExecuTorch is not installed:
    it is in no extra)."""
    pytest.importorskip("executorch.exir")
    from executorch.runtime import Runtime

    from infra.device.export import export_models

    rn = built_models["resnet"]
    _publish(rn, str(tmp_path / "store"), keypair)
    result = fetch([str(tmp_path / "store" / "rn8")], DeviceBudgets(None, None), public_key=keypair.public_key,
                   cache=tmp_path / "cache", runtime="torch", settings=FAST)
    (exported,) = export_models(result.session, tmp_path / "export")
    assert exported.pte is not None and json.loads(exported.metadata.read_text())["pte"] == "rn8.pte"
    images = val_ds.tensors[0][:1]
    method = Runtime.get().load_program(exported.pte.read_bytes()).load_method("forward")
    np.testing.assert_allclose(method.execute([images])[0].numpy(),
                               _torch_logits(rn.scalable_dir, result.solution.selection["rn8"], images),
                               atol=ATOL, rtol=0)
