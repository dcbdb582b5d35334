"""A registry that misbehaves on purpose, on 127.0.0.1, for the fault tests.

Modes:
  ``hang``      accept the connection and never answer
  ``trickle``   answer correctly, one byte per ``interval`` seconds
  ``status:N``  answer every request with HTTP N (500, 401, 404, 429, …)
  ``reset``     reset the connection (TCP RST) after reading the request
  ``redirect``  redirect blob downloads to another host (``target``), recording headers
  ``lying-size``  the manifest advertises the layer's real size, the blob sends more
  ``bad-digest``  the blob's bytes do not match the digest in the manifest
  ``ok``        a correct artifact (for the redirect target)
"""

from __future__ import annotations

import hashlib
import json
import socket
import socketserver
import struct
import threading
from types import TracebackType
from typing import Any

SECCOMP_CONFIG = "application/vnd.cncf.seccomp-profile.config.v1+json"
PROFILE = b'{"defaultAction": "SCMP_ACT_ALLOW"}'


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class BadRegistry:
    def __init__(self, mode: str, profile: bytes = PROFILE, host: str = "127.0.0.1",
                 interval: float = 1.0, target: str = "") -> None:
        self.mode = mode
        self.profile = profile
        self.interval = interval
        self.target = target
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()
        self.config = b"{}\n"
        layer_digest = _digest(profile)
        if mode == "bad-digest":
            layer_digest = _digest(profile + b" ")
        self.layer_digest = layer_digest
        self.manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": SECCOMP_CONFIG, "digest": _digest(self.config), "size": 3},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest, "size": len(profile)}],
        }).encode()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer._handle(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((host, 0), Handler)
        self.address = f"{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._stop = threading.Event()

    def __enter__(self) -> BadRegistry:
        self._thread.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    # ---- one connection ------------------------------------------------------

    def _read_request(self, conn: socket.socket) -> tuple[str, dict[str, str]] | None:
        conn.settimeout(10)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(4096)
            if not chunk:
                return None
            buf += chunk
        head = buf.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")
        headers = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        return head[0], headers

    def _handle(self, conn: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                req = self._read_request(conn)
            except OSError:
                return
            if req is None:
                return
            line, headers = req
            with self._lock:
                self.requests.append((line, headers))
            if not self._answer(conn, line):
                return

    def _answer(self, conn: socket.socket, line: str) -> bool:
        mode = self.mode
        if mode == "hang":
            self._stop.wait(60)
            return False
        if mode == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            return False
        if mode.startswith("status:"):
            code = int(mode.split(":")[1])
            extra = {"WWW-Authenticate": 'Basic realm="test"'} if code == 401 else {}
            if code == 429:
                extra["Retry-After"] = "30"
            body = json.dumps({"errors": [{"code": "TEST", "message": f"status {code}"}]})
            return self._send(conn, code, body.encode(), extra)
        path = line.split(" ")[1]
        if path == "/v2/":
            return self._send(conn, 200, b"{}")
        if "/manifests/" in path:
            return self._send(conn, 200, self.manifest,
                              {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        if "/blobs/" in path:
            if mode == "redirect":
                return self._send(conn, 307, b"", {"Location": f"http://{self.target}{path}"})
            data = self.profile
            if mode == "lying-size":
                data = self.profile + b" " * (2 * 1024 * 1024)
                # no Content-Length: the client only learns by counting
                return self._send(conn, 200, data, chunked=True)
            return self._send(conn, 200, data)
        return self._send(conn, 404, b'{"errors": [{"code": "NAME_UNKNOWN"}]}')

    def _send(self, conn: socket.socket, code: int, body: bytes,
              headers: dict[str, Any] | None = None, chunked: bool = False) -> bool:
        lines = [f"HTTP/1.1 {code} X"]
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        if chunked:
            lines.append("Transfer-Encoding: chunked")
            payload = b"".join(
                f"{len(body[i:i + 65536]):x}\r\n".encode() + body[i:i + 65536] + b"\r\n"
                for i in range(0, len(body), 65536)
            ) + b"0\r\n\r\n"
        else:
            lines.append(f"Content-Length: {len(body)}")
            payload = body
        data = ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
        try:
            if self.mode == "trickle":
                for i in range(len(data)):
                    if self._stop.wait(self.interval):
                        return False
                    conn.sendall(data[i : i + 1])
            else:
                conn.sendall(data)
        except OSError:
            return False
        return True

    def seen(self, fragment: str) -> list[dict[str, str]]:
        with self._lock:
            return [h for line, h in self.requests if fragment in line]


__all__ = ["BadRegistry"]
