from __future__ import annotations

import copy
import json

import pytest

from infra.errors import BundleVerificationError
from infra.manifest import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_PREPROCESSING,
    SCHEMA_VERSION,
    Manifest,
    Preprocessing,
    check_preprocessing,
)

SHA = "ab" * 32


def _raw() -> dict:
    return {
        "schema_version": SCHEMA_VERSION, "model_id": "m", "model_ref": "resnet8", "version": 2,
        "created": "2025-01-01T00:00:00+00:00", "signer_key_id": "k", "input_shape": [1, 28, 28],
        "blocks": [{"name": "stem", "in_shape": [1, 28, 28], "out_shape": [4, 28, 28], "scalable": False,
                    "descendants": [{"choice": "0.0", "file": "blocks/stem/0.0.safetensors", "sha256": SHA,
                                     "bytes": 100, "header_bytes": 40, "header_sha256": SHA, "params": 3,
                                     "flops": 10, "memory_bytes": 50, "accuracy_drop": 0.0,
                                     "server_latency_ms": 0.1,
                                     "onnx": {"graph": {"file": "blocks/stem/0.0.onnx", "sha256": SHA, "bytes": 9},
                                              "data": {"file": "blocks/stem/0.0.onnx.data", "sha256": SHA,
                                                       "bytes": 64}}}]}],
        "table": {"file": "profile.json", "sha256": SHA, "bytes": 10},
        "preprocessing": {"channels": 1, "size": [28, 28], "mean": [0.286], "std": [0.353], "color": "grayscale"},
        "classes": ["a", "b"], "onnx_opset": 17,
    }


def test_roundtrip_is_canonical():
    m = Manifest.from_bytes(json.dumps(_raw()).encode())
    assert m.block_names == ["stem"] and m.block("stem").descendant("0.0").bytes == 100
    assert m.block("stem").descendant("0.0").onnx.data.bytes == 64
    assert m.preprocessing == Preprocessing(1, (28, 28), (0.286,), (0.353,), "grayscale")
    assert m.classes == ("a", "b")
    assert Manifest.from_bytes(m.to_bytes()) == m
    assert m.to_bytes() == Manifest.from_bytes(m.to_bytes()).to_bytes()


def test_schema_1_is_still_read_without_onnx():
    raw = _raw()
    raw["schema_version"] = 1
    for key in ("preprocessing", "classes", "onnx_opset"):
        raw.pop(key)
    raw["blocks"][0]["descendants"][0].pop("onnx")
    m = Manifest.from_bytes(json.dumps(raw).encode())
    assert m.schema_version == 1 and m.preprocessing is None and m.blocks[0].descendants[0].onnx is None




@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(schema_version=99), "schema_version: this reader understands schemas"),
        (lambda r: r["blocks"][0]["descendants"][0].update(file="../../etc/passwd"),
         "blocks[0].descendants[0].file: expected 'blocks/stem/0.0.safetensors'"),
        (lambda r: r["blocks"][0]["descendants"][0].update(sha256="XYZ"), "descendants[0].sha256: expected a string"),
        (lambda r: r["blocks"][0]["descendants"][0].update(bytes=True), "descendants[0].bytes: expected an integer"),
        (lambda r: r["blocks"][0]["descendants"][0].update(header_bytes=500), "header_bytes: larger than the file"),
        (lambda r: r["blocks"][0].pop("in_shape"), "blocks[0]: missing required field 'in_shape'"),
        (lambda r: r.update(blocks=[]), "blocks: empty"),
        (lambda r: r["table"].update(file="x.json"), "table.file: expected 'profile.json'"),
        (lambda r: r["blocks"][0]["descendants"][0].pop("onnx"), "descendants[0].onnx: missing"),
        (lambda r: r["blocks"][0]["descendants"][0]["onnx"]["data"].update(file="/etc/passwd"),
         "onnx.data.file: expected 'blocks/stem/0.0.onnx.data'"),
        (lambda r: r["preprocessing"].update(mean=[0.1, 0.2]), "preprocessing.mean: needs one value per channel"),
        (lambda r: r["preprocessing"].update(size=[32, 32]), "preprocessing: channels and size give input"),
        (lambda r: r["preprocessing"].update(color="rgb"), "preprocessing.color: 'rgb' does not give 1 channel"),
        (lambda r: r["preprocessing"].update(std=[0.0]), "preprocessing.std[0]: expected a number > 0.0"),
        (lambda r: r.update(classes=["a", "a"]), "classes: class names must be unique"),
    ],
)
def test_malformed_fields_are_named(edit, message):
    raw = copy.deepcopy(_raw())
    edit(raw)
    with pytest.raises(BundleVerificationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Manifest.from_bytes(json.dumps(raw).encode(), where="m.json")


def test_fashion_mnist_defaults_match_the_embedded_data_source():
    from legoblocks.data import MEAN, STD

    assert FASHION_MNIST_PREPROCESSING.mean == (MEAN,) and FASHION_MNIST_PREPROCESSING.std == (STD,)
    assert check_preprocessing(FASHION_MNIST_PREPROCESSING, (1, 28, 28)) is FASHION_MNIST_PREPROCESSING
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[9] == "Ankle boot"
    with pytest.raises(ValueError, match="preprocessing: channels and size give input"):
        check_preprocessing(FASHION_MNIST_PREPROCESSING, (3, 32, 32))
