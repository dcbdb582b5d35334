"""containerd's hosts.toml, read as containerd reads it; the order endpoints are tried in."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from nri_seccomp.config import ConfigError, load
from nri_seccomp.decide.reference import parse as ref
from nri_seccomp.registry import errors, hosts
from nri_seccomp.registry.client import ArtifactFetcher, FetchSettings, _Call
from nri_seccomp.registry.hosts import Endpoint, HostsError, parse

ALL = frozenset(hosts.CAPABILITIES)


def endpoints(text: str, registry: str = "reg.example:5000", base: str = "/etc/c/reg",
              **kw: Any) -> tuple[Endpoint, ...]:
    return parse(text.encode(), registry, base, f"{base}/hosts.toml", **kw).endpoints


def shape(e: Endpoint) -> tuple[str, str, frozenset[str], bool, str | None]:
    return e.base, e.netloc, e.capabilities, e.mirror, e.ns


# ---- the parser ----------------------------------------------------------------------


@pytest.mark.parametrize("text, registry, want", [
    # no file content beyond the server: the server alone, no ns
    ('server = "https://reg.example:5000"', "reg.example:5000",
     [("https://reg.example:5000/v2", "reg.example:5000", ALL, False, None)]),
    # no server: the registry itself (https), after the mirrors in file order
    ('[host."https://m2.example"]\n[host."http://m1.example:5000"]\n'
     'capabilities = ["pull"]', "reg.example:5000",
     [("https://m2.example/v2", "m2.example", ALL, True, "reg.example:5000"),
      ("http://m1.example:5000/v2", "m1.example:5000", frozenset({"pull"}), True,
       "reg.example:5000"),
      ("https://reg.example:5000/v2", "reg.example:5000", ALL, False, None)]),
    # Docker Hub: the default server is registry-1.docker.io, ns=docker.io for mirrors
    ('[host."mirror.example"]', "docker.io",
     [("https://mirror.example/v2", "mirror.example", ALL, True, "docker.io"),
      ("https://registry-1.docker.io/v2", "registry-1.docker.io", ALL, False, None)]),
    ('server = "https://registry-1.docker.io"', "docker.io",
     [("https://registry-1.docker.io/v2", "registry-1.docker.io", ALL, False, None)]),
    # a server elsewhere is asked with ns (containerd: the host is not the namespace)
    ('server = "https://only-mirror.example"', "quay.io",
     [("https://only-mirror.example/v2", "only-mirror.example", ALL, False, "quay.io")]),
    # paths: /v2 appended unless there, or override_path keeps the path as written
    ('[host."https://m.example/us"]\n[host."https://n.example/x/v2/"]\n'
     '[host."https://o.example/api/upstream"]\noverride_path = true', "r.io",
     [("https://m.example/us/v2", "m.example", ALL, True, "r.io"),
      ("https://n.example/x/v2", "n.example", ALL, True, "r.io"),
      ("https://o.example/api/upstream", "o.example", ALL, True, "r.io"),
      ("https://r.io/v2", "r.io", ALL, False, None)]),
    # case: hosts and capabilities are case-insensitive
    ('[host."https://M.Example:443"]\ncapabilities = ["PULL", "Resolve"]', "r.io",
     [("https://m.example:443/v2", "m.example:443", frozenset({"pull", "resolve"}), True,
       "r.io"),
      ("https://r.io/v2", "r.io", ALL, False, None)]),
])
def test_endpoints_in_order(text: str, registry: str, want: list[Any]) -> None:
    assert [shape(e) for e in endpoints(text, registry)] == want


def test_tls_headers_and_paths_relative_to_the_host_directory() -> None:
    mirror, server = endpoints('''
ca = "/abs/top.pem"
skip_verify = false
[header]
  x-top = "1"

[host."https://m.example"]
  ca = ["m.pem", "/abs/m2.pem"]
  client = [["c.cert", "c.key"], "both.pem"]
  skip_verify = true
  dial_timeout = "1m30s"
  [host."https://m.example".header]
    x-a = ["one", "two"]
    x-b = "three"
''')
    assert mirror.ca_files == ("/etc/c/reg/m.pem", "/abs/m2.pem")
    assert mirror.client_pairs == (("/etc/c/reg/c.cert", "/etc/c/reg/c.key"),
                                   ("/etc/c/reg/both.pem", ""))
    assert mirror.skip_verify is True and mirror.own_tls
    assert mirror.headers == (("x-a", "one"), ("x-a", "two"), ("x-b", "three"))
    assert mirror.dial_timeout == 90.0
    assert mirror.named and mirror.source == "/etc/c/reg/hosts.toml"
    # the top level applies to the server
    assert server.ca_files == ("/abs/top.pem",) and server.skip_verify is False
    assert server.headers == (("x-top", "1"),)
    assert server.dial_timeout is None


def test_client_string_forms() -> None:
    (server,) = endpoints('client = "/c/one.pem"')
    assert server.client_pairs == (("/c/one.pem", ""),)
    (server,) = endpoints('client = ["/c/a.pem", "/c/b.pem"]')
    assert server.client_pairs == (("/c/a.pem", ""), ("/c/b.pem", ""))


def test_the_implicit_server_is_named_only_in_the_registrys_own_directory() -> None:
    text = '[host."http://127.0.0.1:5000"]'
    own = endpoints(text, "10.0.0.5:5000")
    default = endpoints(text, "10.0.0.5:5000", own=False)
    assert own[0].named and default[0].named  # the mirror: the operator wrote it
    assert own[-1].named and not default[-1].named
    # registry.insecure still decides the implicit server's scheme
    assert endpoints(text, "10.0.0.5:5000", plain_http=True)[-1].scheme == "http"
    assert endpoints('server = "https://10.0.0.5:5000"', "10.0.0.5:5000",
                     own=False)[-1].named


F = "/etc/c/reg/hosts.toml"


@pytest.mark.parametrize("text, message", [
    ("server = ", f"{F}: not valid TOML"),
    ('sever = "https://x"', f"{F}: unknown key 'sever'"),
    ("server = 5", f"{F}: server: expected a URL"),
    ('server = "ftp://x"', f"{F}: server: expected an http:// or https:// URL with a host"),
    ('server = "https://u:p@x"', f"{F}: server: a URL with user-info, a query or a fragment"),
    ('server = "https://x:99999"', f"{F}: server: not a valid URL"),
    ('[host."https://m"]\ncapabilities = ["pull", "fly"]',
     f'{F}: host."https://m".capabilities: unknown capability \'fly\''),
    ('[host."https://m"]\ncapabilities = "pull"',
     f'{F}: host."https://m".capabilities: expected a list'),
    ('[host."https://m"]\nca = 5', f'{F}: host."https://m".ca: expected a path or a list'),
    ('[host."https://m"]\nclient = [["a", "b", "c"]]',
     f'{F}: host."https://m".client: expected a path or a [cert, key] pair'),
    ('[host."https://m"]\nskip_verify = "yes"',
     f'{F}: host."https://m".skip_verify: expected true or false'),
    ('[host."https://m"]\noverride_path = 1',
     f'{F}: host."https://m".override_path: expected true or false'),
    ('[host."https://m"]\nhost = "x"', f'{F}: host."https://m": unknown key \'host\''),
    ('[host."https://m".header]\n"bad name" = "v"',
     f'{F}: host."https://m".header.bad name: not a valid header name'),
    ('[header]\nHost = "evil"', f"{F}: server.header.Host: may not be set by hosts.toml"),
    ('[header]\nAccept-Encoding = "gzip"', f"{F}: server.header.Accept-Encoding: may not"),
    ('[header]\nx = "a\\r\\nInjected: 1"', f"{F}: server.header.x: value with a line break"),
    ('[header]\nx = 1', f"{F}: server.header.x: expected a string or a list of strings"),
    ('[header]\nx = "' + "v" * 1025 + '"', f"{F}: server.header.x: value longer than 1024"),
    ("[header]\n" + "".join(f'x{i} = "v"\n' for i in range(17)),
     f"{F}: server.header: more than 16 values"),
    ("".join(f'[host."https://m{i}"]\n' for i in range(17)), f"{F}: more than 16 [host]"),
    ('dial_timeout = "soon"', f"{F}: server.dial_timeout: expected a duration"),
    ('dial_timeout = "0s"', f"{F}: server.dial_timeout: must be positive"),
    ("ca = [" + ", ".join(f'"c{i}"' for i in range(9)) + "]", f"{F}: server.ca: more than 8"),
])
def test_errors_name_the_file_and_key(text: str, message: str) -> None:
    with pytest.raises(HostsError) as info:
        endpoints(text)
    assert str(info.value).startswith(message), str(info.value)


def test_file_size_cap() -> None:
    raw = b"#" * (hosts.MAX_FILE + 1)
    with pytest.raises(HostsError, match="larger than 65536 bytes"):
        parse(raw, "r.io", "/d", "/d/hosts.toml")


def test_unsupported_keys_are_reported() -> None:
    config = parse(b'proxy = "http://p:8080"\n[host."https://m"]\nproxy = "http://q"',
                   "r.io", "/d", "/d/hosts.toml")
    assert config.ignored == ("proxy", 'host."https://m".proxy')


# ---- where the file is ----------------------------------------------------------------


def test_host_directory_names_in_containerds_order(tmp_path: Path) -> None:
    assert hosts.host_dir_names("r.io:5000") == ["r.io_5000_", "r.io:5000"]
    assert hosts.host_dir_names("r.io") == ["r.io"]
    assert hosts.host_dir_names("[::1]:5000") == ["[::1]_5000_", "[::1]:5000"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert hosts.candidates([str(a), str(b)], "r.io:5000") == [
        a / "r.io_5000_", a / "r.io:5000", b / "r.io_5000_", b / "r.io:5000",
        a / "_default", b / "_default"]
    (a / "_default").mkdir(parents=True)
    assert hosts.locate([str(a), str(b)], "r.io:5000") == a / "_default"
    (b / "r.io:5000").mkdir(parents=True)
    assert hosts.locate([str(a), str(b)], "r.io:5000") == b / "r.io:5000"
    (b / "r.io_5000_").mkdir()
    assert hosts.locate([str(a), str(b)], "r.io:5000") == b / "r.io_5000_"


def test_docker_certificate_layout_without_hosts_toml(tmp_path: Path) -> None:
    d = tmp_path / "r.io:5000"
    d.mkdir()
    for name in ("ca.crt", "z.crt", "client.cert", "client.key", "lone.cert", "notes.txt"):
        (d / name).write_text("x")
    (endpoint,) = hosts.load(d, "r.io:5000").endpoints
    assert endpoint.base == "https://r.io:5000/v2" and endpoint.named
    assert endpoint.ca_files == (str(d / "ca.crt"), str(d / "z.crt"))
    assert endpoint.client_pairs == ((str(d / "client.cert"), str(d / "client.key")),
                                     (str(d / "lone.cert"), ""))


def test_table_rereads_a_changed_file(tmp_path: Path) -> None:
    table = hosts.HostsTable([str(tmp_path)], insecure=["plain:80"])
    assert table.get("r.io").endpoints == (hosts.default_endpoint("r.io"),)
    assert table.get("plain:80").endpoints[0].scheme == "http"
    d = tmp_path / "r.io"
    d.mkdir()
    (d / "hosts.toml").write_text('[host."https://m1"]\n')
    assert [e.netloc for e in table.get("r.io").endpoints] == ["m1", "r.io"]
    (d / "hosts.toml").write_text('[host."https://m2.example"]\n')
    os.utime(d / "hosts.toml", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert [e.netloc for e in table.get("r.io").endpoints] == ["m2.example", "r.io"]
    (d / "hosts.toml").write_text("broken =")
    os.utime(d / "hosts.toml", ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    with pytest.raises(HostsError, match=r"r\.io/hosts\.toml: not valid TOML"):
        table.get("r.io")


def test_config_path_setting() -> None:
    assert load("").registry.config_path == ("/etc/containerd/certs.d",)
    assert load("registry: {config_path: /a:/b}").registry.config_path == ("/a", "/b")
    assert load("registry: {config_path: [/a]}").registry.config_path == ("/a",)
    assert load("registry: {config_path: []}").registry.config_path == ()
    with pytest.raises(ConfigError, match=r"registry\.config_path: 'rel' must be an absolute"):
        load("registry: {config_path: rel}")
    with pytest.raises(ConfigError, match=r"registry\.credential_helper_timeout: 60\.0 is out"):
        load("registry: {credential_helper_timeout: 60}")


# ---- the order endpoints are tried in ---------------------------------------------------


def _attempts(tmp_path: Path, text: str, reference: str,
              outcomes: dict[str, Exception | None]) -> tuple[list[str], Any]:
    """Run the endpoint loop with ``work`` failing as ``outcomes`` says, per endpoint host."""
    registry = ref(reference).registry
    (tmp_path / registry).mkdir(exist_ok=True)
    (tmp_path / registry / "hosts.toml").write_text(text)
    f = ArtifactFetcher(FetchSettings(allowed=("*",), config_path=(str(tmp_path),)))
    r = ref(reference)
    call = _Call(r, time.monotonic() + 10, 5.0)
    seen: list[str] = []

    async def work() -> str:
        assert call.endpoint is not None
        seen.append(call.endpoint.netloc)
        outcome = outcomes.get(call.endpoint.netloc)
        if outcome is not None:
            raise outcome
        return call.endpoint.netloc

    async def main() -> Any:
        try:
            capability = "resolve" if r.digest is None else "pull"
            first = await f._on_endpoints(call, capability, work)
            second = await f._on_endpoints(call, "pull", work)
            return first, second
        except errors.ArtifactError as exc:
            return exc
        finally:
            await f.aclose()

    return seen, asyncio.run(main())


MIRRORS = ('[host."https://m1.example"]\ncapabilities = ["pull"]\n'
           '[host."https://m2.example"]\n')
DIGEST = "@sha256:" + "a" * 64


def test_a_pull_only_mirror_is_not_asked_to_resolve_a_tag(tmp_path: Path) -> None:
    seen, result = _attempts(tmp_path, MIRRORS, "r.io/x/y:v1", {})
    assert result == ("m2.example", "m1.example")
    assert seen == ["m2.example", "m1.example"]
    seen, result = _attempts(tmp_path, MIRRORS, f"r.io/x/y{DIGEST}", {})
    assert seen == ["m1.example", "m1.example"]


def test_mirror_failures_fall_through_to_the_server(tmp_path: Path) -> None:
    def unavailable(host: str) -> errors.RegistryUnavailable:
        return errors.RegistryUnavailable("k", f"cannot connect to registry {host}")

    seen, result = _attempts(tmp_path, MIRRORS, f"r.io/x/y{DIGEST}", {
        "m1.example": unavailable("m1.example"),
        "m2.example": errors.NotFound("k", "not found", status=404)})
    assert result == ("r.io", "r.io")
    # m1 could not be connected to: not tried again in the same call; m2's 404 is
    assert seen == ["m1.example", "m2.example", "r.io", "m2.example", "r.io"]


def test_the_upstreams_error_is_reported_naming_the_mirrors(tmp_path: Path) -> None:
    seen, result = _attempts(tmp_path, MIRRORS, f"r.io/x/y{DIGEST}", {
        "m1.example": errors.Unauthorized("k", "access denied", status=401),
        "m2.example": errors.RegistryUnavailable("k", "did not answer"),
        "r.io": errors.NotFound(f"r.io/x/y{DIGEST}", "not found: HTTP 404 from registry r.io",
                                registry="r.io", status=404)})
    assert isinstance(result, errors.NotFound) and result.status == 404
    assert str(result) == (f"r.io/x/y{DIGEST}: not found: HTTP 404 from registry r.io "
                           "(tried before: m1.example (HTTP 401), m2.example (unavailable))")
    assert seen == ["m1.example", "m2.example", "r.io"]


def test_no_endpoint_may_resolve(tmp_path: Path) -> None:
    text = '[host."https://m1.example"]\ncapabilities = ["pull"]\ncapabilities = ["pull"]'
    _, result = _attempts(tmp_path, text, "r.io/x/y:v1", {})
    # a TOML error (the key twice) is a configuration error naming the file
    assert isinstance(result, errors.RegistryUnavailable)
    assert "registry configuration: " in str(result) and "hosts.toml: not valid TOML" in str(
        result)
    _, result = _attempts(tmp_path, 'capabilities = ["pull"]', "r.io/x/y:v1", {})
    assert isinstance(result, errors.PolicyError)
    assert "no endpoint in " in str(result) and "may resolve a tag" in str(result)
