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

from nri_seccomp.decide import runtimes
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
        "debian-wide": prepared(debian_wide(debian_profile)),
    }


def debian_wide(debian_profile: bytes) -> bytes:
    """Debian's profile with personality also allowed for a value above 32 bits: on x86
    and x32 libseccomp compares only the low word, so the calls reaching the default
    there are not the 64-bit ones' low part, and no rule can say both."""
    doc = json.loads(debian_profile)
    doc["syscalls"].append({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                            "args": [{"index": 0, "value": 0x100000008, "op": "SCMP_CMP_EQ"}]})
    return json.dumps(doc).encode()


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
    # default (ENOSYS) and get it from 83 rules, one per block of values
    ("debian", "2.3.0"): None,
    ("debian-no-audit-write", "2.2.4"): [
        "syscalls[30] (names: socket): errnoRet 22 (EINVAL) for socket cannot be sent to "
        "containerd 2.2.4 (NRI v0.11.0): a per-syscall errno_ret crashes its NRI",
    ],
    ("debian-no-audit-write", "2.3.0"): None,
    ("debian-wide", "2.3.0"): [
        "defaultErrnoRet 38 (ENOSYS) cannot be kept exactly on containerd 2.3.0 (NRI v0.12.0)",
        "personality (SCMP_ARCH_X86_64, SCMP_ARCH_X86, SCMP_ARCH_X32): its values above 32 "
        "bits cannot be written without changing 32-bit architectures",
    ],
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


def test_degraded_on_request(profiles: dict[str, nri_pb2.LinuxSeccomp]) -> None:
    wide = profiles["debian-wide"]
    t = C.translate(wide, CONTAINERD_230, allow_errno_degrade=True)
    assert len(t.warnings) == 1
    assert "degraded to EPERM (allow_errno_degrade)" in t.warnings[0]
    assert "personality" in t.warnings[0]
    diffs = C.differences(wide, C.effective_policy(t.policy, CONTAINERD_230))
    assert diffs and all(" personality(" in d for d in diffs)
    assert all(d.endswith("SCMP_ACT_ERRNO(38) → SCMP_ACT_ERRNO(1)") for d in diffs)


#: personality's argument 0 at the five values Debian allows, next to each, and at the
#: edges of the 32- and 64-bit value spaces
PERSONALITY_PROBES = sorted({
    v + d for v in (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF) for d in (-1, 0, 1) if v + d >= 0
} | {0x7, 0x9, 0x1FFFF, 0x20001, 0xFFFFFFFE, 0x100000000, 0xFFFFFFFFFFFFFFFF})


@pytest.mark.parametrize("runtime", [
    pytest.param(("containerd", "v2.3.0", "v0.12.0"), id="2.3.0"),
    # the capability table takes NRI v0.12.3 (containerd 2.4) to keep default_errno
    pytest.param(("containerd", "v2.4.0", "v0.12.3"), id="2.4.0"),
])
def test_debian_default_is_exact(profiles: dict[str, nri_pb2.LinuxSeccomp],
                                 runtime: tuple[str, str, str]) -> None:
    debian = profiles["debian"]
    caps = runtimes.capabilities(*runtime)
    t = C.translate(debian, caps)
    assert t.warnings == ()
    applied = C.effective_policy(t.policy, caps)
    # every syscall libseccomp knows, on x86_64, x86 and x32, at every argument value
    # either filter compares and at the edges of every condition of either
    assert C.differences(debian, applied) == []
    for arch in libseccomp.policy_arches(debian):
        for value in PERSONALITY_PROBES:
            want = bpf.action_for(debian, arch, "personality", {0: value})
            assert bpf.action_for(applied, arch, "personality", {0: value}) == want, (
                arch, hex(value))
    x86_64 = "SCMP_ARCH_X86_64"
    assert bpf.action_for(applied, x86_64, "personality", {0: 0x400000}) == ("SCMP_ACT_ERRNO", 38)
    assert bpf.action_for(applied, x86_64, "personality", {0: 8}) == ("SCMP_ACT_ALLOW", None)
    assert bpf.action_for(applied, x86_64, "personality", {0: 1 << 32}) == ("SCMP_ACT_ERRNO", 38)
    if caps.keeps_default_errno:
        assert t.policy == debian
        return
    assert t.complemented == ("personality",)
    added = [sc for sc in t.policy.syscalls if list(sc.names) == ["personality"] and sc.args]
    added = [sc for sc in added if sc.action == "SCMP_ACT_ERRNO"]
    assert len(added) == 83 and all(sc.errno_ret.value == 38 for sc in added)
    # the upper half of the 64-bit argument in one rule that x86 and x32 never match
    last = added[-1].args[0]
    assert (last.index, last.op, last.value) == (0, "SCMP_CMP_GT", 0xFFFFFFFF)


def test_a_wrong_block_cannot_hide(profiles: dict[str, nri_pb2.LinuxSeccomp]) -> None:
    """The comparison probes the lowest and highest value of every block and the values
    next to them, on every architecture (x86 and x32 as libseccomp truncates the block)."""
    debian = profiles["debian"]
    t = C.translate(debian, CONTAINERD_230)

    def mutated(value_two: int) -> tuple[nri_pb2.LinuxSeccomp, nri_pb2.LinuxSyscall]:
        applied = C.effective_policy(t.policy, CONTAINERD_230)
        (rule,) = [sc for sc in applied.syscalls if sc.args and sc.args[0].value_two == value_two]
        return applied, rule

    arches = ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32")
    lost = "SCMP_ACT_ERRNO(38) → SCMP_ACT_ERRNO(1)"
    # the block [0x400000, 0x7fffff] dropped: its values fall to the runtime's EPERM
    applied, rule = mutated(0x400000)
    applied.syscalls.remove(rule)
    diffs = C.differences(debian, applied)
    for arch in arches:
        for value in ("0x400000", "0x7fffff"):
            assert f"{arch} personality(a0={value}): {lost}" in diffs
    # the block [0x10000, 0x1ffff] halved: 0x18000 and up get EPERM
    applied, rule = mutated(0x10000)
    rule.args[0].value |= 0x8000
    diffs = C.differences(debian, applied)
    for arch in arches:
        for value in ("0x18000", "0x1ffff"):
            assert f"{arch} personality(a0={value}): {lost}" in diffs


def test_a_conditional_only_syscall_on_one_argument_is_complemented() -> None:
    doc: dict[str, Any] = {
        "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
        "architectures": ["SCMP_ARCH_X86"], "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 100, "op": "SCMP_CMP_EQ"}]},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 108, "op": "SCMP_CMP_EQ"}]}]}
    # x86_64 (the native architecture, always in the filter) compares 64 bits, x86 the
    # low 32: one set of rules means the right thing on both
    original = policy_of(doc)
    t = C.translate(original, CONTAINERD_230)
    assert t.complemented == ("personality",)
    added = [(a.op, a.value, a.value_two) for sc in t.policy.syscalls if sc.args
             for a in sc.args if sc.errno_ret.value == 38]
    assert added == [
        ("SCMP_CMP_LE", 99, 0),
        ("SCMP_CMP_EQ", 101, 0),
        ("SCMP_CMP_MASKED_EQ", 0xFFFFFFFFFFFFFFFE, 102),
        ("SCMP_CMP_MASKED_EQ", 0xFFFFFFFFFFFFFFFC, 104),
        ("SCMP_CMP_GT", 108, 0),
    ]
    assert C.differences(original, C.effective_policy(t.policy, CONTAINERD_230)) == []
    # socketcall exists on x86 only, with a 32-bit argument: 32-bit masks
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
        ("SCMP_CMP_GT", 108, 0),
    ]
    assert C.differences(original, C.effective_policy(t.policy, CONTAINERD_230)) == []


def _personality(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"], "syscalls": [
                {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
                *({"names": ["personality"], "action": "SCMP_ACT_ALLOW", **r} for r in rules)]}


@pytest.mark.parametrize(("doc", "reason"), [
    pytest.param(_personality({"args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"},
                                        {"index": 1, "value": 0, "op": "SCMP_CMP_EQ"}]}),
                 "personality (SCMP_ARCH_X86_64, SCMP_ARCH_X86): its rules compare more than "
                 "one argument (0, 1)", id="two arguments"),
    pytest.param(_personality({"args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
                              {"args": [{"index": 0, "value": 1 << 40, "op": "SCMP_CMP_EQ"}]}),
                 # x86 reads 2**40 as 0, allowed anyway; but every block covering
                 # 2**32 on x86_64 covers 0 on x86
                 "its values above 32 bits cannot be written without changing 32-bit "
                 "architectures", id="a value above 32 bits"),
    pytest.param(_personality({"args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
                              {"args": [{"index": 0, "value": (1 << 40) | 7,
                                         "op": "SCMP_CMP_EQ"}]}),
                 # x86 reads 2**40 + 7 as 7: allowed there, not on x86_64
                 "its 32-bit architectures reach the default for other values than the low "
                 "32 bits of its 64-bit ones", id="high word and low word"),
])
def test_what_still_cannot_be_expressed_is_refused(doc: dict[str, Any], reason: str) -> None:
    with pytest.raises(C.UnsupportedByRuntime) as info:
        C.translate(policy_of(doc), CONTAINERD_230)
    assert reason in str(info.value)
    assert info.value.syscalls == ("personality",)

