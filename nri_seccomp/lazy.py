"""Register first, import the rest while Configure and Synchronize arrive.

containerd waits for every plugin's registration at its start and after each
restart, and with ``required_plugins`` no container starts on the node in the
meantime. The transport (``nri``) imports in about a third of the time the
whole plugin takes (registry client, libseccomp, the profile code, the worker
pool), so the plugin object the stub drives is this stand-in: it has the
seccomp plugin's handlers, and imports and builds the real one, off the event
loop, when the first Configure arrives. Configure answers once that is done,
well within the runtime's request timeout; every later call goes straight through.

On a loaded node the imports and the worker pool's start can take longer than the
runtime's Configure timeout (2 s on containerd; 1.7 s seen under load), and a
pre-installed plugin that misses it is dropped for good. So Configure is answered
``CONFIGURE_MARGIN`` before that timeout at the latest: the configuration text is
checked (a bad one is still refused), and the set-up goes on. A container that
asks meanwhile waits ``STARTING_WAIT`` at most and is answered "retry"; one that
asks after a failed set-up is refused with the reason, never let through.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from nri_seccomp.errors import Kind, Refusal
from nri_seccomp.nri.pb import nri_pb2
from nri_seccomp.nri.stub import RuntimeInfo

if TYPE_CHECKING:
    from nri_seccomp.service.plugin import SeccompPlugin


log = logging.getLogger(__name__)

#: Configure is answered at least this long before the runtime's request timeout
CONFIGURE_MARGIN = 0.5
#: how long a request waits for a set-up still under way before "retry"
STARTING_WAIT = 0.5


def _check(text: str, config_path: str | None) -> None:
    """Refuse a configuration that cannot load, without the rest of the plugin."""
    from nri_seccomp import config  # ~40 ms (YAML): in a thread, only when needed

    try:
        if config_path:
            config.load_file(config_path)
        else:
            config.load(text, "NRI plugin configuration")
    except (config.ConfigError, ValueError) as exc:
        raise Refusal(Kind.INVALID, str(exc)) from exc


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
        #: the latest Configure's set-up (import, then the plugin's own configure)
        self._setup: asyncio.Future[None] | None = None
        #: set once a set-up succeeded: later requests go straight through
        self._configured: SeccompPlugin | None = None
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
        previous = self._setup

        async def setup() -> None:
            if previous is not None:  # a reconnect's Configure applies after the first
                with contextlib.suppress(Exception):
                    await previous
            await (await self._plugin()).configure(text, runtime)

        task = asyncio.ensure_future(setup())
        self._setup = task
        task.add_done_callback(_report)
        budget = max(runtime.request_timeout - CONFIGURE_MARGIN, 0.1)
        try:
            await asyncio.wait_for(asyncio.shield(task), budget)
        except TimeoutError:
            await asyncio.to_thread(_check, text, self._config_path)
            log.warning("still starting %.1fs into Configure: answered before the runtime's "
                        "timeout, containers are answered 'retry' until the set-up is done",
                        budget)

    async def _ready(self, deadline: float) -> SeccompPlugin:
        """The configured plugin, or a refusal saying why not (yet)."""
        setup = self._setup
        if setup is None:
            raise Refusal(Kind.RETRY, "the plugin is not configured yet, retry")
        if not setup.done():
            wait = min(STARTING_WAIT, max(deadline - time.monotonic(), 0))
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(setup), wait)
            if not setup.done():
                raise Refusal(Kind.RETRY, "the plugin is still starting, retry")
        failed = None if setup.cancelled() else setup.exception()
        if failed is not None or self._real is None or setup.cancelled():
            raise Refusal(Kind.UNUSABLE, f"the plugin could not start: {failed}")
        return self._real

    async def run_pod_sandbox(self, pod: nri_pb2.PodSandbox) -> None:
        # preparation only: never worth holding the pod's creation for the set-up
        setup = self._setup
        if self._real is not None and setup is not None and setup.done() and (
                not setup.cancelled() and setup.exception() is None):
            await self._real.run_pod_sandbox(pod)

    async def create_container(
        self, pod: nri_pb2.PodSandbox, container: nri_pb2.Container, deadline: float
    ) -> nri_pb2.ContainerAdjustment | bytes | None:
        real = self._configured if self._configured is not None else await self._ready(
            deadline)
        if self._configured is None and self._setup is not None and self._setup.done():
            self._configured = real
            # set up: the stub calls the seccomp plugin's handler itself from now on
            self.__dict__["create_container"] = real.create_container
        return await real.create_container(pod, container, deadline)

    async def on_disconnect(self) -> None:
        if self._real is not None:
            await self._real.on_disconnect()

    async def shutdown(self) -> None:
        if self._real is not None:
            await self._real.shutdown()


def _report(task: asyncio.Future[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, Refusal):
        log.error("plugin set-up failed: %s", exc)
