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
this module sends (an identity token: POSTed to the realm, no redirect followed,
then the GET if the token server does not take the POST); the value that worked
is cached per (registry, scope).

Endpoints (``hosts.py``): a registry configured in containerd's ``hosts.toml``
(``registry.config_path``) is fetched from its endpoints in the file's order,
the mirrors (``[host."…"]``) before the server. A manifest by tag is asked only
of endpoints with the ``resolve`` capability, a manifest by digest and a blob of
those with ``pull``. Any error from an endpoint that is not the last (a mirror:
cannot connect, timed out, 5xx, 404, 401, an answer that fails its checks)
moves on to the next; one that could not be connected to is not tried again in
the same call. When all fail, the last endpoint's error (the upstream's) is
raised, naming the endpoints tried before it. Mirrors get ``?ns=<registry>``.
Each endpoint with TLS settings of its own, or named by the operator, gets its
own connection pool and TLS context (``_EndpointClients``, bounded); a host the
operator wrote in a hosts.toml is connectable even on a private address, a
registry a tenant's reference names is not (the built-in default endpoint,
``_default``'s implicit server). Credentials are looked up for the endpoint's
host (a mirror's own ``auths`` entry or helper), cached per (endpoint, scope).

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
import os
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

import httpcore
import httpx

from nri_seccomp import digest as digest_mod
from nri_seccomp.bounded import quote_untrusted
from nri_seccomp.decide.reference import Reference
from nri_seccomp.registry import auth, hosts, netguard
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
from nri_seccomp.registry.credentials import Credentials, HelperRunner, HelperSettings, Login
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
    #: a docker config.json: "auths" (Basic credentials or identity tokens) and helpers
    docker_config: str | None = None
    #: fnmatch patterns over "registry/repository"; "*" also matches "/"; empty allows none
    allowed: tuple[str, ...] = ()
    require_digest: bool = False
    #: hosts ("host" or "host:port") a registry may name as its token realm besides itself
    token_realm_hosts: tuple[str, ...] = ("auth.docker.io",)
    #: containerd hosts.toml roots (``<root>/<host>/hosts.toml``); empty reads none
    config_path: tuple[str, ...] = ()
    #: docker credential helpers: seconds per run, seconds an answer is reused, where
    #: they are looked up (None: $PATH)
    credential_helper_timeout: float = 1.0
    credential_helper_ttl: float = 300.0
    credential_helper_dir: str | None = None

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
    #: the endpoint being asked (hosts.toml), its client, the login used for it
    endpoint: hosts.Endpoint | None = None
    client: httpx.AsyncClient | None = None
    login: Login | None = None
    #: endpoints that could not be connected to in this call (not tried again)
    down: set[str] = field(default_factory=set)

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
        self._credentials = Credentials(settings.docker_config, HelperRunner(HelperSettings(
            timeout=settings.credential_helper_timeout, ttl=settings.credential_helper_ttl,
            directory=settings.credential_helper_dir)))
        self._hosts = hosts.HostsTable(settings.config_path, settings.insecure_registries)
        trust = netguard.trust_source()
        self._endpoint_clients = _EndpointClients(settings, trust)
        #: hosts.toml files whose unsupported keys were logged
        self._warned: set[str] = set()
        self._explicit = netguard.explicit_hosts(settings)
        self._ssl = netguard.ssl_context(settings, trust)
        self._allowed_names: dict[str, bool] = {}
        self._http: httpx.AsyncClient | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None
        if not settings.tls_verify:
            log.warning("TLS verification of registries is disabled (registry.tls_verify)")
        elif not settings.ca_file:
            kind, where = trust
            log.info("registries' certificates are checked against %s",
                     f"certifi's CAs in {where} (the node has none)" if kind == "certifi"
                     else f"the node's CAs in {where}")

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
        await self._endpoint_clients.aclose()

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
                            SECCOMP_CONFIG_MEDIA_TYPE, len(held), held=True)
        data = await self._blob(call, layer)
        log.info("Retrieved OCI artifact seccomp profile of len: %d", len(data))
        # the decision's log line names a mirror that served it (its access log is not ours)
        via = call.endpoint.netloc if call.endpoint is not None and call.endpoint.ns else ""
        return Artifact(key, manifest.digest, layer.digest, data, SECCOMP_CONFIG_MEDIA_TYPE,
                        len(data), via=via)

    async def _head_digest(self, call: _Call) -> str:
        need = "pull" if call.ref.digest is not None else "resolve"
        return await self._on_endpoints(call, need, lambda: self._head_digest_at(call))

    async def _head_digest_at(self, call: _Call) -> str:
        ref = call.ref
        try:
            resp = await self._request(call, "HEAD", f"manifests/{ref.selector}",
                                       {"Accept": ACCEPT})
        except ArtifactError as exc:
            if exc.status != 405:
                raise
            return (await self._manifest_at(call, MAX_MANIFEST)).digest
        header = str(resp.headers.get("Docker-Content-Digest", ""))
        await resp.aclose()
        if not digest_mod.is_valid(header):
            return (await self._manifest_at(call, MAX_MANIFEST)).digest
        if ref.digest is not None and header != ref.digest:
            raise InvalidArtifact(call.key, "manifest digest mismatch: the registry's manifest "
                                  "does not match the reference's digest", registry=ref.registry)
        return header

    async def _manifest(self, call: _Call, cap: int) -> Manifest:
        need = "pull" if call.ref.digest is not None else "resolve"
        return await self._on_endpoints(call, need, lambda: self._manifest_at(call, cap))

    async def _manifest_at(self, call: _Call, cap: int) -> Manifest:
        ref = call.ref
        resp = await self._request(call, "GET", f"manifests/{ref.selector}", {"Accept": ACCEPT})
        url = str(resp.request.url)
        content_type = resp.headers.get("Content-Type", "")
        raw = await self._read(call, resp, cap, None, "manifest")
        if len(raw) > JSON_ON_LOOP:
            return await asyncio.to_thread(parse_manifest, ref, raw, content_type, url)
        return parse_manifest(ref, raw, content_type, url)

    async def _blob(self, call: _Call, layer: Layer) -> bytes:
        return await self._on_endpoints(call, "pull", lambda: self._blob_at(call, layer))

    async def _blob_at(self, call: _Call, layer: Layer) -> bytes:
        resp = await self._request(call, "GET", f"blobs/{layer.digest}", {})
        url = str(resp.request.url)
        data = await self._read(call, resp, self.settings.max_size, layer.size, "layer")
        return check_layer(call.ref, layer, data, url)

    # ---- endpoints (hosts.toml) ---------------------------------------------------

    def _endpoints(self, call: _Call, capability: str) -> list[hosts.Endpoint]:
        """The endpoints to ask for ``capability`` (pull or resolve), in order."""
        ref = call.ref
        try:
            config = self._hosts.get(ref.registry)
        except hosts.HostsError as exc:
            # the operator's file is broken: transient until fixed (a cached copy may serve)
            raise RegistryUnavailable(call.key, f"registry configuration: {exc}",
                                      registry=ref.registry) from None
        if config.ignored and config.source not in self._warned:
            self._warned.add(config.source)
            log.warning("%s: not supported here, ignored: %s", config.source,
                        ", ".join(config.ignored))
        usable = [e for e in config.endpoints if e.can(capability)]
        if not usable:
            what = "resolve a tag" if capability == "resolve" else "pull"
            raise PolicyError(call.key, f"no endpoint in {config.source} may {what} "
                              f"(capabilities); use a digest reference or add \"{capability}\"",
                              registry=ref.registry)
        return usable

    async def _on_endpoints(self, call: _Call, capability: str,
                            work: Callable[[], Awaitable[T]]) -> T:
        """``work()`` at each endpoint in turn until one succeeds; the last one's error."""
        endpoints = self._endpoints(call, capability)
        tried: list[tuple[hosts.Endpoint, str]] = []
        for i, endpoint in enumerate(endpoints):
            last = i == len(endpoints) - 1
            if not last and endpoint.base in call.down:
                tried.append((endpoint, "down"))
                continue
            call.endpoint, call.login = endpoint, None
            try:
                call.client = await self._endpoint_clients.get(endpoint, self._explicit)
            except ValueError as exc:
                error: ArtifactError = RegistryUnavailable(
                    call.key, f"registry configuration {endpoint.source}: {exc}",
                    registry=call.ref.registry)
            else:
                try:
                    return await work()
                except ArtifactError as exc:
                    error = exc
            if last:
                raise _with_tried(error, tried) from None
            if isinstance(error, RegistryUnavailable) and error.status is None:
                call.down.add(endpoint.base)
            log.info("%s: endpoint %s failed, trying the next: %s", call.key,
                     endpoint.origin, error)
            tried.append((endpoint, _reason(error)))
        raise AssertionError("unreachable: the last endpoint returns or raises")

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

    def _endpoint(self, call: _Call) -> hosts.Endpoint:
        if call.endpoint is None:
            call.endpoint = hosts.default_endpoint(
                call.ref.registry, call.ref.registry in self.settings.insecure_registries)
        return call.endpoint

    def _url(self, ref: Reference, path: str, endpoint: hosts.Endpoint | None = None) -> str:
        if endpoint is None:
            endpoint = hosts.default_endpoint(
                ref.registry, ref.registry in self.settings.insecure_registries)
        url = f"{endpoint.base}/{ref.repository}/{path}"
        if endpoint.ns:
            url += "?" + urlencode({"ns": endpoint.ns})
        return url

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
        endpoint = self._endpoint(call)
        # credentials and tokens belong to the host spoken to (a mirror has its own)
        who = endpoint.host
        url = self._url(ref, path, endpoint)
        scope = f"repository:{ref.repository}:pull"
        # compressed bytes would not hash to the descriptor's digest
        ours = {"Accept-Encoding": "identity", **headers}
        # hosts.toml headers, except where ours say otherwise (whatever the case)
        hdrs = {**_header_dict(endpoint, {k.lower() for k in ours}), **ours}
        cached = self._auth.get((who, scope))
        if cached:
            _drop(hdrs, "authorization")
            hdrs["Authorization"] = cached
        resp = await self._send(call, method, url, hdrs)
        if resp.status_code == 401 and origin(str(resp.request.url)) == origin(url):
            challenge = resp.headers.get("WWW-Authenticate", "")
            await resp.aclose()
            value = await self._authorize(call, challenge, scope, url)
            _drop(hdrs, "authorization")
            hdrs["Authorization"] = value
            resp = await self._send(call, method, url, hdrs)
            if resp.status_code == 200:
                self._auth[(who, scope)] = hdrs["Authorization"]
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
                               f"where {who} redirected the download; no credentials "
                               f"are sent there ({where})", **info)
        if status == 401:
            login = call.login if call.login is not None else self._credentials.login(who)
            if login.present:
                self._credentials.forget(who)
            raise Unauthorized(key, f"access denied: {where}; {login.refused(who)}", **info)
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
        endpoint = self._endpoint(call)
        login = call.login = await self._credentials.login_for(endpoint.host)
        step = auth.answer_challenge(ref, challenge, scope=scope, registry_url=url,
                                     login=login, settings=self.settings,
                                     host=endpoint.host, plain_http=endpoint.scheme == "http")
        if isinstance(step, auth.BasicAnswer):
            return step.authorization
        posted: int | None = None
        if isinstance(step, auth.RefreshRequest):
            # the identity token is in the body: to the realm itself, no redirect followed
            resp = await self._send(call, "POST", step.url, step.headers, content=step.body,
                                    follow=False)
            if resp.status_code == 200:
                raw = await self._read(call, resp, auth.MAX_TOKEN_RESPONSE, None,
                                       "token response")
                return auth.token_authorization(ref, step, raw)
            await self._error_code(resp, step.url)
            if resp.status_code not in auth.FALLBACK_STATUSES:
                raise auth.token_refusal(ref, step, login, resp.status_code,
                                         host=endpoint.host)
            log.debug("token server %s answered HTTP %d to the refresh-token POST; asking "
                      "with GET", show_url(step.url), resp.status_code)
            posted, step = resp.status_code, step.fallback
        resp = await self._send(call, "GET", step.url, step.headers)
        if resp.status_code != 200:
            await self._error_code(resp, step.url)
            if resp.status_code in (401, 403) and login.present:
                self._credentials.forget(endpoint.host)
            raise auth.token_refusal(ref, step, login, resp.status_code, host=endpoint.host,
                                     posted=posted)
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
        self, call: _Call, method: str, url: str, headers: dict[str, str],
        content: bytes | None = None, follow: bool = True,
    ) -> httpx.Response:
        """One exchange, following redirects ourselves so credentials stay with their origin.

        With ``follow`` False a redirect is returned as it is (a body with a secret in it
        goes to ``url`` only).
        """
        ref, key = call.ref, call.key
        hdrs = dict(headers)
        for _ in range(MAX_REDIRECTS + 1):
            resp = await self._exchange(call, method, url, hdrs, content)
            if resp.status_code not in _REDIRECTS or not follow:
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
                # nor the hosts.toml headers, which may carry secrets of their own
                private = {"authorization"} | {
                    name.lower() for name, _ in (call.endpoint.headers if call.endpoint else ())}
                hdrs = {k: v for k, v in hdrs.items() if k.lower() not in private}
            url = target
        raise ArtifactError(key, f"more than {MAX_REDIRECTS} redirects, the last to "
                            f"{show_url(url)}", registry=ref.registry, url=url)

    async def _exchange(
        self, call: _Call, method: str, url: str, headers: dict[str, str],
        content: bytes | None = None,
    ) -> httpx.Response:
        ref, key = call.ref, call.key
        host = call.host = host_of(url)
        call.reading = ""
        timeout = self._timeout(call, url)
        info: dict[str, Any] = {"registry": ref.registry, "url": url}
        client = call.client or self._client()
        dial = call.endpoint.dial_timeout if call.endpoint is not None else None
        try:
            request = client.build_request(
                method, url, headers=headers, content=content,
                timeout=httpx.Timeout(timeout, connect=min(timeout, dial or timeout)))
            return await client.send(request, stream=True)
        except netguard.Refused:
            raise PolicyError(key, f"registry {host} does not have a public address and is not "
                              "listed in registry.allowed, registry.insecure or a hosts.toml",
                              **info) from None
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


# ---- endpoints ---------------------------------------------------------------------------


def _header_dict(endpoint: hosts.Endpoint, skip: set[str]) -> dict[str, str]:
    """hosts.toml headers but those named in ``skip`` (lower-case); a name given several
    values is sent once, comma-joined."""
    out: dict[str, str] = {}
    for name, value in endpoint.headers:
        if name.lower() not in skip:
            out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def _drop(headers: dict[str, str], name: str) -> None:
    """Remove ``name`` (lower-case) in any spelling, before setting it once."""
    for key in [k for k in headers if k.lower() == name]:
        del headers[key]


def _reason(exc: ArtifactError) -> str:
    if exc.status is not None:
        return f"HTTP {exc.status}"
    if isinstance(exc, RegistryUnavailable):
        return "unavailable"
    if isinstance(exc, PolicyError):
        return "refused"
    return "invalid answer" if isinstance(exc, InvalidArtifact) else "failed"


def _with_tried(exc: ArtifactError, tried: list[tuple[hosts.Endpoint, str]]) -> ArtifactError:
    """The last endpoint's error, naming the endpoints tried before it (bounded: MAX_HOSTS)."""
    if not tried:
        return exc
    prefix = f"{exc.reference}: "
    message = str(exc)
    message = message[len(prefix):] if message.startswith(prefix) else message
    before = ", ".join(f"{host_of(e.origin)} ({why})" for e, why in tried)
    again = type(exc)(exc.reference, f"{message} (tried before: {before})",
                      registry=exc.registry, url=exc.url, status=exc.status)
    return again


class _EndpointClients:
    """One httpx client per endpoint with TLS settings of its own or named by the operator.

    Keyed by what the connection depends on (scheme, the trusted host, the TLS
    files and their mtimes, so a rotated certificate is read again); at most
    ``MAX`` are kept, the least recently used is closed. Endpoints needing
    neither get None: the fetcher's shared client.
    """

    MAX = 32

    def __init__(self, settings: FetchSettings, trust: tuple[str, str]) -> None:
        self.settings = settings
        #: the node's CAs as the fetcher found them at its start (netguard.trust_source)
        self.trust = trust
        self._clients: OrderedDict[tuple[Any, ...], httpx.AsyncClient] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def get(self, endpoint: hosts.Endpoint,
                  explicit: frozenset[str]) -> httpx.AsyncClient | None:
        """The client for ``endpoint`` (None: the shared one); ValueError for bad TLS files."""
        if not endpoint.own_tls and not endpoint.named:
            return None
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._clients.clear()
            self._loop = loop
        files = (*endpoint.ca_files, *(f for pair in endpoint.client_pairs for f in pair if f))
        key = (endpoint.netloc if endpoint.named else None, endpoint.ca_files,
               endpoint.client_pairs, endpoint.skip_verify, tuple(map(_mtime, files)))
        client = self._clients.get(key)
        if client is not None:
            self._clients.move_to_end(key)
            return client
        # reading the endpoint's CA and certificate files (and a CA bundle where the
        # node has no hashed store) takes milliseconds: off the event loop
        ctx = await asyncio.to_thread(endpoint_ssl_context, endpoint, self.settings,
                                      self.trust)
        trusted = frozenset({endpoint.netloc}) if endpoint.named else frozenset()
        listed = functools.partial(_listed, explicit | trusted)
        jar = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        client = httpx.AsyncClient(
            transport=netguard.Transport(ctx, netguard.CheckedBackend(listed)),
            follow_redirects=False, trust_env=False, cookies=jar,
            timeout=self.settings.timeout)
        self._clients[key] = client
        while len(self._clients) > self.MAX:
            _, old = self._clients.popitem(last=False)
            task = loop.create_task(old.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return client

    async def aclose(self) -> None:
        clients = list(self._clients.values())
        self._clients.clear()
        if self._loop is asyncio.get_running_loop():
            for client in clients:
                await client.aclose()


def _listed(explicit: frozenset[str], host: str, port: int) -> bool:
    return netguard.is_listed(explicit, host, port)


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def endpoint_ssl_context(endpoint: hosts.Endpoint, settings: FetchSettings,
                         trust: tuple[str, str] | None = None) -> ssl.SSLContext:
    """The endpoint's TLS: hosts.toml's skip_verify, ca (added to the default roots) and
    client certificate; the global settings (tls_verify, ca_file) where the file says
    nothing. ValueError naming the file that cannot be loaded."""
    skip = endpoint.skip_verify if endpoint.skip_verify is not None else not settings.tls_verify
    if skip:
        ctx = netguard.unverified_context()
        if endpoint.skip_verify:
            log.warning("%s: TLS verification of %s is disabled (skip_verify)",
                        endpoint.source, endpoint.netloc)
    else:
        # verified even where registry.tls_verify is off: the file asked for it
        ctx = netguard.verified_context(settings, trust)
        for ca in endpoint.ca_files:
            try:
                ctx.load_verify_locations(cafile=ca)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load ca {ca}: {_ssl_detail(exc)}") from None
    if endpoint.client_pairs:
        # one certificate per connection; the first pair (as containerd offers the first
        # that fits, and registries take one client certificate)
        cert, key = endpoint.client_pairs[0]
        try:
            ctx.load_cert_chain(cert, key or None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load client certificate {cert}: "
                             f"{_ssl_detail(exc)}") from None
    return ctx


def _ssl_detail(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return quote_untrusted(str(exc), 120)
