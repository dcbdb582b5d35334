"""for_node: archMap and includes/excludes, as Docker and containers-common do; the node."""

from __future__ import annotations

import os
import platform

import pytest

from nri_seccomp.seccomp import libseccomp, model, parse, select, vocabulary
from tests.profiles import AMD64, ARCH_MAP, FILLER, allow, rules

GATED = [
    allow("r0"),
    allow("r1", includes={"arches": ["amd64", "x32"]}),
    allow("r2", includes={"arches": ["arm", "arm64"]}),
    allow("r3", includes={"caps": ["CAP_SYS_ADMIN"]}),
    allow("r4", includes={"caps": ["CAP_SYS_ADMIN", "CAP_BPF"]}),
    allow("r5", excludes={"caps": ["CAP_SYS_ADMIN"]}),
    allow("r6", excludes={"caps": ["CAP_SYS_ADMIN", "CAP_BPF"]}),
    allow("r7", includes={"minKernel": "5.8"}),
    allow("r8", excludes={"minKernel": "5.8"}),
    allow("r9", excludes={"arches": ["amd64"]}),
    allow("r10", includes={"arches": ["amd64"], "caps": ["CAP_SYS_ADMIN"], "minKernel": "4.0"}),
]


@pytest.mark.parametrize(
    ("node", "selected"),
    [
        pytest.param(AMD64, ["r0", "r1", "r5", "r6", "r7"], id="amd64 default caps 6.1"),
        pytest.param(
            model.NodeContext("amd64", (6, 1), vocabulary.DEFAULT_CAPABILITIES | {"CAP_SYS_ADMIN"}),
            ["r0", "r1", "r3", "r7", "r10"],
            id="amd64 +SYS_ADMIN",
        ),
        pytest.param(
            model.NodeContext("amd64", (6, 1), frozenset({"CAP_SYS_ADMIN", "CAP_BPF"})),
            ["r0", "r1", "r3", "r4", "r7", "r10"],
            id="amd64 SYS_ADMIN+BPF",
        ),
        pytest.param(
            model.NodeContext("amd64", (5, 4), frozenset({"CAP_BPF"})),
            ["r0", "r1", "r5", "r8"],
            id="amd64 5.4 BPF only",
        ),
        pytest.param(
            model.NodeContext("arm64", (5, 8)),
            ["r0", "r2", "r5", "r6", "r7", "r9"],
            id="arm64 5.8",
        ),
        pytest.param(
            model.NodeContext("x86", (3, 10), frozenset({"cap_sys_admin"})),
            ["r0", "r3", "r8", "r9"],
            id="x86 3.10 lower-case cap",
        ),
    ],
)
def test_includes_and_excludes_select_rules_for_the_node(
    node: model.NodeContext, selected: list[str]
) -> None:
    p = select.for_node(parse.parse(rules(*GATED)), node)
    assert [r.names[0] for r in p.syscalls] == selected
    assert p.rule_indexes == tuple(int(n[1:]) for n in selected)
    assert all(r.includes.is_empty() and r.excludes.is_empty() for r in p.syscalls)


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("amd64", ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32")),
        ("arm64", ("SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM")),
        ("s390x", ("SCMP_ARCH_S390X", "SCMP_ARCH_S390")),
        ("ppc64le", ()),  # no entry: the runtime's native architecture only
    ],
)
def test_arch_map_takes_the_native_entry(arch: str, expected: tuple[str, ...]) -> None:
    node = model.NodeContext(arch, (6, 1))
    p = select.for_node(parse.parse(rules(FILLER, archMap=ARCH_MAP)), node)
    assert p.architectures == expected
    assert p.arch_map == ()


def test_architectures_are_kept() -> None:
    doc = rules(FILLER, architectures=["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"])
    p = select.for_node(parse.parse(doc), model.NodeContext("arm64", (6, 1)))
    assert p.architectures == ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86")


def test_node_context_reads_this_machine() -> None:
    node = select.node_context()
    if platform.machine() == "x86_64":
        assert node.arch == "amd64"
        assert node.native_arch == "SCMP_ARCH_X86_64" == libseccomp.native_arch()
    assert node.kernel == select.kernel_version(os.uname().release)
    assert node.caps == vocabulary.DEFAULT_CAPABILITIES
    assert len(vocabulary.DEFAULT_CAPABILITIES) == 14


@pytest.mark.parametrize(
    ("release", "version"),
    [("6.1.0-18-amd64", (6, 1)), ("5.15.153.1-microsoft-standard-WSL2", (5, 15)),
     ("4.18.0-513.el8.x86_64", (4, 18)), ("6.10", (6, 10)), ("6.8.0+", (6, 8))],
)
def test_kernel_version(release: str, version: tuple[int, int]) -> None:
    assert select.kernel_version(release) == version


def test_kernel_version_garbage() -> None:
    with pytest.raises(ValueError, match="cannot read a kernel version"):
        select.kernel_version("linux")
