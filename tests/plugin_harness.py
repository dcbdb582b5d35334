"""Run the real plugin subprocess against a real registry, through the runtime driver."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools import driver
from nri_seccomp.nri.pb import nri_pb2


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until_settled(session_conn: driver.PluginConnection, p: nri_pb2.PodSandbox,
                        c: nri_pb2.Container, limit: float = 30.0) -> list[driver.CreateResult]:
    """Retry as the kubelet does until the answer is no longer 'retry'."""
    results = []
    end = time.monotonic() + limit
    while time.monotonic() < end:
        r = await session_conn.create_container(p, c)
        results.append(r)
        if r.error is None or "retry" not in r.error.message:
            break
        await asyncio.sleep(0.2)
    return results


@dataclass
class Session:
    conn: driver.PluginConnection
    log: str = ""
    exit_code: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def plugin(
    config: str,
    runtime: driver.RuntimeVersion | None = None,
    request_timeout: float = 2.0,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Session]:
    """The plugin started as containerd starts it, configured with ``config``; ``env``
    adds to this process's environment.

    After the block the socket is closed; ``session.log`` holds the plugin's stderr
    and ``session.exit_code`` its exit code.
    """
    conn = await driver.spawn_plugin(
        driver.plugin_command(),
        runtime=runtime or driver.RuntimeVersion.containerd("v2.3.0"),
        config=config,
        request_timeout=request_timeout,
        stderr=asyncio.subprocess.PIPE,
        env=None if env is None else {**os.environ, **env},
    )
    session = Session(conn)
    try:
        await conn.handshake()
        yield session
    finally:
        assert conn.process is not None and conn.process.stderr is not None
        stderr_task = asyncio.create_task(conn.process.stderr.read())
        session.exit_code = await conn.wait_closed()
        session.log = (await stderr_task).decode()


def base_config(cache_dir: Path, registry: str, extra: str = "",
                allowed: list[str] | None = None, registry_extra: str = "") -> str:
    """``registry`` is "host:port" or several, comma-separated: plain HTTP, each allowed
    (``allowed`` replaces the default "host:port/*" patterns); ``registry_extra`` adds
    keys to the ``registry`` mapping, in flow style ("timeout: 1, tls_verify: false")."""
    hosts = [h.strip() for h in registry.split(",") if h.strip()]
    patterns = allowed if allowed is not None else [f"{h}/*" for h in hosts]
    listed = ", ".join(f"'{p}'" for p in patterns)
    more = f", {registry_extra}" if registry_extra else ""
    return (f"cache_dir: {cache_dir}\n"
            f"registry: {{insecure: [{', '.join(hosts)}], allowed: [{listed}]{more}}}\n{extra}")


def container(
    name: str = "app",
    profile: str | None = None,
    annotations: dict[str, str] | None = None,
    image: str = "",
    image_digest: str = "",
) -> nri_pb2.Container:
    """A container as containerd describes it; ``profile`` is None (unset), "unconfined",
    "runtime-default" or "localhost". ``image_digest`` fills ``Container.image`` as
    containerd 2.4 (NRI v0.12.2) does, with ``image`` as its name."""
    c = nri_pb2.Container(id=f"id-{name}", pod_sandbox_id="pod-id", name=name,
                          annotations=annotations or {})
    if image:
        c.annotations["io.kubernetes.cri.image-name"] = image
    if image_digest:
        c.image.name = image
        c.image.digest = image_digest
    if profile is not None:
        types = nri_pb2.SecurityProfile
        c.linux.seccomp_profile.profile_type = {
            "unconfined": types.UNCONFINED,
            "runtime-default": types.RUNTIME_DEFAULT,
            "localhost": types.LOCALHOST,
        }[profile]
        if profile == "runtime-default":
            # RuntimeDefault is the enum's zero: the message is present but empty
            c.linux.seccomp_profile.SetInParent()
        if profile == "localhost":
            c.linux.seccomp_profile.localhost_ref = "/var/lib/kubelet/seccomp/local.json"
    return c


def pod(annotations: dict[str, str] | None = None) -> nri_pb2.PodSandbox:
    return nri_pb2.PodSandbox(id="pod-id", name="pod", namespace="default", uid="uid",
                              annotations=annotations or {})
