"""What a seccomp profile artifact must look like: the rules, with no I/O.

An artifact is a single OCI (or Docker v2) manifest of one of two shapes:

- CRI-O 1.30's: the config media type is
  ``application/vnd.cncf.seccomp-profile.config.v1+json`` (an ``artifactType``, if
  any, must say the same); the first layer holds the profile;
- KEP-6061's typed form: the config is the OCI 1.1 empty descriptor
  (``application/vnd.oci.empty.v1+json``) and ``artifactType`` carries the seccomp
  media type; exactly one layer holds the profile.

The layer may have any media type (ORAS labels files as tar layers; KEP-6061 says
runtimes must not require one); it is the raw JSON document. Anything else,
``application/vnd.unknown.config.v1+json`` included, is refused with its media
types named, and an image index is refused by name. The client (``client.py``) reads
bytes from the registry; everything it then decides about those bytes is here,
as functions of values, so that each rule is tested as a table without a
registry:

- ``parse_manifest``: the digest when the reference pins one (computed with the
  pinned algorithm; a mismatch never prints the digest actually received: it
  would reveal another tenant's private content fetched with the node's
  credentials), the JSON nesting depth before parsing (``json_depth_exceeds``, a
  linear scan, so a hostile manifest cannot make ``json.loads`` recurse), that
  it is a JSON object;
- ``first_layer``: that it is a single manifest (an image index is refused, as
  CRI-O does: no platform is picked), ``schemaVersion`` 2, the manifest and
  config media types, the first layer's digest and advertised size against the
  cap, before anything is downloaded;
- ``check_layer``: the downloaded bytes against the descriptor's digest, and
  non-empty data.

The size caps for manifests (``MAX_MANIFEST``, ``MAX_IMAGE_MANIFEST``) and the
depth limit (``MAX_JSON_DEPTH``) are here too; the client enforces the byte caps
while streaming. Messages quote registry-supplied values only through
``bounded.quote_untrusted``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from nri_seccomp import digest as digest_mod
from nri_seccomp.bounded import quote_untrusted
from nri_seccomp.decide.reference import Reference
from nri_seccomp.registry.errors import InvalidArtifact

SECCOMP_CONFIG_MEDIA_TYPE = "application/vnd.cncf.seccomp-profile.config.v1+json"
EMPTY_CONFIG_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
UNKNOWN_CONFIG_MEDIA_TYPE = "application/vnd.unknown.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_KNOWN_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
# the index types are asked for so that an index is recognised and refused by
# name rather than turned into a confusing 404 by content negotiation
ACCEPT = ", ".join((OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST))
#: an artifact's manifest: a handful of descriptors, a few KiB in practice
MAX_MANIFEST = 512 * 1024
#: an image's manifest (annotations lookups): the distribution's own limit
MAX_IMAGE_MANIFEST = 4 * 1024 * 1024
#: JSON nesting accepted in manifests and token responses (checked before parsing)
MAX_JSON_DEPTH = 32


@dataclass(frozen=True)
class Artifact:
    reference: str
    manifest_digest: str
    layer_digest: str
    data: bytes = field(repr=False)
    media_type_config: str
    size: int
    #: the layer's bytes were the caller's (``fetch(have=…)``): only the manifest came
    #: from the registry, so a log line must not say the profile was downloaded
    held: bool = False
    #: the mirror (hosts.toml) that served the layer, "" when the registry itself did
    via: str = ""

    @property
    def config_media_type(self) -> str:
        return self.media_type_config


@dataclass(frozen=True)
class Manifest:
    digest: str
    media_type: str
    body: dict[str, Any]
    size: int


@dataclass(frozen=True)
class Layer:
    """The first layer's descriptor: what is downloaded, and what it must hash to."""

    digest: str
    size: int


# ---- digests ---------------------------------------------------------------------


# ---- JSON with a bounded depth -------------------------------------------------


class TooDeep(Exception):
    """The JSON nests arrays/objects deeper than ``MAX_JSON_DEPTH``; it was not parsed."""


# a JSON string (escapes included); what is left between strings holds the brackets
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth_exceeds(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when ``raw`` nests arrays/objects deeper than ``limit`` (a linear scan)."""
    depth = 0
    for m in _BRACKET.finditer(_JSON_STRING.sub(b"", raw)):
        if m.group() in b"[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def checked_json(raw: bytes) -> Any:
    """``json.loads(raw)``, or ``TooDeep`` without parsing when it nests too deep."""
    if json_depth_exceeds(raw):
        raise TooDeep
    return json.loads(raw)


# ---- the manifest --------------------------------------------------------------------


def parse_manifest(ref: Reference, raw: bytes, content_type: str,
                   url: str | None = None) -> Manifest:
    """The manifest in ``raw`` as received for ``ref``; ``InvalidArtifact`` if it is not one.

    CPU-bound for large bodies (hashing, the depth scan, parsing): the client
    runs it off the event loop above ``client.JSON_ON_LOOP`` bytes.
    """
    key = str(ref)
    info: dict[str, Any] = {"registry": ref.registry, "url": url}
    if ref.digest is not None:
        if not digest_mod.matches(ref.digest, raw):
            raise InvalidArtifact(key, "manifest digest mismatch: the content does not "
                                  "match the reference's digest", **info)
        digest = ref.digest
    else:
        digest = digest_mod.compute("sha256", raw)
    try:
        body = checked_json(raw)
    except TooDeep:
        raise InvalidArtifact(key, f"manifest is nested more than {MAX_JSON_DEPTH} levels "
                              "deep", **info) from None
    except (ValueError, RecursionError):
        raise InvalidArtifact(key, "manifest is not valid JSON", **info) from None
    if not isinstance(body, dict):
        raise InvalidArtifact(key, "manifest is not a JSON object", **info)
    media_type = body.get("mediaType") or content_type
    return Manifest(digest, str(media_type).split(";")[0].strip(), body, len(raw))


def first_layer(ref: Reference, manifest: Manifest, max_size: int) -> Layer:
    """The profile's layer descriptor, once the manifest is known to be a profile artifact."""
    key = str(ref)
    body, media_type = manifest.body, manifest.media_type

    def invalid(message: str) -> InvalidArtifact:
        return InvalidArtifact(key, message, registry=ref.registry)

    if media_type in (OCI_INDEX, DOCKER_LIST) or "manifests" in body:
        shown = media_type if media_type in _KNOWN_TYPES else (
            quote_untrusted(media_type) if media_type else "no mediaType")
        raise invalid(f"is an image index ({shown}), not a seccomp profile artifact; "
                      "reference the artifact's own manifest (no platform is picked from "
                      "an index)")
    if body.get("schemaVersion") != 2:
        version = quote_untrusted(body.get("schemaVersion"), 20)
        raise invalid(f"manifest schemaVersion is {version}, expected 2")
    declared = body.get("mediaType")
    # the field is optional in OCI; Content-Type alone is too often generic to refuse on
    if declared is not None and declared not in (OCI_MANIFEST, DOCKER_MANIFEST):
        raise invalid(f"manifest media type is {quote_untrusted(declared)}, expected "
                      f"'{OCI_MANIFEST}'")
    config = body.get("config")
    config_type = config.get("mediaType") if isinstance(config, dict) else None
    artifact_type = body.get("artifactType")
    typed = False
    if config_type == SECCOMP_CONFIG_MEDIA_TYPE:
        # CRI-O 1.30's shape (and SPO's since #3421, which also sets artifactType)
        if artifact_type is not None and artifact_type != SECCOMP_CONFIG_MEDIA_TYPE:
            raise invalid(f"artifactType {quote_untrusted(artifact_type)} contradicts the "
                          f"config media type '{SECCOMP_CONFIG_MEDIA_TYPE}'")
    elif config_type == EMPTY_CONFIG_MEDIA_TYPE and artifact_type == SECCOMP_CONFIG_MEDIA_TYPE:
        typed = True  # KEP-6061: the OCI 1.1 empty config, the kind in artifactType
    else:
        raise invalid(_untyped(config_type, artifact_type))
    layers = body.get("layers")
    if typed and isinstance(layers, list) and len(layers) > 1:
        raise invalid(f"artifact has {len(layers)} layers; a KEP-6061 seccomp profile "
                      "artifact has exactly one")
    if not isinstance(layers, list) or not layers:
        raise invalid("artifact has no layers")
    layer = layers[0]
    digest = layer.get("digest") if isinstance(layer, dict) else None
    size = layer.get("size") if isinstance(layer, dict) else None
    if not isinstance(digest, str) or not digest_mod.is_valid(digest):
        raise invalid(f"first layer has an invalid digest {quote_untrusted(digest)}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise invalid(f"first layer has an invalid size {quote_untrusted(size, 40)}")
    if size > max_size:
        # CRI-O's wording, then the numbers an operator needs
        raise invalid(f"exceeded maximum allowed artifact size of {max_size} bytes "
                      f"(layer {digest} is {size} bytes)")
    if size == 0:
        raise invalid("artifact data is empty")
    return Layer(digest, size)


def _untyped(config_type: object, artifact_type: object) -> str:
    """Why a manifest is not a seccomp profile artifact, with its media types named."""
    found = quote_untrusted(config_type, 60) if isinstance(config_type, str) else "missing"
    message = f"config media type is {found}"
    if artifact_type is not None:
        message += f", artifactType {quote_untrusted(artifact_type, 60)}"
    message += (f"; expected '{SECCOMP_CONFIG_MEDIA_TYPE}' as either, with an empty "
                "config for artifactType")
    if config_type == UNKNOWN_CONFIG_MEDIA_TYPE:
        message += (" (pushed without a config media type; push with --artifact-type "
                    f"{SECCOMP_CONFIG_MEDIA_TYPE})")
    elif config_type == EMPTY_CONFIG_MEDIA_TYPE:
        message += (" (an artifact with an empty config; push with --artifact-type "
                    f"{SECCOMP_CONFIG_MEDIA_TYPE})")
    return message


def held_layer_usable(layer: Layer, held: bytes) -> bool:
    """Bytes already held (the cache) are the layer: same size, same digest, hashed again."""
    return len(held) == layer.size and digest_mod.matches(layer.digest, held)


def check_layer(ref: Reference, layer: Layer, data: bytes, url: str | None = None) -> bytes:
    """``data`` as downloaded for ``layer``, unless it does not hash to it or is empty."""
    info: dict[str, Any] = {"registry": ref.registry, "url": url}
    if not digest_mod.matches(layer.digest, data):
        raise InvalidArtifact(str(ref), "layer digest mismatch: the content does not match "
                              "the descriptor's digest", **info)
    if not data:
        raise InvalidArtifact(str(ref), "artifact data is empty", **info)
    return data


def annotations_of(ref: Reference, manifest: Manifest) -> dict[str, str]:
    """An image manifest's annotations (CRI-O's "image annotations"), as strings."""
    annotations = manifest.body.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise InvalidArtifact(str(ref), "manifest annotations are not an object",
                              registry=ref.registry)
    return {str(k): str(v) for k, v in annotations.items()}
