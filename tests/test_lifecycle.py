"""The plugin as a real subprocess, driven the way containerd drives it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from devtools import driver
from nri_seccomp.nri.pb import nri_pb2

from .plugin_harness import plugin

pytestmark = pytest.mark.integration  # real processes: plugin, registries, servers


def run(coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _pods(n: int) -> list[nri_pb2.PodSandbox]:
    return [nri_pb2.PodSandbox(id=f"pod{i}", name=f"p{i}", namespace="default") for i in range(n)]


def _containers(n: int) -> list[nri_pb2.Container]:
    return [nri_pb2.Container(id=f"c{i}", pod_sandbox_id=f"pod{i}", name=f"c{i}") for i in range(n)]


@pytest.mark.parametrize("chunks", [0, 1, 3])
def test_preinstalled_lifecycle(chunks: int) -> None:
    async def scenario() -> None:
        conn = await driver.spawn_plugin(driver.baseline_command())
        resp = await conn.handshake(synchronize=False)  # chunks=0: none at all
        assert resp.events == 1 << (nri_pb2.CREATE_CONTAINER - 1)
        assert conn.registration is not None
        assert (conn.registration.plugin_name, conn.registration.plugin_idx) == (
            "seccomp-oci",
            "10",
        )
        assert conn.registration.NRI_version == "v0.12.2"
        if chunks:
            answers = await conn.synchronize(_pods(5), _containers(7), chunks=chunks)
            assert [a.more for a in answers] == [True] * (chunks - 1) + [False]
        pod = nri_pb2.PodSandbox(id="p", name="pod")
        result = await conn.create_container(pod, nri_pb2.Container(id="c", name="app"))
        assert result.error is None and result.fatal is None
        assert result.response == nri_pb2.CreateContainerResponse()
        assert await conn.wait_closed() == 0

    run(scenario())


def test_baseline_with_an_answer_file_sends_those_bytes(tmp_path: Path) -> None:
    """The benchmarks' control: the baseline's transport answering a given adjustment,
    exactly as serialised, for every container."""
    adjust = nri_pb2.ContainerAdjustment()
    adjust.linux.seccomp_policy.default_action = "SCMP_ACT_ALLOW"
    adjust.linux.seccomp_policy.syscalls.add(names=["mkdir"], action="SCMP_ACT_ERRNO")
    path = tmp_path / "adjustment.bin"
    path.write_bytes(adjust.SerializeToString())

    async def scenario() -> None:
        conn = await driver.spawn_plugin(driver.baseline_command("--answer-file", str(path)))
        await conn.handshake()
        for name in ("app", "sidecar"):
            result = await conn.create_container(nri_pb2.PodSandbox(id="p", name="pod"),
                                                 nri_pb2.Container(id=name, name=name))
            assert result.error is None
            assert result.response == nri_pb2.CreateContainerResponse(adjust=adjust)
        assert await conn.wait_closed() == 0

    run(scenario())


def test_shutdown_rpc_exits_cleanly() -> None:
    async def scenario() -> None:
        conn = await driver.spawn_plugin(driver.baseline_command())
        await conn.handshake()
        await conn._call("Shutdown", b"")
        assert conn.process is not None
        assert await asyncio.wait_for(conn.process.wait(), 5) == 0

    run(scenario())


def test_registration_carries_file_name_identity(tmp_path: Path) -> None:
    # containerd runs /opt/nri/plugins/IDX-NAME; with no NRI_PLUGIN_NAME/IDX the
    # plugin must take both from its own file name.
    exe = tmp_path / "42-seccomp-test"
    exe.write_text(
        f"#!{sys.executable}\n"
        "from devtools.baseline import main\n"
        "raise SystemExit(main([]))\n"
    )
    exe.chmod(0o755)

    async def scenario() -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NRI_")}
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
        conn = await driver.spawn_plugin([str(exe)], name="", idx="", env=env)
        await conn.handshake()
        assert conn.registration is not None
        assert (conn.registration.plugin_name, conn.registration.plugin_idx) == (
            "seccomp-test",
            "42",
        )
        assert await conn.wait_closed() == 0

    run(scenario())


def test_external_plugin_reconnects(tmp_path: Path) -> None:
    path = str(tmp_path / "nri.sock")

    async def scenario() -> None:
        listener = driver.ExternalListener(path)
        await listener.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("NRI_")}
        proc = await asyncio.create_subprocess_exec(
            *driver.baseline_command("--socket", path, "--name", "ext", "--idx", "20"),
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            for round_ in range(2):
                conn = await asyncio.wait_for(listener.connections.get(), 15)
                await conn.handshake()
                assert conn.registration is not None
                assert conn.registration.plugin_name == "ext"
                result = await conn.create_container(
                    nri_pb2.PodSandbox(id="p"), nri_pb2.Container(id=f"c{round_}", name="app")
                )
                assert result.response is not None
                # the runtime goes away ...
                conn.close("runtime restarting")
                await listener.stop()
                await asyncio.sleep(0.3)
                # ... and comes back on the same path
                await listener.start()
            assert proc.returncode is None
        finally:
            proc.terminate()
            _, err = await proc.communicate()
            await listener.stop()
        assert b"reconnecting" in err or b"unavailable" in err

    run(scenario(), timeout=60)


def test_external_seccomp_plugin_reads_its_config_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nri.sock")
    config = tmp_path / "nri-seccomp.yaml"
    config.write_text(f"cache_dir: {tmp_path / 'cache'}\nregistry: {{timout: 1}}\n")

    async def scenario() -> str:
        listener = driver.ExternalListener(path)
        await listener.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("NRI_")}
        proc = await asyncio.create_subprocess_exec(
            *driver.plugin_command("--socket", path, "--config", str(config)),
            env=env, stderr=asyncio.subprocess.PIPE)
        try:
            conn = await asyncio.wait_for(listener.connections.get(), 15)
            with pytest.raises(driver.DriverError) as info:
                await conn.handshake()
            return str(info.value)
        finally:
            proc.terminate()
            await proc.communicate()
            await listener.stop()

    message = run(scenario())
    assert f"{config}: unknown configuration key 'registry.timout'" in message


def test_registration_needs_only_the_transport() -> None:
    """The entry point imports what registering takes; the registry client, libseccomp,
    the profile code and the worker pool come with the first Configure (nri_seccomp.lazy)."""
    code = ("import sys, nri_seccomp.cli; "
            "print(' '.join(m for m in ('httpx', 'pyseccomp', 'pebble', 'yaml', "
            "'nri_seccomp.service.plugin', 'nri_seccomp.seccomp.libseccomp') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == ""


def test_end_of_file_stops_the_worker_processes_cleanly(tmp_path: Path) -> None:
    """The runtime going away (EOF) ends the compile workers too: no process is left,
    and nothing of theirs leaks (the resource tracker would warn on stderr)."""
    async def scenario() -> tuple[int | None, str, list[int]]:
        async with plugin(f"cache_dir: {tmp_path / 'cache'}\n") as session:
            assert session.conn.process is not None
            pid = session.conn.process.pid
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                    ] if Path(f"/proc/{pid}").exists() else []
        return session.exit_code, session.log, children

    code, log, children = run(scenario())
    assert code == 0 and children == []
    assert "leaked" not in log and "Traceback" not in log


def test_exit_leaves_no_temporary_directory(tmp_path: Path) -> None:
    """The worker pool's fork server keeps its socket in a ``pymp-*`` directory; the
    plugin leaves with ``os._exit`` (which skips multiprocessing's clean-up), so it
    removes that directory itself: in a container, every restart would leave one."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()

    async def scenario() -> tuple[int | None, list[str]]:
        async with plugin(f"cache_dir: {tmp_path / 'cache'}\n",
                          env={"TMPDIR": str(tmp)}) as session:
            # the pool is up (its fork server made the directory) before we close
            for _ in range(100):
                if any(p.name.startswith("pymp-") for p in tmp.iterdir()):
                    break
                await asyncio.sleep(0.05)
            made = [p.name for p in tmp.iterdir()]
        return session.exit_code, made

    code, made = run(scenario())
    assert code == 0 and any(name.startswith("pymp-") for name in made)
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_sigterm_stops_the_external_plugin_cleanly(tmp_path: Path, sigint: str) -> None:
    """SIGTERM (kubelet's or systemd's stop) ends the plugin as SIGINT does: exit 0, the
    ready file removed, well within the grace period. It must be handled: as PID 1 of
    its container (the image), a signal without a handler is ignored. A shell's
    background job starts with SIGINT ignored; SIGTERM must work there as well."""
    path = str(tmp_path / "nri.sock")
    ready = tmp_path / "ready"
    config = tmp_path / "config.yaml"
    config.write_text(f"cache_dir: {tmp_path / 'cache'}\n")
    argv = driver.plugin_command("--external", "--socket", path, "--config", str(config),
                                 "--ready-file", str(ready))
    if sigint == "ignored":
        argv = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *argv]

    async def scenario() -> tuple[int, float]:
        listener = driver.ExternalListener(path)
        await listener.start()
        proc = await asyncio.create_subprocess_exec(
            *argv, env=driver.child_environment(), stderr=asyncio.subprocess.DEVNULL)
        try:
            conn = await asyncio.wait_for(listener.connections.get(), 15)
            await conn.handshake()
            for _ in range(200):
                if ready.exists():
                    break
                await asyncio.sleep(0.05)
            assert ready.exists()
            t0 = asyncio.get_running_loop().time()
            proc.terminate()
            code = await asyncio.wait_for(proc.wait(), 10)
            return code, asyncio.get_running_loop().time() - t0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await listener.stop()

    code, took = run(scenario())
    assert code == 0
    assert not ready.exists()
    assert took < 6  # the workers' shutdown is bounded by stub.SHUTDOWN_GRACE (5 s)
