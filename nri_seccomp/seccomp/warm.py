"""The syscall tables of this node's architectures, built in the compile workers' fork server.

Imported only by the worker pool's fork server (``worker.PRELOAD``): the tables
are built there once and every worker forked from it, a replacement for a killed
one included, starts with them, instead of its first profile paying ~10 ms per
architecture. A profile for x86_64 usually also names x86 and x32 (Docker's and
CRI-O's archMap), one for aarch64 names arm.
"""

from __future__ import annotations

from nri_seccomp.seccomp import libseccomp

#: the architectures a profile for the native one usually lists beside it
COMPANIONS = {
    "SCMP_ARCH_X86_64": ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"),
    "SCMP_ARCH_AARCH64": ("SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"),
}

_native = libseccomp.native_arch()
for _arch in COMPANIONS.get(_native, (_native,)):
    libseccomp.known_syscalls(_arch)
