"""Issue 6: per declared containerd, each profile is applied with exactly its errno semantics
or refused with the specific reason; never an adjustment the runtime would crash on.

The runtime driver emulates each release (2.2.x panics on errno_ret, every NRI drops
default_errno); exactness is checked by compiling the original profile and what the
emulated runtime would apply with libseccomp and comparing every syscall on every
architecture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from devtools import driver
from devtools.registry import LocalRegistry
from nri_seccomp.decide.resolver import KEY_V1
from nri_seccomp.seccomp import bpf, compat, libseccomp, prepare, select

from .plugin_harness import base_config, container, plugin, pod, run, until_settled
from .profiles import CRIO_BLOG

pytestmark = pytest.mark.integration  # real processes: plugin, registries, servers

ALL_EPERM: dict[str, Any] = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "defaultErrnoRet": 1,
    "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
    "syscalls": [
        {"names": ["read", "write", "exit_group", "futex"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["mkdir", "chmod"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
    ],
}

# (runtime, profile, config, expected: "exact" or the refusal's specific words)
CASES = [
    ("v1.7.27", "eperm", "", "does not apply seccomp adjustments from NRI plugins"),
    ("v2.1.4", "blog", "", "does not apply seccomp adjustments from NRI plugins"),
    ("v2.2.4", "blog", "", "defaultErrnoRet 38 (ENOSYS) cannot be kept on containerd v2.2.4"),
    ("v2.3.0", "blog", "", "exact"),
    ("v2.2.4", "debian", "", "cannot be kept on containerd v2.2.4"),
    # personality's other values get ENOSYS from 83 argument-conditional rules
    ("v2.3.0", "debian", "", "exact"),
    # a containerd 2.4 whose NRI reports v0.12.0 drops default_errno as 2.3 does
    ("v2.4.0", "debian", "", "exact"),
    ("v2.2.4", "eperm", "", "exact"),
    ("v2.3.0", "eperm", "", "exact"),
]


@pytest.fixture(scope="module")
def pushed(registry: LocalRegistry, debian_profile: bytes) -> dict[str, tuple[str, bytes]]:
    out = {}
    for name, data in (("blog", json.dumps(CRIO_BLOG).encode()), ("debian", debian_profile),
                       ("eperm", json.dumps(ALL_EPERM).encode())):
        registry.push_profile(f"compat/{name}", "v1", data)
        out[name] = (f"{registry.address}/compat/{name}:v1", data)
    return out


@pytest.mark.parametrize(("version", "name", "extra", "expected"), CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_runtime_gets_exact_meaning_or_refusal(
        registry: LocalRegistry, pushed: dict[str, tuple[str, bytes]], tmp_path: Path,
        version: str, name: str, extra: str, expected: str) -> None:
    ref, data = pushed[name]
    runtime = driver.RuntimeVersion.containerd(version)

    async def scenario() -> driver.CreateResult:
        config = base_config(tmp_path / "cache", registry.address, extra)
        async with plugin(config, runtime=runtime) as session:
            # Debian's profile on 2.3 takes longer than answer_wait (0.5 s) to compile and
            # translate: the first answer is "retry", as the kubelet then does
            results = await until_settled(session.conn, pod({f"{KEY_V1}/POD": ref}),
                                          container())
            return results[-1]

    result = run(scenario(), timeout=120)
    assert result.crashed is None, result.crashed
    assert result.fatal is None and not result.dropped
    if expected == "exact":
        assert result.error is None, result.error
        assert result.applied is not None
        original = prepare.prepare(data, select.node_context()).policy
        assert compat.differences(original, result.applied) == []
        for arch in libseccomp.policy_arches(original):
            for value in (0x0, 0x8, 0x7, 0x9, 0x20000, 0x20008, 0x400000, 0xFFFFFFFF,
                          0x100000000, 0xFFFFFFFFFFFFFFFF):
                assert (bpf.action_for(result.applied, arch, "personality", {0: value})
                        == bpf.action_for(original, arch, "personality", {0: value}))
        if name == "debian":
            native = "SCMP_ARCH_X86_64"
            assert bpf.action_for(result.applied, native, "personality",
                                  {0: 0x400000}) == ("SCMP_ACT_ERRNO", 38)
            assert bpf.action_for(result.applied, native, "personality",
                                  {0: 0x8}) == ("SCMP_ACT_ALLOW", None)
    else:
        assert result.error is not None, "expected a refusal"
        assert expected in result.error.message
        assert result.seccomp is None


def test_degrade_switch_applies_eperm_with_a_warning(
        registry: LocalRegistry, pushed: dict[str, tuple[str, bytes]], tmp_path: Path) -> None:
    ref, data = pushed["debian"]

    async def scenario() -> tuple[driver.CreateResult, str]:
        config = base_config(tmp_path / "cache", registry.address, "allow_errno_degrade: true\n")
        async with plugin(config, runtime=driver.RuntimeVersion.containerd("v2.2.4")) as s:
            *_, result = await until_settled(s.conn, pod({f"{KEY_V1}/POD": ref}), container())
        return result, s.log

    result, log = run(scenario(), timeout=120)
    assert result.crashed is None and result.error is None
    assert result.applied is not None
    assert all(not rule.HasField("errno_ret") for rule in result.applied.syscalls)
    assert "degraded to EPERM (allow_errno_degrade)" in log
    original = prepare.prepare(data, select.node_context()).policy
    diffs = compat.differences(original, result.applied)
    assert diffs, "degrading must change something for Debian's profile"
    assert all("SCMP_ACT_ERRNO(1)" in d.split("→")[1] for d in diffs)


@pytest.mark.parametrize("version", ["v2.2.4", "v2.3.0"])
def test_large_answers_are_readable_by_containerd(registry: LocalRegistry, tmp_path: Path,
                                                  version: str) -> None:
    """containerd cannot read a mux chunk over 4096 bytes: it drops the plugin and runs the
    container unconfined (seen on real 2.2.4, 2.3.4 and main). The driver refuses such
    chunks the same way, so an answer of several KiB must arrive in small chunks."""
    names = list(libseccomp.known_syscalls("SCMP_ARCH_X86_64"))[:450]
    data = json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"],
                       "syscalls": [{"names": names, "action": "SCMP_ACT_ALLOW"}]}).encode()
    registry.push_profile("large/answer", "v1", data)
    ref = f"{registry.address}/large/answer:v1"

    async def scenario() -> driver.CreateResult:
        config = base_config(tmp_path / "cache", registry.address)
        async with plugin(config, runtime=driver.RuntimeVersion.containerd(version)) as s:
            *_, result = await until_settled(s.conn, pod({f"{KEY_V1}/POD": ref}), container())
            assert s.conn.closed is None
        return result

    result = run(scenario())
    assert result.fatal is None and result.error is None, (result.fatal, result.error)
    assert result.response is not None and result.response.ByteSize() > 4096
    assert result.applied is not None
    original = prepare.prepare(data, select.node_context()).policy
    assert compat.differences(original, result.applied) == []


def test_driver_reads_like_containerd() -> None:
    """The emulation's reader: chunks up to 4096 bytes, a bigger one ends the connection."""
    from nri_seccomp.nri import mux

    demux = mux.Demuxer(driver.CONTAINERD_READ_CHUNK)
    assert demux.feed(mux.encode(1, b"y" * 4096)) == [(1, b"y" * 4096)]
    with pytest.raises(mux.MuxError, match="chunk of 4097 bytes for connection 1 exceeds the "
                       "limit of 4096 bytes"):
        demux.feed(mux.encode(1, b"x" * 4097, chunk=4097))
