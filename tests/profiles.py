"""Profiles the seccomp tests share: Debian's default, the CRI-O blog's, and builders.

Debian's default profile comes from the golang-github-containers-common package,
which the setup step installs (``make deps``); no test downloads anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nri_seccomp.nri.pb import nri_pb2
from nri_seccomp.seccomp import model, nri, parse, select

SYSTEM_PROFILE = Path("/usr/share/containers/seccomp.json")
AMD64 = model.NodeContext(arch="amd64", kernel=(6, 1))


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


ARCH_MAP = [
    {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
    {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
    {"architecture": "SCMP_ARCH_S390X", "subArchitectures": ["SCMP_ARCH_S390"]},
]


def policy_of(doc: dict[str, Any] | bytes, node: model.NodeContext = AMD64) -> nri_pb2.LinuxSeccomp:
    data = doc if isinstance(doc, bytes) else dumps(doc)
    return nri.to_nri(select.for_node(parse.parse(data), node))


X86_ARCHES = ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32")
