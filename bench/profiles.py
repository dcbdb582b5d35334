"""Profiles the benchmarks push: small ones (distinct per seed), Debian's default, and one
just under CRI-O's 1 MiB cap."""

from __future__ import annotations

import json
import subprocess
import tempfile
from functools import cache
from pathlib import Path

DEBIAN_PROFILE = Path("/usr/share/containers/seccomp.json")
ALLOW = (  # noqa: SIM905 (a sentence of names reads better than a list)
    "read write openat close fstat newfstatat lseek mmap mprotect munmap brk rt_sigaction "
    "rt_sigprocmask ioctl pread64 pwrite64 readv writev access pipe select sched_yield "
    "mremap madvise dup dup2 nanosleep getpid socket connect accept sendto recvfrom "
    "exit exit_group futex clone execve wait4 kill uname fcntl getcwd chdir getuid getgid"
).split()
MAX_BYTES = 1024 * 1024


def small_profile(seed: int) -> bytes:
    """A small realistic profile; ``seed`` makes its bytes (and digest) unique."""
    return json.dumps({
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ALLOW, "action": "SCMP_ACT_ALLOW"},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": seed, "op": "SCMP_CMP_EQ"}]},
        ],
    }).encode()


@cache
def debian_default_profile() -> bytes:
    """containers-common's default profile (472 rules), from the Debian package."""
    if DEBIAN_PROFILE.exists():
        return DEBIAN_PROFILE.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "golang-github-containers-common"], cwd=tmp,
                       check=True, capture_output=True)
        deb = next(Path(tmp).glob("*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp + "/x"], check=True)
        return (Path(tmp) / "x" / DEBIAN_PROFILE.relative_to("/")).read_bytes()


@cache
def large_profile() -> bytes:
    """Just under 1 MiB that still fits the kernel's 4096-instruction filter: Debian's
    rules, each with a long ``comment`` (as heavily documented profiles have)."""
    base = json.loads(debian_default_profile())
    rules = base["syscalls"]
    empty = len(json.dumps(base | {"syscalls": [r | {"comment": ""} for r in rules]}).encode())
    per_rule = (MAX_BYTES - 64 - empty) // len(rules)
    text = ("This rule is documented at length for auditors. " * (per_rule // 48 + 1))[:per_rule]
    data = json.dumps(base | {"syscalls": [r | {"comment": text} for r in rules]}).encode()
    assert MAX_BYTES - 1024 < len(data) <= MAX_BYTES, len(data)
    return data


def blog_profile(seed: int) -> bytes:
    """The CRI-O blog's shape (ENOSYS default, an allow-list, archMap for x86_64); ``seed``
    makes its digest unique without changing what it allows."""
    return json.dumps({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 38,
        "archMap": [{"architecture": "SCMP_ARCH_X86_64",
                     "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]}],
        "syscalls": [{"names": ALLOW, "action": "SCMP_ACT_ALLOW", "comment": f"variant {seed}"}],
    }).encode()


def debian_variant(seed: int) -> bytes:
    """Debian's default profile with a comment that makes its digest unique."""
    data = json.loads(debian_default_profile())
    data["syscalls"][0]["comment"] = f"variant {seed}"
    return json.dumps(data).encode()
