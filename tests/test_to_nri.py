"""to_nri: the spec's linux.seccomp for a selected profile, errno only when present."""

from __future__ import annotations

import pytest

from nri_seccomp.nri.pb import nri_pb2
from nri_seccomp.seccomp import model, nri, parse, select
from tests.profiles import AMD64, ARCH_MAP, FILLER, allow, base, dumps, rules


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
    out = nri.to_nri(select.for_node(parse.parse(dumps(doc)), AMD64))
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
    out = nri.to_nri(parse.parse(rules(FILLER)))
    assert not out.HasField("default_errno")


def test_to_nri_refuses_an_unselected_profile() -> None:
    with pytest.raises(model.ProfileError, match=r"call for_node\(\) first"):
        nri.to_nri(parse.parse(rules(allow("read", includes={"caps": ["CAP_SYS_ADMIN"]}))))
    with pytest.raises(model.ProfileError, match=r"call for_node\(\) first"):
        nri.to_nri(parse.parse(rules(FILLER, archMap=ARCH_MAP)))
