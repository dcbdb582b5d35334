"""Fetch a seccomp profile artifact from an OCI registry, with a bound on every call.

The distribution API is spoken with ``requests`` directly, on a session of our
own with no retries. oras-py 0.2.43 was the intended client, but none of it is
safe on the container-creation path: it sets no timeout on any request (a
registry that stalls hangs the caller for ever); ``do_request`` is wrapped in a
retry decorator that sleeps 3+5+11+29+83 s, so overriding the request method
still leaves the retry and token logic around it; its token backend cannot
answer a Basic challenge, does not refresh tokens and has sent one host's
credentials to another host's token server; ``get_manifest`` discards the raw
bytes (no digest can be checked) and nothing is ever verified; its reference
helper does not normalise names as containerd does (see ``reference``); and
``import oras.client`` costs about 0.27 s of start-up. oras-py is used where
none of that matters: pushing artifacts in the tests, the demo and the
benchmarks (``testing.registry.LocalRegistry.push_with_oras``).

What a fetch checks, in order, each failure with its own exception:
the registry policy (allow-list, digest required) before any network call; the
manifest's digest when the reference pins one; that it is a single manifest
(an image index is refused, as CRI-O 1.30 does: no platform is picked); the
config media type ``application/vnd.cncf.seccomp-profile.config.v1+json``; the
first layer's advertised size against the cap before downloading; the bytes
actually received against both the cap and the advertised size while
streaming; the blob's digest against its descriptor; and non-empty data.

Bounds: every HTTP call has ``settings.timeout`` for connecting and for each
read, and the whole fetch stops at its deadline however slowly the registry
trickles: the body is read one receive at a time with the deadline checked in
between, and a watchdog shuts the fetch's sockets down at the deadline, which
also ends a trickled status line or header block.

Credentials: anonymous first; on a 401 the challenge decides. ``Basic``: the
docker config's ``auths`` entry for that registry. ``Bearer``: a token from the
challenge's realm, asked with that registry's credentials if it has any (never
over plain HTTP unless the registry is configured insecure), then one retry. A
redirect to another origin (blob storage) never carries the Authorization
header, and a 401 from such a host is not answered with credentials. The docker
config is re-read when it changes, so rotated credentials apply without a restart.
"""

from __future__ import annotations

import base64
import binascii
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import requests
import requests.adapters
import urllib3

from nri_seccomp.reference import DIGEST_PATTERNS, Reference

log = logging.getLogger(__name__)

SECCOMP_CONFIG_MEDIA_TYPE = "application/vnd.cncf.seccomp-profile.config.v1+json"
EMPTY_CONFIG_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
UNKNOWN_CONFIG_MEDIA_TYPE = "application/vnd.unknown.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
# the index types are asked for so that an index is recognised and refused by
# name rather than turned into a confusing 404 by content negotiation
ACCEPT = ", ".join((OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST))
MAX_MANIFEST = 4 * 1024 * 1024
MAX_TOKEN_RESPONSE = 64 * 1024
#: a fetch called without a deadline still ends
DEFAULT_DEADLINE = 30.0
MAX_REDIRECTS = 3
_CHUNK = 64 * 1024
_REDIRECTS = (301, 302, 303, 307, 308)
_DOCKER_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")


class ArtifactError(Exception):
    """Fetching the artifact failed; the message names the reference and the cause.

    The attributes repeat what the message says for callers that decide on
    them: ``registry``, ``url`` and HTTP ``status`` when known.
    """

    def __init__(
        self,
        reference: str,
        message: str,
        *,
        registry: str | None = None,
        url: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(f"{reference}: {message}")
        self.reference = reference
        self.registry = registry
        self.url = url
        self.status = status


class PolicyError(ArtifactError):
    """The reference is not allowed by the configuration; nothing was fetched."""


class NotFound(ArtifactError):
    """The registry has no such repository, tag, manifest or blob (HTTP 404)."""


class Unauthorized(ArtifactError):
    """Authentication was required and failed, or access was denied (401, 403)."""


class RegistryUnavailable(ArtifactError):
    """Connection refused, reset or timed out, 5xx or 429: worth serving a stale copy for."""


class InvalidArtifact(ArtifactError):
    """The registry answered, but not with a seccomp profile artifact we accept."""


@dataclass(frozen=True)
class FetchSettings:
    #: seconds, per HTTP call: for connecting and for each read
    timeout: float = 1.5
    max_size: int = 1024 * 1024
    #: registries spoken to over plain HTTP, as "host:port"
    insecure_registries: frozenset[str] = frozenset()
    tls_verify: bool = True
    ca_file: str | None = None
    #: a docker config.json whose "auths" give Basic credentials per registry
    docker_config: str | None = None
    #: fnmatch patterns over "registry/repository"; "*" also matches "/"
    allowed: tuple[str, ...] = ("*",)
    require_digest: bool = False

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")
        if self.max_size < 1:
            raise ValueError(f"max_size must be positive, got {self.max_size}")


@dataclass(frozen=True)
class Artifact:
    reference: str
    manifest_digest: str
    layer_digest: str
    data: bytes = field(repr=False)
    media_type_config: str
    size: int

    @property
    def config_media_type(self) -> str:
        return self.media_type_config


@dataclass(frozen=True)
class Manifest:
    digest: str
    media_type: str
    body: dict[str, Any]
    size: int


@dataclass(frozen=True)
class _Layer:
    digest: str
    size: int


# ---- a hard deadline for blocking HTTP ---------------------------------------
# requests' timeouts bound each socket operation, not a whole exchange: a server
# that sends one byte a second never trips them. So every connection a fetch
# takes from a pool is tracked, and once the fetch's deadline passes its sockets
# are shut down, which wakes a blocked read with an error. The shutdown repeats
# until the fetch returns: a connection still connecting at the deadline gets
# its socket only afterwards.

_active = threading.local()


class _Watchdog:
    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.conns: list[Any] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fetch-deadline", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._done.wait(max(self.deadline - time.monotonic(), 0.0)):
            return
        while True:
            for conn in list(self.conns):
                sock = getattr(conn, "sock", None)
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
            if self._done.wait(0.02):
                return

    def stop(self) -> None:
        self._done.set()


def _track(conn: Any) -> None:
    watchdog: _Watchdog | None = getattr(_active, "watchdog", None)
    if watchdog is not None:
        watchdog.conns.append(conn)


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
    outer: _Watchdog | None = getattr(_active, "watchdog", None)
    if outer is not None and outer.deadline <= deadline:
        # already inside a fetch with an earlier (or equal) deadline: that one rules
        yield
        return
    watchdog = _Watchdog(deadline)
    _active.watchdog = watchdog
    try:
        yield
    finally:
        watchdog.stop()
        _active.watchdog = outer


# ---- the fetcher -------------------------------------------------------------


class ArtifactFetcher:
    """Thread-safe: the plugin calls it from a thread pool (one HTTP session per thread)."""

    def __init__(self, settings: FetchSettings) -> None:
        self.settings = settings
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        #: (registry, scope) → Authorization value that last worked
        self._auth: dict[tuple[str, str], str] = {}
        # raises ValueError for an unreadable file: a configuration error to report at start
        self._credentials = _Credentials(settings.docker_config)
        if not settings.tls_verify:
            log.warning("TLS verification of registries is disabled (registry.tls_verify)")
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

    # ---- public --------------------------------------------------------------

    def check_policy(self, ref: Reference) -> None:
        """PolicyError unless the configuration allows fetching ``ref``; no network."""
        name = ref.name
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.settings.allowed):
            raise PolicyError(
                str(ref),
                f"repository {name} is not in the allowed registries "
                f"({', '.join(self.settings.allowed)})",
                registry=ref.registry,
            )
        if self.settings.require_digest and ref.digest is None:
            raise PolicyError(
                str(ref),
                "a digest reference (@sha256:…) is required by the configuration "
                "(registry.require_digest)",
                registry=ref.registry,
            )

    def fetch(
        self,
        ref: Reference,
        deadline: float | None = None,
        have: Callable[[str], bytes | None] | None = None,
    ) -> Artifact:
        """The profile artifact's first layer, checked; ``deadline`` is a time.monotonic() value.

        ``have(layer_digest)`` may return bytes already held (the cache): when the
        manifest still names that layer, a tag re-check costs only the manifest
        request. Held bytes are hashed again before they are trusted.
        """
        self.check_policy(ref)
        deadline = self._deadline(deadline)
        key = str(ref)
        log.info("Pulling OCI artifact from ref: %s", key)
        with _deadline_watchdog(deadline):
            manifest = self._manifest(ref, deadline)
            layer = self._first_layer(ref, manifest)
            held = have(layer.digest) if have is not None else None
            if (held is not None and len(held) == layer.size
                    and _digest(layer.digest.split(":", 1)[0], held) == layer.digest):
                log.info("OCI artifact %s unchanged (layer %s already cached)", key, layer.digest)
                return Artifact(key, manifest.digest, layer.digest, held,
                                SECCOMP_CONFIG_MEDIA_TYPE, len(held))
            data = self._blob(ref, layer, deadline)
        log.info("Retrieved OCI artifact seccomp profile of len: %d", len(data))
        return Artifact(key, manifest.digest, layer.digest, data, SECCOMP_CONFIG_MEDIA_TYPE,
                        len(data))

    def fetch_manifest_digest(self, ref: Reference, deadline: float | None = None) -> str:
        """The digest the reference resolves to now (for re-checking a cached tag).

        A HEAD request: registries answer it with ``Docker-Content-Digest`` and
        Docker Hub does not count it against the pull rate limit. The header is
        trusted here; a registry lying about it can only make a cache keep
        content that was verified when it was fetched. Without the header the
        manifest is downloaded and hashed.
        """
        self.check_policy(ref)
        deadline = self._deadline(deadline)
        key = str(ref)
        with _deadline_watchdog(deadline):
            try:
                resp = self._request(ref, "HEAD", f"manifests/{ref.selector}", deadline,
                                     {"Accept": ACCEPT})
            except ArtifactError as exc:
                if exc.status != 405:
                    raise
                return self._manifest(ref, deadline).digest
            header = resp.headers.get("Docker-Content-Digest", "")
            resp.close()
            if not _valid_digest(header):
                return self._manifest(ref, deadline).digest
        if ref.digest is not None and header != ref.digest:
            raise InvalidArtifact(key, f"manifest digest mismatch: the registry says {header}",
                                  registry=ref.registry)
        return header

    def fetch_manifest(self, ref: Reference, deadline: float) -> Manifest:
        """Any manifest (no artifact checks, no policy): for image annotations."""
        with _deadline_watchdog(deadline):
            return self._manifest(ref, deadline)

    def manifest_annotations(self, ref: Reference, deadline: float) -> dict[str, str]:
        """An image's manifest annotations (CRI-O's "image annotations")."""
        body = self.fetch_manifest(ref, deadline).body
        annotations = body.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise InvalidArtifact(str(ref), "manifest annotations are not an object",
                                  registry=ref.registry)
        return {str(k): str(v) for k, v in annotations.items()}

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    # ---- the artifact ----------------------------------------------------------

    def _deadline(self, deadline: float | None) -> float:
        return deadline if deadline is not None else time.monotonic() + DEFAULT_DEADLINE

    def _manifest(self, ref: Reference, deadline: float) -> Manifest:
        key = str(ref)
        resp = self._request(ref, "GET", f"manifests/{ref.selector}", deadline,
                             {"Accept": ACCEPT})
        raw = self._read(resp, ref, MAX_MANIFEST, None, deadline, "manifest")
        if ref.digest is not None:
            algo = ref.digest.split(":", 1)[0]
            digest = _digest(algo, raw)
            if digest != ref.digest:
                raise InvalidArtifact(key, f"manifest digest mismatch: got {digest}",
                                      registry=ref.registry, url=resp.url)
        else:
            digest = _digest("sha256", raw)
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise InvalidArtifact(key, f"manifest is not JSON: {exc}", registry=ref.registry,
                                  url=resp.url) from exc
        if not isinstance(body, dict):
            raise InvalidArtifact(key, "manifest is not a JSON object", registry=ref.registry,
                                  url=resp.url)
        media_type = body.get("mediaType") or resp.headers.get("Content-Type", "")
        return Manifest(digest, str(media_type).split(";")[0].strip(), body, len(raw))

    def _first_layer(self, ref: Reference, manifest: Manifest) -> _Layer:
        key = str(ref)
        body, media_type = manifest.body, manifest.media_type

        def invalid(message: str) -> InvalidArtifact:
            return InvalidArtifact(key, message, registry=ref.registry)

        if media_type in (OCI_INDEX, DOCKER_LIST) or "manifests" in body:
            raise invalid(f"is an image index ({media_type or 'no mediaType'}), not a seccomp "
                          "profile artifact; reference the artifact's own manifest (no "
                          "platform is picked from an index)")
        if body.get("schemaVersion") != 2:
            raise invalid(f"manifest schemaVersion is {body.get('schemaVersion')!r}, expected 2")
        declared = body.get("mediaType")
        # the field is optional in OCI; Content-Type alone is too often generic to refuse on
        if declared is not None and declared not in (OCI_MANIFEST, DOCKER_MANIFEST):
            raise invalid(f"manifest media type is {str(declared)[:100]!r}, expected "
                          f"{OCI_MANIFEST!r}")
        config = body.get("config")
        config_type = config.get("mediaType") if isinstance(config, dict) else None
        if config_type != SECCOMP_CONFIG_MEDIA_TYPE:
            hint = ""
            if config_type == UNKNOWN_CONFIG_MEDIA_TYPE:
                hint = (" (pushed without a config media type; push with --config "
                        f"config.json:{SECCOMP_CONFIG_MEDIA_TYPE})")
            elif config_type == EMPTY_CONFIG_MEDIA_TYPE:
                hint = (" (an artifact with an empty config; push with --config "
                        f"config.json:{SECCOMP_CONFIG_MEDIA_TYPE})")
            found = repr(config_type) if isinstance(config_type, str) else "missing"
            raise invalid(f"config media type is {found}, expected "
                          f"{SECCOMP_CONFIG_MEDIA_TYPE!r}{hint}")
        layers = body.get("layers")
        if not isinstance(layers, list) or not layers:
            raise invalid("artifact has no layers")
        layer = layers[0]
        digest = layer.get("digest") if isinstance(layer, dict) else None
        size = layer.get("size") if isinstance(layer, dict) else None
        if not isinstance(digest, str) or not _valid_digest(digest):
            raise invalid(f"first layer has an invalid digest {str(digest)[:100]!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise invalid(f"first layer has an invalid size {str(size)[:40]!r}")
        cap = self.settings.max_size
        if size > cap:
            # CRI-O's wording, then the numbers an operator needs
            raise invalid(f"exceeded maximum allowed artifact size of {cap} bytes "
                          f"(layer {digest} is {size} bytes)")
        if size == 0:
            raise invalid("artifact data is empty")
        return _Layer(digest, size)

    def _blob(self, ref: Reference, layer: _Layer, deadline: float) -> bytes:
        key = str(ref)
        resp = self._request(ref, "GET", f"blobs/{layer.digest}", deadline, {})
        url = resp.url
        data = self._read(resp, ref, self.settings.max_size, layer.size, deadline, "layer")
        actual = _digest(layer.digest.split(":", 1)[0], data)
        if actual != layer.digest:
            raise InvalidArtifact(key, f"layer digest mismatch: descriptor says {layer.digest}, "
                                  f"content is {actual}", registry=ref.registry, url=url)
        if not data:
            raise InvalidArtifact(key, "artifact data is empty", registry=ref.registry, url=url)
        return data

    # ---- HTTP ------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # no retries: a retry is the caller's decision, within its deadline
            adapter = _Adapter(max_retries=0, pool_maxsize=4)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            # no .netrc, no REQUESTS_CA_BUNDLE, no proxies from the environment:
            # what the plugin sends where is decided by its configuration alone
            session.trust_env = False
            if not self.settings.tls_verify:
                session.verify = False
            else:
                session.verify = self.settings.ca_file or True
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _url(self, ref: Reference, path: str) -> str:
        scheme = "http" if ref.registry in self.settings.insecure_registries else "https"
        host = "registry-1.docker.io" if ref.registry == "docker.io" else ref.registry
        return f"{scheme}://{host}/v2/{ref.repository}/{path}"

    def _timeout(self, ref: Reference, url: str, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RegistryUnavailable(str(ref), f"deadline passed before the request to {url}",
                                      registry=ref.registry, url=url)
        return min(self.settings.timeout, remaining)

    def _request(
        self,
        ref: Reference,
        method: str,
        path: str,
        deadline: float,
        headers: Mapping[str, str],
    ) -> requests.Response:
        """A 200 response (body not read yet), after authenticating if asked to."""
        key = str(ref)
        url = self._url(ref, path)
        scope = f"repository:{ref.repository}:pull"
        # compressed bytes would not hash to the descriptor's digest
        hdrs = {"Accept-Encoding": "identity", **headers}
        cached = self._auth.get((ref.registry, scope))
        if cached:
            hdrs["Authorization"] = cached
        resp = self._send(ref, method, url, hdrs, deadline)
        if resp.status_code == 401 and _origin(resp.url) == _origin(url):
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.close()
            hdrs["Authorization"] = self._authorize(ref, challenge, scope, deadline)
            resp = self._send(ref, method, url, hdrs, deadline)
            if resp.status_code == 200:
                with self._lock:
                    self._auth[(ref.registry, scope)] = hdrs["Authorization"]
        if resp.status_code == 200:
            return resp
        status = resp.status_code
        final_url = resp.url
        detail = _error_text(resp)
        retry_after = resp.headers.get("Retry-After", "")
        resp.close()
        where = f"{method} {final_url}: HTTP {status}{': ' + detail if detail else ''}"
        info: dict[str, Any] = {"registry": ref.registry, "url": final_url, "status": status}
        if status == 404:
            raise NotFound(key, f"not found ({where})", **info)
        if status == 401 and _origin(final_url) != _origin(url):
            raise Unauthorized(key, f"access denied by {_origin(final_url)}, where "
                               f"{ref.registry} redirected the download; no credentials "
                               f"are sent there ({where})", **info)
        if status == 401:
            refused = (f"the credentials for {ref.registry}"
                       f"{self._credentials.source(ref.registry)} were refused"
                       if self._credentials.get(ref.registry) is not None else
                       f"no credentials are configured for {ref.registry}")
            raise Unauthorized(key, f"access denied ({where}); {refused}", **info)
        if status == 403:
            raise Unauthorized(key, f"access denied ({where})", **info)
        if status == 429 or status >= 500:
            later = f"; retry after {retry_after[:40]}" if retry_after else ""
            raise RegistryUnavailable(key, f"registry unavailable ({where}){later}", **info)
        raise ArtifactError(key, f"unexpected answer ({where})", **info)

    def _send(
        self, ref: Reference, method: str, url: str, headers: Mapping[str, str], deadline: float
    ) -> requests.Response:
        """One exchange, following redirects ourselves so credentials stay with their origin."""
        key = str(ref)
        hdrs = dict(headers)
        for _ in range(MAX_REDIRECTS + 1):
            resp = self._exchange(ref, method, url, hdrs, deadline)
            if resp.status_code not in _REDIRECTS:
                return resp
            location = resp.headers.get("Location", "")
            resp.close()
            target = urljoin(url, location)
            if not location or urlsplit(target).scheme not in ("http", "https"):
                raise ArtifactError(key, f"{url} redirected to an unusable location "
                                    f"{location[:200]!r}", registry=ref.registry, url=url,
                                    status=resp.status_code)
            if _origin(target) != _origin(url):
                hdrs = {k: v for k, v in hdrs.items() if k.lower() != "authorization"}
            url = target
        raise ArtifactError(key, f"more than {MAX_REDIRECTS} redirects, the last to {url}",
                            registry=ref.registry, url=url)

    def _exchange(
        self, ref: Reference, method: str, url: str, headers: Mapping[str, str], deadline: float
    ) -> requests.Response:
        key = str(ref)
        host = urlsplit(url).netloc
        timeout = self._timeout(ref, url, deadline)
        info: dict[str, Any] = {"registry": ref.registry, "url": url}
        try:
            return self._session().request(
                method, url, headers=dict(headers), timeout=(timeout, timeout), stream=True,
                allow_redirects=False,
            )
        except requests.exceptions.SSLError as exc:
            raise RegistryUnavailable(key, f"TLS error talking to {host}: {_short(exc)}",
                                      **info) from exc
        except requests.exceptions.Timeout as exc:
            raise RegistryUnavailable(key, f"{host} did not answer within {timeout:.2f}s",
                                      **info) from exc
        except requests.exceptions.ConnectionError as exc:
            if time.monotonic() >= deadline:
                raise RegistryUnavailable(key, f"{host} did not answer before the deadline",
                                          **info) from exc
            raise RegistryUnavailable(key, f"cannot reach {host}: {_short(exc)}",
                                      **info) from exc
        except requests.exceptions.RequestException as exc:
            raise ArtifactError(key, f"request to {url} failed: {_short(exc)}", **info) from exc

    def _authorize(self, ref: Reference, challenge: str, scope: str, deadline: float) -> str:
        """The Authorization value answering the registry's 401 challenge."""
        key = str(ref)
        creds = self._credentials.get(ref.registry)
        scheme, params = _parse_challenge(challenge)
        info: dict[str, Any] = {"registry": ref.registry, "status": 401}
        missing = (f"registry {ref.registry} requires authentication and no credentials are "
                   f"configured for it (registry.docker_config)"
                   f"{self._credentials.hint(ref.registry)}")
        if scheme == "basic":
            if creds is None:
                raise Unauthorized(key, missing, **info)
            return _basic(creds)
        if scheme != "bearer":
            raise Unauthorized(key, f"registry {ref.registry} sent an unsupported "
                               f"authentication challenge {challenge[:100]!r}", **info)
        realm = params.get("realm", "")
        realm_scheme = urlsplit(realm).scheme
        if realm_scheme not in ("http", "https"):
            raise Unauthorized(key, f"registry {ref.registry} sent a Bearer challenge with an "
                               f"unusable realm {realm[:200]!r}", **info)
        headers = {"Accept-Encoding": "identity"}
        if creds is not None:
            if realm_scheme == "http" and ref.registry not in self.settings.insecure_registries:
                raise Unauthorized(key, f"token server {realm} is plain HTTP; the credentials "
                                   f"for {ref.registry} are not sent there", url=realm, **info)
            headers["Authorization"] = _basic(creds)
        query = {"service": params.get("service", ""), "scope": params.get("scope", scope)}
        url = realm + ("&" if "?" in realm else "?") + urlencode(
            {k: v for k, v in query.items() if v})
        resp = self._send(ref, "GET", url, headers, deadline)
        if resp.status_code != 200:
            status = resp.status_code
            detail = _error_text(resp)
            resp.close()
            where = f"token server {realm} answered HTTP {status}{': ' + detail if detail else ''}"
            if status == 429 or status >= 500:
                raise RegistryUnavailable(key, where, registry=ref.registry, url=realm,
                                          status=status)
            if status in (401, 403):
                why = missing if creds is None else (
                    f"the credentials for {ref.registry}"
                    f"{self._credentials.source(ref.registry)} were refused")
                raise Unauthorized(key, f"{where}; {why}", registry=ref.registry, url=realm,
                                   status=status)
            raise Unauthorized(key, where, registry=ref.registry, url=realm, status=status)
        raw = self._read(resp, ref, MAX_TOKEN_RESPONSE, None, deadline, "token response")
        try:
            payload = json.loads(raw)
            token = payload.get("token") or payload.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
            raise Unauthorized(key, f"token server {realm} sent no usable token", url=realm,
                               **info)
        return f"Bearer {token}"

    def _read(
        self,
        resp: requests.Response,
        ref: Reference,
        cap: int,
        expected: int | None,
        deadline: float,
        what: str,
    ) -> bytes:
        """Stream the body; stop at the cap, past the advertised size, or at the deadline."""
        key = str(ref)
        info: dict[str, Any] = {"registry": ref.registry, "url": resp.url}
        limit = cap if expected is None else min(cap, expected)
        past = (f"its advertised size of {expected} bytes" if expected is not None
                and expected <= cap else f"the maximum allowed artifact size of {cap} bytes")
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            resp.close()
            raise InvalidArtifact(key, f"{what} is {declared} bytes (Content-Length), more than "
                                  f"{past}", **info)
        buf = bytearray()
        try:
            while True:
                if time.monotonic() >= deadline:
                    raise RegistryUnavailable(key, f"{what} download too slow: deadline passed "
                                              f"after {len(buf)} bytes", **info)
                # read1: one receive at a time, so a trickling server cannot hold us
                chunk = resp.raw.read1(_CHUNK)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > limit:
                    raise InvalidArtifact(key, f"{what} sent more than {past}", **info)
        except ArtifactError:
            raise
        except Exception as exc:
            # urllib3 raises its own types (ProtocolError, ReadTimeoutError) from read1
            if time.monotonic() >= deadline:
                # the watchdog shut the socket down
                raise RegistryUnavailable(key, f"{what} download too slow: deadline passed "
                                          f"after {len(buf)} bytes", **info) from exc
            raise RegistryUnavailable(key, f"{what} download failed after {len(buf)} bytes: "
                                      f"{_short(exc)}", **info) from exc
        finally:
            resp.close()
        if expected is not None and len(buf) != expected:
            raise InvalidArtifact(key, f"{what} is {len(buf)} bytes, the descriptor says "
                                  f"{expected}", **info)
        return bytes(buf)


# ---- credentials -------------------------------------------------------------


class _Credentials:
    """Basic credentials per registry from a docker config.json, re-read when it changes."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._entries: dict[str, tuple[str, str]] = {}
        #: registries whose credentials are somewhere we do not read (helpers, tokens)
        self._elsewhere: dict[str, str] = {}
        if path:
            self._load(strict=True)

    def get(self, registry: str) -> tuple[str, str] | None:
        if self.path:
            self._load(strict=False)
        return self._entries.get(registry)

    def source(self, registry: str) -> str:
        return f" from {self.path}" if registry in self._entries else ""

    def hint(self, registry: str) -> str:
        where = self._elsewhere.get(registry)
        if where is None and registry not in self._entries:
            where = self._elsewhere.get("*")
        return f"; {self.path} keeps them in {where}, which is not supported" if where else ""

    def _load(self, strict: bool) -> None:
        assert self.path is not None
        try:
            st = Path(self.path).stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError as exc:
            if strict:
                raise ValueError(f"cannot read docker config {self.path}: {exc}") from exc
            log.warning("cannot read docker config %s, keeping the credentials read before: %s",
                        self.path, exc)
            return
        with self._lock:
            if stamp == self._stamp:
                return
            try:
                entries, elsewhere = _parse_docker_config(Path(self.path).read_bytes())
            except (OSError, ValueError) as exc:
                if strict:
                    raise ValueError(f"cannot read docker config {self.path}: {exc}") from exc
                log.warning("cannot read docker config %s, keeping the credentials read "
                            "before: %s", self.path, exc)
                return
            self._entries, self._elsewhere, self._stamp = entries, elsewhere, stamp
            log.info("read credentials for %d registries from %s", len(entries), self.path)


def _parse_docker_config(raw: bytes) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    auths = data.get("auths") or {}
    if not isinstance(auths, dict):
        raise ValueError('"auths" is not an object')
    entries: dict[str, tuple[str, str]] = {}
    elsewhere: dict[str, str] = {}
    helpers = data.get("credHelpers")
    if isinstance(helpers, dict):
        for host in helpers:
            elsewhere[_registry_of(str(host))] = "a credential helper (credHelpers)"
    for host, entry in auths.items():
        name = _registry_of(str(host))
        if not isinstance(entry, dict):
            raise ValueError(f'"auths" entry for {host!r} is not an object')
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise ValueError(f'"auths" entry for {host!r}: "auth" is not base64 of '
                                 f"user:password ({exc})") from exc
            user, sep, password = decoded.partition(":")
            if not sep:
                raise ValueError(f'"auths" entry for {host!r}: "auth" is not user:password')
        else:
            user, password = str(entry.get("username", "")), str(entry.get("password", ""))
        if user:
            entries[name] = (user, password)
        elif entry.get("identitytoken"):
            elsewhere[name] = "an identity token"
    if isinstance(data.get("credsStore"), str):
        # "*": any registry without an "auths" entry may be in the store
        elsewhere["*"] = "a credential store (credsStore)"
    return entries, elsewhere


def _registry_of(host: str) -> str:
    """docker config keys are hosts, sometimes URLs ("https://index.docker.io/v1/")."""
    name = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", host).split("/")[0]
    return "docker.io" if name in _DOCKER_HUB_ALIASES else name


# ---- small helpers -----------------------------------------------------------


def _basic(creds: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…",scope="…"`` → ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): (quoted if quoted or not bare else bare)
              for k, quoted, bare in re.findall(r'(\w+)=(?:"([^"]*)"|([^",\s]*))', rest)}
    return scheme.lower(), params


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.lower()}"


def _valid_digest(value: str) -> bool:
    algo, _, hexpart = value.partition(":")
    pattern = DIGEST_PATTERNS.get(algo)
    return pattern is not None and pattern.fullmatch(hexpart) is not None


def _digest(algo: str, data: bytes) -> str:
    return f"{algo}:{hashlib.new(algo, data).hexdigest()}"


def _error_text(resp: requests.Response) -> str:
    """The registry's error code and message, short (the body is at most 2 KiB read)."""
    try:
        text = resp.raw.read1(2048).decode(errors="replace")
    except Exception:
        return ""
    try:
        errors = json.loads(text).get("errors", [])
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)[:300]
    except (ValueError, AttributeError, TypeError):
        return re.sub(r"\s+", " ", text).strip()[:200]


def _short(exc: BaseException) -> str:
    text = str(exc)
    # urllib3 nests the useful part deep inside a long repr
    m = re.search(r"(Connection refused|Connection reset by peer|Read timed out|"
                  r"timed out|Name or service not known|Temporary failure in name resolution|"
                  r"certificate verify failed[^'\")]*|Remote end closed connection[^'\")]*)",
                  text)
    return m.group(1) if m else text[:200]
