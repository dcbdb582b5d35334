"""ttrpc, containerd's light RPC, over one logical connection of the mux.

A frame is a 10-byte header, ``uint32 length | uint32 stream_id | uint8 type |
uint8 flags`` (big-endian), then ``length`` bytes of protobuf: a ``ttrpc.Request``
for type 1, a ``ttrpc.Response`` for type 2. Clients use odd stream ids and the
response carries the request's id. Errors travel as a Response whose status has
a non-zero gRPC code.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from nri_seccomp.bounded import status_message
from nri_seccomp.errors import NriSeccompError
from nri_seccomp.nri.pb import ttrpc_pb2

log = logging.getLogger(__name__)

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size
MAX_MESSAGE = 4 * 1024 * 1024

TYPE_REQUEST = 1
TYPE_RESPONSE = 2
TYPE_DATA = 3


class Code(enum.IntEnum):
    """gRPC status codes, as ttrpc uses them."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RpcError(NriSeccompError):
    """An error status, raised by handlers to answer one, and by clients on receiving one."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        try:
            name = Code(self.code).name
        except ValueError:
            name = str(self.code)
        return f"{name}: {self.message}"


class ProtocolError(NriSeccompError):
    """The peer broke ttrpc framing; the connection cannot be used any further."""


@dataclass(frozen=True)
class Frame:
    stream_id: int
    type: int
    flags: int
    payload: bytes


def encode_frame(stream_id: int, type_: int, payload: bytes, flags: int = 0) -> bytes:
    if len(payload) > MAX_MESSAGE:
        raise ValueError(f"ttrpc: message of {len(payload)} bytes exceeds {MAX_MESSAGE}")
    return HEADER.pack(len(payload), stream_id, type_, flags) + payload


async def read_frame(stream: asyncio.StreamReader) -> Frame | None:
    """Read one frame; None at a clean end-of-file between frames.

    An oversized frame is consumed and returned with an empty payload and
    ``type`` negated, so that the server can answer RESOURCE_EXHAUSTED for its
    stream (as ttrpc does) without buffering it.
    """
    try:
        header = await stream.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError(
                f"ttrpc: connection closed inside a frame header ({len(exc.partial)} of "
                f"{HEADER_SIZE} bytes)"
            ) from None
        return None
    length, stream_id, type_, flags = HEADER.unpack(header)
    try:
        if length > MAX_MESSAGE:
            remaining = length
            while remaining:
                chunk = await stream.readexactly(min(remaining, 1 << 20))
                remaining -= len(chunk)
            return Frame(stream_id, -type_, flags, b"")
        payload = await stream.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(
            f"ttrpc: connection closed inside stream {stream_id}'s frame "
            f"({len(exc.partial)} of {length} bytes)"
        ) from None
    return Frame(stream_id, type_, flags, payload)


def error_response(code: int, message: str) -> bytes:
    """An error answer; the one place every status message is cut to what always fits."""
    resp = ttrpc_pb2.Response()
    resp.status.code = code
    resp.status.message = status_message(message)
    return resp.SerializeToString()


@dataclass
class Call:
    """What a handler knows about the request it serves."""

    service: str
    method: str
    metadata: dict[str, str]
    #: time.monotonic() by which the caller wants the answer, if it said so.
    deadline: float | None
    received: float = field(default_factory=time.monotonic)


Handler = Callable[[bytes, Call], Awaitable[bytes]]
Send = Callable[[bytes], None]


class Server:
    """Serves unary requests of one connection; each request runs in its own task."""

    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        # keys are "service/method"
        self._handlers = dict(handlers)
        self._tasks: set[asyncio.Task[None]] = set()
        self.error: ProtocolError | None = None

    async def serve(self, stream: asyncio.StreamReader, send: Send) -> None:
        """Serve until end-of-file. Framing errors end the connection with a log line."""
        try:
            while True:
                frame = await read_frame(stream)
                if frame is None:
                    return
                if frame.type == -TYPE_REQUEST:
                    log.warning(
                        "ttrpc: request on stream %d exceeds %d bytes, refused",
                        frame.stream_id,
                        MAX_MESSAGE,
                    )
                    self._reply(
                        send,
                        frame.stream_id,
                        error_response(
                            Code.RESOURCE_EXHAUSTED,
                            f"message length exceeds maximum message size of {MAX_MESSAGE}",
                        ),
                    )
                    continue
                if frame.type != TYPE_REQUEST:
                    log.warning(
                        "ttrpc: ignored frame of type %d on stream %d (only unary requests "
                        "are served)",
                        frame.type,
                        frame.stream_id,
                    )
                    continue
                task = asyncio.create_task(self._handle(frame, send))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except ProtocolError as exc:
            # Nothing after a broken frame can be trusted: end the connection.
            log.error("%s; closing the connection", exc)
            self.error = exc

    async def _handle(self, frame: Frame, send: Send) -> None:
        try:
            req = ttrpc_pb2.Request.FromString(frame.payload)
        except DecodeError as exc:
            log.warning("ttrpc: undecodable request on stream %d: %s", frame.stream_id, exc)
            self._reply(
                send,
                frame.stream_id,
                error_response(Code.INVALID_ARGUMENT, f"undecodable ttrpc request: {exc}"),
            )
            return
        key = f"{req.service}/{req.method}"
        handler = self._handlers.get(key)
        if handler is None:
            log.warning("ttrpc: unimplemented method %s", key)
            self._reply(
                send,
                frame.stream_id,
                error_response(Code.UNIMPLEMENTED, f"{req.service}.{req.method} not implemented"),
            )
            return
        now = time.monotonic()
        call = Call(
            service=req.service,
            method=req.method,
            metadata={kv.key: kv.value for kv in req.metadata},
            deadline=now + req.timeout_nano / 1e9 if req.timeout_nano > 0 else None,
            received=now,
        )
        try:
            payload = await handler(req.payload, call)
            body = ttrpc_pb2.Response(payload=payload).SerializeToString()
            if len(body) > MAX_MESSAGE:
                # unsendable: the runtime would wait for its deadline and drop the plugin
                log.error("ttrpc: %s answer of %d bytes exceeds %d, answering INTERNAL",
                          key, len(body), MAX_MESSAGE)
                body = error_response(Code.INTERNAL, f"{key}: answer of {len(body)} bytes "
                                      f"exceeds the maximum message size of {MAX_MESSAGE}")
        except RpcError as exc:
            body = error_response(exc.code, exc.message)
        except DecodeError as exc:
            log.warning("ttrpc: %s: undecodable payload: %s", key, exc)
            body = error_response(Code.INVALID_ARGUMENT, f"{key}: undecodable payload: {exc}")
        except Exception as exc:
            log.exception("ttrpc: %s failed", key)
            body = error_response(Code.INTERNAL, f"{key}: {type(exc).__name__}: {exc}")
        self._reply(send, frame.stream_id, body)

    @staticmethod
    def _reply(send: Send, stream_id: int, body: bytes) -> None:
        try:
            frame = encode_frame(stream_id, TYPE_RESPONSE, body)
        except ValueError:
            # never leave a request unanswered: a short error always encodes
            frame = encode_frame(stream_id, TYPE_RESPONSE,
                                 error_response(Code.INTERNAL, "answer too large to send"))
        try:
            send(frame)
        except (ConnectionError, OSError) as exc:
            log.info("ttrpc: could not answer stream %d: %s", stream_id, exc)

    async def wait_idle(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class Client:
    """Unary calls over one connection; :meth:`run` must be reading responses."""

    def __init__(self, stream: asyncio.StreamReader, send: Send) -> None:
        self._stream = stream
        self._send = send
        self._ids = itertools.count(1, 2)
        self._pending: dict[int, asyncio.Future[ttrpc_pb2.Response]] = {}
        self._closed: Exception | None = None

    async def run(self) -> None:
        try:
            await self._read_responses()
        finally:
            # however reading ended (EOF, framing error, cancellation), no call waits for ever
            if self._closed is None:
                self._fail(ConnectionResetError("ttrpc: connection closed"))

    async def _read_responses(self) -> None:
        try:
            while True:
                frame = await read_frame(self._stream)
                if frame is None:
                    break
                fut = self._pending.pop(frame.stream_id, None)
                if fut is None or frame.type != TYPE_RESPONSE:
                    log.warning(
                        "ttrpc: unexpected frame type %d for stream %d", frame.type, frame.stream_id
                    )
                    continue
                try:
                    resp = ttrpc_pb2.Response.FromString(frame.payload)
                except DecodeError as exc:
                    fut.set_exception(ProtocolError(f"ttrpc: undecodable response: {exc}"))
                    continue
                if not fut.done():
                    fut.set_result(resp)
            self._fail(ConnectionResetError("ttrpc: connection closed"))
        except ProtocolError as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        self._closed = exc
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    async def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> bytes:
        if self._closed is not None:
            raise ConnectionResetError(f"ttrpc: connection closed ({self._closed})")
        stream_id = next(self._ids)
        req = ttrpc_pb2.Request(service=service, method=method, payload=payload)
        if timeout is not None:
            req.timeout_nano = int(timeout * 1e9)
        for key, value in (metadata or {}).items():
            req.metadata.add(key=key, value=value)
        fut: asyncio.Future[ttrpc_pb2.Response] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = fut
        try:
            self._send(encode_frame(stream_id, TYPE_REQUEST, req.SerializeToString()))
            resp = await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(stream_id, None)
        if resp.status.code != Code.OK:
            raise RpcError(resp.status.code, resp.status.message)
        return resp.payload
