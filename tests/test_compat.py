"""Errno translation per runtime: the exact meaning of the profile, or a refusal.

"Exact" is checked the way the runtime would see it: the translated policy is
applied as the declared runtime applies it (``default_errno`` dropped, so EPERM;
``errno_ret`` absent means EPERM), compiled with libseccomp, and its filter is
compared with the original profile's for every syscall libseccomp knows, on every
architecture, at every argument value either filter distinguishes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from nri_seccomp.nri.pb import nri_pb2
from nri_seccomp.seccomp import bpf, libseccomp, model, prepare, vocabulary
from nri_seccomp.seccomp import compat as C
from tests.profiles import CRIO_BLOG


@dataclass(frozen=True)
class Caps:
    errno_ret_safe: bool
    keeps_default_errno: bool
    description: str


CONTAINERD_224 = Caps(False, False, "containerd 2.2.4 (NRI v0.11.0)")
CONTAINERD_230 = Caps(True, False, "containerd 2.3.0 (NRI v0.12.0)")
FIXED = Caps(True, True, "a runtime that keeps default_errno")
RUNTIMES = {"2.2.4": CONTAINERD_224, "2.3.0": CONTAINERD_230}

#: EPERM everywhere: the default, explicit errnoRet 1, errnoRet left out, with args
ALL_EPERM: dict[str, Any] = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "archMap": CRIO_BLOG["archMap"],
    "syscalls": [
        {"names": ["read", "write", "close", "exit_group", "futex", "mmap", "brk",
                   "rt_sigreturn", "socket", "connect"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["mount", "umount2"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
        {"names": ["ptrace"], "action": "SCMP_ACT_ERRNO"},
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
        {"names": ["kill"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
         "args": [{"index": 1, "value": 9, "op": "SCMP_CMP_EQ"}]},
        {"names": ["kill"], "action": "SCMP_ACT_ALLOW"},
    ],
}


def prepared(doc: dict[str, Any] | bytes, caps: frozenset[str] = vocabulary.DEFAULT_CAPABILITIES
             ) -> prepare.Prepared:
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return prepare.prepare(data, model.NodeContext("amd64", (6, 1), caps))


def policy_of(doc: dict[str, Any] | bytes) -> nri_pb2.LinuxSeccomp:
    return prepared(doc).policy


@pytest.fixture(scope="module")
def prepared_profiles(debian_profile: bytes) -> dict[str, prepare.Prepared]:
    return {
        "crio-blog": prepared(CRIO_BLOG),
        "debian": prepared(debian_profile),
        # without CAP_AUDIT_WRITE Debian's socket rule with errnoRet 22 applies
        "debian-no-audit-write": prepared(debian_profile, frozenset({"CAP_CHOWN"})),
        "all-eperm": prepared(ALL_EPERM),
    }


@pytest.fixture(scope="module")
def profiles(prepared_profiles: dict[str, prepare.Prepared]) -> dict[str, nri_pb2.LinuxSeccomp]:
    return {name: p.policy for name, p in prepared_profiles.items()}


def has_errno_ret(policy: nri_pb2.LinuxSeccomp) -> bool:
    return any(sc.HasField("errno_ret") for sc in policy.syscalls)


#: (profile, runtime) → None when the exact meaning is kept, else the refusal's text
EXPECTED: dict[tuple[str, str], list[str] | None] = {
    ("crio-blog", "2.2.4"): [
        "defaultErrnoRet 38 (ENOSYS) cannot be kept on containerd 2.2.4 (NRI v0.11.0): its NRI "
        "drops default_errno",
    ],
    # an explicit ERRNO(38) rule over every unnamed syscall; socketcall and ipc on x86
    # get argument-conditional rules for the operations the allow-list leaves out
    ("crio-blog", "2.3.0"): None,
    ("debian", "2.2.4"): ["defaultErrnoRet 38 (ENOSYS) cannot be kept on containerd 2.2.4"],
    # personality is allowed for 5 argument values only: the other values reach the
    # default (ENOSYS) and no bounded set of rules expresses them on 64-bit arguments
    ("debian", "2.3.0"): [
        "defaultErrnoRet 38 (ENOSYS) cannot be kept exactly on containerd 2.3.0 (NRI v0.12.0)",
        "personality (SCMP_ARCH_X86_64, SCMP_ARCH_X86, SCMP_ARCH_X32)",
    ],
    ("debian-no-audit-write", "2.2.4"): [
        "syscalls[30] (names: socket): errnoRet 22 (EINVAL) for socket cannot be sent to "
        "containerd 2.2.4 (NRI v0.11.0): a per-syscall errno_ret crashes its NRI",
    ],
    ("debian-no-audit-write", "2.3.0"): ["personality (SCMP_ARCH_X86_64"],
    ("all-eperm", "2.2.4"): None,
    ("all-eperm", "2.3.0"): None,
}


@pytest.mark.parametrize(
    ("name", "runtime"), [pytest.param(n, r, id=f"{n}@{r}") for n, r in EXPECTED]
)
def test_exact_meaning_or_refusal(
    prepared_profiles: dict[str, prepare.Prepared], name: str, runtime: str
) -> None:
    original = prepared_profiles[name].policy
    origin = prepared_profiles[name].profile.rule_indexes
    before = original.SerializeToString(deterministic=True)
    caps = RUNTIMES[runtime]
    expected = EXPECTED[(name, runtime)]
    if expected is not None:
        with pytest.raises(C.UnsupportedByRuntime) as info:
            C.translate(original, caps, origin=origin)
        for text in expected:
            assert text in str(info.value)
        assert info.value.runtime == caps.description
        assert original.SerializeToString(deterministic=True) == before
        return
    translation = C.translate(original, caps, origin=origin)
    assert original.SerializeToString(deterministic=True) == before, "input modified"
    assert translation.warnings == ()
    sent = translation.policy
    assert not sent.HasField("default_errno")
    if not caps.errno_ret_safe:
        assert not has_errno_ret(sent), "the runtime would crash"
    # the runtime's view of what was sent, compiled, against the original profile
    assert C.differences(original, C.effective_policy(sent, caps)) == []
    libseccomp.compile_check(sent)


def test_the_checks_see_a_difference(profiles: dict[str, nri_pb2.LinuxSeccomp]) -> None:
    # passing the blog profile through unchanged to 2.3.0 loses ENOSYS
    blog = profiles["crio-blog"]
    diffs = C.differences(blog, C.effective_policy(blog, CONTAINERD_230))
    assert "SCMP_ARCH_X86_64 mount: SCMP_ACT_ERRNO(38) → SCMP_ACT_ERRNO(1)" in diffs
    assert "SCMP_ARCH_X86 socketcall(a0=0xd): SCMP_ACT_ERRNO(38) → SCMP_ACT_ERRNO(1)" in diffs
    assert not any(d.startswith(("SCMP_ARCH_X86_64 read:", "SCMP_ARCH_X86 read:")) for d in diffs)


def test_crio_blog_on_230_materialises_the_default(
    profiles: dict[str, nri_pb2.LinuxSeccomp],
) -> None:
    blog = profiles["crio-blog"]
    t = C.translate(blog, CONTAINERD_230)
    allowed = set(blog.syscalls[0].names)
    assert "mount" in t.materialised and "clone3" in t.materialised
    assert not allowed & set(t.materialised)
    assert t.complemented == ("socketcall",)
    explicit = t.policy.syscalls[1]
    assert (explicit.action, explicit.errno_ret.value) == ("SCMP_ACT_ERRNO", 38)
    assert list(explicit.names) == list(t.materialised)
    x86 = C.effective_policy(t.policy, CONTAINERD_230)
    for op, action in [(1, ("SCMP_ACT_ALLOW", None)), (13, ("SCMP_ACT_ERRNO", 38)),
                       (0, ("SCMP_ACT_ERRNO", 38)), (2**31, ("SCMP_ACT_ERRNO", 38))]:
        assert bpf.action_for(x86, "SCMP_ARCH_X86", "socketcall", {0: op}) == action
    assert any("carried by an explicit SCMP_ACT_ERRNO rule" in n for n in t.notes)


def test_debian_degraded_on_request(profiles: dict[str, nri_pb2.LinuxSeccomp]) -> None:
    debian = profiles["debian"]
    t = C.translate(debian, CONTAINERD_230, allow_errno_degrade=True)
    assert len(t.warnings) == 1
    assert "degraded to EPERM (allow_errno_degrade)" in t.warnings[0]
    assert "personality" in t.warnings[0]
    diffs = C.differences(debian, C.effective_policy(t.policy, CONTAINERD_230))
    assert diffs and all(" personality(" in d for d in diffs)
    assert all(d.endswith("SCMP_ACT_ERRNO(38) → SCMP_ACT_ERRNO(1)") for d in diffs)


def test_per_syscall_errno_degraded_on_request(
    prepared_profiles: dict[str, prepare.Prepared],
) -> None:
    debian = prepared_profiles["debian-no-audit-write"]
    t = C.translate(debian.policy, CONTAINERD_224, allow_errno_degrade=True,
                    origin=debian.profile.rule_indexes)
    assert not has_errno_ret(t.policy)
    assert not t.policy.HasField("default_errno")
    assert len(t.warnings) == 2
    assert t.warnings[0].startswith(
        "syscalls[30] (names: socket): errnoRet 22 (EINVAL) degraded to EPERM "
        "(allow_errno_degrade): containerd 2.2.4 (NRI v0.11.0) cannot carry"
    )
    assert t.warnings[1].startswith(
        "defaultErrnoRet 38 (ENOSYS) degraded to EPERM (allow_errno_degrade)"
    )


def test_refusal_carries_the_context() -> None:
    # (a rule with the default action would be normalised away: LOG keeps two rules)
    policy = policy_of({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["read"], "action": "SCMP_ACT_LOG"},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]})
    with pytest.raises(C.UnsupportedByRuntime) as info:
        C.translate(policy, CONTAINERD_224, origin=(4, 9))
    e = info.value
    assert str(e).startswith("syscalls[9] (names: clone3): errnoRet 38 (ENOSYS) for clone3 "
                             "cannot be sent to containerd 2.2.4 (NRI v0.11.0)")
    assert (e.errno, e.syscalls, e.rule_index) == (38, ("clone3",), 9)
    # the fixed runtime takes it as is
    t = C.translate(policy, CONTAINERD_230)
    assert t.policy == policy and t.notes == ()


CASES: list[tuple[str, dict[str, Any], Caps, dict[str, Any]]] = [
    (
        "EPERM errnoRet left out on 2.2.4",
        {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mount"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
            {"names": ["ptrace"], "action": "SCMP_ACT_TRACE", "errnoRet": 1}]},
        CONTAINERD_224,
        {"errno_ret": [None, None], "note": "errnoRet 1 (EPERM) left out of 2 rule(s)"},
    ),
    (
        "EPERM errnoRet kept on 2.3.0",
        {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mount"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]},
        CONTAINERD_230,
        {"errno_ret": [1]},
    ),
    (
        "defaultErrnoRet 1 left out",
        {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1, "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW"}]},
        CONTAINERD_224,
        {"errno_ret": [None], "note": "defaultErrnoRet 1 (EPERM) left out"},
    ),
    (
        "defaultErrnoRet kept where the runtime keeps it",
        {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38, "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW"}]},
        FIXED,
        {"errno_ret": [None], "default_errno": 38},
    ),
    (
        "TRACE default materialised as TRACE",
        {"defaultAction": "SCMP_ACT_TRACE", "defaultErrnoRet": 7,
         "architectures": ["SCMP_ARCH_X86_64"], "syscalls": [
             {"names": ["read"], "action": "SCMP_ACT_ALLOW"}]},
        CONTAINERD_230,
        {"errno_ret": [None, 7], "action": "SCMP_ACT_TRACE"},
    ),
]


@pytest.mark.parametrize(
    ("doc", "caps", "expected"), [pytest.param(d, c, x, id=n) for n, d, c, x in CASES]
)
def test_translation_cases(doc: dict[str, Any], caps: Caps, expected: dict[str, Any]) -> None:
    original = policy_of(doc)
    t = C.translate(original, caps)
    got = [sc.errno_ret.value if sc.HasField("errno_ret") else None for sc in t.policy.syscalls]
    assert got == expected["errno_ret"]
    if "default_errno" in expected:
        assert t.policy.default_errno.value == expected["default_errno"]
    else:
        assert not t.policy.HasField("default_errno")
    if "note" in expected:
        assert any(expected["note"] in n for n in t.notes), t.notes
    if "action" in expected:
        assert t.policy.syscalls[-1].action == expected["action"]
    assert t.warnings == ()
    assert C.differences(original, C.effective_policy(t.policy, caps)) == []


def test_errno_ret_on_an_action_without_errno_is_dropped() -> None:
    # parse() refuses this; a policy from elsewhere is still never sent with errno_ret
    policy = nri_pb2.LinuxSeccomp(default_action="SCMP_ACT_ERRNO", syscalls=[
        nri_pb2.LinuxSyscall(names=["read"], action="SCMP_ACT_ALLOW",
                             errno_ret=nri_pb2.OptionalUInt32(value=22))])
    t = C.translate(policy, CONTAINERD_224)
    assert not has_errno_ret(t.policy)
    assert any("errnoRet 22 dropped: it has no effect with SCMP_ACT_ALLOW" in n for n in t.notes)


def test_effective_policy() -> None:
    policy = policy_of({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38, "syscalls": [
        {"names": ["mount"], "action": "SCMP_ACT_ERRNO", "errnoRet": 5}]})
    assert not C.effective_policy(policy, CONTAINERD_230).HasField("default_errno")
    assert C.effective_policy(policy, FIXED) == policy
    with pytest.raises(C.RuntimeWouldCrash, match=r"containerd 2\.2\.4 .* would crash"):
        C.effective_policy(policy, CONTAINERD_224)


def test_a_conditional_only_syscall_on_one_32_bit_argument_is_complemented() -> None:
    doc: dict[str, Any] = {
        "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
        "architectures": ["SCMP_ARCH_X86"], "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 100, "op": "SCMP_CMP_EQ"}]},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 108, "op": "SCMP_CMP_EQ"}]}]}
    original = policy_of(doc)
    # on x86_64 (the native architecture, always in the filter) the argument is
    # 64-bit: the values around the allowed ones are not a bounded set of rules
    with pytest.raises(C.UnsupportedByRuntime, match=r"personality \(SCMP_ARCH_X86_64, "
                       r"SCMP_ARCH_X86\)"):
        C.translate(original, CONTAINERD_230)
    # socketcall exists on x86 only, with a 32-bit argument: one rule per block of values
    for rule in doc["syscalls"][1:]:
        rule["names"] = ["socketcall"]
    original = policy_of(doc)
    t = C.translate(original, CONTAINERD_230)
    assert t.complemented == ("socketcall",)
    added = [(a.op, a.value, a.value_two) for sc in t.policy.syscalls if sc.args
             for a in sc.args if sc.errno_ret.value == 38]
    assert added == [
        ("SCMP_CMP_LE", 99, 0),
        ("SCMP_CMP_EQ", 101, 0),
        ("SCMP_CMP_MASKED_EQ", 0xFFFFFFFE, 102),
        ("SCMP_CMP_MASKED_EQ", 0xFFFFFFFC, 104),
        ("SCMP_CMP_GE", 109, 0),
    ]
    assert C.differences(original, C.effective_policy(t.policy, CONTAINERD_230)) == []
