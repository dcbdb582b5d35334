"""The OCI runtime-spec's seccomp names and the numbers libseccomp gives them.

Actions, comparison operators, filter flags, architectures (with the names
``includes``/``excludes`` use and the AUDIT_ARCH value the kernel reports),
capabilities, and the bounds a value must keep to mean what it says
(``errnoRet`` is 16 bits for libseccomp: 65536 would become 0, a success).
``action_value``/``describe_action`` turn an (action, errno) pair into the
seccomp return value and back, so every later stage compares actions as the
filter does. Every other module of this package builds on these names; this one
imports none of them.
"""

from __future__ import annotations

import errno as errno_mod
from collections.abc import Mapping
from dataclasses import dataclass

import pyseccomp

ACTIONS: Mapping[str, int] = {
    "SCMP_ACT_KILL": pyseccomp.KILL_THREAD,
    "SCMP_ACT_KILL_THREAD": pyseccomp.KILL_THREAD,
    "SCMP_ACT_KILL_PROCESS": pyseccomp.KILL_PROCESS,
    "SCMP_ACT_TRAP": pyseccomp.TRAP,
    "SCMP_ACT_ERRNO": 0x00050000,
    "SCMP_ACT_TRACE": 0x7FF00000,
    "SCMP_ACT_ALLOW": pyseccomp.ALLOW,
    "SCMP_ACT_LOG": pyseccomp.LOG,
    "SCMP_ACT_NOTIFY": pyseccomp.NOTIFY,
}
#: actions whose 16-bit data is the errnoRet; runc uses EPERM when it is absent
ERRNO_ACTIONS = frozenset({"SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"})
EPERM = errno_mod.EPERM

OPS: Mapping[str, int] = {
    "SCMP_CMP_NE": pyseccomp.NE,
    "SCMP_CMP_LT": pyseccomp.LT,
    "SCMP_CMP_LE": pyseccomp.LE,
    "SCMP_CMP_EQ": pyseccomp.EQ,
    "SCMP_CMP_GE": pyseccomp.GE,
    "SCMP_CMP_GT": pyseccomp.GT,
    "SCMP_CMP_MASKED_EQ": pyseccomp.MASKED_EQ,
}

FLAGS = frozenset(
    {
        "SECCOMP_FILTER_FLAG_TSYNC",
        "SECCOMP_FILTER_FLAG_LOG",
        "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
        "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
    }
)

_A = pyseccomp.Arch


@dataclass(frozen=True)
class ArchInfo:
    scmp: str
    #: the name ``includes``/``excludes`` use (libseccomp-golang's, as Docker's profile does)
    docker: str
    #: libseccomp's token; None when this libseccomp (2.5.x) has no such architecture
    token: int | None
    #: the AUDIT_ARCH value the kernel puts in seccomp_data.arch (x32 shares x86_64's)
    audit: int | None
    #: argument width libseccomp compares (x32 and the MIPS n32 ABIs are 32-bit)
    bits: int = 64


ARCHES: Mapping[str, ArchInfo] = {
    a.scmp: a
    for a in (
        ArchInfo("SCMP_ARCH_X86", "x86", _A.X86, _A.X86, 32),
        ArchInfo("SCMP_ARCH_X86_64", "amd64", _A.X86_64, _A.X86_64),
        ArchInfo("SCMP_ARCH_X32", "x32", _A.X32, _A.X86_64, 32),
        ArchInfo("SCMP_ARCH_ARM", "arm", _A.ARM, _A.ARM, 32),
        ArchInfo("SCMP_ARCH_AARCH64", "arm64", _A.AARCH64, _A.AARCH64),
        ArchInfo("SCMP_ARCH_MIPS", "mips", _A.MIPS, _A.MIPS, 32),
        ArchInfo("SCMP_ARCH_MIPS64", "mips64", _A.MIPS64, _A.MIPS64),
        ArchInfo("SCMP_ARCH_MIPS64N32", "mips64n32", _A.MIPS64N32, _A.MIPS64N32, 32),
        ArchInfo("SCMP_ARCH_MIPSEL", "mipsel", _A.MIPSEL, _A.MIPSEL, 32),
        ArchInfo("SCMP_ARCH_MIPSEL64", "mipsel64", _A.MIPSEL64, _A.MIPSEL64),
        ArchInfo("SCMP_ARCH_MIPSEL64N32", "mipsel64n32", _A.MIPSEL64N32, _A.MIPSEL64N32, 32),
        ArchInfo("SCMP_ARCH_PPC", "ppc", _A.PPC, _A.PPC, 32),
        ArchInfo("SCMP_ARCH_PPC64", "ppc64", _A.PPC64, _A.PPC64),
        ArchInfo("SCMP_ARCH_PPC64LE", "ppc64le", _A.PPC64LE, _A.PPC64LE),
        ArchInfo("SCMP_ARCH_S390", "s390", _A.S390, _A.S390, 32),
        ArchInfo("SCMP_ARCH_S390X", "s390x", _A.S390X, _A.S390X),
        ArchInfo("SCMP_ARCH_PARISC", "parisc", _A.PARISC, _A.PARISC, 32),
        ArchInfo("SCMP_ARCH_PARISC64", "parisc64", _A.PARISC64, _A.PARISC64),
        ArchInfo("SCMP_ARCH_RISCV64", "riscv64", _A.RISCV64, _A.RISCV64),
        # in the runtime spec, unknown to libseccomp 2.5.4: parse, refuse to compile
        ArchInfo("SCMP_ARCH_LOONGARCH64", "loong64", None, None),
        ArchInfo("SCMP_ARCH_M68K", "m68k", None, None),
        ArchInfo("SCMP_ARCH_SH", "sh", None, None),
        ArchInfo("SCMP_ARCH_SHEB", "sheb", None, None),
    )
}
DOCKER_ARCHES = frozenset(a.docker for a in ARCHES.values())
BY_DOCKER = {a.docker: a for a in ARCHES.values()}


#: Linux capabilities (through 5.9), for typo checks in includes/excludes
CAPABILITIES = frozenset(
    "CAP_" + c
    for c in (
        "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
        "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
        "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
        "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
        "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
        "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
        "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
    )
)

#: containerd's default capability set for a container (what a pod without
#: securityContext.capabilities gets); rules gated on ``caps`` are chosen with it
DEFAULT_CAPABILITIES = frozenset(
    {
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    }
)

MAX_ERRNO_RET = 0xFFFF  # libseccomp keeps 16 bits: 65536 would become 0, a success
MAX_ARG_INDEX = 5
MAX_U64 = 2**64 - 1
#: the kernel refuses a longer seccomp filter (BPF_MAXINSNS), at container start
MAX_BPF_INSTRUCTIONS = 4096


def action_value(action: str, errno_ret: int | None) -> int:
    """The seccomp return value of a rule: ERRNO/TRACE carry the errno, EPERM if absent."""
    base = ACTIONS[action]
    if action in ERRNO_ACTIONS:
        return base | ((EPERM if errno_ret is None else errno_ret) & 0xFFFF)
    return base


def action_of(action: str, errno_ret: int | None) -> tuple[str, int | None]:
    """The (action, errno) a rule has once applied: errno only for ERRNO/TRACE, EPERM if absent."""
    return describe_action(action_value(action, errno_ret))


def describe_action(ret: int) -> tuple[str, int | None]:
    """A seccomp return value as (SCMP_ACT_… name, errno or None)."""
    full = ret & 0xFFFF0000
    data = ret & 0xFFFF
    names = {
        0x80000000: "SCMP_ACT_KILL_PROCESS",
        0x00000000: "SCMP_ACT_KILL_THREAD",
        0x00030000: "SCMP_ACT_TRAP",
        0x00050000: "SCMP_ACT_ERRNO",
        0x7FC00000: "SCMP_ACT_NOTIFY",
        0x7FF00000: "SCMP_ACT_TRACE",
        0x7FFC0000: "SCMP_ACT_LOG",
        0x7FFF0000: "SCMP_ACT_ALLOW",
    }
    name = names.get(full, f"unknown({ret:#x})")
    return name, (data if name in ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE") else None)
