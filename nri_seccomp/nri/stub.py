"""The plugin side of NRI: connection, registration, configuration, events.

A plugin object implements any of the typed handler Protocols below
(:class:`CreateContainerHandler`, :class:`PodEventHandler`, ...); the stub
subscribes to exactly the events it implements, as containerd/nri's Go stub does.
A handler speaks the domain, never the transport: it gets the pod, the container
and the runtime's deadline, and returns an adjustment or raises an
:class:`~nri_seccomp.errors.Refusal`, which the stub answers with the gRPC code
its kind stands for.

Two ways to start, as NRI defines them:

* pre-installed: the runtime executed us with an already-connected socket in
  ``NRI_PLUGIN_SOCKET`` (fd 3) and our name and index in ``NRI_PLUGIN_NAME`` /
  ``NRI_PLUGIN_IDX``. End-of-file means the runtime stopped: we exit.
* external: we dial the runtime's socket ourselves and dial again, with back-off,
  when the runtime restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from nri_seccomp.errors import Kind, NriSeccompError, Refusal
from nri_seccomp.nri import mux, ttrpc
from nri_seccomp.nri.pb import nri_pb2

log = logging.getLogger(__name__)

PLUGIN_SERVICE = "nri.pkg.api.v1alpha1.Plugin"
RUNTIME_SERVICE = "nri.pkg.api.v1alpha1.Runtime"
DEFAULT_SOCKET_PATH = "/var/run/nri/nri.sock"
#: the NRI API our messages follow (proto/ is written from v0.12.2); the runtime logs it
API_VERSION = "v0.12.2"
#: NRI's defaults; Configure tells us the runtime's actual values.
DEFAULT_REGISTRATION_TIMEOUT = 5.0
DEFAULT_REQUEST_TIMEOUT = 2.0
#: how long the plugin's shutdown may take once the runtime has gone
SHUTDOWN_GRACE = 5.0
#: the longest wait between two dials of an absent runtime socket (external plugin)
DIAL_BACKOFF_MAX = 1.0
#: the longest wait before registering again with a runtime that refused us
REFUSED_BACKOFF_MAX = 5.0

#: CreateContainer answers framed once and kept: at most this many, of at most this size
FRAMED_KEPT = 64
FRAMED_MAX = 16 * 1024

#: plugin method name → the NRI event it handles.
EVENT_METHODS: Mapping[str, int] = {
    "run_pod_sandbox": nri_pb2.RUN_POD_SANDBOX,
    "stop_pod_sandbox": nri_pb2.STOP_POD_SANDBOX,
    "remove_pod_sandbox": nri_pb2.REMOVE_POD_SANDBOX,
    "create_container": nri_pb2.CREATE_CONTAINER,
}

_PLUGIN_FILE = re.compile(r"^(?P<idx>[0-9]{2})-(?P<name>.+)$")


#: the status code each kind of refusal is answered with
REFUSAL_CODES: Mapping[Kind, ttrpc.Code] = {
    Kind.RETRY: ttrpc.Code.UNAVAILABLE,
    Kind.INVALID: ttrpc.Code.INVALID_ARGUMENT,
    Kind.FORBIDDEN: ttrpc.Code.PERMISSION_DENIED,
    Kind.UNUSABLE: ttrpc.Code.FAILED_PRECONDITION,
}


@runtime_checkable
class CreateContainerHandler(Protocol):
    async def create_container(
        self, pod: nri_pb2.PodSandbox, container: nri_pb2.Container, deadline: float
    ) -> nri_pb2.ContainerAdjustment | bytes | None:
        """The adjustment for a new container (None: no change), as a message or already
        serialised; ``deadline`` is the runtime's, as a ``time.monotonic()`` value.
        Raises Refusal to fail the creation."""
        ...


@runtime_checkable
class ConfigureHandler(Protocol):
    async def configure(self, config: str, runtime: RuntimeInfo) -> None:
        """Apply the plugin configuration text; Refusal (INVALID) to refuse it."""
        ...


@runtime_checkable
class SynchronizeHandler(Protocol):
    async def synchronize(
        self, pods: list[nri_pb2.PodSandbox], containers: list[nri_pb2.Container]
    ) -> list[nri_pb2.ContainerUpdate]: ...


@runtime_checkable
class RunPodSandboxHandler(Protocol):
    async def run_pod_sandbox(self, pod: nri_pb2.PodSandbox) -> None: ...


@runtime_checkable
class ShutdownHandler(Protocol):
    async def shutdown(self) -> None: ...


class StubError(NriSeccompError):
    """The plugin could not start or stay connected."""


class RegistrationError(StubError):
    pass


@dataclass(frozen=True)
class RuntimeInfo:
    """What Configure told us about the runtime."""

    name: str = ""
    version: str = ""
    nri_version: str = ""
    registration_timeout: float = DEFAULT_REGISTRATION_TIMEOUT
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT

    @classmethod
    def from_request(cls, req: nri_pb2.ConfigureRequest) -> RuntimeInfo:
        return cls(
            name=req.runtime_name,
            version=req.runtime_version,
            nri_version=req.NRI_version,
            # 0 means "not told": keep NRI's defaults rather than a zero deadline.
            registration_timeout=req.registration_timeout / 1000
            if req.registration_timeout > 0
            else DEFAULT_REGISTRATION_TIMEOUT,
            request_timeout=req.request_timeout / 1000
            if req.request_timeout > 0
            else DEFAULT_REQUEST_TIMEOUT,
        )


def event_mask(plugin: object) -> int:
    """The ConfigureResponse.events bit mask for the handlers ``plugin`` implements."""
    mask = 0
    for method, event in EVENT_METHODS.items():
        if callable(getattr(plugin, method, None)):
            mask |= 1 << (event - 1)
    return mask


@dataclass(frozen=True)
class Identity:
    name: str
    idx: str


def identity_from_environment(
    environ: Mapping[str, str], argv0: str, name: str | None = None, idx: str | None = None
) -> Identity:
    """Name and index: explicit values, else NRI's environment, else our file name ``IDX-NAME``."""
    match = _PLUGIN_FILE.match(os.path.basename(argv0))
    name = name or environ.get("NRI_PLUGIN_NAME") or (match.group("name") if match else None)
    idx = idx or environ.get("NRI_PLUGIN_IDX") or (match.group("idx") if match else None)
    if not name or not idx:
        raise StubError(
            "plugin name and index unknown: set NRI_PLUGIN_NAME/NRI_PLUGIN_IDX, name the "
            f"executable IDX-NAME (got {os.path.basename(argv0)!r}), or pass them explicitly"
        )
    if not re.fullmatch(r"[0-9]{2}", idx):
        raise StubError(f"plugin index must be two digits, got {idx!r}")
    return Identity(name=name, idx=idx)


class Stub:
    """Runs one plugin object against the runtime."""

    def __init__(
        self,
        plugin: object,
        identity: Identity,
        *,
        sock: socket.socket | None = None,
        socket_path: str = DEFAULT_SOCKET_PATH,
        reconnect: bool = True,
        nri_version: str = API_VERSION,
        ready_file: str | None = None,
    ) -> None:
        self.plugin = plugin
        self._ready_file = ready_file
        self._registered = False
        #: changes with every session's start and end, so that a ready-file write queued
        #: in one session is dropped once it is over
        self._session_id = 0
        #: the session whose Synchronize was answered (-1: none)
        self._synced_session = -1
        self.identity = identity
        self._sock = sock
        self._socket_path = socket_path
        self._reconnect = reconnect and sock is None
        self._nri_version = nri_version
        self.runtime = RuntimeInfo()
        self.configured = asyncio.Event()
        self._sync_pods: list[nri_pb2.PodSandbox] = []
        self._sync_containers: list[nri_pb2.Container] = []
        self._shutdown = False
        self._mux: mux.Mux | None = None
        #: serialised adjustment → its CreateContainerResponse (see _framed)
        self._responses: dict[bytes, bytes] = {}

    @classmethod
    def from_environment(
        cls,
        plugin: object,
        *,
        environ: Mapping[str, str] | None = None,
        argv0: str = "",
        name: str | None = None,
        idx: str | None = None,
        socket_path: str | None = None,
        ready_file: str | None = None,
    ) -> Stub:
        """Pre-installed when NRI_PLUGIN_SOCKET is set, external otherwise."""
        env = os.environ if environ is None else environ
        identity = identity_from_environment(env, argv0, name, idx)
        fd_text = env.get("NRI_PLUGIN_SOCKET")
        if fd_text and socket_path is None:
            try:
                fd = int(fd_text)
                sock = socket.socket(fileno=fd)
            except (ValueError, OSError) as exc:
                raise StubError(
                    f"NRI_PLUGIN_SOCKET={fd_text!r} is not a usable socket: {exc}"
                ) from exc
            return cls(plugin, identity, sock=sock, ready_file=ready_file)
        return cls(plugin, identity, socket_path=socket_path or DEFAULT_SOCKET_PATH,
                   ready_file=ready_file)

    # ---- running -----------------------------------------------------------

    async def run(self) -> None:
        """Serve until the runtime goes away (pre-installed) or until shut down (external)."""
        # a file left by a process that was killed (kill -9 skips the clean-up) would
        # claim a registration that no longer exists
        self._remove_ready_file()
        if self._sock is not None:
            reader, writer = await asyncio.open_connection(sock=self._sock)
            await self._session(reader, writer)
            log.info("the runtime closed the connection; exiting")
            return
        backoff = 0.1
        failed_dials = 0
        while not self._shutdown:
            try:
                reader, writer = await asyncio.open_unix_connection(self._socket_path)
            except OSError as exc:
                if not self._reconnect:
                    raise StubError(f"cannot connect to {self._socket_path}: {exc}") from exc
                # the first failure of an outage is news; the rest repeat it each second
                log.log(logging.INFO if failed_dials == 0 else logging.DEBUG,
                        "runtime socket %s unavailable (%s), retrying in %.1fs",
                        self._socket_path, exc.strerror or exc, backoff)
                failed_dials += 1
                await asyncio.sleep(backoff)
                # dialing a socket that is not there costs nothing, and every moment
                # without the plugin is a moment its pods cannot start: at most 1 s
                # between dials, so a containerd restart (~1.5 s) costs at most 1 s more
                backoff = min(backoff * 2, DIAL_BACKOFF_MAX)
                continue
            failed_dials = 0
            try:
                await self._session(reader, writer)
            except RegistrationError as exc:
                # a runtime that takes the connection but not the plugin: keep doubling,
                # so a broken runtime is not asked ten times a second
                log.warning("%s", exc)
            else:
                # registered, however briefly: the runtime was there and will be again
                # soon (a restart). Starting again at 0.1 s keeps two restarts a few
                # seconds apart from costing the back-off grown during the first one
                backoff = 0.1
            if not self._reconnect:
                return
            if not self._shutdown:
                log.info("runtime connection lost, reconnecting to %s", self._socket_path)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, REFUSED_BACKOFF_MAX)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        m = mux.Mux(reader, writer)
        self._mux = m
        self.configured.clear()
        plugin_conn = m.open(mux.PLUGIN_SERVICE_CONN)
        runtime_conn = m.open(mux.RUNTIME_SERVICE_CONN)
        server = ttrpc.Server(self._handlers())
        client = ttrpc.Client(runtime_conn, lambda b: m.write(mux.RUNTIME_SERVICE_CONN, b))
        # The runtime may send Configure before it answers RegisterPlugin, so the
        # plugin service must be served before we register.
        tasks = [
            asyncio.create_task(m.run(), name="mux"),
            asyncio.create_task(
                server.serve(plugin_conn, lambda b: m.write(mux.PLUGIN_SERVICE_CONN, b)),
                name="plugin-service",
            ),
            asyncio.create_task(client.run(), name="runtime-client"),
        ]
        self._session_id += 1
        # chunks of a synchronization the previous connection did not finish are void
        self._sync_pods, self._sync_containers = [], []
        try:
            await self._register(client)
            self._registered = True
            if self._synced_session == self._session_id:
                # the runtime synchronized before its RegisterPlugin answer reached us
                self._write_ready_file()
            await tasks[0]
        finally:
            self._registered = False
            self._session_id += 1  # a ready-file write still pending belongs to no session
            self._remove_ready_file()
            m.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._call_optional("on_disconnect")

    async def _register(self, client: ttrpc.Client) -> None:
        req = nri_pb2.RegisterPluginRequest(
            plugin_name=self.identity.name,
            plugin_idx=self.identity.idx,
            NRI_version=self._nri_version,
        )
        try:
            await client.call(
                RUNTIME_SERVICE,
                "RegisterPlugin",
                req.SerializeToString(),
                timeout=DEFAULT_REGISTRATION_TIMEOUT,
            )
        except (TimeoutError, ttrpc.RpcError, ConnectionError, ttrpc.ProtocolError) as exc:
            raise RegistrationError(
                f"registering plugin {self.identity.idx}-{self.identity.name} failed: {exc}"
            ) from exc
        log.info("registered plugin %s-%s", self.identity.idx, self.identity.name)

    async def shutdown_plugin(self) -> None:
        """The plugin's ``shutdown`` handler, if it has one (once the runtime is gone)."""
        await self._call_optional("shutdown")

    def close(self) -> None:
        """Stop serving (and, for an external plugin, stop reconnecting)."""
        self._shutdown = True
        if self._mux is not None:
            self._mux.close()

    # ---- the ready file ------------------------------------------------------

    def _synchronized(self, session: int) -> None:
        """The last Synchronize chunk has been answered: from now on the runtime calls us.

        containerd's NRI adds a plugin to the set it consults for containers only once
        its Synchronize succeeded, up to a second after RegisterPlugin on a cold start;
        a ready file written at registration would claim "serving" for that second."""
        if session != self._session_id:
            return
        self._synced_session = session
        if self._registered:
            self._write_ready_file()

    def _write_ready_file(self) -> None:
        """Say, in a file, that the runtime consults us: written whole (rename), so a
        reader (an exec probe's ``test -f``) never sees a half-written one."""
        if self._ready_file is None:
            return
        runtime = " ".join(p for p in (self.runtime.name, self.runtime.version) if p)
        text = (
            f"synchronized: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
            f"plugin: {self.identity.idx}-{self.identity.name}\n"
            f"runtime: {runtime or 'unknown (not configured yet)'}\n"
        )
        directory = os.path.dirname(os.path.abspath(self._ready_file))
        tmp = os.path.join(directory, f".{os.path.basename(self._ready_file)}.{os.getpid()}")
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self._ready_file)
        except OSError as exc:
            log.error("cannot write the ready file %s: %s", self._ready_file, exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _remove_ready_file(self) -> None:
        if self._ready_file is None:
            return
        try:
            os.unlink(self._ready_file)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("cannot remove the ready file %s: %s", self._ready_file, exc)

    # ---- plugin service ----------------------------------------------------

    def _handlers(self) -> dict[str, ttrpc.Handler]:
        table: dict[str, Callable[[bytes, ttrpc.Call], Awaitable[bytes]]] = {
            "Configure": self._configure,
            "Synchronize": self._synchronize,
            "Shutdown": self._shutdown_rpc,
            "StateChange": self._state_change,
        }
        for method, event in EVENT_METHODS.items():
            if callable(getattr(self.plugin, method, None)):
                table[_rpc_name(method)] = self._event_handler(method, event)
        return {f"{PLUGIN_SERVICE}/{name}": handler for name, handler in table.items()}

    async def _configure(self, payload: bytes, call: ttrpc.Call) -> bytes:
        with _refusals_as_status():
            return await self._configure_now(payload)

    async def _configure_now(self, payload: bytes) -> bytes:
        req = nri_pb2.ConfigureRequest.FromString(payload)
        self.runtime = RuntimeInfo.from_request(req)
        log.info(
            "configured by %s %s (NRI %s), request timeout %.3fs",
            req.runtime_name or "unknown runtime",
            req.runtime_version or "?",
            req.NRI_version or "unknown",
            self.runtime.request_timeout,
        )
        await self._call_optional("configure", req.config, self.runtime)
        self.configured.set()
        return nri_pb2.ConfigureResponse(events=event_mask(self.plugin)).SerializeToString()

    async def _synchronize(self, payload: bytes, call: ttrpc.Call) -> bytes:
        req = nri_pb2.SynchronizeRequest.FromString(payload)
        self._sync_pods.extend(req.pods)
        self._sync_containers.extend(req.containers)
        if req.more:
            # Accept further chunks; the plugin sees the whole state at the last one.
            return nri_pb2.SynchronizeResponse(more=True).SerializeToString()
        pods, containers = self._sync_pods, self._sync_containers
        self._sync_pods, self._sync_containers = [], []
        log.info("synchronized: %d pods, %d containers", len(pods), len(containers))
        updates = await self._call_optional("synchronize", pods, containers)
        resp = nri_pb2.SynchronizeResponse()
        resp.update.extend(updates or [])
        # the ttrpc server sends this answer as soon as we return: the file follows it
        # (a handler that raised above answers an error, and the runtime drops us)
        asyncio.get_running_loop().call_soon(self._synchronized, self._session_id)
        return resp.SerializeToString()

    async def _shutdown_rpc(self, payload: bytes, call: ttrpc.Call) -> bytes:
        log.info("shutdown requested by the runtime")
        await self._call_optional("shutdown")
        self._shutdown = True
        # Answer first, then close once the answer is on its way.
        asyncio.get_running_loop().call_soon(self.close)
        return b""

    async def _state_change(self, payload: bytes, call: ttrpc.Call) -> bytes:
        # NRI <= 0.11 delivers pod events through StateChange instead of their own RPCs.
        evt = nri_pb2.StateChangeEvent.FromString(payload)
        for method, event in EVENT_METHODS.items():
            if event == evt.event and method != "create_container":
                handler = getattr(self.plugin, method, None)
                if callable(handler):
                    await handler(evt.pod)
        return b""

    def _event_handler(self, method: str, event: int) -> ttrpc.Handler:
        handler = getattr(self.plugin, method)
        if event == nri_pb2.CREATE_CONTAINER:

            async def create(payload: bytes, call: ttrpc.Call) -> bytes:
                req = nri_pb2.CreateContainerRequest.FromString(payload)
                deadline = call.received + self.runtime.request_timeout
                if call.deadline is not None:
                    deadline = min(deadline, call.deadline)
                with _refusals_as_status():
                    # looked up per call: a plugin may hand over to another object once
                    # it is set up (lazy.LazySeccompPlugin), saving a layer per request
                    adjust = await self.plugin.create_container(  # type: ignore[attr-defined]
                        req.pod, req.container, deadline)
                if adjust is None:
                    return b""
                if isinstance(adjust, bytes):
                    return self._framed(adjust)
                return nri_pb2.CreateContainerResponse(adjust=adjust).SerializeToString()

            return create

        async def pod_event(payload: bytes, call: ttrpc.Call) -> bytes:
            # Run/Stop/RemovePodSandboxRequest all carry the pod as field 1.
            await handler(nri_pb2.RunPodSandboxRequest.FromString(payload).pod)
            return b""

        return pod_event

    def _framed(self, adjust: bytes) -> bytes:
        """CreateContainerResponse { ContainerAdjustment adjust = 1; }: the field's tag
        and length before the serialised adjustment. A plugin answers many containers
        with the same few adjustments (the same bytes object, whose hash is kept): each
        is framed once."""
        framed = self._responses.get(adjust)
        if framed is None:
            framed = b"\x0a" + varint(len(adjust)) + adjust
            if len(adjust) <= FRAMED_MAX:
                if len(self._responses) >= FRAMED_KEPT:
                    self._responses.clear()
                self._responses[adjust] = framed
        return framed

    async def _call_optional(self, method: str, *args: Any) -> Any:
        fn = getattr(self.plugin, method, None)
        if not callable(fn):
            return None
        return await fn(*args)


def varint(n: int) -> bytes:
    """A protobuf base-128 varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@contextlib.contextmanager
def _refusals_as_status() -> Iterator[None]:
    """A handler's Refusal becomes the error status its kind stands for."""
    try:
        yield
    except Refusal as exc:
        raise ttrpc.RpcError(REFUSAL_CODES[exc.kind], exc.message) from None


def _rpc_name(method: str) -> str:
    return "".join(part.capitalize() for part in method.split("_"))


def run_plugin(
    plugin: object,
    *,
    argv: Sequence[str] = ("",),
    name: str | None = None,
    idx: str | None = None,
    socket_path: str | None = None,
    ready_file: str | None = None,
) -> int:
    """Blocking entry point for a console script."""
    stub = Stub.from_environment(
        plugin, argv0=argv[0], name=name, idx=idx, socket_path=socket_path,
        ready_file=ready_file,
    )

    async def serve() -> None:
        try:
            await stub.run()
        finally:
            # containerd never sends Shutdown; end-of-file is the signal: let the plugin
            # stop what it started (worker processes) before the process goes
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stub.shutdown_plugin(), SHUTDOWN_GRACE)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0
