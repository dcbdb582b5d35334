"""OCI references, parsed and normalised the way containerd (and docker) normalise image names.

``alpine`` → ``docker.io/library/alpine:latest``; ``index.docker.io/x/y`` →
``docker.io/x/y:latest``; ``name:tag@sha256:…`` keeps both, the digest wins.
Everything a pod author could use to reach something else is refused: schemes
(``file://``, ``https://``), ``..`` or empty path components, upper case in the
repository, control characters, whitespace and non-ASCII characters.

The value comes from pod annotations, so it is hostile input: the parser is
pure, linear in the input and raises nothing but :class:`ReferenceError`.

oras-py's ``oras.container.Container`` is not used: it keeps ``alpine`` without
``library/``, leaves ``index.docker.io`` alone, accepts ``a/../b`` and upper
case, and parses ``file:///etc/passwd`` as a docker.io image.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from nri_seccomp import digest as digest_mod
from nri_seccomp.errors import NriSeccompError

DEFAULT_REGISTRY = "docker.io"
#: an annotation longer than this is refused before any other work
MAX_LENGTH = 4096
#: distribution's limit on "registry/repository", counted after normalisation
MAX_NAME = 255

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST = re.compile(
    r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
)
_IPV6 = re.compile(r"\[[a-fA-F0-9:]+\]")
# ASCII only: Python's \w would let Unicode letters into a tag
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:/")


class ReferenceError(ValueError, NriSeccompError):
    """Not a usable OCI reference; the message says which part is wrong."""

    def __init__(self, value: str, problem: str) -> None:
        super().__init__(f"reference {_show(value)} {problem}")
        #: the offending input, cut to a loggable length
        self.value = value[:256]
        self.problem = problem


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None
    # asked for on every container creation (memo keys, the allow-list, the log line):
    # joined once, since parse() hands out the same object for the same annotation
    _text: str = field(init=False, repr=False, compare=False)
    _name: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        name = f"{self.registry}/{self.repository}"
        text = name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_text", text)

    def __str__(self) -> str:
        return self._text

    @property
    def name(self) -> str:
        """``registry/repository``: what the allow-list patterns are matched against."""
        return self._name

    @property
    def selector(self) -> str:
        """What to ask the registry's manifests endpoint for: the digest if any, else the tag."""
        return self.digest or self.tag or "latest"


def _show(value: str) -> str:
    # a 100 KB annotation must not become a 100 KB log line
    return repr(value[:64]) + ("…" if len(value) > 64 else "")


@functools.lru_cache(maxsize=4096)
def parse(value: str) -> Reference:
    """Parse and normalise; memoized, as the same annotations come with every container.

    Only successes are cached (an exception is not), so hostile values cannot
    fill the cache with errors.
    """
    if not value:
        raise ReferenceError(value, "is empty")
    if len(value) > MAX_LENGTH:
        raise ReferenceError(value, f"is {len(value)} characters long (at most {MAX_LENGTH})")
    for i, ch in enumerate(value):
        if not ch.isascii():
            raise ReferenceError(value, f"has a non-ASCII character {ch!r} at position {i}")
        if ch.isspace() or not ch.isprintable():
            raise ReferenceError(value, f"has a control or space character {ch!r} at position {i}")
    if "://" in value or _SCHEME.match(value):
        raise ReferenceError(
            value, "is a URL; write registry/repository:tag or registry/repository@sha256:…"
        )
    rest, digest = value, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        algo, _, hexpart = digest.partition(":")
        pattern = digest_mod.PATTERNS.get(algo)
        if pattern is None or not pattern.fullmatch(hexpart):
            raise ReferenceError(
                value,
                f"has an invalid digest {digest[:80]!r} (expected sha256: and 64 lower-case "
                "hex digits, or sha512: and 128)",
            )
    tag = None
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise ReferenceError(
                value,
                f"has an invalid tag {tag[:80]!r} (letters, digits, '_', '.', '-', not "
                "starting with '.' or '-', at most 128)",
            )
    if not rest:
        raise ReferenceError(value, "has no repository")
    registry, repository = _split_registry(rest, value)
    for comp in repository.split("/"):
        if not comp:
            raise ReferenceError(value, "has an empty path component")
        if comp in (".", ".."):
            raise ReferenceError(value, f"has a {comp!r} path component")
        if not _COMPONENT.fullmatch(comp):
            hint = " (repositories are lower case)" if comp.lower() != comp else ""
            raise ReferenceError(value, f"has an invalid repository component {comp[:80]!r}{hint}")
    if len(registry) + 1 + len(repository) > MAX_NAME:
        raise ReferenceError(value, f"has a name longer than {MAX_NAME} characters")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, repository, tag, digest)


def _split_registry(name: str, original: str) -> tuple[str, str]:
    first, sep, remainder = name.partition("/")
    # docker's rule: the first component is a registry only if it looks like a host
    if sep and (any(c in first for c in ".:[") or first == "localhost" or first.lower() != first):
        if first.startswith("["):
            host, _, after = first.partition("]")
            host += "]"
            port = after[1:] if after.startswith(":") else None
            if not _IPV6.fullmatch(host) or (after and port is None):
                raise ReferenceError(original, f"has an invalid registry {first[:80]!r}")
        else:
            host, colon, port_text = first.partition(":")
            port = port_text if colon else None
            if not _HOST.fullmatch(host):
                raise ReferenceError(original, f"has an invalid registry {first[:80]!r}")
        if port is not None and (not port.isdigit() or not 0 < int(port) < 65536):
            raise ReferenceError(original, f"has an invalid registry port {port[:16]!r}")
        registry = DEFAULT_REGISTRY if first == "index.docker.io" else first
        repository = remainder
    else:
        registry, repository = DEFAULT_REGISTRY, name
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = f"library/{repository}"
    return registry, repository
