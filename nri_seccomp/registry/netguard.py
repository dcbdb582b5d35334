"""Where the registry client may connect (SSRF), and the transport that enforces it.

The plugin is a root process in the host's network namespace and references
come from pod annotations that tenants write, so the registry, every redirect
target and every token realm could otherwise point at the node's own services,
the cloud metadata endpoint or the cluster's internal network. Checking a URL's
host name before the request is not enough: the name is resolved again when
connecting (DNS rebinding), and disguised literals such as ``2130706433``
resolve to 127.0.0.1.

So the client connects only through ``CheckedBackend``, an httpcore network
backend that resolves the name itself (``loop.getaddrinfo``), refuses the
connection unless every address is public (``is_public_address``: no loopback,
RFC 1918, link-local incl. 169.254.169.254, CGNAT, unique-local, unspecified,
multicast, reserved, nor IPv6 forms embedding such an IPv4 address), and then
connects to the address it checked. A host the administrator named literally
(``explicit_hosts``: the registry part of an ``allowed`` pattern without glob
characters, an ``insecure`` entry, a ``token_realm_hosts`` entry) is exempt: that
is how a registry on the node or the cluster network is allowed. Unix sockets
are refused. TLS still verifies the host name: httpcore passes it to
``start_tls`` as ``server_hostname``.

The backend is plugged in by ``Transport``, a small ``httpx.AsyncBaseTransport``
over ``httpcore.AsyncConnectionPool`` (httpx's own transport does not take a
network backend), so only public APIs are used and the client's
``httpx.AsyncClient`` is built on it like on any other transport. The refusal
is raised as ``Refused`` (the client turns it into ``PolicyError``), a name
that does not resolve as ``Unresolvable``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

import certifi
import httpcore
import httpx

if TYPE_CHECKING:
    from nri_seccomp.registry.client import FetchSettings


class Refused(Exception):
    """The destination resolves to an address that is not public and is not listed."""


class Unresolvable(Exception):
    """The destination's name does not resolve (or resolves to nothing)."""


# ---- address classification -------------------------------------------------------

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


# ---- hosts the administrator named ----------------------------------------------------


def explicit_hosts(settings: FetchSettings) -> frozenset[str]:
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


def is_listed(explicit: frozenset[str], host: str, port: int) -> bool:
    """``host``:``port`` (as httpcore connects to it) is among the ``explicit`` hosts."""
    host = host.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}" in explicit or (port in (80, 443) and host in explicit)


# ---- the transport ----------------------------------------------------------------


class CheckedBackend(httpcore.AsyncNetworkBackend):
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
            raise Unresolvable(str(exc)) from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise Unresolvable("no address")
        if not self._listed(name, port) and not all(map(is_public_address, addresses)):
            raise Refused(name)
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
        raise Refused(path)

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


class Transport(httpx.AsyncBaseTransport):
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


# ---- TLS trust -------------------------------------------------------------------

#: where a Linux node keeps its CAs, in the order Go's crypto/x509 reads them (and so
#: containerd, which pulls the node's images with them): the first bundle file found,
#: and the directories
SYSTEM_CA_FILES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Gentoo
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL 6
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/pki/tls/cacert.pem",  # OpenELEC
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # CentOS, RHEL 7
    "/etc/ssl/cert.pem",  # Alpine
)
SYSTEM_CA_DIRS = ("/etc/ssl/certs", "/etc/pki/tls/certs")
#: OpenSSL's name for a CA in a hashed directory: the subject's hash, "." and a number
_HASHED = re.compile(r"[0-9a-f]{8}\.[0-9]+")


def trust_source() -> tuple[str, str]:
    """The node's CAs, as ("capath" | "cafile" | "certifi", path).

    A directory with OpenSSL's hashed names (``update-ca-certificates`` keeps one on
    Debian, Ubuntu and Alpine) is preferred: OpenSSL then reads a CA when a
    verification needs it, where a bundle file is parsed whole into every context
    (~1 MiB for the ~140 CAs of a distribution, measured). A node with neither (a
    minimal container image) gets certifi's bundle, which the plugin ships."""
    for directory in SYSTEM_CA_DIRS:
        if _hashed_store(directory):
            return "capath", directory
    for path in SYSTEM_CA_FILES:
        if os.path.isfile(path):
            return "cafile", path
    return "certifi", certifi.where()


def _hashed_store(directory: str) -> bool:
    """``directory`` holds OpenSSL's hashed names, every one of them readable, none
    missing in its sequence.

    OpenSSL looks a CA up by name and stops at the first gap: a store copied or
    mounted without the files its links point to (``/etc/ssl/certs`` without
    ``/usr/share/ca-certificates``) would fail the checks its bundle file passes, so
    it is passed over for that file."""
    try:
        with os.scandir(directory) as entries:
            hashed = {e.name: e for e in entries if _HASHED.fullmatch(e.name)}
            if not hashed:
                return False
            for name, entry in hashed.items():
                stem, number = name.split(".")
                # is_file follows the link: a dangling one is not a file
                if not entry.is_file() or (number != "0" and f"{stem}.{int(number) - 1}"
                                           not in hashed):
                    return False
    except OSError:
        return False
    return True


def ssl_context(settings: FetchSettings,
                trust: tuple[str, str] | None = None) -> ssl.SSLContext:
    """The TLS context for registries: the node's CAs (as containerd; ``trust`` as
    :func:`trust_source` gives it), the configured file alone, or no checks."""
    if not settings.tls_verify:
        return unverified_context()
    return verified_context(settings, trust)


def verified_context(settings: FetchSettings,
                     trust: tuple[str, str] | None = None) -> ssl.SSLContext:
    """TLS with certificate checks, whatever ``tls_verify`` says (a hosts.toml's
    ``skip_verify = false`` asks for them): ``ca_file`` alone, or the node's CAs."""
    if settings.ca_file:
        return ssl.create_default_context(cafile=settings.ca_file)
    kind, path = trust or trust_source()
    if kind == "capath":
        return ssl.create_default_context(capath=path)
    return ssl.create_default_context(cafile=path)


def unverified_context() -> ssl.SSLContext:
    """TLS without certificate checks, and without loading CAs it would not use."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
