"""Fetching artifacts from a real docker-registry, and from a registry that misbehaves."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest

from devtools.badregistry import BadRegistry
from devtools.registry import LocalRegistry, digest_of, docker_config
from nri_seccomp.decide.reference import Reference, parse
from nri_seccomp.registry import artifact, errors, netguard
from nri_seccomp.registry.client import ArtifactFetcher, FetchSettings

from .conftest import REGISTRY_USER

pytestmark = pytest.mark.integration  # real processes: plugin, registries, servers

PROFILE = json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
                      "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": []}],
                      "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}).encode()
CRIO_CONFIG_DIGEST = "sha256:ca3d163bab055381827226140568f3bef7eaac187cebd76878e0b63e9e442356"


T = TypeVar("T")
_OPEN: list[ArtifactFetcher] = []


def fetcher(*insecure: str, **kw: Any) -> ArtifactFetcher:
    """A fetcher for plain-HTTP ``insecure`` registries; ``allowed`` defaults to ["*"]."""
    kw.setdefault("allowed", ("*",))
    f = ArtifactFetcher(FetchSettings(insecure_registries=frozenset(insecure), **kw))
    _OPEN.append(f)
    return f


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``coro`` on a new event loop; the fetchers' connections are closed before it ends."""
    async def main() -> T:
        try:
            return await coro
        finally:
            for f in _OPEN:
                await f.aclose()

    return asyncio.run(main())


def fetch(f: ArtifactFetcher, ref: Reference, deadline: float | None = None,
          have: Callable[[str], Awaitable[bytes | None]] | None = None) -> artifact.Artifact:
    return run(f.fetch(ref, deadline if deadline is not None else time.monotonic() + 30, have))


def head(f: ArtifactFetcher, ref: Reference) -> str:
    return run(f.fetch_manifest_digest(ref, time.monotonic() + 30))


def skopeo_raw(address: str, repo: str, tag: str) -> dict[str, Any]:
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{address}/{repo}:{tag}"],
        check=True, capture_output=True, text=True, timeout=30).stdout
    result: dict[str, Any] = json.loads(out)
    return result


# ---- what CRI-O accepts ------------------------------------------------------------


def test_crio_blog_shape_is_accepted(registry: LocalRegistry,
                                     caplog: pytest.LogCaptureFixture) -> None:
    digest = registry.push_profile("crio/blog", "v1", PROFILE)
    # an independent client reads what push_profile pushed: the CRI-O blog's shape
    manifest = skopeo_raw(registry.address, "crio/blog", "v1")
    assert manifest["config"] == {"mediaType": artifact.SECCOMP_CONFIG_MEDIA_TYPE,
                                  "digest": CRIO_CONFIG_DIGEST, "size": 3}
    assert digest_of(b"{}\n") == CRIO_CONFIG_DIGEST
    assert manifest["layers"] == [{
        "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest_of(PROFILE),
        "size": len(PROFILE), "annotations": {"org.opencontainers.image.title": "seccomp.json"}}]

    ref = f"{registry.address}/crio/blog:v1"
    with caplog.at_level(logging.INFO, logger="nri_seccomp.registry.client"):
        art = fetch(fetcher(registry.address), parse(ref))
    assert art == artifact.Artifact(ref, digest, digest_of(PROFILE), PROFILE,
                                     artifact.SECCOMP_CONFIG_MEDIA_TYPE, len(PROFILE))
    assert f"Pulling OCI artifact from ref: {ref}" in caplog.messages
    assert f"Retrieved OCI artifact seccomp profile of len: {len(PROFILE)}" in caplog.messages

    pinned = fetch(fetcher(registry.address), parse(f"{registry.address}/crio/blog@{digest}"))
    assert pinned.data == PROFILE and pinned.manifest_digest == digest
    both = fetch(fetcher(registry.address), parse(f"{registry.address}/crio/blog:gone@{digest}"))
    assert both.data == PROFILE, "the digest wins over the tag"


def test_oras_pushed_artifact_reads_back(registry: LocalRegistry) -> None:
    digest = registry.push_with_oras("oras/pushed", "v1", PROFILE)
    manifest = skopeo_raw(registry.address, "oras/pushed", "v1")
    assert manifest["config"]["mediaType"] == artifact.SECCOMP_CONFIG_MEDIA_TYPE
    assert manifest["layers"][0]["annotations"]["org.opencontainers.image.title"] == (
        "seccomp.json")
    art = fetch(fetcher(registry.address), parse(f"{registry.address}/oras/pushed:v1"))
    assert art.data == PROFILE
    assert art.manifest_digest == digest
    assert art.media_type_config == artifact.SECCOMP_CONFIG_MEDIA_TYPE


def test_manifest_without_media_type_field(registry: LocalRegistry) -> None:
    # the field is optional in OCI manifests
    registry.push_profile("shape/nomt", "v1", PROFILE, manifest_media_type=None)
    art = fetch(fetcher(registry.address), parse(f"{registry.address}/shape/nomt:v1"))
    assert art.data == PROFILE


# ---- what is refused ---------------------------------------------------------------


@pytest.mark.parametrize(("media_type", "hint"), [
    ("application/vnd.oci.empty.v1+json", "an artifact with an empty config"),
    ("application/vnd.unknown.config.v1+json", "pushed without a config media type"),
    ("application/vnd.oci.image.config.v1+json", ""),
])
def test_wrong_config_media_type_refused(registry: LocalRegistry, media_type: str,
                                         hint: str) -> None:
    repo = "wrong/" + media_type.split(".")[-2].split("/")[0]
    registry.push_profile(repo, "t", PROFILE, config_media_type=media_type)
    with pytest.raises(errors.InvalidArtifact) as info:
        fetch(fetcher(registry.address), parse(f"{registry.address}/{repo}:t"))
    assert (f"config media type is {media_type!r}, expected "
            "'application/vnd.cncf.seccomp-profile.config.v1+json'") in str(info.value)
    assert hint in str(info.value)
    assert registry.count("blobs", repo) == 0


def test_oras_default_config_is_refused(registry: LocalRegistry) -> None:
    # what oras-py pushes when the config media type is not given as path:mediatype
    registry.push_with_oras("oras/unknown", "v1", PROFILE,
                            config_media_type=artifact.UNKNOWN_CONFIG_MEDIA_TYPE)
    with pytest.raises(errors.InvalidArtifact, match="pushed without a config media type"):
        fetch(fetcher(registry.address), parse(f"{registry.address}/oras/unknown:v1"))


def test_over_one_mib_refused_before_download(registry: LocalRegistry) -> None:
    big = b"[" + b" " * (1024 * 1024) + b"]"
    registry.push_profile("too/big", "t", big)
    with pytest.raises(errors.InvalidArtifact) as info:
        fetch(fetcher(registry.address), parse(f"{registry.address}/too/big:t"))
    assert "exceeded maximum allowed artifact size of 1048576 bytes" in str(info.value)
    assert f"is {len(big)} bytes" in str(info.value)
    assert registry.count("manifests", "too/big") == 1
    assert registry.count("blobs", "too/big") == 0


def test_configured_max_size(registry: LocalRegistry) -> None:
    registry.push_profile("max/size", "t", PROFILE)
    small = fetcher(registry.address, max_size=len(PROFILE) - 1)
    with pytest.raises(errors.InvalidArtifact,
                       match=f"exceeded maximum allowed artifact size of {len(PROFILE) - 1} "):
        fetch(small, parse(f"{registry.address}/max/size:t"))
    assert fetch(fetcher(registry.address, max_size=len(PROFILE)),
        parse(f"{registry.address}/max/size:t")).data == PROFILE


def test_descriptor_sizes_that_lie(registry: LocalRegistry) -> None:
    # distribution stores a manifest whatever sizes its descriptors claim
    registry.push_profile("lie/small", "t", PROFILE, layer_size=3)
    with pytest.raises(errors.InvalidArtifact) as info:
        fetch(fetcher(registry.address), parse(f"{registry.address}/lie/small:t"))
    assert f"layer is {len(PROFILE)} bytes (Content-Length), more than its advertised size " \
           "of 3 bytes" in str(info.value)
    registry.push_profile("lie/big", "t", PROFILE, layer_size=500)
    with pytest.raises(errors.InvalidArtifact,
                       match=f"layer is {len(PROFILE)} bytes, the descriptor says 500"):
        fetch(fetcher(registry.address), parse(f"{registry.address}/lie/big:t"))
    registry.push_profile("lie/zero", "t", PROFILE, layer_size=0)
    with pytest.raises(errors.InvalidArtifact, match="artifact data is empty"):
        fetch(fetcher(registry.address), parse(f"{registry.address}/lie/zero:t"))
    assert registry.count("blobs", "lie/zero") == 0


def test_empty_layer_refused(registry: LocalRegistry) -> None:
    registry.push_profile("empty/layer", "t", b"")
    with pytest.raises(errors.InvalidArtifact, match="artifact data is empty"):
        fetch(fetcher(registry.address), parse(f"{registry.address}/empty/layer:t"))


def test_no_layers_and_index_refused(registry: LocalRegistry) -> None:
    registry.push_profile("shape/x", "nolayers", PROFILE, layers=0)
    with pytest.raises(errors.InvalidArtifact, match="artifact has no layers"):
        fetch(fetcher(registry.address), parse(f"{registry.address}/shape/x:nolayers"))
    child = registry.push_profile("shape/x", "child", PROFILE)
    size = registry.manifest_size("shape/x", "child")
    index = registry.push_index("shape/x", "index", [(child, size, "linux/amd64")])
    for selector in (":index", f"@{index}"):
        with pytest.raises(errors.InvalidArtifact) as info:
            fetch(fetcher(registry.address), parse(f"{registry.address}/shape/x{selector}"))
        assert f"is an image index ({artifact.OCI_INDEX})" in str(info.value)
        assert "no platform is picked" in str(info.value)


def test_pinned_digest_not_in_registry(registry: LocalRegistry) -> None:
    registry.push_profile("pin/me", "t", PROFILE)
    other = "sha256:" + "1" * 64
    # the registry has no such manifest: NotFound, never some other content
    with pytest.raises(errors.NotFound):
        fetch(fetcher(registry.address), parse(f"{registry.address}/pin/me:t@{other}"))


def test_manifest_not_matching_pinned_digest_is_refused() -> None:
    # a real registry verifies what it serves; a hostile or broken one may not
    with BadRegistry("ok") as bad:
        pinned = "sha256:" + "2" * 64
        with pytest.raises(errors.InvalidArtifact) as info:
            fetch(fetcher(bad.address), parse(f"{bad.address}/x/y@{pinned}"))
        assert ("manifest digest mismatch: the content does not match the reference's digest"
                in str(info.value))
        # the digest actually served is not revealed (another tenant's private image)
        assert bad.manifest_digest.split(":")[1] not in str(info.value)
        assert not bad.seen("/blobs/")
        # the same check with sha512: the digest is computed with the pinned algorithm
        real512 = "sha512:" + hashlib.sha512(bad.manifest).hexdigest()
        art = fetch(fetcher(bad.address), parse(f"{bad.address}/x/y@{real512}"))
        assert art.manifest_digest == real512 and art.data == bad.profile
        with pytest.raises(errors.InvalidArtifact, match="manifest digest mismatch"):
            fetch(fetcher(bad.address), parse(f"{bad.address}/x/y@sha512:{'3' * 128}"))


def test_missing_tag_not_found(registry: LocalRegistry) -> None:
    with pytest.raises(errors.NotFound) as info:
        fetch(fetcher(registry.address), parse(f"{registry.address}/nope/nope:wrong"))
    exc = info.value
    assert str(exc).startswith(f"{registry.address}/nope/nope:wrong: not found: HTTP 404 from "
                               f"registry {registry.address} (GET http://")
    assert "manifests/wrong" in str(exc)
    assert "NAME_UNKNOWN" in str(exc) or "MANIFEST_UNKNOWN" in str(exc)
    assert (exc.registry, exc.status) == (registry.address, 404)
    assert exc.url == f"http://{registry.address}/v2/nope/nope/manifests/wrong"


def test_stopped_registry_fails_fast() -> None:
    with LocalRegistry() as reg:
        reg.push_profile("a/b", "t", PROFILE)
        address = reg.address
    t0 = time.monotonic()
    with pytest.raises(errors.RegistryUnavailable) as info:
        fetch(fetcher(address), parse(f"{address}/a/b:t"))
    assert time.monotonic() - t0 < 0.5, "no retries, no sleeps"
    assert str(info.value) == f"{address}/a/b:t: cannot connect to registry {address}"


# ---- policy ------------------------------------------------------------------------


def test_allow_list_refuses_before_any_request(registry: LocalRegistry) -> None:
    registry.push_profile("crio/allowed", "v1", PROFILE)
    before = registry.requests_seen(r"[A-Z]+ /v2/")
    f = fetcher(registry.address, allowed=("ghcr.io/acme/*",))
    for call in (fetch, head):
        with pytest.raises(errors.PolicyError) as info:
            call(f, parse(f"{registry.address}/crio/allowed:v1"))
        assert (f"repository {registry.address}/crio/allowed is not in the allowed registries "
                "(ghcr.io/acme/*)") in str(info.value)
    with pytest.raises(errors.PolicyError, match=r"a digest reference \(@sha256:…\) is "
                       r"required by the configuration \(registry.require_digest\)"):
        fetch(fetcher(registry.address, require_digest=True),
            parse(f"{registry.address}/crio/allowed:v1"))
    assert registry.requests_seen(r"[A-Z]+ /v2/") == before
    # patterns are globs over registry/repository
    allowed = fetcher(registry.address, allowed=("ghcr.io/*", "127.0.0.1:*/crio/*"))
    assert fetch(allowed, parse(f"{registry.address}/crio/allowed:v1")).data == PROFILE


# ---- authentication -----------------------------------------------------------------


def test_basic_auth_with_docker_config(htpasswd_registry: LocalRegistry, tmp_path: Path) -> None:
    reg = htpasswd_registry
    reg.push_profile("private/prof", "v1", PROFILE)
    ref = parse(f"{reg.address}/private/prof:v1")
    with pytest.raises(errors.Unauthorized) as info:
        fetch(fetcher(reg.address), ref)
    assert f"registry {reg.address} requires authentication and no credentials are " \
           "configured for it (registry.docker_config)" in str(info.value)

    config = docker_config(tmp_path / "config.json", {reg.address: REGISTRY_USER})
    f = fetcher(reg.address, docker_config=str(config))
    assert fetch(f, ref).data == PROFILE
    assert fetch(f, ref).data == PROFILE

    wrong = docker_config(tmp_path / "wrong.json", {reg.address: ("alice", "nope")})
    with pytest.raises(errors.Unauthorized) as info:
        fetch(fetcher(reg.address, docker_config=str(wrong)), ref)
    assert "HTTP 401" in str(info.value)
    assert f"the credentials for {reg.address} from {wrong} were refused" in str(info.value)

    # credentials for another host are never used here
    other = docker_config(tmp_path / "other.json", {"ghcr.io": REGISTRY_USER})
    with pytest.raises(errors.Unauthorized, match="no credentials are configured"):
        fetch(fetcher(reg.address, docker_config=str(other)), ref)


def test_docker_config_is_reread_when_it_changes(htpasswd_registry: LocalRegistry,
                                                 tmp_path: Path) -> None:
    reg = htpasswd_registry
    reg.push_profile("private/rotate", "v1", PROFILE)
    ref = parse(f"{reg.address}/private/rotate:v1")
    path = docker_config(tmp_path / "config.json", {reg.address: ("alice", "old")})
    f = fetcher(reg.address, docker_config=str(path))
    with pytest.raises(errors.Unauthorized):
        fetch(f, ref)
    docker_config(path, {reg.address: REGISTRY_USER})
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert fetch(f, ref).data == PROFILE


def test_docker_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read docker config .*missing\.json"):
        fetcher(docker_config=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"auths": {"r.io": {"auth": "not base64!"}}}')
    with pytest.raises(ValueError, match=r"'r\.io': \"auth\" is not base64"):
        fetcher(docker_config=str(bad))
    helper = tmp_path / "helper.json"
    helper.write_text(json.dumps({"auths": {}, "credHelpers": {"127.0.0.1:1": "gcloud"}}))
    with BadRegistry("status:401") as bad_reg:
        helper.write_text(json.dumps({"auths": {}, "credHelpers": {bad_reg.address: "gcloud"}}))
        with pytest.raises(errors.Unauthorized,
                           match=r"credential helper \(credHelpers\), which is not supported"):
            fetch(fetcher(bad_reg.address, docker_config=str(helper)),
                parse(f"{bad_reg.address}/x/y:t"))


def test_bearer_token_auth(token_registry: LocalRegistry, tmp_path: Path) -> None:
    reg = token_registry
    assert reg.token_server is not None
    tokens = reg.token_server
    # the token server is another port on 127.0.0.1: listed, as an administrator would
    realm_host = (urlsplit(tokens.realm).netloc,)
    reg.push_profile("tok/prof", "v1", PROFILE)
    ref = parse(f"{reg.address}/tok/prof:v1")
    with pytest.raises(errors.Unauthorized) as info:
        fetch(fetcher(reg.address, token_realm_hosts=realm_host), ref)
    assert f"token server '{tokens.realm}' answered HTTP 401; registry {reg.address} requires " \
           "authentication and no credentials are configured" in str(info.value)

    config = docker_config(tmp_path / "config.json", {reg.address: REGISTRY_USER})
    f = fetcher(reg.address, docker_config=str(config), token_realm_hosts=realm_host)
    seen = len(tokens.requests)
    assert fetch(f, ref).data == PROFILE
    assert head(f, ref) == fetch(f, ref).manifest_digest
    # one token for the repository, reused for its manifest, blob and later fetches
    asked = tokens.requests[seen:]
    assert len(asked) == 1
    assert asked[0]["scope"] == "repository:tok/prof:pull"
    assert asked[0]["service"] == "test-registry"
    assert asked[0]["authorization"].startswith("Basic ")

    # another repository: the registry challenges again, a token for that scope is fetched
    reg.push_profile("tok/other", "v1", PROFILE)
    seen = len(tokens.requests)
    assert fetch(f, parse(f"{reg.address}/tok/other:v1")).data == PROFILE
    assert [a["scope"] for a in tokens.requests[seen:]] == ["repository:tok/other:pull"]

    wrong = docker_config(tmp_path / "wrong.json", {reg.address: ("alice", "nope")})
    with pytest.raises(errors.Unauthorized) as info:
        fetch(fetcher(reg.address, docker_config=str(wrong), token_realm_hosts=realm_host), ref)
    assert f"token server '{tokens.realm}' answered HTTP 401; the credentials for " \
           f"{reg.address} from {wrong} were refused" in str(info.value)


def test_redirect_to_other_host_drops_credentials(tmp_path: Path) -> None:
    with BadRegistry("ok", host="127.0.0.2") as target, \
         BadRegistry("redirect", target=target.address) as front:
        config = docker_config(tmp_path / "config.json", {front.address: ("u", "p")})
        f = fetcher(front.address, target.address, docker_config=str(config))
        # the front asks for no credentials; give it some to carry by a cached header
        f._auth[(front.address, "repository:x/y:pull")] = "Basic dTpw"
        art = fetch(f, parse(f"{front.address}/x/y:t"))
        assert art.data == target.profile
        assert front.seen("/blobs/")[0]["authorization"] == "Basic dTpw"
        assert target.seen("/blobs/"), "the blob was not fetched from the other host"
        assert all("authorization" not in h for h in target.seen("/blobs/"))


def test_redirect_target_asking_for_credentials_gets_none(tmp_path: Path) -> None:
    with BadRegistry("status:401", host="127.0.0.2") as target, \
         BadRegistry("redirect", target=target.address) as front:
        config = docker_config(tmp_path / "config.json", {front.address: ("u", "p"),
                                                          target.address: ("t", "t")})
        with pytest.raises(errors.Unauthorized) as info:
            fetch(fetcher(front.address, target.address, docker_config=str(config)),
                parse(f"{front.address}/x/y:t"))
        assert f"access denied by http://{target.address}, where {front.address} " \
               "redirected the download; no credentials are sent there" in str(info.value)
        assert len(target.seen("/blobs/")) == 1
        assert all("authorization" not in h for h in target.seen("/blobs/"))


# ---- registries that misbehave ------------------------------------------------------

BAD = [
    ("hang", errors.RegistryUnavailable, "did not answer within 0.40s"),
    ("trickle", errors.RegistryUnavailable, "did not answer before the deadline"),
    ("trickle-blob", errors.RegistryUnavailable, "deadline passed after"),
    ("stall-body", errors.RegistryUnavailable, "layer download failed after 0 bytes"),
    ("status:500", errors.RegistryUnavailable, "registry unavailable: HTTP 500 from registry"),
    ("status:429", errors.RegistryUnavailable, "HTTP 429 from registry"),
    ("status:401", errors.Unauthorized, "no credentials are configured"),
    ("status:404", errors.NotFound, "HTTP 404"),
    ("reset", errors.RegistryUnavailable, "cannot connect to registry 127.0.0.1:"),
    ("lying-size", errors.InvalidArtifact, "layer sent more than its advertised size"),
    ("oversize-length", errors.InvalidArtifact, "more than its advertised size of"),
    ("short", errors.InvalidArtifact, "the descriptor says"),
    ("bad-digest", errors.InvalidArtifact,
     "layer digest mismatch: the content does not match the descriptor's digest"),
    ("index", errors.InvalidArtifact, "is an image index"),
]


@pytest.mark.parametrize(("mode", "error", "message"), BAD, ids=[b[0] for b in BAD])
def test_misbehaving_registry(mode: str, error: type[Exception], message: str) -> None:
    with BadRegistry(mode, interval=0.1) as bad:
        t0 = time.monotonic()
        with pytest.raises(error) as info:
            fetch(fetcher(bad.address, timeout=0.4), parse(f"{bad.address}/x/y:t"),
                                                     deadline=time.monotonic() + 1.0)
        elapsed = time.monotonic() - t0
    assert message in str(info.value)
    assert str(info.value).startswith(f"{bad.address}/x/y:t: ")
    assert elapsed < 1.2, f"{mode} took {elapsed:.2f}s"


@pytest.mark.parametrize("mode", ["trickle", "trickle-blob"])
def test_one_byte_per_second_never_exceeds_the_deadline(mode: str) -> None:
    # each read arrives well within the per-call timeout: only the deadline stops it
    with BadRegistry(mode, interval=1.0) as bad:
        t0 = time.monotonic()
        with pytest.raises(errors.RegistryUnavailable, match="deadline"):
            fetch(fetcher(bad.address, timeout=5.0), parse(f"{bad.address}/x/y:t"),
                                                     deadline=time.monotonic() + 1.2)
        assert time.monotonic() - t0 < 1.4


def test_errors_carry_registry_url_status() -> None:
    with BadRegistry("status:500") as bad, \
            pytest.raises(errors.RegistryUnavailable) as info:
        fetch(fetcher(bad.address), parse(f"{bad.address}/x/y:t"))
    exc = info.value
    assert exc.reference == f"{bad.address}/x/y:t"
    assert (exc.registry, exc.status) == (bad.address, 500)
    assert exc.url == f"http://{bad.address}/v2/x/y/manifests/t"


# ---- tag re-checks ------------------------------------------------------------------


def test_fetch_manifest_digest(registry: LocalRegistry) -> None:
    d1 = registry.push_profile("recheck/p", "v1", PROFILE)
    f = fetcher(registry.address)
    ref = parse(f"{registry.address}/recheck/p:v1")
    assert head(f, ref) == d1
    d2 = registry.push_profile("recheck/p", "v1", PROFILE + b" ")
    assert head(f, ref) == d2 != d1
    # a HEAD: nothing is downloaded
    assert registry.count("manifests", "recheck/p", method="HEAD") == 2
    assert registry.count("manifests", "recheck/p") == 0
    assert head(f, parse(f"{registry.address}/recheck/p@{d1}")) == d1
    with pytest.raises(errors.NotFound):
        head(f, parse(f"{registry.address}/recheck/p:nope"))
    with BadRegistry("ok") as bad:
        wrong = "sha256:" + "4" * 64
        with pytest.raises(errors.InvalidArtifact, match="manifest digest mismatch"):
            head(fetcher(bad.address), parse(f"{bad.address}/x/y@{wrong}"))
        assert head(fetcher(bad.address),
            parse(f"{bad.address}/x/y:t")) == bad.manifest_digest


def test_layer_already_held_is_not_downloaded(registry: LocalRegistry) -> None:
    registry.push_profile("held/p", "v1", PROFILE)
    ref = parse(f"{registry.address}/held/p:v1")
    f = fetcher(registry.address)
    async def held(digest: str) -> bytes | None:
        return PROFILE if digest == digest_of(PROFILE) else None

    async def damaged(digest: str) -> bytes | None:
        return b"X" * len(PROFILE)

    art = fetch(f, ref, have=held)
    assert art.data == PROFILE
    assert registry.count("manifests", "held/p") == 1
    assert registry.count("blobs", "held/p") == 0
    # held bytes that do not hash to the descriptor are not trusted: downloaded instead
    assert fetch(f, ref, have=damaged).data == PROFILE
    assert registry.count("blobs", "held/p") == 1


def test_redirect_loop_is_bounded() -> None:
    with BadRegistry("redirect") as bad:
        bad.target = bad.address
        with pytest.raises(errors.ArtifactError, match="more than 3 redirects"):
            fetch(fetcher(bad.address), parse(f"{bad.address}/x/y:t"))
        assert len(bad.seen("/blobs/")) == 4


def test_registry_counts_fetches(registry: LocalRegistry) -> None:
    registry.push_profile("count/p", "v1", PROFILE)
    f = fetcher(registry.address)
    for _ in range(3):
        fetch(f, parse(f"{registry.address}/count/p:v1"))
    assert registry.count("manifests", "count/p") == 3
    assert registry.count("blobs", "count/p") == 3
    assert registry.count("blobs", "count/p", status=200) == 3


# ---- TLS ----------------------------------------------------------------------------


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
        listed = (f"{reg.address}/*",)
        with pytest.raises(errors.RegistryUnavailable) as info:
            fetch(fetcher(allowed=listed), ref)
        assert str(info.value).endswith(
            f"registry {reg.address}: TLS handshake failed (certificate not verified)")
        assert fetch(fetcher(ca_file=str(cert), allowed=listed), ref).data == PROFILE
        assert fetch(fetcher(tls_verify=False, allowed=listed), ref).data == PROFILE


def test_credentials_not_sent_to_plain_http_token_server(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    with LocalRegistry(tls=(cert, key), users=dict([REGISTRY_USER]), token_auth=True) as reg:
        assert reg.token_server is not None and reg.token_server.realm.startswith("http://")
        reg.push_profile("tok/tls", "v1", PROFILE)
        before = len(reg.token_server.requests)
        config = docker_config(tmp_path / "config.json", {reg.address: REGISTRY_USER})
        with pytest.raises(errors.Unauthorized) as info:
            fetch(fetcher(ca_file=str(cert), docker_config=str(config),
                          allowed=(f"{reg.address}/*",)),
                  parse(f"{reg.address}/tok/tls:v1"))
        assert f"token server '{reg.token_server.realm}' is plain HTTP; the credentials for " \
               f"{reg.address} are not sent there" in str(info.value)
        assert len(reg.token_server.requests) == before


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
                "listed in registry.allowed or registry.insecure")
        # a glob naming loopback is not a literal listing either
        with pytest.raises(errors.PolicyError, match="does not have a public address"):
            fetch(fetcher(allowed=("127.0.0.1:*/x/*",)), parse(f"{bad.address}/x/y:t"))
        assert bad.connections == 0 and bad.requests == []


def test_loopback_registry_listed_literally_is_fetched(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
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
    cert, key = _self_signed(tmp_path)
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


def test_depth_scan_ignores_brackets_in_strings() -> None:
    assert not artifact.json_depth_exceeds(json.dumps({"a": "[[[[" * 100 + '\\"{{'}).encode())
    assert artifact.json_depth_exceeds(b"[" * 33 + b"]" * 33)
    assert not artifact.json_depth_exceeds(b"[" * 32 + b"]" * 32)


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
