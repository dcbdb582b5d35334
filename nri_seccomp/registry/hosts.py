"""containerd's registry host configuration (``hosts.toml``), read the way containerd reads it.

So a profile comes through the same mirrors, CAs, client certificates and plain-HTTP
endpoints as the node's images. The directory layout (containerd ``docs/hosts.md``)::

    <config_path>/<host>_<port>_/hosts.toml     (tried first for a host with a port)
    <config_path>/<host[:port]>/hosts.toml
    <config_path>/_default/hosts.toml           (when no directory names the host)

Several roots may be given (containerd's ``config_path`` takes ``:``-separated
paths): every root is searched for the host's own directory before any
``_default``. A host directory without ``hosts.toml`` is read in Docker's
certificate layout: ``*.crt`` are CA files, ``X.cert`` with ``X.key`` a client pair.

A file yields an ordered list of :class:`Endpoint`: the ``[host."URL"]`` tables in
file order (mirrors), then the ``server`` (the upstream; the registry itself when
the file names none). Each endpoint: scheme (``http://`` means plain HTTP), host,
API root path (``/v2`` appended unless ``override_path``), capabilities
(``pull``, ``resolve``, ``push``; all when unset), TLS (``ca`` files added to the
default roots, ``client`` pairs, ``skip_verify``), ``header`` values and
``dial_timeout``. Relative paths are relative to the host directory.

Bounds: a file is at most ``MAX_FILE`` bytes, with at most ``MAX_HOSTS`` host
tables, ``MAX_HEADERS`` headers (``MAX_HEADER_VALUE`` characters each) and a few
certificate files per endpoint. Errors are :class:`HostsError` naming the file
and the key. ``parse`` is pure; ``locate`` and ``load`` only stat and read the
files named here.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

#: bytes of one hosts.toml
MAX_FILE = 64 * 1024
#: [host."…"] tables in one file
MAX_HOSTS = 16
#: headers per endpoint, and characters of one header value
MAX_HEADERS = 16
MAX_HEADER_VALUE = 1024
#: CA files and client pairs per endpoint; files of a Docker-layout certificate directory
MAX_CERT_FILES = 8
MAX_CERT_DIR_ENTRIES = 64
CAPABILITIES = ("pull", "resolve", "push")
DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
#: keys containerd reads that this client does not use; logged when a file sets them
IGNORED_KEYS = ("proxy",)
_KNOWN_KEYS = frozenset(("server", "host", "capabilities", "ca", "client", "skip_verify",
                         "header", "override_path", "dial_timeout")) | frozenset(IGNORED_KEYS)
#: headers a hosts.toml may not set: they frame the exchange or decide what is hashed
_RESERVED_HEADERS = frozenset(("host", "content-length", "transfer-encoding", "connection",
                               "accept-encoding", "upgrade", "te", "trailer"))
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


#: (key, problem) → the error naming the file, the table and the key
_Fail = Callable[[str, str], "HostsError"]


class HostsError(ValueError):
    """A hosts.toml (or its directory) cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class Endpoint:
    """One place to fetch a registry's content from, as a hosts.toml describes it."""

    scheme: str
    #: host[:port], lower-case, as connected to
    netloc: str
    #: the API root ("/v2", "/mirror/v2", or the path as written with override_path)
    path: str = "/v2"
    capabilities: frozenset[str] = frozenset(CAPABILITIES)
    ca_files: tuple[str, ...] = ()
    #: (certificate, key); key "" when the certificate file holds the key too
    client_pairs: tuple[tuple[str, str], ...] = ()
    skip_verify: bool | None = None
    headers: tuple[tuple[str, str], ...] = ()
    #: seconds to connect, if the file says (dial_timeout)
    dial_timeout: float | None = None
    #: from a [host."…"] table: tried before the server, skipped on 404
    mirror: bool = False
    #: the operator wrote this URL (not derived from a reference): a trusted destination
    named: bool = False
    #: requests carry ?ns=<registry> (the endpoint is not the registry's own host)
    ns: str | None = None
    #: the file it came from, for messages ("" for the built-in default)
    source: str = field(default="", compare=False)

    @property
    def base(self) -> str:
        """``scheme://host[:port]/api-root`` (no trailing slash)."""
        return f"{self.scheme}://{self.netloc}{self.path}"

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.netloc}"

    @property
    def host(self) -> str:
        """host[:port] as a docker config keys its credentials."""
        return DOCKER_HUB if self.netloc == DOCKER_HUB_ENDPOINT else self.netloc

    @property
    def own_tls(self) -> bool:
        """Whether the file sets TLS for this endpoint (else the global settings apply)."""
        return bool(self.ca_files or self.client_pairs) or self.skip_verify is not None

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


@dataclass(frozen=True)
class HostsConfig:
    """The endpoints for one registry, in the order they are tried (the server last)."""

    endpoints: tuple[Endpoint, ...]
    #: the hosts.toml or certificate directory read ("" for the built-in default)
    source: str = ""
    #: keys the file sets that this client does not use (for a warning)
    ignored: tuple[str, ...] = ()


# ---- the built-in default ---------------------------------------------------------


def default_netloc(registry: str) -> str:
    return DOCKER_HUB_ENDPOINT if registry == DOCKER_HUB else registry.lower()


def default_endpoint(registry: str, plain_http: bool = False) -> Endpoint:
    """The registry itself, as when no hosts.toml exists (``registry.insecure`` → HTTP)."""
    return Endpoint("http" if plain_http else "https", default_netloc(registry))


def _ns(registry: str, netloc: str) -> str | None:
    same = netloc in (registry.lower(), default_netloc(registry))
    return None if same else registry


# ---- where the file is ------------------------------------------------------------


def host_dir_names(registry: str) -> list[str]:
    """Directory names for ``registry``, in containerd's order (without ``_default``)."""
    host, sep, port = registry.rpartition(":")
    if sep and port.isdigit() and host and (":" not in host or host.endswith("]")):
        return [f"{host}_{port}_", registry]
    return [registry]


def candidates(roots: Iterable[str], registry: str) -> list[Path]:
    """Every directory that may configure ``registry``, best first (pure)."""
    roots = list(roots)
    own = [Path(root) / name for root in roots for name in host_dir_names(registry)]
    return own + [Path(root) / "_default" for root in roots]


def locate(roots: Iterable[str], registry: str) -> Path | None:
    """The directory configuring ``registry``: the first candidate that is a directory."""
    for path in candidates(roots, registry):
        if path.is_dir():
            return path
    return None


def load(directory: Path, registry: str, plain_http: bool = False) -> HostsConfig:
    """The endpoints a host directory gives ``registry`` (its hosts.toml, else its certs).

    A directory named for the registry makes the registry itself a destination the
    operator named (``Endpoint.named``); ``_default`` does not.
    """
    own = directory.name != "_default"
    file = directory / "hosts.toml"
    try:
        with open(file, "rb") as fh:
            raw = fh.read(MAX_FILE + 1)
    except FileNotFoundError:
        raw = b""
    except OSError as exc:
        raise HostsError(f"{file}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE:
        raise HostsError(f"{file}: larger than {MAX_FILE} bytes")
    if not raw.strip():
        return cert_dir(directory, registry, plain_http, own=own)
    return parse(raw, registry, str(directory), str(file), plain_http, own=own)


def cert_dir(directory: Path, registry: str, plain_http: bool = False, *,
             own: bool = True) -> HostsConfig:
    """Docker's layout: ``*.crt`` CA files, ``X.cert`` (+ ``X.key``) client certificates."""
    try:
        names = sorted(p.name for p in directory.iterdir() if p.is_file())
    except OSError as exc:
        raise HostsError(f"{directory}: cannot list: {exc.strerror or exc}") from None
    if len(names) > MAX_CERT_DIR_ENTRIES:
        raise HostsError(f"{directory}: more than {MAX_CERT_DIR_ENTRIES} files")
    cas = tuple(str(directory / n) for n in names if n.endswith(".crt"))
    pairs = tuple((str(directory / n), str(directory / (n[:-5] + ".key"))
                   if n[:-5] + ".key" in names else "") for n in names if n.endswith(".cert"))
    if len(cas) > MAX_CERT_FILES or len(pairs) > MAX_CERT_FILES:
        raise HostsError(f"{directory}: more than {MAX_CERT_FILES} certificate files")
    base = default_endpoint(registry, plain_http)
    endpoint = Endpoint(base.scheme, base.netloc, ca_files=cas, client_pairs=pairs,
                        named=own, source=str(directory))
    return HostsConfig((endpoint,), str(directory))


# ---- the file -----------------------------------------------------------------------


def parse(raw: bytes, registry: str, base_dir: str, file: str,
          plain_http: bool = False, *, own: bool = True) -> HostsConfig:
    """The endpoints ``raw`` (a hosts.toml in ``base_dir``) gives ``registry``; no I/O.

    ``own``: the file is in the registry's own directory (not ``_default``), so the
    registry as the implicit server is named by the operator. ``plain_http``: the
    implicit server speaks HTTP (``registry.insecure``).
    """
    if len(raw) > MAX_FILE:
        raise HostsError(f"{file}: larger than {MAX_FILE} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise HostsError(f"{file}: not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise HostsError(f"{file}: not valid TOML: {str(exc)[:200]}") from None
    ignored = tuple(k for k in IGNORED_KEYS if k in data)
    for key in data:
        if key not in _KNOWN_KEYS:
            # containerd ignores keys it does not know; a typo should not pass silently
            raise HostsError(f"{file}: unknown key {key[:40]!r}")
    hosts = data.get("host", {})
    if not isinstance(hosts, dict):
        raise HostsError(f"{file}: host: expected tables [host.\"URL\"]")
    if len(hosts) > MAX_HOSTS:
        raise HostsError(f"{file}: more than {MAX_HOSTS} [host] tables")
    endpoints: list[Endpoint] = []
    for url, table in hosts.items():
        where = f'host."{url[:200]}"'
        if not isinstance(table, dict):
            raise HostsError(f"{file}: {where}: expected a table")
        for key in table:
            if key not in _KNOWN_KEYS - {"server", "host"}:
                raise HostsError(f"{file}: {where}: unknown key {key[:40]!r}")
        ignored += tuple(f"{where}.{k}" for k in IGNORED_KEYS if k in table)
        endpoints.append(_endpoint(url, table, registry, base_dir, file, where, mirror=True))
    server = data.get("server")
    if server is None:
        default = default_endpoint(registry, plain_http)
        endpoints.append(_endpoint(default.origin, data, registry, base_dir, file, "server",
                                   mirror=False, named=own))
    else:
        if not isinstance(server, str) or not server:
            raise HostsError(f"{file}: server: expected a URL")
        endpoints.append(_endpoint(server, data, registry, base_dir, file, "server",
                                   mirror=False))
    return HostsConfig(tuple(endpoints), file, ignored)


def _endpoint(url: str, table: Mapping[str, Any], registry: str, base_dir: str, file: str,
              where: str, *, mirror: bool, named: bool = True) -> Endpoint:
    def fail(key: str, problem: str) -> HostsError:
        return HostsError(f"{file}: {where}{'.' + key if key else ''}: {problem}")

    scheme, netloc, path = _split_url(url, fail)
    override = table.get("override_path", False)
    if not isinstance(override, bool):
        raise fail("override_path", "expected true or false")
    path = re.sub(r"/+", "/", path).rstrip("/")
    if not override and not path.endswith("/v2"):
        path += "/v2"
    skip = table.get("skip_verify")
    if skip is not None and not isinstance(skip, bool):
        raise fail("skip_verify", "expected true or false")
    return Endpoint(
        scheme, netloc, path,
        capabilities=_capabilities(table.get("capabilities"), fail),
        ca_files=_paths(table.get("ca"), base_dir, fail),
        client_pairs=_clients(table.get("client"), base_dir, fail),
        skip_verify=skip,
        headers=_headers(table.get("header"), fail),
        dial_timeout=_duration(table.get("dial_timeout"), fail),
        mirror=mirror,
        named=named,
        ns=_ns(registry, netloc),
        source=file,
    )


def _split_url(url: str, fail: _Fail) -> tuple[str, str, str]:
    if len(url) > 1024:
        raise fail("", "URL longer than 1024 characters")
    # containerd: a URL without a scheme means https
    if "://" in url and not url.startswith(("http://", "https://")):
        raise fail("", "expected an http:// or https:// URL with a host")
    full = url if url.startswith(("http://", "https://")) else f"https://{url}"
    try:
        parts = urlsplit(full)
        port = parts.port
    except ValueError:
        raise fail("", "not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise fail("", "expected an http:// or https:// URL with a host")
    if "@" in parts.netloc or parts.query or parts.fragment:
        raise fail("", "a URL with user-info, a query or a fragment is not supported")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return parts.scheme, netloc, parts.path


def _capabilities(value: Any, fail: _Fail) -> frozenset[str]:
    if value is None or value == []:
        return frozenset(CAPABILITIES)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fail("capabilities", 'expected a list such as ["pull", "resolve"]')
    caps = frozenset(v.lower() for v in value)
    unknown = sorted(caps - set(CAPABILITIES))
    if unknown:
        raise fail("capabilities", f"unknown capability {unknown[0][:40]!r} "
                   f"(expected {', '.join(CAPABILITIES)})")
    return caps


def _abs(path: str, base_dir: str, fail: _Fail, key: str) -> str:
    if not path or "\0" in path or len(path) > 4096:
        raise fail(key, "expected a file path")
    return path if path.startswith("/") else str(Path(base_dir) / path)


def _paths(value: Any, base_dir: str, fail: _Fail) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise fail("ca", "expected a path or a list of paths")
    if len(items) > MAX_CERT_FILES:
        raise fail("ca", f"more than {MAX_CERT_FILES} files")
    return tuple(_abs(v, base_dir, fail, "ca") for v in items)


def _clients(value: Any, base_dir: str, fail: _Fail) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise fail("client", "expected a path, a list of paths or of [cert, key] pairs")
    if len(items) > MAX_CERT_FILES:
        raise fail("client", f"more than {MAX_CERT_FILES} certificates")
    pairs: list[tuple[str, str]] = []
    for item in items:
        if isinstance(item, str):
            pairs.append((_abs(item, base_dir, fail, "client"), ""))
        elif (isinstance(item, list) and len(item) == 2
              and all(isinstance(v, str) for v in item)):
            key = _abs(item[1], base_dir, fail, "client") if item[1] else ""
            pairs.append((_abs(item[0], base_dir, fail, "client"), key))
        else:
            raise fail("client", "expected a path or a [cert, key] pair")
    return tuple(pairs)


def _headers(value: Any, fail: _Fail) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise fail("header", "expected a table of names and values")
    out: list[tuple[str, str]] = []
    for name, raw in value.items():
        key = f"header.{name[:40]}"
        if not _TOKEN.fullmatch(name) or len(name) > 100:
            raise fail(key, "not a valid header name")
        if name.lower() in _RESERVED_HEADERS:
            raise fail(key, "may not be set by hosts.toml")
        values = [raw] if isinstance(raw, str) else raw
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise fail(key, "expected a string or a list of strings")
        for v in values:
            if len(v) > MAX_HEADER_VALUE:
                raise fail(key, f"value longer than {MAX_HEADER_VALUE} characters")
            if any(c in v for c in "\r\n\0"):
                raise fail(key, "value with a line break")
            out.append((name, v))
    if len(out) > MAX_HEADERS:
        raise fail("header", f"more than {MAX_HEADERS} values")
    return tuple(out)


def _duration(value: Any, fail: _Fail) -> float | None:
    """A Go duration ("1s", "500ms", "1m30s") in seconds."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 32 or not _DURATION.fullmatch(value):
        raise fail("dial_timeout", 'expected a duration such as "1s" or "500ms"')
    seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(value))
    if seconds <= 0:
        raise fail("dial_timeout", "must be positive")
    return seconds


# ---- per registry, re-read when the file changes ------------------------------------


class HostsTable:
    """The endpoints per registry under ``roots``, re-read when a file changes.

    No roots: every registry gets its built-in default endpoint. Each lookup stats
    the candidate directories and the file (cheap, on the event loop, like the
    docker config); a file is parsed again when its mtime, size or inode changed.
    """

    MAX_ENTRIES = 256

    def __init__(self, roots: Iterable[str], insecure: Iterable[str] = ()) -> None:
        self.roots = tuple(roots)
        self._insecure = frozenset(insecure)
        self._cache: dict[str, tuple[tuple[Any, ...], HostsConfig]] = {}

    def get(self, registry: str) -> HostsConfig:
        """The registry's endpoints; ``HostsError`` for a file that cannot be used."""
        plain = registry in self._insecure
        directory = locate(self.roots, registry) if self.roots else None
        if directory is None:
            return HostsConfig((default_endpoint(registry, plain),))
        stamp = (str(directory), *_stamp(directory / "hosts.toml"), *_stamp(directory))
        cached = self._cache.get(registry)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        config = load(directory, registry, plain)
        if len(self._cache) >= self.MAX_ENTRIES:
            self._cache.pop(next(iter(self._cache)))
        self._cache[registry] = (stamp, config)
        return config


def _stamp(path: Path) -> tuple[int, int, int]:
    try:
        st = path.stat()
    except OSError:
        return (0, 0, 0)
    return (st.st_mtime_ns, st.st_size, st.st_ino)
