"""NRI's multiplexed socket: several logical connections over one stream.

Every chunk on the socket is an 8-byte header, ``uint32 conn_id | uint32
length`` (big-endian), followed by ``length`` bytes of that connection's byte
stream. A message longer than one chunk is split, so a reader must treat each
connection as a byte stream and reassemble it; it must never assume that one
chunk carries one ttrpc message.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Iterator

from nri_seccomp.errors import NriSeccompError

log = logging.getLogger(__name__)

HEADER = struct.Struct(">II")
HEADER_SIZE = HEADER.size
#: The largest chunk NRI's own writer sends (one whole ttrpc frame); we accept up to this.
MAX_PAYLOAD = 4 * 1024 * 1024 + 10
#: The largest chunk we send. containerd's ttrpc reads a connection through a 4096-byte
#: bufio.Reader, and NRI's mux hands over one chunk per read, failing with ENOMEM when
#: the chunk does not fit: the runtime then drops the plugin and creates the container
#: *without its seccomp profile*. Seen on real containerd 2.2.4, 2.3.4 and main with any
#: answer over 4096 bytes; 4096 bytes and below are read fine.
WRITE_CHUNK = 4096

#: The runtime calls the plugin on this connection (the plugin is the ttrpc server).
PLUGIN_SERVICE_CONN = 1
#: The plugin calls the runtime on this connection (the plugin is the ttrpc client).
RUNTIME_SERVICE_CONN = 2


class MuxError(NriSeccompError):
    """The multiplexed stream is malformed; the socket cannot be trusted any further."""


def encode(conn_id: int, data: bytes, chunk: int = WRITE_CHUNK) -> bytes:
    """Frame ``data`` for ``conn_id``, split into chunks of at most ``chunk`` bytes."""
    if not 0 < conn_id <= 0xFFFFFFFF:
        raise ValueError(f"mux: invalid connection id {conn_id}")
    if len(data) <= chunk:
        return HEADER.pack(conn_id, len(data)) + data
    return b"".join(_chunks(conn_id, data, chunk))


def _chunks(conn_id: int, data: bytes, chunk: int) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), chunk):
        part = view[start : start + chunk]
        yield HEADER.pack(conn_id, len(part))
        yield bytes(part)


class Demuxer:
    """Incremental parser of the socket's bytes into (conn_id, payload) chunks.

    Pure and synchronous so that it can be fed byte by byte in tests and fuzzed.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._max = max_payload

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete chunk."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        out: list[tuple[int, bytes]] = []
        while len(self._buf) >= HEADER_SIZE:
            conn_id, length = HEADER.unpack_from(self._buf)
            if conn_id == 0:
                raise MuxError("mux: chunk for reserved connection id 0")
            if length > self._max:
                raise MuxError(
                    f"mux: chunk of {length} bytes for connection {conn_id} "
                    f"exceeds the limit of {self._max} bytes"
                )
            end = HEADER_SIZE + length
            if len(self._buf) < end:
                break
            out.append((conn_id, bytes(self._buf[HEADER_SIZE:end])))
            del self._buf[:end]
        return out


class Mux:
    """One multiplexed socket: demultiplexes reads into per-connection streams.

    ``open(conn_id)`` returns an :class:`asyncio.StreamReader` that receives the
    connection's reassembled byte stream; :meth:`write` frames outgoing data.
    Data for a connection nobody opened is dropped with a log line, as a peer
    may legitimately open connections we do not serve.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        max_read_payload: int = MAX_PAYLOAD,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._conns: dict[int, asyncio.StreamReader] = {}
        self._demux = Demuxer(max_read_payload)
        self._closed = False
        self.error: Exception | None = None

    def open(self, conn_id: int) -> asyncio.StreamReader:
        stream = asyncio.StreamReader(limit=2**32)
        self._conns[conn_id] = stream
        return stream

    def write(self, conn_id: int, data: bytes) -> None:
        if self._closed or self._writer.is_closing():
            raise ConnectionResetError("mux: socket is closed")
        self._writer.write(encode(conn_id, data))

    async def drain(self) -> None:
        await self._writer.drain()

    async def run(self) -> None:
        """Read the socket until end-of-file or a framing error, then end every stream."""
        try:
            while True:
                data = await self._reader.read(256 * 1024)
                if not data:
                    if self._demux.pending:
                        log.warning(
                            "mux: socket closed inside a chunk (%d bytes pending)",
                            self._demux.pending,
                        )
                    break
                for conn_id, payload in self._demux.feed(data):
                    stream = self._conns.get(conn_id)
                    if stream is None:
                        log.warning(
                            "mux: dropped %d bytes for unknown connection %d",
                            len(payload),
                            conn_id,
                        )
                        continue
                    stream.feed_data(payload)
        except MuxError as exc:
            log.error("%s; closing the socket", exc)
            self.error = exc
        except (ConnectionError, OSError) as exc:
            log.info("mux: socket error: %s", exc)
            self.error = exc
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for stream in self._conns.values():
            stream.feed_eof()
        self._writer.close()
