"""`make install`: a runtime under PREFIX that starts with nothing of this checkout.

The plugin is started the way containerd starts it (socket on fd 3), with an
empty environment, its working directory in /tmp, and this checkout (its .venv,
its sources) hidden under an empty tmpfs in a private mount namespace: whatever
the installed plugin needs must come from the installed tree and Debian's python3.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from devtools import driver
from devtools.registry import LocalRegistry

from . import deploy_scenario as scenario
from .plugin_harness import run

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                       reason="needs root and unshare(1) to hide the checkout"),
]

CHECKOUT = driver.CHECKOUT


def make(*args: str) -> None:
    subprocess.run(["make", "-C", str(CHECKOUT), *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def hidden_checkout(argv: list[str]) -> list[str]:
    """``argv`` in a mount namespace where the checkout is an empty directory."""
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs none "{CHECKOUT}" && exec "$0" "$@"', *argv]


async def start(argv: list[str], registry: LocalRegistry, tmp: Path) -> None:
    conn = await driver.spawn_plugin(
        hidden_checkout(argv), env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        checkout_on_path=False, cwd="/tmp",
        config=scenario.config(registry, tmp / "cache"), stderr=asyncio.subprocess.PIPE,
    )
    try:
        await scenario.registers_and_answers(conn, scenario.push(registry))
    finally:
        assert conn.process is not None and conn.process.stderr is not None
        err = asyncio.create_task(conn.process.stderr.read())
        code = await conn.wait_closed()
        log = (await err).decode()
    assert code == 0, log


def test_destdir_staged_tree_runs_on_its_own(tmp_path: Path, registry: LocalRegistry) -> None:
    stage = tmp_path / "stage"
    make("install", f"DESTDIR={stage}", "PREFIX=/opt/nri-seccomp")
    prefix = stage / "opt/nri-seccomp"
    assert (stage / "opt/nri/plugins/10-seccomp-oci").read_text().count(
        "exec /opt/nri-seccomp/bin/nri-seccomp --log-file /var/log/nri-seccomp/nri-seccomp.log")
    assert (stage / "etc/nri/conf.d/10-seccomp-oci.conf").read_text() == (
        CHECKOUT / "config/nri-seccomp.yaml").read_text()
    # the run-time needs only: pinned packages, no test or dev tooling
    installed = {p.name.split("-")[0].lower() for p in (prefix / "lib/python").glob("*.dist-info")}
    assert installed == {"anyio", "certifi", "grpcio", "h11", "httpcore", "httpx", "idna", "pebble",
                         "protobuf", "pyseccomp", "pyyaml", "typing_extensions", "nri_seccomp"}
    assert not any(str(stage) in line for line in (prefix / "bin/nri-seccomp").read_text())
    run(start([str(prefix / "bin/nri-seccomp")], registry, tmp_path))


def test_plugin_entry_as_containerd_runs_it(tmp_path: Path, registry: LocalRegistry) -> None:
    """No DESTDIR: the very file containerd executes, with its rotated log file."""
    root = tmp_path / "root"
    dirs = {"PREFIX": root / "opt/nri-seccomp", "NRI_PLUGIN_DIR": root / "opt/nri/plugins",
            "NRI_CONF_DIR": root / "etc/nri/conf.d", "LOG_DIR": root / "var/log/nri-seccomp"}
    conf = dirs["NRI_CONF_DIR"] / "10-seccomp-oci.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("log_level: debug\n")  # an administrator's file is kept
    make("install", *(f"{k}={v}" for k, v in dirs.items()))
    assert conf.read_text() == "log_level: debug\n"
    run(start([str(dirs["NRI_PLUGIN_DIR"] / "10-seccomp-oci")], registry, tmp_path))
    log = (dirs["LOG_DIR"] / "nri-seccomp.log").read_text()
    # the Configure line and the annotation's line land in the file, not on lost stderr
    assert "seccomp adjustment applied" in log and "deploy/profile" in log, log
    make("uninstall", *(f"{k}={v}" for k, v in dirs.items()))
    assert not dirs["PREFIX"].exists()
    assert not (dirs["NRI_PLUGIN_DIR"] / "10-seccomp-oci").exists()
    assert conf.exists()  # configuration, logs and cache stay
