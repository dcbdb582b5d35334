"""JSON → Profile: every malformed case is refused with its own message; every field is read."""

from __future__ import annotations

import pytest

from nri_seccomp.seccomp import model, parse
from nri_seccomp.seccomp.model import ProfileError, ProfileFieldError, ProfileSyntaxError
from tests.profiles import FILLER, allow, base, dumps, rules

MALFORMED: list[tuple[str, bytes, type[ProfileError], list[str], int | None]] = [
    ("not json", b'{"defaultAction": ', ProfileSyntaxError, ["layer is not JSON:"], None),
    ("binary", b"\x1f\x8b\x08\x00gzip", ProfileSyntaxError, ["layer is not JSON:"], None),
    ("empty", b"", ProfileSyntaxError, ["layer is not JSON:"], None),
    ("deep", b"[" * 100_000 + b"]" * 100_000, ProfileSyntaxError, ["nested too deeply"], None),
    ("nan", b'{"defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": NaN}',
     ProfileSyntaxError, ["layer is not JSON:", "NaN"], None),
    ("duplicate key", b'{"defaultAction": "SCMP_ACT_ALLOW", "defaultAction": "SCMP_ACT_KILL"}',
     ProfileSyntaxError, ["duplicate key 'defaultAction'"], None),
    ("array", b"[]", ProfileFieldError, ["profile must be a JSON object, not an array"], None),
    ("string", b'"x"', ProfileFieldError, ["profile must be a JSON object, not a string"], None),
    ("{}", b"{}", ProfileFieldError, ["profile has no defaultAction"], None),
    ("only syscalls", dumps({"syscalls": [FILLER]}), ProfileFieldError,
     ["profile has no defaultAction"], None),
    ("typo top-level", dumps(base(defaultErrnoret=38)), ProfileFieldError,
     ["unknown profile field 'defaultErrnoret' (did you mean 'defaultErrnoRet'?)"], None),
    ("two unknown", dumps(base(foo=1, bar=2)), ProfileFieldError,
     ["unknown profile fields 'bar', 'foo'"], None),
    ("default action", dumps({"defaultAction": "SCMP_ACT_FOO"}), ProfileFieldError,
     ["defaultAction: unknown action 'SCMP_ACT_FOO'"], None),
    ("default action type", dumps({"defaultAction": 1}), ProfileFieldError,
     ["defaultAction: must be a string, not an integer"], None),
    ("default notify", dumps({"defaultAction": "SCMP_ACT_NOTIFY"}), ProfileFieldError,
     ["SCMP_ACT_NOTIFY cannot be the default action"], None),
    ("defaultErrnoRet range", dumps(base(defaultErrnoRet=65536)), ProfileFieldError,
     ["defaultErrnoRet: 65536 is out of range (maximum 65535)"], None),
    ("defaultErrnoRet negative", dumps(base(defaultErrnoRet=-1)), ProfileFieldError,
     ["defaultErrnoRet: -1 is negative"], None),
    ("defaultErrnoRet string", dumps(base(defaultErrnoRet="38")), ProfileFieldError,
     ["defaultErrnoRet: must be a non-negative integer, not a string"], None),
    ("defaultErrnoRet bool", dumps(base(defaultErrnoRet=True)), ProfileFieldError,
     ["defaultErrnoRet: must be a non-negative integer, not a boolean"], None),
    ("defaultErrnoRet float", dumps(base(defaultErrnoRet=38.0)), ProfileFieldError,
     ["defaultErrnoRet: must be a non-negative integer, not a number with a fraction"], None),
    ("defaultErrnoRet with allow",
     dumps({"defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": 38}), ProfileFieldError,
     ["defaultErrnoRet: 38 has no effect with SCMP_ACT_ALLOW"], None),
    ("defaultErrno disagrees", dumps(base(defaultErrnoRet=1, defaultErrno="ENOSYS")),
     ProfileFieldError, ["defaultErrno: ENOSYS (38) disagrees with defaultErrnoRet 1"], None),
    ("defaultErrno unknown", dumps(base(defaultErrno="ENOPE")),
     ProfileFieldError, ["defaultErrno: unknown errno name 'ENOPE'"], None),
    ("architecture", dumps(base(architectures=["SCMP_ARCH_FOO"])), ProfileFieldError,
     ["architectures[0]: unknown architecture 'SCMP_ARCH_FOO'"], None),
    ("architectures type", dumps(base(architectures="SCMP_ARCH_X86_64")), ProfileFieldError,
     ["architectures: must be an array, not a string"], None),
    ("both arch forms",
     dumps(base(architectures=["SCMP_ARCH_X86_64"],
                archMap=[{"architecture": "SCMP_ARCH_X86_64"}])),
     ProfileFieldError, ["architectures and archMap are both set"], None),
    ("archMap missing", dumps(base(archMap=[{"subArchitectures": []}])), ProfileFieldError,
     ["archMap[0]: architecture is missing"], None),
    ("archMap sub", dumps(base(archMap=[{"architecture": "SCMP_ARCH_X86_64",
                                         "subArchitectures": ["SCMP_ARCH_X87"]}])),
     ProfileFieldError, ["archMap[0].subArchitectures[0]: unknown architecture 'SCMP_ARCH_X87'"],
     None),
    ("archMap field", dumps(base(archMap=[{"architecture": "SCMP_ARCH_X86_64", "subArches": []}])),
     ProfileFieldError, ["archMap[0]: unknown archMap field 'subArches'"], None),
    ("flag", dumps(base(flags=["SECCOMP_FILTER_FLAG_FOO"])), ProfileFieldError,
     ["flags[0]: unknown flag 'SECCOMP_FILTER_FLAG_FOO'"], None),
    ("listenerPath type", dumps(base(listenerPath=1)), ProfileFieldError,
     ["listenerPath: must be a string, not an integer"], None),
    ("syscalls type", dumps(base(syscalls={})), ProfileFieldError,
     ["syscalls: must be an array, not an object"], None),
    ("rule type", dumps(base(syscalls=[FILLER, "read"])), ProfileFieldError,
     ["syscalls[1]: must be an object, not a string"], 1),
    ("unknown action",
     rules(FILLER, FILLER, FILLER, {"names": ["foo"], "action": "SCMP_ACT_FOO"}),
     ProfileFieldError, ["syscalls[3] (names: foo): unknown action 'SCMP_ACT_FOO'"], 3),
    ("missing action", rules({"names": ["foo"]}), ProfileFieldError,
     ["syscalls[0] (names: foo): action is missing"], 0),
    ("no names", rules(FILLER, {"action": "SCMP_ACT_ALLOW"}), ProfileFieldError,
     ["syscalls[1]: no syscall names"], 1),
    ("empty names", rules({"names": [], "action": "SCMP_ACT_ALLOW"}), ProfileFieldError,
     ["syscalls[0]: no syscall names"], 0),
    ("empty name", rules({"names": ["read", ""], "action": "SCMP_ACT_ALLOW"}),
     ProfileFieldError, ["syscalls[0].names[1] (names: read, ): empty syscall name"], 0),
    ("name type", rules({"names": ["read", 3], "action": "SCMP_ACT_ALLOW"}),
     ProfileFieldError, ["syscalls[0].names[1]: must be a string, not an integer"], 0),
    ("name and names", rules({"name": "read", "names": ["write"], "action": "SCMP_ACT_ALLOW"}),
     ProfileFieldError, ["syscalls[0]: name and names are both set"], 0),
    ("rule typo", rules(allow("read", errnoret=1)), ProfileFieldError,
     ["syscalls[0] (names: read): unknown rule field 'errnoret' (did you mean 'errnoRet'?)"], 0),
    ("errnoRet range",
     rules({"names": ["mount"], "action": "SCMP_ACT_ERRNO", "errnoRet": 65536}),
     ProfileFieldError,
     ["syscalls[0] (names: mount): errnoRet: 65536 is out of range (maximum 65535)"], 0),
    ("errnoRet negative",
     rules({"names": ["mount"], "action": "SCMP_ACT_ERRNO", "errnoRet": -1}),
     ProfileFieldError, ["syscalls[0] (names: mount): errnoRet: -1 is negative"], 0),
    ("errnoRet type",
     rules({"names": ["mount"], "action": "SCMP_ACT_ERRNO", "errnoRet": "EPERM"}),
     ProfileFieldError,
     ["syscalls[0] (names: mount): errnoRet: must be a non-negative integer, not a string"], 0),
    ("errnoRet with allow", rules(allow("read", errnoRet=1)), ProfileFieldError,
     ["syscalls[0] (names: read): errnoRet 1 has no effect with SCMP_ACT_ALLOW"], 0),
    ("errno label alone", rules({"names": ["mount"], "action": "SCMP_ACT_ERRNO",
                                 "errno": "ENOSYS"}),
     ProfileFieldError, ["syscalls[0] (names: mount): ENOSYS is only a label",
                           "set errnoRet: 38"], 0),
    ("args type", rules(allow("read", args={})), ProfileFieldError,
     ["syscalls[0] (names: read): args: must be an array, not an object"], 0),
    ("arg op", rules(FILLER, FILLER, allow("socket", args=[
        {"index": 0, "value": 16, "op": "SCMP_CMP_FOO"}])),
     ProfileFieldError, ["syscalls[2].args[0] (names: socket): unknown op 'SCMP_CMP_FOO'"], 2),
    ("arg op missing", rules(allow("socket", args=[{"index": 0, "value": 16}])),
     ProfileFieldError, ["syscalls[0].args[0] (names: socket): op is missing"], 0),
    ("arg index", rules(allow("socket", args=[{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}])),
     ProfileFieldError,
     ["syscalls[0].args[0] (names: socket): index: 6 is out of range (maximum 5)"], 0),
    ("arg value range", rules(allow("socket", args=[
        {"index": 0, "value": 2**64, "op": "SCMP_CMP_EQ"}])),
     ProfileFieldError, ["syscalls[0].args[0] (names: socket): value: 18446744073709551616 "
                           "is out of range (maximum 18446744073709551615)"], 0),
    ("arg value negative", rules(allow("socket", args=[
        {"index": 1, "value": 0, "op": "SCMP_CMP_EQ"},
        {"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}])),
     ProfileFieldError, ["syscalls[0].args[1] (names: socket): value: -1 is negative"], 0),
    ("arg valueTwo type", rules(allow("socket", args=[
        {"index": 0, "value": 1, "valueTwo": "1", "op": "SCMP_CMP_MASKED_EQ"}])),
     ProfileFieldError, ["syscalls[0].args[0] (names: socket): valueTwo: must be a "
                           "non-negative integer, not a string"], 0),
    ("arg field", rules(allow("socket", args=[{"index": 0, "val": 1, "op": "SCMP_CMP_EQ"}])),
     ProfileFieldError, ["syscalls[0].args[0] (names: socket): unknown args field 'val'"], 0),
    ("includes arch", rules(allow("read", includes={"arches": ["amd46"]})),
     ProfileFieldError,
     ["syscalls[0].includes.arches[0] (names: read): unknown architecture 'amd46'"], 0),
    ("excludes cap", rules(allow("read", excludes={"caps": ["CAP_SYS_ADMN"]})),
     ProfileFieldError,
     ["syscalls[0].excludes.caps[0] (names: read): unknown capability 'CAP_SYS_ADMN'"], 0),
    ("minKernel", rules(allow("read", includes={"minKernel": "4"})), ProfileFieldError,
     ["syscalls[0] (names: read): includes.minKernel: '4' is not a kernel version"], 0),
    ("minKernel type", rules(allow("read", includes={"minKernel": 4.8})), ProfileFieldError,
     ["syscalls[0] (names: read): includes.minKernel: must be a string"], 0),
    ("selector field", rules(allow("read", includes={"arch": ["amd64"]})), ProfileFieldError,
     ["syscalls[0] (names: read): unknown includes field 'arch'"], 0),
    ("notify without listener", rules({"names": ["mount"], "action": "SCMP_ACT_NOTIFY"}),
     ProfileFieldError, ["syscalls[0] (names: mount): SCMP_ACT_NOTIFY needs listenerPath"], 0),
]


@pytest.mark.parametrize(
    ("data", "error", "expected", "rule_index"),
    [pytest.param(d, e, x, i, id=name) for name, d, e, x, i in MALFORMED],
)
def test_malformed_profile_is_refused_with_a_specific_message(
    data: bytes, error: type[ProfileError], expected: list[str], rule_index: int | None
) -> None:
    with pytest.raises(error) as info:
        parse.parse(data)
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
    p = parse.parse(dumps(doc))
    assert p.default_action == "SCMP_ACT_ERRNO"
    assert p.default_errno_ret == 38
    assert p.arch_map == (
        model.ArchMapEntry("SCMP_ARCH_X86_64", ("SCMP_ARCH_X86",)),
        model.ArchMapEntry("SCMP_ARCH_AARCH64", ()),
    )
    assert p.flags == ("SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW")
    assert (p.listener_path, p.listener_metadata) == ("/run/seccomp-agent.sock", "meta")
    read, mount, pers, bpf, ioctl, ptrace, _, _ = p.syscalls
    assert read == model.Rule(names=("read", "write"), action="SCMP_ACT_ALLOW", comment="io",
                              index=0)
    assert mount.names == ("mount",) and mount.errno_ret == 1 and mount.index == 1
    assert pers.args == (
        model.Condition(index=0, value=8, op="SCMP_CMP_EQ"),
        model.Condition(index=1, value=255, op="SCMP_CMP_MASKED_EQ", value_two=16),
    )
    assert bpf.includes == model.Selector(("amd64",), ("CAP_SYS_ADMIN",), (4, 8))
    assert bpf.excludes == model.Selector(("x86",), ("CAP_BPF",), (99, 0))
    assert ioctl.action == "SCMP_ACT_NOTIFY"
    assert ptrace.errno_ret == 5


def test_null_and_absent_fields_are_empty() -> None:
    p = parse.parse(dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": None,
                       "architectures": None, "flags": None, "listenerPath": None}))
    assert p == model.Profile(default_action="SCMP_ACT_ALLOW")
