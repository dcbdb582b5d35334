"""On-disk, content-addressed store of profile blobs, with an index of reference → digest.

Layout under the root::

    blobs/sha256/<hex>     the profile layer, named by its own digest
    index.json             {reference: {digest, fetched_at, last_used}}
    lock                   pid of the process holding the cache (the lock itself
                           is an flock on the root directory)

Every write is a temporary file (``.tmp-…``) in the final directory, fsync'd,
renamed over the final name, then the directory fsync'd: a crash leaves either
the old file or the new one, never a partial file under a final name. Leftover
temporary files are removed at open. Every read re-hashes the blob: a damaged
file is deleted and reported as a miss, never served. Blobs beyond ``max_bytes``
are evicted least recently used first, with the index entries that name them.

A cache on a read-only or unwritable directory still opens and serves what it
holds (verified); every write then raises :class:`CacheWriteError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import itertools
import json
import logging
import math
import os
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _quote
from pathlib import Path
from types import TracebackType

from nri_seccomp import digest as digest_mod
from nri_seccomp.errors import NriSeccompError

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
INDEX_NAME = "index.json"
PID_NAME = "lock"
DEFAULT_MAX_BYTES = 256 * 2**20
#: references the index remembers; each one a pod author can name, so it is bounded
DEFAULT_MAX_ENTRIES = 2048
#: the cache says which references tenants use: only its owner reads it
DIR_MODE = 0o700
FILE_MODE = 0o600


class CacheError(NriSeccompError):
    """The cache cannot do what was asked; the message names the path."""


class CacheIntegrityError(CacheError):
    """Content offered for caching does not match the digest it was announced with."""


class CacheWriteError(CacheError):
    """The disk refused a write (read-only, full, permissions); nothing partial is visible."""


class CacheLockedError(CacheError):
    """Another process has the cache open."""


# slots: one of each per cached reference and blob, thousands on a busy node
@dataclass(frozen=True, slots=True)
class IndexEntry:
    digest: str
    fetched_at: float
    last_used: float

    @property
    def age_s(self) -> float:
        """Seconds since the fetch; negative if the wall clock went back since."""
        return time.time() - self.fetched_at


@dataclass(slots=True)
class _Blob:
    size: int
    last_used: float


def _why(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "error")
    return f"{exc.strerror or exc} ({name})"


class Cache:
    """One process's cache; methods are thread-safe.

    Blob reads and the write+fsync of new blobs run outside the lock, so a hit
    never waits behind another thread's fsync; only renames, unlinks and the
    in-memory bookkeeping are serialised.
    """

    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_bytes <= 0:
            raise ValueError(f"cache max_bytes must be positive, not {max_bytes}")
        if max_entries <= 0:
            raise ValueError(f"cache max_entries must be positive, not {max_entries}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._blob_dir = self.root / "blobs" / "sha256"
        self._index_path = self.root / INDEX_NAME
        self._lock = threading.Lock()
        # held while writing index.json so that snapshots reach the disk in order
        self._index_io = threading.Lock()
        self._tmp_seq = itertools.count()
        self._closed = False
        try:
            self._blob_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheWriteError(f"cannot create cache directory {self._blob_dir}: "
                                  f"{_why(exc)}") from exc
        self._restrict()
        self._dir_fd = self._take_lock()
        try:
            self.writable = self._write_pid()
            if self.writable:
                self._remove_leftovers()
            self._blobs = self._scan_blobs()
            self._index = self._load_index()
            self._dirty = False
            self._merge_index_into_blobs()
            with self._lock:
                index_changed = self._evict_locked(keep=None)
            if index_changed:
                self._flush_index(best_effort=True)
        except BaseException:
            os.close(self._dir_fd)
            raise

    # ---- opening and closing ---------------------------------------------------

    def _take_lock(self) -> int:
        # flock on the directory rather than on a file in it: works on a
        # read-only file system too, and a file cannot be deleted from under it
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise CacheWriteError(f"cannot open cache directory {self.root}: "
                                  f"{_why(exc)}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                holder = (self.root / PID_NAME).read_text(errors="replace").strip()[:32]
            except OSError:
                holder = ""
            raise CacheLockedError(
                f"cache {self.root} is in use by another process (pid {holder or 'unknown'})"
            ) from None
        return fd

    def _write_pid(self) -> bool:
        """Record our pid for the error of a second process; False if the root is unwritable."""
        path = self.root / PID_NAME
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("cache %s is not writable (%s): serving what it holds, "
                        "new profiles will not be kept", self.root, _why(exc))
            return False
        return True

    def _restrict(self) -> None:
        """No access for group and others, also to a cache an older version left readable.

        Only bits are taken away: a cache made read-only on purpose stays read-only.
        """
        paths = [self.root, self.root / "blobs", self._blob_dir, self._index_path]
        with contextlib.suppress(OSError), os.scandir(self._blob_dir) as it:
            paths += [Path(e.path) for e in it if e.is_file(follow_symlinks=False)]
        for path in paths:
            with contextlib.suppress(OSError):
                mode = stat.S_IMODE(os.lstat(path).st_mode)
                if mode & 0o077:
                    os.chmod(path, mode & 0o700, follow_symlinks=False)

    def _remove_leftovers(self) -> None:
        # safe only because we hold the lock: no other writer can own these
        for directory in (self.root, self._blob_dir):
            for path in directory.glob(TMP_PREFIX + "*"):
                try:
                    path.unlink()
                except OSError as exc:
                    log.warning("cannot remove unfinished cache write %s: %s", path, _why(exc))
                else:
                    log.info("removed unfinished cache write %s", path)

    def _scan_blobs(self) -> dict[str, _Blob]:
        blobs: dict[str, _Blob] = {}
        try:
            with os.scandir(self._blob_dir) as it:
                for entry in it:
                    if not digest_mod.PATTERNS["sha256"].fullmatch(entry.name):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        # atime is where touch() persists the last use across restarts
                        blobs[entry.name] = _Blob(st.st_size, max(st.st_atime, st.st_mtime))
        except OSError as exc:
            raise CacheError(f"cannot list cached blobs in {self._blob_dir}: "
                             f"{_why(exc)}") from exc
        return blobs

    def _load_index(self) -> dict[str, IndexEntry]:
        try:
            raw = json.loads(self._index_path.read_bytes())
            if not isinstance(raw, dict):
                raise TypeError(f"top level is {type(raw).__name__}, not an object")
            entries: dict[str, IndexEntry] = {}
            for ref, e in raw.items():
                fetched_at = float(e["fetched_at"])
                last_used = float(e.get("last_used", fetched_at))
                if not (math.isfinite(fetched_at) and math.isfinite(last_used)):
                    raise ValueError(f"{ref}: time is not a finite number")
                digest = str(e["digest"])
                digest_mod.sha256_hex(digest)
                entries[str(ref)] = IndexEntry(digest, fetched_at, last_used)
            return entries
        except FileNotFoundError:
            if self._blobs:
                log.warning("cache index %s is missing; starting with an empty index, "
                            "blobs stay usable by digest", self._index_path)
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("cache index %s is damaged (%s); starting with an empty index, "
                        "blobs stay usable by digest", self._index_path, exc)
            return {}

    def _merge_index_into_blobs(self) -> None:
        for ref, entry in list(self._index.items()):
            blob = self._blobs.get(entry.digest[7:])
            if blob is None:
                # the blob went (evicted before a crash, or removed by hand): the
                # entry could only ever miss, and would count against stale-if-error
                del self._index[ref]
                self._dirty = True
            else:
                blob.last_used = max(blob.last_used, entry.last_used)

    def close(self) -> None:
        """Write the last-use times out and release the lock. Idempotent."""
        if self._closed:
            return
        try:
            if self.writable:
                self._flush_index(best_effort=True)
        finally:
            self._closed = True
            with contextlib.suppress(OSError):
                os.close(self._dir_fd)

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            # without the lock another process may own the directory now
            raise CacheError(f"cache {self.root} is closed")

    # ---- blobs -------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(b.size for b in self._blobs.values())

    def blob_path(self, digest: str) -> Path:
        return self._blob_dir / digest_mod.sha256_hex(digest)

    def get_blob(self, digest: str) -> bytes | None:
        """The verified content of ``digest``, or None; damaged files are deleted, never served.

        Always re-hashed: 16 KiB is ~10 µs and the 1 MiB maximum ~0.6 ms, which
        is not worth trusting file metadata to vouch for the content.
        """
        hexd = digest_mod.sha256_hex(digest)
        self._check_open()
        path = self._blob_dir / hexd
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            with self._lock:
                self._blobs.pop(hexd, None)
            return None
        except OSError as exc:
            # ELOOP: a symlink where a blob should be, never followed
            log.warning("cannot read cached blob %s: %s", path, _why(exc))
            if exc.errno == errno.ELOOP:
                self._discard(path, hexd, None)
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                log.warning("cached blob %s is not a regular file; ignored", path)
                return None
            data = f.read()
            actual = digest_mod.sha256(data)
            if actual != digest:
                log.warning("cached blob %s is damaged (expected %s, content is %s, %d bytes); "
                            "deleted, it will be fetched again", path, digest, actual, len(data))
                self._discard(path, hexd, st)
                return None
            self._touch_fd(f.fileno(), hexd, len(data), st)
        return data

    def touch(self, digest: str) -> None:
        """Mark ``digest`` as just used, for LRU eviction (get_blob does this on a hit)."""
        hexd = digest_mod.sha256_hex(digest)
        self._check_open()
        try:
            fd = os.open(self._blob_dir / hexd, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                self._touch_fd(fd, hexd, st.st_size, st)
        finally:
            os.close(fd)

    def _touch_fd(self, fd: int, hexd: str, size: int, st: os.stat_result) -> None:
        now_ns = time.time_ns()
        with self._lock:
            blob = self._blobs.get(hexd)
            if blob is None:
                # evicted since this read opened it: counting it again would leave the
                # books with bytes the disk no longer holds
                if not (self._blob_dir / hexd).exists():
                    return
                blob = self._blobs[hexd] = _Blob(size, 0.0)
            blob.last_used = now_ns / 1e9
        # persisted in atime (mtime kept): a metadata update, no fsync on the hit path
        with contextlib.suppress(OSError):
            os.utime(fd, ns=(now_ns, st.st_mtime_ns))

    def _discard(self, path: Path, hexd: str, seen: os.stat_result | None) -> None:
        with self._lock:
            try:
                current = os.lstat(path)
            except FileNotFoundError:
                self._blobs.pop(hexd, None)
                return
            except OSError:
                return
            if seen is not None and (current.st_ino, current.st_dev) != (seen.st_ino,
                                                                        seen.st_dev):
                # another thread has put a fresh copy since we read the bad one
                return
            try:
                path.unlink()
            except OSError as exc:
                log.warning("cannot delete damaged cached blob %s: %s", path, _why(exc))
            self._blobs.pop(hexd, None)

    def put_blob(self, data: bytes, expected_digest: str | None = None) -> str:
        """Store ``data``; its digest is returned. Raises CacheIntegrityError, CacheWriteError."""
        if expected_digest is not None:
            digest_mod.sha256_hex(expected_digest)
        digest = digest_mod.sha256(data)
        if expected_digest is not None and digest != expected_digest:
            raise CacheIntegrityError(
                f"refusing to cache {len(data)} bytes as {expected_digest}: content is {digest}"
            )
        self._check_open()
        hexd = digest[7:]
        path = self._blob_dir / hexd
        tmp: Path | None = None
        while True:
            if tmp is None and not self._holds(path, data):
                tmp = self._write_temp(path, data)
            with self._lock:
                # another thread may have evicted the copy we found since we looked:
                # counting it would leave total_bytes above what is on disk
                if tmp is None and not os.path.exists(path):
                    continue
                if tmp is not None:
                    try:
                        os.replace(tmp, path)
                    except OSError as exc:
                        with contextlib.suppress(OSError):
                            tmp.unlink()
                        raise CacheWriteError(f"cannot write {path}: {_why(exc)}") from exc
                self._blobs[hexd] = _Blob(len(data), time.time())
                index_changed = self._evict_locked(keep=hexd)
                break
        if tmp is not None:
            self._fsync_dir(path)
        else:
            # the copy already there counts as used now, across a restart too
            with contextlib.suppress(OSError):
                os.utime(path)
        if index_changed:
            self._flush_index(best_effort=True)
        return digest

    def _holds(self, path: Path, data: bytes) -> bool:
        """Whether ``path`` already has exactly ``data`` (the same size is not enough)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        with os.fdopen(fd, "rb") as f:
            if os.fstat(f.fileno()).st_size != len(data):
                return False
            return f.read() == data

    def _evict_locked(self, keep: str | None) -> bool:
        """Delete least recently used blobs beyond max_bytes; True if the index changed."""
        total = sum(b.size for b in self._blobs.values())
        if total <= self.max_bytes:
            return False
        index_changed = False
        for hexd, blob in sorted(self._blobs.items(), key=lambda kv: kv[1].last_used):
            if total <= self.max_bytes:
                break
            if hexd == keep:
                # the caller is about to use it; it goes next time if still too big
                continue
            path = self._blob_dir / hexd
            try:
                # no directory fsync: a crash can only bring back a valid blob
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot evict cached blob %s: %s", path, _why(exc))
                break
            del self._blobs[hexd]
            total -= blob.size
            gone = [ref for ref, e in self._index.items() if e.digest[7:] == hexd]
            for ref in gone:
                del self._index[ref]
            index_changed = index_changed or bool(gone)
            log.info("evicted cached profile sha256:%s (%d bytes, last used %s) for %s",
                     hexd, blob.size, time.strftime("%Y-%m-%dT%H:%M:%S",
                                                    time.localtime(blob.last_used)),
                     ", ".join(gone) or "no reference")
        if total > self.max_bytes and keep is not None:
            log.warning("cache %s holds %d bytes, over its %d byte limit: the newest blob "
                        "sha256:%s alone is too big", self.root, total, self.max_bytes, keep)
        self._dirty = self._dirty or index_changed
        return index_changed

    # ---- index ---------------------------------------------------------------------

    def lookup(self, reference: str) -> IndexEntry | None:
        """The digest last recorded for ``reference`` (a normalised reference string)."""
        self._check_open()
        with self._lock:
            entry = self._index.get(reference)
            if entry is None:
                return None
            # written out with the next index write or at close, not on every hit
            entry = dataclasses.replace(entry, last_used=time.time())
            self._index[reference] = entry
            self._dirty = True
            blob = self._blobs.get(entry.digest[7:])
            if blob is not None:
                blob.last_used = entry.last_used
            return entry

    def record(self, reference: str, digest: str, fetched_at: float | None = None) -> None:
        """Point ``reference`` at ``digest`` (put_blob first), durably; raises CacheWriteError."""
        hexd = digest_mod.sha256_hex(digest)
        if not isinstance(reference, str) or not reference:
            raise ValueError(f"not a reference: {reference!r}")
        now = time.time()
        if fetched_at is None:
            fetched_at = now
        elif not math.isfinite(fetched_at):
            raise ValueError(f"fetched_at for {reference} is not a finite time: {fetched_at}")
        self._check_open()
        with self._lock:
            self._index[reference] = IndexEntry(digest, fetched_at, now)
            self._dirty = True
            blob = self._blobs.get(hexd)
            if blob is not None:
                blob.last_used = now
            self._forget_locked()
        self._flush_index(best_effort=False)

    def _forget_locked(self) -> None:
        """Past max_entries, the least recently used references go, and blobs only they named."""
        excess = len(self._index) - self.max_entries
        if excess <= 0:
            return
        oldest = sorted(self._index.items(), key=lambda kv: kv[1].last_used)[:excess]
        for ref, _ in oldest:
            del self._index[ref]
        named = {e.digest[7:] for e in self._index.values()}
        for hexd in {e.digest[7:] for _, e in oldest} - named:
            blob = self._blobs.pop(hexd, None)
            if blob is None:
                continue
            try:
                (self._blob_dir / hexd).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot evict cached blob sha256:%s: %s", hexd, _why(exc))
                self._blobs[hexd] = blob
        log.info("cache index over %d references: forgot the %d least recently used",
                 self.max_entries, excess)

    def _flush_index(self, *, best_effort: bool) -> None:
        with self._index_io:
            with self._lock:
                if not self._dirty:
                    return
                # the entries are immutable: a snapshot of them is the index as of now
                entries = sorted(self._index.items())
                self._dirty = False
            try:
                tmp = self._write_temp(self._index_path, _index_json(entries))
                try:
                    os.replace(tmp, self._index_path)
                except OSError as exc:
                    with contextlib.suppress(OSError):
                        tmp.unlink()
                    raise CacheWriteError(f"cannot write {self._index_path}: "
                                          f"{_why(exc)}") from exc
                self._fsync_dir(self._index_path)
            except CacheWriteError as exc:
                with self._lock:
                    self._dirty = True
                if not best_effort:
                    raise
                log.warning("%s", exc)

    # ---- the one way we write --------------------------------------------------------

    def _write_temp(self, final: Path, data: bytes | Iterable[bytes]) -> Path:
        """A fsync'd temporary file next to ``final``, ready to be renamed over it;
        ``data`` whole or in chunks."""
        tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}-{next(self._tmp_seq)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise CacheWriteError(f"cannot write {final}: {_why(exc)}") from exc
        try:
            try:
                for chunk in (data,) if isinstance(data, bytes) else data:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise CacheWriteError(f"cannot write {final}: {_why(exc)}") from exc
        return tmp

    def _fsync_dir(self, final: Path) -> None:
        try:
            dir_fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise CacheWriteError(f"cannot make {final} durable: {_why(exc)}") from exc


def _index_json(entries: list[tuple[str, IndexEntry]]) -> Iterator[bytes]:
    """The index as JSON, an entry per line, in chunks of ``_INDEX_CHUNK`` entries.

    Written after every new reference, while the store's other work waits for the
    GIL: ``json.dumps`` with ``indent`` runs json's pure-Python encoder over a dict
    built for it, 18 ms and 2.5 MiB at its peak for 2,100 entries (measured), and
    the process's RSS kept much of that peak. Entry by entry with json's C string
    quoting (``float.__repr__`` is json's number form) the same document takes a
    third of the time, and a chunk at a time, a few kilobytes of memory."""
    yield b"{\n"
    for start in range(0, len(entries), _INDEX_CHUNK):
        lines = [f' {_quote(ref)}: {{"digest": {_quote(e.digest)}, "fetched_at": '
                 f'{e.fetched_at!r}, "last_used": {e.last_used!r}}}'
                 for ref, e in entries[start:start + _INDEX_CHUNK]]
        last = start + _INDEX_CHUNK >= len(entries)
        yield (",\n".join(lines) + ("\n" if last else ",\n")).encode()
    yield b"}\n"


#: entries per chunk of the written index
_INDEX_CHUNK = 128
