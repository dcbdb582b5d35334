"""Fetch a seccomp profile artifact from an OCI registry, bounded, and safe to point anywhere.

The distribution API is spoken with ``httpx`` on the plugin's event loop. oras-py
0.2.43 was the intended client, but none of it is safe on the container-creation
path (no timeouts, a retry decorator sleeping 3+5+11+29+83 s, a token backend
that cannot answer a Basic challenge and has sent one host's credentials to
another host's token server, no digest checks, no containerd-style name
normalisation). oras-py is used where none of that matters: pushing artifacts in
the tests, the demo and the benchmarks.

What a fetch checks, in order, each failure with its own exception: the registry
policy (allow-list, digest required) before any network call; the manifest's
size (``MAX_MANIFEST``) and JSON nesting depth before parsing; its digest when the
reference pins one; that it is a single manifest (an image index is refused, as
CRI-O 1.30 does: no platform is picked); the config media type
``application/vnd.cncf.seccomp-profile.config.v1+json``; the first layer's
advertised size against the cap before downloading; the bytes actually received
against both the cap and the advertised size while streaming; the blob's digest
against its descriptor; and non-empty data.

Bounds: every HTTP call has ``settings.timeout`` for connecting and for each read;
the whole call runs under ``asyncio.timeout_at`` at its deadline, so a registry
trickling one byte a second is cancelled at the deadline wherever it is (status
line, headers or body). No threads, no watchdog.

Who may be contacted (SSRF). The plugin is a root process in the host's network
namespace and references come from pod annotations that tenants write, so the
registry, every redirect target and every token realm could otherwise point at
the node's own services, the cloud metadata endpoint or the cluster's internal
network. Checking a URL's host name before the request is not enough: the name
is resolved again when connecting (DNS rebinding), and disguised literals such
as ``2130706433`` resolve to 127.0.0.1. So the client connects only through
``_CheckedBackend``, an httpcore network backend that resolves the name itself
(``loop.getaddrinfo``), refuses the connection unless every address is public
(no loopback, RFC 1918, link-local incl. 169.254.169.254, CGNAT, unique-local,
unspecified, multicast, reserved, nor IPv6 forms embedding such an IPv4
address), and then connects to the address it checked. A host the administrator
named literally (the registry part of an ``allowed`` pattern without glob
characters, an ``insecure`` entry, a ``token_realm_hosts`` entry) is exempt: that
is how a registry on the node or the cluster network is allowed. TLS still
verifies the host name: httpcore passes it to ``start_tls`` as
``server_hostname``. The backend is plugged in by ``_Transport``, a small
``httpx.AsyncBaseTransport`` over ``httpcore.AsyncConnectionPool`` (httpx's own
transport does not take a network backend), so only public APIs are used.
Redirects are followed here, at most 3, never from https to http, each hop
connecting through the same backend; a token realm must be on the registry's own
host or listed in ``token_realm_hosts``.

Messages: errors say what failed in fixed words. Nothing a registry sends is
echoed except a few short values cut and cleaned by ``bounded.quote_untrusted``
(media types, challenge text, Location); response bodies, header values and
socket/TLS exception text go to the debug/info log only, cut to 200 characters.
Refused, reset and non-TLS ports all read ``cannot connect to registry HOST``
(no port scanner). URLs lose their query and fragment (pre-signed blob URLs carry
signatures). A digest mismatch never prints the digest actually received (it
would reveal another tenant's private content fetched with the node's
credentials).

Credentials: anonymous first; on a 401 the challenge decides. ``Basic``: the
docker config's ``auths`` entry for that registry. ``Bearer``: a token from the
challenge's realm, asked with that registry's credentials if it has any (never
over plain HTTP unless the registry is configured insecure), then one retry;
tokens are cached per (registry, scope). A redirect to another origin (blob
storage) never carries the Authorization header, and a 401 from such a host is
not answered with credentials. The docker config is re-read when it changes, so
rotated credentials apply without a restart.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fnmatch
import hashlib
import http.cookiejar
import ipaddress
import json
import logging
import re
import socket
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import certifi
import httpcore
import httpx

from nri_seccomp.bounded import MAX_QUOTED, clean, cut, quote_untrusted, strip_query
from nri_seccomp.decide.reference import DIGEST_PATTERNS, Reference

log = logging.getLogger(__name__)

T = TypeVar("T")

SECCOMP_CONFIG_MEDIA_TYPE = "application/vnd.cncf.seccomp-profile.config.v1+json"
EMPTY_CONFIG_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
UNKNOWN_CONFIG_MEDIA_TYPE = "application/vnd.unknown.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_KNOWN_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
# the index types are asked for so that an index is recognised and refused by
# name rather than turned into a confusing 404 by content negotiation
ACCEPT = ", ".join((OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST))
#: an artifact's manifest: a handful of descriptors, a few KiB in practice
MAX_MANIFEST = 512 * 1024
#: an image's manifest (annotations lookups): the distribution's own limit
MAX_IMAGE_MANIFEST = 4 * 1024 * 1024
#: JSON nesting accepted in manifests and token responses (checked before parsing)
MAX_JSON_DEPTH = 32
#: JSON bodies larger than this are parsed off the event loop
JSON_ON_LOOP = 64 * 1024
MAX_TOKEN_RESPONSE = 64 * 1024
MAX_REDIRECTS = 3
_ERROR_BODY = 2048
_REDIRECTS = (301, 302, 303, 307, 308)
_DOCKER_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")
#: the distribution spec's error codes: the only words of an error body put in a message
_ERROR_CODES = frozenset((
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
    "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED",
    "TOOMANYREQUESTS",
))


class ArtifactError(Exception):
    """Fetching the artifact failed; the message names the reference and the cause.

    The attributes repeat what the message says for callers that decide on
    them: ``registry``, ``url`` (without query or fragment) and HTTP ``status``
    when known.
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
        self.url = _strip_query(url) if url is not None else None
        self.status = status


class PolicyError(ArtifactError):
    """The configuration does not allow this reference or this destination."""


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
    #: fnmatch patterns over "registry/repository"; "*" also matches "/"; empty allows none
    allowed: tuple[str, ...] = ()
    require_digest: bool = False
    #: hosts ("host" or "host:port") a registry may name as its token realm besides itself
    token_realm_hosts: tuple[str, ...] = ("auth.docker.io",)

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


@dataclass
class _Call:
    """One public call: its reference, deadline, and where it is (for the deadline's message)."""

    ref: Reference
    deadline: float
    #: the host last spoken to, quoted
    host: str = ""
    #: the body being read ("" while waiting for an answer) and the bytes so far
    reading: str = ""
    received: int = 0

    @property
    def key(self) -> str:
        return str(self.ref)


# ---- where connections may go ------------------------------------------------------


class _Refused(Exception):
    """The destination resolves to an address that is not public and is not listed."""


class _Unresolvable(Exception):
    pass


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, compatible, 6to4, Teredo, NAT64)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if int(ip) >> 32 == 0 or ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(address: str) -> bool:
    """True for an address that is neither local, private nor special in any form."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_v4(ip)
        if inner is not None and not is_public_address(str(inner)):
            return False
        if ip.is_site_local:
            return False
    elif ip in _CGNAT:
        return False
    return ip.is_global and not (
        ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast
        or ip.is_reserved or ip.is_unspecified
    )


def _explicit_hosts(settings: FetchSettings) -> frozenset[str]:
    """host[:port] the administrator named literally: exempt from the address check."""
    hosts: set[str] = set()
    for pattern in settings.allowed:
        registry, sep, _ = pattern.partition("/")
        if sep and registry and not any(c in registry for c in "*?[]"):
            hosts.add(registry.lower())
    hosts.update(h.lower() for h in settings.insecure_registries)
    hosts.update(h.lower() for h in settings.token_realm_hosts)
    if any(h == "docker.io" or h.startswith("docker.io:") for h in hosts):
        hosts.add("registry-1.docker.io")
    return frozenset(hosts)


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """Resolve, check every address, connect to a checked address (see the module doc)."""

    def __init__(self, listed: Callable[[str, int], bool]) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._listed = listed

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        name = host.strip("[]")
        try:
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout("name resolution timed out") from exc
        except (OSError, UnicodeError) as exc:
            raise _Unresolvable(str(exc)) from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise _Unresolvable("no address")
        if not self._listed(name, port) and not all(map(is_public_address, addresses)):
            raise _Refused(name)
        last: Exception = httpcore.ConnectError("no address")
        for address in addresses:
            left = None if timeout is None else max(timeout - (time.monotonic() - start), 0.0)
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=left, local_address=local_address,
                    socket_options=socket_options)
            except httpcore.ConnectError as exc:
                last = exc
        raise last

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise _Refused(path)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: httpcore.Response) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        stream = self._response.stream
        assert isinstance(stream, AsyncIterable)
        async for chunk in stream:
            yield chunk

    async def aclose(self) -> None:
        await self._response.aclose()


class _Transport(httpx.AsyncBaseTransport):
    """httpx over httpcore's pool with our network backend (public APIs only)."""

    def __init__(self, ssl_context: ssl.SSLContext, backend: httpcore.AsyncNetworkBackend) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context, network_backend=backend, max_connections=32,
            max_keepalive_connections=8, keepalive_expiry=30.0, http1=True, http2=False,
            retries=0)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host,
                             port=request.url.port, target=request.url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        resp = await self._pool.handle_async_request(core)
        return httpx.Response(status_code=resp.status, headers=resp.headers,
                              stream=_Body(resp), extensions=resp.extensions)

    async def aclose(self) -> None:
        await self._pool.aclose()


def _ssl_context(settings: FetchSettings) -> ssl.SSLContext:
    if not settings.tls_verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    # the CA bundle requests used before (certifi), or the configured file alone
    return ssl.create_default_context(cafile=settings.ca_file or certifi.where())


# ---- the fetcher -------------------------------------------------------------


class ArtifactFetcher:
    """Used from one event loop at a time (the plugin's); a new loop gets new connections."""

    def __init__(self, settings: FetchSettings) -> None:
        self.settings = settings
        #: (registry, scope) → Authorization value that last worked
        self._auth: dict[tuple[str, str], str] = {}
        # raises ValueError for an unreadable file: a configuration error to report at start
        self._credentials = _Credentials(settings.docker_config)
        self._explicit = _explicit_hosts(settings)
        self._realm_hosts = frozenset(h.lower() for h in settings.token_realm_hosts)
        self._ssl = _ssl_context(settings)
        self._http: httpx.AsyncClient | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None
        if not settings.tls_verify:
            log.warning("TLS verification of registries is disabled (registry.tls_verify)")

    # ---- public --------------------------------------------------------------

    def check_policy(self, ref: Reference) -> None:
        """PolicyError unless the configuration allows fetching ``ref``; no network."""
        self.check_allowed(ref)
        if self.settings.require_digest and ref.digest is None:
            raise PolicyError(
                str(ref),
                "a digest reference (@sha256:…) is required by the configuration "
                "(registry.require_digest)",
                registry=ref.registry,
            )

    async def fetch(
        self,
        ref: Reference,
        deadline: float,
        have: Callable[[str], Awaitable[bytes | None]] | None = None,
    ) -> Artifact:
        """The profile artifact's first layer, checked; ``deadline`` is a time.monotonic() value.

        ``await have(layer_digest)`` may return bytes already held (the cache): when
        the manifest still names that layer, a tag re-check costs only the manifest
        request. Held bytes are hashed again before they are trusted.
        """
        self.check_policy(ref)
        key = str(ref)
        log.info("Pulling OCI artifact from ref: %s", key)
        call = _Call(ref, deadline)
        return await self._within(call, self._fetch(call, have))

    async def fetch_manifest_digest(self, ref: Reference, deadline: float) -> str:
        """The digest the reference resolves to now (HEAD; for re-checking a cached tag).

        Registries answer HEAD with ``Docker-Content-Digest`` and Docker Hub does
        not count it against the pull rate limit. The header is trusted here; a
        registry lying about it can only make a cache keep content that was
        verified when it was fetched. Without the header the manifest is hashed.
        """
        self.check_policy(ref)
        call = _Call(ref, deadline)
        return await self._within(call, self._head_digest(call))

    async def manifest_annotations(self, ref: Reference, deadline: float) -> dict[str, str]:
        """An image's manifest annotations (CRI-O's "image annotations"); same allow-list."""
        self.check_allowed(ref)
        call = _Call(ref, deadline)
        body = (await self._within(call, self._manifest(call, MAX_IMAGE_MANIFEST))).body
        annotations = body.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise InvalidArtifact(str(ref), "manifest annotations are not an object",
                                  registry=ref.registry)
        return {str(k): str(v) for k, v in annotations.items()}

    async def aclose(self) -> None:
        client, loop = self._http, self._http_loop
        self._http = self._http_loop = None
        if client is not None and loop is asyncio.get_running_loop():
            await client.aclose()

    # ---- policy ----------------------------------------------------------------

    def check_allowed(self, ref: Reference) -> None:
        """PolicyError unless ``registry.allowed`` lists the repository (image lookups too)."""
        name = ref.name
        if not self.settings.allowed:
            raise PolicyError(str(ref), "registry.allowed is empty: list the registries "
                              "profiles may come from", registry=ref.registry)
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.settings.allowed):
            raise PolicyError(
                str(ref),
                f"repository {name} is not in the allowed registries "
                f"({', '.join(self.settings.allowed)})",
                registry=ref.registry,
            )

    def _listed(self, host: str, port: int) -> bool:
        host = host.lower()
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{port}" in self._explicit or (
            port in (80, 443) and host in self._explicit)

    def _realm_allowed(self, realm: str, registry_url: str) -> bool:
        parts = urlsplit(realm)
        host = (parts.hostname or "").lower()
        if host and host == (urlsplit(registry_url).hostname or "").lower():
            return True
        return parts.netloc.lower() in self._realm_hosts or host in self._realm_hosts

    # ---- the artifact ----------------------------------------------------------

    async def _within(self, call: _Call, work: Awaitable[T]) -> T:
        """``work`` cancelled at the call's deadline, with a message saying where it was."""
        loop = asyncio.get_running_loop()
        limit = asyncio.timeout_at(loop.time() + (call.deadline - time.monotonic()))
        try:
            async with limit:
                return await work
        except TimeoutError:
            if not limit.expired():
                raise
            info: dict[str, Any] = {"registry": call.ref.registry}
            if call.reading:
                raise RegistryUnavailable(
                    call.key, f"{call.reading} download too slow: deadline passed after "
                    f"{call.received} bytes", **info) from None
            raise RegistryUnavailable(
                call.key, f"registry {call.host or call.ref.registry} did not answer before "
                "the deadline", **info) from None

    async def _fetch(
        self, call: _Call, have: Callable[[str], Awaitable[bytes | None]] | None
    ) -> Artifact:
        ref, key = call.ref, call.key
        manifest = await self._manifest(call, MAX_MANIFEST)
        layer = self._first_layer(ref, manifest)
        held = await have(layer.digest) if have is not None else None
        if (held is not None and len(held) == layer.size
                and _digest(layer.digest.split(":", 1)[0], held) == layer.digest):
            log.info("OCI artifact %s unchanged (layer %s already cached)", key, layer.digest)
            return Artifact(key, manifest.digest, layer.digest, held,
                            SECCOMP_CONFIG_MEDIA_TYPE, len(held))
        data = await self._blob(call, layer)
        log.info("Retrieved OCI artifact seccomp profile of len: %d", len(data))
        return Artifact(key, manifest.digest, layer.digest, data, SECCOMP_CONFIG_MEDIA_TYPE,
                        len(data))

    async def _head_digest(self, call: _Call) -> str:
        ref = call.ref
        try:
            resp = await self._request(call, "HEAD", f"manifests/{ref.selector}",
                                       {"Accept": ACCEPT})
        except ArtifactError as exc:
            if exc.status != 405:
                raise
            return (await self._manifest(call, MAX_MANIFEST)).digest
        header = str(resp.headers.get("Docker-Content-Digest", ""))
        await resp.aclose()
        if not _valid_digest(header):
            return (await self._manifest(call, MAX_MANIFEST)).digest
        if ref.digest is not None and header != ref.digest:
            raise InvalidArtifact(call.key, "manifest digest mismatch: the registry's manifest "
                                  "does not match the reference's digest", registry=ref.registry)
        return header

    async def _manifest(self, call: _Call, cap: int) -> Manifest:
        ref, key = call.ref, call.key
        resp = await self._request(call, "GET", f"manifests/{ref.selector}", {"Accept": ACCEPT})
        url = str(resp.request.url)
        content_type = resp.headers.get("Content-Type", "")
        raw = await self._read(call, resp, cap, None, "manifest")
        info: dict[str, Any] = {"registry": ref.registry, "url": url}
        if ref.digest is not None:
            if _digest(ref.digest.split(":", 1)[0], raw) != ref.digest:
                raise InvalidArtifact(key, "manifest digest mismatch: the content does not "
                                      "match the reference's digest", **info)
            digest = ref.digest
        else:
            digest = _digest("sha256", raw)
        try:
            body = await _load_json(raw)
        except _TooDeep:
            raise InvalidArtifact(key, f"manifest is nested more than {MAX_JSON_DEPTH} levels "
                                  "deep", **info) from None
        except (ValueError, RecursionError):
            raise InvalidArtifact(key, "manifest is not valid JSON", **info) from None
        if not isinstance(body, dict):
            raise InvalidArtifact(key, "manifest is not a JSON object", **info)
        media_type = body.get("mediaType") or content_type
        return Manifest(digest, str(media_type).split(";")[0].strip(), body, len(raw))

    def _first_layer(self, ref: Reference, manifest: Manifest) -> _Layer:
        key = str(ref)
        body, media_type = manifest.body, manifest.media_type

        def invalid(message: str) -> InvalidArtifact:
            return InvalidArtifact(key, message, registry=ref.registry)

        if media_type in (OCI_INDEX, DOCKER_LIST) or "manifests" in body:
            shown = media_type if media_type in _KNOWN_TYPES else (
                quote_untrusted(media_type) if media_type else "no mediaType")
            raise invalid(f"is an image index ({shown}), not a seccomp profile artifact; "
                          "reference the artifact's own manifest (no platform is picked from "
                          "an index)")
        if body.get("schemaVersion") != 2:
            version = quote_untrusted(body.get("schemaVersion"), 20)
            raise invalid(f"manifest schemaVersion is {version}, expected 2")
        declared = body.get("mediaType")
        # the field is optional in OCI; Content-Type alone is too often generic to refuse on
        if declared is not None and declared not in (OCI_MANIFEST, DOCKER_MANIFEST):
            raise invalid(f"manifest media type is {quote_untrusted(declared)}, expected "
                          f"'{OCI_MANIFEST}'")
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
            found = quote_untrusted(config_type) if isinstance(config_type, str) else "missing"
            raise invalid(f"config media type is {found}, expected "
                          f"'{SECCOMP_CONFIG_MEDIA_TYPE}'{hint}")
        layers = body.get("layers")
        if not isinstance(layers, list) or not layers:
            raise invalid("artifact has no layers")
        layer = layers[0]
        digest = layer.get("digest") if isinstance(layer, dict) else None
        size = layer.get("size") if isinstance(layer, dict) else None
        if not isinstance(digest, str) or not _valid_digest(digest):
            raise invalid(f"first layer has an invalid digest {quote_untrusted(digest)}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise invalid(f"first layer has an invalid size {quote_untrusted(size, 40)}")
        cap = self.settings.max_size
        if size > cap:
            # CRI-O's wording, then the numbers an operator needs
            raise invalid(f"exceeded maximum allowed artifact size of {cap} bytes "
                          f"(layer {digest} is {size} bytes)")
        if size == 0:
            raise invalid("artifact data is empty")
        return _Layer(digest, size)

    async def _blob(self, call: _Call, layer: _Layer) -> bytes:
        ref, key = call.ref, call.key
        resp = await self._request(call, "GET", f"blobs/{layer.digest}", {})
        url = str(resp.request.url)
        data = await self._read(call, resp, self.settings.max_size, layer.size, "layer")
        if _digest(layer.digest.split(":", 1)[0], data) != layer.digest:
            raise InvalidArtifact(key, "layer digest mismatch: the content does not match the "
                                  "descriptor's digest", registry=ref.registry, url=url)
        if not data:
            raise InvalidArtifact(key, "artifact data is empty", registry=ref.registry, url=url)
        return data

    # ---- HTTP ------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._http is None or self._http_loop is not loop:
            # no cookies kept: nothing one registry sets is sent anywhere later
            jar = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
            self._http = httpx.AsyncClient(
                transport=_Transport(self._ssl, _CheckedBackend(self._listed)),
                follow_redirects=False,
                # no .netrc, no proxies or CA bundles from the environment: what the
                # plugin sends where is decided by its configuration alone
                trust_env=False,
                cookies=jar,
                timeout=self.settings.timeout,
            )
            self._http_loop = loop
        return self._http

    def _url(self, ref: Reference, path: str) -> str:
        scheme = "http" if ref.registry in self.settings.insecure_registries else "https"
        host = "registry-1.docker.io" if ref.registry == "docker.io" else ref.registry
        return f"{scheme}://{host}/v2/{ref.repository}/{path}"

    def _timeout(self, call: _Call, url: str) -> float:
        remaining = call.deadline - time.monotonic()
        if remaining <= 0:
            raise RegistryUnavailable(call.key, f"deadline passed before the request to "
                                      f"{_show_url(url)}", registry=call.ref.registry, url=url)
        return min(self.settings.timeout, remaining)

    async def _request(
        self, call: _Call, method: str, path: str, headers: dict[str, str]
    ) -> httpx.Response:
        """A 200 response (body not read yet), after authenticating if asked to."""
        ref, key = call.ref, call.key
        url = self._url(ref, path)
        scope = f"repository:{ref.repository}:pull"
        # compressed bytes would not hash to the descriptor's digest
        hdrs = {"Accept-Encoding": "identity", **headers}
        cached = self._auth.get((ref.registry, scope))
        if cached:
            hdrs["Authorization"] = cached
        resp = await self._send(call, method, url, hdrs)
        if resp.status_code == 401 and _origin(str(resp.request.url)) == _origin(url):
            challenge = resp.headers.get("WWW-Authenticate", "")
            await resp.aclose()
            hdrs["Authorization"] = await self._authorize(call, challenge, scope, url)
            resp = await self._send(call, method, url, hdrs)
            if resp.status_code == 200:
                self._auth[(ref.registry, scope)] = hdrs["Authorization"]
        if resp.status_code == 200:
            return resp
        status = resp.status_code
        final_url = str(resp.request.url)
        retry_after = resp.headers.get("Retry-After", "").strip()
        code = await self._error_code(resp, final_url)
        host = _host(final_url)
        where = (f"HTTP {status} from registry {host} ({method} {_show_url(final_url)})"
                 f"{': ' + code if code else ''}")
        info: dict[str, Any] = {"registry": ref.registry, "url": final_url, "status": status}
        if status == 404:
            raise NotFound(key, f"not found: {where}", **info)
        if status == 401 and _origin(final_url) != _origin(url):
            raise Unauthorized(key, f"access denied by {_show_url(_origin(final_url))}, "
                               f"where {ref.registry} redirected the download; no credentials "
                               f"are sent there ({where})", **info)
        if status == 401:
            refused = (f"the credentials for {ref.registry}"
                       f"{self._credentials.source(ref.registry)} were refused"
                       if self._credentials.get(ref.registry) is not None else
                       f"no credentials are configured for {ref.registry}")
            raise Unauthorized(key, f"access denied: {where}; {refused}", **info)
        if status == 403:
            raise Unauthorized(key, f"access denied: {where}", **info)
        if status == 429 or status >= 500:
            later = (f"; retry after {retry_after}s"
                     if retry_after.isdigit() and len(retry_after) <= 6 else "")
            raise RegistryUnavailable(key, f"registry unavailable: {where}{later}", **info)
        raise ArtifactError(key, f"unexpected answer: {where}", **info)

    async def _error_code(self, resp: httpx.Response, url: str) -> str:
        """The distribution error code of an error body, if it is one; the rest is logged."""
        buf = bytearray()
        try:
            async for chunk in resp.aiter_raw():
                buf += chunk
                if len(buf) >= _ERROR_BODY:
                    break
        except (httpx.HTTPError, httpcore.NetworkError, httpcore.ProtocolError,
                httpcore.TimeoutException, OSError):
            pass
        finally:
            await resp.aclose()
        log.debug("HTTP %d from %s: %s", resp.status_code, _show_url(url),
                  quote_untrusted(bytes(buf[:_ERROR_BODY]).decode("utf-8", "replace"), 200))
        try:
            errors = json.loads(bytes(buf)).get("errors", [])
            codes = [str(e.get("code")) for e in errors if isinstance(e, dict)]
        except (ValueError, AttributeError, TypeError, RecursionError):
            return ""
        return ", ".join(dict.fromkeys(c for c in codes if c in _ERROR_CODES))

    async def _send(
        self, call: _Call, method: str, url: str, headers: dict[str, str]
    ) -> httpx.Response:
        """One exchange, following redirects ourselves so credentials stay with their origin."""
        ref, key = call.ref, call.key
        hdrs = dict(headers)
        for _ in range(MAX_REDIRECTS + 1):
            resp = await self._exchange(call, method, url, hdrs)
            if resp.status_code not in _REDIRECTS:
                return resp
            location = resp.headers.get("Location", "")
            await resp.aclose()
            host = _host(url)
            info: dict[str, Any] = {"registry": ref.registry, "url": url,
                                    "status": resp.status_code}
            target = _join(url, location)
            if target is None:
                raise ArtifactError(key, f"registry {host} redirected to an unusable location "
                                    f"{quote_untrusted(_strip_query(location))}", **info)
            if urlsplit(url).scheme == "https" and urlsplit(target).scheme == "http":
                raise PolicyError(key, f"registry {host} redirected from https to plain http "
                                  f"({_show_url(target)}); refused", **info)
            if _origin(target) != _origin(url):
                hdrs = {k: v for k, v in hdrs.items() if k.lower() != "authorization"}
            url = target
        raise ArtifactError(key, f"more than {MAX_REDIRECTS} redirects, the last to "
                            f"{_show_url(url)}", registry=ref.registry, url=url)

    async def _exchange(
        self, call: _Call, method: str, url: str, headers: dict[str, str]
    ) -> httpx.Response:
        ref, key = call.ref, call.key
        host = call.host = _host(url)
        call.reading = ""
        timeout = self._timeout(call, url)
        info: dict[str, Any] = {"registry": ref.registry, "url": url}
        client = self._client()
        try:
            request = client.build_request(method, url, headers=headers,
                                           timeout=httpx.Timeout(timeout))
            return await client.send(request, stream=True)
        except _Refused:
            raise PolicyError(key, f"registry {host} does not have a public address and is not "
                              "listed in registry.allowed or registry.insecure", **info) from None
        except _Unresolvable as exc:
            log.info("cannot resolve %s: %s", host, _detail(exc))
            raise RegistryUnavailable(key, f"cannot resolve registry {host}", **info) from None
        except httpcore.TimeoutException:
            raise RegistryUnavailable(key, f"registry {host} did not answer within "
                                      f"{timeout:.2f}s", **info) from None
        except (httpx.HTTPError, httpx.InvalidURL, httpcore.NetworkError,
                httpcore.ProtocolError, httpcore.UnsupportedProtocol, OSError,
                ValueError) as exc:
            log.info("connection to registry %s failed: %s", host, _detail(exc))
            if _certificate_failure(exc):
                raise RegistryUnavailable(key, f"registry {host}: TLS handshake failed "
                                          "(certificate not verified)", **info) from None
            raise RegistryUnavailable(key, f"cannot connect to registry {host}",
                                      **info) from None

    async def _authorize(self, call: _Call, challenge: str, scope: str, url: str) -> str:
        """The Authorization value answering the registry's 401 challenge."""
        ref, key = call.ref, call.key
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
                               f"authentication challenge {quote_untrusted(challenge)}", **info)
        realm = params.get("realm", "")
        realm_scheme = urlsplit(realm).scheme
        shown = quote_untrusted(_strip_query(realm))
        if realm_scheme not in ("http", "https") or _join(realm, "") is None:
            raise Unauthorized(key, f"registry {ref.registry} sent a Bearer challenge with an "
                               f"unusable realm {shown}", **info)
        if not self._realm_allowed(realm, url):
            raise PolicyError(key, f"registry {ref.registry} named a token server on another "
                              "host, not listed in registry.token_realm_hosts; refused", **info)
        headers = {"Accept-Encoding": "identity"}
        if creds is not None:
            if realm_scheme == "http" and ref.registry not in self.settings.insecure_registries:
                raise Unauthorized(key, f"token server {shown} is plain HTTP; the credentials "
                                   f"for {ref.registry} are not sent there", url=realm, **info)
            headers["Authorization"] = _basic(creds)
        query = {"service": params.get("service", ""), "scope": params.get("scope", scope)}
        token_url = realm + ("&" if "?" in realm else "?") + urlencode(
            {k: v for k, v in query.items() if v})
        resp = await self._send(call, "GET", token_url, headers)
        if resp.status_code != 200:
            status = resp.status_code
            await self._error_code(resp, token_url)
            where = f"token server {shown} answered HTTP {status}"
            ti: dict[str, Any] = {"registry": ref.registry, "url": realm, "status": status}
            if status == 429 or status >= 500:
                raise RegistryUnavailable(key, where, **ti)
            if status in (401, 403):
                why = missing if creds is None else (
                    f"the credentials for {ref.registry}"
                    f"{self._credentials.source(ref.registry)} were refused")
                raise Unauthorized(key, f"{where}; {why}", **ti)
            raise Unauthorized(key, where, **ti)
        raw = await self._read(call, resp, MAX_TOKEN_RESPONSE, None, "token response")
        try:
            payload = await _load_json(raw)
            token = payload.get("token") or payload.get("access_token")
        except (ValueError, AttributeError, _TooDeep):
            token = None
        if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
            raise Unauthorized(key, f"token server {shown} sent no usable token", url=realm,
                               **info)
        return f"Bearer {token}"

    async def _read(
        self, call: _Call, resp: httpx.Response, cap: int, expected: int | None, what: str
    ) -> bytes:
        """Stream the body; stop at the cap or past the advertised size (the deadline rules)."""
        key = call.key
        url = str(resp.request.url)
        info: dict[str, Any] = {"registry": call.ref.registry, "url": url}
        limit = cap if expected is None else min(cap, expected)
        past = (f"its advertised size of {expected} bytes" if expected is not None
                and expected <= cap else f"the maximum of {cap} bytes" if what != "layer"
                else f"the maximum allowed artifact size of {cap} bytes")
        declared = resp.headers.get("Content-Length", "").strip()
        if declared.isdigit() and int(declared) > limit:
            await resp.aclose()
            shown = declared if len(declared) <= 20 else "too many"
            raise InvalidArtifact(key, f"{what} is {shown} bytes (Content-Length), more than "
                                  f"{past}", **info)
        buf = bytearray()
        call.reading, call.received = what, 0
        try:
            async for chunk in resp.aiter_raw():
                buf += chunk
                call.received = len(buf)
                if len(buf) > limit:
                    raise InvalidArtifact(key, f"{what} sent more than {past}", **info)
        except httpcore.TimeoutException:
            raise RegistryUnavailable(key, f"{what} download failed after {len(buf)} bytes: "
                                      f"registry {call.host} did not answer within "
                                      f"{self.settings.timeout:.2f}s", **info) from None
        except (httpx.HTTPError, httpcore.NetworkError, httpcore.ProtocolError,
                OSError) as exc:
            log.info("download from registry %s failed: %s", call.host, _detail(exc))
            raise RegistryUnavailable(key, f"{what} download failed after {len(buf)} bytes: "
                                      f"connection to registry {call.host} lost",
                                      **info) from None
        finally:
            await resp.aclose()
        call.reading = ""
        if expected is not None and len(buf) != expected:
            raise InvalidArtifact(key, f"{what} is {len(buf)} bytes, the descriptor says "
                                  f"{expected}", **info)
        return bytes(buf)


# ---- credentials -------------------------------------------------------------


class _Credentials:
    """Basic credentials per registry from a docker config.json, re-read when it changes."""

    def __init__(self, path: str | None) -> None:
        self.path = path
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
        # a stat per request on a local file: cheap enough for the event loop
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


# ---- JSON with a bounded depth -------------------------------------------------


class _TooDeep(Exception):
    pass


# a JSON string (escapes included); what is left between strings holds the brackets
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth_exceeds(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when ``raw`` nests arrays/objects deeper than ``limit`` (a linear scan)."""
    depth = 0
    for m in _BRACKET.finditer(_JSON_STRING.sub(b"", raw)):
        if m.group() in b"[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _checked_json(raw: bytes) -> Any:
    if json_depth_exceeds(raw):
        raise _TooDeep
    return json.loads(raw)


async def _load_json(raw: bytes) -> Any:
    if len(raw) > JSON_ON_LOOP:
        return await asyncio.to_thread(_checked_json, raw)
    return _checked_json(raw)


# ---- small helpers -----------------------------------------------------------


def _basic(creds: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…",scope="…"`` → ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): (quoted if quoted or not bare else bare)
              for k, quoted, bare in re.findall(r'(\w+)=(?:"([^"]*)"|([^",\s]*))', rest)}
    return scheme.lower(), params


def _strip_query(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("?", 1)[0].split("#", 1)[0]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _show_url(url: str) -> str:
    """A URL for a message: no query, no fragment, no control characters, bounded."""
    return cut(strip_query(_strip_query(url)[: MAX_QUOTED * 4]), MAX_QUOTED * 2)


def _host(url: str) -> str:
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        netloc = ""
    return cut(clean((netloc.rpartition("@")[2] or "?")[: MAX_QUOTED * 2]), MAX_QUOTED)


def _join(base: str, location: str) -> str | None:
    """The absolute http(s) URL ``location`` points to from ``base``, or None."""
    if not location and base.startswith(("http://", "https://")):
        location = base
    if not location:
        return None
    try:
        target = urljoin(base, location)
        parts = urlsplit(target)
        _ = parts.port
        httpx.URL(target)
    except (ValueError, httpx.InvalidURL):
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        return None
    return target


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.lower()}"


def _valid_digest(value: str) -> bool:
    algo, _, hexpart = value.partition(":")
    pattern = DIGEST_PATTERNS.get(algo)
    return pattern is not None and pattern.fullmatch(hexpart) is not None


def _digest(algo: str, data: bytes) -> str:
    return f"{algo}:{hashlib.new(algo, data).hexdigest()}"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 10:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _certificate_failure(exc: BaseException) -> bool:
    return any(isinstance(e, ssl.SSLCertVerificationError) for e in _chain(exc))


def _detail(exc: BaseException) -> str:
    """For the plugin's log only: the exception chain, cut and cleaned."""
    return quote_untrusted("; ".join(f"{type(e).__name__}: {e}" for e in _chain(exc)), 200)
