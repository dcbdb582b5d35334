"""Register first, import the rest while Configure and Synchronize arrive.

containerd waits for every plugin's registration at its start and after each
restart, and with ``required_plugins`` no container starts on the node in the
meantime. The transport (``nri``) imports in about a third of the time the
whole plugin takes (registry client, libseccomp, the profile code, the worker
pool), so the plugin object the stub drives is this stand-in: it has the
seccomp plugin's handlers, and imports and builds the real one, off the event
loop, when the first Configure arrives. Configure answers once that is done,
well within the runtime's request timeout; every later call goes straight through.
"""

from __future__ import annotations

import asyncio
import importlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from nri_seccomp.nri.pb import nri_pb2
from nri_seccomp.nri.stub import RuntimeInfo

if TYPE_CHECKING:
    from nri_seccomp.service.plugin import SeccompPlugin


def _load(config_path: str | None) -> SeccompPlugin:
    module: Any = importlib.import_module("nri_seccomp.service.plugin")
    plugin: SeccompPlugin = module.SeccompPlugin(config_path=config_path)
    # httpcore loads anyio's asyncio backend at its first connection, about 40 ms of
    # imports that would otherwise run on the event loop in the first fetch
    anyio = importlib.import_module("anyio")
    anyio.run(anyio.sleep, 0, backend="asyncio")
    return plugin


class LazySeccompPlugin:
    """The seccomp plugin's handlers, with the plugin itself built at the first Configure."""

    def __init__(self, config_path: str | None = None) -> None:
        self._config_path = config_path
        self._real: SeccompPlugin | None = None
        # starts now, in a thread: by the time Configure arrives the import is mostly
        # done, and the event loop serves the registration meanwhile
        pool = ThreadPoolExecutor(1, thread_name_prefix="load")
        self._loading: Future[SeccompPlugin] = pool.submit(_load, config_path)
        pool.shutdown(wait=False)

    async def _plugin(self) -> SeccompPlugin:
        if self._real is None:
            self._real = await asyncio.wrap_future(self._loading)
        return self._real

    async def configure(self, text: str, runtime: RuntimeInfo) -> None:
        await (await self._plugin()).configure(text, runtime)

    async def run_pod_sandbox(self, pod: nri_pb2.PodSandbox) -> None:
        await (await self._plugin()).run_pod_sandbox(pod)

    async def create_container(
        self, pod: nri_pb2.PodSandbox, container: nri_pb2.Container, deadline: float
    ) -> nri_pb2.ContainerAdjustment | bytes | None:
        real = self._real if self._real is not None else await self._plugin()
        return await real.create_container(pod, container, deadline)

    async def on_disconnect(self) -> None:
        if self._real is not None:
            await self._real.on_disconnect()

    async def shutdown(self) -> None:
        if self._real is not None:
            await self._real.shutdown()
