"""Verified bundle files for one fetch: from the device cache, else from the store.

`ObjectSource` is what a runtime reads descendant files through (`runtime.BlockFiles`).
Every byte it hands out matches the signed manifest at the moment it is handed out:
cached objects are re-hashed on every use; one that no longer matches is removed and, when
the store is reachable, downloaded again in the same run (an offline run refuses it); a file
left in staging by an earlier run is hashed before it is used, never trusted by its size.
Downloads land in staging and are listed in `pending` for the session to commit once the
whole fetch verified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from infra.device.cache import DeviceCache
from infra.errors import BundleVerificationError
from infra.manifest import DescendantEntry, FileEntry
from infra.skeleton import fetch_header
from infra.store import Store
from legoblocks.files import sha256_bytes, sha256_file


@dataclass
class FetchStats:
    """What a device run cost and found: files downloaded, headers read, descendants timed,
    corrupted cache entries healed, and warnings (cache files that did not verify)."""

    downloaded: list[str] = field(default_factory=list)
    downloaded_bytes: int = 0
    headers_read: int = 0
    measured: int = 0
    healed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class ObjectSource:
    """One bundle version's files (see module docstring).

    store: the version's store, or None offline; what: "<model_id>/v<N>", prefixed to the
    names in `stats.downloaded`; pending: the session's list of staged files to commit.
    """

    cache: DeviceCache
    store: Store | None
    stats: FetchStats
    pending: list[FileEntry]
    what: str
    attempts: int = 3
    progress: bool = False
    _headers: dict[str, bytes] = field(default_factory=dict)  # verified headers read this run, by descendant SHA-256

    def cached(self, entry: FileEntry) -> bool:
        return self.cache.has_object(entry)

    def read(self, entry: FileEntry) -> bytes:
        path = self.cache.object_path(entry)
        if path.is_file():
            data = path.read_bytes()
            if sha256_bytes(data) == entry.sha256:
                return data
            self._corrupted(entry, path)
        data = self._staged(entry).read_bytes()
        if sha256_bytes(data) != entry.sha256:  # changed between the download's check and this read
            raise BundleVerificationError(f"{self.what}/{entry.file}: staged file changed after it verified; run again")
        return data

    def path(self, entry: FileEntry) -> Path:
        path = self.cache.object_path(entry)
        if path.is_file():
            if sha256_file(path) == entry.sha256:
                return path
            self._corrupted(entry, path)
        return self._staged(entry)

    def header(self, d: DescendantEntry) -> bytes:
        if self.store is None:
            raise FileNotFoundError(f"{self.what}/{d.file}: not in the cache, and --offline reads no header")
        if d.sha256 not in self._headers:
            self._headers[d.sha256] = fetch_header(self.store, d.file, d.header_bytes, d.header_sha256)
            self.stats.headers_read += 1
        return self._headers[d.sha256]

    def scratch(self, name: str) -> Path:
        self.cache.staging.mkdir(parents=True, exist_ok=True)
        return self.cache.staging / name

    def _corrupted(self, entry: FileEntry, path: Path) -> None:
        """A cached object that no longer matches: remove it; online it is downloaded again."""
        path.unlink()
        name = f"{self.what}/{entry.file}"
        if self.store is None:
            raise BundleVerificationError(
                f"{name}: cached file {path} no longer matches the signed manifest's SHA-256; it was corrupted "
                "on this device and has been removed. Run legodnn-fetch online to download it again."
            )
        self.stats.healed.append(name)

    def _staged(self, entry: FileEntry) -> Path:
        """The file in staging, verified: kept from an earlier run only if its hash matches."""
        staged = self.cache.staged_path(entry)
        if staged.is_file():
            if sha256_file(staged) == entry.sha256:
                if entry not in self.pending:
                    self.pending.append(entry)
                return staged
            staged.unlink()
        if self.store is None:
            raise FileNotFoundError(
                f"{self.what}/{entry.file} is not in the cache and --offline forbids downloading it"
            )
        self.store.get_to_file(entry.file, staged, size=entry.bytes, sha256=entry.sha256, attempts=self.attempts,
                               progress=self.progress)
        self.stats.downloaded.append(f"{self.what}/{entry.file}")
        self.stats.downloaded_bytes += entry.bytes
        self.pending.append(entry)
        return staged
