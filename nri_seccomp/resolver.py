"""Which annotation names a container's seccomp profile: CRI-O's precedence, as a pure function.

First match wins; at each step the v2 key is tried before its v1 twin:

1. pod annotation ``KEY/<container>``
2. pod annotation ``KEY/POD``
3. image annotation ``KEY`` (bare)
4. image annotation ``KEY/<container>``
5. image annotation ``KEY/POD``

A present but empty value stops the search (an opt-out). A bare key on the pod
is ignored, as CRI-O ignores it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

KEY_V2 = "seccomp-profile.crio.io"
KEY_V1 = "seccomp-profile.kubernetes.cri-o.io"
KEYS = (KEY_V2, KEY_V1)
POD = "POD"
#: longer than any OCI reference a registry accepts (CRI-O has no explicit bound)
MAX_VALUE = 4096


class AnnotationError(ValueError):
    """An annotation value that cannot be a reference; refused before any parsing or fetch."""


@dataclass(frozen=True)
class Match:
    #: the annotation's value; "" is an explicit opt-out
    reference: str
    key: str
    #: "pod-container", "pod", "image", "image-container" or "image-pod"
    source: str
    log_line: str


def resolve(
    pod_annotations: Mapping[str, str],
    container_name: str,
    image_annotations: Mapping[str, str],
) -> Match | None:
    for source, where, suffix in (
        ("pod-container", pod_annotations, f"/{container_name}"),
        ("pod", pod_annotations, f"/{POD}"),
        ("image", image_annotations, ""),
        ("image-container", image_annotations, f"/{container_name}"),
        ("image-pod", image_annotations, f"/{POD}"),
    ):
        for base in KEYS:
            key = base + suffix
            value = where.get(key)
            if value is None:
                continue
            check_value(key, value)
            return Match(value, key, source, _log_line(source, key, value, container_name))
    return None


def _log_line(source: str, key: str, value: str, container: str) -> str:
    if not value:
        return (f"Found empty seccomp profile annotation {key} for container {container}: "
                "not applying a profile from an artifact")
    if source == "pod-container":
        return f"Found container specific seccomp profile annotation: {key}={value}"
    if source == "pod":
        return f"Found pod specific seccomp profile annotation: {key}={value}"
    if source == "image":
        return f"Found image specific seccomp profile annotation: {key}={value}"
    if source == "image-container":
        return (f"Found image specific seccomp profile annotation for container {container}: "
                f"{key}={value}")
    return f"Found image specific seccomp profile annotation for pod: {key}={value}"


def check_value(key: str, value: str) -> None:
    """Refuse values no reference can have, with a message an operator can act on."""
    if len(value) > MAX_VALUE:
        raise AnnotationError(
            f"annotation {key} is {len(value)} characters long (at most {MAX_VALUE}): "
            f"{value[:64]!r}…"
        )
    for i, ch in enumerate(value):
        if ch.isspace() or not ch.isprintable():
            raise AnnotationError(
                f"annotation {key} has a control or space character {ch!r} at position {i}: "
                f"{value[:64]!r}"
            )
