from __future__ import annotations

import hashlib
import json
import math
import threading

import pytest

from infra.bundle import list_bundles, publish_bundle, read_verified_manifest, resolve_bundle
from infra.errors import BundleVerificationError, ObjectNotFoundError
from infra.manifest import Manifest, Preprocessing
from infra.store import open_store
from legoblocks.files import sha256_file


def _file_shas(scalable_dir):
    return {
        f"blocks/{p.parent.name}/{p.name}": sha256_file(p) for p in scalable_dir.glob("*/*.safetensors")
    }


def test_publish_layout_manifest_and_signature(built_models, keypair, tmp_path):
    rn = built_models["resnet"]
    pb = publish_bundle(rn.scalable_dir, rn.table_path, f"file://{tmp_path}/store", keypair.private_key, "rn8")
    assert pb.version == 1 and pb.uri == f"file://{tmp_path}/store/rn8/v1"
    vdir = tmp_path / "store" / "rn8" / "v1"
    manifest = Manifest.from_bytes((vdir / "manifest.json").read_bytes())
    assert manifest.to_dict() == pb.manifest
    scalable = json.loads((rn.scalable_dir / "scalable.json").read_text())
    assert manifest.block_names == [b["name"] for b in scalable["blocks"]]
    # every descendant file is there, byte for byte, with the manifest's hash and size
    assert {d.file: d.sha256 for _, d in manifest.descendants()} == _file_shas(rn.scalable_dir)
    for _, d in manifest.descendants():
        assert (vdir / d.file).stat().st_size == d.bytes
    assert manifest.table.sha256 == hashlib.sha256(rn.table_path.read_bytes()).hexdigest()
    assert manifest.signer_key_id == keypair.key_id
    # every descendant also as ONNX: a small graph whose float weights are all in its data file
    import onnx

    for _, d in manifest.descendants():
        for entry in (d.onnx.graph, d.onnx.data):
            assert sha256_file(vdir / entry.file) == entry.sha256 and (vdir / entry.file).stat().st_size == entry.bytes
        graph = onnx.load_model_from_string((vdir / d.onnx.graph.file).read_bytes())
        floats = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
        assert floats and all(t.data_location == onnx.TensorProto.EXTERNAL for t in floats)
        assert d.onnx.data.bytes >= sum(4 * math.prod(t.dims) for t in floats)
    assert manifest.onnx_opset == 17 and manifest.preprocessing is None and manifest.classes is None
    assert json.loads((tmp_path / "store" / "rn8" / "latest").read_text()) == {"version": 1}
    # per-descendant figures come from the real ProfileTable
    from profiling.table import load

    table = load(rn.table_path)
    for b, d in manifest.descendants():
        p = table.block(b.name).choices[d.choice]
        assert (d.params, d.flops, d.memory_bytes) == (p.params, p.flops, p.peak_bytes)
        assert d.server_latency_ms == p.latency.median_ms and d.accuracy_drop == p.accuracy_drop
    resolved = resolve_bundle(f"file://{tmp_path}/store/rn8")
    assert (resolved.model_id, resolved.version) == ("rn8", 1)
    assert read_verified_manifest(resolved, keypair.public_key)[0] == manifest


def test_publish_refuses_bad_input_before_claiming(built_models, keypair, tmp_path):
    rn, vg = built_models["resnet"], built_models["vgg"]
    store = f"file://{tmp_path}/store"
    with pytest.raises(ValueError, match="model id"):
        publish_bundle(rn.scalable_dir, rn.table_path, store, keypair.private_key, "v3")
    with pytest.raises(ValueError, match="publish the table that was made from this ScalableModel"):
        publish_bundle(rn.scalable_dir, vg.table_path, store, keypair.private_key, "rn8")
    with pytest.raises(FileNotFoundError, match="ScalableModel.save"):
        publish_bundle(tmp_path, rn.table_path, store, keypair.private_key, "rn8")
    rgb = Preprocessing(3, (28, 28), (0.5,) * 3, (0.5,) * 3, "rgb")
    with pytest.raises(ValueError, match=r"preprocessing: channels and size give input \[3, 28, 28\]"):
        publish_bundle(rn.scalable_dir, rn.table_path, store, keypair.private_key, "rn8", preprocessing=rgb)
    with pytest.raises(ValueError, match="classes: 2 names given, the model has 10 outputs"):
        publish_bundle(rn.scalable_dir, rn.table_path, store, keypair.private_key, "rn8", classes=["a", "b"])
    assert open_store(store).list("") == [], "refused input must not claim a version"


def test_versions_listing_and_unsigned_versions_are_invisible(built_models, keypair, tmp_path):
    rn, vg = built_models["resnet"], built_models["vgg"]
    root = f"file://{tmp_path}/store"
    publish_bundle(rn.scalable_dir, rn.table_path, root, keypair.private_key, "rn8")
    publish_bundle(rn.scalable_dir, rn.table_path, root, keypair.private_key, "rn8")
    publish_bundle(vg.scalable_dir, vg.table_path, root, keypair.private_key, "vgg")
    # a publisher that died after claiming v3: files but no signature
    store = open_store(root)
    assert store.create_exclusive("rn8/v3/CLAIM", b"{}")
    store.put_bytes("rn8/v3/manifest.json", b"{}")
    refs = list_bundles(root)
    assert [(r.model_id, r.version, r.latest) for r in refs] == [("rn8", 1, False), ("rn8", 2, True), ("vgg", 1, True)]
    assert [r.version for r in list_bundles(f"{root}/rn8")] == [1, 2]
    assert [(r.model_id, r.version) for r in list_bundles(f"{root}/rn8/v2")] == [("rn8", 2)]
    # the next publisher skips the abandoned claim
    assert publish_bundle(rn.scalable_dir, rn.table_path, root, keypair.private_key, "rn8").version == 4
    # without a latest pointer, readers take the highest signed version
    (tmp_path / "store" / "rn8" / "latest").unlink()
    assert resolve_bundle(f"{root}/rn8").version == 4
    with pytest.raises(ObjectNotFoundError, match="no published bundle"):
        resolve_bundle(f"{root}/nothing")
    with pytest.raises(BundleVerificationError, match="unsigned or still being published"):
        read_verified_manifest(resolve_bundle(f"{root}/rn8/v3"), keypair.public_key)


def test_replayed_bundle_under_another_version_is_refused(built_models, keypair, tmp_path):
    rn = built_models["resnet"]
    root = tmp_path / "store"
    publish_bundle(rn.scalable_dir, rn.table_path, str(root), keypair.private_key, "rn8")
    import shutil

    shutil.copytree(root / "rn8" / "v1", root / "rn8" / "v7")
    with pytest.raises(BundleVerificationError, match="moved to another name or version"):
        read_verified_manifest(resolve_bundle(f"{root}/rn8/v7"), keypair.public_key)


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_concurrent_publishes_never_mix(backend, built_models, keypair, tmp_path, request):
    """Four publishers of one model at once (two different builds): all complete, distinct
    versions, each version's files all from one build, `latest` on the highest complete one."""
    if backend == "s3":
        root = f"s3://{request.getfixturevalue('bucket')}/bundles"
    else:
        root = f"file://{tmp_path}/store"
    sources = [built_models["resnet"], built_models["resnet_b"]] * 2
    results, errors = [], []
    barrier = threading.Barrier(len(sources))

    def publish(src):
        try:
            barrier.wait()
            results.append((src, publish_bundle(src.scalable_dir, src.table_path, root, keypair.private_key, "rn8")))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(pb.version for _, pb in results) == [1, 2, 3, 4]
    store = open_store(root)
    for src, pb in results:
        resolved = resolve_bundle(pb.uri)
        manifest = read_verified_manifest(resolved, keypair.public_key)[0]
        # the manifest describes this publisher's build, and the stored files are exactly it
        assert {d.file: d.sha256 for _, d in manifest.descendants()} == _file_shas(src.scalable_dir)
        for _, d in manifest.descendants():
            data = store.get_bytes(f"rn8/v{pb.version}/{d.file}")
            assert hashlib.sha256(data).hexdigest() == d.sha256
    latest = resolve_bundle(f"{root}/rn8")
    assert latest.version == 4
    read_verified_manifest(latest, keypair.public_key)  # complete and signed
