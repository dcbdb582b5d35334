"""``make bench-deploy``: start-up and crash recovery, measured with the runtime driver.

* start-up to registration: how long containerd waits for a pre-installed plugin
  (from exec to RegisterPlugin, and to the Configure answer), for the checkout's
  venv, the installed tree (``make install``) and the PyInstaller bundle
  (``make bundle``), each when present;
* ``kill -9`` to serving again: an external plugin under a supervisor that does
  what systemd's ``Restart=always`` + ``RestartSec=1`` does (systemd is not PID 1
  in this sandbox, so the unit itself is not what restarts it here): the time
  from the kill to the restarted plugin's answer to an annotated CreateContainer
  (the profile comes from the on-disk cache: the cache survives the crash);
* the image (``make image``) under runc: from ``runc run -d`` of the unpacked image
  (as the DaemonSet runs it: uid 0, no capabilities, read-only root) to the external
  plugin registered on the driver's socket, beside the bundle started directly as an
  external plugin in the same run (the ratio is runc's and the container's share);
* runtime restart to serving again: the driver's NRI socket is closed with the
  connection (containerd going away) and reopened after a down time; the time
  from the reopening to the external plugin registered again and answering.

Prints one table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from devtools import driver, image
from devtools.registry import LocalRegistry
from nri_seccomp.nri import ttrpc
from nri_seccomp.nri.pb import nri_pb2

CHECKOUT = driver.CHECKOUT
PROFILE = json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
    {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]}).encode()
ANNOTATION = "seccomp-profile.kubernetes.cri-o.io/POD"
#: systemd's RestartSec=1 in the unit (packaging/nri-seccomp.service)
RESTART_SEC = 1.0


def commands() -> dict[str, list[str]]:
    """Every form of the plugin that is present: name -> argv."""
    out = {"venv (checkout)": driver.plugin_command()}
    for name, path in (("installed tree", Path("/opt/nri-seccomp/bin/nri-seccomp")),
                       ("bundle", CHECKOUT / "dist/nri-seccomp/nri-seccomp")):
        if os.access(path, os.X_OK):
            out[name] = [str(path)]
    return out


def config_text(cache: Path, registry: LocalRegistry) -> str:
    return (f"cache_dir: {cache}\nregistry: {{insecure: [{registry.address}], "
            f"allowed: ['{registry.address}/*']}}\n")


async def answer_annotated(conn: driver.PluginConnection, reference: str) -> None:
    """An annotated CreateContainer until the profile is applied (retry answers again)."""
    pod = nri_pb2.PodSandbox(id="p", name="pod", namespace="default",
                             annotations={ANNOTATION: reference})
    for _ in range(200):
        result = await conn.create_container(pod, nri_pb2.Container(id="c", name="app"))
        if result.error is not None and result.error.code == ttrpc.Code.UNAVAILABLE:
            await asyncio.sleep(0.02)
            continue
        if result.applied is None:
            raise RuntimeError(f"not applied: {result.error or result.fatal}")
        return
    raise RuntimeError("never answered")


async def startup(argv: Sequence[str], config: str, rounds: int) -> tuple[list[float], list[float]]:
    registered, configured = [], []
    for _ in range(rounds):
        conn = await driver.spawn_plugin(argv, config=config, stderr=asyncio.subprocess.DEVNULL)
        await conn.handshake()
        registered.append(conn.timings.registered - conn.timings.spawned)
        configured.append(conn.timings.configured - conn.timings.spawned)
        await conn.wait_closed()
    return registered, configured


IMAGE_ARCHIVE = CHECKOUT / "build/nri-seccomp-image.oci.tar"
BUNDLE_EXE = CHECKOUT / "dist/nri-seccomp/nri-seccomp"


def container_spec(bundle: Path, host: Path) -> None:
    """config.json as the DaemonSet's pod, but the host's network (the registry)."""
    path = bundle / "config.json"
    spec = json.loads(path.read_text())
    proc = spec["process"]
    proc["terminal"], proc["user"], proc["noNewPrivileges"] = False, {"uid": 0, "gid": 0}, True
    proc["capabilities"] = {k: [] for k in proc["capabilities"]}
    proc["args"] = [*image.ENTRYPOINT, "--external", "--socket", "/var/run/nri/nri.sock",
                    "--config", "/etc/nri-seccomp/config.yaml"]
    spec["root"]["readonly"] = True
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"]
                                   if n["type"] != "network"]
    for dest, name in (("/var/run/nri", "nri"), ("/etc/nri-seccomp", "config"),
                       ("/var/lib/nri-seccomp", "cache")):
        spec["mounts"].append({"destination": dest, "type": "bind",
                               "source": str(host / name), "options": ["rbind"]})
    spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                           "options": ["mode=1777"]})
    path.write_text(json.dumps(spec))


async def external_startup(argv: Sequence[str], listener: driver.ExternalListener,
                           stop: Sequence[str] = ()) -> float:
    """From running ``argv`` to the plugin registered on ``listener``; then ``stop``
    (or a kill of ``argv``'s process)."""
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        conn = await asyncio.wait_for(listener.connections.get(), 60)
        await asyncio.wait_for(conn.registered.wait(), 30)
        took = time.monotonic() - t0
        conn.close()
        return took
    finally:
        if stop:
            await proc.wait()
            await asyncio.to_thread(subprocess.run, list(stop), capture_output=True)
        else:
            proc.kill()
            await proc.wait()


async def image_startup(work: Path, registry: LocalRegistry,
                        rounds: int) -> tuple[list[float], list[float]] | None:
    """(bundle, image under runc) start-up to RegisterPlugin, alternating, as an external
    plugin with the same configuration; None without the image, runc or umoci."""
    if not (IMAGE_ARCHIVE.exists() and BUNDLE_EXE.exists() and shutil.which("runc")
            and shutil.which("umoci")):
        return None
    host = work / "host"
    for name in ("nri", "config", "cache"):
        (host / name).mkdir(parents=True)
    (host / "config" / "config.yaml").write_text(
        config_text(Path("/var/lib/nri-seccomp/cache"), registry))
    bundle = await asyncio.to_thread(image.unpack, IMAGE_ARCHIVE, work / "image")
    container_spec(bundle, host)
    sock = host / "nri" / "nri.sock"
    listener = driver.ExternalListener(str(sock))
    await listener.start()
    runc = ["runc", "--root", str(work / "runc")]
    direct, contained = [], []
    try:
        for i in range(rounds):
            direct.append(await external_startup(
                [str(BUNDLE_EXE), "--external", "--socket", str(sock), "--config",
                 str(host / "config" / "config.yaml")], listener))
            cid = f"bench-{os.getpid()}-{i}"
            contained.append(await external_startup(
                [*runc, "run", "--detach", "--bundle", str(bundle), cid], listener,
                stop=[*runc, "delete", "--force", cid]))
    finally:
        await listener.stop()
    return direct, contained


class Supervisor:
    """Restart=always, RestartSec=1: start the command again a second after it exits."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = False

    async def _loop(self) -> None:
        while not self._stop:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, env=driver.child_environment(), stdin=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL)
            await self.process.wait()
            if not self._stop:
                await asyncio.sleep(RESTART_SEC)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        self._stop = True
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
        if self._task is not None:
            await self._task


async def serving(listener: driver.ExternalListener, reference: str,
                  timeout: float = 30) -> driver.PluginConnection:
    """The next plugin to connect, registered, configured and applying profiles."""
    conn = await asyncio.wait_for(listener.connections.get(), timeout)
    await conn.handshake()
    await answer_annotated(conn, reference)
    return conn


async def crash_cycles(argv: Sequence[str], work: Path, registry: LocalRegistry,
                       reference: str, rounds: int, down: float) -> dict[str, list[float]]:
    sock = str(work / "nri.sock")
    config = work / "config.yaml"
    config.write_text(config_text(work / "cache", registry))
    listener = driver.ExternalListener(sock)
    await listener.start()
    sup = Supervisor([*argv, "--external", "--socket", sock, "--config", str(config)])
    sup.start()
    out: dict[str, list[float]] = {"kill": [], "restart": [], "restart_down": []}
    try:
        conn = await serving(listener, reference)
        for _ in range(rounds):
            assert sup.process is not None
            t0 = time.monotonic()
            os.kill(sup.process.pid, signal.SIGKILL)
            conn.close()
            conn = await serving(listener, reference)
            out["kill"].append(time.monotonic() - t0)
        for key, pause in (("restart", 0.0), ("restart_down", down)):
            for _ in range(rounds):
                await listener.stop()
                conn.close()
                await asyncio.sleep(pause)
                t0 = time.monotonic()
                await listener.start()
                conn = await serving(listener, reference)
                out[key].append(time.monotonic() - t0)
        conn.close()
    finally:
        await sup.stop()
        await listener.stop()
    return out


def fmt(samples: list[float]) -> str:
    return (f"median {statistics.median(samples) * 1000:7.0f} ms, "
            f"max {max(samples) * 1000:7.0f} ms (n={len(samples)})")


async def main_async(rounds: int, down: float) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    with LocalRegistry() as registry, tempfile.TemporaryDirectory() as tmp:
        registry.push_profile("bench/deploy", "v1", PROFILE)
        reference = f"{registry.address}/bench/deploy:v1"
        config = config_text(Path(tmp) / "cache", registry)
        for name, argv in commands().items():
            registered, configured = await startup(argv, config, rounds)
            rows.append((f"start-up to RegisterPlugin, {name}", fmt(registered)))
            rows.append((f"start-up to Configure answered, {name}", fmt(configured)))
        measured = await image_startup(Path(tmp) / "image", registry, rounds)
        if measured is not None:
            direct, contained = measured
            rows.append(("start-up to RegisterPlugin, bundle as external plugin", fmt(direct)))
            ratio = statistics.median(contained) / statistics.median(direct)
            rows.append(("start-up to RegisterPlugin, image under runc (external; ratio to "
                         "the row above)", f"{fmt(contained)}, x{ratio:.2f}"))
        work = Path(tmp) / "crash"
        work.mkdir()
        argv = commands().get("bundle", driver.plugin_command())
        kind = "bundle" if "bundle" in commands() else "venv"
        res = await crash_cycles(argv, work, registry, reference, rounds, down)
        rows.append((f"kill -9 to serving again ({kind}, Restart=always RestartSec=1 emulated)",
                     fmt(res["kill"])))
        rows.append((f"runtime restart (socket back at once) to serving again ({kind})",
                     fmt(res["restart"])))
        rows.append((f"runtime restart after {down:.0f} s down, from socket back to serving "
                     f"({kind})", fmt(res["restart_down"])))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.deploy")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--down", type=float, default=3.0,
                   help="how long the runtime stays down in the second restart case")
    args = p.parse_args(argv)
    rows = asyncio.run(main_async(args.rounds, args.down))
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure'.ljust(width)} | result |")
    print(f"|{'-' * (width + 2)}|--------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
