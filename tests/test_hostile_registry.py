"""Hostile pod authors and hostile registries: SSRF, leaks, resource use (the attack, then
the defended outcome)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from devtools.badregistry import BadRegistry
from devtools.registry import LocalRegistry, digest_of, docker_config
from nri_seccomp.decide.reference import parse
from nri_seccomp.registry import artifact, errors
from nri_seccomp.registry.client import ArtifactFetcher, FetchSettings

from .fetching import fetch, fetcher, head, run, self_signed

pytestmark = pytest.mark.integration  # real processes: plugin, registries, servers


# ---- hostile pod authors and hostile registries (SSRF, leaks, resource use) ----------
# Each test is written as the attack; its assertions are the defended outcome.


def _artifact_manifest(config_media_type: str = artifact.SECCOMP_CONFIG_MEDIA_TYPE) -> bytes:
    from devtools.badregistry import PROFILE as BAD_PROFILE

    return json.dumps({
        "schemaVersion": 2, "mediaType": artifact.OCI_MANIFEST,
        "config": {"mediaType": config_media_type, "digest": digest_of(b"{}\n"), "size": 3},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest_of(BAD_PROFILE), "size": len(BAD_PROFILE)}],
    }).encode()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_default_configuration_allows_no_registry() -> None:
    assert FetchSettings().allowed == ()
    with BadRegistry("ok") as bad:
        f = ArtifactFetcher(FetchSettings(insecure_registries=frozenset([bad.address])))
        ref = parse(f"{bad.address}/x/y:t")
        for call in (lambda: fetch(f, ref),
                     lambda: run(f.manifest_annotations(ref, time.monotonic() + 5))):
            with pytest.raises(errors.PolicyError) as info:
                call()
            assert str(info.value) == (f"{bad.address}/x/y:t: registry.allowed is empty: list "
                                       "the registries profiles may come from")
        assert bad.connections == 0


def test_pod_pointing_at_node_loopback_is_refused_without_connecting() -> None:
    # allowed: ["*"] is meant for public registries; a pod author names the node itself
    with BadRegistry("ok") as bad:
        port = bad.address.rsplit(":", 1)[1]
        for name in (bad.address, f"localhost:{port}"):
            with pytest.raises(errors.PolicyError) as info:
                fetch(fetcher(), parse(f"{name}/x/y:t"))
            assert str(info.value) == (
                f"{name}/x/y:t: registry {name} does not have a public address and is not "
                "listed in registry.allowed, registry.insecure or a hosts.toml")
        # a glob naming loopback is not a literal listing either
        with pytest.raises(errors.PolicyError, match="does not have a public address"):
            fetch(fetcher(allowed=("127.0.0.1:*/x/*",)), parse(f"{bad.address}/x/y:t"))
        assert bad.connections == 0 and bad.requests == []


def test_loopback_registry_listed_literally_is_fetched(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    with BadRegistry("ok", tls=(cert, key)) as bad:
        ref = parse(f"{bad.address}/x/y:t")
        with pytest.raises(errors.PolicyError, match="does not have a public address"):
            fetch(fetcher(ca_file=str(cert)), ref)
        assert bad.connections == 0
        art = fetch(fetcher(ca_file=str(cert), allowed=(f"{bad.address}/*",)), ref)
        assert art.data == bad.profile


def test_disguised_loopback_address_is_refused() -> None:
    with BadRegistry("ok") as bad:
        port = bad.address.rsplit(":", 1)[1]
        for disguised in (f"2130706433:{port}", f"127.1:{port}", f"0x7f000001:{port}"):
            with pytest.raises(errors.PolicyError, match="does not have a public address"):
                fetch(fetcher(), parse(f"{disguised}/x/y:t"))
        # even named as plain HTTP by a glob: not a literal listing
        with pytest.raises(errors.PolicyError, match="does not have a public address"):
            fetch(fetcher(allowed=("2130706433:*/*",)), parse(f"2130706433:{port}/x/y:t"))
        assert bad.connections == 0
        # the administrator's literal listing is honoured, in whatever form it is written
        name = f"2130706433:{port}"
        assert fetch(fetcher(name, allowed=(f"{name}/*",)),
                     parse(f"{name}/x/y:t")).data == bad.profile


def test_redirect_to_another_loopback_port_is_refused() -> None:
    with BadRegistry("ok") as internal, \
         BadRegistry("redirect", target=internal.address) as front:
        with pytest.raises(errors.PolicyError) as info:
            fetch(fetcher(front.address), parse(f"{front.address}/x/y:t"))
        assert (f"registry {internal.address} does not have a public address and is not "
                "listed") in str(info.value)
        assert front.seen("/blobs/"), "the redirect was asked for"
        assert internal.connections == 0


def test_https_to_http_redirect_is_refused(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    with BadRegistry("ok") as plain, \
         BadRegistry("redirect", target=plain.address, tls=(cert, key)) as front:
        # the plain-HTTP host is even listed: the downgrade alone is refused
        f = fetcher(plain.address, ca_file=str(cert), allowed=(f"{front.address}/*",))
        with pytest.raises(errors.PolicyError) as info:
            fetch(f, parse(f"{front.address}/x/y:t"))
        assert f"registry {front.address} redirected from https to plain http" in str(info.value)
        assert plain.connections == 0


def test_bearer_realm_on_another_host_is_refused(tmp_path: Path) -> None:
    with BadRegistry("ok", host="127.0.0.2") as collector:
        challenge = (f'Bearer realm="http://{collector.address}/token",service="s",'
                     'scope="repository:x/y:pull"')
        with BadRegistry("status:401", challenge=challenge) as reg:
            config = docker_config(tmp_path / "config.json", {reg.address: ("u", "secret")})
            # the collector is reachable (listed); only the realm rule stands in the way
            f = fetcher(reg.address, collector.address, docker_config=str(config))
            with pytest.raises(errors.PolicyError) as info:
                fetch(f, parse(f"{reg.address}/x/y:t"))
            assert str(info.value).endswith(
                f"registry {reg.address} named a token server on another host, not listed in "
                "registry.token_realm_hosts; refused")
            assert collector.address not in str(info.value)
            assert collector.connections == 0
            # listed by the administrator: asked (and it answers no token)
            listed = fetcher(reg.address, collector.address, docker_config=str(config),
                             token_realm_hosts=(collector.address,))
            with pytest.raises(errors.Unauthorized, match="answered HTTP 404"):
                fetch(listed, parse(f"{reg.address}/x/y:t"))
            assert collector.seen("/token")


def test_internal_service_body_is_not_echoed() -> None:
    body = (b'{"errors": [{"code": "DENIED", "message": "token=SECRET", '
            b'"detail": "<html>token=SECRET</html>"}]}')
    for status in (403, 500, 404, 418):
        with BadRegistry(f"status:{status}", body=body) as internal, \
             pytest.raises(errors.ArtifactError) as info:
            fetch(fetcher(internal.address), parse(f"{internal.address}/x/y:t"))
        message = str(info.value)
        assert "SECRET" not in message
        assert f"HTTP {status} from registry {internal.address}" in message
        # only a code from the distribution spec's list is named
        assert message.endswith(": DENIED")
        assert len(message) < 300


def test_connection_failures_read_the_same(tmp_path: Path) -> None:
    # a pod author probing which ports of an allowed host are open learns nothing
    messages = []
    closed = f"127.0.0.1:{_free_port()}"
    messages.append((closed, _error(fetcher(closed), closed)))
    with BadRegistry("reset") as reset:
        messages.append((reset.address, _error(fetcher(reset.address), reset.address)))
    with BadRegistry("not-tls") as plain:
        # spoken to over TLS, as a registry not listed as insecure is
        f = fetcher(allowed=(f"{plain.address}/*",))
        messages.append((plain.address, _error(f, plain.address)))
    texts = {m.replace(address, "HOST") for address, m in messages}
    assert texts == {"HOST/x/y:t: cannot connect to registry HOST"}


def _error(f: ArtifactFetcher, address: str) -> str:
    with pytest.raises(errors.RegistryUnavailable) as info:
        fetch(f, parse(f"{address}/x/y:t"), deadline=time.monotonic() + 5)
    return str(info.value)


def test_huge_media_type_is_bounded() -> None:
    # 4 MiB of quote characters: 8 MiB of JSON, refused by the manifest cap unread
    with BadRegistry("ok", manifest=_artifact_manifest('"' * (4 * 1024 * 1024))) as bad:
        with pytest.raises(errors.InvalidArtifact) as info:
            fetch(fetcher(bad.address), parse(f"{bad.address}/x/y:t"))
        assert "more than the maximum of 524288 bytes" in str(info.value)
        assert len(str(info.value)) < 300
        assert not bad.seen("/blobs/")
    # 100 KiB of them fits the cap: the message quotes at most 100 characters
    with BadRegistry("ok", manifest=_artifact_manifest('"' * (100 * 1024))) as bad:
        with pytest.raises(errors.InvalidArtifact) as info:
            fetch(fetcher(bad.address), parse(f"{bad.address}/x/y:t"))
        assert "config media type is '\"" in str(info.value)
        assert len(str(info.value)) < 300


@pytest.mark.parametrize("opening", [b"[", b'{"":'])
def test_deeply_nested_manifest_is_refused(opening: bytes) -> None:
    closing = b"]" if opening == b"[" else b"}"
    nested = opening * 100_000 + b"1" + closing * 100_000
    with BadRegistry("ok", manifest=nested) as bad:
        ref = parse(f"{bad.address}/x/y:t")
        with pytest.raises(errors.InvalidArtifact) as info:
            fetch(fetcher(bad.address), ref)
        assert str(info.value) == f"{ref}: manifest is nested more than 32 levels deep"
        # image annotations read the same way (larger cap, same depth check)
        with pytest.raises(errors.InvalidArtifact, match="nested more than 32 levels"):
            run(fetcher(bad.address).manifest_annotations(ref, time.monotonic() + 5))


def test_signed_redirect_location_is_not_echoed() -> None:
    signed = "?X-Amz-Signature=SECRET&X-Amz-Credential=SECRET#SECRET"
    with BadRegistry("status:500") as storage, \
         BadRegistry("redirect", location=f"http://{storage.address}{{path}}{signed}") as front:
        with pytest.raises(errors.RegistryUnavailable) as info:
            fetch(fetcher(front.address, storage.address), parse(f"{front.address}/x/y:t"))
        assert storage.seen("X-Amz-Signature=SECRET"), "the signed URL was followed as given"
        assert "SECRET" not in str(info.value) and "SECRET" not in (info.value.url or "")
        assert f"HTTP 500 from registry {storage.address}" in str(info.value)
    # refused hop and redirect loop: the Location is not shown with its query either
    with BadRegistry("redirect", location="http://127.0.0.9:9/b{path}" + signed) as front:
        with pytest.raises(errors.PolicyError) as info:
            fetch(fetcher(front.address), parse(f"{front.address}/x/y:t"))
        assert "SECRET" not in str(info.value)
    with BadRegistry("redirect") as loop:
        loop.location = f"http://{loop.address}{{path}}{signed}"
        with pytest.raises(errors.ArtifactError, match="more than 3 redirects") as info:
            fetch(fetcher(loop.address), parse(f"{loop.address}/x/y:t"))
        assert "SECRET" not in str(info.value)


def test_wrong_digest_reference_does_not_reveal_the_real_digest() -> None:
    # a tenant pins a digest of its own choosing at another tenant's tag, fetched
    # with the node's credentials: the error must not hand out the real digest
    with BadRegistry("ok") as bad:
        wrong = "sha256:" + "5" * 64
        for call in (fetch, head):
            with pytest.raises(errors.InvalidArtifact) as info:
                call(fetcher(bad.address), parse(f"{bad.address}/x/y:t@{wrong}"))
            assert "does not match the reference's digest" in str(info.value)
            assert bad.manifest_digest.split(":")[1] not in str(info.value)
    with BadRegistry("bad-digest") as bad:
        with pytest.raises(errors.InvalidArtifact) as info:
            fetch(fetcher(bad.address), parse(f"{bad.address}/x/y:t"))
        assert hashlib.sha256(bad.profile).hexdigest() not in str(info.value)


def test_image_annotations_follow_the_allow_list(registry: LocalRegistry) -> None:
    registry.push_image("img/app", "1.0", {"k": "v"})
    ref = parse(f"{registry.address}/img/app:1.0")
    before = registry.requests_seen(r"[A-Z]+ /v2/")
    f = fetcher(registry.address, allowed=("ghcr.io/*",))
    with pytest.raises(errors.PolicyError, match="is not in the allowed registries"):
        run(f.manifest_annotations(ref, time.monotonic() + 5))
    assert registry.requests_seen(r"[A-Z]+ /v2/") == before
    ok = fetcher(registry.address, allowed=(f"{registry.address}/img/*",))
    assert run(ok.manifest_annotations(ref, time.monotonic() + 5))["k"] == "v"
