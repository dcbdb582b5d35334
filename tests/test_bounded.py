"""Every answer fits and is sent; every quoted value and log line is bounded (no I/O but pipes)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from nri_seccomp import bounded
from nri_seccomp.nri import ttrpc
from nri_seccomp.nri.pb import ttrpc_pb2


def test_quote_untrusted_cuts_before_cleaning_and_strips_control_characters() -> None:
    hostile = '"' * (4 * 1024 * 1024)
    quoted = bounded.quote_untrusted(hostile)
    assert len(quoted) < 200 and "4194204 more characters cut" in quoted
    forged = bounded.quote_untrusted("a\nERROR forged line\x1b[31m")
    assert "\n" not in forged and "\x1b" not in forged and "\\n" in forged


def test_quote_untrusted_tail_keeps_the_end() -> None:
    text = "x" * 1000 + "No such file or directory\n\x1b"
    quoted = bounded.quote_untrusted_tail(text, 40)
    assert quoted.startswith("(987 characters cut) …'") and "No such file or directory" in quoted
    assert "\n" not in quoted and "\x1b" not in quoted
    assert bounded.quote_untrusted_tail("short", 40) == "'short'"


def test_strip_query_drops_signatures() -> None:
    url = "https://blobs.example/x/y?X-Amz-Signature=SECRET&X-Amz-Credential=KEY#frag"
    assert bounded.strip_query(url) == "https://blobs.example/x/y"


def test_status_message_fits_in_bytes_and_says_how_much_was_cut() -> None:
    message = bounded.status_message("é" * 100_000)
    assert len(message.encode()) <= bounded.MAX_STATUS
    assert message.endswith("more bytes cut)")
    assert bounded.status_message("short\nline") == "short\\nline"


def test_error_response_is_the_one_place_statuses_are_cut() -> None:
    body = ttrpc.error_response(ttrpc.Code.FAILED_PRECONDITION, "x" * 8_400_000)
    resp = ttrpc_pb2.Response.FromString(body)
    assert resp.status.code == ttrpc.Code.FAILED_PRECONDITION
    assert len(resp.status.message.encode()) <= bounded.MAX_STATUS


def test_log_records_are_one_bounded_line() -> None:
    formatter = bounded.BoundedFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("t", logging.WARNING, __file__, 1, "registry said %s",
                               ("x\ny" * 1_000_000,), None)
    line = formatter.format(record)
    assert "\n" not in line and len(line) <= bounded.MAX_LOG + 60


class _Pipe:
    """One direction of a connection: what the server sends lands in ``sent``."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.sent.append(data)


def _serve(handler: ttrpc.Handler, payload: bytes = b"") -> ttrpc_pb2.Response:
    async def go() -> ttrpc_pb2.Response:
        stream = asyncio.StreamReader()
        req = ttrpc_pb2.Request(service="s", method="m", payload=payload)
        stream.feed_data(ttrpc.encode_frame(1, ttrpc.TYPE_REQUEST, req.SerializeToString()))
        stream.feed_eof()
        pipe = _Pipe()
        server = ttrpc.Server({"s/m": handler})
        await server.serve(stream, pipe)
        await server.wait_idle()
        [frame] = pipe.sent
        return ttrpc_pb2.Response.FromString(frame[ttrpc.HEADER_SIZE:])

    return asyncio.run(go())


def test_an_unsendable_answer_becomes_a_short_internal_error() -> None:
    """The attack: an answer over 4 MiB would never be sent, and containerd drops the plugin."""

    async def huge(payload: bytes, call: ttrpc.Call) -> bytes:
        return b"x" * (ttrpc.MAX_MESSAGE + 1)

    resp = _serve(huge)
    assert resp.status.code == ttrpc.Code.INTERNAL
    assert "exceeds the maximum message size" in resp.status.message


def test_a_huge_error_from_a_handler_is_answered_cut() -> None:
    async def refuse(payload: bytes, call: ttrpc.Call) -> bytes:
        raise ttrpc.RpcError(ttrpc.Code.FAILED_PRECONDITION, "'" * 8_400_000)

    resp = _serve(refuse)
    assert resp.status.code == ttrpc.Code.FAILED_PRECONDITION
    assert len(resp.status.message.encode()) <= bounded.MAX_STATUS


def test_a_crashing_handler_is_answered_internal() -> None:
    async def crash(payload: bytes, call: ttrpc.Call) -> bytes:
        raise ValueError("v" * 5_000_000)

    resp = _serve(crash)
    assert resp.status.code == ttrpc.Code.INTERNAL
    assert len(resp.status.message.encode()) <= bounded.MAX_STATUS


@pytest.mark.parametrize("close", ["eof", "cancel"])
def test_client_call_without_timeout_fails_when_the_connection_ends(close: str) -> None:
    """Defect: ``Client.call(timeout=None)`` hung for ever once the connection was gone."""

    async def go() -> None:
        stream = asyncio.StreamReader()
        client = ttrpc.Client(stream, lambda _b: None)
        reader = asyncio.create_task(client.run())
        call = asyncio.create_task(client.call("s", "m", b""))
        await asyncio.sleep(0)
        if close == "eof":
            stream.feed_eof()
        else:
            reader.cancel()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(call, 5)
        with pytest.raises(ConnectionResetError):
            await client.call("s", "m", b"")

    asyncio.run(go())
