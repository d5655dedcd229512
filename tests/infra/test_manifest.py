from __future__ import annotations

import json

import pytest

from infra.errors import BundleVerificationError
from infra.manifest import SCHEMA_VERSION, Manifest

SHA = "ab" * 32


def _raw() -> dict:
    return {
        "schema_version": SCHEMA_VERSION, "model_id": "m", "model_ref": "resnet8", "version": 2,
        "created": "2025-01-01T00:00:00+00:00", "signer_key_id": "k", "input_shape": [1, 28, 28],
        "blocks": [{"name": "stem", "in_shape": [1, 28, 28], "out_shape": [4, 28, 28], "scalable": False,
                    "descendants": [{"choice": "0.0", "file": "blocks/stem/0.0.safetensors", "sha256": SHA,
                                     "bytes": 100, "header_bytes": 40, "header_sha256": SHA, "params": 3,
                                     "flops": 10, "memory_bytes": 50, "accuracy_drop": 0.0,
                                     "server_latency_ms": 0.1}]}],
        "table": {"file": "profile.json", "sha256": SHA, "bytes": 10},
    }


def test_roundtrip_is_canonical():
    m = Manifest.from_bytes(json.dumps(_raw()).encode())
    assert m.block_names == ["stem"] and m.block("stem").descendant("0.0").bytes == 100
    assert Manifest.from_bytes(m.to_bytes()) == m
    assert m.to_bytes() == Manifest.from_bytes(m.to_bytes()).to_bytes()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(schema_version=99), "schema_version: this reader understands schema"),
        (lambda r: r["blocks"][0]["descendants"][0].update(file="../../etc/passwd"),
         "blocks[0].descendants[0].file: expected 'blocks/stem/0.0.safetensors'"),
        (lambda r: r["blocks"][0]["descendants"][0].update(sha256="XYZ"), "descendants[0].sha256: not a lowercase"),
        (lambda r: r["blocks"][0]["descendants"][0].update(bytes=True), "descendants[0].bytes: expected an integer"),
        (lambda r: r["blocks"][0]["descendants"][0].update(header_bytes=500), "header_bytes: larger than the file"),
        (lambda r: r["blocks"][0].pop("in_shape"), "blocks[0].in_shape: missing"),
        (lambda r: r.update(blocks=[]), "blocks: empty"),
        (lambda r: r["table"].update(file="x.json"), "table.file: expected 'profile.json'"),
    ],
)
def test_malformed_fields_are_named(edit, message):
    raw = _raw()
    edit(raw)
    with pytest.raises(BundleVerificationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Manifest.from_bytes(json.dumps(raw).encode(), where="m.json")
