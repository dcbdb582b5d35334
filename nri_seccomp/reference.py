"""OCI references, parsed and normalised the way containerd (and docker) normalise image names.

``alpine`` → ``docker.io/library/alpine:latest``; ``index.docker.io/x/y`` →
``docker.io/x/y:latest``; ``name:tag@sha256:…`` keeps both, the digest wins.
Everything a pod author could use to reach something else is refused: schemes
(``file://``, ``https://``), ``..`` or empty path components, upper case in the
repository, control characters.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

DEFAULT_REGISTRY = "docker.io"
MAX_LENGTH = 4096
MAX_NAME = 255

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST = re.compile(
    r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
)
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGESTS = {"sha256": re.compile(r"[a-f0-9]{64}"), "sha512": re.compile(r"[a-f0-9]{128}")}


class ReferenceError(ValueError):
    """Not a usable OCI reference; the message says which part is wrong."""


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def selector(self) -> str:
        """What to ask the registry's manifests endpoint for: the digest if any, else the tag."""
        return self.digest or self.tag or "latest"


@functools.lru_cache(maxsize=4096)
def parse(value: str) -> Reference:
    """Parse and normalise; memoized, as the same annotations come with every container."""
    if not value:
        raise ReferenceError("empty reference")
    if len(value) > MAX_LENGTH:
        raise ReferenceError(f"reference is {len(value)} characters long (at most {MAX_LENGTH})")
    for i, ch in enumerate(value):
        if ch.isspace() or not ch.isprintable() or not ch.isascii():
            raise ReferenceError(f"reference {value[:64]!r} has character {ch!r} at position {i}")
    if "://" in value or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/", value):
        raise ReferenceError(
            f"reference {value[:64]!r} is a URL; write registry/repository:tag or "
            "registry/repository@sha256:…"
        )
    rest, digest = value, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        algo, _, hexpart = digest.partition(":")
        pattern = _DIGESTS.get(algo)
        if pattern is None or not pattern.fullmatch(hexpart):
            raise ReferenceError(
                f"reference {value[:64]!r} has an invalid digest {digest[:80]!r} (expected "
                "sha256: and 64 lower-case hex digits)"
            )
    tag = None
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise ReferenceError(f"reference {value[:64]!r} has an invalid tag {tag[:80]!r}")
    if not rest:
        raise ReferenceError(f"reference {value[:64]!r} has no repository")
    registry, repository = _split_registry(rest, value)
    components = repository.split("/")
    for comp in components:
        if not comp:
            raise ReferenceError(f"reference {value[:64]!r} has an empty path component")
        if comp in (".", ".."):
            raise ReferenceError(f"reference {value[:64]!r} has a {comp!r} path component")
        if not _COMPONENT.fullmatch(comp):
            hint = " (repositories are lower case)" if comp.lower() != comp else ""
            raise ReferenceError(
                f"reference {value[:64]!r} has an invalid repository component {comp!r}{hint}"
            )
    if len(registry) + 1 + len(repository) > MAX_NAME:
        raise ReferenceError(f"reference {value[:64]!r}: name longer than {MAX_NAME} characters")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, repository, tag, digest)


def _split_registry(name: str, original: str) -> tuple[str, str]:
    first, sep, remainder = name.partition("/")
    if sep and (any(c in first for c in ".:") or first == "localhost" or first.lower() != first):
        host, _, port = first.partition(":")
        if not _HOST.fullmatch(host):
            raise ReferenceError(f"reference {original[:64]!r} has an invalid registry {first!r}")
        if ":" in first and (not port.isdigit() or not 0 < int(port) < 65536):
            raise ReferenceError(
                f"reference {original[:64]!r} has an invalid registry port {port!r}"
            )
        registry = DEFAULT_REGISTRY if first == "index.docker.io" else first
        repository = remainder
    else:
        registry, repository = DEFAULT_REGISTRY, name
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = f"library/{repository}"
    return registry, repository
