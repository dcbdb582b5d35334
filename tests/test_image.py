"""The container image (`make image`) run by a real OCI runtime, runc, as the DaemonSet
runs it: an external plugin dialling the runtime's NRI socket.

The archive is unpacked as a node would (``umoci unpack`` into a runtime bundle), and
the bundle's config.json is given what the kubelet and containerd would give it from
deploy/daemonset.yaml: uid 0 with no capabilities, no new privileges, a read-only root,
the socket directory, the configuration, the cache and in-memory /run/nri-seccomp and
/tmp mounted. Only the network namespace is the host's (the test registry is on
127.0.0.1; on a node the pod has its own network). The runtime side is
``devtools.driver``'s listener; the profile comes from a real registry.

Not run here: containerd, the kubelet, kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools import driver, image
from devtools.registry import LocalRegistry

from . import deploy_scenario as scenario
from .plugin_harness import base_config, run

pytestmark = pytest.mark.integration  # umoci, runc, a registry, the plugin

DAEMONSET = driver.CHECKOUT / "deploy/daemonset.yaml"


def daemonset_container() -> dict[str, Any]:
    ds = yaml.safe_load(DAEMONSET.read_text())
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def unpack(archive: Path, work: Path) -> Path:
    """The archive as a node's runtime gets it: the image named in index.json, unpacked
    into an OCI runtime bundle (rootfs/ and config.json from the image's config)."""
    bundle = image.unpack(archive, work)
    index = json.loads((work / "oci/index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["annotations"] == {
        "org.opencontainers.image.ref.name": image.version(),
        "io.containerd.image.name": image.reference(),
    }
    return bundle


def as_the_daemonset_runs_it(spec: dict[str, Any], host: dict[str, Path]) -> None:
    """config.json edited as deploy/daemonset.yaml's pod would be created."""
    container = daemonset_container()
    sc = container["securityContext"]
    pod_sc = yaml.safe_load(DAEMONSET.read_text())["spec"]["template"]["spec"][
        "securityContext"]
    proc = spec["process"]
    proc["terminal"] = False
    proc["args"] = [proc["args"][0], *container["args"]]
    proc["user"] = {"uid": pod_sc["runAsUser"], "gid": pod_sc["runAsGroup"]}
    assert sc["capabilities"] == {"drop": ["ALL"]}
    proc["capabilities"] = {k: [] for k in
                            ("bounding", "effective", "inheritable", "permitted", "ambient")}
    proc["noNewPrivileges"] = not sc["allowPrivilegeEscalation"]
    spec["root"]["readonly"] = sc["readOnlyRootFilesystem"]
    # the host's network: the registry listens on 127.0.0.1
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"]
                                   if n["type"] != "network"]
    volumes = {m["mountPath"]: m for m in container["volumeMounts"]}
    for path, source in (("/var/run/nri", host["nri"]), ("/etc/nri-seccomp", host["config"]),
                         ("/var/lib/nri-seccomp", host["cache"])):
        ro = "ro" if volumes[path].get("readOnly") else "rw"
        spec["mounts"].append({"destination": path, "type": "bind", "source": str(source),
                               "options": ["rbind", ro]})
    for path in ("/run/nri-seccomp", "/tmp"):  # emptyDir, medium Memory
        assert path in volumes
        spec["mounts"].append({"destination": path, "type": "tmpfs", "source": "tmpfs",
                               "options": ["nosuid", "nodev", "mode=1777"]})


class Runc:
    """runc with its state under the test's directory, one container."""

    def __init__(self, state: Path, container_id: str) -> None:
        self.state, self.id = state, container_id

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runc", "--root", str(self.state), *args], capture_output=True,
                              text=True, check=check, timeout=30)

    def status(self) -> dict[str, Any]:
        out = self("state", self.id, check=False)
        if out.returncode:
            return {"status": "gone"}
        state = json.loads(out.stdout)
        assert isinstance(state, dict)
        return state

    def probe(self) -> int:
        """The DaemonSet's liveness/readiness command, executed in the container."""
        command = daemonset_container()["livenessProbe"]["exec"]["command"]
        return self("exec", self.id, *command, check=False).returncode

    def remove(self) -> None:
        self("kill", self.id, "KILL", check=False)
        self("delete", "--force", self.id, check=False)


@contextlib.contextmanager
def started(runc: Runc, bundle: Path, log: Path) -> Iterator[int]:
    """``runc run -d``: the container's stdout and stderr go to ``log``; yields its pid."""
    try:
        with log.open("wb") as out:
            subprocess.run(["runc", "--root", str(runc.state), "run", "--detach", "--bundle",
                            str(bundle), runc.id], stdin=subprocess.DEVNULL, stdout=out,
                           stderr=out, check=True, timeout=60)
        yield int(runc.status()["pid"])
    finally:
        runc.remove()


def status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def prepared(archive: Path, work: Path, registry: LocalRegistry) -> tuple[Path, dict[str, Path]]:
    """The unpacked image, its config.json as the DaemonSet's pod, the host's directories
    (the NRI socket's directory root's only, 0700, as containerd creates it)."""
    bundle = unpack(archive, work)
    spec = json.loads((bundle / "config.json").read_text())
    # the image's own defaults: non-root, the DaemonSet's arguments, the bundle's program
    assert spec["process"]["user"] == {"uid": image.USER, "gid": image.USER}
    assert spec["process"]["args"] == [image.ENTRYPOINT, *daemonset_container()["args"]]
    # besides the bundle: the C library's files, the probes' `test`, configuration
    rootfs = bundle / "rootfs"
    files = {p.relative_to(rootfs).as_posix() for p in rootfs.rglob("*")
             if not p.is_dir() and not p.is_relative_to(rootfs / image.PREFIX.lstrip("/"))}
    libs = {f for f in files if f.startswith(("lib/", "lib64/"))}
    assert files - libs == {"usr/bin/test", "etc/passwd", "etc/group",
                            "etc/nri-seccomp/config.yaml"}
    assert all(re.search(r"/(libc|libm|libdl|libpthread|librt|libutil|libz|ld-linux-x86-64)"
                         r"[.-]so", "/" + lib) for lib in libs), libs

    host = {name: work / name for name in ("nri", "config", "cache")}
    for path in host.values():
        path.mkdir()
    host["nri"].chmod(0o700)
    (host["config"] / "config.yaml").write_text(
        base_config(Path("/var/lib/nri-seccomp/cache"), registry.address))
    as_the_daemonset_runs_it(spec, host)
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle, host


def test_image_under_runc_as_external_plugin(image_archive: Path, tmp_path: Path,
                                             registry: LocalRegistry) -> None:
    bundle, host = prepared(image_archive, tmp_path, registry)
    runc = Runc(tmp_path / "runc", f"nri-seccomp-test-{os.getpid()}")
    log = tmp_path / "container.log"
    reference = scenario.push(registry, "image/p")

    async def scenario_run() -> dict[str, str]:
        listener = driver.ExternalListener(str(host["nri"] / "nri.sock"))
        await listener.start()
        try:
            with started(runc, bundle, log) as pid:
                conn = await asyncio.wait_for(listener.connections.get(), 30)
                await scenario.registers_and_answers(conn, reference)
                proc = status_fields(pid)
                # registered: the probe command succeeds in the container
                assert await asyncio.to_thread(runc.probe) == 0
                # the runtime goes away: the ready file with it, the probe fails
                await listener.stop()
                conn.close("runtime stopping")
                for _ in range(100):
                    if await asyncio.to_thread(runc.probe) != 0:
                        break
                    await asyncio.sleep(0.05)
                assert await asyncio.to_thread(runc.probe) != 0
                # a stop as the kubelet's: SIGTERM, the container gone well within
                # terminationGracePeriodSeconds
                t0 = time.monotonic()
                runc("kill", runc.id, "TERM")
                grace = yaml.safe_load(DAEMONSET.read_text())["spec"]["template"]["spec"][
                    "terminationGracePeriodSeconds"]
                while runc.status()["status"] != "stopped":
                    assert time.monotonic() - t0 < grace, "SIGTERM did not stop it"
                    await asyncio.sleep(0.1)
                return proc
        finally:
            await listener.stop()

    proc = run(scenario_run(), timeout=120)
    text = log.read_text(errors="replace")
    assert "applying seccomp profile" in text, text
    # runAsUser 0, as the DaemonSet sets it (the NRI socket's directory is root's only),
    # with no capabilities at all and no way to gain privileges
    assert proc["Uid"].split() == ["0"] * 4 and proc["Gid"].split() == ["0"] * 4
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(proc[caps], 16) == 0, (caps, proc[caps])
    assert proc["NoNewPrivs"] == "1"
    # the profile was fetched into the cache on the host's directory
    assert any((host["cache"] / "cache").rglob("*"))
    assert runc.status()["status"] == "gone"


def test_image_default_user_cannot_reach_the_socket(image_archive: Path, tmp_path: Path,
                                                    registry: LocalRegistry) -> None:
    """Why the DaemonSet sets runAsUser 0: the image's own user (65532) cannot reach a
    socket in a directory only root may enter, as containerd's /var/run/nri is."""
    bundle, host = prepared(image_archive, tmp_path, registry)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["user"] = {"uid": image.USER, "gid": image.USER}
    (bundle / "config.json").write_text(json.dumps(spec))
    runc = Runc(tmp_path / "runc", f"nri-seccomp-test-{os.getpid()}-nonroot")
    log = tmp_path / "container.log"

    async def scenario_run() -> None:
        listener = driver.ExternalListener(str(host["nri"] / "nri.sock"))
        await listener.start()
        try:
            with started(runc, bundle, log):
                for _ in range(100):
                    if "Permission denied" in log.read_text(errors="replace"):
                        break
                    await asyncio.sleep(0.1)
                assert listener.connections.empty()
                assert runc.status()["status"] == "running"  # and dialling again
        finally:
            await listener.stop()

    run(scenario_run(), timeout=60)
    text = log.read_text(errors="replace")
    assert "/var/run/nri/nri.sock unavailable (Permission denied)" in text, text
