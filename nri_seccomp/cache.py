"""On-disk, content-addressed store of profile blobs, with an index of reference → digest.

Layout under the root::

    blobs/sha256/<hex>     the profile layer, named by its own digest
    index.json             {reference: {digest, fetched_at, last_used}}
    lock                   one plugin process at a time

Every write is a temporary file in the same directory, fsync'd, renamed over
the final name, then the directory fsync'd: a crash leaves either the old file
or the new one, never a partial file under a final name. Leftover temporary
files are removed at open. Every read re-hashes the blob: a damaged file is
deleted and reported as a miss, never served. Blobs beyond ``max_bytes`` are
evicted least recently used first.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_TMP_PREFIX = ".tmp-"


class CacheError(Exception):
    """The cache cannot do what was asked; the message names the path."""


class CacheIntegrityError(CacheError):
    pass


class CacheWriteError(CacheError):
    pass


class CacheLockedError(CacheError):
    pass


@dataclass(frozen=True)
class IndexEntry:
    digest: str
    fetched_at: float
    last_used: float

    @property
    def age_s(self) -> float:
        return time.time() - self.fetched_at


def check_digest(digest: str) -> str:
    """The hex part of a sha256 digest; anything else is refused before touching the disk."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"not a sha256 digest: {str(digest)[:80]!r}")
    return digest[7:]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Cache:
    def __init__(self, root: Path, max_bytes: int = 256 * 2**20) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._blobs = self.root / "blobs" / "sha256"
        self._index_path = self.root / "index.json"
        self._lock = threading.Lock()
        try:
            self._blobs.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheWriteError(f"cannot create cache directory {self._blobs}: "
                                  f"{exc.strerror or exc}") from exc
        self._lock_file = self._take_lock()
        self._remove_leftovers()
        self._index = self._load_index()
        #: hex → (size, last use)
        self._sizes: dict[str, tuple[int, float]] = {}
        for path in self._blobs.iterdir():
            if _DIGEST.fullmatch("sha256:" + path.name):
                st = path.stat()
                self._sizes[path.name] = (st.st_size, st.st_mtime)
        for entry in self._index.values():
            hexd = entry.digest[7:]
            if hexd in self._sizes:
                self._sizes[hexd] = (self._sizes[hexd][0], max(entry.last_used,
                                                               self._sizes[hexd][1]))

    # ---- opening ---------------------------------------------------------------

    def _take_lock(self) -> int:
        path = self.root / "lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise CacheWriteError(f"cannot open {path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CacheLockedError(
                f"cache {self.root} is in use by another process (pid {holder})"
            ) from None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._lock_file)

    def _remove_leftovers(self) -> None:
        for directory in (self.root, self._blobs):
            for path in directory.glob(_TMP_PREFIX + "*"):
                with contextlib.suppress(OSError):
                    path.unlink()
                    log.info("removed unfinished cache write %s", path)

    def _load_index(self) -> dict[str, IndexEntry]:
        try:
            raw = json.loads(self._index_path.read_text())
            entries = {
                str(ref): IndexEntry(str(e["digest"]), float(e["fetched_at"]),
                                     float(e.get("last_used", e["fetched_at"])))
                for ref, e in raw.items()
            }
            for entry in entries.values():
                check_digest(entry.digest)
            return entries
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("cache index %s is damaged (%s); starting with an empty index, "
                        "blobs stay usable by digest", self._index_path, exc)
            return {}

    # ---- blobs -------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self._blobs / check_digest(digest)

    def get_blob(self, digest: str) -> bytes | None:
        path = self.blob_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read cached blob %s: %s", path, exc.strerror or exc)
            return None
        actual = sha256_digest(data)
        if actual != digest:
            log.warning("cached blob %s is damaged (content is %s, %d bytes); deleted, "
                        "it will be fetched again", path, actual, len(data))
            with self._lock:
                with contextlib.suppress(OSError):
                    path.unlink()
                self._sizes.pop(digest[7:], None)
            return None
        with self._lock:
            self._sizes[digest[7:]] = (len(data), time.time())
        return data

    def put_blob(self, data: bytes, expected_digest: str | None = None) -> str:
        digest = sha256_digest(data)
        if expected_digest is not None:
            check_digest(expected_digest)
            if digest != expected_digest:
                raise CacheIntegrityError(
                    f"refusing to cache {len(data)} bytes as {expected_digest}: content is "
                    f"{digest}"
                )
        path = self.blob_path(digest)
        with self._lock:
            if not (path.exists() and path.stat().st_size == len(data)):
                self._write_atomic(path, data)
            self._sizes[digest[7:]] = (len(data), time.time())
            self._evict()
        return digest

    def _evict(self) -> None:
        total = sum(size for size, _ in self._sizes.values())
        if total <= self.max_bytes:
            return
        for hexd, (size, _) in sorted(self._sizes.items(), key=lambda kv: kv[1][1]):
            if total <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                (self._blobs / hexd).unlink()
            del self._sizes[hexd]
            total -= size
            gone = [ref for ref, e in self._index.items() if e.digest[7:] == hexd]
            for ref in gone:
                del self._index[ref]
            log.info("evicted cached profile sha256:%s (%d bytes) for %s", hexd, size,
                     ", ".join(gone) or "no reference")
        self._save_index()

    # ---- index ---------------------------------------------------------------------

    def lookup(self, reference: str) -> IndexEntry | None:
        with self._lock:
            return self._index.get(reference)

    def record(self, reference: str, digest: str, fetched_at: float | None = None) -> None:
        check_digest(digest)
        now = time.time()
        with self._lock:
            self._index[reference] = IndexEntry(digest, fetched_at or now, now)
            self._save_index()

    def _save_index(self) -> None:
        body = json.dumps(
            {ref: {"digest": e.digest, "fetched_at": e.fetched_at, "last_used": e.last_used}
             for ref, e in self._index.items()},
            indent=1, sort_keys=True,
        ).encode()
        self._write_atomic(self._index_path, body)

    # ---- the one way we write --------------------------------------------------------

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.parent / f"{_TMP_PREFIX}{path.name}-{os.getpid()}-{threading.get_ident()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            reason = errno.errorcode.get(exc.errno or 0, "error")
            raise CacheWriteError(
                f"cannot write {path}: {exc.strerror or exc} ({reason})"
            ) from exc
