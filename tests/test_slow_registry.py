"""A registry slower than the answer's deadline still serves the kubelet's retry.

The registry is real (docker-registry with Basic authentication: three calls per
fetch, the 401 included) behind ``devtools.slowproxy.DelayingProxy``, which holds
every request 2 s before the registry sees it. The plugin is the real subprocess
and the runtime driver enforces containerd's 2 s request timeout (a late answer
is ``fatal``). The kubelet is played by a loop retrying the creation every second.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from devtools import driver
from devtools.registry import LocalRegistry, docker_config
from devtools.slowproxy import DelayingProxy
from nri_seccomp.decide.resolver import KEY_V1

from .conftest import REGISTRY_USER
from .plugin_harness import base_config, container, plugin, pod, run

pytestmark = pytest.mark.integration

PROFILE = json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
    {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"}]}).encode()
#: every call of the registry is answered this late (more than registry.timeout, 1.5 s)
DELAY = 2.0
#: the answer's deadline: the driver's 2 s request timeout minus deadline_margin
ANSWER_DEADLINE = 2.0 - 0.25
#: the kubelet's retries, here once a second
RETRY_EVERY = 1.0


async def kubelet(conn: driver.PluginConnection, ref: str,
                  limit: float) -> list[tuple[float, driver.CreateResult]]:
    """CreateContainer retried every RETRY_EVERY while the answer is "retry": each answer
    with its time since the first request."""
    attempts: list[tuple[float, driver.CreateResult]] = []
    started = time.monotonic()
    while time.monotonic() - started < limit:
        result = await conn.create_container(pod({f"{KEY_V1}/POD": ref}), container())
        attempts.append((time.monotonic() - started, result))
        if result.error is None or "retry" not in result.error.message:
            break
        await asyncio.sleep(RETRY_EVERY)
    return attempts


def _slow_setup(reg: LocalRegistry, proxy: DelayingProxy, tmp_path: Path, repo: str,
                registry_extra: str = "") -> tuple[str, str]:
    reg.push_profile(repo, "v1", PROFILE)
    creds = docker_config(tmp_path / "config.json", {proxy.address: REGISTRY_USER})
    extra = f"docker_config: {creds}" + (f", {registry_extra}" if registry_extra else "")
    config = base_config(tmp_path / "cache", proxy.address, registry_extra=extra)
    return config, f"{proxy.address}/{repo}:v1"


def test_registry_answering_every_call_in_2s_serves_the_retry(
    htpasswd_registry: LocalRegistry, tmp_path: Path
) -> None:
    with DelayingProxy(htpasswd_registry.address, DELAY) as proxy:
        config, ref = _slow_setup(htpasswd_registry, proxy, tmp_path, "slow/served")

        async def scenario() -> list[tuple[float, driver.CreateResult]]:
            async with plugin(config) as session:
                return await kubelet(session.conn, ref, limit=20.0)

        attempts = run(scenario())
        calls = [line for line, _ in proxy.requests if "/v2/slow/served/" in line]

    for _, r in attempts:
        assert r.fatal is None, r.fatal
        assert r.latency < ANSWER_DEADLINE, f"answered in {r.latency:.2f}s"
    *waiting, (served_at, served) = attempts
    assert served.error is None and served.seccomp is not None, served.error
    assert served.seccomp.default_action == "SCMP_ACT_ERRNO"
    # every answer before it was a prompt "retry" while the fetch went on
    assert waiting, "the slow registry cannot have served the first request"
    for _, r in waiting:
        assert r.error is not None and "is still being fetched, retry" in r.error.message, (
            r.error)
    # the registry really was slow: the anonymous manifest request (401), the
    # authenticated one and the blob, each held DELAY, one after the other
    assert [c.split(" ")[1].split("/")[-2] for c in calls] == ["manifests", "manifests",
                                                                "blobs"]
    assert served_at >= 3 * DELAY
    # ... and the retry after the fetch ended was served: no later than one retry period
    # (plus that retry's own wait) after the last call's answer
    assert served_at < 3 * DELAY + RETRY_EVERY + 1.5


def test_background_bound_at_the_old_timeout_is_what_failed(
    htpasswd_registry: LocalRegistry, tmp_path: Path
) -> None:
    """The same registry with ``background_timeout`` as short as ``timeout`` (1.5 s, the
    old behaviour): each call is cut, and every retry is refused with why."""
    with DelayingProxy(htpasswd_registry.address, DELAY) as proxy:
        config, ref = _slow_setup(htpasswd_registry, proxy, tmp_path, "slow/cut",
                                  "background_timeout: 1.5")

        async def scenario() -> list[tuple[float, driver.CreateResult]]:
            async with plugin(config) as session:
                return await kubelet(session.conn, ref, limit=6.0)

        attempts = run(scenario())
    assert all(r.fatal is None and r.seccomp is None for _, r in attempts)
    _, last = attempts[-1]
    assert last.error is not None
    assert "did not answer within 1.50s" in last.error.message, last.error.message
