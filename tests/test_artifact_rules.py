"""The artifact rules (``registry.artifact``) as tables: manifests as values, no network."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from nri_seccomp import digest as digest_mod
from nri_seccomp.decide.reference import parse
from nri_seccomp.registry import artifact
from nri_seccomp.registry.artifact import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    EMPTY_CONFIG_MEDIA_TYPE,
    OCI_INDEX,
    OCI_MANIFEST,
    SECCOMP_CONFIG_MEDIA_TYPE,
    UNKNOWN_CONFIG_MEDIA_TYPE,
    Layer,
    Manifest,
)
from nri_seccomp.registry.errors import InvalidArtifact

REF = parse("ghcr.io/acme/profiles:v1")
DATA = b'{"defaultAction": "SCMP_ACT_ALLOW"}'
DATA_DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
CAP = 1024


APPARMOR = "application/vnd.cncf.apparmor-profile.config.v1+json"
EMPTY = {"mediaType": EMPTY_CONFIG_MEDIA_TYPE, "digest": "sha256:" + hashlib.sha256(
    b"{}").hexdigest(), "size": 2}


def body(**changes: Any) -> dict[str, Any]:
    """A valid profile artifact's manifest, with ``changes`` (None deletes a key)."""
    base: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": SECCOMP_CONFIG_MEDIA_TYPE, "digest": "sha256:" + "c" * 64,
                   "size": 3},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": DATA_DIGEST, "size": len(DATA)}],
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def manifest(b: dict[str, Any], media_type: str | None = None) -> Manifest:
    mt = media_type if media_type is not None else str(b.get("mediaType", ""))
    return Manifest("sha256:" + "0" * 64, mt, b, 100)


def layer(**changes: Any) -> list[dict[str, Any]]:
    entry: dict[str, Any] = {"digest": DATA_DIGEST, "size": len(DATA), **changes}
    return [{k: v for k, v in entry.items() if v is not None}]


# ---- first_layer: what is refused before anything is downloaded ----------------------


REFUSED = [
    # (case, manifest, media type as received ("" = the body's), message)
    ("oci index", body(mediaType=OCI_INDEX, manifests=[]), "",
     f"is an image index ({OCI_INDEX}), not a seccomp profile artifact"),
    ("docker list", body(mediaType=DOCKER_LIST), "", f"is an image index ({DOCKER_LIST})"),
    ("index by Content-Type", body(mediaType=None), OCI_INDEX, "is an image index"),
    ("manifests key, no type", body(mediaType=None, manifests=[]), "",
     "is an image index (no mediaType)"),
    ("manifests key, odd type", body(mediaType="x/y", manifests=[]), "",
     "is an image index ('x/y')"),
    ("schemaVersion 1", body(schemaVersion=1), "", "manifest schemaVersion is '1', expected 2"),
    ("schemaVersion missing", body(schemaVersion=None), "",
     "manifest schemaVersion is 'None', expected 2"),
    ("schemaVersion string", body(schemaVersion="2"), "",
     "manifest schemaVersion is '2', expected 2"),
    ("manifest media type", body(mediaType="text/plain"), "",
     f"manifest media type is 'text/plain', expected '{OCI_MANIFEST}'"),
    ("config missing", body(config=None), "",
     f"config media type is missing; expected '{SECCOMP_CONFIG_MEDIA_TYPE}' as either, with "
     "an empty config for artifactType"),
    ("config not an object", body(config="x"), "", "config media type is missing"),
    ("config type not a string", body(config={"mediaType": 7}), "",
     "config media type is missing"),
    ("empty config, no artifactType", body(config={"mediaType": EMPTY_CONFIG_MEDIA_TYPE}), "",
     f"config media type is '{EMPTY_CONFIG_MEDIA_TYPE}'; expected"),
    ("empty config, hint", body(config={"mediaType": EMPTY_CONFIG_MEDIA_TYPE}), "",
     f"(an artifact with an empty config; push with --artifact-type "
     f"{SECCOMP_CONFIG_MEDIA_TYPE})"),
    ("empty config, other artifactType", body(config={"mediaType": EMPTY_CONFIG_MEDIA_TYPE},
                                              artifactType=APPARMOR), "",
     f"config media type is '{EMPTY_CONFIG_MEDIA_TYPE}', artifactType '{APPARMOR}'; expected"),
    ("unknown config", body(config={"mediaType": UNKNOWN_CONFIG_MEDIA_TYPE}), "",
     f"config media type is '{UNKNOWN_CONFIG_MEDIA_TYPE}'; expected"),
    ("unknown config, hint", body(config={"mediaType": UNKNOWN_CONFIG_MEDIA_TYPE}), "",
     "(pushed without a config media type; push with --artifact-type"),
    # the kind is the config's when the config is not empty: artifactType cannot make it so
    ("unknown config, seccomp artifactType",
     body(config={"mediaType": UNKNOWN_CONFIG_MEDIA_TYPE}, artifactType=SECCOMP_CONFIG_MEDIA_TYPE),
     "", f"config media type is '{UNKNOWN_CONFIG_MEDIA_TYPE}', artifactType "
     f"'{SECCOMP_CONFIG_MEDIA_TYPE}'; expected"),
    ("image config", body(config={"mediaType": "application/vnd.oci.image.config.v1+json"}),
     "", "config media type is 'application/vnd.oci.image.config.v1+json'; expected"),
    ("seccomp config, contradicting artifactType", body(artifactType=APPARMOR), "",
     f"artifactType '{APPARMOR}' contradicts the config media type"),
    ("typed, two layers", body(config=EMPTY, artifactType=SECCOMP_CONFIG_MEDIA_TYPE,
                               layers=[*layer(), *layer()]), "",
     "artifact has 2 layers; a KEP-6061 seccomp profile artifact has exactly one"),
    ("typed, no layers", body(config=EMPTY, artifactType=SECCOMP_CONFIG_MEDIA_TYPE,
                              layers=[]), "", "artifact has no layers"),
    ("no layers key", body(layers=None), "", "artifact has no layers"),
    ("empty layers", body(layers=[]), "", "artifact has no layers"),
    ("layers not a list", body(layers={"digest": DATA_DIGEST}), "", "artifact has no layers"),
    ("layer not an object", body(layers=["x"]), "", "first layer has an invalid digest 'None'"),
    ("layer digest missing", body(layers=layer(digest=None)), "",
     "first layer has an invalid digest 'None'"),
    ("layer digest unknown algo", body(layers=layer(digest="md5:" + "a" * 32)), "",
     "first layer has an invalid digest 'md5:"),
    ("layer digest short", body(layers=layer(digest="sha256:abc")), "",
     "first layer has an invalid digest 'sha256:abc'"),
    ("layer digest upper case", body(layers=layer(digest="sha256:" + "A" * 64)), "",
     "first layer has an invalid digest"),
    ("size missing", body(layers=layer(size=None)), "", "first layer has an invalid size 'None'"),
    ("size negative", body(layers=layer(size=-1)), "", "first layer has an invalid size '-1'"),
    ("size boolean", body(layers=layer(size=True)), "", "first layer has an invalid size 'True'"),
    ("size float", body(layers=layer(size=1.5)), "", "first layer has an invalid size '1.5'"),
    ("size over the cap", body(layers=layer(size=CAP + 1)), "",
     f"exceeded maximum allowed artifact size of {CAP} bytes (layer {DATA_DIGEST} is "
     f"{CAP + 1} bytes)"),
    ("empty layer", body(layers=layer(size=0)), "", "artifact data is empty"),
]


@pytest.mark.parametrize(("case", "b", "media_type", "message"), REFUSED,
                         ids=[r[0] for r in REFUSED])
def test_first_layer_refuses(case: str, b: dict[str, Any], media_type: str,
                             message: str) -> None:
    with pytest.raises(InvalidArtifact) as info:
        artifact.first_layer(REF, manifest(b, media_type or None), CAP)
    assert message in str(info.value)
    assert str(info.value).startswith(f"{REF}: ")
    assert (info.value.registry, info.value.url, info.value.status) == ("ghcr.io", None, None)


ACCEPTED = [
    ("oci", body(), ""),
    ("docker v2 manifest", body(mediaType=DOCKER_MANIFEST), ""),
    ("no mediaType field (optional in OCI)", body(mediaType=None), ""),
    ("generic Content-Type", body(mediaType=None), "application/json"),
    ("size at the cap", body(layers=layer(size=CAP)), ""),
    ("sha512 layer", body(layers=layer(digest="sha512:" + "a" * 128)), ""),
    ("only the first layer counts", body(layers=[*layer(), {"digest": "bad"}]), ""),
    # SPO since #3421: seccomp config and the same artifactType, layer application/json
    ("seccomp config and artifactType",
     body(artifactType=SECCOMP_CONFIG_MEDIA_TYPE, layers=layer(mediaType="application/json")),
     ""),
    # KEP-6061's typed form: the empty config, the kind in artifactType, any layer type
    ("typed: empty config + artifactType", body(config=EMPTY,
                                                artifactType=SECCOMP_CONFIG_MEDIA_TYPE), ""),
    ("typed, layer application/json", body(config=EMPTY, artifactType=SECCOMP_CONFIG_MEDIA_TYPE,
                                           layers=layer(mediaType="application/json")), ""),
    ("typed, layer without a media type", body(config=EMPTY,
                                               artifactType=SECCOMP_CONFIG_MEDIA_TYPE,
                                               layers=layer()), ""),
    ("typed, odd layer media type", body(config=EMPTY, artifactType=SECCOMP_CONFIG_MEDIA_TYPE,
                                         layers=layer(mediaType="x/anything")), ""),
]


@pytest.mark.parametrize(("case", "b", "media_type"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_first_layer_accepts(case: str, b: dict[str, Any], media_type: str) -> None:
    first = b["layers"][0]
    assert artifact.first_layer(REF, manifest(b, media_type or None), CAP) == Layer(
        first["digest"], first["size"])


def test_untrusted_values_are_quoted_and_bounded() -> None:
    hostile = "\x1b[31m" + "x" * 10_000
    for b in (body(config={"mediaType": hostile}), body(mediaType=hostile),
              body(schemaVersion=hostile), body(layers=layer(digest=hostile)),
              body(layers=layer(size=hostile))):
        with pytest.raises(InvalidArtifact) as info:
            artifact.first_layer(REF, manifest(b), CAP)
        assert "\x1b" not in str(info.value)
        assert len(str(info.value)) < 300


# ---- parse_manifest: digest, depth, JSON ------------------------------------------------


RAW = json.dumps(body()).encode()
RAW_DIGEST = "sha256:" + hashlib.sha256(RAW).hexdigest()

PARSE_REFUSED = [
    ("pinned digest differs", f"@sha256:{'1' * 64}", RAW,
     "manifest digest mismatch: the content does not match the reference's digest"),
    ("pinned sha512 differs", f"@sha512:{'1' * 128}", RAW, "manifest digest mismatch"),
    ("not JSON", ":v1", b"{not json", "manifest is not valid JSON"),
    ("not UTF-8", ":v1", b"\xff\xfe", "manifest is not valid JSON"),
    ("a list", ":v1", b"[]", "manifest is not a JSON object"),
    ("a string", ":v1", b'"x"', "manifest is not a JSON object"),
    ("nested arrays", ":v1", b"[" * 33 + b"]" * 33, "manifest is nested more than 32 levels"),
    ("nested objects", ":v1", b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
     "manifest is nested more than 32 levels deep"),
]


@pytest.mark.parametrize(("case", "selector", "raw", "message"), PARSE_REFUSED,
                         ids=[p[0] for p in PARSE_REFUSED])
def test_parse_manifest_refuses(case: str, selector: str, raw: bytes, message: str) -> None:
    ref = parse(f"ghcr.io/acme/profiles{selector}")
    url = "https://ghcr.io/v2/acme/profiles/manifests/x?sig=SECRET"
    with pytest.raises(InvalidArtifact) as info:
        artifact.parse_manifest(ref, raw, "", url)
    assert message in str(info.value)
    assert info.value.url == "https://ghcr.io/v2/acme/profiles/manifests/x"
    # the digest actually served is never revealed
    assert RAW_DIGEST.split(":")[1] not in str(info.value)


def test_parse_manifest_digest_and_media_type() -> None:
    by_tag = artifact.parse_manifest(REF, RAW, "")
    assert by_tag == Manifest(RAW_DIGEST, OCI_MANIFEST, body(), len(RAW))
    pinned = artifact.parse_manifest(parse(f"ghcr.io/acme/profiles@{RAW_DIGEST}"), RAW, "")
    assert pinned.digest == RAW_DIGEST
    sha512 = "sha512:" + hashlib.sha512(RAW).hexdigest()
    assert artifact.parse_manifest(parse(f"ghcr.io/acme/p@{sha512}"), RAW, "").digest == sha512
    # without the field, Content-Type (its parameters dropped) names the media type
    bare = json.dumps(body(mediaType=None)).encode()
    got = artifact.parse_manifest(REF, bare, f"{DOCKER_MANIFEST}; charset=utf-8")
    assert got.media_type == DOCKER_MANIFEST
    assert artifact.parse_manifest(REF, bare, "").media_type == ""


# ---- the downloaded layer, held bytes, digests -------------------------------------------


LAYER = Layer(DATA_DIGEST, len(DATA))


def test_check_layer() -> None:
    assert artifact.check_layer(REF, LAYER, DATA, "https://ghcr.io/blob") == DATA
    with pytest.raises(InvalidArtifact, match="layer digest mismatch: the content does not "
                       "match the descriptor's digest") as info:
        artifact.check_layer(REF, LAYER, DATA + b" ", "https://s3.example/b?X-Amz-Signature=S")
    assert info.value.url == "https://s3.example/b"
    empty = Layer("sha256:" + hashlib.sha256(b"").hexdigest(), 0)
    with pytest.raises(InvalidArtifact, match="artifact data is empty"):
        artifact.check_layer(REF, empty, b"")


@pytest.mark.parametrize(("held", "usable"), [
    (DATA, True), (DATA + b" ", False), (DATA[:-1], False), (b"X" * len(DATA), False),
    (b"", False),
])
def test_held_layer_usable(held: bytes, usable: bool) -> None:
    assert artifact.held_layer_usable(LAYER, held) is usable


@pytest.mark.parametrize(("value", "valid"), [
    ("sha256:" + "a" * 64, True), ("sha512:" + "0" * 128, True),
    ("sha256:" + "a" * 63, False), ("sha256:" + "a" * 65, False), ("sha256:" + "A" * 64, False),
    ("sha256:" + "g" * 64, False), ("md5:" + "a" * 32, False), ("sha256", False), ("", False),
    ("sha512:" + "a" * 64, False),
])
def test_valid_digest(value: str, valid: bool) -> None:
    assert digest_mod.is_valid(value) is valid


def test_digest_matches_uses_the_expected_algorithm() -> None:
    assert digest_mod.compute("sha256", DATA) == DATA_DIGEST
    assert digest_mod.matches(DATA_DIGEST, DATA)
    assert digest_mod.matches("sha512:" + hashlib.sha512(DATA).hexdigest(), DATA)
    assert not digest_mod.matches(DATA_DIGEST, DATA + b"\n")


# ---- JSON depth ------------------------------------------------------------------------


def test_depth_scan_ignores_brackets_in_strings() -> None:
    assert not artifact.json_depth_exceeds(json.dumps({"a": "[[[[" * 100 + '\\"{{'}).encode())
    assert artifact.json_depth_exceeds(b"[" * 33 + b"]" * 33)
    assert not artifact.json_depth_exceeds(b"[" * 32 + b"]" * 32)


@pytest.mark.parametrize(("raw", "limit", "deep"), [
    (b"{}", 0, True), (b"1", 0, False), (b'{"a": [1, {"b": []}]}', 4, False),
    (b'{"a": [1, {"b": []}]}', 3, True), (b'["]]]]", "\\\\", [[]]]', 3, False),
    (b'["[[[[", "\\"[[["]', 1, False),
])
def test_depth_limits(raw: bytes, limit: int, deep: bool) -> None:
    assert artifact.json_depth_exceeds(raw, limit) is deep


def test_checked_json() -> None:
    assert artifact.checked_json(b'{"a": [1]}') == {"a": [1]}
    with pytest.raises(artifact.TooDeep):
        artifact.checked_json(b"[" * 33 + b"]" * 33)
    with pytest.raises(ValueError):
        artifact.checked_json(b"{")


# ---- image annotations ------------------------------------------------------------------


def test_annotations_of() -> None:
    assert artifact.annotations_of(REF, manifest(body(annotations={"k": "v", "n": 1}))) == {
        "k": "v", "n": "1"}
    assert artifact.annotations_of(REF, manifest(body())) == {}
    assert artifact.annotations_of(REF, manifest(body(annotations=None))) == {}
    with pytest.raises(InvalidArtifact, match="manifest annotations are not an object"):
        artifact.annotations_of(REF, manifest(body(annotations=["k"])))
