"""Content-addressed unit outputs: the pipeline's resume mechanism.

Every unit of work writes into `<workdir>/cache/<stage>/<key>/`, where `key` hashes the
stage name, the config the unit reads, the hashes of its upstream outputs and the code
version. A unit directory appears only complete: it is filled under a temporary name and
moved into place with one `os.replace` after its `done.json` (the output hashes) is
written. So a rerun, a restarted driver or another worker can trust any directory it sees,
and a crash leaves at most a `.tmp-*` directory that nobody reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legoblocks.files import canonical_json, sha256_file, write_json_atomic

DONE = "done.json"
_PACKAGES = ("legoblocks", "profiling", "optimizer", "pipelines", "infra")
_TMP_PREFIX = ".tmp-"
# Pins the code version (e.g. to a release tag or git commit) instead of hashing sources.
CODE_VERSION_ENV = "LEGODNN_CODE_VERSION"


def code_version(root: str | Path | None = None) -> str:
    """SHA-256 over the project's Python sources (path + bytes), so a code change re-runs.

    Hashed per source tree, not per git commit: uncommitted edits count, and a cluster node
    with a different checkout computes different keys instead of reusing stale outputs.
    LEGODNN_CODE_VERSION, when set, is used instead (a deployment pins its release; tests
    pin it so edits elsewhere in a shared tree do not invalidate a run mid-test).
    """
    pinned = os.environ.get(CODE_VERSION_ENV)
    if pinned and root is None:
        return f"pinned:{pinned}"
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()


def unit_key(stage: str, unit: str, config: Any, upstream: Any, code: str) -> str:
    """The content address of one unit: everything its output depends on, hashed."""
    payload = canonical_json(
        {"stage": stage, "unit": unit, "config": config, "upstream": upstream, "code": code}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@dataclass
class UnitRecord:
    """The `done.json` of a finished unit: what it produced and where it ran."""

    stage: str
    unit: str
    key: str
    outputs: dict[str, str]  # relative file path -> SHA-256
    meta: dict[str, Any] = field(default_factory=dict)
    node_id: str | None = None
    task_id: str | None = None
    seconds: float = 0.0
    finished_at: float = 0.0
    keyed: dict[str, Any] = field(default_factory=dict)  # the job and item the key hashed (provenance)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "unit": self.unit, "key": self.key, "outputs": self.outputs,
            "meta": self.meta, "node_id": self.node_id, "task_id": self.task_id,
            "seconds": self.seconds, "finished_at": self.finished_at, "keyed": self.keyed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UnitRecord":
        return cls(**data)

    def digest(self) -> str:
        """One hash over all output hashes: what downstream keys depend on."""
        return hashlib.sha256(canonical_json(self.outputs).encode()).hexdigest()


class Cache:
    """The cache directory of one workdir. Stateless apart from the path: safe in any process."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def unit_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str) -> UnitRecord | None:
        """The record of a finished unit, or None. A directory without done.json is not done."""
        done = self.unit_dir(stage, key) / DONE
        if not done.is_file():
            return None
        return UnitRecord.from_dict(json.loads(done.read_text(encoding="utf-8")))

    def begin(self, stage: str, key: str) -> Path:
        """A fresh temporary directory to fill; commit() publishes it."""
        stage_dir = self.root / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = stage_dir / f"{_TMP_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return tmp

    def commit(self, tmp: Path, record: UnitRecord) -> UnitRecord:
        """Hash the outputs, write done.json, and move the directory into place atomically.

        If another attempt already committed the same key (a retried task whose first
        attempt finished after all), the existing directory wins and `tmp` is discarded:
        both have the same content address, so either is correct.
        """
        outputs = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            outputs[path.relative_to(tmp).as_posix()] = sha256_file(path)
        record.outputs = outputs
        record.finished_at = time.time()
        write_json_atomic(tmp / DONE, record.to_dict())
        final = self.unit_dir(record.stage, record.key)
        try:
            os.replace(tmp, final)
        except OSError:
            # os.replace refuses a non-empty target directory: someone committed first.
            shutil.rmtree(tmp, ignore_errors=True)
            existing = self.lookup(record.stage, record.key)
            if existing is None:
                raise
            return existing
        return record

    def abort(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def sweep(self, older_than_s: float = 0.0) -> int:
        """Remove leftover temporary directories of crashed attempts; returns how many.

        Only the driver calls this, before it submits work, so no live attempt is touched.
        """
        removed = 0
        if not self.root.is_dir():
            return 0
        now = time.time()
        for stage_dir in self.root.iterdir():
            if not stage_dir.is_dir():
                continue
            for tmp in stage_dir.glob(f"{_TMP_PREFIX}*"):
                if now - tmp.stat().st_mtime >= older_than_s:
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed += 1
        return removed


@dataclass
class StageCount:
    executed: int = 0
    skipped: int = 0

    @property
    def total(self) -> int:
        return self.executed + self.skipped


@dataclass
class UnitCounter:
    """Executed vs skipped units per stage, for the summary and the resume tests."""

    stages: dict[str, StageCount] = field(default_factory=dict)

    def add(self, stage: str, executed: bool) -> None:
        count = self.stages.setdefault(stage, StageCount())
        if executed:
            count.executed += 1
        else:
            count.skipped += 1

    @property
    def executed(self) -> int:
        return sum(c.executed for c in self.stages.values())

    @property
    def skipped(self) -> int:
        return sum(c.skipped for c in self.stages.values())

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {s: {"executed": c.executed, "skipped": c.skipped} for s, c in self.stages.items()}
