"""What every deployment test asks of a started plugin: it registers, leaves an
unannotated container alone and applies an annotated container's profile."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from devtools import driver
from devtools.registry import LocalRegistry
from nri_seccomp.nri import ttrpc
from nri_seccomp.nri.pb import nri_pb2

from .plugin_harness import base_config, container, pod

#: mkdir and mkdirat refused, everything else allowed
PROFILE = json.dumps({
    "defaultAction": "SCMP_ACT_ALLOW",
    "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}],
}).encode()
ANNOTATION = "seccomp-profile.kubernetes.cri-o.io/POD"


def push(registry: LocalRegistry, repo: str = "deploy/profile") -> str:
    """Push the profile; the reference a pod annotation names."""
    registry.push_profile(repo, "v1", PROFILE)
    return f"{registry.address}/{repo}:v1"


def config(registry: LocalRegistry, cache_dir: Path) -> str:
    return base_config(cache_dir, registry.address)


async def create_until_answered(
    conn: driver.PluginConnection, annotations: dict[str, str], tries: int = 50
) -> driver.CreateResult:
    """CreateContainer, again while the plugin answers "retry" (profile not ready yet),
    as the kubelet retries a failed creation."""
    for _ in range(tries):
        result = await conn.create_container(pod(annotations), container("app"))
        if result.error is not None and result.error.code == ttrpc.Code.UNAVAILABLE:
            await asyncio.sleep(0.1)
            continue
        return result
    raise AssertionError(f"still not answered after {tries} tries: {result.error}")


async def registers_and_answers(
    conn: driver.PluginConnection, reference: str, configure: str | None = None
) -> None:
    await conn.handshake(configure)
    assert conn.registration is not None
    assert (conn.registration.plugin_name, conn.registration.plugin_idx) == ("seccomp-oci", "10")
    plain = await conn.create_container(pod(), container("app"))
    assert plain.error is None and plain.fatal is None, (plain.error, plain.fatal)
    assert plain.response == nri_pb2.CreateContainerResponse()
    confined = await create_until_answered(conn, {ANNOTATION: reference})
    assert confined.error is None and confined.fatal is None, (confined.error, confined.fatal)
    assert confined.applied is not None
    applied = driver.effective_seccomp(conn.runtime, confined.applied)
    assert applied["defaultAction"] == "SCMP_ACT_ALLOW"
    denied = {n for r in applied["syscalls"] if r["action"] == "SCMP_ACT_ERRNO" for n in r["names"]}
    assert {"mkdir", "mkdirat"} <= denied, applied
