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
    # the pod sets args alone: the image's entrypoint (tini, then the plugin) stays
    proc["args"] = [*proc["args"][:len(image.ENTRYPOINT)], *container["args"]]
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
    # certs.d as on a node without hosts.toml files: empty (DirectoryOrCreate)
    for path, source in (("/var/run/nri", host["nri"]), ("/etc/nri-seccomp", host["config"]),
                         ("/var/lib/nri-seccomp", host["cache"]),
                         ("/etc/containerd/certs.d", host["certs.d"])):
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
    # the image's own defaults: non-root, tini running the bundle's program, the
    # DaemonSet's arguments
    assert spec["process"]["user"] == {"uid": image.USER, "gid": image.USER}
    assert image.ENTRYPOINT == ["/sbin/tini", "--", image.PROGRAM]
    assert spec["process"]["args"] == [*image.ENTRYPOINT, *daemonset_container()["args"]]
    # besides the bundle: the C library's files, tini, the probes' `test`, configuration
    rootfs = bundle / "rootfs"
    files = {p.relative_to(rootfs).as_posix() for p in rootfs.rglob("*")
             if not p.is_dir() and not p.is_relative_to(rootfs / image.PREFIX.lstrip("/"))}
    libs = {f for f in files if f.startswith(("lib/", "lib64/"))}
    assert files - libs == {"sbin/tini", "usr/bin/test", "etc/passwd", "etc/group",
                            "etc/nri-seccomp/config.yaml"}
    # tini is the static build: it adds no library to the image
    assert (rootfs / "sbin/tini").read_bytes() == Path(image.INIT_SOURCE).read_bytes()
    assert all(re.search(r"/(libc|libm|libdl|libpthread|librt|libutil|libz|ld-linux-x86-64)"
                         r"[.-]so", "/" + lib) for lib in libs), libs

    host = {name: work / name for name in ("nri", "config", "cache", "certs.d")}
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


# ---------------------------------------------------------------------------
# tini as PID 1: the plugin its child, orphans reaped, SIGTERM forwarded


def process_table() -> dict[int, dict[str, str]]:
    """Every process's /proc/PID/status, zombies included (their status stays readable
    until they are reaped; their namespace links do not)."""
    table: dict[int, dict[str, str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                table[int(entry.name)] = status_fields(int(entry.name))
    return table


def container_processes(init: int) -> dict[int, dict[str, str]]:
    """``init`` and its descendants (host pids): the container's PID namespace, as
    every orphan in it is re-parented to ``init``."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, fields in table.items():
        children.setdefault(int(fields.get("PPid", "0")), []).append(pid)
    out, todo = {}, [init]
    while todo:
        pid = todo.pop()
        if pid in table:
            out[pid] = table[pid]
            todo += children.get(pid, [])
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def zombies(init: int) -> dict[int, str]:
    """The container's zombies: pid → "name (parent pid)"."""
    return {pid: f"{f['Name']} (parent {f['PPid']})"
            for pid, f in container_processes(init).items() if f["State"].startswith("Z")}


async def no_zombie_stays(init: int, within: float = 2.0, parent: int | None = None) -> None:
    """Zombies may appear (a process just ended); none (none of ``parent``'s) may stay
    longer than ``within``."""
    seen: dict[int, float] = {}
    end = time.monotonic() + within + 1.0
    while time.monotonic() < end:
        now = time.monotonic()
        current = {pid: what for pid, what in zombies(init).items()
                   if parent is None or what.endswith(f"(parent {parent})")}
        seen = {pid: seen.get(pid, now) for pid in current}
        stuck = {pid: current[pid] for pid, t in seen.items() if now - t > within}
        assert not stuck, f"zombies not reaped (PID 1 is {init}): {stuck}"
        await asyncio.sleep(0.1)


@contextlib.contextmanager
def running(runc: Runc, bundle: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``runc run`` in the foreground: its exit status is the container's (tini's, so
    the plugin's)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(["runc", "--root", str(runc.state), "run", "--bundle",
                                 str(bundle), runc.id], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out)
    try:
        yield proc
    finally:
        runc.remove()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.returncode is None:
            proc.kill()
            proc.wait()


#: a second profile, different bytes from the scenario's: its compile needs a worker
OTHER_PROFILE = json.dumps({
    "defaultAction": "SCMP_ACT_ALLOW",
    "syscalls": [{"names": ["rmdir"], "action": "SCMP_ACT_ERRNO"}],
}).encode()


def test_tini_is_pid_1_reaps_orphans_and_forwards_sigterm(
        image_archive: Path, tmp_path: Path, registry: LocalRegistry) -> None:
    """tini is PID 1 with the plugin as its child. The compile workers' fork server is
    killed from outside (SIGKILL): its workers are orphaned, re-parented to PID 1, and
    nothing in the container stays a zombie; profiles are still compiled. SIGTERM to
    the container (what the kubelet sends) reaches the plugin through tini: exit status
    0, ready file removed, within a few seconds."""
    bundle, host = prepared(image_archive, tmp_path, registry)
    # the ready file on a host directory (not the pod's emptyDir) to see it go
    host["run"] = tmp_path / "run"
    host["run"].mkdir()
    spec = json.loads((bundle / "config.json").read_text())
    spec["mounts"] = [m for m in spec["mounts"] if m["destination"] != "/run/nri-seccomp"]
    spec["mounts"].append({"destination": "/run/nri-seccomp", "type": "bind",
                           "source": str(host["run"]), "options": ["rbind", "rw"]})
    (bundle / "config.json").write_text(json.dumps(spec))
    runc = Runc(tmp_path / "runc", f"nri-seccomp-test-{os.getpid()}-tini")
    log = tmp_path / "container.log"
    reference = scenario.push(registry, "image/tini")
    registry.push_profile("image/tini-other", "v1", OTHER_PROFILE)
    other = f"{registry.address}/image/tini-other:v1"
    found: dict[str, Any] = {}

    async def scenario_run() -> int:
        listener = driver.ExternalListener(str(host["nri"] / "nri.sock"))
        await listener.start()
        try:
            with running(runc, bundle, log) as proc:
                conn = await asyncio.wait_for(listener.connections.get(), 30)
                await scenario.registers_and_answers(conn, reference)
                init = int(runc.status()["pid"])
                procs = container_processes(init)
                found["init"] = procs[init]
                found["init_cmdline"] = cmdline(init)
                (plugin,) = [p for p, f in procs.items() if int(f["PPid"]) == init]
                found["plugin_cmdline"] = cmdline(plugin)
                # multiprocessing's fork server: the plugin's child, parent of the workers
                servers = [p for p, f in procs.items() if int(f["PPid"]) == plugin
                           and "forkserver" in cmdline(p)]
                assert len(servers) == 1, {p: cmdline(p) for p in procs}
                (server,) = servers
                workers = [p for p, f in procs.items() if int(f["PPid"]) == server]
                assert workers, {p: cmdline(p) for p in procs}
                found["tree"] = {p: (f["PPid"], cmdline(p)) for p, f in procs.items()}

                os.kill(server, 9)
                # its workers now belong to PID 1
                for _ in range(50):
                    parents = {int(status_fields(w)["PPid"]) for w in workers
                               if Path(f"/proc/{w}").exists()}
                    if parents <= {init}:
                        break
                    await asyncio.sleep(0.1)
                assert parents <= {init}, parents
                # the orphaned workers end (killed here, as a wall-clock budget would, or
                # the OOM killer): PID 1 reaps them. (The dead server itself is the
                # plugin's child, not PID 1's: multiprocessing reaps it when it next
                # starts a worker, below.)
                for w in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w, 9)
                await no_zombie_stays(init, parent=init)
                # a profile not compiled before still is (a new worker, a new fork
                # server), and the one compiled before is still answered
                result = await scenario.create_until_answered(
                    conn, {scenario.ANNOTATION: other}, tries=100)
                assert result.error is None and result.fatal is None, result.error
                assert result.applied is not None
                applied = driver.effective_seccomp(conn.runtime, result.applied)
                assert any("rmdir" in r["names"] for r in applied["syscalls"]
                           if r["action"] == "SCMP_ACT_ERRNO"), applied
                await no_zombie_stays(init)
                found["after"] = {p: (f["PPid"], f["State"], cmdline(p))
                                  for p, f in container_processes(init).items()}
                assert (host["run"] / "ready").exists()

                # the kubelet's stop: SIGTERM to the container's PID 1, tini
                t0 = time.monotonic()
                runc("kill", runc.id, "TERM")
                code = await asyncio.to_thread(proc.wait, 10)
                found["stop_seconds"] = time.monotonic() - t0
                return code
        finally:
            await listener.stop()

    code = run(scenario_run(), timeout=150)
    text = log.read_text(errors="replace")
    assert found["init"]["Name"] == "tini", found
    assert found["init_cmdline"].startswith("/sbin/tini -- "), found
    assert found["plugin_cmdline"].startswith(f"{image.PROGRAM} --external "), found
    assert code == 0, (code, text)
    assert found["stop_seconds"] < 5, found
    assert not (host["run"] / "ready").exists()
    assert "applying seccomp profile" in text, text
