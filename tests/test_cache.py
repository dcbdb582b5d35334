"""The on-disk cache on real files: damage is detected, writes are atomic, even under SIGKILL."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nri_seccomp import digest as digest_mod
from nri_seccomp.storage import cache as cache_mod
from nri_seccomp.storage.cache import (
    Cache,
    CacheError,
    CacheIntegrityError,
    CacheLockedError,
    CacheWriteError,
)

PROFILE = b'{"defaultAction": "SCMP_ACT_ALLOW"}'


def _blobs(root: Path) -> list[Path]:
    return sorted((root / "blobs" / "sha256").iterdir())


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(cache_mod.TMP_PREFIX)]


def test_round_trip_and_restart(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    digest = cache.put_blob(PROFILE)
    assert digest == digest_mod.sha256(PROFILE)
    assert cache.blob_path(digest) == tmp_path / "blobs" / "sha256" / digest[7:]
    cache.record("reg/a:v1", digest)
    cache.record("reg/old:v1", digest, fetched_at=1000.0)
    assert cache.get_blob(digest) == PROFILE
    cache.close()
    cache.close()  # idempotent
    with Cache(tmp_path) as again:
        entry = again.lookup("reg/a:v1")
        assert entry is not None and entry.digest == digest and 0 <= entry.age_s < 60
        old = again.lookup("reg/old:v1")
        assert old is not None and old.fetched_at == 1000.0 and old.age_s > 10**9
        assert again.lookup("reg/never:v1") is None
        assert again.get_blob(digest) == PROFILE
        assert again.get_blob("sha256:" + "0" * 64) is None
    assert not _leftovers(tmp_path)


def test_closed_cache_refuses_use(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    cache.close()
    with pytest.raises(CacheError, match=f"cache {tmp_path} is closed"):
        cache.put_blob(PROFILE)


def test_expected_digest_is_verified(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(CacheIntegrityError,
                       match=f"refusing to cache 3 bytes as {wrong}: content is sha256:"):
        cache.put_blob(b"abc", wrong)
    assert _blobs(tmp_path) == []
    assert cache.put_blob(b"abc", digest_mod.sha256(b"abc")) == digest_mod.sha256(b"abc")


@pytest.mark.parametrize("damage", ["truncate", "replace", "append", "empty"])
def test_damaged_blob_is_never_served(tmp_path: Path, damage: str,
                                      caplog: pytest.LogCaptureFixture) -> None:
    cache = Cache(tmp_path)
    data = b"x" * 5000
    digest = cache.put_blob(data)
    path = cache.blob_path(digest)
    damaged = {"truncate": data[:100], "replace": b"y" * 5000, "append": data + b"!",
               "empty": b""}[damage]
    path.write_bytes(damaged)
    assert cache.get_blob(digest) is None
    assert not path.exists()
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"cached blob {path} is damaged (expected {digest}, content is " \
           f"{digest_mod.sha256(damaged)}, {len(damaged)} bytes)" in line
    assert cache.get_blob(digest) is None  # a plain miss now, no second warning
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    # the refetch path: put again, served again
    assert cache.put_blob(data, digest) == digest
    assert cache.get_blob(digest) == data


def test_damaged_blob_found_after_restart(tmp_path: Path) -> None:
    with Cache(tmp_path) as cache:
        digest = cache.put_blob(PROFILE)
        cache.record("reg/a:v1", digest)
    (tmp_path / "blobs" / "sha256" / digest[7:]).write_bytes(PROFILE[:-1] + b"]")  # one byte off
    with Cache(tmp_path) as cache:
        entry = cache.lookup("reg/a:v1")
        assert entry is not None
        assert cache.get_blob(entry.digest) is None


def test_put_over_a_damaged_file_of_the_same_size_rewrites_it(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    digest = cache.put_blob(PROFILE)
    cache.blob_path(digest).write_bytes(b"z" * len(PROFILE))
    cache.put_blob(PROFILE, digest)  # the refetched copy must replace the bad one
    assert cache.blob_path(digest).read_bytes() == PROFILE
    assert cache.get_blob(digest) == PROFILE


def test_symlink_in_place_of_a_blob_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(PROFILE)  # even with the right content
    root = tmp_path / "cache"
    cache = Cache(root)
    digest = digest_mod.sha256(PROFILE)
    cache.blob_path(digest).symlink_to(outside)
    assert cache.get_blob(digest) is None
    assert not cache.blob_path(digest).is_symlink()
    assert outside.read_bytes() == PROFILE


@pytest.mark.parametrize(
    "content",
    [None, "", "{not json", '{"reg/a:v1": {"digest": "sha256:', "[1,2]", '{"r": 1}',
     '{"r": {"fetched_at": 1}}',
     '{"r": {"digest": "../../etc/passwd", "fetched_at": 1}}',
     '{"r": {"digest": "sha256:' + "a" * 64 + '", "fetched_at": NaN}}'],
    ids=["missing", "empty", "garbage", "truncated", "list", "not-object", "no-digest",
         "traversal", "nan-time"],
)
def test_damaged_index_starts_empty(tmp_path: Path, content: str | None,
                                    caplog: pytest.LogCaptureFixture) -> None:
    cache = Cache(tmp_path)
    digest = cache.put_blob(PROFILE)
    cache.record("reg/a:v1", digest)
    cache.close()
    index = tmp_path / "index.json"
    if content is None:
        index.unlink()
    else:
        index.write_text(content)
    with caplog.at_level(logging.WARNING):
        again = Cache(tmp_path)
    assert f"cache index {index} is" in caplog.text
    assert "starting with an empty index, blobs stay usable by digest" in caplog.text
    assert again.lookup("reg/a:v1") is None
    assert again.get_blob(digest) == PROFILE  # blobs stay usable by digest
    again.record("reg/a:v1", digest)  # and the index is written anew
    again.close()
    assert json.loads(index.read_text())["reg/a:v1"]["digest"] == digest


def test_index_is_the_same_json_document_and_survives_a_restart(tmp_path: Path) -> None:
    """The index is written entry by entry (not by json.dumps over a dict built for
    it): the document is the one json.dumps would give, for any reference text, and a
    new process reads back every entry."""
    refs = ["reg/b:v1", "reg/a@sha256:" + "b" * 64, 'odd "quoted" \\ ref\tx', "réf/ü:v1",
            "127.0.0.1:5000/x/y:v2"]
    with Cache(tmp_path) as cache:
        digest = cache.put_blob(PROFILE)
        for i, ref in enumerate(refs):
            cache.record(ref, digest, fetched_at=1_700_000_000.125 + i)
        expected = {ref: {"digest": e.digest, "fetched_at": e.fetched_at,
                          "last_used": e.last_used}
                    for ref, e in ((r, cache.lookup(r)) for r in refs) if e is not None}
    text = (tmp_path / "index.json").read_text()
    assert json.loads(text) == expected and len(expected) == len(refs)
    assert text.isascii() and text.count("\n") == len(refs) + 2  # an entry per line
    with Cache(tmp_path) as again:
        for ref in refs:
            entry = again.lookup(ref)
            assert entry is not None and entry.digest == digest
            assert entry.fetched_at == expected[ref]["fetched_at"]


def test_index_entries_without_their_blob_are_dropped(tmp_path: Path) -> None:
    with Cache(tmp_path) as cache:
        kept = cache.put_blob(b"kept")
        gone = cache.put_blob(b"gone")
        cache.record("reg/kept:v1", kept)
        cache.record("reg/gone:v1", gone)
    cache.blob_path(gone).unlink()
    with Cache(tmp_path) as cache:
        assert cache.lookup("reg/gone:v1") is None
        assert cache.lookup("reg/kept:v1") is not None
    assert set(json.loads((tmp_path / "index.json").read_text())) == {"reg/kept:v1"}


@pytest.mark.parametrize("bad", ["../../etc/passwd", "sha256:../../x", "sha256:" + "A" * 64,
                                 "sha512:" + "a" * 128, "sha256:" + "a" * 63, "",
                                 "sha256:" + "a" * 64 + "/../x", "sha256:" + "a" * 64 + "\n"])
def test_bad_digests_refused_before_disk(tmp_path: Path, bad: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cache = Cache(tmp_path)

    def no_disk(*args: object, **kwargs: object) -> int:
        raise AssertionError(f"touched the disk: {args}")

    monkeypatch.setattr(os, "open", no_disk)
    with pytest.raises(ValueError, match="not a sha256 digest"):
        cache.get_blob(bad)
    with pytest.raises(ValueError, match="not a sha256 digest"):
        cache.record("r", bad)
    with pytest.raises(ValueError, match="not a sha256 digest"):
        cache.touch(bad)
    with pytest.raises(ValueError, match="not a sha256 digest"):
        cache.put_blob(b"x", bad)
    with pytest.raises(ValueError, match="not a sha256 digest"):
        cache.blob_path(bad)


def test_lru_eviction(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = Cache(tmp_path, max_bytes=3000)
    digests = []
    for i in range(3):
        digests.append(cache.put_blob(bytes([i]) * 1000))
        cache.record(f"r{i}", digests[-1])
        time.sleep(0.01)
    assert cache.total_bytes == 3000
    assert cache.get_blob(digests[0]) is not None  # 0 is now the most recently used
    time.sleep(0.01)
    cache.touch(digests[1])  # then 1; 2 is now the least recently used
    time.sleep(0.01)
    with caplog.at_level(logging.INFO):
        d3 = cache.put_blob(b"z" * 1000)
    assert f"evicted cached profile {digests[2]} (1000 bytes" in caplog.text
    assert "for r2" in caplog.text
    assert cache.get_blob(digests[2]) is None
    assert cache.lookup("r2") is None
    assert not cache.blob_path(digests[2]).exists()
    assert cache.total_bytes == 3000
    for d in (digests[0], digests[1], d3):
        assert cache.get_blob(d) is not None
    cache.close()
    # the eviction reached the index on disk too
    assert set(json.loads((tmp_path / "index.json").read_text())) == {"r0", "r1"}


def test_lru_order_survives_restart(tmp_path: Path) -> None:
    with Cache(tmp_path) as cache:
        old = cache.put_blob(b"a" * 1000)
        time.sleep(0.01)
        new = cache.put_blob(b"b" * 1000)
        time.sleep(0.01)
        assert cache.get_blob(old) is not None  # a hit: old becomes the most recent
    with Cache(tmp_path, max_bytes=2500) as cache:
        cache.put_blob(b"c" * 1000)
        assert cache.blob_path(old).exists()
        assert not cache.blob_path(new).exists()


def test_smaller_limit_evicts_at_open(tmp_path: Path) -> None:
    with Cache(tmp_path) as cache:
        for i in range(5):
            cache.record(f"r{i}", cache.put_blob(bytes([i]) * 1000))
            time.sleep(0.01)
    with Cache(tmp_path, max_bytes=2000) as cache:
        assert cache.total_bytes == 2000
        assert [cache.lookup(f"r{i}") is not None for i in range(5)] == [False] * 3 + [True] * 2
    assert len(_blobs(tmp_path)) == 2


def test_a_blob_over_the_limit_is_kept_until_the_next_put(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    cache = Cache(tmp_path, max_bytes=100)
    big = cache.put_blob(b"b" * 500)
    assert "alone is too big" in caplog.text
    cache.record("reg/big:v1", big)
    assert cache.get_blob(big) == b"b" * 500  # the caller gets to use what it just put
    small = cache.put_blob(b"s" * 10)
    assert cache.get_blob(big) is None and cache.lookup("reg/big:v1") is None
    assert cache.get_blob(small) == b"s" * 10


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
    assert results == [digest_mod.sha256(data)] * 16
    assert cache.get_blob(digest_mod.sha256(data)) == data
    assert not _leftovers(tmp_path)


def test_threads_mixed_with_eviction_never_see_bad_bytes(tmp_path: Path) -> None:
    cache = Cache(tmp_path, max_bytes=64 * 1024)
    payloads = [bytes([i]) * (4096 + i) for i in range(40)]
    digests = [digest_mod.sha256(p) for p in payloads]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                i = rng.randrange(len(payloads))
                op = rng.random()
                if op < 0.4:
                    cache.put_blob(payloads[i], digests[i])
                    cache.record(f"reg/p:{i}", digests[i])
                elif op < 0.9:
                    got = cache.get_blob(digests[i])
                    assert got is None or got == payloads[i]
                else:
                    entry = cache.lookup(f"reg/p:{i}")
                    assert entry is None or entry.digest == digests[i]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert cache.total_bytes <= 64 * 1024
    on_disk = sum(p.stat().st_size for p in _blobs(tmp_path))
    assert on_disk == cache.total_bytes
    assert not _leftovers(tmp_path)


@pytest.mark.integration
def test_second_opener_is_refused_with_the_pid(tmp_path: Path) -> None:
    first = Cache(tmp_path)
    with pytest.raises(CacheLockedError,
                       match=f"cache {tmp_path} is in use by another process "
                             rf"\(pid {os.getpid()}\)"):
        Cache(tmp_path)
    code = ("import pathlib, nri_seccomp.storage.cache as c; "
            f"c.Cache(pathlib.Path({str(tmp_path)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert proc.returncode != 0
    assert "CacheLockedError" in proc.stderr
    assert f"is in use by another process (pid {os.getpid()})" in proc.stderr
    first.close()
    Cache(tmp_path).close()  # released by close


@contextlib.contextmanager
def mounted(path: Path, *args: str) -> Iterator[Path]:
    path.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", *args, str(path)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        # CI runs as root on a machine that allows mounts: a failure here is a failure
        pytest.fail(f"cannot mount here (the tests need root with mount rights): {proc.stderr}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_leaves_no_partial_file(tmp_path: Path) -> None:
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=64k", "tmpfs") as root:
        cache = Cache(root)
        path = root / "blobs" / "sha256" / digest_mod.sha256(b"\0" * 200_000)[7:]
        with pytest.raises(CacheWriteError,
                           match=f"cannot write {path}: No space left on device \\(ENOSPC\\)"):
            cache.put_blob(b"\0" * 200_000)
        assert _blobs(root) == []
        assert not _leftovers(root)
        small = cache.put_blob(b"still works")
        assert cache.get_blob(small) == b"still works"
        cache.record("reg/small:v1", small)
        before = (root / "index.json").read_bytes()
        # fill the disk to the brim, then the index write is what fails
        filler = root / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        with pytest.raises(CacheWriteError, match=f"cannot write {root / 'index.json'}: "
                                                  "No space left on device"):
            cache.record("reg/a:" + "x" * 5000, small)
        assert (root / "index.json").read_bytes() == before
        assert not _leftovers(root)
        cache.close()


@pytest.mark.integration
def test_read_only_disk_serves_verified_blobs_and_refuses_writes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "ro"
    with Cache(root) as cache:
        good = cache.put_blob(PROFILE)
        bad = cache.put_blob(b"will be damaged")
        cache.record("reg/a:v1", good)
    (root / "blobs" / "sha256" / bad[7:]).write_bytes(b"damaged")
    with mounted(root, "--bind", root.as_posix()):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(root)], check=True)
        with Cache(root) as cache:
            assert "is not writable (Read-only file system (EROFS))" in caplog.text
            assert not cache.writable
            entry = cache.lookup("reg/a:v1")
            assert entry is not None and cache.get_blob(entry.digest) == PROFILE
            assert cache.get_blob(bad) is None  # detected, not served, even if not deletable
            with pytest.raises(CacheWriteError, match=rf"cannot write {root}/blobs/sha256/\w+: "
                                                      r"Read-only file system \(EROFS\)"):
                cache.put_blob(b"new")
            with pytest.raises(CacheWriteError, match="Read-only file system"):
                cache.record("reg/b:v1", good)


ACCESS_PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from nri_seccomp.storage.cache import Cache, CacheWriteError
    cache = Cache(Path(sys.argv[1]))
    out = {"writable": cache.writable, "served": cache.get_blob(sys.argv[2]) is not None}
    try:
        cache.put_blob(b"new")
    except CacheWriteError as exc:
        out["error"] = str(exc)
    print(json.dumps(out))
""")


@pytest.mark.integration
def test_permission_denied_is_a_write_error(tmp_path: Path) -> None:
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed to drop root's CAP_DAC_OVERRIDE"
    root = tmp_path / "cache"
    with Cache(root) as cache:
        digest = cache.put_blob(PROFILE)
    for d in (root, root / "blobs" / "sha256"):
        d.chmod(0o555)
    try:
        # root ignores file modes; without these capabilities it gets EACCES like anyone
        proc = subprocess.run(
            [setpriv, "--bounding-set", "-dac_override,-dac_read_search",
             sys.executable, "-c", ACCESS_PROBE, str(root), digest],
            capture_output=True, text=True, check=False,
        )
    finally:
        for d in (root, root / "blobs" / "sha256"):
            d.chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["served"] is True
    assert out["error"].startswith(f"cannot write {root}/blobs/sha256/")
    assert out["error"].endswith("Permission denied (EACCES)")
    assert not _leftovers(root)


WRITER = textwrap.dedent("""
    import os, random, sys
    from pathlib import Path
    from nri_seccomp.storage.cache import Cache
    cache = Cache(Path(sys.argv[1]), max_bytes=8 << 20)
    print("ready", flush=True)
    rng = random.Random(int(sys.argv[2]))
    base = rng.randbytes(4 << 20)
    i = 0
    while True:
        # distinct content each time, cheaply: most of the loop is then the writes
        data = str(i).encode() + base[: rng.randrange(1, 4 << 20)]
        digest = cache.put_blob(data)
        cache.record(f"reg/p:{i % 7}", digest)
        cache.get_blob(digest)
        i += 1
""")


@pytest.mark.integration
def test_sigkill_mid_write_never_leaves_a_partial_blob(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(1234)
    interrupted = 0  # rounds whose kill landed inside a write, leaving a temporary file
    round_ = 0
    # 20 kills at least, and more (bounded) until enough of them hit a write mid-way
    while round_ < 20 or (interrupted < 5 and round_ < 60):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(round_)],
                                stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        interrupted += bool(_leftovers(tmp_path))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            cache = Cache(tmp_path, max_bytes=8 << 20)
        assert not _leftovers(tmp_path), f"round {round_}: leftovers after open"
        assert caplog.records == [], f"round {round_}: {caplog.text}"  # index never damaged
        for path in _blobs(tmp_path):
            assert cache.get_blob("sha256:" + path.name) is not None, \
                f"round {round_}: partial {path}"
        for i in range(7):
            entry = cache.lookup(f"reg/p:{i}")
            if entry is not None:
                assert cache.get_blob(entry.digest) is not None
        assert caplog.records == [], f"round {round_}: {caplog.text}"
        cache.close()
        round_ += 1
    print(f"{interrupted}/{round_} kills interrupted a write")
    assert interrupted >= 5, f"only {interrupted} of {round_} kills landed inside a write"


def test_cache_is_owner_only(tmp_path: Path) -> None:
    """The cache says which references tenants use: 0700 folders, 0600 files, old ones fixed."""
    root = tmp_path / "c"
    (root / "blobs" / "sha256").mkdir(parents=True, mode=0o755)
    root.chmod(0o755)
    with Cache(root) as c:
        digest = c.put_blob(b"profile")
        c.record("r.example/a/b:1", digest)
    modes = {p.relative_to(root).as_posix(): p.stat().st_mode & 0o777
             for p in [root, *root.rglob("*")]}
    for name, mode in modes.items():
        is_dir = (root / name).is_dir() if name != "." else True
        assert mode == (0o700 if is_dir else 0o600), (name, oct(mode))


def test_index_is_bounded_and_forgets_blobs_with_their_references(tmp_path: Path) -> None:
    """One entry per distinct reference a pod author writes must not grow the index for ever."""
    with Cache(tmp_path / "c", max_entries=3) as c:
        digests = []
        for i in range(5):
            digest = c.put_blob(f"profile {i}".encode())
            digests.append(digest)
            c.record(f"r.example/a/p{i}:1", digest)
            time.sleep(0.002)  # distinct last-use times
        assert c.lookup("r.example/a/p0:1") is None and c.lookup("r.example/a/p1:1") is None
        assert c.lookup("r.example/a/p4:1") is not None
        assert c.get_blob(digests[0]) is None and c.get_blob(digests[4]) is not None
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert sorted(index) == [f"r.example/a/p{i}:1" for i in (2, 3, 4)]
    assert len(list((tmp_path / "c" / "blobs" / "sha256").iterdir())) == 3


def test_a_copy_evicted_after_it_was_found_is_written_again(tmp_path: Path) -> None:
    """put_blob finds the blob on disk; before it counts it, another thread evicts it:
    the blob is written again, and what is counted is what is on disk."""
    cache = Cache(tmp_path, max_bytes=64 * 1024)
    data = b"p" * 5000
    digest = digest_mod.sha256(data)
    cache.put_blob(data, digest)
    found_before = cache._holds
    evicted: list[bool] = []

    def found_then_evicted(path: Path, blob: bytes) -> bool:
        found = found_before(path, blob)
        if found and not evicted:
            path.unlink()  # what another thread's eviction does, between look and count
            evicted.append(True)
        return found

    cache._holds = found_then_evicted  # type: ignore[method-assign]
    cache.put_blob(data, digest)
    assert evicted and cache.get_blob(digest) == data
    assert sum(p.stat().st_size for p in _blobs(tmp_path)) == cache.total_bytes == len(data)
