"""`make install`: a runtime under PREFIX that starts with nothing of this checkout.

The plugin is started the way containerd starts it (socket on fd 3), with an
empty environment, its working directory in /tmp, and this checkout (its .venv,
its sources) hidden under an empty tmpfs in a private mount namespace: whatever
the installed plugin needs must come from the installed tree and Debian's python3
(FROM=venv) or from the installed tree alone (FROM=bundle: no Python on PATH, the
system's Python libraries hidden too).
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
import sys
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


SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def make(*args: str, path: str | None = None) -> None:
    env = None if path is None else {"PATH": path}
    proc = subprocess.run(["make", "-C", str(CHECKOUT), *args], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, proc.stderr


def tools(bin_dir: Path, *names: str) -> str:
    """A PATH holding only ``names`` (links to the system's), and no Python."""
    bin_dir.mkdir()
    for name in names:
        found = shutil.which(name, path=SYSTEM_PATH)
        assert found is not None, name
        (bin_dir / name).symlink_to(found)
    assert not any(shutil.which(py, path=str(bin_dir)) for py in ("python", "python3"))
    return str(bin_dir)


def hidden_checkout(argv: list[str], setup: str = "") -> list[str]:
    """``argv`` in a mount namespace where the checkout is an empty directory (after the
    shell commands ``setup``, which end with ``&&``)."""
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f'{setup}mount -t tmpfs none "{CHECKOUT}" && exec "$0" "$@"', *argv]


async def start(argv: list[str], registry: LocalRegistry, tmp: Path, *,
                path: str = SYSTEM_PATH, setup: str = "") -> None:
    conn = await driver.spawn_plugin(
        hidden_checkout(argv, setup), env={"PATH": path},
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


def python_libraries() -> list[Path]:
    """Where the system's Pythons keep their standard libraries (Debian's, /usr/local's
    and the one running these tests)."""
    found = {Path(p) for pattern in ("/usr/lib/python3*", "/usr/local/lib/python3*")
             for p in glob.glob(pattern)}
    found.add(Path(sys.base_prefix) / "lib")
    return sorted(p for p in found if p.is_dir() and not p.is_symlink())


def test_bundle_staged_and_run_without_python(bundle: Path, tmp_path: Path,
                                              registry: LocalRegistry) -> None:
    """`make install FROM=bundle DESTDIR=...` with no Python on make's PATH, then the staged
    tree put where it says (a bind mount of the stage's /opt and /var/log in the
    plugin's mount namespace) and the plugin entry started as containerd starts it, with
    no Python on PATH, no PYTHONPATH and the system's Python libraries hidden."""
    stage = tmp_path / "stage"
    path = tools(tmp_path / "bin", "make", "sh", "sed", "install", "cp", "ln", "rm", "chmod",
                 "find", "mount", "unshare")
    make("install", "FROM=bundle", f"DESTDIR={stage}", path=path)
    prefix = stage / "opt/nri-seccomp"
    # bin/nri-seccomp, the path the entry and the unit name, is the bundle's executable
    assert os.readlink(prefix / "bin/nri-seccomp") == "../bundle/nri-seccomp"
    assert (prefix / "bin/nri-seccomp").resolve() == (prefix / "bundle/nri-seccomp")
    assert sorted(p.name for p in prefix.iterdir()) == ["bin", "bundle", "share"]
    assert (prefix / "share/nri-seccomp.yaml").exists()
    entry = stage / "opt/nri/plugins/10-seccomp-oci"
    assert "exec /opt/nri-seccomp/bin/nri-seccomp --log-file " in entry.read_text()

    overlay = "".join(f'mount -t tmpfs none "{lib}" && ' for lib in python_libraries())
    overlay += (f'mount --bind "{stage}/opt" /opt && '
                f'mount --bind "{stage}/var/log" /var/log && ')
    run(start(["/opt/nri/plugins/10-seccomp-oci"], registry, tmp_path, path=path, setup=overlay))
    log = (stage / "var/log/nri-seccomp/nri-seccomp.log").read_text()
    # the profile was compiled by the frozen fork server's worker and applied
    assert "seccomp adjustment applied" in log and "deploy/profile" in log, log

    make("uninstall", f"DESTDIR={stage}", path=path)
    assert not prefix.exists() and not entry.exists()
    assert (stage / "etc/nri/conf.d/10-seccomp-oci.conf").exists()


def test_switching_runtime_leaves_no_other(bundle: Path, tmp_path: Path) -> None:
    """FROM=venv over FROM=bundle and back: one runtime under PREFIX, never both, and
    bin/nri-seccomp never written through the old symlink into the bundle."""
    stage = tmp_path / "stage"
    make("install-runtime", "FROM=bundle", f"DESTDIR={stage}")
    prefix = stage / "opt/nri-seccomp"
    make("install-runtime", f"DESTDIR={stage}")
    assert not (prefix / "bundle").exists() and (prefix / "lib/python").is_dir()
    assert not (prefix / "bin/nri-seccomp").is_symlink()
    make("install-runtime", "FROM=bundle", f"DESTDIR={stage}")
    assert not (prefix / "lib/python").exists()
    assert not (prefix / "share/requirements.lock").exists()
    assert (prefix / "bin/nri-seccomp").resolve() == prefix / "bundle/nri-seccomp"
