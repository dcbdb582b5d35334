"""The security review's attacks, replayed against the real plugin subprocess through the driver.

Each test is written as the attack and asserts the defended outcome: the plugin
answers within the runtime's deadline and stays registered, other tenants'
containers are served, nothing hostile is echoed, nothing grows without bound.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from devtools import driver
from devtools.badregistry import BadRegistry
from devtools.hostile import compile_bomb, cpu_seconds
from devtools.registry import LocalRegistry
from nri_seccomp import bounded
from nri_seccomp.decide.resolver import KEY_V1
from nri_seccomp.nri.pb import nri_pb2

from .plugin_harness import base_config, container, plugin, pod, run, until_settled

pytestmark = pytest.mark.integration

PROFILE = json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
    {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"}]}).encode()


def tenant_pod(namespace: str, ref: str, name: str = "pod") -> nri_pb2.PodSandbox:
    p = pod({f"{KEY_V1}/POD": ref})
    p.namespace, p.name, p.id = namespace, name, f"{namespace}-{name}"
    return p




@pytest.mark.parametrize("size", [300 * 1024, 4 * 1024 * 1024 - 4096])
def test_huge_media_type_cannot_make_the_answer_unsendable(
    registry: LocalRegistry, tmp_path: Path, size: int
) -> None:
    """Finding 1: a config mediaType of ~4 MiB of quotes grew the error to 8.4 MB, the
    answer could not be encoded, and containerd dropped the plugin from the node."""
    repo = f"attack/quotes{size}"
    registry.push_profile(repo, "v1", PROFILE, config_media_type="'" * size)
    ref = f"{registry.address}/{repo}:v1"

    async def scenario() -> tuple[list[driver.CreateResult], driver.CreateResult]:
        async with plugin(base_config(tmp_path / "cache", registry.address)) as session:
            attack = await until_settled(session.conn, tenant_pod("evil", ref), container())
            after = await session.conn.create_container(pod(), container("other"))
            return attack, after

    attack, after = run(scenario())
    for r in attack:
        assert r.fatal is None and r.latency < 2.0
    last = attack[-1]
    assert last.error is not None and last.seccomp is None
    assert len(last.error.message.encode()) <= bounded.MAX_STATUS
    assert "'" * 120 not in last.error.message
    # still registered and serving
    assert after.fatal is None and after.error is None


def test_huge_media_type_does_not_flood_the_log(registry: LocalRegistry, tmp_path: Path) -> None:
    repo = "attack/quoteslog"
    registry.push_profile(repo, "v1", PROFILE, config_media_type="\n" + "'" * 300_000)
    ref = f"{registry.address}/{repo}:v1"

    async def scenario() -> str:
        async with plugin(base_config(tmp_path / "cache", registry.address)) as session:
            for _ in range(5):
                await session.conn.create_container(tenant_pod("evil", ref), container())
        return session.log

    log = run(scenario())
    assert len(log) < 64 * 1024
    assert all(len(line) <= bounded.MAX_LOG + 200 for line in log.splitlines())


def test_compile_bomb_costs_at_most_its_budget_and_other_tenants_are_served(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    """Finding 2 and 3: a 1.2 KB profile kept libseccomp busy for 123 s of CPU, and eight
    of them kept another tenant's container refused for 40 s."""
    for i in range(3):
        registry.push_profile("attack/bomb", f"b{i}", compile_bomb(i))
    registry.push_profile("attack/good", "v1", PROFILE)
    budget = 1.0
    config = base_config(tmp_path / "cache", registry.address,
                         f"compile_cpu_seconds: {budget}\ncompile_wall_seconds: 4\n")

    async def scenario() -> tuple[list[list[driver.CreateResult]], list[driver.CreateResult],
                                  float, list[driver.CreateResult]]:
        async with plugin(config) as session:
            assert session.conn.process is not None
            cpu0 = cpu_seconds(session.conn.process.pid)
            bombs = [asyncio.create_task(until_settled(
                session.conn, tenant_pod("evil", f"{registry.address}/attack/bomb:b{i}",
                                         f"p{i}"), container()))
                     for i in range(3)]
            await asyncio.sleep(0.1)
            good = await until_settled(
                session.conn, tenant_pod("good", f"{registry.address}/attack/good:v1"),
                container())
            settled = await asyncio.gather(*bombs)
            cpu = cpu_seconds(session.conn.process.pid) - cpu0
            # a retry of a refused layer costs nothing: answered at once, no new compile
            again = [await session.conn.create_container(
                tenant_pod("evil", f"{registry.address}/attack/bomb:b0"), container())
                for _ in range(3)]
            return settled, good, cpu, again

    settled, good, cpu, again = run(scenario(), timeout=120)
    assert good[-1].seccomp is not None and good[-1].error is None
    for results in settled:
        assert all(r.fatal is None and r.latency < 2.0 for r in results)
        assert results[-1].error is not None
        assert "budget" in results[-1].error.message, results[-1].error.message
    # three bombs, each stopped at its budget; the rest is the plugin's own work
    assert cpu <= 3 * budget + 2.0, cpu
    assert all(r.error is not None and "budget" in r.error.message for r in again)


def test_a_pod_with_300_annotations_on_a_trickling_registry_starves_nobody(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    """Finding 3: 300 annotations pointing at a 1-byte-per-second registry kept another
    tenant's container refused for ~30 s through the pod-creation prefetch."""
    registry.push_profile("attack/victim", "v1", PROFILE)
    with BadRegistry("trickle-blob", interval=1.0) as slow:
        config = (f"cache_dir: {tmp_path / 'cache'}\n"
                  f"registry: {{insecure: [{registry.address}, {slow.address}], "
                  f"allowed: ['{registry.address}/*', '{slow.address}/*']}}\n")
        hostile = pod({f"{KEY_V1}/c{i}": f"{slow.address}/slow/p{i}:1" for i in range(300)})
        hostile.namespace = "evil"

        async def scenario() -> list[driver.CreateResult]:
            async with plugin(config) as session:
                await session.conn.run_pod_sandbox(hostile)
                await asyncio.sleep(0.3)
                return await until_settled(
                    session.conn, tenant_pod("victim", f"{registry.address}/attack/victim:v1"),
                    container(), limit=10)

        results = run(scenario())
        manifests = sum(1 for line, _ in slow.requests if "/manifests/" in line)
    assert results[-1].seccomp is not None
    assert len(results) <= 2  # served at once, or at the first retry
    assert manifests <= 4  # prefetch_per_pod


def test_no_registry_is_allowed_until_the_administrator_lists_one(tmp_path: Path) -> None:
    """Finding 4: with the old default allowed: ['*'] a pod author reached any address."""
    with BadRegistry("ok") as target:
        config = f"cache_dir: {tmp_path / 'cache'}\nregistry: {{insecure: [{target.address}]}}\n"

        async def scenario() -> driver.CreateResult:
            async with plugin(config) as session:
                return await session.conn.create_container(
                    tenant_pod("evil", f"{target.address}/x/y:1"), container())

        result = run(scenario())
        reached = len(target.requests)
    assert result.error is not None and result.seccomp is None
    assert "registry.allowed" in result.error.message
    assert reached == 0


@pytest.mark.parametrize("host", ["2130706433", "127.1", "0x7f000001"])
def test_disguised_loopback_is_refused_even_with_a_wildcard(tmp_path: Path, host: str) -> None:
    with BadRegistry("ok") as target:
        port = target.address.rsplit(":", 1)[1]
        # a wildcard lists no host: the address behind the name decides
        config = f"cache_dir: {tmp_path / 'cache'}\nregistry: {{allowed: ['*']}}\n"

        async def scenario() -> driver.CreateResult:
            async with plugin(config) as session:
                return await session.conn.create_container(
                    tenant_pod("evil", f"{host}:{port}/x/y:1"), container())

        result = run(scenario())
        reached = len(target.requests)
    assert result.error is not None and result.seccomp is None
    assert reached == 0


def test_a_tightened_allow_list_applies_to_cached_profiles(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    """Finding 6: cached digests from a now-banned registry were still applied."""
    digest = registry.push_profile("attack/cached", "v1", PROFILE)
    ref = f"{registry.address}/attack/cached@{digest}"
    cache = tmp_path / "cache"

    async def use(config: str) -> driver.CreateResult:
        async with plugin(config) as session:
            return await session.conn.create_container(tenant_pod("t", ref), container())

    assert run(use(base_config(cache, registry.address))).seccomp is not None
    banned = (f"cache_dir: {cache}\nregistry: {{insecure: [{registry.address}], "
              f"allowed: ['{registry.address}/other/*']}}\n")
    result = run(use(banned))
    assert result.error is not None and result.seccomp is None
    assert "allowed" in result.error.message

    tag = f"{registry.address}/attack/cached:v1"

    async def use_tag(config: str) -> driver.CreateResult:
        async with plugin(config) as session:
            return await session.conn.create_container(tenant_pod("t", tag), container())

    assert run(use_tag(base_config(cache, registry.address))).seccomp is not None
    strict = base_config(cache, registry.address).replace(
        "registry: {", "registry: {require_digest: true, ")
    assert "require_digest: true" in strict
    result = run(use_tag(strict))
    assert result.error is not None and "digest" in result.error.message
