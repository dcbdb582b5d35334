"""The runtime side of NRI, for tests, the demo and benchmarks.

It does what containerd does, following ``docs/`` facts rather than our plugin's
code: it starts the plugin executable with a connected socket on fd 3 and the
``NRI_PLUGIN_*`` environment (or accepts an external plugin on a socket path),
serves ``Runtime.RegisterPlugin``, then calls Configure, Synchronize and
CreateContainer with a deadline. Like NRI's adaptation it treats a late answer,
a closed connection or a protocol error as fatal (the plugin is closed and the
container is created without its adjustment), and an error status as a failed
container creation.

It can also emulate the seccomp defects of real containerd releases, so tests
can prove the plugin never sends what a declared runtime mishandles.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict

from nri_seccomp.nri import mux, ttrpc
from nri_seccomp.nri.pb import nri_pb2

PLUGIN_SERVICE = "nri.pkg.api.v1alpha1.Plugin"
RUNTIME_SERVICE = "nri.pkg.api.v1alpha1.Runtime"
METADATA = {"containerd-namespace-ttrpc": "k8s.io"}
#: the largest mux chunk containerd's NRI connection can read (seen on 2.2.4, 2.3.4, main)
CONTAINERD_READ_CHUNK = 4096


class DriverError(Exception):
    pass


@dataclass(frozen=True)
class RuntimeVersion:
    """Which runtime the driver pretends to be, and which of its defects to emulate."""

    name: str = "containerd"
    version: str = "v2.3.0"
    nri_version: str = "v0.12.0"
    #: NRI v0.10-v0.11 (containerd 2.2.x) panic on a per-syscall errno_ret.
    crashes_on_errno_ret: bool = False
    #: every NRI release up to v0.12.2 drops default_errno when applying.
    drops_default_errno: bool = True
    #: containerd < 2.2 does not know the seccomp_policy field and drops it.
    applies_seccomp: bool = True

    @classmethod
    def containerd(cls, version: str) -> RuntimeVersion:
        parts = tuple(int(p) for p in version.lstrip("v").split("-")[0].split(".")[:3])
        if parts < (2, 2, 0):
            return cls(version=version, nri_version="", applies_seccomp=False)
        if parts < (2, 3, 0):
            return cls(version=version, nri_version="", crashes_on_errno_ret=True)
        if parts < (2, 4, 0) or "-" in version:
            return cls(version=version, nri_version="v0.12.0")
        # 2.4.0: NRI v0.12.3 (Container.image filled); default_errno still dropped
        return cls(version=version, nri_version="v0.12.3")


@dataclass
class CreateResult:
    """What the runtime made of one CreateContainer call."""

    latency: float
    response: nri_pb2.CreateContainerResponse | None = None
    #: a non-fatal error status: the container creation fails.
    error: ttrpc.RpcError | None = None
    #: a fatal failure: the plugin is closed and the container runs without its adjustment.
    fatal: str | None = None
    #: the emulated runtime would have crashed applying this answer.
    crashed: str | None = None
    #: the linux.seccomp the emulated runtime would put in the spec
    applied: nri_pb2.LinuxSeccomp | None = None
    #: the emulated runtime silently dropped the seccomp adjustment
    dropped: bool = False

    @property
    def seccomp(self) -> nri_pb2.LinuxSeccomp | None:
        if self.response is None or not self.response.adjust.linux.HasField("seccomp_policy"):
            return None
        return self.response.adjust.linux.seccomp_policy


def applied_policy(
    runtime: RuntimeVersion, policy: nri_pb2.LinuxSeccomp
) -> nri_pb2.LinuxSeccomp:
    """What the emulated runtime puts in the spec for this adjustment (or how it crashes)."""
    if runtime.crashes_on_errno_ret:
        for i, rule in enumerate(policy.syscalls):
            if rule.HasField("errno_ret"):
                raise DriverError(
                    f"runtime panic: nil pointer dereference in api.ToOCILinuxSyscalls "
                    f"(syscalls[{i}] {list(rule.names)} has errno_ret)"
                )
    out = nri_pb2.LinuxSeccomp()
    out.CopyFrom(policy)
    if runtime.drops_default_errno:
        out.ClearField("default_errno")
    return out


def effective_seccomp(
    runtime: RuntimeVersion, policy: nri_pb2.LinuxSeccomp
) -> dict[str, Any]:
    """The spec's linux.seccomp (OCI JSON names) as the emulated runtime would write it."""
    policy = applied_policy(runtime, policy)
    out: dict[str, Any] = {"defaultAction": policy.default_action}
    if policy.HasField("default_errno"):
        out["defaultErrnoRet"] = policy.default_errno.value
    if policy.architectures:
        out["architectures"] = list(policy.architectures)
    if policy.flags:
        out["flags"] = list(policy.flags)
    if policy.listener_path:
        out["listenerPath"] = policy.listener_path
    if policy.listener_metadata:
        out["listenerMetadata"] = policy.listener_metadata
    rules = []
    for rule in policy.syscalls:
        r: dict[str, Any] = {"names": list(rule.names), "action": rule.action}
        if rule.HasField("errno_ret"):
            r["errnoRet"] = rule.errno_ret.value
        if rule.args:
            r["args"] = [
                {"index": a.index, "value": a.value, "valueTwo": a.value_two, "op": a.op}
                for a in rule.args
            ]
        rules.append(r)
    if rules:
        out["syscalls"] = rules
    return out


@dataclass
class Timings:
    spawned: float = 0.0
    registered: float = 0.0
    configured: float = 0.0


@dataclass
class PluginConnection:
    """One connected plugin, from the runtime's point of view."""

    runtime: RuntimeVersion
    request_timeout: float
    registration_timeout: float
    _mux: mux.Mux
    _client: ttrpc.Client
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    registered: asyncio.Event = field(default_factory=asyncio.Event)
    registration: nri_pb2.RegisterPluginRequest | None = None
    events: int = 0
    closed: str | None = None
    timings: Timings = field(default_factory=Timings)
    process: asyncio.subprocess.Process | None = None
    config: str = ""

    @classmethod
    def start(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        runtime: RuntimeVersion,
        request_timeout: float,
        registration_timeout: float,
        config: str = "",
    ) -> PluginConnection:
        # containerd cannot read a chunk over 4096 bytes (ttrpc's bufio.Reader size; NRI's
        # mux answers ENOMEM) and drops the plugin: the emulation must do the same
        m = mux.Mux(reader, writer, max_read_payload=CONTAINERD_READ_CHUNK)
        plugin_conn = m.open(mux.PLUGIN_SERVICE_CONN)
        runtime_conn = m.open(mux.RUNTIME_SERVICE_CONN)
        client = ttrpc.Client(plugin_conn, lambda b: m.write(mux.PLUGIN_SERVICE_CONN, b))
        conn = cls(runtime, request_timeout, registration_timeout, m, client, config=config)
        server = ttrpc.Server({f"{RUNTIME_SERVICE}/RegisterPlugin": conn._register_plugin})
        conn._tasks = [
            asyncio.create_task(m.run()),
            asyncio.create_task(client.run()),
            asyncio.create_task(
                server.serve(runtime_conn, lambda b: m.write(mux.RUNTIME_SERVICE_CONN, b))
            ),
        ]
        return conn

    async def _register_plugin(self, payload: bytes, call: ttrpc.Call) -> bytes:
        self.registration = nri_pb2.RegisterPluginRequest.FromString(payload)
        self.timings.registered = time.monotonic()
        self.registered.set()
        # Like the real runtime, Configure may reach the plugin before this answer.
        await asyncio.sleep(0)
        return b""

    # ---- calls ---------------------------------------------------------------

    async def _call(self, method: str, payload: bytes) -> bytes:
        if self.closed:
            raise DriverError(f"plugin is closed: {self.closed}")
        return await self._client.call(
            PLUGIN_SERVICE, method, payload, timeout=self.request_timeout, metadata=METADATA
        )

    async def handshake(
        self, config: str | None = None, *, synchronize: bool = True
    ) -> nri_pb2.ConfigureResponse:
        """Wait for RegisterPlugin, then Configure, then an empty Synchronize, as
        containerd does before it calls a plugin for containers; closes the plugin on
        failure. ``synchronize=False`` stops after Configure, for a test that sends its
        own Synchronize."""
        try:
            await asyncio.wait_for(self.registered.wait(), self.registration_timeout)
        except TimeoutError:
            self.close("plugin did not register within the registration timeout")
            raise DriverError(self.closed) from None
        resp = await self.configure(self.config if config is None else config)
        if synchronize:
            try:
                await self.synchronize()
            except (TimeoutError, ttrpc.RpcError, ConnectionError, ttrpc.ProtocolError) as exc:
                self.close(f"failed to synchronize plugin: {exc}")
                raise DriverError(self.closed) from exc
        return resp

    async def configure(self, config: str = "") -> nri_pb2.ConfigureResponse:
        req = nri_pb2.ConfigureRequest(
            config=config,
            runtime_name=self.runtime.name,
            runtime_version=self.runtime.version,
            registration_timeout=int(self.registration_timeout * 1000),
            request_timeout=int(self.request_timeout * 1000),
            NRI_version=self.runtime.nri_version,
        )
        try:
            raw = await self._call("Configure", req.SerializeToString())
        except (TimeoutError, ttrpc.RpcError, ConnectionError, ttrpc.ProtocolError) as exc:
            self.close(f"failed to configure plugin: {exc}")
            raise DriverError(self.closed) from exc
        resp = nri_pb2.ConfigureResponse.FromString(raw)
        self.events = resp.events
        self.timings.configured = time.monotonic()
        return resp

    async def synchronize(
        self,
        pods: Sequence[nri_pb2.PodSandbox] = (),
        containers: Sequence[nri_pb2.Container] = (),
        chunks: int = 1,
    ) -> list[nri_pb2.SynchronizeResponse]:
        """Send the state in ``chunks`` pieces, the way NRI splits a large state."""
        answers = []
        n = max(chunks, 1)
        for i in range(n):
            req = nri_pb2.SynchronizeRequest(
                pods=list(pods)[i::n], containers=list(containers)[i::n], more=i < n - 1
            )
            resp = nri_pb2.SynchronizeResponse.FromString(
                await self._call("Synchronize", req.SerializeToString())
            )
            answers.append(resp)
            if req.more and not resp.more:
                raise DriverError(f"plugin refused synchronization chunk {i + 1} of {n}")
        return answers

    def subscribed(self, event: int) -> bool:
        return bool(self.events & (1 << (event - 1)))

    async def run_pod_sandbox(self, pod: nri_pb2.PodSandbox) -> None:
        if self.subscribed(nri_pb2.RUN_POD_SANDBOX):
            req = nri_pb2.RunPodSandboxRequest(pod=pod)
            await self._call("RunPodSandbox", req.SerializeToString())

    async def state_change(self, event: int, pod: nri_pb2.PodSandbox) -> None:
        """How NRI <= 0.11 (containerd 2.2) delivers pod events: StateChange, not their RPCs."""
        if self.subscribed(event):
            req = nri_pb2.StateChangeEvent(event=event, pod=pod)  # type: ignore[arg-type]
            await self._call("StateChange", req.SerializeToString())

    async def create_container(
        self, pod: nri_pb2.PodSandbox, container: nri_pb2.Container
    ) -> CreateResult:
        payload = nri_pb2.CreateContainerRequest(pod=pod, container=container).SerializeToString()
        start = time.perf_counter()
        if not self.subscribed(nri_pb2.CREATE_CONTAINER):
            return CreateResult(latency=0.0, response=nri_pb2.CreateContainerResponse())
        try:
            raw = await self._call("CreateContainer", payload)
        except ttrpc.RpcError as exc:
            return CreateResult(latency=time.perf_counter() - start, error=exc)
        except (TimeoutError, ConnectionError, ttrpc.ProtocolError, DriverError) as exc:
            reason = f"closing plugin, failed to handle CreateContainer request: {exc!r}"
            self.close(reason)
            return CreateResult(latency=time.perf_counter() - start, fatal=reason)
        result = CreateResult(
            latency=time.perf_counter() - start,
            response=nri_pb2.CreateContainerResponse.FromString(raw),
        )
        if result.seccomp is not None and not self.runtime.applies_seccomp:
            # containerd < 2.2 does not know the field: the container runs unconfined
            result.dropped = True
        elif result.seccomp is not None:
            try:
                result.applied = applied_policy(self.runtime, result.seccomp)
            except DriverError as exc:
                result.crashed = str(exc)
        return result

    async def create_container_answer(self, request: bytes) -> bytes:
        """CreateContainer with a serialised request: the answer's bytes, unchecked (a
        load generator compares them with an answer checked by :meth:`create_container`).
        An error status raises :class:`ttrpc.RpcError`."""
        return await self._call("CreateContainer", request)

    async def raw_request(self, payload: bytes) -> None:
        """Write bytes straight onto the plugin connection (robustness tests)."""
        self._mux.write(mux.PLUGIN_SERVICE_CONN, payload)
        await self._mux.drain()

    def close(self, reason: str = "closed by the runtime") -> None:
        if self.closed is None:
            self.closed = reason
        self._mux.close()

    async def wait_closed(self, timeout: float = 5.0) -> int | None:
        """Close our end and wait for the plugin process to exit; its exit code."""
        self.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.process is None:
            return None
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise DriverError(
                f"plugin did not exit within {timeout}s of the socket closing"
            ) from None


async def spawn_plugin(
    argv: Sequence[str],
    *,
    name: str = "seccomp-oci",
    idx: str = "10",
    runtime: RuntimeVersion | None = None,
    request_timeout: float = 2.0,
    registration_timeout: float = 5.0,
    env: Mapping[str, str] | None = None,
    config: str = "",
    stderr: int | None = None,
    cwd: str | None = None,
    checkout_on_path: bool = True,
) -> PluginConnection:
    """Start ``argv`` as containerd starts a pre-installed plugin: socket on fd 3.

    ``checkout_on_path=False`` passes ``env`` as it is (an installed plugin must not
    need this checkout on PYTHONPATH)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child_env = child_environment(env) if checkout_on_path else dict(env or {})
    child_env.update(
        {"NRI_PLUGIN_NAME": name, "NRI_PLUGIN_IDX": idx, "NRI_PLUGIN_SOCKET": "3"}
    )
    fd = theirs.fileno()

    def to_fd3() -> None:
        os.dup2(fd, 3)

    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=child_env,
        pass_fds=(fd, 3),  # 3 survives close_fds after the dup2
        preexec_fn=to_fd3,
        stdin=asyncio.subprocess.DEVNULL,
        stderr=stderr,
        cwd=cwd,
    )
    theirs.close()
    reader, writer = await asyncio.open_connection(sock=ours)
    conn = PluginConnection.start(
        reader, writer, runtime or RuntimeVersion(), request_timeout, registration_timeout,
        config=config,
    )
    conn.process = proc
    conn.timings.spawned = started
    return conn


def plugin_command(*args: str) -> list[str]:
    """How tests and the demo run our plugin: this interpreter, our package."""
    return [sys.executable, "-m", "nri_seccomp", *args]


def baseline_command(*args: str) -> list[str]:
    """The baseline plugin (``devtools.baseline``): same transport, empty adjustments."""
    return [sys.executable, "-m", "devtools.baseline", *args]


#: the checkout holding devtools/, which is not installed: put on a child's PYTHONPATH
CHECKOUT = Path(__file__).resolve().parent.parent


def child_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) with the checkout on PYTHONPATH, so devtools imports."""
    out = dict(os.environ if env is None else env)
    paths = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(CHECKOUT) not in paths:
        out["PYTHONPATH"] = os.pathsep.join([*paths, str(CHECKOUT)])
    return out


class ExternalListener:
    """The runtime's NRI socket, accepting external plugins."""

    def __init__(
        self,
        path: str,
        runtime: RuntimeVersion | None = None,
        request_timeout: float = 2.0,
        registration_timeout: float = 5.0,
    ) -> None:
        self.path = path
        self.runtime = runtime or RuntimeVersion()
        self.request_timeout = request_timeout
        self.registration_timeout = registration_timeout
        self.connections: asyncio.Queue[PluginConnection] = asyncio.Queue()
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = PluginConnection.start(
                reader, writer, self.runtime, self.request_timeout, self.registration_timeout
            )
            await self.connections.put(conn)

        self._server = await asyncio.start_unix_server(accept, self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def to_dict(message: Any) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)
