"""Where the client may connect (``registry.netguard``): address classes and explicit hosts."""

from __future__ import annotations

import asyncio

import pytest

from nri_seccomp.registry import netguard
from nri_seccomp.registry.client import FetchSettings


@pytest.mark.parametrize(("address", "public"), [
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False),
    ("224.0.0.1", False), ("240.0.0.1", False), ("255.255.255.255", False),
    ("::1", False), ("::", False), ("fc00::1", False), ("fd12::1", False), ("fe80::1", False),
    ("ff02::1", False), ("::ffff:127.0.0.1", False), ("::ffff:169.254.169.254", False),
    ("::127.0.0.1", False), ("64:ff9b::a9fe:a9fe", False), ("2002:7f00:1::1", False),
    ("fec0::1", False), ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("::ffff:8.8.8.8", False),
])
def test_address_classification(address: str, public: bool) -> None:
    assert netguard.is_public_address(address) is public


@pytest.mark.parametrize("address", ["", "localhost", "1.2.3", "fe80::1%eth0", "::1%1"])
def test_names_and_scoped_locals_are_not_public(address: str) -> None:
    assert netguard.is_public_address(address) is False


def test_explicit_hosts_are_the_literal_ones() -> None:
    settings = FetchSettings(
        allowed=("Reg.Example:5000/team/*", "*.example/*", "ghcr.io/acme/*", "10.0.0.[1-3]/*",
                 "docker.io/library/*", "noslash"),
        insecure_registries=frozenset(["127.0.0.1:5000"]),
        token_realm_hosts=("auth.example",))
    assert netguard.explicit_hosts(settings) == frozenset({
        "reg.example:5000", "ghcr.io", "docker.io", "registry-1.docker.io", "127.0.0.1:5000",
        "auth.example"})
    assert netguard.explicit_hosts(FetchSettings()) == frozenset({"auth.docker.io"})


@pytest.mark.parametrize(("host", "port", "listed"), [
    ("reg.example", 5000, True), ("REG.example", 5000, True), ("reg.example", 5001, False),
    ("ghcr.io", 443, True), ("ghcr.io", 80, True), ("ghcr.io", 8443, False),
    ("::1", 5000, True), ("::1", 443, False), ("127.0.0.1", 5000, False),
])
def test_is_listed(host: str, port: int, listed: bool) -> None:
    explicit = frozenset({"reg.example:5000", "ghcr.io", "[::1]:5000"})
    assert netguard.is_listed(explicit, host, port) is listed


def test_checked_backend_refuses_before_connecting() -> None:
    backend = netguard.CheckedBackend(lambda host, port: False)

    async def go() -> None:
        with pytest.raises(netguard.Refused):
            await backend.connect_tcp("127.0.0.1", 9, timeout=1.0)
        with pytest.raises(netguard.Refused):
            await backend.connect_tcp("[::1]", 9, timeout=1.0)
        with pytest.raises(netguard.Refused):
            await backend.connect_unix_socket("/run/containerd/containerd.sock")

    asyncio.run(go())
