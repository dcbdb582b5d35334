"""config/containerd-nri.toml, the NRI section README's host walkthrough says to merge
into containerd's config.toml: parsed as TOML and checked against what the rest of the
project assumes (the Makefile's install directories, the unit's socket, the plugin's
registered name, the DaemonSet's containerd drop-in)."""

from __future__ import annotations

import re
import shlex
import tomllib
from typing import Any

from devtools import driver
from nri_seccomp.nri import stub

CHECKOUT = driver.CHECKOUT
NRI = "io.containerd.nri.v1.nri"


def _nri(path: str) -> dict[str, Any]:
    with open(CHECKOUT / path, "rb") as f:
        section: dict[str, Any] = tomllib.load(f)["plugins"][NRI]
    return section


def _make_default(name: str) -> str:
    found = re.search(rf"^{name} \?= (\S+)$", (CHECKOUT / "Makefile").read_text(), re.M)
    assert found is not None, name
    return found.group(1)


def _unit_argument(flag: str) -> str:
    unit = (CHECKOUT / "packaging/nri-seccomp.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M)
    assert exec_start is not None
    argv = shlex.split(exec_start.group(1))
    return argv[argv.index(flag) + 1]


def test_host_snippet_enables_nri_where_make_install_puts_the_plugin() -> None:
    nri = _nri("config/containerd-nri.toml")
    assert nri["disable"] is False
    assert nri["plugin_path"] == _make_default("NRI_PLUGIN_DIR")
    assert nri["plugin_config_path"] == _make_default("NRI_CONF_DIR")
    # the entry's file name is <idx>-<name>, and its configuration <idx>-<name>.conf
    makefile = (CHECKOUT / "Makefile").read_text()
    assert "$(DESTDIR)$(NRI_PLUGIN_DIR)/10-seccomp-oci\n" in makefile
    assert "$(DESTDIR)$(NRI_CONF_DIR)/10-seccomp-oci.conf" in makefile


def test_host_snippet_socket_is_the_one_the_unit_dials() -> None:
    nri = _nri("config/containerd-nri.toml")
    assert nri["socket_path"] == _unit_argument("--socket") == stub.DEFAULT_SOCKET_PATH


def test_validator_requires_the_plugin_by_its_registered_name() -> None:
    validator = _nri("config/containerd-nri.toml")["default_validator"]
    assert validator["enable"] is True
    assert validator["reject_runtime_default_seccomp_adjustment"] is True
    assert validator["reject_custom_seccomp_adjustment"] is True
    # NRI names a pre-installed plugin after its file, 10-seccomp-oci -> seccomp-oci; the
    # external one registers with --name's default (tests/deploy_scenario.py checks it)
    assert validator["required_plugins"] == ["seccomp-oci"]
    assert validator["tolerate_missing_plugins_annotation"]


def test_host_snippet_and_daemonset_drop_in_agree() -> None:
    host, node = _nri("config/containerd-nri.toml"), _nri("deploy/containerd-nri-validator.toml")
    for key in ("disable", "socket_path", "plugin_registration_timeout", "plugin_request_timeout"):
        assert host[key] == node[key], key
    assert host["default_validator"] == node["default_validator"]
    # the DaemonSet's own pod carries that annotation key, or it could never be created
    annotation = node["default_validator"]["tolerate_missing_plugins_annotation"]
    daemonset = (CHECKOUT / "deploy/daemonset.yaml").read_text()
    assert re.search(rf"^\s+{re.escape(annotation)}: \"true\"$", daemonset, re.M), annotation
