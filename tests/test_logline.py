"""Decision lines: batched per loop iteration, bounded, rotated by counted size."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nri_seccomp import logline
from nri_seccomp.bounded import LINE_FORMAT, BoundedFormatter

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) [\w.]+: .*$")


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


@pytest.fixture
def only_handler() -> Iterator[tuple[logline.LineHandler, CountingStream]]:
    """The root logger with our handler alone, as the plugin's command line sets it."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = CountingStream()
    handler = logline.LineHandler(stream)
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield handler, stream
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_lines_of_one_loop_iteration_are_one_write(only_handler) -> None:
    _, stream = only_handler
    log = logging.getLogger("nri_seccomp.test_logline")

    async def burst() -> int:
        for i in range(50):
            logline.decision(log, f"applying profile {i}")
        log.warning("a record among them")
        written_before_the_loop_turned = stream.writes
        await asyncio.sleep(0)
        return written_before_the_loop_turned

    assert asyncio.run(burst()) == 0
    lines = stream.getvalue().splitlines()
    assert stream.writes == 1 and len(lines) == 51
    assert all(LINE.match(line) for line in lines), lines[:2]
    assert lines[0].endswith("INFO nri_seccomp.test_logline: applying profile 0")
    assert lines[-1].endswith("WARNING nri_seccomp.test_logline: a record among them")


def test_without_a_loop_a_line_is_written_at_once(only_handler) -> None:
    _, stream = only_handler
    log = logging.getLogger("nri_seccomp.test_logline")
    done = threading.Event()

    def worker() -> None:
        log.info("from a thread")
        done.set()

    threading.Thread(target=worker).start()
    assert done.wait(5)
    assert stream.getvalue().endswith("from a thread\n")


def test_decision_line_is_the_formatters_line(only_handler) -> None:
    handler, _ = only_handler
    text = handler.line("INFO", "nri_seccomp.x", "forged\nline " + "y" * 5000)
    record = logging.LogRecord("nri_seccomp.x", logging.INFO, "", 0, "%s",
                               ("forged\nline " + "y" * 5000,), None)
    expected = BoundedFormatter(LINE_FORMAT).format(record)
    # the same text but for the milliseconds of the time stamp
    assert text.split(" ", 2)[2] == expected.split(" ", 2)[2]
    assert "\n" not in text and len(text) < 4200


def test_decision_goes_through_records_when_others_listen(
    only_handler, caplog: pytest.LogCaptureFixture
) -> None:
    _, stream = only_handler
    log = logging.getLogger("nri_seccomp.test_logline")
    with caplog.at_level(logging.INFO):
        logline.decision(log, "applying profile p")
    assert [r.getMessage() for r in caplog.records] == ["applying profile p"]
    # and our handler still has its line
    logging.getLogger().handlers[0].flush()
    assert stream.getvalue().endswith("applying profile p\n")


def test_decision_respects_the_level(only_handler) -> None:
    _, stream = only_handler
    log = logging.getLogger("nri_seccomp.test_logline_quiet")
    log.setLevel(logging.WARNING)
    logline.decision(log, "applying profile p")
    assert stream.getvalue() == ""


def test_rotating_file_counts_what_it_writes(tmp_path: Path) -> None:
    path = tmp_path / "plugin.log"
    handler = logline.RotatingLineHandler(str(path), max_bytes=4096, backups=2)

    async def many() -> None:
        for i in range(300):
            handler.line("INFO", "nri_seccomp.x", f"record {i} " + "x" * 100)
        await asyncio.sleep(0)

    asyncio.run(many())
    handler.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["plugin.log", "plugin.log.1", "plugin.log.2"]
    assert all((tmp_path / f).stat().st_size <= 4096 for f in files)
    assert "record 299 " in path.read_text()
    # whole lines only: every file starts with a time stamp
    assert all(LINE.match((tmp_path / f).read_text().splitlines()[0]) for f in files)


def test_lines_from_the_loop_and_from_threads_are_each_written_once(only_handler) -> None:
    """The loop's thread adds decision lines without the handler's lock while other
    threads log records (and write at once): no line is lost or written twice."""
    _, stream = only_handler
    log = logging.getLogger("nri_seccomp.test_logline")
    n = 2000

    def worker(k: int) -> None:
        for i in range(n):
            log.info("thread %d record %d", k, i)

    async def loop_lines() -> None:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for i in range(n):
            logline.decision(log, f"loop {i}", "decision ")
            if i % 16 == 15:
                await asyncio.sleep(0)
        for t in threads:
            t.join()
        await asyncio.sleep(0)

    asyncio.run(loop_lines())
    lines = stream.getvalue().splitlines()
    assert all(LINE.match(line) for line in lines)
    bodies = [line.split(": ", 1)[1] for line in lines]
    assert sorted(bodies) == sorted([f"decision loop {i}" for i in range(n)]
                                    + [f"thread {k} record {i}" for k in range(3)
                                       for i in range(n)])
    # the loop's own lines keep their order
    mine = [b for b in bodies if b.startswith("decision")]
    assert mine == [f"decision loop {i}" for i in range(n)]


def test_clean_head_is_trusted_and_the_rest_is_cleaned(only_handler) -> None:
    handler, _ = only_handler
    text = handler.line("INFO", "nri_seccomp.x", "pod\nname", "fixed part: ")
    assert text.endswith("INFO nri_seccomp.x: fixed part: pod\\nname")
