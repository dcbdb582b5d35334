"""Fetching artifacts from a real docker-registry, and from a registry that misbehaves."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import requests

from nri_seccomp import artifacts
from nri_seccomp.artifacts import ArtifactFetcher, FetchSettings
from nri_seccomp.reference import parse
from nri_seccomp.testing.badregistry import BadRegistry
from nri_seccomp.testing.registry import LocalRegistry, digest_of

PROFILE = json.dumps({"defaultAction": "SCMP_ACT_ERRNO",
                      "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}).encode()
CRIO_CONFIG_DIGEST = "sha256:ca3d163bab055381827226140568f3bef7eaac187cebd76878e0b63e9e442356"


def fetcher(*insecure: str, **kw: object) -> ArtifactFetcher:
    return ArtifactFetcher(FetchSettings(insecure_registries=frozenset(insecure), **kw))  # type: ignore[arg-type]


def test_crio_blog_shape_is_accepted(registry: LocalRegistry) -> None:
    digest = registry.push_profile("crio/blog", "v1", PROFILE)
    manifest = json.loads(subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--raw",
         f"docker://{registry.address}/crio/blog:v1"],
        check=True, capture_output=True, text=True).stdout)
    # an independent client reads what we pushed: the CRI-O blog's shape
    assert manifest["config"] == {"mediaType": artifacts.SECCOMP_CONFIG_MEDIA_TYPE,
                                  "digest": CRIO_CONFIG_DIGEST, "size": 3}
    assert manifest["layers"][0]["annotations"] == {"org.opencontainers.image.title":
                                                    "seccomp.json"}
    art = fetcher(registry.address).fetch(parse(f"{registry.address}/crio/blog:v1"))
    assert art.data == PROFILE
    assert art.manifest_digest == digest
    assert art.layer_digest == digest_of(PROFILE)
    by_digest = fetcher(registry.address).fetch(parse(f"{registry.address}/crio/blog@{digest}"))
    assert by_digest.data == PROFILE


def test_oras_pushed_artifact_reads_back(registry: LocalRegistry) -> None:
    registry.push_with_oras("oras/pushed", "v1", PROFILE)
    art = fetcher(registry.address).fetch(parse(f"{registry.address}/oras/pushed:v1"))
    assert art.data == PROFILE
    assert art.config_media_type == artifacts.SECCOMP_CONFIG_MEDIA_TYPE


@pytest.mark.parametrize("media_type", ["application/vnd.oci.empty.v1+json",
                                        "application/vnd.unknown.config.v1+json",
                                        "application/vnd.oci.image.config.v1+json"])
def test_wrong_config_media_type_refused(registry: LocalRegistry, media_type: str) -> None:
    registry.push_profile("wrong/type", "t", PROFILE, config_media_type=media_type)
    with pytest.raises(artifacts.InvalidArtifact) as info:
        fetcher(registry.address).fetch(parse(f"{registry.address}/wrong/type:t"))
    assert f"config media type is {media_type!r}, expected " in str(info.value)


def test_over_one_mib_refused_before_download(registry: LocalRegistry) -> None:
    big = b"[" + b" " * (1024 * 1024) + b"]"
    registry.push_profile("too/big", "t", big)
    before = registry.requests_seen(r"GET /v2/too/big/blobs/")
    with pytest.raises(artifacts.InvalidArtifact) as info:
        fetcher(registry.address).fetch(parse(f"{registry.address}/too/big:t"))
    assert "exceeded maximum allowed artifact size of 1048576 bytes" in str(info.value)
    assert f"is {len(big)} bytes" in str(info.value)
    assert registry.requests_seen(r"GET /v2/too/big/blobs/") == before


def test_manifest_digest_mismatch(registry: LocalRegistry) -> None:
    registry.push_profile("pin/me", "t", PROFILE)
    other = "sha256:" + "1" * 64
    # the registry has no such manifest: NotFound, never some other content
    with pytest.raises(artifacts.NotFound):
        fetcher(registry.address).fetch(parse(f"{registry.address}/pin/me@{other}"))


def test_manifest_not_matching_pinned_digest_is_refused() -> None:
    # a real registry verifies what it serves; a hostile or broken one may not
    with BadRegistry("ok") as bad:
        pinned = "sha256:" + "2" * 64
        with pytest.raises(artifacts.InvalidArtifact) as info:
            fetcher(bad.address).fetch(parse(f"{bad.address}/x/y@{pinned}"))
        assert "manifest digest mismatch: got sha256:" in str(info.value)
        assert not bad.seen("/blobs/")


def test_missing_tag_not_found(registry: LocalRegistry) -> None:
    with pytest.raises(artifacts.NotFound) as info:
        fetcher(registry.address).fetch(parse(f"{registry.address}/nope/nope:wrong"))
    assert "HTTP 404" in str(info.value) and "manifests/wrong" in str(info.value)


def test_no_layers_and_index_refused(registry: LocalRegistry) -> None:
    config = registry.push_blob("shape/x", b"{}\n")
    registry.push_manifest("shape/x", "nolayers", {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": artifacts.SECCOMP_CONFIG_MEDIA_TYPE, "digest": config,
                   "size": 3}, "layers": []})
    with pytest.raises(artifacts.InvalidArtifact, match="artifact has no layers"):
        fetcher(registry.address).fetch(parse(f"{registry.address}/shape/x:nolayers"))
    child = registry.push_profile("shape/x", "child", PROFILE)
    registry.push_manifest("shape/x", "index", {
        "schemaVersion": 2, "mediaType": artifacts.OCI_INDEX,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": child, "size": 1}]}, media_type=artifacts.OCI_INDEX)
    with pytest.raises(artifacts.InvalidArtifact, match="is an image index"):
        fetcher(registry.address).fetch(parse(f"{registry.address}/shape/x:index"))


def test_stopped_registry_fails_fast() -> None:
    with LocalRegistry() as reg:
        reg.push_profile("a/b", "t", PROFILE)
        address = reg.address
    t0 = time.monotonic()
    with pytest.raises(artifacts.RegistryUnavailable) as info:
        fetcher(address).fetch(parse(f"{address}/a/b:t"))
    assert time.monotonic() - t0 < 1.0
    assert "Connection refused" in str(info.value)


def test_allow_list_refuses_before_any_request(registry: LocalRegistry) -> None:
    before = registry.requests_seen(r"GET /v2/")
    f = fetcher(registry.address, allowed=("ghcr.io/acme/*",))
    with pytest.raises(artifacts.PolicyError) as info:
        f.fetch(parse(f"{registry.address}/crio/blog:v1"))
    assert f"repository {registry.address}/crio/blog is not in the allowed registries" in str(
        info.value)
    with pytest.raises(artifacts.PolicyError, match="a digest reference"):
        fetcher(registry.address, require_digest=True).fetch(
            parse(f"{registry.address}/crio/blog:v1"))
    assert registry.requests_seen(r"GET /v2/") == before


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> LocalRegistry:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # bcrypt, as docker-registry's htpasswd wants; stdlib up to 3.12

        hashed = crypt.crypt("s3cret", crypt.mksalt(crypt.METHOD_BLOWFISH))
    reg = LocalRegistry(htpasswd=f"alice:{hashed}\n").start()
    reg.auth = ("alice", "s3cret")
    reg.push_profile("private/prof", "v1", PROFILE)
    return reg


def test_basic_auth_with_docker_config(auth_registry: LocalRegistry, tmp_path: Path) -> None:
    ref = parse(f"{auth_registry.address}/private/prof:v1")
    with pytest.raises(artifacts.Unauthorized, match="no credentials are configured"):
        fetcher(auth_registry.address).fetch(ref)
    config = tmp_path / "config.json"
    token = base64.b64encode(b"alice:s3cret").decode()
    config.write_text(json.dumps({"auths": {auth_registry.address: {"auth": token}}}))
    art = fetcher(auth_registry.address, docker_config=str(config)).fetch(ref)
    assert art.data == PROFILE
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"auths": {auth_registry.address: {
        "auth": base64.b64encode(b"alice:nope").decode()}}}))
    with pytest.raises(artifacts.Unauthorized, match="HTTP 401"):
        fetcher(auth_registry.address, docker_config=str(wrong)).fetch(ref)
    # credentials for another host are never used here
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"auths": {"ghcr.io": {"auth": token}}}))
    with pytest.raises(artifacts.Unauthorized, match="no credentials are configured"):
        fetcher(auth_registry.address, docker_config=str(other)).fetch(ref)
    auth_registry.close()


BAD = [
    ("hang", artifacts.RegistryUnavailable, "did not answer within 0.50s"),
    ("trickle", artifacts.RegistryUnavailable, "deadline"),
    ("status:500", artifacts.RegistryUnavailable, "HTTP 500"),
    ("status:429", artifacts.RegistryUnavailable, "HTTP 429"),
    ("status:401", artifacts.Unauthorized, "no credentials are configured"),
    ("status:404", artifacts.NotFound, "HTTP 404"),
    ("reset", artifacts.RegistryUnavailable, "cannot reach"),
    ("lying-size", artifacts.InvalidArtifact, "sent more than its advertised size"),
    ("bad-digest", artifacts.InvalidArtifact, "layer digest mismatch"),
]


@pytest.mark.parametrize(("mode", "error", "message"), BAD, ids=[b[0] for b in BAD])
def test_misbehaving_registry(mode: str, error: type[Exception], message: str) -> None:
    with BadRegistry(mode, interval=0.2) as bad:
        t0 = time.monotonic()
        with pytest.raises(error) as info:
            fetcher(bad.address, timeout=0.5).fetch(parse(f"{bad.address}/x/y:t"),
                                                     deadline=time.monotonic() + 1.5)
        elapsed = time.monotonic() - t0
    assert message in str(info.value)
    assert elapsed < 1.8, f"{mode} took {elapsed:.2f}s"


def test_redirect_to_other_host_drops_credentials(tmp_path: Path) -> None:
    with BadRegistry("ok", host="127.0.0.2") as target, \
         BadRegistry("redirect", target=target.address) as front:
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"auths": {front.address: {
            "auth": base64.b64encode(b"u:p").decode()}}}))
        art = fetcher(front.address, target.address, docker_config=str(config)).fetch(
            parse(f"{front.address}/x/y:t"))
        assert art.data == target.profile
        assert target.seen("/blobs/"), "the blob was not fetched from the other host"
        assert all("authorization" not in h for h in target.seen("/blobs/"))


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    return cert, key


def test_tls_verified_by_default(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    with LocalRegistry(tls=(cert, key)) as reg:
        reg.push_profile("tls/p", "v1", PROFILE)
        ref = parse(f"{reg.address}/tls/p:v1")
        # an unknown CA is refused: verification is on unless configured otherwise
        with pytest.raises(artifacts.RegistryUnavailable, match="TLS error"):
            fetcher().fetch(ref)
        assert fetcher(ca_file=str(cert)).fetch(ref).data == PROFILE
        assert fetcher(tls_verify=False).fetch(ref).data == PROFILE


def test_bearer_token_flow(tmp_path: Path) -> None:
    from nri_seccomp.testing.tokenserver import TokenServer

    tokens = TokenServer(tmp_path, users={"bob": "pw"})
    with tokens, LocalRegistry(auth_config=tokens.registry_auth()) as reg:
        # push with a token of our own, as a CI pipeline would
        push_token = requests.get(
            tokens.realm, params={"service": "test-registry",
                                  "scope": "repository:tok/p:push,pull"},
            auth=("bob", "pw"), timeout=5).json()["token"]
        reg.push_headers = {"Authorization": f"Bearer {push_token}"}
        reg.push_profile("tok/p", "v1", PROFILE)
        ref = parse(f"{reg.address}/tok/p:v1")
        with pytest.raises(artifacts.Unauthorized, match=r"token server .* HTTP 401"):
            fetcher(reg.address).fetch(ref)
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"auths": {reg.address: {
            "auth": base64.b64encode(b"bob:pw").decode()}}}))
        f = fetcher(reg.address, docker_config=str(config))
        assert f.fetch(ref).data == PROFILE
        asked = tokens.requests[-1]
        assert asked["service"] == "test-registry"
        assert asked["scope"] == "repository:tok/p:pull"
        assert asked["authorization"].startswith("Basic ")
        # the token is reused for the next fetch of the same repository
        count = len(tokens.requests)
        assert f.fetch(ref).data == PROFILE
        assert len(tokens.requests) == count
