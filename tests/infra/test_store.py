from __future__ import annotations

import hashlib
import threading

import pytest

from infra.errors import BundleVerificationError, DownloadInterruptedError, ObjectNotFoundError, StoreError
from infra.store import FileStore, S3Store, open_store


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store(f"file://{tmp_path}/root")
    bucket = request.getfixturevalue("bucket")
    return open_store(f"s3://{bucket}/some/prefix")


def test_open_store_picks_backend(tmp_path, s3_env):
    assert isinstance(open_store(str(tmp_path)), FileStore)
    assert isinstance(open_store("s3://bkt/p"), S3Store)
    with pytest.raises(StoreError, match="unsupported store URI"):
        open_store("ftp://x/y")
    with pytest.raises(StoreError, match="names no bucket"):
        open_store("s3:///p")


def test_put_get_list_exists(store):
    store.put_bytes("a/b/one.bin", b"hello")
    store.put_bytes("a/two.bin", b"world!")
    assert store.get_bytes("a/b/one.bin") == b"hello"
    assert store.size("a/two.bin") == 6
    assert store.list("a/") == ["a/b/one.bin", "a/two.bin"]
    assert store.list("a/b") == ["a/b/one.bin"]
    assert store.exists("a/two.bin") and not store.exists("a/three.bin")
    assert store.read_prefix("a/two.bin", 3) == b"wor"
    with pytest.raises(ObjectNotFoundError):
        store.get_bytes("nope")
    with pytest.raises(StoreError, match="invalid object key"):
        store.put_bytes("../escape", b"x")
    child = store.child("a")
    assert child.get_bytes("two.bin") == b"world!"
    assert child.uri == store.uri + "/a"


def test_conditional_writes(store):
    assert store.create_exclusive("claim", b"first")
    assert not store.create_exclusive("claim", b"second")
    assert store.get_bytes("claim") == b"first"
    data, tag = store.get_with_tag("claim")
    assert data == b"first"
    assert store.replace_if_match("claim", b"third", tag)
    assert not store.replace_if_match("claim", b"fourth", tag), "a stale tag must not win"
    assert store.get_bytes("claim") == b"third"
    assert store.get_with_tag("missing") is None
    assert not store.replace_if_match("missing", b"x", tag)


def test_concurrent_create_exclusive_has_one_winner(store):
    wins = []

    def claim(i):
        if store.create_exclusive("race", str(i).encode()):
            wins.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert store.get_bytes("race") == str(wins[0]).encode()


def test_get_to_file_verifies_and_resumes(store, tmp_path):
    payload = bytes(range(256)) * 100
    digest = hashlib.sha256(payload).hexdigest()
    store.put_bytes("obj", payload)
    dest = tmp_path / "dl" / "obj"
    # a partial download from an earlier attempt is continued, not restarted
    dest.parent.mkdir()
    (dest.parent / "obj.part").write_bytes(payload[:1000])
    store.get_to_file("obj", dest, size=len(payload), sha256=digest)
    assert dest.read_bytes() == payload
    assert not (dest.parent / "obj.part").exists()
    # wrong hash: refused, nothing left behind
    bad = tmp_path / "dl" / "bad"
    with pytest.raises(BundleVerificationError, match="SHA-256 mismatch"):
        store.get_to_file("obj", bad, size=len(payload), sha256="0" * 64)
    assert not bad.exists() and not (tmp_path / "dl" / "bad.part").exists()
    with pytest.raises(BundleVerificationError, match="expected 10 bytes"):
        store.get_to_file("obj", bad, size=10)
    assert not bad.exists()
    # an object shorter than its manifest says is refused, not retried forever
    with pytest.raises(BundleVerificationError, match=f"expected {len(payload) + 5} bytes, the store sent {len(payload)}"):
        store.get_to_file("obj", bad, size=len(payload) + 5, attempts=5)
    (tmp_path / "dl" / "bad.part").write_bytes(payload)  # a partial file already as long as the object
    with pytest.raises(BundleVerificationError, match="expected"):
        store.get_to_file("obj", bad, size=len(payload) + 5, attempts=5)
    assert not bad.exists() and not (tmp_path / "dl" / "bad.part").exists()


def test_s3_dropped_connection_is_resumed(bucket, dropping_proxy, tmp_path):
    payload = b"x" * 300_000
    digest = hashlib.sha256(payload).hexdigest()
    open_store(f"s3://{bucket}").put_bytes("big", payload)
    via_proxy = open_store(f"s3://{bucket}", endpoint_url=dropping_proxy.endpoint)
    dest = tmp_path / "big"
    # one attempt only: the drop surfaces, and the partial file stays for the next run
    dropping_proxy.drop("/big", times=1, keep=0.5)
    with pytest.raises(DownloadInterruptedError, match="run again to resume"):
        via_proxy.get_to_file("big", dest, size=len(payload), sha256=digest, attempts=1)
    part = tmp_path / "big.part"
    kept = part.stat().st_size
    assert 0 < kept < len(payload) and not dest.exists()
    via_proxy.get_to_file("big", dest, size=len(payload), sha256=digest, attempts=1)
    assert dest.read_bytes() == payload
    assert dropping_proxy.gets("/big")[-1][2] == f"bytes={kept}-", "the retry must continue, not restart"
    # with retries, a drop inside one call is invisible to the caller
    dest2 = tmp_path / "big2"
    dropping_proxy.drop("/big", times=2, keep=0.3)
    via_proxy.get_to_file("big", dest2, size=len(payload), sha256=digest, attempts=3)
    assert dest2.read_bytes() == payload


def test_s3_missing_credentials_message(bucket, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreError, match="no AWS credentials") as e:
        open_store(f"s3://{bucket}").get_bytes("x")
    assert "testing" not in str(e.value)
