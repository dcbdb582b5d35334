"""--log-file and --log-syslog: where the plugin's log lands when nobody keeps its stderr."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from nri_seccomp import cli


def _logger(handler: logging.Handler) -> logging.Logger:
    log = logging.getLogger(f"test-log-options-{id(handler)}")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    return log


def test_log_file_is_written_one_line_per_record(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "nri-seccomp.log"  # the directory is created
    args = cli._parser().parse_args(["--log-file", str(path)])
    handler = cli.log_handler(args)
    _logger(handler).warning("from a registry: %s", "line1\nforged 2026 ERROR x")
    handler.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and "WARNING" in lines[0] and "forged" in lines[0]


def test_log_file_is_rotated_and_bounded(tmp_path: Path) -> None:
    path = tmp_path / "plugin.log"
    args = cli._parser().parse_args(["--log-file", str(path), "--log-file-bytes", "4096"])
    handler = cli.log_handler(args)
    log = _logger(handler)
    for i in range(2000):
        log.info("record %d %s", i, "x" * 200)
    handler.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["plugin.log", "plugin.log.1", "plugin.log.2", "plugin.log.3"]
    assert all(f.stat().st_size <= 4096 for f in files)
    assert "record 1999" in path.read_text()


def test_log_syslog_sends_datagrams_with_ident(tmp_path: Path) -> None:
    address = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(address)
        server.settimeout(5)
        args = cli._parser().parse_args(["--log-syslog", address])
        handler = cli.log_handler(args)
        _logger(handler).error("refused %s", "ref")
        handler.close()
        message = server.recv(4096).decode()
    # <facility*8 + severity>: daemon (3) and error (3)
    assert message.startswith("<27>nri-seccomp[")
    assert ": ERROR test-log-options-" in message
    assert message.rstrip("\x00").endswith(": refused ref")


def test_log_syslog_default_socket_is_dev_log() -> None:
    args = cli._parser().parse_args(["--log-syslog"])
    assert args.log_syslog == "/dev/log"
    assert cli._parser().parse_args([]).log_syslog is None
