"""The profile as this node's runtime would apply it: ``archMap`` and ``includes``/``excludes``.

A profile serves many nodes: Docker's default lists rules for other
architectures, capabilities and kernels. :func:`for_node` evaluates them with
Docker's semantics for one :class:`~nri_seccomp.seccomp.model.NodeContext`
(:func:`node_context` reads this machine's), so that what is checked and sent is
what the runtime would have built itself. Unresolved selectors never reach NRI.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import replace

from nri_seccomp.seccomp.model import NodeContext, Profile, Rule, Selector
from nri_seccomp.seccomp.vocabulary import BY_DOCKER, DEFAULT_CAPABILITIES

#: platform.machine() → Docker architecture name
_MACHINES = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "i386": "x86",
    "i486": "x86",
    "i586": "x86",
    "i686": "x86",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv6l": "arm",
    "armv7l": "arm",
    "armv8l": "arm",
    "ppc": "ppc",
    "ppc64": "ppc64",
    "ppc64le": "ppc64le",
    "s390": "s390",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "parisc": "parisc",
    "parisc64": "parisc64",
    "loongarch64": "loong64",
    "m68k": "m68k",
}


def node_context(caps: frozenset[str] = DEFAULT_CAPABILITIES) -> NodeContext:
    """This node: architecture from ``platform.machine()``, kernel from ``uname``."""
    machine = platform.machine()
    arch = _MACHINES.get(machine)
    if arch is None and machine.startswith("mips"):
        little = sys.byteorder == "little"
        arch = ("mipsel" if little else "mips") + ("64" if "64" in machine else "")
    if arch is None:
        raise ValueError(f"unsupported machine {machine!r}: no seccomp architecture for it")
    return NodeContext(arch=arch, kernel=kernel_version(os.uname().release), caps=caps)


def kernel_version(release: str) -> tuple[int, int]:
    """``"6.1.0-18-amd64"`` → ``(6, 1)``."""
    nums: list[int] = []
    for part in release.split(".")[:2]:
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        nums.append(int(digits))
    if len(nums) != 2:
        raise ValueError(f"cannot read a kernel version from {release!r}")
    return nums[0], nums[1]


def _selected(rule: Rule, node: NodeContext) -> bool:
    # Docker's semantics: any excluded arch/cap or a new-enough kernel drops the
    # rule; every included cap must be present and the kernel new enough
    ex, inc = rule.excludes, rule.includes
    if ex.arches and node.arch in ex.arches:
        return False
    if ex.caps and any(c in node.caps for c in ex.caps):
        return False
    if ex.min_kernel is not None and node.kernel >= ex.min_kernel:
        return False
    if inc.arches and node.arch not in inc.arches:
        return False
    if inc.caps and not all(c in node.caps for c in inc.caps):
        return False
    return not (inc.min_kernel is not None and node.kernel < inc.min_kernel)


def for_node(profile: Profile, node: NodeContext) -> Profile:
    """The profile as this node's runtime would apply it: archMap and includes/excludes resolved."""
    if node.arch not in BY_DOCKER:
        raise ValueError(f"unknown node architecture {node.arch!r}")
    caps = frozenset(c.upper() for c in node.caps)
    node = replace(node, caps=caps)
    architectures = profile.architectures
    if profile.arch_map:
        native = node.native_arch
        picked: list[str] = []
        for entry in profile.arch_map:
            if entry.architecture == native:
                for a in (entry.architecture, *entry.sub_architectures):
                    if a not in picked:
                        picked.append(a)
        # no entry for this node: like the runtimes, leave only the native architecture
        architectures = tuple(picked)
    rules = tuple(
        replace(r, includes=Selector(), excludes=Selector())
        for r in profile.syscalls
        if _selected(r, node)
    )
    return replace(profile, architectures=architectures, arch_map=(), syscalls=rules, selected=True)
