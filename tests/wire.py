"""Helpers for byte-level tests: a raw runtime end over a socketpair, and the golden recordings."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from pathlib import Path

from devtools import driver
from nri_seccomp.nri.pb import nri_pb2, ttrpc_pb2

REPO = Path(__file__).resolve().parent.parent
WIRE_DIR = Path(os.environ.get("NRI_WIRE_DIR", REPO / "tests" / "data" / "nri-wire"))

# The runtime's OK answer to RegisterPlugin (stream 1, empty payload), as recorded.
REGISTER_OK = bytes.fromhex("000000020000000a00000000000000010200")


def wire_dirs() -> list[Path]:
    dirs = sorted(p for p in WIRE_DIR.iterdir() if (p / "r2p.bin").exists())
    assert dirs, f"no golden NRI recordings under {WIRE_DIR} (set NRI_WIRE_DIR)"
    return dirs


def mux_frame(conn: int, payload: bytes) -> bytes:
    return struct.pack(">II", conn, len(payload)) + payload


def ttrpc_frame(stream: int, type_: int, payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">IIBB", len(payload), stream, type_, flags) + payload


def request(stream: int, method: str, payload: bytes, conn: int = 1) -> bytes:
    req = ttrpc_pb2.Request(
        service="nri.pkg.api.v1alpha1.Plugin", method=method, payload=payload,
        timeout_nano=2_000_000_000,
    )
    return mux_frame(conn, ttrpc_frame(stream, 1, req.SerializeToString()))


class RawRuntime:
    """The runtime end of a plugin's socket, byte by byte, with blocking reads and timeouts."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.sock, theirs = socket.socketpair()
        fd = theirs.fileno()
        child_env = driver.child_environment(env)
        child_env.update(NRI_PLUGIN_NAME="raw", NRI_PLUGIN_IDX="10", NRI_PLUGIN_SOCKET="3")
        self.proc = subprocess.Popen(
            argv,
            env=child_env,
            pass_fds=(fd, 3),  # 3 survives close_fds after the dup2
            preexec_fn=lambda: os.dup2(fd, 3),
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self.sock.settimeout(10)
        self.buf = b""

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"plugin closed the socket ({len(self.buf)} of {n} bytes)")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_message(self) -> tuple[int, int, int, bytes]:
        """One mux chunk holding one ttrpc frame: (conn, stream, type, payload)."""
        conn, length = struct.unpack(">II", self.read_exact(8))
        body = self.read_exact(length)
        size, stream, type_, _flags = struct.unpack(">IIBB", body[:10])
        assert size == len(body) - 10
        return conn, stream, type_, body[10:]

    def response(self) -> ttrpc_pb2.Response:
        conn, _stream, type_, payload = self.read_message()
        assert (conn, type_) == (1, 2)
        return ttrpc_pb2.Response.FromString(payload)

    def handshake(self) -> nri_pb2.ConfigureResponse:
        conn, stream, type_, payload = self.read_message()
        assert (conn, stream, type_) == (2, 1, 1)
        req = ttrpc_pb2.Request.FromString(payload)
        assert (req.service, req.method) == ("nri.pkg.api.v1alpha1.Runtime", "RegisterPlugin")
        self.sock.sendall(REGISTER_OK)
        cfg = nri_pb2.ConfigureRequest(runtime_name="containerd", runtime_version="v2.3.0",
                                       request_timeout=2000, registration_timeout=5000)
        self.sock.sendall(request(1, "Configure", cfg.SerializeToString()))
        resp = self.response()
        assert resp.status.code == 0, resp.status.message
        return nri_pb2.ConfigureResponse.FromString(resp.payload)

    def close(self, timeout: float = 10) -> tuple[int, str]:
        """Close our end; the plugin's exit code and what it logged."""
        self.sock.close()
        deadline = time.monotonic() + timeout
        try:
            _, err = self.proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(
                f"plugin did not exit after the socket closed:\n{err.decode()}"
            ) from None
        return self.proc.returncode, err.decode()
