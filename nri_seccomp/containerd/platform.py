"""The node's platform, and the manifest of an image index containerd pulled for it (pure).

containerd's CRI pulls the manifest of the node's own platform (``platforms.Default()``:
linux, the GOARCH it was built for, the CPU variant on ARM); CRI-O does the same and reads
that manifest's annotations. This module picks the same entry from an index the way
containerd's matcher does for the cases that occur on a Linux node:

- ``os`` must be ``linux`` and ``architecture`` the node's GOARCH;
- arm64's variant ``v8`` is its default, so ``""`` and ``"v8"`` are the same;
- 32-bit ARM runs older variants: a v7 node takes v7, then v6, then v5, in that order;
- among equally good entries the first in the index wins.
"""

from __future__ import annotations

import platform as _platform
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: uname machine → (GOARCH, variant), as Go names them
_GOARCH: dict[str, tuple[str, str]] = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv8l": ("arm", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "i386": ("386", ""),
    "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
    "loongarch64": ("loong64", ""),
    "mips64": ("mips64", ""),
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def node_platform(machine: str | None = None) -> Platform:
    """linux and this machine's GOARCH (and ARM variant): what containerd pulls for."""
    m = (machine if machine is not None else _platform.machine()).lower()
    arch, variant = _GOARCH.get(m, (m, ""))
    return Platform("linux", arch, variant)


def _variants(node: Platform) -> tuple[str, ...]:
    """The variants an image may declare for ``node``, best first."""
    if node.architecture == "arm64":
        return ("v8", "")
    if node.architecture == "arm":
        n = int(node.variant[1:]) if node.variant[1:].isdigit() else 7
        return (*(f"v{i}" for i in range(min(n, 8), 4, -1)), "")
    return (node.variant,) if node.variant else ("",)


def pick(manifests: Sequence[Any], node: Platform) -> dict[str, Any] | None:
    """The index entry for ``node``, or None; ``manifests`` is the index's list, untrusted."""
    accepted = _variants(node)
    best: tuple[int, dict[str, Any]] | None = None
    for entry in manifests:
        if not isinstance(entry, dict):
            continue
        plat = entry.get("platform")
        if not isinstance(plat, dict):
            continue
        if plat.get("os") != node.os or plat.get("architecture") != node.architecture:
            continue
        variant = plat.get("variant") or ""
        if variant == "8" and node.architecture == "arm64":
            variant = "v8"
        if variant not in accepted:
            continue
        rank = accepted.index(variant)
        if best is None or rank < best[0]:
            best = (rank, entry)
    return None if best is None else best[1]
