"""prepare: parse → for_node → normalise → check_limits → to_nri → compile_check,
on Debian's and the CRI-O blog's profiles, with messages pointing into the profile.
"""

from __future__ import annotations

import pytest

from nri_seccomp.seccomp import bpf, libseccomp, model, parse, prepare
from tests.profiles import (
    AMD64,
    CRIO_BLOG,
    FILLER,
    X86_ARCHES,
    allow,
    dumps,
    policy_of,
    rules,
)


def test_debian_profile_parses_selects_converts_and_compiles(debian_profile: bytes) -> None:
    parsed = parse.parse(debian_profile)
    assert parsed.default_action == "SCMP_ACT_ERRNO"
    assert parsed.default_errno_ret == 38
    prepared = prepare.prepare(debian_profile, AMD64)
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


def test_debian_duplicate_unconditional_rule_is_reported(debian_profile: bytes) -> None:
    # Debian lists setns both in its allow-list and, without CAP_SYS_ADMIN, in an
    # EPERM rule: libseccomp keeps the first, as runc gets it
    prepared = prepare.prepare(debian_profile, AMD64)
    assert any(
        "setns already has an unconditional rule (syscalls[1])" in w
        and w.startswith("syscalls[15]")
        for w in prepared.report.warnings
    )


def test_crio_blog_profile() -> None:
    prepared = prepare.prepare(dumps(CRIO_BLOG), AMD64)
    assert prepared.policy.default_action == "SCMP_ACT_ERRNO"
    assert prepared.policy.default_errno.value == 38
    assert prepared.report.architectures == X86_ARCHES
    table = bpf.action_table(prepared.policy, "SCMP_ARCH_X86_64")
    assert table["read"] == ("SCMP_ACT_ALLOW", None)
    assert table["mount"] == ("SCMP_ACT_ERRNO", 38)
    x86 = bpf.action_table(prepared.policy, "SCMP_ARCH_X86")
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
    with pytest.raises(model.UnknownSyscallError) as info:
        prepare.prepare(UNKNOWN, AMD64)
    msg = str(info.value)
    assert msg.startswith("syscalls[7] (names: open, opne): unknown syscall 'opne' for "
                          "SCMP_ARCH_X86_64")
    assert (info.value.rule_index, info.value.syscall) == (7, "opne")
    assert info.value.arch == "SCMP_ARCH_X86_64"
    # without origin, the index is the policy's
    with pytest.raises(model.UnknownSyscallError, match=r"^syscalls\[6\]"):
        libseccomp.compile_check(policy_of(UNKNOWN))


def test_unknown_syscall_can_be_skipped_with_a_warning() -> None:
    prepared = prepare.prepare(UNKNOWN, AMD64, unknown_syscalls="warn")
    assert prepared.report.unknown_syscalls == ("opne",)
    assert any("unknown syscall 'opne'" in w and "skipped" in w for w in prepared.report.warnings)
    table = bpf.action_table(prepared.policy, "SCMP_ARCH_X86_64")
    assert table["open"] == ("SCMP_ACT_ERRNO", 1)
