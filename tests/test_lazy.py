"""Configure is answered before the runtime's timeout even when the set-up is slow."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from nri_seccomp import lazy
from nri_seccomp.errors import Kind, Refusal
from nri_seccomp.nri.pb import nri_pb2
from nri_seccomp.nri.stub import RuntimeInfo


class SlowPlugin:
    """Stands in for the seccomp plugin: its import takes ``load_seconds``."""

    def __init__(self) -> None:
        self.configured: list[str] = []

    async def configure(self, text: str, runtime: RuntimeInfo) -> None:
        if "bad" in text:
            raise Refusal(Kind.INVALID, "bad configuration")
        lazy._check(text, None)  # what the seccomp plugin refuses, it refuses too
        self.configured.append(text)

    async def create_container(self, pod: Any, container: Any, deadline: float) -> bytes:
        return b"answer"


@pytest.fixture
def slow_load(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    release = threading.Event()

    def load(config_path: str | None) -> SlowPlugin:
        release.wait(10)
        return SlowPlugin()

    monkeypatch.setattr(lazy, "_load", load)
    return release


RUNTIME = RuntimeInfo(name="containerd", version="v2.3.4", request_timeout=1.0)
POD, CTR = nri_pb2.PodSandbox(name="p"), nri_pb2.Container(name="c")


def test_configure_answers_before_the_timeout_and_containers_retry(
        slow_load: threading.Event) -> None:
    async def go() -> None:
        plugin = lazy.LazySeccompPlugin()
        t0 = time.monotonic()
        await plugin.configure("registry: {allowed: ['r.example/*']}\n", RUNTIME)
        answered = time.monotonic() - t0
        assert answered < RUNTIME.request_timeout - 0.3, answered
        t0 = time.monotonic()
        with pytest.raises(Refusal) as info:
            await plugin.create_container(POD, CTR, time.monotonic() + 2)
        assert info.value.kind is Kind.RETRY and "still starting" in str(info.value)
        assert time.monotonic() - t0 < lazy.STARTING_WAIT + 0.3
        slow_load.set()
        for _ in range(100):
            if plugin._setup is not None and plugin._setup.done():
                break
            await asyncio.sleep(0.02)
        assert await plugin.create_container(POD, CTR, time.monotonic() + 2) == b"answer"

    asyncio.run(go())


def test_a_bad_configuration_is_refused_even_while_starting(slow_load: threading.Event) -> None:
    async def go() -> None:
        plugin = lazy.LazySeccompPlugin()
        with pytest.raises(Refusal) as info:
            await plugin.configure("cache_max_bytes: many\n", RUNTIME)
        assert info.value.kind is Kind.INVALID
        slow_load.set()
        with pytest.raises(Refusal) as failed:
            await plugin.create_container(POD, CTR, time.monotonic() + 2)
        assert failed.value.kind is Kind.UNUSABLE  # never let through

    asyncio.run(go())


def test_quick_set_up_answers_configure_with_its_own_result(
        slow_load: threading.Event) -> None:
    slow_load.set()

    async def go() -> None:
        plugin = lazy.LazySeccompPlugin()
        with pytest.raises(Refusal, match="bad configuration"):
            await plugin.configure("bad", RUNTIME)
        await plugin.configure("log_level: info\n", RUNTIME)
        assert await plugin.create_container(POD, CTR, time.monotonic() + 2) == b"answer"

    asyncio.run(go())
