"""What the compiled filter does: action_table and action_for run libseccomp's BPF
in the interpreter, per syscall and per argument value the filter distinguishes.
"""

from __future__ import annotations

import pytest

from nri_seccomp.seccomp import bpf, libseccomp, model, vocabulary
from tests.profiles import CRIO_BLOG, policy_of


@pytest.mark.parametrize(
    ("caps", "expected"),
    [
        pytest.param(
            vocabulary.DEFAULT_CAPABILITIES,
            {
                "bpf": ("SCMP_ACT_ERRNO", 1),
                "sethostname": ("SCMP_ACT_ERRNO", 1),
                "chroot": ("SCMP_ACT_ALLOW", None),  # CAP_SYS_CHROOT is a default
                "open_by_handle_at": ("SCMP_ACT_ERRNO", 1),
                "socket": ("SCMP_ACT_ALLOW", None),  # CAP_AUDIT_WRITE is a default
                "socket(a0=0x10, a2=0x9)": ("SCMP_ACT_ALLOW", None),
                "arch_prctl": ("SCMP_ACT_ALLOW", None),
                "read": ("SCMP_ACT_ALLOW", None),
                "personality": ("SCMP_ACT_ALLOW", None),
                "personality(a0=0x8)": ("SCMP_ACT_ALLOW", None),
                "personality(a0=0x1)": ("SCMP_ACT_ERRNO", 38),
                "kexec_load": ("SCMP_ACT_ERRNO", 1),
                "setns": ("SCMP_ACT_ALLOW", None),
            },
            id="default caps",
        ),
        pytest.param(
            vocabulary.DEFAULT_CAPABILITIES | {"CAP_SYS_ADMIN"},
            {"bpf": ("SCMP_ACT_ALLOW", None), "sethostname": ("SCMP_ACT_ALLOW", None),
             "chroot": ("SCMP_ACT_ALLOW", None)},
            id="+CAP_SYS_ADMIN",
        ),
        pytest.param(
            frozenset({"CAP_DAC_READ_SEARCH"}),
            {"bpf": ("SCMP_ACT_ERRNO", 1), "chroot": ("SCMP_ACT_ERRNO", 1),
             "open_by_handle_at": ("SCMP_ACT_ALLOW", None),
             # without CAP_AUDIT_WRITE: audit netlink sockets get EINVAL
             "socket": ("SCMP_ACT_ALLOW", None),
             "socket(a0=0x10, a2=0x9)": ("SCMP_ACT_ERRNO", 22),
             "socket(a0=0x10)": ("SCMP_ACT_ALLOW", None)},
            id="only CAP_DAC_READ_SEARCH",
        ),
    ],
)
def test_debian_rules_for_the_container_caps(
    debian_profile: bytes, caps: frozenset[str], expected: dict[str, tuple[str, int | None]]
) -> None:
    policy = policy_of(debian_profile, model.NodeContext("amd64", (6, 1), caps))
    table = bpf.action_table(policy, "SCMP_ARCH_X86_64")
    for key, action in expected.items():
        name, _, args = key.partition("(")
        call = dict(
            (int(a.split("=")[0].strip()[1:]), int(a.split("=")[1], 16))
            for a in args.rstrip(")").split(",")
            if args
        )
        assert bpf.action_for(policy, "SCMP_ARCH_X86_64", name, call) == action, key
        if key in table:
            assert table[key] == action, key
    assert "socketcall" not in table  # not a syscall of x86_64


def test_debian_arch_gated_rules(debian_profile: bytes) -> None:
    x86 = bpf.action_table(policy_of(debian_profile), "SCMP_ARCH_X86")
    assert x86["modify_ldt"] == ("SCMP_ACT_ALLOW", None)  # includes amd64, x32, x86
    assert x86["socketcall"] == ("SCMP_ACT_ALLOW", None)
    arm = policy_of(debian_profile, model.NodeContext("arm64", (6, 1)))
    assert arm.architectures == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    report = libseccomp.compile_check(arm)
    assert report.architectures == ("SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM")
    names = {n for sc in arm.syscalls for n in sc.names}
    assert {"breakpoint", "set_tls", "cacheflush"} <= names
    assert "arch_prctl" not in names and "modify_ldt" not in names
    table = bpf.action_table(arm, "SCMP_ARCH_ARM")
    assert table["set_tls"] == ("SCMP_ACT_ALLOW", None)
    assert table["breakpoint"] == ("SCMP_ACT_ALLOW", None)


def test_action_table_keys_and_probe_with(debian_profile: bytes) -> None:
    debian = policy_of(debian_profile)
    blog = policy_of(CRIO_BLOG)
    alone = bpf.action_table(blog, "SCMP_ARCH_X86_64")
    assert "personality(a0=0x8)" not in alone
    a = bpf.action_table(blog, "SCMP_ARCH_X86_64", probe_with=[debian])
    b = bpf.action_table(debian, "SCMP_ARCH_X86_64", probe_with=[blog])
    assert a.keys() == b.keys()
    assert a["personality(a0=0x8)"] == ("SCMP_ACT_ERRNO", 38)
    assert b["personality(a0=0x8)"] == ("SCMP_ACT_ALLOW", None)
    with pytest.raises(ValueError, match="not an architecture of the policy"):
        bpf.action_table(blog, "SCMP_ARCH_AARCH64")


def test_describe_action() -> None:
    assert vocabulary.describe_action(0x00050026) == ("SCMP_ACT_ERRNO", 38)
    assert vocabulary.describe_action(0x7FF00005) == ("SCMP_ACT_TRACE", 5)
    assert vocabulary.describe_action(0x7FFF0000) == ("SCMP_ACT_ALLOW", None)
    assert vocabulary.describe_action(0x80000000) == ("SCMP_ACT_KILL_PROCESS", None)
    assert vocabulary.action_of("SCMP_ACT_ERRNO", None) == ("SCMP_ACT_ERRNO", 1)
    assert vocabulary.action_of("SCMP_ACT_KILL", None) == ("SCMP_ACT_KILL_THREAD", None)
