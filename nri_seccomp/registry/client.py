"""Fetch a seccomp profile artifact from an OCI registry, bounded, and safe to point anywhere.

The I/O of the registry client; what it decides lives beside it:
``artifact.py`` (what an artifact must look like), ``auth.py`` (answering a 401),
``credentials.py`` (the docker config), ``netguard.py`` (where it may connect, and
the transport), ``errors.py`` (the exception tree) and ``urls.py``.

The distribution API is spoken with ``httpx`` on the plugin's event loop. oras-py
0.2.43 was the intended client, but none of it is safe on the container-creation
path (no timeouts, a retry decorator sleeping 3+5+11+29+83 s, a token backend
that cannot answer a Basic challenge and has sent one host's credentials to
another host's token server, no digest checks, no containerd-style name
normalisation). oras-py is used where none of that matters: pushing artifacts in
the tests, the demo and the benchmarks.

What a fetch checks, in order, each failure with its own exception: the registry
policy (allow-list, digest required) before any network call; the manifest's
size (``MAX_MANIFEST``) while streaming, then its digest, JSON nesting depth and
shape (``artifact.parse_manifest``); that it is a single manifest with the
seccomp config media type and a first layer within the size cap, before
downloading (``artifact.first_layer``); the bytes actually received against
both the cap and the advertised size while streaming; the blob's digest against
its descriptor and non-empty data (``artifact.check_layer``).

Bounds: every HTTP call has a per-call timeout for connecting and for each read:
``settings.background_timeout`` for a profile fetch (it runs in the background, for
the kubelet's retry, so a slow but working registry must be able to finish it),
``settings.timeout`` for image-annotation lookups; the whole call runs under
``asyncio.timeout_at`` at its deadline, so a registry
trickling one byte a second is cancelled at the deadline wherever it is (status
line, headers or body). No threads, no watchdog (large manifests are parsed in
``asyncio.to_thread``, still under the deadline).

Redirects are followed here, at most 3, never from https to http, each hop
connecting through the same checked transport (``netguard``); a redirect to
another origin (blob storage) never carries the Authorization header, and a 401
from such a host is not answered with credentials. Credentials: anonymous
first; on a 401 from the registry itself, ``auth.answer_challenge`` decides and
this module sends; the value that worked is cached per (registry, scope).

Messages: errors say what failed in fixed words. Nothing a registry sends is
echoed except a few short values cut and cleaned by ``bounded.quote_untrusted``
(media types, challenge text, Location); response bodies, header values and
socket/TLS exception text go to the debug/info log only, cut to 200 characters.
Refused, reset and non-TLS ports all read ``cannot connect to registry HOST``
(no port scanner). URLs lose their query and fragment (pre-signed blob URLs carry
signatures). A digest mismatch never prints the digest actually received.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import http.cookiejar
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpcore
import httpx

from nri_seccomp import digest as digest_mod
from nri_seccomp.bounded import quote_untrusted
from nri_seccomp.decide.reference import Reference
from nri_seccomp.registry import auth, netguard
from nri_seccomp.registry.artifact import (
    ACCEPT,
    MAX_IMAGE_MANIFEST,
    MAX_MANIFEST,
    SECCOMP_CONFIG_MEDIA_TYPE,
    Artifact,
    Layer,
    Manifest,
    annotations_of,
    check_layer,
    first_layer,
    held_layer_usable,
    parse_manifest,
)
from nri_seccomp.registry.credentials import Credentials
from nri_seccomp.registry.errors import (
    ArtifactError,
    InvalidArtifact,
    NotFound,
    PolicyError,
    RegistryUnavailable,
    Unauthorized,
)
from nri_seccomp.registry.urls import host_of, join, origin, show_url, strip_url_query

log = logging.getLogger(__name__)

T = TypeVar("T")

#: JSON bodies larger than this are parsed off the event loop
JSON_ON_LOOP = 64 * 1024
MAX_REDIRECTS = 3
#: repositories whose allow-list answer is remembered (then forgotten all at once)
ALLOWED_NAMES_KEPT = 4096
_ERROR_BODY = 2048
_REDIRECTS = (301, 302, 303, 307, 308)
#: the distribution spec's error codes: the only words of an error body put in a message
_ERROR_CODES = frozenset((
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
    "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED",
    "TOOMANYREQUESTS",
))


@dataclass(frozen=True)
class FetchSettings:
    #: seconds, per HTTP call: for connecting and for each read
    timeout: float = 1.5
    #: the same for a profile fetch (``fetch``, ``fetch_manifest_digest``), which the
    #: store runs in the background; None: ``timeout``
    background_timeout: float | None = None
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
        if self.background_timeout is not None and not self.background_timeout >= self.timeout:
            raise ValueError(f"background_timeout ({self.background_timeout}) must be at least "
                             f"timeout ({self.timeout})")
        if self.max_size < 1:
            raise ValueError(f"max_size must be positive, got {self.max_size}")


@dataclass
class _Call:
    """One public call: its reference, deadline, and where it is (for the deadline's message)."""

    ref: Reference
    deadline: float
    #: seconds, per HTTP call (connect, each read)
    timeout: float
    #: the host last spoken to, quoted
    host: str = ""
    #: the body being read ("" while waiting for an answer) and the bytes so far
    reading: str = ""
    received: int = 0

    @property
    def key(self) -> str:
        return str(self.ref)


class ArtifactFetcher:
    """Used from one event loop at a time (the plugin's); a new loop gets new connections."""

    def __init__(self, settings: FetchSettings) -> None:
        self.settings = settings
        #: (registry, scope) → Authorization value that last worked
        self._auth: dict[tuple[str, str], str] = {}
        # raises ValueError for an unreadable file: a configuration error to report at start
        self._credentials = Credentials(settings.docker_config)
        self._explicit = netguard.explicit_hosts(settings)
        self._ssl = netguard.ssl_context(settings)
        self._allowed_names: dict[str, bool] = {}
        self._http: httpx.AsyncClient | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None
        if not settings.tls_verify:
            log.warning("TLS verification of registries is disabled (registry.tls_verify)")

    @property
    def _background_timeout(self) -> float:
        return self.settings.background_timeout or self.settings.timeout

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
        call = _Call(ref, deadline, self._background_timeout)
        return await self._within(call, self._fetch(call, have))

    async def fetch_manifest_digest(self, ref: Reference, deadline: float) -> str:
        """The digest the reference resolves to now (HEAD; for re-checking a cached tag).

        Registries answer HEAD with ``Docker-Content-Digest`` and Docker Hub does
        not count it against the pull rate limit. The header is trusted here; a
        registry lying about it can only make a cache keep content that was
        verified when it was fetched. Without the header the manifest is hashed.
        """
        self.check_policy(ref)
        call = _Call(ref, deadline, self._background_timeout)
        return await self._within(call, self._head_digest(call))

    async def manifest_annotations(self, ref: Reference, deadline: float) -> dict[str, str]:
        """An image's manifest annotations (CRI-O's "image annotations"); same allow-list."""
        self.check_allowed(ref)
        call = _Call(ref, deadline, self.settings.timeout)
        return annotations_of(ref, await self._within(call, self._manifest(call,
                                                                          MAX_IMAGE_MANIFEST)))

    async def aclose(self) -> None:
        client, loop = self._http, self._http_loop
        self._http = self._http_loop = None
        if client is not None and loop is asyncio.get_running_loop():
            await client.aclose()

    # ---- policy ----------------------------------------------------------------

    def check_allowed(self, ref: Reference) -> None:
        """PolicyError unless ``registry.allowed`` lists the repository (image lookups too)."""
        name = ref.name
        # asked on every container creation, cache hits included: the answer for a
        # repository is kept for this client's life (its settings never change)
        if self._allowed_names.get(name):
            return
        if not self.settings.allowed:
            raise PolicyError(str(ref), "registry.allowed is empty: list the registries "
                              "profiles may come from", registry=ref.registry)
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.settings.allowed):
            if len(self._allowed_names) >= ALLOWED_NAMES_KEPT:
                self._allowed_names.clear()
            self._allowed_names[name] = True
        else:
            raise PolicyError(
                str(ref),
                f"repository {name} is not in the allowed registries "
                f"({', '.join(self.settings.allowed)})",
                registry=ref.registry,
            )

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
        layer = first_layer(ref, manifest, self.settings.max_size)
        held = await have(layer.digest) if have is not None else None
        if held is not None and held_layer_usable(layer, held):
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
        if not digest_mod.is_valid(header):
            return (await self._manifest(call, MAX_MANIFEST)).digest
        if ref.digest is not None and header != ref.digest:
            raise InvalidArtifact(call.key, "manifest digest mismatch: the registry's manifest "
                                  "does not match the reference's digest", registry=ref.registry)
        return header

    async def _manifest(self, call: _Call, cap: int) -> Manifest:
        ref = call.ref
        resp = await self._request(call, "GET", f"manifests/{ref.selector}", {"Accept": ACCEPT})
        url = str(resp.request.url)
        content_type = resp.headers.get("Content-Type", "")
        raw = await self._read(call, resp, cap, None, "manifest")
        if len(raw) > JSON_ON_LOOP:
            return await asyncio.to_thread(parse_manifest, ref, raw, content_type, url)
        return parse_manifest(ref, raw, content_type, url)

    async def _blob(self, call: _Call, layer: Layer) -> bytes:
        resp = await self._request(call, "GET", f"blobs/{layer.digest}", {})
        url = str(resp.request.url)
        data = await self._read(call, resp, self.settings.max_size, layer.size, "layer")
        return check_layer(call.ref, layer, data, url)

    # ---- HTTP ------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._http is None or self._http_loop is not loop:
            # no cookies kept: nothing one registry sets is sent anywhere later
            jar = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
            listed = functools.partial(netguard.is_listed, self._explicit)
            self._http = httpx.AsyncClient(
                transport=netguard.Transport(self._ssl, netguard.CheckedBackend(listed)),
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
                                      f"{show_url(url)}", registry=call.ref.registry, url=url)
        return min(call.timeout, remaining)

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
        if resp.status_code == 401 and origin(str(resp.request.url)) == origin(url):
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
        host = host_of(final_url)
        where = (f"HTTP {status} from registry {host} ({method} {show_url(final_url)})"
                 f"{': ' + code if code else ''}")
        info: dict[str, Any] = {"registry": ref.registry, "url": final_url, "status": status}
        if status == 404:
            raise NotFound(key, f"not found: {where}", **info)
        if status == 401 and origin(final_url) != origin(url):
            raise Unauthorized(key, f"access denied by {show_url(origin(final_url))}, "
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

    async def _authorize(self, call: _Call, challenge: str, scope: str, url: str) -> str:
        """The Authorization value answering the registry's 401 challenge (``auth`` decides)."""
        ref = call.ref
        login = self._credentials.login(ref.registry)
        step = auth.answer_challenge(ref, challenge, scope=scope, registry_url=url,
                                     login=login, settings=self.settings)
        if isinstance(step, auth.BasicAnswer):
            return step.authorization
        resp = await self._send(call, "GET", step.url, step.headers)
        if resp.status_code != 200:
            await self._error_code(resp, step.url)
            raise auth.token_refusal(ref, step, login, resp.status_code)
        raw = await self._read(call, resp, auth.MAX_TOKEN_RESPONSE, None, "token response")
        return auth.token_authorization(ref, step, raw)

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
        log.debug("HTTP %d from %s: %s", resp.status_code, show_url(url),
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
            host = host_of(url)
            info: dict[str, Any] = {"registry": ref.registry, "url": url,
                                    "status": resp.status_code}
            target = join(url, location)
            if target is None:
                raise ArtifactError(key, f"registry {host} redirected to an unusable location "
                                    f"{quote_untrusted(strip_url_query(location))}", **info)
            if urlsplit(url).scheme == "https" and urlsplit(target).scheme == "http":
                raise PolicyError(key, f"registry {host} redirected from https to plain http "
                                  f"({show_url(target)}); refused", **info)
            if origin(target) != origin(url):
                hdrs = {k: v for k, v in hdrs.items() if k.lower() != "authorization"}
            url = target
        raise ArtifactError(key, f"more than {MAX_REDIRECTS} redirects, the last to "
                            f"{show_url(url)}", registry=ref.registry, url=url)

    async def _exchange(
        self, call: _Call, method: str, url: str, headers: dict[str, str]
    ) -> httpx.Response:
        ref, key = call.ref, call.key
        host = call.host = host_of(url)
        call.reading = ""
        timeout = self._timeout(call, url)
        info: dict[str, Any] = {"registry": ref.registry, "url": url}
        client = self._client()
        try:
            request = client.build_request(method, url, headers=headers,
                                           timeout=httpx.Timeout(timeout))
            return await client.send(request, stream=True)
        except netguard.Refused:
            raise PolicyError(key, f"registry {host} does not have a public address and is not "
                              "listed in registry.allowed or registry.insecure", **info) from None
        except netguard.Unresolvable as exc:
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
                                      f"{call.timeout:.2f}s", **info) from None
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


# ---- exceptions, for the log ----------------------------------------------------------


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
