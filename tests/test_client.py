"""Fetching artifacts from a real docker-registry, and from a registry that misbehaves."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from devtools.badregistry import BadRegistry
from devtools.registry import LocalRegistry, digest_of
from nri_seccomp.decide.reference import parse
from nri_seccomp.registry import artifact, errors
from nri_seccomp.registry.client import FetchSettings

from .fetching import PROFILE, fetch, fetcher, head, run, self_signed

pytestmark = pytest.mark.integration  # real processes: plugin, registries, servers

CRIO_CONFIG_DIGEST = "sha256:ca3d163bab055381827226140568f3bef7eaac187cebd76878e0b63e9e442356"


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
    assert (f"config media type is {media_type!r}; expected "
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


def test_profile_fetch_has_the_background_per_call_bound() -> None:
    """A profile fetch runs in the background (the store's task, after the answer said
    "retry"): ``background_timeout`` bounds its calls; an image lookup keeps ``timeout``."""
    with BadRegistry("hang") as bad:
        f = fetcher(bad.address, timeout=0.2, background_timeout=0.6)
        ref = parse(f"{bad.address}/x/y:t")
        t0 = time.monotonic()
        with pytest.raises(errors.RegistryUnavailable, match=r"did not answer within 0\.60s"):
            fetch(f, ref)
        assert 0.55 < time.monotonic() - t0 < 1.0
        t0 = time.monotonic()
        with pytest.raises(errors.RegistryUnavailable, match=r"did not answer within 0\.20s"):
            run(f.manifest_annotations(ref, time.monotonic() + 5))
        assert time.monotonic() - t0 < 0.5
    with pytest.raises(ValueError, match=r"background_timeout \(0.1\) must be at least timeout"):
        FetchSettings(timeout=0.5, background_timeout=0.1)


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
    d1 = registry.push_profile("recheck/head", "v1", PROFILE)
    f = fetcher(registry.address)
    ref = parse(f"{registry.address}/recheck/head:v1")
    assert head(f, ref) == d1
    d2 = registry.push_profile("recheck/head", "v1", PROFILE + b" ")
    assert head(f, ref) == d2 != d1
    # a HEAD: nothing is downloaded
    assert registry.count("manifests", "recheck/head", method="HEAD") == 2
    assert registry.count("manifests", "recheck/head") == 0
    assert head(f, parse(f"{registry.address}/recheck/head@{d1}")) == d1
    with pytest.raises(errors.NotFound):
        head(f, parse(f"{registry.address}/recheck/head:nope"))
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


def test_tls_verified_by_default(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
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
