"""--ready-file: the file exists exactly while the runtime consults the plugin, i.e. from
the answer to its (last chunk of) Synchronize, when containerd's NRI adds the plugin to
the set it calls, to the end of the connection (the DaemonSet's liveness and readiness
probes are `test -f` on it). And the external plugin's reconnect back-off."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from devtools import driver
from nri_seccomp import cli
from nri_seccomp.errors import Kind, Refusal
from nri_seccomp.nri import stub
from nri_seccomp.nri.pb import nri_pb2


def run(coro: Coroutine[Any, Any, Any], timeout: float = 20) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


class _Plugin:
    async def configure(self, config: str, runtime: stub.RuntimeInfo) -> None:
        return None


IDENTITY = stub.Identity(name="seccomp-oci", idx="10")


async def _chunked_synchronize(conn: driver.PluginConnection, ready: Path) -> tuple[bool, bool]:
    """Synchronize in two chunks, as NRI splits a large state; whether the file exists
    after the first answer and after the last."""
    seen = []
    for more in (True, False):
        req = nri_pb2.SynchronizeRequest(
            pods=[nri_pb2.PodSandbox(id=f"p{more}")], more=more)
        await conn._call("Synchronize", req.SerializeToString())
        if more:
            await asyncio.sleep(0.1)
        else:
            await until(ready.exists)
        seen.append(ready.exists())
    return seen[0], seen[1]


def test_cli_accepts_ready_file() -> None:
    args = cli._parser().parse_args(["--external", "--ready-file", "/run/nri-seccomp/ready"])
    assert args.ready_file == "/run/nri-seccomp/ready"
    assert cli._parser().parse_args([]).ready_file is None


def test_external_ready_file_follows_synchronization() -> None:
    """Absent before registering and while registered and configured but not yet
    synchronized (containerd does not call the plugin for containers yet), present (time,
    plugin, runtime) once the last Synchronize chunk is answered, gone when the runtime
    closes the connection and all the while the stub dials again, back once it has
    synchronized again."""

    async def scenario(tmp: Path) -> None:
        sock_path = str(tmp / "nri.sock")
        ready = tmp / "state" / "ready"  # its directory does not exist yet
        listener = driver.ExternalListener(sock_path)
        await listener.start()
        s = stub.Stub(_Plugin(), IDENTITY, socket_path=sock_path, ready_file=str(ready))
        task = asyncio.create_task(s.run())
        try:
            conn = await asyncio.wait_for(listener.connections.get(), 5)
            await asyncio.wait_for(conn.registered.wait(), 5)
            await conn.handshake(synchronize=False)
            await asyncio.sleep(0.2)
            assert not ready.exists()  # registered and configured: not consulted yet
            first, last = await _chunked_synchronize(conn, ready)
            assert not first and last
            text = ready.read_text()
            assert "plugin: 10-seccomp-oci" in text
            assert "runtime: containerd v2.3.0" in text
            assert text.startswith("synchronized: 20")
            # written by rename: no temporary file is left beside it
            assert os.listdir(ready.parent) == ["ready"]

            # the runtime goes away (EOF) and stays away: no ready file while reconnecting
            await listener.stop()
            conn.close("containerd restarting")
            await until(lambda: not ready.exists())
            await asyncio.sleep(0.5)  # several dial attempts fail meanwhile
            assert not ready.exists()
            assert not task.done()

            # the runtime is back: registered and synchronized again, the file with it
            await listener.start()
            conn2 = await asyncio.wait_for(listener.connections.get(), 10)
            await conn2.handshake(synchronize=False)
            await asyncio.sleep(0.1)
            assert not ready.exists()
            await conn2.synchronize()
            await until(ready.exists)
            conn2.close()
            await until(lambda: not ready.exists())
        finally:
            s.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await listener.stop()

    with tempfile.TemporaryDirectory() as tmp:
        run(scenario(Path(tmp)))


class _RefusingSync(_Plugin):
    async def synchronize(self, pods: list[nri_pb2.PodSandbox],
                          containers: list[nri_pb2.Container]) -> list[nri_pb2.ContainerUpdate]:
        raise Refusal(Kind.UNUSABLE, "cannot take this state")


def test_failed_synchronize_writes_no_ready_file() -> None:
    """A Synchronize answered with an error: containerd drops the plugin, so no file."""

    async def scenario(tmp: Path) -> None:
        ready = tmp / "ready"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        s = stub.Stub(_RefusingSync(), IDENTITY, sock=theirs, ready_file=str(ready))
        task = asyncio.create_task(s.run())
        reader, writer = await asyncio.open_connection(sock=ours)
        conn = driver.PluginConnection.start(reader, writer, driver.RuntimeVersion(), 2.0, 5.0)
        with pytest.raises(driver.DriverError, match="cannot take this state"):
            await conn.handshake()
        await asyncio.sleep(0.2)
        assert not ready.exists()
        await conn.wait_closed()
        await asyncio.wait_for(task, 5)

    with tempfile.TemporaryDirectory() as tmp:
        run(scenario(Path(tmp)))


def test_back_off_starts_again_after_a_registration() -> None:
    """Two runtime restarts 2 s apart, each with the socket gone for 0.2 s, after a first
    start that let the back-off grow (containerd's own shutdown takes ~1.5 s): the plugin
    is back within ~0.5 s of the socket each time, not after the grown back-off (1.6 s,
    then 3.2 s, as when only a session over 10 s reset it)."""

    async def scenario(tmp: Path) -> list[float]:
        sock_path = str(tmp / "nri.sock")
        listener = driver.ExternalListener(sock_path)
        s = stub.Stub(_Plugin(), IDENTITY, socket_path=sock_path)
        task = asyncio.create_task(s.run())
        loop = asyncio.get_running_loop()
        back: list[float] = []
        try:
            await asyncio.sleep(1.0)  # dials at 0, 0.1, 0.3, 0.7 fail: the back-off grows
            await listener.start()
            conn = await asyncio.wait_for(listener.connections.get(), 10)
            await conn.handshake()
            for _ in range(2):
                await asyncio.sleep(2.0)
                await listener.stop()
                conn.close("containerd restarting")
                await asyncio.sleep(0.2)
                await listener.start()
                t0 = loop.time()
                conn = await asyncio.wait_for(listener.connections.get(), 10)
                await asyncio.wait_for(conn.registered.wait(), 5)
                back.append(loop.time() - t0)
                await conn.handshake()
            return back
        finally:
            s.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await listener.stop()

    with tempfile.TemporaryDirectory() as tmp:
        back = run(scenario(Path(tmp)), 40)
    # the dials after the reset are 0.1 s and 0.3 s after the connection ended: the
    # second finds the socket; the bound leaves room for a loaded machine
    assert all(t < 0.6 for t in back), back


def test_a_long_runtime_outage_costs_at_most_a_second_more() -> None:
    """The socket gone for 4 s (a slow containerd restart): dials at most 1 s apart, so
    the plugin is back within ~1 s of the socket, not after a back-off grown to 3.2 s."""

    async def scenario(tmp: Path) -> float:
        sock_path = str(tmp / "nri.sock")
        listener = driver.ExternalListener(sock_path)
        s = stub.Stub(_Plugin(), IDENTITY, socket_path=sock_path)
        task = asyncio.create_task(s.run())
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(4.0)  # dials at 0, 0.1, 0.3, 0.7, 1.5, 2.5, 3.5 fail
            await listener.start()
            t0 = loop.time()
            conn = await asyncio.wait_for(listener.connections.get(), 10)
            await asyncio.wait_for(conn.registered.wait(), 5)
            return loop.time() - t0
        finally:
            s.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await listener.stop()

    with tempfile.TemporaryDirectory() as tmp:
        back = run(scenario(Path(tmp)), 30)
    assert back < 1.3, back  # the dial after 3.5 s is at 4.5 s at the latest


def test_stale_ready_file_is_removed_at_start() -> None:
    """A file left by a killed process (kill -9 skips the clean-up; an emptyDir keeps it
    across container restarts) must not claim a registration: gone before the first dial."""

    async def scenario(tmp: Path) -> None:
        ready = tmp / "ready"
        ready.write_text("registered: long ago\n")
        s = stub.Stub(_Plugin(), IDENTITY, socket_path=str(tmp / "absent.sock"),
                      ready_file=str(ready))
        task = asyncio.create_task(s.run())
        try:
            await until(lambda: not ready.exists())
            await asyncio.sleep(0.3)
            assert not ready.exists()  # no runtime to register with
        finally:
            s.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    with tempfile.TemporaryDirectory() as tmp:
        run(scenario(Path(tmp)))


def test_failed_registration_writes_no_ready_file() -> None:
    """A runtime that refuses RegisterPlugin (here: never answers it) leaves no file."""

    async def scenario(tmp: Path) -> None:
        ready = tmp / "ready"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        s = stub.Stub(_Plugin(), IDENTITY, sock=theirs, ready_file=str(ready))
        task = asyncio.create_task(s.run())
        await asyncio.sleep(0.3)
        assert not ready.exists()
        ours.close()  # EOF before any answer
        await asyncio.gather(task, return_exceptions=True)
        assert not ready.exists()

    with tempfile.TemporaryDirectory() as tmp:
        run(scenario(Path(tmp)))


def test_preinstalled_ready_file_gone_at_eof() -> None:
    """Pre-installed (socket handed over): present once synchronized, removed at EOF, when
    the stub returns."""

    async def scenario(tmp: Path) -> None:
        ready = tmp / "ready"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        s = stub.Stub(_Plugin(), IDENTITY, sock=theirs, ready_file=str(ready))
        task = asyncio.create_task(s.run())
        reader, writer = await asyncio.open_connection(sock=ours)
        conn = driver.PluginConnection.start(reader, writer, driver.RuntimeVersion(), 2.0, 5.0)
        await conn.handshake()
        await until(ready.exists)
        assert "runtime: containerd v2.3.0" in ready.read_text()
        await conn.wait_closed()
        await asyncio.wait_for(task, 5)
        assert not ready.exists()

    with tempfile.TemporaryDirectory() as tmp:
        run(scenario(Path(tmp)))


@pytest.mark.integration
def test_plugin_process_ready_file() -> None:
    """The real entry point (`python -m nri_seccomp --ready-file`), started as containerd
    starts a pre-installed plugin: the file appears once synchronized and is gone once the
    runtime closes the socket and the process has exited."""

    async def scenario(tmp: Path) -> None:
        ready = tmp / "ready"
        conn = await driver.spawn_plugin(
            driver.plugin_command("--ready-file", str(ready)),
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await asyncio.wait_for(conn.registered.wait(), 15)
            await conn.handshake()  # registered, configured and synchronized
            await until(ready.exists, 10)
        finally:
            code = await conn.wait_closed(10)
        assert code == 0
        assert not ready.exists()

    with tempfile.TemporaryDirectory() as tmp:
        run(scenario(Path(tmp)), 40)
