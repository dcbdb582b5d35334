"""Malformed input on the plugin's socket: each case has a defined outcome, never a hang
or a traceback. The plugin runs as a real subprocess; the runtime end is raw bytes."""

from __future__ import annotations

import struct

import pytest

from devtools import driver
from nri_seccomp.nri.pb import nri_pb2, ttrpc_pb2

from .wire import RawRuntime, mux_frame, request, ttrpc_frame

pytestmark = pytest.mark.integration  # real processes: plugin, registries, servers

CREATE = nri_pb2.CreateContainerRequest(
    pod=nri_pb2.PodSandbox(id="p"), container=nri_pb2.Container(id="c", name="app")
).SerializeToString()


@pytest.fixture
def plugin() -> RawRuntime:
    rt = RawRuntime(driver.baseline_command())
    rt.handshake()
    return rt


def _still_serving(rt: RawRuntime, stream: int = 99) -> None:
    rt.sock.sendall(request(stream, "CreateContainer", CREATE))
    resp = rt.response()
    assert resp.status.code == 0
    nri_pb2.CreateContainerResponse.FromString(resp.payload)


def _clean_exit(rt: RawRuntime, *expected_log: str) -> str:
    code, err = rt.close()
    assert code == 0, err
    assert "Traceback" not in err, err
    for text in expected_log:
        assert text in err
    return err


def test_unknown_method_is_unimplemented(plugin: RawRuntime) -> None:
    plugin.sock.sendall(request(3, "NoSuchMethod", b""))
    resp = plugin.response()
    assert resp.status.code == 12
    assert resp.status.message == "nri.pkg.api.v1alpha1.Plugin.NoSuchMethod not implemented"
    _still_serving(plugin)
    _clean_exit(plugin, "unimplemented method")


def test_garbage_payload_is_invalid_argument(plugin: RawRuntime) -> None:
    plugin.sock.sendall(request(3, "CreateContainer", b"\xff\xff\xff\xff"))
    resp = plugin.response()
    assert resp.status.code == 3
    assert "undecodable payload" in resp.status.message
    _still_serving(plugin)
    _clean_exit(plugin)


def test_garbage_ttrpc_envelope_is_invalid_argument(plugin: RawRuntime) -> None:
    plugin.sock.sendall(mux_frame(1, ttrpc_frame(3, 1, b"\x0a\xff\x01")))
    resp = plugin.response()
    assert resp.status.code == 3
    assert "undecodable ttrpc request" in resp.status.message
    _still_serving(plugin)
    _clean_exit(plugin)


def test_unknown_conn_id_is_dropped_and_logged(plugin: RawRuntime) -> None:
    plugin.sock.sendall(mux_frame(7, b"hello"))
    _still_serving(plugin)
    _clean_exit(plugin, "dropped 5 bytes for unknown connection 7")


def test_one_byte_writes(plugin: RawRuntime) -> None:
    data = request(5, "CreateContainer", CREATE)
    for i in range(len(data)):
        plugin.sock.send(data[i : i + 1])
    assert plugin.response().status.code == 0
    _clean_exit(plugin)


def test_ttrpc_message_over_4mib_is_resource_exhausted(plugin: RawRuntime) -> None:
    size = 4 * 1024 * 1024 + 1
    header = struct.pack(">IIBB", size, 7, 1, 0)
    stream = header + b"\0" * size
    # the mux may carry it in several chunks
    for start in range(0, len(stream), 1 << 20):
        plugin.sock.sendall(mux_frame(1, stream[start : start + (1 << 20)]))
    resp = plugin.response()
    assert resp.status.code == 8
    assert "exceeds maximum message size" in resp.status.message
    _still_serving(plugin)
    _clean_exit(plugin)


def test_mux_length_over_limit_closes_with_log(plugin: RawRuntime) -> None:
    plugin.sock.sendall(struct.pack(">II", 1, 4 * 1024 * 1024 + 11))
    with pytest.raises(EOFError):
        plugin.read_exact(1)
    _clean_exit(plugin, "exceeds the limit of 4194314 bytes")


def test_reserved_conn_id_closes_with_log(plugin: RawRuntime) -> None:
    plugin.sock.sendall(mux_frame(0, b"x"))
    with pytest.raises(EOFError):
        plugin.read_exact(1)
    _clean_exit(plugin, "reserved connection id 0")


def test_truncated_mux_header_then_eof(plugin: RawRuntime) -> None:
    plugin.sock.sendall(b"\x00\x00\x00\x01\x00")
    _clean_exit(plugin, "socket closed inside a chunk")


def test_truncated_ttrpc_frame_then_eof(plugin: RawRuntime) -> None:
    plugin.sock.sendall(mux_frame(1, struct.pack(">IIBB", 100, 9, 1, 0) + b"abc"))
    _clean_exit(plugin, "connection closed inside stream 9's frame")


def test_response_frame_on_server_conn_is_ignored(plugin: RawRuntime) -> None:
    body = ttrpc_pb2.Response().SerializeToString()
    plugin.sock.sendall(mux_frame(1, ttrpc_frame(11, 2, body)))
    _still_serving(plugin)
    _clean_exit(plugin, "ignored frame of type 2 on stream 11")


def test_eof_before_registration_answer() -> None:
    rt = RawRuntime(driver.baseline_command())
    conn, stream, type_, _ = rt.read_message()
    assert (conn, stream, type_) == (2, 1, 1)
    code, err = rt.close()
    assert "Traceback" not in err, err
    assert "registering plugin 10-raw failed" in err
    assert code == 1
