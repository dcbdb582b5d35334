"""The on-disk cache on real files: damage is detected, writes are atomic, even under SIGKILL."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nri_seccomp.cache import (
    Cache,
    CacheIntegrityError,
    CacheWriteError,
    sha256_digest,
)


def test_round_trip_and_restart(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    digest = cache.put_blob(b'{"defaultAction": "SCMP_ACT_ALLOW"}')
    cache.record("reg/a:v1", digest)
    assert cache.get_blob(digest) == b'{"defaultAction": "SCMP_ACT_ALLOW"}'
    cache.close()
    again = Cache(tmp_path)
    entry = again.lookup("reg/a:v1")
    assert entry is not None and entry.digest == digest and entry.age_s < 60
    assert again.get_blob(digest) == b'{"defaultAction": "SCMP_ACT_ALLOW"}'


def test_expected_digest_is_verified(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(CacheIntegrityError, match=f"refusing to cache 3 bytes as {wrong}"):
        cache.put_blob(b"abc", wrong)
    assert list((tmp_path / "blobs" / "sha256").iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "replace", "append"])
def test_damaged_blob_is_never_served(tmp_path: Path, damage: str,
                                      caplog: pytest.LogCaptureFixture) -> None:
    cache = Cache(tmp_path)
    data = b"x" * 5000
    digest = cache.put_blob(data)
    path = cache.blob_path(digest)
    if damage == "truncate":
        path.write_bytes(data[:100])
    elif damage == "replace":
        path.write_bytes(b"y" * 5000)
    else:
        path.write_bytes(data + b"!")
    assert cache.get_blob(digest) is None
    assert not path.exists()
    assert f"cached blob {path} is damaged" in caplog.text


@pytest.mark.parametrize("content", [None, "", "{not json", "[1,2]",
                                     '{"r": {"digest": "../../etc/passwd", "fetched_at": 1}}'],
                         ids=["missing", "empty", "garbage", "list", "traversal"])
def test_damaged_index_starts_empty(tmp_path: Path, content: str | None) -> None:
    cache = Cache(tmp_path)
    digest = cache.put_blob(b"profile")
    cache.record("reg/a:v1", digest)
    cache.close()
    index = tmp_path / "index.json"
    if content is None:
        index.unlink()
    else:
        index.write_text(content)
    again = Cache(tmp_path)
    assert again.lookup("reg/a:v1") is None
    assert again.get_blob(digest) == b"profile"  # blobs stay usable by digest


@pytest.mark.parametrize("bad", ["../../etc/passwd", "sha256:../../x", "sha256:" + "A" * 64,
                                 "sha512:" + "a" * 128, ""])
def test_bad_digests_refused_before_disk(tmp_path: Path, bad: str) -> None:
    cache = Cache(tmp_path)
    with pytest.raises(ValueError, match="not a sha256 digest"):
        cache.get_blob(bad)
    with pytest.raises(ValueError, match="not a sha256 digest"):
        cache.record("r", bad)


def test_lru_eviction(tmp_path: Path) -> None:
    cache = Cache(tmp_path, max_bytes=3000)
    digests = []
    for i in range(3):
        digests.append(cache.put_blob(bytes([i]) * 1000))
        cache.record(f"r{i}", digests[-1])
        time.sleep(0.01)
    assert cache.get_blob(digests[0]) is not None  # 0 is now the most recently used
    time.sleep(0.01)
    d3 = cache.put_blob(b"z" * 1000)
    assert cache.get_blob(digests[1]) is None  # least recently used went
    assert cache.lookup("r1") is None
    assert cache.get_blob(digests[0]) is not None
    assert cache.get_blob(d3) is not None


def test_threads_put_the_same_blob(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    data = os.urandom(200_000)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(cache.put_blob(data)))
               for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {sha256_digest(data)}
    assert cache.get_blob(sha256_digest(data)) == data
    assert not list(tmp_path.rglob(".tmp-*"))


def test_second_process_is_refused(tmp_path: Path) -> None:
    Cache(tmp_path)
    code = f"import pathlib, nri_seccomp.cache as c; c.Cache(pathlib.Path({str(tmp_path)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "CacheLockedError" in proc.stderr
    assert f"is in use by another process (pid {os.getpid()})" in proc.stderr


@contextlib.contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False) -> Iterator[Path]:
    path.mkdir()
    opts = f"size={size}" + (",ro" if readonly else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_leaves_no_partial_file(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "64k") as root:
        cache = Cache(root)
        with pytest.raises(CacheWriteError, match="No space left on device"):
            cache.put_blob(os.urandom(200_000))
        assert list((root / "blobs" / "sha256").iterdir()) == []
        small = cache.put_blob(b"still works")
        assert cache.get_blob(small) == b"still works"
        cache.close()


def test_read_only_disk_is_refused_with_path(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    Cache(root).close()
    subprocess.run(["mount", "--bind", "-o", "ro", str(root), str(root)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(root)], check=True)
    try:
        with pytest.raises(CacheWriteError, match="Read-only file system"):
            Cache(root).put_blob(b"x")
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


WRITER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from nri_seccomp.cache import Cache
    cache = Cache(Path(sys.argv[1]))
    print("ready", flush=True)
    i = 0
    while True:
        data = os.urandom(1 << 20) + str(i).encode()
        digest = cache.put_blob(data)
        cache.record(f"reg/p:{i % 7}", digest)
        i += 1
""")


def test_sigkill_mid_write_never_leaves_a_partial_blob(tmp_path: Path) -> None:
    rng = random.Random(1234)
    for round_ in range(20):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)],
                                stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        cache = Cache(tmp_path, max_bytes=1 << 40)
        assert not list(tmp_path.rglob(".tmp-*")), f"round {round_}: leftovers"
        for path in (tmp_path / "blobs" / "sha256").iterdir():
            digest = "sha256:" + path.name
            assert cache.get_blob(digest) is not None, f"round {round_}: partial {path}"
        for i in range(7):
            entry = cache.lookup(f"reg/p:{i}")
            if entry is not None:
                assert cache.get_blob(entry.digest) is not None
        cache.close()
