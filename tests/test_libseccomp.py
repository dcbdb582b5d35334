"""compile_check with the real libseccomp: the rules it is given, the rules it
refuses or skips, the filter's length, and the syscall tables it knows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nri_seccomp.nri.pb import nri_pb2
from nri_seccomp.seccomp import bpf, libseccomp, model
from tests.profiles import (
    FILLER,
    X86_ARCHES,
    allow,
    base,
    policy_of,
    rules,
)


def test_unknown_syscalls_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="'refuse' or 'warn'"):
        libseccomp.compile_check(policy_of(rules(FILLER)), unknown_syscalls="ignore")


def test_rule_equal_to_default_action_is_skipped() -> None:
    policy = policy_of(base(defaultErrnoRet=1, syscalls=[
        FILLER, {"names": ["mount"], "action": "SCMP_ACT_ERRNO"}]))
    report = libseccomp.compile_check(policy)
    assert (report.rules_added, report.rules_skipped) == (1, 1)
    # but ERRNO(38) is not the default ERRNO(1)
    policy = policy_of(base(defaultErrnoRet=1, syscalls=[
        {"names": ["mount"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]))
    assert libseccomp.compile_check(policy).rules_skipped == 0


def test_several_conditions_on_one_argument_become_separate_rules() -> None:
    policy = policy_of(base(syscalls=[allow("personality", args=[
        {"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
        {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"},
    ])]))
    report = libseccomp.compile_check(policy)
    assert report.rules_added == 2
    assert any("several conditions on one argument" in w for w in report.warnings)
    table = bpf.action_table(policy, "SCMP_ARCH_X86_64")
    assert table["personality"] == ("SCMP_ACT_ALLOW", None)
    assert table["personality(a0=0x8)"] == ("SCMP_ACT_ALLOW", None)
    assert table["personality(a0=0x1)"] == ("SCMP_ACT_ERRNO", 1)


def test_conditions_on_different_arguments_all_apply() -> None:
    policy = policy_of(base(syscalls=[allow("socket", args=[
        {"index": 0, "value": 16, "op": "SCMP_CMP_EQ"},
        {"index": 2, "value": 0xFF, "valueTwo": 9, "op": "SCMP_CMP_MASKED_EQ"},
    ])]))
    report = libseccomp.compile_check(policy)
    assert (report.rules_added, report.warnings) == (1, ())
    table = bpf.action_table(policy, "SCMP_ARCH_X86_64")
    assert table["socket(a0=0x10, a2=0x9)"] == ("SCMP_ACT_ALLOW", None)
    for args, action in [({0: 16, 2: 9}, "SCMP_ACT_ALLOW"), ({0: 16, 2: 0x109}, "SCMP_ACT_ALLOW"),
                         ({0: 16}, "SCMP_ACT_ERRNO"), ({2: 9}, "SCMP_ACT_ERRNO"),
                         ({0: 16 + 2**32, 2: 9}, "SCMP_ACT_ERRNO")]:
        assert bpf.action_for(policy, "SCMP_ARCH_X86_64", "socket", args)[0] == action, args


def test_first_unconditional_rule_wins_and_is_reported() -> None:
    policy = policy_of(base(syscalls=[
        allow("read"),
        {"names": ["read"], "action": "SCMP_ACT_KILL"},
        {"names": ["write"], "action": "SCMP_ACT_LOG", "args": [
            {"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]},
        {"names": ["write"], "action": "SCMP_ACT_TRAP"},
    ]))
    warnings = libseccomp.compile_check(policy).warnings
    assert warnings == (
        "syscalls[1] (names: read): read already has an unconditional rule (syscalls[0]); "
        "libseccomp keeps the first one",
        "syscalls[3] (names: write): unconditional rule for write replaces its conditional "
        "rules (syscalls[2])",
    )
    table = bpf.action_table(policy, "SCMP_ARCH_X86_64")
    assert table["read"] == ("SCMP_ACT_ALLOW", None)
    assert table["write"] == ("SCMP_ACT_TRAP", None)
    assert bpf.action_for(policy, "SCMP_ARCH_X86_64", "write", {0: 1}) == ("SCMP_ACT_TRAP", None)


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
    with pytest.raises(model.CompileError) as info:
        libseccomp.compile_check(policy)
    assert expected in str(info.value)


def masked(index: int, i: int) -> dict[str, Any]:
    return {"index": index, "value": 0xFF00 + i, "valueTwo": i, "op": "SCMP_CMP_MASKED_EQ"}


def test_a_filter_too_long_for_the_kernel_is_refused() -> None:
    names = libseccomp.known_syscalls("SCMP_ARCH_X86_64")
    policy = policy_of(base(architectures=list(X86_ARCHES), syscalls=[
        *(allow(n, args=[masked(0, i)]) for i, n in enumerate(names)),
        *({"names": [n], "action": "SCMP_ACT_LOG", "args": [masked(1, i)]}
          for i, n in enumerate(names[:40])),
    ]))
    with pytest.raises(model.CompileError, match=r"^the filter has 4\d{3} BPF instructions for "
                       r"SCMP_ARCH_X86_64, SCMP_ARCH_X86, SCMP_ARCH_X32; the kernel accepts "
                       r"at most 4096$"):
        libseccomp.compile_check(policy)


def test_a_filter_certainly_too_long_is_refused_before_libseccomp() -> None:
    # libseccomp takes seconds on such input; this message comes from the pre-check,
    # which runs before libseccomp is called
    policy = policy_of(base(architectures=list(X86_ARCHES), syscalls=[
        allow(name, args=[{"index": a, "value": i + 1, "op": "SCMP_CMP_EQ"} for a in range(3)])
        for i, name in enumerate(libseccomp.known_syscalls("SCMP_ARCH_X86_64"))
    ]))
    with pytest.raises(model.CompileError,
                       match=r"would have at least .* the kernel accepts at most"):
        libseccomp.compile_check(policy)


def test_compile_check_never_loads_the_filter() -> None:
    # a KILL default would end this test process if the filter were loaded
    report = libseccomp.compile_check(policy_of({"defaultAction": "SCMP_ACT_KILL_PROCESS"}))
    assert report.bpf_instructions > 0
    assert Path("/proc/self/status").read_text().count("Seccomp:\t0") == 1


def test_known_syscalls() -> None:
    x86_64 = libseccomp.known_syscalls("SCMP_ARCH_X86_64")
    x86 = libseccomp.known_syscalls("SCMP_ARCH_X86")
    assert {"read", "openat", "clone3", "arch_prctl"} <= set(x86_64)
    assert "socketcall" not in x86_64 and "socketcall" in x86
    assert {"set_tls", "breakpoint"} <= set(libseccomp.known_syscalls("SCMP_ARCH_ARM"))
    assert "read" in libseccomp.known_syscalls("SCMP_ARCH_X32")
    assert len(x86_64) > 300 and len(x86) > 300
    assert list(x86_64) == sorted(x86_64)
