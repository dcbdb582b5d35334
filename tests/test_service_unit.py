"""packaging/nri-seccomp.service: what `make install-service` writes, checked by systemd's
own tools offline (systemd is not PID 1 here, so the unit is not started)."""

from __future__ import annotations

import configparser
import os
import re
import subprocess
from pathlib import Path

import pytest

from devtools import driver

UNIT = driver.CHECKOUT / "packaging/nri-seccomp.service"


def _service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser["Service"]


def test_unit_runs_the_external_plugin_and_restarts_it() -> None:
    svc = _service()
    assert svc["ExecStart"] == ("/opt/nri-seccomp/bin/nri-seccomp --external --socket "
                                "/var/run/nri/nri.sock --config /etc/nri-seccomp/config.yaml")
    assert (svc["Restart"], svc["RestartSec"]) == ("always", "1")
    # what the plugin needs survives the hardening: its cache dir is writable,
    # AF_UNIX reaches the NRI socket, processes can be forked for the workers
    assert svc["StateDirectory"] == "nri-seccomp" and svc["ProtectSystem"] == "strict"
    assert set(svc["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert int(svc["TasksMax"]) >= 16
    default_cache = (driver.CHECKOUT / "config/nri-seccomp.yaml").read_text()
    assert re.search(r"^cache_dir: /var/lib/nri-seccomp/", default_cache, re.M)


@pytest.mark.integration
@pytest.mark.parametrize("source", ["venv", "bundle"])
def test_installed_unit_verifies(source: str, tmp_path: Path,
                                 request: pytest.FixtureRequest) -> None:
    if source == "bundle":
        request.getfixturevalue("bundle")  # `make bundle`: install never builds it
    stage = tmp_path / "stage"
    subprocess.run(["make", "-C", str(driver.CHECKOUT), "install-service", f"DESTDIR={stage}",
                    f"FROM={source}"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    unit = (stage / "etc/systemd/system/nri-seccomp.service").read_text()
    assert (stage / "etc/nri-seccomp/config.yaml").exists()
    assert not (stage / "opt/nri/plugins/10-seccomp-oci").exists()  # one mode at a time
    # the same ExecStart for either runtime, and its program is in the staged tree
    exec_start = re.search(r"^ExecStart=(\S+)", unit, re.M)
    assert exec_start is not None and exec_start.group(1) == "/opt/nri-seccomp/bin/nri-seccomp"
    program = stage / exec_start.group(1).lstrip("/")
    assert program.is_file() and os.access(program, os.X_OK)
    if source == "bundle":
        assert program.resolve() == stage / "opt/nri-seccomp/bundle/nri-seccomp"
        assert not (stage / "opt/nri-seccomp/lib").exists()
    else:
        assert program.read_text().startswith("#!/usr/bin/python3")
        assert not (stage / "opt/nri-seccomp/bundle").exists()
    # verify needs the executable where ExecStart says: point it at the staged tree
    staged = tmp_path / "nri-seccomp.service"
    staged.write_text(unit.replace("/opt/nri-seccomp/bin", f"{stage}/opt/nri-seccomp/bin"))
    verify = subprocess.run(["systemd-analyze", "verify", str(staged)],
                            capture_output=True, text=True)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(staged)],
                              capture_output=True, text=True)
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert level is not None and float(level.group(1)) <= 3.0, security.stdout
