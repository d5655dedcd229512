"""The content-addressed cache: keys, atomic commits, sweeping, counting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.cache import DONE, Cache, UnitCounter, UnitRecord, code_version, unit_key


def test_key_depends_on_every_input() -> None:
    base = unit_key("retrain", "layer1.0", {"lr": 1e-3}, ["abc"], "code1")
    assert base == unit_key("retrain", "layer1.0", {"lr": 1e-3}, ["abc"], "code1")
    assert base != unit_key("retrain", "layer1.1", {"lr": 1e-3}, ["abc"], "code1")
    assert base != unit_key("retrain", "layer1.0", {"lr": 2e-3}, ["abc"], "code1")
    assert base != unit_key("retrain", "layer1.0", {"lr": 1e-3}, ["abd"], "code1")
    assert base != unit_key("retrain", "layer1.0", {"lr": 1e-3}, ["abc"], "code2")
    assert base != unit_key("descend", "layer1.0", {"lr": 1e-3}, ["abc"], "code1")
    # Key order inside a config section does not matter.
    assert unit_key("s", "u", {"a": 1, "b": 2}, [], "c") == unit_key("s", "u", {"b": 2, "a": 1}, [], "c")


def test_commit_is_atomic_and_records_output_hashes(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    assert cache.lookup("s", "k1") is None
    tmp = cache.begin("s", "k1")
    (tmp / "a.txt").write_text("hello")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "b.bin").write_bytes(b"\x00\x01")
    assert cache.lookup("s", "k1") is None  # not visible before commit
    record = cache.commit(tmp, UnitRecord("s", "u", "k1", {}, meta={"x": 1}))
    assert set(record.outputs) == {"a.txt", "sub/b.bin"}
    found = cache.lookup("s", "k1")
    assert found is not None and found.outputs == record.outputs and found.meta == {"x": 1}
    assert not tmp.exists()
    done = json.loads((cache.unit_dir("s", "k1") / DONE).read_text())
    assert done["outputs"]["a.txt"] == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"


def test_second_commit_of_same_key_keeps_the_first(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    first = cache.begin("s", "k")
    (first / "o").write_text("1")
    cache.commit(first, UnitRecord("s", "u", "k", {}))
    second = cache.begin("s", "k")
    (second / "o").write_text("1")
    kept = cache.commit(second, UnitRecord("s", "u", "k", {}, meta={"late": True}))
    assert kept.meta == {} and not second.exists()


def test_directory_without_done_marker_is_not_done_and_sweep_removes_temps(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    (tmp_path / "s" / "k").mkdir(parents=True)  # e.g. a hand-made or half-copied directory
    assert cache.lookup("s", "k") is None
    tmp = cache.begin("s", "k2")
    (tmp / "partial").write_text("half")
    assert cache.sweep() == 1
    assert not tmp.exists()


def test_abort_discards_temp(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    tmp = cache.begin("s", "k")
    cache.abort(tmp)
    assert not tmp.exists() and cache.lookup("s", "k") is None


def test_code_version_hashes_sources_and_can_be_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pipelines").mkdir()
    source = tmp_path / "pipelines" / "m.py"
    source.write_text("x = 1\n")
    before = code_version(tmp_path)
    source.write_text("x = 2\n")
    assert code_version(tmp_path) != before
    monkeypatch.setenv("LEGODNN_CODE_VERSION", "v1.2.3")
    assert code_version() == "pinned:v1.2.3"


def test_counter_counts_per_stage() -> None:
    counter = UnitCounter()
    counter.add("a", executed=True)
    counter.add("a", executed=False)
    counter.add("b", executed=False)
    assert (counter.executed, counter.skipped) == (1, 2)
    assert counter.to_dict() == {"a": {"executed": 1, "skipped": 1}, "b": {"executed": 0, "skipped": 1}}
