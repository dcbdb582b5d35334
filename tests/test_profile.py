"""Profiles: parse with a specific message per fault, select for the node, convert, compile.

Everything runs against the real libseccomp; Debian's default profile comes from
the golang-github-containers-common package, downloaded at run time if absent.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from nri_seccomp.nri.pb import nri_pb2
from nri_seccomp.seccomp import profile as P

SYSTEM_PROFILE = Path("/usr/share/containers/seccomp.json")
AMD64 = P.NodeContext(arch="amd64", kernel=(6, 1))


def fetch_debian_profile(dest: Path) -> bytes:
    """Debian's containers-common default profile, from the package archive."""
    subprocess.run(
        ["apt-get", "download", "golang-github-containers-common"],
        cwd=dest,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (deb,) = dest.glob("golang-github-containers-common_*.deb")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest / "root")], check=True, timeout=60)
    return (dest / "root" / SYSTEM_PROFILE.relative_to("/")).read_bytes()


@pytest.fixture(scope="session")
def debian_profile(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if SYSTEM_PROFILE.exists():
        return SYSTEM_PROFILE.read_bytes()
    return fetch_debian_profile(tmp_path_factory.mktemp("containers-common"))


#: the CRI-O blog's profile shape: ENOSYS by default, an allow-list, archMap for x86_64
CRIO_BLOG: dict[str, Any] = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "defaultErrnoRet": 38,
    "archMap": [
        {
            "architecture": "SCMP_ARCH_X86_64",
            "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        }
    ],
    "syscalls": [
        {
            "names": [
                "accept4", "access", "arch_prctl", "bind", "brk", "capget", "capset", "chdir",
                "chown", "clone", "close", "connect", "dup2", "epoll_create", "epoll_ctl",
                "epoll_pwait", "epoll_wait", "eventfd2", "execve", "exit", "exit_group",
                "faccessat2", "fadvise64", "fchdir", "fchown", "fcntl", "fstat", "fstatfs",
                "futex", "getcwd", "getdents64", "getegid", "geteuid", "getgid", "getpid",
                "getppid", "getrandom", "getuid", "ioctl", "io_setup", "listen", "lseek",
                "mkdir", "mmap", "mprotect", "munmap", "newfstatat", "openat", "pipe",
                "prctl", "pread64", "prlimit64", "pwrite64", "read", "recvfrom",
                "recvmsg", "rename", "rseq", "rt_sigaction", "rt_sigprocmask",
                "rt_sigreturn", "rt_sigsuspend", "sched_getaffinity", "sendfile",
                "sendmsg", "set_robust_list", "set_tid_address", "setgid", "setgroups",
                "setitimer", "setsockopt", "setuid", "socket", "socketpair", "stat",
                "statfs", "sysinfo", "uname", "unlink", "wait4", "write", "writev",
            ],
            "action": "SCMP_ACT_ALLOW",
        }
    ],
}


def dumps(doc: object) -> bytes:
    return json.dumps(doc).encode()


def base(**extra: Any) -> dict[str, Any]:
    return {"defaultAction": "SCMP_ACT_ERRNO", **extra}


def rules(*rs: dict[str, Any], **extra: Any) -> bytes:
    return dumps(base(syscalls=list(rs), **extra))


def allow(*names: str, **extra: Any) -> dict[str, Any]:
    return {"names": list(names), "action": "SCMP_ACT_ALLOW", **extra}


FILLER = allow("read")


# ---------------------------------------------------------------------------
# parse: every malformed case has its own message

MALFORMED: list[tuple[str, bytes, type[P.ProfileError], list[str], int | None]] = [
    ("not json", b'{"defaultAction": ', P.ProfileSyntaxError, ["layer is not JSON:"], None),
    ("binary", b"\x1f\x8b\x08\x00gzip", P.ProfileSyntaxError, ["layer is not JSON:"], None),
    ("empty", b"", P.ProfileSyntaxError, ["layer is not JSON:"], None),
    ("deep", b"[" * 100_000 + b"]" * 100_000, P.ProfileSyntaxError, ["nested too deeply"], None),
    ("nan", b'{"defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": NaN}',
     P.ProfileSyntaxError, ["layer is not JSON:", "NaN"], None),
    ("duplicate key", b'{"defaultAction": "SCMP_ACT_ALLOW", "defaultAction": "SCMP_ACT_KILL"}',
     P.ProfileSyntaxError, ["duplicate key 'defaultAction'"], None),
    ("array", b"[]", P.ProfileFieldError, ["profile must be a JSON object, not an array"], None),
    ("string", b'"x"', P.ProfileFieldError, ["profile must be a JSON object, not a string"], None),
    ("{}", b"{}", P.ProfileFieldError, ["profile has no defaultAction"], None),
    ("only syscalls", dumps({"syscalls": [FILLER]}), P.ProfileFieldError,
     ["profile has no defaultAction"], None),
    ("typo top-level", dumps(base(defaultErrnoret=38)), P.ProfileFieldError,
     ["unknown profile field 'defaultErrnoret' (did you mean 'defaultErrnoRet'?)"], None),
    ("two unknown", dumps(base(foo=1, bar=2)), P.ProfileFieldError,
     ["unknown profile fields 'bar', 'foo'"], None),
    ("default action", dumps({"defaultAction": "SCMP_ACT_FOO"}), P.ProfileFieldError,
     ["defaultAction: unknown action 'SCMP_ACT_FOO'"], None),
    ("default action type", dumps({"defaultAction": 1}), P.ProfileFieldError,
     ["defaultAction: must be a string, not an integer"], None),
    ("default notify", dumps({"defaultAction": "SCMP_ACT_NOTIFY"}), P.ProfileFieldError,
     ["SCMP_ACT_NOTIFY cannot be the default action"], None),
    ("defaultErrnoRet range", dumps(base(defaultErrnoRet=65536)), P.ProfileFieldError,
     ["defaultErrnoRet: 65536 is out of range (maximum 65535)"], None),
    ("defaultErrnoRet negative", dumps(base(defaultErrnoRet=-1)), P.ProfileFieldError,
     ["defaultErrnoRet: -1 is negative"], None),
    ("defaultErrnoRet string", dumps(base(defaultErrnoRet="38")), P.ProfileFieldError,
     ["defaultErrnoRet: must be a non-negative integer, not a string"], None),
    ("defaultErrnoRet bool", dumps(base(defaultErrnoRet=True)), P.ProfileFieldError,
     ["defaultErrnoRet: must be a non-negative integer, not a boolean"], None),
    ("defaultErrnoRet float", dumps(base(defaultErrnoRet=38.0)), P.ProfileFieldError,
     ["defaultErrnoRet: must be a non-negative integer, not a number with a fraction"], None),
    ("defaultErrnoRet with allow",
     dumps({"defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": 38}), P.ProfileFieldError,
     ["defaultErrnoRet: 38 has no effect with SCMP_ACT_ALLOW"], None),
    ("defaultErrno disagrees", dumps(base(defaultErrnoRet=1, defaultErrno="ENOSYS")),
     P.ProfileFieldError, ["defaultErrno: ENOSYS (38) disagrees with defaultErrnoRet 1"], None),
    ("defaultErrno unknown", dumps(base(defaultErrno="ENOPE")),
     P.ProfileFieldError, ["defaultErrno: unknown errno name 'ENOPE'"], None),
    ("architecture", dumps(base(architectures=["SCMP_ARCH_FOO"])), P.ProfileFieldError,
     ["architectures[0]: unknown architecture 'SCMP_ARCH_FOO'"], None),
    ("architectures type", dumps(base(architectures="SCMP_ARCH_X86_64")), P.ProfileFieldError,
     ["architectures: must be an array, not a string"], None),
    ("both arch forms",
     dumps(base(architectures=["SCMP_ARCH_X86_64"],
                archMap=[{"architecture": "SCMP_ARCH_X86_64"}])),
     P.ProfileFieldError, ["architectures and archMap are both set"], None),
    ("archMap missing", dumps(base(archMap=[{"subArchitectures": []}])), P.ProfileFieldError,
     ["archMap[0]: architecture is missing"], None),
    ("archMap sub", dumps(base(archMap=[{"architecture": "SCMP_ARCH_X86_64",
                                         "subArchitectures": ["SCMP_ARCH_X87"]}])),
     P.ProfileFieldError, ["archMap[0].subArchitectures[0]: unknown architecture 'SCMP_ARCH_X87'"],
     None),
    ("archMap field", dumps(base(archMap=[{"architecture": "SCMP_ARCH_X86_64", "subArches": []}])),
     P.ProfileFieldError, ["archMap[0]: unknown archMap field 'subArches'"], None),
    ("flag", dumps(base(flags=["SECCOMP_FILTER_FLAG_FOO"])), P.ProfileFieldError,
     ["flags[0]: unknown flag 'SECCOMP_FILTER_FLAG_FOO'"], None),
    ("listenerPath type", dumps(base(listenerPath=1)), P.ProfileFieldError,
     ["listenerPath: must be a string, not an integer"], None),
    ("syscalls type", dumps(base(syscalls={})), P.ProfileFieldError,
     ["syscalls: must be an array, not an object"], None),
    ("rule type", dumps(base(syscalls=[FILLER, "read"])), P.ProfileFieldError,
     ["syscalls[1]: must be an object, not a string"], 1),
    ("unknown action",
     rules(FILLER, FILLER, FILLER, {"names": ["foo"], "action": "SCMP_ACT_FOO"}),
     P.ProfileFieldError, ["syscalls[3] (names: foo): unknown action 'SCMP_ACT_FOO'"], 3),
    ("missing action", rules({"names": ["foo"]}), P.ProfileFieldError,
     ["syscalls[0] (names: foo): action is missing"], 0),
    ("no names", rules(FILLER, {"action": "SCMP_ACT_ALLOW"}), P.ProfileFieldError,
     ["syscalls[1]: no syscall names"], 1),
    ("empty names", rules({"names": [], "action": "SCMP_ACT_ALLOW"}), P.ProfileFieldError,
     ["syscalls[0]: no syscall names"], 0),
    ("empty name", rules({"names": ["read", ""], "action": "SCMP_ACT_ALLOW"}),
     P.ProfileFieldError, ["syscalls[0].names[1] (names: read, ): empty syscall name"], 0),
    ("name type", rules({"names": ["read", 3], "action": "SCMP_ACT_ALLOW"}),
     P.ProfileFieldError, ["syscalls[0].names[1]: must be a string, not an integer"], 0),
    ("name and names", rules({"name": "read", "names": ["write"], "action": "SCMP_ACT_ALLOW"}),
     P.ProfileFieldError, ["syscalls[0]: name and names are both set"], 0),
    ("rule typo", rules(allow("read", errnoret=1)), P.ProfileFieldError,
     ["syscalls[0] (names: read): unknown rule field 'errnoret' (did you mean 'errnoRet'?)"], 0),
    ("errnoRet range",
     rules({"names": ["mount"], "action": "SCMP_ACT_ERRNO", "errnoRet": 65536}),
     P.ProfileFieldError,
     ["syscalls[0] (names: mount): errnoRet: 65536 is out of range (maximum 65535)"], 0),
    ("errnoRet negative",
     rules({"names": ["mount"], "action": "SCMP_ACT_ERRNO", "errnoRet": -1}),
     P.ProfileFieldError, ["syscalls[0] (names: mount): errnoRet: -1 is negative"], 0),
    ("errnoRet type",
     rules({"names": ["mount"], "action": "SCMP_ACT_ERRNO", "errnoRet": "EPERM"}),
     P.ProfileFieldError,
     ["syscalls[0] (names: mount): errnoRet: must be a non-negative integer, not a string"], 0),
    ("errnoRet with allow", rules(allow("read", errnoRet=1)), P.ProfileFieldError,
     ["syscalls[0] (names: read): errnoRet 1 has no effect with SCMP_ACT_ALLOW"], 0),
    ("errno label alone", rules({"names": ["mount"], "action": "SCMP_ACT_ERRNO",
                                 "errno": "ENOSYS"}),
     P.ProfileFieldError, ["syscalls[0] (names: mount): ENOSYS is only a label",
                           "set errnoRet: 38"], 0),
    ("args type", rules(allow("read", args={})), P.ProfileFieldError,
     ["syscalls[0] (names: read): args: must be an array, not an object"], 0),
    ("arg op", rules(FILLER, FILLER, allow("socket", args=[
        {"index": 0, "value": 16, "op": "SCMP_CMP_FOO"}])),
     P.ProfileFieldError, ["syscalls[2].args[0] (names: socket): unknown op 'SCMP_CMP_FOO'"], 2),
    ("arg op missing", rules(allow("socket", args=[{"index": 0, "value": 16}])),
     P.ProfileFieldError, ["syscalls[0].args[0] (names: socket): op is missing"], 0),
    ("arg index", rules(allow("socket", args=[{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}])),
     P.ProfileFieldError,
     ["syscalls[0].args[0] (names: socket): index: 6 is out of range (maximum 5)"], 0),
    ("arg value range", rules(allow("socket", args=[
        {"index": 0, "value": 2**64, "op": "SCMP_CMP_EQ"}])),
     P.ProfileFieldError, ["syscalls[0].args[0] (names: socket): value: 18446744073709551616 "
                           "is out of range (maximum 18446744073709551615)"], 0),
    ("arg value negative", rules(allow("socket", args=[
        {"index": 1, "value": 0, "op": "SCMP_CMP_EQ"},
        {"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}])),
     P.ProfileFieldError, ["syscalls[0].args[1] (names: socket): value: -1 is negative"], 0),
    ("arg valueTwo type", rules(allow("socket", args=[
        {"index": 0, "value": 1, "valueTwo": "1", "op": "SCMP_CMP_MASKED_EQ"}])),
     P.ProfileFieldError, ["syscalls[0].args[0] (names: socket): valueTwo: must be a "
                           "non-negative integer, not a string"], 0),
    ("arg field", rules(allow("socket", args=[{"index": 0, "val": 1, "op": "SCMP_CMP_EQ"}])),
     P.ProfileFieldError, ["syscalls[0].args[0] (names: socket): unknown args field 'val'"], 0),
    ("includes arch", rules(allow("read", includes={"arches": ["amd46"]})),
     P.ProfileFieldError,
     ["syscalls[0].includes.arches[0] (names: read): unknown architecture 'amd46'"], 0),
    ("excludes cap", rules(allow("read", excludes={"caps": ["CAP_SYS_ADMN"]})),
     P.ProfileFieldError,
     ["syscalls[0].excludes.caps[0] (names: read): unknown capability 'CAP_SYS_ADMN'"], 0),
    ("minKernel", rules(allow("read", includes={"minKernel": "4"})), P.ProfileFieldError,
     ["syscalls[0] (names: read): includes.minKernel: '4' is not a kernel version"], 0),
    ("minKernel type", rules(allow("read", includes={"minKernel": 4.8})), P.ProfileFieldError,
     ["syscalls[0] (names: read): includes.minKernel: must be a string"], 0),
    ("selector field", rules(allow("read", includes={"arch": ["amd64"]})), P.ProfileFieldError,
     ["syscalls[0] (names: read): unknown includes field 'arch'"], 0),
    ("notify without listener", rules({"names": ["mount"], "action": "SCMP_ACT_NOTIFY"}),
     P.ProfileFieldError, ["syscalls[0] (names: mount): SCMP_ACT_NOTIFY needs listenerPath"], 0),
]


@pytest.mark.parametrize(
    ("data", "error", "expected", "rule_index"),
    [pytest.param(d, e, x, i, id=name) for name, d, e, x, i in MALFORMED],
)
def test_malformed_profile_is_refused_with_a_specific_message(
    data: bytes, error: type[P.ProfileError], expected: list[str], rule_index: int | None
) -> None:
    with pytest.raises(error) as info:
        P.parse(data)
    for text in expected:
        assert text in str(info.value)
    assert info.value.rule_index == rule_index
    assert isinstance(info.value, ValueError)


def test_every_field_of_the_format_is_read() -> None:
    doc = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 38,
        "defaultErrno": "ENOSYS",
        "archMap": [
            {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]},
            {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": None},
        ],
        "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
        "listenerPath": "/run/seccomp-agent.sock",
        "listenerMetadata": "meta",
        "syscalls": [
            {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW", "comment": "io",
             "args": None, "includes": {}, "excludes": {}},
            {"name": "mount", "action": "SCMP_ACT_ERRNO", "errnoRet": 1, "errno": "EPERM"},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"},
                      {"index": 1, "value": 255, "valueTwo": 16, "op": "SCMP_CMP_MASKED_EQ"}]},
            {"names": ["bpf"], "action": "SCMP_ACT_ALLOW",
             "includes": {"caps": ["CAP_SYS_ADMIN"], "arches": ["amd64"], "minKernel": "4.8"},
             "excludes": {"caps": ["CAP_BPF"], "arches": ["x86"], "minKernel": "99.0"}},
            {"names": ["ioctl"], "action": "SCMP_ACT_NOTIFY"},
            {"names": ["ptrace"], "action": "SCMP_ACT_TRACE", "errnoRet": 5},
            {"names": ["kill"], "action": "SCMP_ACT_LOG"},
            {"names": ["reboot"], "action": "SCMP_ACT_KILL_PROCESS"},
        ],
    }
    p = P.parse(dumps(doc))
    assert p.default_action == "SCMP_ACT_ERRNO"
    assert p.default_errno_ret == 38
    assert p.arch_map == (
        P.ArchMapEntry("SCMP_ARCH_X86_64", ("SCMP_ARCH_X86",)),
        P.ArchMapEntry("SCMP_ARCH_AARCH64", ()),
    )
    assert p.flags == ("SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW")
    assert (p.listener_path, p.listener_metadata) == ("/run/seccomp-agent.sock", "meta")
    read, mount, pers, bpf, ioctl, ptrace, _, _ = p.syscalls
    assert read == P.Rule(names=("read", "write"), action="SCMP_ACT_ALLOW", comment="io", index=0)
    assert mount.names == ("mount",) and mount.errno_ret == 1 and mount.index == 1
    assert pers.args == (
        P.Condition(index=0, value=8, op="SCMP_CMP_EQ"),
        P.Condition(index=1, value=255, op="SCMP_CMP_MASKED_EQ", value_two=16),
    )
    assert bpf.includes == P.Selector(("amd64",), ("CAP_SYS_ADMIN",), (4, 8))
    assert bpf.excludes == P.Selector(("x86",), ("CAP_BPF",), (99, 0))
    assert ioctl.action == "SCMP_ACT_NOTIFY"
    assert ptrace.errno_ret == 5


def test_null_and_absent_fields_are_empty() -> None:
    p = P.parse(dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": None,
                       "architectures": None, "flags": None, "listenerPath": None}))
    assert p == P.Profile(default_action="SCMP_ACT_ALLOW")


# ---------------------------------------------------------------------------
# for_node: archMap and includes/excludes, as Docker and containers-common do

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
            P.NodeContext("amd64", (6, 1), P.DEFAULT_CAPABILITIES | {"CAP_SYS_ADMIN"}),
            ["r0", "r1", "r3", "r7", "r10"],
            id="amd64 +SYS_ADMIN",
        ),
        pytest.param(
            P.NodeContext("amd64", (6, 1), frozenset({"CAP_SYS_ADMIN", "CAP_BPF"})),
            ["r0", "r1", "r3", "r4", "r7", "r10"],
            id="amd64 SYS_ADMIN+BPF",
        ),
        pytest.param(
            P.NodeContext("amd64", (5, 4), frozenset({"CAP_BPF"})),
            ["r0", "r1", "r5", "r8"],
            id="amd64 5.4 BPF only",
        ),
        pytest.param(
            P.NodeContext("arm64", (5, 8)),
            ["r0", "r2", "r5", "r6", "r7", "r9"],
            id="arm64 5.8",
        ),
        pytest.param(
            P.NodeContext("x86", (3, 10), frozenset({"cap_sys_admin"})),
            ["r0", "r3", "r8", "r9"],
            id="x86 3.10 lower-case cap",
        ),
    ],
)
def test_includes_and_excludes_select_rules_for_the_node(
    node: P.NodeContext, selected: list[str]
) -> None:
    p = P.for_node(P.parse(rules(*GATED)), node)
    assert [r.names[0] for r in p.syscalls] == selected
    assert p.rule_indexes == tuple(int(n[1:]) for n in selected)
    assert all(r.includes.is_empty() and r.excludes.is_empty() for r in p.syscalls)


ARCH_MAP = [
    {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
    {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
    {"architecture": "SCMP_ARCH_S390X", "subArchitectures": ["SCMP_ARCH_S390"]},
]


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
    p = P.for_node(P.parse(rules(FILLER, archMap=ARCH_MAP)), P.NodeContext(arch, (6, 1)))
    assert p.architectures == expected
    assert p.arch_map == ()


def test_architectures_are_kept() -> None:
    doc = rules(FILLER, architectures=["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"])
    p = P.for_node(P.parse(doc), P.NodeContext("arm64", (6, 1)))
    assert p.architectures == ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86")


def test_node_context_reads_this_machine() -> None:
    node = P.node_context()
    if platform.machine() == "x86_64":
        assert node.arch == "amd64"
        assert node.native_arch == "SCMP_ARCH_X86_64" == P.native_arch()
    assert node.kernel == P.kernel_version(os.uname().release)
    assert node.caps == P.DEFAULT_CAPABILITIES
    assert len(P.DEFAULT_CAPABILITIES) == 14


@pytest.mark.parametrize(
    ("release", "version"),
    [("6.1.0-18-amd64", (6, 1)), ("5.15.153.1-microsoft-standard-WSL2", (5, 15)),
     ("4.18.0-513.el8.x86_64", (4, 18)), ("6.10", (6, 10)), ("6.8.0+", (6, 8))],
)
def test_kernel_version(release: str, version: tuple[int, int]) -> None:
    assert P.kernel_version(release) == version


def test_kernel_version_garbage() -> None:
    with pytest.raises(ValueError, match="cannot read a kernel version"):
        P.kernel_version("linux")


# ---------------------------------------------------------------------------
# to_nri


def test_to_nri_carries_every_field_and_errno_only_when_present() -> None:
    doc = base(
        defaultErrnoRet=38,
        architectures=["SCMP_ARCH_X86_64"],
        flags=["SECCOMP_FILTER_FLAG_LOG"],
        listenerPath="/run/agent.sock",
        listenerMetadata="m",
        syscalls=[
            allow("read", "write"),
            {"names": ["mount"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["umount2"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
            {"names": ["clone"], "action": "SCMP_ACT_ALLOW", "args": [
                {"index": 0, "value": 0x7E020000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
        ],
    )
    out = P.to_nri(P.for_node(P.parse(dumps(doc)), AMD64))
    expected = nri_pb2.LinuxSeccomp(
        default_action="SCMP_ACT_ERRNO",
        default_errno=nri_pb2.OptionalUInt32(value=38),
        architectures=["SCMP_ARCH_X86_64"],
        flags=["SECCOMP_FILTER_FLAG_LOG"],
        listener_path="/run/agent.sock",
        listener_metadata="m",
        syscalls=[
            nri_pb2.LinuxSyscall(names=["read", "write"], action="SCMP_ACT_ALLOW"),
            nri_pb2.LinuxSyscall(names=["mount"], action="SCMP_ACT_ERRNO"),
            nri_pb2.LinuxSyscall(names=["umount2"], action="SCMP_ACT_ERRNO",
                                 errno_ret=nri_pb2.OptionalUInt32(value=1)),
            nri_pb2.LinuxSyscall(names=["clone"], action="SCMP_ACT_ALLOW", args=[
                nri_pb2.LinuxSeccompArg(index=0, value=0x7E020000, value_two=0,
                                        op="SCMP_CMP_MASKED_EQ")]),
        ],
    )
    assert out == expected
    assert not out.syscalls[1].HasField("errno_ret")
    assert out.syscalls[2].HasField("errno_ret")


def test_to_nri_without_default_errno() -> None:
    out = P.to_nri(P.parse(rules(FILLER)))
    assert not out.HasField("default_errno")


def test_to_nri_refuses_an_unselected_profile() -> None:
    with pytest.raises(P.ProfileError, match=r"call for_node\(\) first"):
        P.to_nri(P.parse(rules(allow("read", includes={"caps": ["CAP_SYS_ADMIN"]}))))
    with pytest.raises(P.ProfileError, match=r"call for_node\(\) first"):
        P.to_nri(P.parse(rules(FILLER, archMap=ARCH_MAP)))


# ---------------------------------------------------------------------------
# compile_check and action_table with the real libseccomp


def policy_of(doc: dict[str, Any] | bytes, node: P.NodeContext = AMD64) -> nri_pb2.LinuxSeccomp:
    data = doc if isinstance(doc, bytes) else dumps(doc)
    return P.to_nri(P.for_node(P.parse(data), node))


X86_ARCHES = ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32")


def test_debian_profile_parses_selects_converts_and_compiles(debian_profile: bytes) -> None:
    parsed = P.parse(debian_profile)
    assert parsed.default_action == "SCMP_ACT_ERRNO"
    assert parsed.default_errno_ret == 38
    prepared = P.prepare(debian_profile, AMD64)
    assert prepared.policy.architectures == list(X86_ARCHES)
    report = prepared.report
    assert report.architectures == X86_ARCHES
    assert report.bpf_bytes == report.bpf_instructions * 8 > 0
    assert report.rules == len(prepared.policy.syscalls)
    assert report.unknown_syscalls == ()
    # every rule Debian gates on another architecture is gone
    kept = {n for r in prepared.profile.syscalls for n in r.names}
    assert {"arch_prctl", "modify_ldt"} <= kept
    assert not kept & {"s390_runtime_instr", "breakpoint", "set_tls", "sync_file_range2"}


def test_debian_profile_compiles_fast(debian_profile: bytes) -> None:
    policy = policy_of(debian_profile)
    P.compile_check(policy)
    best = min(P.compile_check(policy).seconds for _ in range(5))
    print(f"Debian default profile, 3 architectures: compiled in {best * 1000:.1f} ms")
    assert best < 0.1


@pytest.mark.parametrize(
    ("caps", "expected"),
    [
        pytest.param(
            P.DEFAULT_CAPABILITIES,
            {
                "bpf": ("SCMP_ACT_ERRNO", 1),
                "sethostname": ("SCMP_ACT_ERRNO", 1),
                "chroot": ("SCMP_ACT_ALLOW", None),  # CAP_SYS_CHROOT is a default
                "open_by_handle_at": ("SCMP_ACT_ERRNO", 1),
                "socket": ("SCMP_ACT_ALLOW", None),  # CAP_AUDIT_WRITE is a default
                "socket(a0=0x10, a2=0x9)": ("SCMP_ACT_ALLOW", None),
                "arch_prctl": ("SCMP_ACT_ALLOW", None),
                "read": ("SCMP_ACT_ALLOW", None),
                "personality": ("SCMP_ACT_ALLOW", None),
                "personality(a0=0x8)": ("SCMP_ACT_ALLOW", None),
                "personality(a0=0x1)": ("SCMP_ACT_ERRNO", 38),
                "kexec_load": ("SCMP_ACT_ERRNO", 1),
                "setns": ("SCMP_ACT_ALLOW", None),
            },
            id="default caps",
        ),
        pytest.param(
            P.DEFAULT_CAPABILITIES | {"CAP_SYS_ADMIN"},
            {"bpf": ("SCMP_ACT_ALLOW", None), "sethostname": ("SCMP_ACT_ALLOW", None),
             "chroot": ("SCMP_ACT_ALLOW", None)},
            id="+CAP_SYS_ADMIN",
        ),
        pytest.param(
            frozenset({"CAP_DAC_READ_SEARCH"}),
            {"bpf": ("SCMP_ACT_ERRNO", 1), "chroot": ("SCMP_ACT_ERRNO", 1),
             "open_by_handle_at": ("SCMP_ACT_ALLOW", None),
             # without CAP_AUDIT_WRITE: audit netlink sockets get EINVAL
             "socket": ("SCMP_ACT_ALLOW", None),
             "socket(a0=0x10, a2=0x9)": ("SCMP_ACT_ERRNO", 22),
             "socket(a0=0x10)": ("SCMP_ACT_ALLOW", None)},
            id="only CAP_DAC_READ_SEARCH",
        ),
    ],
)
def test_debian_rules_for_the_container_caps(
    debian_profile: bytes, caps: frozenset[str], expected: dict[str, tuple[str, int | None]]
) -> None:
    policy = policy_of(debian_profile, P.NodeContext("amd64", (6, 1), caps))
    table = P.action_table(policy, "SCMP_ARCH_X86_64")
    for key, action in expected.items():
        name, _, args = key.partition("(")
        call = dict(
            (int(a.split("=")[0].strip()[1:]), int(a.split("=")[1], 16))
            for a in args.rstrip(")").split(",")
            if args
        )
        assert P.action_for(policy, "SCMP_ARCH_X86_64", name, call) == action, key
        if key in table:
            assert table[key] == action, key
    assert "socketcall" not in table  # not a syscall of x86_64


def test_debian_arch_gated_rules(debian_profile: bytes) -> None:
    x86 = P.action_table(policy_of(debian_profile), "SCMP_ARCH_X86")
    assert x86["modify_ldt"] == ("SCMP_ACT_ALLOW", None)  # includes amd64, x32, x86
    assert x86["socketcall"] == ("SCMP_ACT_ALLOW", None)
    arm = policy_of(debian_profile, P.NodeContext("arm64", (6, 1)))
    assert arm.architectures == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    report = P.compile_check(arm)
    assert report.architectures == ("SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM")
    names = {n for sc in arm.syscalls for n in sc.names}
    assert {"breakpoint", "set_tls", "cacheflush"} <= names
    assert "arch_prctl" not in names and "modify_ldt" not in names
    table = P.action_table(arm, "SCMP_ARCH_ARM")
    assert table["set_tls"] == ("SCMP_ACT_ALLOW", None)
    assert table["breakpoint"] == ("SCMP_ACT_ALLOW", None)


def test_debian_duplicate_unconditional_rule_is_reported(debian_profile: bytes) -> None:
    # Debian lists setns both in its allow-list and, without CAP_SYS_ADMIN, in an
    # EPERM rule: libseccomp keeps the first, as runc gets it
    prepared = P.prepare(debian_profile, AMD64)
    assert any(
        "setns already has an unconditional rule (syscalls[1])" in w
        and w.startswith("syscalls[15]")
        for w in prepared.report.warnings
    )


def test_crio_blog_profile() -> None:
    prepared = P.prepare(dumps(CRIO_BLOG), AMD64)
    assert prepared.policy.default_action == "SCMP_ACT_ERRNO"
    assert prepared.policy.default_errno.value == 38
    assert prepared.report.architectures == X86_ARCHES
    table = P.action_table(prepared.policy, "SCMP_ARCH_X86_64")
    assert table["read"] == ("SCMP_ACT_ALLOW", None)
    assert table["mount"] == ("SCMP_ACT_ERRNO", 38)
    x86 = P.action_table(prepared.policy, "SCMP_ARCH_X86")
    # libseccomp routes x86's socketcall(SYS_SOCKET=1) to the socket rule
    assert x86["socketcall(a0=0x1)"] == ("SCMP_ACT_ALLOW", None)
    assert x86["socketcall(a0=0x2)"] == ("SCMP_ACT_ALLOW", None)  # bind
    assert x86["socketcall"] == ("SCMP_ACT_ERRNO", 38)
    assert x86["socketcall(a0=0xd)"] == ("SCMP_ACT_ERRNO", 38)  # shutdown: not allowed


UNKNOWN = rules(
    allow("read", includes={"arches": ["arm64"]}),  # dropped on amd64: indexes shift
    FILLER, FILLER, FILLER, FILLER, FILLER, FILLER,
    {"names": ["open", "opne"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
)


def test_unknown_syscall_is_refused_naming_rule_syscall_and_arch() -> None:
    with pytest.raises(P.UnknownSyscallError) as info:
        P.prepare(UNKNOWN, AMD64)
    msg = str(info.value)
    assert msg.startswith("syscalls[7] (names: open, opne): unknown syscall 'opne' for "
                          "SCMP_ARCH_X86_64")
    assert (info.value.rule_index, info.value.syscall) == (7, "opne")
    assert info.value.arch == "SCMP_ARCH_X86_64"
    # without origin, the index is the policy's
    with pytest.raises(P.UnknownSyscallError, match=r"^syscalls\[6\]"):
        P.compile_check(policy_of(UNKNOWN))


def test_unknown_syscall_can_be_skipped_with_a_warning() -> None:
    prepared = P.prepare(UNKNOWN, AMD64, unknown_syscalls="warn")
    assert prepared.report.unknown_syscalls == ("opne",)
    assert any("unknown syscall 'opne'" in w and "skipped" in w for w in prepared.report.warnings)
    table = P.action_table(prepared.policy, "SCMP_ARCH_X86_64")
    assert table["open"] == ("SCMP_ACT_ERRNO", 1)


def test_unknown_syscalls_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="'refuse' or 'warn'"):
        P.compile_check(policy_of(rules(FILLER)), unknown_syscalls="ignore")


def test_rule_equal_to_default_action_is_skipped() -> None:
    policy = policy_of(base(defaultErrnoRet=1, syscalls=[
        FILLER, {"names": ["mount"], "action": "SCMP_ACT_ERRNO"}]))
    report = P.compile_check(policy)
    assert (report.rules_added, report.rules_skipped) == (1, 1)
    # but ERRNO(38) is not the default ERRNO(1)
    policy = policy_of(base(defaultErrnoRet=1, syscalls=[
        {"names": ["mount"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]))
    assert P.compile_check(policy).rules_skipped == 0


def test_several_conditions_on_one_argument_become_separate_rules() -> None:
    policy = policy_of(base(syscalls=[allow("personality", args=[
        {"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
        {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"},
    ])]))
    report = P.compile_check(policy)
    assert report.rules_added == 2
    assert any("several conditions on one argument" in w for w in report.warnings)
    table = P.action_table(policy, "SCMP_ARCH_X86_64")
    assert table["personality"] == ("SCMP_ACT_ALLOW", None)
    assert table["personality(a0=0x8)"] == ("SCMP_ACT_ALLOW", None)
    assert table["personality(a0=0x1)"] == ("SCMP_ACT_ERRNO", 1)


def test_conditions_on_different_arguments_all_apply() -> None:
    policy = policy_of(base(syscalls=[allow("socket", args=[
        {"index": 0, "value": 16, "op": "SCMP_CMP_EQ"},
        {"index": 2, "value": 0xFF, "valueTwo": 9, "op": "SCMP_CMP_MASKED_EQ"},
    ])]))
    report = P.compile_check(policy)
    assert (report.rules_added, report.warnings) == (1, ())
    table = P.action_table(policy, "SCMP_ARCH_X86_64")
    assert table["socket(a0=0x10, a2=0x9)"] == ("SCMP_ACT_ALLOW", None)
    for args, action in [({0: 16, 2: 9}, "SCMP_ACT_ALLOW"), ({0: 16, 2: 0x109}, "SCMP_ACT_ALLOW"),
                         ({0: 16}, "SCMP_ACT_ERRNO"), ({2: 9}, "SCMP_ACT_ERRNO"),
                         ({0: 16 + 2**32, 2: 9}, "SCMP_ACT_ERRNO")]:
        assert P.action_for(policy, "SCMP_ARCH_X86_64", "socket", args)[0] == action, args


def test_first_unconditional_rule_wins_and_is_reported() -> None:
    policy = policy_of(base(syscalls=[
        allow("read"),
        {"names": ["read"], "action": "SCMP_ACT_KILL"},
        {"names": ["write"], "action": "SCMP_ACT_LOG", "args": [
            {"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]},
        {"names": ["write"], "action": "SCMP_ACT_TRAP"},
    ]))
    warnings = P.compile_check(policy).warnings
    assert warnings == (
        "syscalls[1] (names: read): read already has an unconditional rule (syscalls[0]); "
        "libseccomp keeps the first one",
        "syscalls[3] (names: write): unconditional rule for write replaces its conditional "
        "rules (syscalls[2])",
    )
    table = P.action_table(policy, "SCMP_ARCH_X86_64")
    assert table["read"] == ("SCMP_ACT_ALLOW", None)
    assert table["write"] == ("SCMP_ACT_TRAP", None)
    assert P.action_for(policy, "SCMP_ARCH_X86_64", "write", {0: 1}) == ("SCMP_ACT_TRAP", None)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda p: p.syscalls[0].errno_ret.__setattr__("value", 70000),
         "syscalls[0] (names: mount): errnoRet 70000 is out of range (maximum 65535)"),
        (lambda p: p.default_errno.__setattr__("value", 65536),
         "defaultErrnoRet: 65536 is out of range"),
        (lambda p: p.syscalls[0].__setattr__("action", "SCMP_ACT_FOO"),
         "syscalls[0] (names: mount): unknown action 'SCMP_ACT_FOO'"),
        (lambda p: p.syscalls[0].args.add(index=6, op="SCMP_CMP_EQ"),
         "syscalls[0].args[0] (names: mount): index 6 is out of range (maximum 5)"),
        (lambda p: p.syscalls[0].args.add(index=0, op="SCMP_CMP_FOO"),
         "syscalls[0].args[0] (names: mount): unknown op 'SCMP_CMP_FOO'"),
        (lambda p: p.architectures.append("SCMP_ARCH_LOONGARCH64"),
         "architecture SCMP_ARCH_LOONGARCH64 is not supported by libseccomp 2."),
        (lambda p: p.architectures.append("SCMP_ARCH_Z80"), "unknown architecture 'SCMP_ARCH_Z80'"),
        (lambda p: p.__setattr__("default_action", ""), "policy has no default action"),
    ],
)
def test_compile_check_refuses_a_bad_policy(mutate: Any, expected: str) -> None:
    # policies also come from elsewhere than parse(): the checks are repeated
    policy = nri_pb2.LinuxSeccomp(default_action="SCMP_ACT_ALLOW", syscalls=[
        nri_pb2.LinuxSyscall(names=["mount"], action="SCMP_ACT_ERRNO",
                             errno_ret=nri_pb2.OptionalUInt32(value=1))])
    policy.default_errno.value = 1
    policy.ClearField("default_errno")
    if "defaultErrnoRet" in expected:
        policy.default_action = "SCMP_ACT_ERRNO"
        policy.default_errno.value = 1
    mutate(policy)
    with pytest.raises(P.CompileError) as info:
        P.compile_check(policy)
    assert expected in str(info.value)


def masked(index: int, i: int) -> dict[str, Any]:
    return {"index": index, "value": 0xFF00 + i, "valueTwo": i, "op": "SCMP_CMP_MASKED_EQ"}


def test_a_filter_too_long_for_the_kernel_is_refused() -> None:
    names = P.known_syscalls("SCMP_ARCH_X86_64")
    policy = policy_of(base(architectures=list(X86_ARCHES), syscalls=[
        *(allow(n, args=[masked(0, i)]) for i, n in enumerate(names)),
        *({"names": [n], "action": "SCMP_ACT_LOG", "args": [masked(1, i)]}
          for i, n in enumerate(names[:40])),
    ]))
    with pytest.raises(P.CompileError, match=r"^the filter has 4\d{3} BPF instructions for "
                       r"SCMP_ARCH_X86_64, SCMP_ARCH_X86, SCMP_ARCH_X32; the kernel accepts "
                       r"at most 4096$"):
        P.compile_check(policy)


def test_a_filter_certainly_too_long_is_refused_before_libseccomp() -> None:
    # libseccomp takes seconds on such input: the bound answers at once
    policy = policy_of(base(architectures=list(X86_ARCHES), syscalls=[
        allow(name, args=[{"index": a, "value": i + 1, "op": "SCMP_CMP_EQ"} for a in range(3)])
        for i, name in enumerate(P.known_syscalls("SCMP_ARCH_X86_64"))
    ]))
    started = time.perf_counter()
    with pytest.raises(P.CompileError, match=r"would have at least .* the kernel accepts at most"):
        P.compile_check(policy)
    assert time.perf_counter() - started < 0.5


def test_compile_check_never_loads_the_filter() -> None:
    # a KILL default would end this test process if the filter were loaded
    report = P.compile_check(policy_of({"defaultAction": "SCMP_ACT_KILL_PROCESS"}))
    assert report.bpf_instructions > 0
    assert Path("/proc/self/status").read_text().count("Seccomp:\t0") == 1


def test_known_syscalls() -> None:
    x86_64 = P.known_syscalls("SCMP_ARCH_X86_64")
    x86 = P.known_syscalls("SCMP_ARCH_X86")
    assert {"read", "openat", "clone3", "arch_prctl"} <= set(x86_64)
    assert "socketcall" not in x86_64 and "socketcall" in x86
    assert {"set_tls", "breakpoint"} <= set(P.known_syscalls("SCMP_ARCH_ARM"))
    assert "read" in P.known_syscalls("SCMP_ARCH_X32")
    assert len(x86_64) > 300 and len(x86) > 300
    assert list(x86_64) == sorted(x86_64)


def test_action_table_keys_and_probe_with(debian_profile: bytes) -> None:
    debian = policy_of(debian_profile)
    blog = policy_of(CRIO_BLOG)
    alone = P.action_table(blog, "SCMP_ARCH_X86_64")
    assert "personality(a0=0x8)" not in alone
    a = P.action_table(blog, "SCMP_ARCH_X86_64", probe_with=[debian])
    b = P.action_table(debian, "SCMP_ARCH_X86_64", probe_with=[blog])
    assert a.keys() == b.keys()
    assert a["personality(a0=0x8)"] == ("SCMP_ACT_ERRNO", 38)
    assert b["personality(a0=0x8)"] == ("SCMP_ACT_ALLOW", None)
    with pytest.raises(ValueError, match="not an architecture of the policy"):
        P.action_table(blog, "SCMP_ARCH_AARCH64")


def test_action_table_is_fast(debian_profile: bytes) -> None:
    policy = policy_of(debian_profile)
    P.clear_caches()
    started = time.perf_counter()
    for arch in X86_ARCHES:
        P.action_table(policy, arch)
    elapsed = time.perf_counter() - started
    print(f"Debian default profile: action tables for 3 architectures in {elapsed * 1000:.0f} ms")
    assert elapsed < 2.0


def test_describe_action() -> None:
    assert P.describe_action(0x00050026) == ("SCMP_ACT_ERRNO", 38)
    assert P.describe_action(0x7FF00005) == ("SCMP_ACT_TRACE", 5)
    assert P.describe_action(0x7FFF0000) == ("SCMP_ACT_ALLOW", None)
    assert P.describe_action(0x80000000) == ("SCMP_ACT_KILL_PROCESS", None)
    assert P.action_of("SCMP_ACT_ERRNO", None) == ("SCMP_ACT_ERRNO", 1)
    assert P.action_of("SCMP_ACT_KILL", None) == ("SCMP_ACT_KILL_THREAD", None)


def test_the_profile_can_be_fetched_from_the_package_archive(tmp_path: Path) -> None:
    # the fixture's fallback when containers-common is not installed
    data = fetch_debian_profile(tmp_path)
    assert P.parse(data).default_errno_ret == 38
    if SYSTEM_PROFILE.exists():
        assert data == SYSTEM_PROFILE.read_bytes()
