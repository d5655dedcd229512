from __future__ import annotations

import stat

import pytest

from infra.errors import BundleVerificationError
from infra.signing import generate_keypair, key_id, load_public_key, sign, verify


def test_keypair_files_and_modes(tmp_path):
    kp = generate_keypair(tmp_path / "keys")
    assert stat.S_IMODE(kp.private_key.stat().st_mode) == 0o600
    assert kp.private_key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert kp.public_key.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert kp.key_id == key_id(load_public_key(kp.public_key))


def test_refuses_to_overwrite_keys(tmp_path):
    generate_keypair(tmp_path)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate_keypair(tmp_path)


def test_sign_verify_roundtrip_and_refusals(keypair, other_keypair):
    data = b'{"model_id": "m"}'
    sig = sign(data, keypair.private_key)
    assert len(sig) == 64
    verify(data, sig, keypair.public_key)
    with pytest.raises(BundleVerificationError, match="does not verify"):
        verify(data + b" ", sig, keypair.public_key)
    with pytest.raises(BundleVerificationError, match=keypair.key_id):
        verify(data, sign(data, other_keypair.private_key), keypair.public_key, what="x")


def test_clear_errors_for_bad_key_files(tmp_path, keypair):
    with pytest.raises(FileNotFoundError, match="legodnn keys init"):
        sign(b"x", tmp_path / "missing.key")
    with pytest.raises(ValueError, match="not a PEM public key"):
        load_public_key(keypair.private_key)
