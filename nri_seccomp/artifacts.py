"""Fetch a seccomp profile artifact from an OCI registry, with a bound on every call.

The distribution API is spoken with ``requests`` directly. oras-py 0.2.43 was
the intended client, but it cannot be used on the container-creation path: it
sets no timeout on any request (a registry that stalls hangs the caller for
ever), it retries failures with sleeps of 3+5+11+29+83 s, its token backend
cannot answer a Basic challenge and does not refresh tokens, and it never
verifies digests. The project uses oras-py where those do not matter: pushing
artifacts in the tests, the demo and the benchmarks (``testing.registry``).

What a fetch checks, in order, each failure with its own exception:
the registry policy (allow-list, digest required) before any network call; the
manifest's digest when the reference pins one; the config media type
``application/vnd.cncf.seccomp-profile.config.v1+json``; the first layer's
advertised size against the cap before downloading; the bytes actually received
against both the cap and the advertised size while streaming; the blob's sha256
against its descriptor; and non-empty data. Every HTTP call has a timeout and
the whole fetch stops at its deadline, however slowly the registry trickles.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import requests.adapters
import urllib3
import urllib3.connection

from nri_seccomp.reference import Reference

log = logging.getLogger(__name__)

SECCOMP_CONFIG_MEDIA_TYPE = "application/vnd.cncf.seccomp-profile.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
ACCEPT = ", ".join((OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST))
MAX_MANIFEST = 4 * 1024 * 1024
_CHUNK = 64 * 1024


class ArtifactError(Exception):
    """Fetching the artifact failed; the message names the reference and the cause."""

    def __init__(self, reference: str, message: str) -> None:
        super().__init__(f"{reference}: {message}")
        self.reference = reference


class PolicyError(ArtifactError):
    """The reference is not allowed by the configuration; nothing was fetched."""


class NotFound(ArtifactError):
    pass


class Unauthorized(ArtifactError):
    pass


class RegistryUnavailable(ArtifactError):
    """Connection refused, reset or timed out, 5xx or 429: worth serving a stale copy for."""


class InvalidArtifact(ArtifactError):
    """The registry answered, but not with a seccomp profile artifact we accept."""


@dataclass(frozen=True)
class FetchSettings:
    timeout: float = 1.5
    max_size: int = 1024 * 1024
    insecure_registries: frozenset[str] = frozenset()
    tls_verify: bool = True
    ca_file: str | None = None
    docker_config: str | None = None
    allowed: tuple[str, ...] = ("*",)
    require_digest: bool = False


@dataclass(frozen=True)
class Artifact:
    reference: str
    manifest_digest: str
    layer_digest: str
    data: bytes
    config_media_type: str

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class Manifest:
    digest: str
    media_type: str
    body: dict[str, Any]


# ---- a hard deadline for blocking HTTP ---------------------------------------
# requests' timeouts bound each socket operation, not a whole exchange: a server
# that sends one byte a second never trips them. So every connection a fetch
# uses is tracked, and a timer shuts its sockets down when the fetch's deadline
# passes, which wakes the blocked read with an error.

_active = threading.local()


def _track(conn: Any) -> None:
    conns = getattr(_active, "conns", None)
    if conns is not None:
        conns.append(conn)


class _HTTPPool(urllib3.HTTPConnectionPool):
    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)
        _track(conn)
        return conn


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)
        _track(conn)
        return conn


class _Adapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


@contextlib.contextmanager
def _deadline_watchdog(deadline: float) -> Iterator[None]:
    conns: list[Any] = []
    _active.conns = conns

    def expire() -> None:
        for conn in list(conns):
            sock = getattr(conn, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(max(deadline - time.monotonic(), 0.0), expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        _active.conns = None


class ArtifactFetcher:
    """Thread-safe: the plugin calls it from a thread pool."""

    def __init__(self, settings: FetchSettings) -> None:
        self.settings = settings
        self._local = threading.local()
        self._tokens: dict[tuple[str, str], str] = {}
        self._tokens_lock = threading.Lock()
        self._credentials = _load_credentials(settings.docker_config)

    # ---- public --------------------------------------------------------------

    def check_policy(self, ref: Reference) -> None:
        name = ref.name
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.settings.allowed):
            raise PolicyError(
                str(ref),
                f"repository {name} is not in the allowed registries "
                f"({', '.join(self.settings.allowed)})",
            )
        if self.settings.require_digest and ref.digest is None:
            raise PolicyError(str(ref), "a digest reference (@sha256:…) is required by the "
                              "configuration (registry.require_digest)")

    def fetch(
        self,
        ref: Reference,
        deadline: float | None = None,
        have: Callable[[str], bytes | None] | None = None,
    ) -> Artifact:
        """Fetch and check the artifact. ``have(layer_digest)`` may return verified bytes
        already held (the cache): a tag re-check then costs only the manifest request."""
        self.check_policy(ref)
        deadline = deadline if deadline is not None else time.monotonic() + 30
        with _deadline_watchdog(deadline):
            return self._fetch(ref, deadline, have)

    def _fetch(
        self, ref: Reference, deadline: float, have: Callable[[str], bytes | None] | None
    ) -> Artifact:
        manifest = self._manifest(ref, deadline)
        body = manifest.body
        key = str(ref)
        if manifest.media_type in (OCI_INDEX, DOCKER_LIST) or "manifests" in body:
            raise InvalidArtifact(key, f"is an image index ({manifest.media_type}), not a "
                                  "seccomp profile artifact; reference a single manifest")
        config_type = _get(body, "config", "mediaType")
        if config_type != SECCOMP_CONFIG_MEDIA_TYPE:
            raise InvalidArtifact(key, f"config media type is {config_type!r}, expected "
                                  f"{SECCOMP_CONFIG_MEDIA_TYPE!r}")
        layers = body.get("layers")
        if not isinstance(layers, list) or not layers:
            raise InvalidArtifact(key, "artifact has no layers")
        layer = layers[0]
        digest = layer.get("digest") if isinstance(layer, dict) else None
        size = layer.get("size") if isinstance(layer, dict) else None
        if not isinstance(digest, str) or not re.fullmatch(r"sha256:[a-f0-9]{64}", digest):
            raise InvalidArtifact(key, f"first layer has an invalid digest {digest!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArtifact(key, f"first layer has an invalid size {size!r}")
        cap = self.settings.max_size
        if size > cap:
            raise InvalidArtifact(key, f"exceeded maximum allowed artifact size of {cap} bytes "
                                  f"(layer {digest} is {size} bytes)")
        if size == 0:
            raise InvalidArtifact(key, "artifact data is empty")
        held = have(digest) if have is not None else None
        if held is not None and len(held) == size:
            log.info("OCI artifact %s unchanged (layer %s already cached)", key, digest)
            return Artifact(key, manifest.digest, digest, held, config_type)
        log.info("Pulling OCI artifact from ref: %s", key)
        data = self._get_blob(ref, digest, size, deadline)
        log.info("Retrieved OCI artifact seccomp profile of len: %d", len(data))
        return Artifact(key, manifest.digest, digest, data, config_type)

    def fetch_manifest(self, ref: Reference, deadline: float) -> Manifest:
        with _deadline_watchdog(deadline):
            return self._manifest(ref, deadline)

    def _manifest(self, ref: Reference, deadline: float) -> Manifest:
        key = str(ref)
        resp = self._request(ref, "GET", f"manifests/{ref.selector}", deadline,
                             headers={"Accept": ACCEPT})
        raw = self._read(resp, key, MAX_MANIFEST, None, deadline, "manifest")
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if ref.digest is not None and digest != ref.digest:
            raise InvalidArtifact(key, f"manifest digest mismatch: got {digest}")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise InvalidArtifact(key, f"manifest is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise InvalidArtifact(key, "manifest is not a JSON object")
        media_type = str(body.get("mediaType") or resp.headers.get("Content-Type", ""))
        return Manifest(digest, media_type.split(";")[0].strip(), body)

    def manifest_annotations(self, ref: Reference, deadline: float) -> dict[str, str]:
        """An image's manifest annotations (CRI-O's "image annotations")."""
        body = self.fetch_manifest(ref, deadline).body
        annotations = body.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise InvalidArtifact(str(ref), "manifest annotations are not an object")
        return {str(k): str(v) for k, v in annotations.items()}

    # ---- HTTP ------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = _Adapter(max_retries=0, pool_maxsize=4)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.max_redirects = 3
            session.trust_env = False
            if self.settings.ca_file:
                session.verify = self.settings.ca_file
            else:
                session.verify = self.settings.tls_verify
            self._local.session = session
        return session

    def _url(self, ref: Reference, path: str) -> str:
        scheme = "http" if ref.registry in self.settings.insecure_registries else "https"
        host = "registry-1.docker.io" if ref.registry == "docker.io" else ref.registry
        return f"{scheme}://{host}/v2/{ref.repository}/{path}"

    def _timeout(self, ref: Reference, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RegistryUnavailable(str(ref), "deadline exceeded before the request")
        return min(self.settings.timeout, remaining)

    def _request(
        self,
        ref: Reference,
        method: str,
        path: str,
        deadline: float,
        headers: Mapping[str, str] | None = None,
    ) -> requests.Response:
        key = str(ref)
        url = self._url(ref, path)
        scope = f"repository:{ref.repository}:pull"
        hdrs = dict(headers or {})
        token = self._tokens.get((ref.registry, scope))
        if token:
            hdrs["Authorization"] = token
        resp = self._send(ref, method, url, hdrs, deadline)
        if resp.status_code == 401:
            resp.close()
            auth = self._authorize(ref, resp.headers.get("WWW-Authenticate", ""), scope, deadline)
            if auth is None:
                raise Unauthorized(key, f"registry {ref.registry} requires authentication and "
                                   "no credentials are configured for it (registry.docker_config)")
            hdrs["Authorization"] = auth
            resp = self._send(ref, method, url, hdrs, deadline)
        if resp.status_code == 200:
            return resp
        status = resp.status_code
        detail = _error_text(resp)
        resp.close()
        where = f"{method} {url}: HTTP {status}{': ' + detail if detail else ''}"
        if status == 404:
            raise NotFound(key, f"not found ({where})")
        if status in (401, 403):
            raise Unauthorized(key, f"access denied ({where})")
        if status == 429 or status >= 500:
            raise RegistryUnavailable(key, f"registry unavailable ({where})")
        raise ArtifactError(key, f"unexpected answer ({where})")

    def _send(
        self, ref: Reference, method: str, url: str, headers: Mapping[str, str], deadline: float
    ) -> requests.Response:
        timeout = self._timeout(ref, deadline)
        try:
            return self._session().request(
                method, url, headers=dict(headers), timeout=(timeout, timeout), stream=True,
                allow_redirects=True,
            )
        except requests.exceptions.SSLError as exc:
            raise RegistryUnavailable(str(ref), f"TLS error talking to {ref.registry}: "
                                      f"{_short(exc)}") from exc
        except requests.exceptions.TooManyRedirects as exc:
            raise ArtifactError(str(ref), f"too many redirects from {url}") from exc
        except requests.exceptions.Timeout as exc:
            raise RegistryUnavailable(str(ref), f"{ref.registry} did not answer within "
                                      f"{timeout:.2f}s") from exc
        except requests.exceptions.ConnectionError as exc:
            if time.monotonic() >= deadline:
                raise RegistryUnavailable(str(ref), f"{ref.registry} did not answer before "
                                          "the deadline") from exc
            raise RegistryUnavailable(str(ref), f"cannot reach {ref.registry}: "
                                      f"{_short(exc)}") from exc
        except requests.exceptions.RequestException as exc:
            raise ArtifactError(str(ref), f"request to {url} failed: {_short(exc)}") from exc

    def _authorize(
        self, ref: Reference, challenge: str, scope: str, deadline: float
    ) -> str | None:
        creds = self._credentials.get(ref.registry)
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() == "basic":
            if creds is None:
                return None
            return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        if scheme.lower() != "bearer":
            return None
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        realm = fields.get("realm")
        if not realm:
            raise Unauthorized(str(ref), f"registry {ref.registry} sent a Bearer challenge "
                               "without a realm")
        query = {"service": fields.get("service", ""), "scope": fields.get("scope", scope)}
        try:
            resp = self._session().get(
                realm, params=query, timeout=self._timeout(ref, deadline),
                # credentials of this registry only, and only to its own token server
                auth=creds, allow_redirects=False,
            )
        except requests.exceptions.RequestException as exc:
            raise RegistryUnavailable(str(ref), f"token server {realm}: {_short(exc)}") from exc
        if resp.status_code != 200:
            raise Unauthorized(str(ref), f"token server {realm} answered HTTP {resp.status_code}")
        try:
            payload = resp.json()
            token = payload.get("token") or payload.get("access_token")
        except ValueError:
            token = None
        if not isinstance(token, str) or not token:
            raise Unauthorized(str(ref), f"token server {realm} sent no token")
        value = f"Bearer {token}"
        with self._tokens_lock:
            self._tokens[(ref.registry, scope)] = value
        return value

    def _get_blob(self, ref: Reference, digest: str, size: int, deadline: float) -> bytes:
        resp = self._request(ref, "GET", f"blobs/{digest}", deadline)
        data = self._read(resp, str(ref), self.settings.max_size, size, deadline, "layer")
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise InvalidArtifact(str(ref), f"layer digest mismatch: descriptor says {digest}, "
                                  f"content is {actual}")
        if not data:
            raise InvalidArtifact(str(ref), "artifact data is empty")
        return data

    def _read(
        self,
        resp: requests.Response,
        key: str,
        cap: int,
        expected: int | None,
        deadline: float,
        what: str,
    ) -> bytes:
        """Stream the body; stop at the cap, past the advertised size, or at the deadline."""
        limit = cap if expected is None else min(cap, expected)
        declared = resp.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            resp.close()
            raise InvalidArtifact(key, f"{what} is {declared} bytes, more than "
                                  + (f"the advertised {expected}" if expected is not None
                                     and expected < cap else
                                     f"the maximum allowed artifact size of {cap} bytes"))
        buf = bytearray()
        try:
            while True:
                if time.monotonic() > deadline:
                    raise RegistryUnavailable(key, f"{what} download too slow: deadline passed "
                                              f"after {len(buf)} bytes")
                # read1: one receive at a time, so a trickling server cannot hold us
                chunk = resp.raw.read1(_CHUNK)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > limit:
                    raise InvalidArtifact(
                        key,
                        f"{what} sent more than "
                        + (f"its advertised size of {expected} bytes" if expected is not None
                           and expected <= cap else
                           f"the maximum allowed artifact size of {cap} bytes"),
                    )
        except ArtifactError:
            raise
        except Exception as exc:
            # urllib3 raises its own types (ProtocolError, ReadTimeoutError) from read1
            cause = ("deadline passed" if time.monotonic() >= deadline else _short(exc))
            raise RegistryUnavailable(key, f"{what} download failed after {len(buf)} bytes: "
                                      f"{cause}") from exc
        finally:
            resp.close()
        if expected is not None and len(buf) != expected:
            raise InvalidArtifact(key, f"{what} is {len(buf)} bytes, the descriptor says "
                                  f"{expected}")
        return bytes(buf)


def _load_credentials(path: str | None) -> dict[str, tuple[str, str]]:
    """registry host → (user, password) from a docker config.json's "auths"."""
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
        auths = data.get("auths", {})
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"cannot read docker config {path}: {exc}") from exc
    out: dict[str, tuple[str, str]] = {}
    for host, entry in auths.items():
        if not isinstance(entry, dict):
            continue
        name = re.sub(r"^https?://", "", host).split("/")[0]
        if name in ("index.docker.io", "registry-1.docker.io"):
            name = "docker.io"
        if entry.get("auth"):
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        else:
            user, password = entry.get("username", ""), entry.get("password", "")
        if user:
            out[name] = (user, password)
    return out


def _get(body: dict[str, Any], *path: str) -> Any:
    value: Any = body
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _error_text(resp: requests.Response) -> str:
    try:
        text = resp.raw.read1(2048).decode(errors="replace")
    except Exception:
        return ""
    try:
        errors = json.loads(text).get("errors", [])
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)[:300]
    except (ValueError, AttributeError):
        return text.strip()[:200]


def _short(exc: BaseException) -> str:
    text = str(exc)
    # urllib3 nests the useful part deep inside a long repr
    m = re.search(r"(Connection refused|Connection reset by peer|Read timed out|"
                  r"timed out|Name or service not known|Remote end closed connection[^'\")]*)",
                  text)
    return m.group(1) if m else text[:200]
