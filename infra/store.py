"""Object stores for bundles: a local directory (file://) and S3 or any S3-compatible server (s3://).

Both backends offer the same small set of operations, chosen for what publishing and
fetching need and nothing more:

- whole-object writes that are atomic (a reader sees the old object or the new one, never a
  torn one): temp file + rename on disk, a single PUT on S3;
- resumable downloads: bytes go to `<dest>.part`; a dropped connection leaves it there and
  the next attempt continues with a Range request; size and SHA-256 are checked before the
  final rename, so `dest` only ever holds verified bytes;
- two conditional writes, the only coordination publishers need: `create_exclusive` (create
  if absent: S3 `If-None-Match: *`, on disk `os.link`, which fails if the name exists) and
  `replace_if_match` (compare-and-swap: S3 `If-Match: <ETag>`, on disk a `flock`-guarded
  check of the content hash then `os.replace`).

Credentials never appear in messages or logs: S3 uses boto3's default chain (environment,
profile, instance role) and `AWS_ENDPOINT_URL` for S3-compatible servers.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from infra.errors import (
    BundleVerificationError,
    DownloadInterruptedError,
    ObjectNotFoundError,
    StoreError,
)

from legoblocks.files import sha256_file, temp_path, write_atomic

CHUNK = 1 << 20


def _check_key(key: str) -> str:
    """Keys are relative, '/'-separated, without '..': a manifest can never point outside its bundle."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"invalid object key {key!r}: keys are relative paths without '.', '..' or '//'")
    return key


class _Progress:
    """A tqdm bar when asked for and tqdm is installed; otherwise nothing.

    tqdm is imported lazily so the device path runs with only its hard dependencies.
    """

    def __init__(self, enabled: bool, total: int, initial: int, desc: str) -> None:
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # a minimal device install: fall back to no bar
                return
            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit="B", unit_scale=True, leave=False, file=sys.stderr
            )

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Store(ABC):
    """A flat key -> bytes namespace under one root URI (`file:///dir` or `s3://bucket/prefix`)."""

    uri: str
    # Errors that mean "the connection broke mid-transfer": worth resuming, not a verdict on the data.
    transient_errors: tuple[type[BaseException], ...] = (ConnectionError, http.client.IncompleteRead)

    def key_uri(self, key: str) -> str:
        return f"{self.uri}/{key}" if key else self.uri

    @abstractmethod
    def child(self, prefix: str) -> Store:
        """The store rooted at `prefix` inside this one (sharing any connection)."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write a whole object atomically (replacing any old one)."""

    @abstractmethod
    def put_file(self, key: str, path: str | Path) -> None:
        """Upload a local file as one object, atomically."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read a whole (small) object; ObjectNotFoundError if absent."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes; ObjectNotFoundError if absent."""

    @abstractmethod
    def read_range(self, key: str, start: int, end: int | None = None) -> Iterator[bytes]:
        """Chunks of bytes [start, end) (to the end of the object when `end` is None)."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys starting with `prefix`, sorted."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the key exists."""

    @abstractmethod
    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create the object only if the key is absent; False if it already exists."""

    @abstractmethod
    def get_with_tag(self, key: str) -> tuple[bytes, str] | None:
        """The object and a version tag for `replace_if_match`, or None if absent."""

    @abstractmethod
    def replace_if_match(self, key: str, data: bytes, tag: str) -> bool:
        """Replace the object only if it still has version `tag`; False if it changed or vanished."""

    def read_prefix(self, key: str, n: int) -> bytes:
        """The first `n` bytes (fewer if the object is shorter)."""
        if n <= 0:
            return b""
        return b"".join(self.read_range(key, 0, n))

    def get_to_file(
        self,
        key: str,
        dest: str | Path,
        *,
        size: int | None = None,
        sha256: str | None = None,
        attempts: int = 3,
        progress: bool = False,
    ) -> Path:
        """Download `key` to `dest`, resuming from `dest.part` and verifying before the rename.

        `size`/`sha256` are the expected values (from a signed manifest); a mismatch deletes
        the partial file and raises BundleVerificationError naming the object. A connection
        that drops is resumed up to `attempts` times in this call; after that the partial
        file is kept and DownloadInterruptedError says to run again.
        """
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        if size is None:
            size = self.size(key)
        resumed = part.is_file() and 0 < part.stat().st_size <= size
        try:
            self._download_part(key, part, size, sha256, attempts, progress)
        except BundleVerificationError:
            # A partial file left by an earlier run may hold other bytes (a crash, a disk
            # error, a swapped file): start once more from nothing before refusing the object.
            if not resumed:
                raise
            self._download_part(key, part, size, sha256, attempts, progress)
        os.replace(part, dest)
        return dest

    def _download_part(self, key: str, part: Path, size: int, sha256: str | None, attempts: int,
                       progress: bool) -> None:
        """Fill `part` with the object's `size` bytes (resuming what it holds) and verify it;
        a mismatch deletes `part` and raises BundleVerificationError."""
        where = self.key_uri(key)
        offset = part.stat().st_size if part.exists() else 0
        if offset > size:  # leftovers of some other object: start over
            part.unlink()
            offset = 0
        bar = _Progress(progress, size, offset, "/".join(key.split("/")[-2:]))
        failures = 0
        try:
            while offset < size:
                reason, start = "", offset
                try:
                    with open(part, "ab") as f:
                        for chunk in self.read_range(key, offset):
                            f.write(chunk)
                            offset += len(chunk)
                            bar.update(len(chunk))
                            if offset > size:
                                break
                except self.transient_errors as e:
                    reason = f"{type(e).__name__}: {e}"
                    offset = part.stat().st_size
                if offset >= size or (not reason and offset == start):
                    break  # complete, or the object ended cleanly short of `size`: checked below
                failures += 1
                if failures >= attempts:
                    raise DownloadInterruptedError(
                        f"{where}: the connection dropped after {offset} of {size} bytes "
                        f"({reason or 'the server ended the response early'}); {failures} attempt(s) "
                        f"made. The partial download is kept in {part}: run again to resume it."
                    )
        finally:
            bar.close()
        if offset != size:
            part.unlink()
            raise BundleVerificationError(
                f"{where}: expected {size} bytes, the store sent {offset}; the object does not match "
                "its manifest. Refusing it."
            )
        if sha256 is not None:
            got = sha256_file(part)
            if got != sha256:
                part.unlink()
                raise BundleVerificationError(
                    f"{where}: SHA-256 mismatch (manifest says {sha256[:16]}..., file has {got[:16]}...); "
                    "the file was changed or corrupted after the bundle was signed. Refusing it."
                )


class FileStore(Store):
    """A directory as a store. Writes are temp file + rename in the same directory
    (`legoblocks.files.write_atomic`)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.uri = "file://" + self.root.as_posix()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def child(self, prefix: str) -> FileStore:
        return FileStore(self._path(prefix))

    def put_bytes(self, key: str, data: bytes) -> None:
        write_atomic(self._path(key), data)

    def put_file(self, key: str, path: str | Path) -> None:
        write_atomic(self._path(key), Path(path).read_bytes())

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.key_uri(key)} does not exist") from None

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.key_uri(key)} does not exist") from None

    def read_range(self, key: str, start: int, end: int | None = None) -> Iterator[bytes]:
        try:
            f = open(self._path(key), "rb")
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.key_uri(key)} does not exist") from None
        with f:
            f.seek(start)
            remaining = None if end is None else max(0, end - start)
            while remaining is None or remaining > 0:
                chunk = f.read(CHUNK if remaining is None else min(CHUNK, remaining))
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    def list(self, prefix: str = "") -> list[str]:
        # Walk only the deepest directory the prefix names, then filter by the full prefix.
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):  # temp and lock files are not objects
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def create_exclusive(self, key: str, data: bytes) -> bool:
        target = self._path(key)
        tmp = write_atomic(temp_path(target), data)
        try:
            os.link(tmp, target)  # atomic, and fails if the name exists: the claim is whole or absent
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def get_with_tag(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def replace_if_match(self, key: str, data: bytes, tag: str) -> bool:
        target = self._path(key)
        lock_path = target.with_name(f".{target.name}.lock")
        target.parent.mkdir(parents=True, exist_ok=True)
        # flock, not a lock file: the kernel drops it if the holder dies, so no stale locks.
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.get_with_tag(key)
            if current is None or current[1] != tag:
                return False
            write_atomic(target, data)
            return True


class S3Store(Store):
    """`s3://bucket/prefix` via boto3; `AWS_ENDPOINT_URL` points it at an S3-compatible server."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None) -> None:
        import boto3
        import botocore.config
        import botocore.exceptions
        import urllib3.exceptions

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        # botocore reads AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 itself when endpoint_url is None.
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            config=botocore.config.Config(retries={"max_attempts": 5, "mode": "standard"}),
        )
        self._botocore_exc = botocore.exceptions
        self.transient_errors = (
            ConnectionError,
            http.client.IncompleteRead,
            botocore.exceptions.ConnectionError,
            botocore.exceptions.ResponseStreamingError,
            botocore.exceptions.IncompleteReadError,
            urllib3.exceptions.HTTPError,
        )

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def child(self, prefix: str) -> S3Store:
        sub = object.__new__(S3Store)
        sub.__dict__.update(self.__dict__)  # same client and error classes: no new connection pool
        sub.prefix = self._key(prefix)
        sub.uri = f"s3://{self.bucket}/{sub.prefix}"
        return sub

    def _call(self, op: str, key: str, **kwargs: Any) -> Any:
        """Run one S3 call, turning boto errors into StoreErrors that say what to do."""
        exc = self._botocore_exc
        try:
            return getattr(self._client, op)(Bucket=self.bucket, **kwargs)
        except exc.NoCredentialsError:
            raise StoreError(
                f"no AWS credentials for {self.key_uri(key)}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance role"
            ) from None
        except exc.EndpointConnectionError as e:
            raise StoreError(
                f"cannot reach the S3 endpoint for {self.key_uri(key)} ({e}); check AWS_ENDPOINT_URL "
                "and the network"
            ) from None
        except exc.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFoundError(f"{self.key_uri(key)} does not exist") from None
            if code == "NoSuchBucket":
                raise StoreError(f"bucket {self.bucket!r} does not exist (for {self.key_uri(key)}); create it first") from None
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StoreError(
                    f"access denied to {self.key_uri(key)} ({code}); check the credentials' permissions "
                    "on this bucket"
                ) from None
            raise

    @staticmethod
    def _is_condition_failure(e: Exception) -> bool:
        code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
        # 412: the condition failed; 409: a concurrent conditional write won the race (AWS).
        return code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call("put_object", key, Key=self._key(key), Body=data)

    def put_file(self, key: str, path: str | Path) -> None:
        with open(path, "rb") as f:
            self._call("put_object", key, Key=self._key(key), Body=f)

    def get_bytes(self, key: str) -> bytes:
        return self._call("get_object", key, Key=self._key(key))["Body"].read()

    def size(self, key: str) -> int:
        return int(self._call("head_object", key, Key=self._key(key))["ContentLength"])

    def read_range(self, key: str, start: int, end: int | None = None) -> Iterator[bytes]:
        rng = f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"
        try:
            body = self._call("get_object", key, Key=self._key(key), Range=rng)["Body"]
        except self._botocore_exc.ClientError as e:
            if e.response.get("Error", {}).get("Code") == "InvalidRange":  # start is past the end
                return
            raise
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def list(self, prefix: str = "") -> list[str]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        cut = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        token: dict[str, str] = {}
        while True:
            page = self._call("list_objects_v2", prefix or "", Prefix=full, **token)
            keys.extend(obj["Key"][cut:] for obj in page.get("Contents", []))
            if not page.get("IsTruncated"):
                return sorted(keys)
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def exists(self, key: str) -> bool:
        try:
            self._call("head_object", key, Key=self._key(key))
            return True
        except ObjectNotFoundError:
            return False

    def create_exclusive(self, key: str, data: bytes) -> bool:
        try:
            self._call("put_object", key, Key=self._key(key), Body=data, IfNoneMatch="*")
            return True
        except self._botocore_exc.ClientError as e:
            if self._is_condition_failure(e):
                return False
            raise

    def get_with_tag(self, key: str) -> tuple[bytes, str] | None:
        try:
            obj = self._call("get_object", key, Key=self._key(key))
        except ObjectNotFoundError:
            return None
        return obj["Body"].read(), obj["ETag"]

    def replace_if_match(self, key: str, data: bytes, tag: str) -> bool:
        try:
            self._call("put_object", key, Key=self._key(key), Body=data, IfMatch=tag)
            return True
        except ObjectNotFoundError:
            return False
        except self._botocore_exc.ClientError as e:
            if self._is_condition_failure(e):
                return False
            raise


def open_store(uri: str, *, endpoint_url: str | None = None) -> Store:
    """The store for `file:///dir`, a plain directory path, or `s3://bucket/prefix`."""
    if uri.startswith("s3://"):
        rest = uri[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreError(f"{uri!r} names no bucket; use s3://BUCKET/PREFIX")
        return S3Store(bucket, prefix, endpoint_url=endpoint_url)
    if uri.startswith("file://"):
        return FileStore(uri[len("file://"):] or ".")
    if "://" in uri:
        raise StoreError(f"unsupported store URI {uri!r}; use file:///DIR or s3://BUCKET/PREFIX")
    return FileStore(uri)
