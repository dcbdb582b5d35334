"""A registry that misbehaves on purpose, on 127.0.0.1, for the fault tests.

It serves one artifact (any repository, any tag) over raw sockets, so it can
break HTTP in ways a real server never would. Modes:

  ``ok``            a correct artifact (e.g. the target of ``redirect``)
  ``hang``          accept the connection, read the request, never answer
  ``trickle``       answer correctly, one byte per ``interval`` seconds, headers included
  ``trickle-blob``  manifest at once; the blob's body one byte per ``interval``
  ``stall-body``    the blob's headers (with Content-Length), then no body at all
  ``status:N``      answer every request with HTTP N (500, 401 Basic, 404, 429 Retry-After)
  ``reset``         reset the connection (TCP RST) after reading the request
  ``redirect``      redirect blob downloads to ``target`` (another host), which records headers
  ``lying-size``    the descriptor has the real size; the blob streams 2 MiB more, chunked
                    (no Content-Length: only counting tells)
  ``oversize-length``  as ``lying-size`` but with an honest, larger Content-Length
  ``short``         the blob ends before the descriptor's size
  ``bad-digest``    the blob's bytes do not match the digest in the manifest
  ``index``         the manifest is an OCI image index
  ``not-tls``       answer every connection at once with a plain-HTTP 400 and close
                    (what a TLS client meets on a port that does not speak TLS)

Options: ``manifest`` serves those bytes as every manifest; ``location`` is the
``redirect`` Location (``{path}`` is replaced by the request's path); ``body``
is the body of a ``status:N`` answer; ``challenge`` its WWW-Authenticate for
401; ``tls`` (cert, key) serves HTTPS.

Requests are recorded (``requests``, ``seen``) and TCP connections counted
(``connections``) to show what reached it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import socketserver
import ssl
import struct
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

SECCOMP_CONFIG = "application/vnd.cncf.seccomp-profile.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
PROFILE = b'{"defaultAction": "SCMP_ACT_ALLOW"}'
EXTRA = 2 * 1024 * 1024


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class BadRegistry:
    def __init__(self, mode: str, profile: bytes = PROFILE, host: str = "127.0.0.1",
                 interval: float = 1.0, target: str = "", *, manifest: bytes | None = None,
                 location: str = "", body: bytes | None = None, challenge: str = "",
                 tls: tuple[Path, Path] | None = None) -> None:
        self.mode = mode
        self.location = location
        self.body = body
        self.challenge = challenge
        self.connections = 0
        self._tls: ssl.SSLContext | None = None
        if tls is not None:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.load_cert_chain(str(tls[0]), str(tls[1]))
        self.profile = profile
        self.interval = interval
        self.target = target
        #: (request line, lower-cased headers), in arrival order
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()
        self.config = b"{}\n"
        manifest_override = manifest
        self.layer_digest = _digest(profile + b" " if mode == "bad-digest" else profile)
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": SECCOMP_CONFIG, "digest": _digest(self.config),
                       "size": len(self.config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": self.layer_digest, "size": len(profile),
                        "annotations": {"org.opencontainers.image.title": "seccomp.json"}}],
        }
        if mode == "index":
            doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": _digest(json.dumps(doc).encode()),
                 "size": len(json.dumps(doc)),
                 "platform": {"os": "linux", "architecture": "amd64"}}]}
        self.manifest = manifest_override if manifest_override is not None else (
            json.dumps(doc).encode())
        self.manifest_digest = _digest(self.manifest)
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with outer._lock:
                    outer.connections += 1
                conn = self.request
                if outer.mode == "not-tls":
                    with contextlib.suppress(OSError):
                        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                     b"Connection: close\r\n\r\n")
                    return
                if outer._tls is not None:
                    conn.settimeout(10)
                    try:
                        conn = outer._tls.wrap_socket(conn, server_side=True)
                    except (ssl.SSLError, OSError):
                        return
                outer._handle(conn)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((host, 0), Handler)
        self.address = f"{host}:{self._server.server_address[1]}"
        # a short poll: shutdown() waits for it, once per test
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._stop = threading.Event()

    def __enter__(self) -> BadRegistry:
        self._thread.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def seen(self, fragment: str) -> list[dict[str, str]]:
        """Headers of the requests whose request line contains ``fragment``."""
        with self._lock:
            return [h for line, h in self.requests if fragment in line]

    # ---- one connection ------------------------------------------------------

    def _read_request(self, conn: socket.socket) -> tuple[str, dict[str, str]] | None:
        conn.settimeout(10)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(4096)
            if not chunk:
                return None
            buf += chunk
            if len(buf) > 65536:
                return None
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
        method, _, rest = line.partition(" ")
        path = rest.split(" ")[0]
        head = method == "HEAD"
        if mode == "hang":
            self._stop.wait(60)
            return False
        if mode == "reset":
            # SO_LINGER 0: close() sends RST instead of FIN
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            return False
        if mode.startswith("status:"):
            code = int(mode.split(":")[1])
            extra = ({"WWW-Authenticate": self.challenge or 'Basic realm="test"'}
                     if code == 401 else {})
            if code == 429:
                extra["Retry-After"] = "30"
            body = self.body if self.body is not None else json.dumps(
                {"errors": [{"code": "TEST", "message": f"status {code}"}]}).encode()
            return self._send(conn, code, body, extra, head=head)
        if path == "/v2/":
            return self._send(conn, 200, b"{}", head=head)
        if "/manifests/" in path:
            return self._send(conn, 200, self.manifest, {
                "Content-Type": OCI_INDEX if mode == "index" else OCI_MANIFEST,
                "Docker-Content-Digest": self.manifest_digest}, head=head)
        if "/blobs/" in path:
            return self._blob(conn, path, head)
        return self._send(conn, 404, b'{"errors": [{"code": "NAME_UNKNOWN"}]}', head=head)

    def _blob(self, conn: socket.socket, path: str, head: bool) -> bool:
        mode = self.mode
        data = self.profile
        if mode == "redirect":
            where = (self.location.replace("{path}", path) if self.location
                     else f"http://{self.target}{path}")
            return self._send(conn, 307, b"", {"Location": where}, head=head)
        if mode == "lying-size":
            return self._send(conn, 200, data + b" " * EXTRA, chunked=True, head=head)
        if mode == "oversize-length":
            return self._send(conn, 200, data + b" " * EXTRA, head=head)
        if mode == "short":
            return self._send(conn, 200, data[: len(data) // 2], head=head)
        if mode == "stall-body":
            try:
                conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\n\r\n".encode())
            except OSError:
                return False
            self._stop.wait(60)
            return False
        if mode == "trickle-blob":
            return self._send(conn, 200, data, head=head, trickle_body=True)
        return self._send(conn, 200, data, head=head)

    def _send(self, conn: socket.socket, code: int, body: bytes,
              headers: dict[str, Any] | None = None, chunked: bool = False,
              head: bool = False, trickle_body: bool = False) -> bool:
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
        header_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode()
        if head:
            payload = b""
        try:
            if self.mode == "trickle":
                return self._trickle(conn, header_bytes + payload)
            conn.sendall(header_bytes)
            if trickle_body:
                return self._trickle(conn, payload)
            conn.sendall(payload)
        except OSError:
            return False
        return True

    def _trickle(self, conn: socket.socket, data: bytes) -> bool:
        for i in range(len(data)):
            if self._stop.wait(self.interval):
                return False
            conn.sendall(data[i : i + 1])
        return True


__all__ = ["BadRegistry"]
