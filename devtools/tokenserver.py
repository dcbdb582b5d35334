"""A Docker registry token server (the Bearer flow of ghcr.io, quay.io, Docker Hub), for tests.

It issues RS256 JWTs that Debian's docker-registry accepts with ``auth: token``:
the signing certificate travels in the token's ``x5c`` header and is the
registry's ``rootcertbundle``. Basic credentials are checked when ``users`` is
set; every token request is recorded so tests can see who asked for what.

Identity (refresh) tokens: ``refresh_tokens`` maps each known token to the user
it stands for. ``POST`` with the OAuth2 refresh-token grant (distribution's
docs/spec/auth/oauth.md: ``grant_type=refresh_token``, ``refresh_token``,
``service``, ``scope``, ``client_id``) answers ``{"access_token", "expires_in",
"scope"}``; an unknown token is ``400 invalid_grant`` (RFC 6749 section 5.2).
With ``oauth`` False the POST is 404, as on registries without it (GCR), and the
GET takes a known refresh token as the password of an empty user name (the
fallback containerd sends).
"""

from __future__ import annotations

import base64
import datetime
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, parse_qsl, urlparse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

SERVICE = "test-registry"
ISSUER = "test-issuer"
#: a form body larger than this is refused (a refresh-token grant is a few hundred bytes)
MAX_FORM = 16 * 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    def __init__(self, directory: Path, users: dict[str, str] | None = None,
                 refresh_tokens: dict[str, str] | None = None) -> None:
        self.users = users
        #: identity (refresh) token → the user it stands for
        self.refresh_tokens: dict[str, str] = dict(refresh_tokens or {})
        #: whether POST (the OAuth2 grant) is spoken; False: 404, as on GCR
        self.oauth = True
        self.requests: list[dict[str, str]] = []
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token-signer")])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = directory / "token-signer.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer._token(self)

            def do_POST(self) -> None:
                outer._oauth(self)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self._server.server_address[1]}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> TokenServer:
        self._thread.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()

    def registry_auth(self) -> str:
        """The ``auth:`` section of a docker-registry configuration trusting this server."""
        return (f"auth: {{token: {{realm: {self.realm}, service: {SERVICE}, issuer: {ISSUER}, "
                f"rootcertbundle: {self.cert_path}}}}}\n")

    def _token(self, handler: BaseHTTPRequestHandler) -> None:
        query = {k: v[0] for k, v in parse_qs(urlparse(handler.path).query).items()}
        auth = handler.headers.get("Authorization", "")
        self.requests.append(query | {"authorization": auth, "method": "GET"})
        user = ""
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if user == "" and password in self.refresh_tokens:
                user = self.refresh_tokens[password]
            elif self.users is not None and self.users.get(user) != password:
                self._answer(handler, 401)
                return
        elif self.users is not None:
            self._answer(handler, 401)
            return
        token = self._issue(user, query.get("service", SERVICE), query.get("scope", ""))
        self._answer(handler, 200, {"token": token})

    def _oauth(self, handler: BaseHTTPRequestHandler) -> None:
        length = handler.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_FORM:
            self._answer(handler, 400, {"error": "invalid_request"})
            return
        form = dict(parse_qsl(handler.rfile.read(int(length)).decode("utf-8", "replace")))
        self.requests.append(form | {"authorization": handler.headers.get("Authorization", ""),
                                     "method": "POST",
                                     "content-type": handler.headers.get("Content-Type", "")})
        if not self.oauth:
            self._answer(handler, 404)
            return
        if form.get("grant_type") != "refresh_token" or not form.get("client_id"):
            self._answer(handler, 400, {"error": "unsupported_grant_type"})
            return
        user = self.refresh_tokens.get(form.get("refresh_token", ""))
        if user is None:
            self._answer(handler, 400, {"error": "invalid_grant"})
            return
        scope = form.get("scope", "")
        token = self._issue(user, form.get("service", SERVICE), scope)
        self._answer(handler, 200, {"access_token": token, "expires_in": 300, "scope": scope})

    def _issue(self, user: str, service: str, scope: str) -> str:
        """A JWT for ``user`` with pull access to the (first) ``scope``."""
        access = []
        first = scope.split(" ")[0]
        if first.count(":") >= 2:
            kind, rest = first.split(":", 1)
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256",
                  "x5c": [base64.b64encode(self._cert.public_bytes(
                      serialization.Encoding.DER)).decode()]}
        claims = {"iss": ISSUER, "sub": user, "aud": service,
                  "exp": now + 300, "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8),
                  "access": access}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(signature)}"

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, status: int,
                payload: dict[str, object] | None = None) -> None:
        body = json.dumps(payload).encode() if payload is not None else b""
        handler.send_response(status)
        if payload is not None:
            handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
