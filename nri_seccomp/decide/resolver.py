"""Which annotation names a container's seccomp profile: CRI-O's precedence, as a pure function.

First match wins; at each step the v2 key is tried before its v1 twin:

1. pod annotation ``KEY/<container>``
2. pod annotation ``KEY/POD``
3. image annotation ``KEY`` (bare)
4. image annotation ``KEY/<container>``
5. image annotation ``KEY/POD``

A present but empty value stops the search (an opt-out). A bare key on the pod
is ignored, as CRI-O ignores it. The value is only screened here (length,
control characters); parsing it as a reference is ``reference``'s job.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

from nri_seccomp.errors import NriSeccompError

KEY_V2 = "seccomp-profile.crio.io"
KEY_V1 = "seccomp-profile.kubernetes.cri-o.io"
#: CRI-O main reads the v2 key first and falls back to its v1 twin at every step
KEYS = (KEY_V2, KEY_V1)
POD = "POD"
#: far longer than any reference a registry accepts; CRI-O itself sets no bound,
#: but an unbounded value would end up in log lines and error messages
MAX_VALUE = 4096
#: how much of a refused value an error message quotes
_QUOTED = 64

SOURCES = ("pod-container", "pod", "image", "image-container", "image-pod")
#: no image annotations (yet): the pod's alone are looked at
_NONE: Mapping[str, str] = {}


class AnnotationError(ValueError, NriSeccompError):
    """An annotation value that cannot be a reference; refused before any parsing or fetch."""

    def __init__(self, key: str, problem: str, value: str) -> None:
        quoted = repr(value[:_QUOTED]) + ("…" if len(value) > _QUOTED else "")
        super().__init__(f"annotation {key} {problem}: {quoted}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class Match:
    #: the annotation's value; "" is an explicit opt-out
    reference: str
    key: str
    #: one of SOURCES
    source: str
    log_line: str

    @property
    def opt_out(self) -> bool:
        return not self.reference


def resolve(
    pod_annotations: Mapping[str, str],
    container_name: str,
    image_annotations: Mapping[str, str] = _NONE,
) -> Match | None:
    """The annotation that decides ``container_name``'s profile, or None when none applies.

    Raises AnnotationError when the deciding value is hostile; values of keys
    that lose are not looked at, as CRI-O never reads them either.
    """
    pod_keys, image_keys = _keys(container_name)
    # ``in`` before the lookup: protobuf's map answers a miss of ``get`` with an
    # exception caught inside, several times the cost of a membership test
    for source, key in pod_keys:
        if key in pod_annotations:
            return _match(source, key, pod_annotations[key], container_name)
    if image_annotations:
        for source, key in image_keys:
            if key in image_annotations:
                return _match(source, key, image_annotations[key], container_name)
    return None


def pod_match(key: str, value: str) -> Match | None:
    """The match :func:`resolve` returns for a container when the pod annotation ``key``
    decides it (``KEY/POD``, or ``KEY/<container>`` for that container), or None when
    ``key`` is not one of ours or ``value`` is an opt-out (whose line names the
    container). Raises AnnotationError as :func:`resolve` would."""
    base, slash, suffix = key.partition("/")
    if base not in KEYS or not slash or not suffix or not value:
        return None
    return _match("pod" if suffix == POD else "pod-container", key, value, suffix)


@functools.lru_cache(maxsize=256)
def _match(source: str, key: str, value: str, container_name: str) -> Match:
    """The same few annotations come with every container: built once (a hostile value
    raises, and exceptions are not cached; at most 256 times MAX_VALUE characters kept)."""
    # screened before it reaches any log line, so a newline cannot forge one
    check_value(key, value)
    return Match(value, key, source, _log_line(source, key, value, container_name))


@functools.lru_cache(maxsize=1024)
def _keys(container_name: str) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """The (source, key) pairs in CRI-O's order, on the pod and on the image; the same
    few container names come with every pod, so the keys are joined once."""
    steps = (
        ("pod-container", True, f"/{container_name}"),
        ("pod", True, f"/{POD}"),
        ("image", False, ""),
        ("image-container", False, f"/{container_name}"),
        ("image-pod", False, f"/{POD}"),
    )
    pod = tuple((source, base + suffix) for source, on_pod, suffix in steps if on_pod
                for base in KEYS)
    image = tuple((source, base + suffix) for source, on_pod, suffix in steps if not on_pod
                  for base in KEYS)
    return pod, image


# CRI-O's wording, which operators grep for; {key}={value} is appended
_FOUND = {
    "pod-container": "Found container specific seccomp profile annotation",
    "pod": "Found pod specific seccomp profile annotation",
    "image": "Found image specific seccomp profile annotation",
    "image-container": "Found image specific seccomp profile annotation for container {name}",
    "image-pod": "Found image specific seccomp profile annotation for pod",
}


def _log_line(source: str, key: str, value: str, container: str) -> str:
    found = _FOUND[source].format(name=container)
    if not value:
        # CRI-O prints nothing for an opt-out; ours says why no profile follows,
        # and "empty" keeps it apart from a grep for CRI-O's own lines
        return (f"{found.replace('Found ', 'Found empty ', 1)}: {key}= "
                f"(opt-out: container {container} keeps its own seccomp profile)")
    return f"{found}: {key}={value}"


def check_value(key: str, value: str) -> None:
    """Refuse values no reference can have, with a message an operator can act on."""
    if len(value) > MAX_VALUE:
        raise AnnotationError(
            key, f"is {len(value)} characters long (at most {MAX_VALUE})", value
        )
    # every space and control character is non-printable but the ASCII space: the
    # common case is answered without a loop over the characters
    if value.isprintable() and " " not in value:
        return
    for i, ch in enumerate(value):
        if ch.isspace() or not ch.isprintable():
            raise AnnotationError(
                key, f"has a control or space character {ch!r} at position {i}", value
            )
