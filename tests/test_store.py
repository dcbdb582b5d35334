"""The store's outcomes over in-memory fakes of its Protocols: milliseconds, no processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import pytest

from nri_seccomp.decide.reference import parse
from nri_seccomp.registry import errors
from nri_seccomp.service.store import (
    HELD_AFTER_RECHECK,
    NotReady,
    ProfileRejected,
    ProfileStore,
    StoreSettings,
)

from .fakes import BOMB, GOOD, NODE, SLOW, Clock, FakeCompiler, FakeDisk, FakeRegistry


def make(registry: FakeRegistry, disk: FakeDisk | None = None, clock: Clock | None = None,
         **settings: object) -> tuple[ProfileStore, FakeCompiler]:
    compiler = FakeCompiler()
    store = ProfileStore(registry, disk, None, compiler,
                         StoreSettings(**settings),  # type: ignore[arg-type]
                         NODE, clock=clock or Clock())
    return store, compiler


def run(coro: Awaitable[object]) -> object:
    async def main() -> object:
        return await coro
    return asyncio.run(main())


def soon() -> float:
    return time.monotonic() + 1.0


TAG = parse("r.example/p/a:1")


def test_tag_fresh_is_served_from_memory_without_the_registry() -> None:
    reg = FakeRegistry({"r.example/p/a:1": GOOD})
    store, compiler = make(reg)

    async def go() -> list[str]:
        return [(await store.get(TAG, soon())).source for _ in range(3)]

    assert run(go()) == ["registry", "memory", "memory"]
    assert reg.calls == [str(TAG)] and compiler.compiles == 1


def test_tag_past_ttl_is_rechecked_and_unchanged_layer_not_downloaded() -> None:
    reg, disk, clock = FakeRegistry({"r.example/p/a:1": GOOD}), FakeDisk(), Clock()
    store, compiler = make(reg, disk, clock, tag_ttl=10.0)

    async def go() -> list[str]:
        first = (await store.get(TAG, soon())).source
        clock.now += 11
        return [first, (await store.get(TAG, soon())).source]

    # the second time only the manifest came from the registry: not "registry"
    assert run(go()) == ["registry", HELD_AFTER_RECHECK]
    assert len(reg.calls) == 2 and reg.downloads == 1 and compiler.compiles == 1


def test_fresh_for_a_digest_the_tag_no_longer_names_is_zero() -> None:
    """What was compiled for the tag's old digest is not served as fresh once a re-check
    moved the tag (the handler files answers for as long as this says)."""
    reg, clock = FakeRegistry({"r.example/p/a:1": GOOD}), Clock()
    store, _ = make(reg, None, clock, tag_ttl=10.0)

    async def go() -> tuple[float, float, float, float]:
        old = (await store.get(TAG, soon())).compiled.digest
        fresh = store.fresh_for(TAG, old)
        clock.now += 11
        reg.layers["r.example/p/a:1"] = GOOD + b" "
        new = (await store.get(TAG, soon())).compiled.digest
        assert new != old
        return fresh, store.fresh_for(TAG, old), store.fresh_for(TAG, new), store.fresh_for(TAG)

    fresh_old, stale_old, fresh_new, fresh_any = run(go())  # type: ignore[misc]
    assert fresh_old == 10.0 and stale_old == 0.0 and fresh_new == fresh_any == 10.0


@pytest.mark.parametrize(("age", "changed", "expected"), [
    (5.0, False, "cache"),  # within tag_ttl: the registry is not asked
    (11.0, False, HELD_AFTER_RECHECK),  # re-checked, same layer: no download
    (11.0, True, "registry"),  # re-checked, the tag moved: the new layer downloaded
])
def test_source_after_a_restart_says_what_was_downloaded(age: float, changed: bool,
                                                         expected: str) -> None:
    """A new process over the same disk cache (/work/rt/RESULTS.md A2): the decision's log
    line said "registry" for a profile whose bytes came from the disk."""
    reg, disk, clock = FakeRegistry({"r.example/p/a:1": GOOD}), FakeDisk(), Clock()
    first, _ = make(reg, disk, clock, tag_ttl=10.0)
    assert run(first.get(TAG, soon())).source == "registry"  # type: ignore[attr-defined]
    clock.now += age
    if changed:
        reg.layers["r.example/p/a:1"] = GOOD + b" "
    second, _ = make(reg, disk, clock, tag_ttl=10.0)  # a restart: empty memory, same disk
    assert run(second.get(TAG, soon())).source == expected  # type: ignore[attr-defined]
    assert reg.downloads == (2 if changed else 1)


def test_tag_past_ttl_with_registry_down_is_served_stale() -> None:
    reg, disk, clock = FakeRegistry({"r.example/p/a:1": GOOD}), FakeDisk(), Clock()
    store, _ = make(reg, disk, clock, tag_ttl=10.0)

    async def go() -> str:
        await store.get(TAG, soon())
        clock.now += 11
        reg.down = True
        return (await store.get(TAG, soon())).source

    assert run(go()) == "stale"


def test_tag_past_stale_max_age_with_registry_down_fails() -> None:
    reg, disk, clock = FakeRegistry({"r.example/p/a:1": GOOD}), FakeDisk(), Clock()
    store, _ = make(reg, disk, clock, tag_ttl=10.0, stale_if_error_max_age=20.0)

    async def go() -> None:
        await store.get(TAG, soon())
        clock.now += 21
        reg.down = True
        await store.get(TAG, soon())

    with pytest.raises(errors.RegistryUnavailable):
        run(go())


def test_slow_recheck_serves_the_cached_profile_at_once() -> None:
    """A cached profile is always served: a hanging re-check does not hold the container."""
    reg, clock = FakeRegistry({"r.example/p/a:1": GOOD}), Clock()
    store, _ = make(reg, None, clock, tag_ttl=10.0, revalidate_wait=0.05)

    async def go() -> str:
        await store.get(TAG, soon())
        clock.now += 11
        reg.gate = asyncio.Event()
        ready = await store.get(TAG, soon())
        reg.gate.set()
        return ready.source

    assert run(go()) == "stale"


def test_digest_reference_is_served_from_disk_with_registry_down() -> None:
    ref = parse(f"r.example/p/a:1@sha256:{'1' * 64}")
    reg, disk = FakeRegistry({"r.example/p/a:1": GOOD}), FakeDisk()
    first, _ = make(reg, disk)
    run(first.get(ref, soon()))
    reg.down = True
    second, compiler = make(reg, disk)  # a restart: empty memory, same disk
    ready = run(second.get(ref, soon()))
    assert ready.source == "cache" and compiler.compiles == 1  # type: ignore[attr-defined]


def test_single_flight_one_fetch_for_many_waiters() -> None:
    reg = FakeRegistry({"r.example/p/a:1": GOOD}, gate=asyncio.Event())
    store, compiler = make(reg)

    async def go() -> list[str]:
        waiters = [asyncio.create_task(store.get(TAG, soon())) for _ in range(50)]
        await asyncio.sleep(0.01)
        assert reg.gate is not None
        reg.gate.set()
        return [r.source for r in await asyncio.gather(*waiters)]

    assert run(go()) == ["registry"] * 50
    assert reg.calls == [str(TAG)] and compiler.compiles == 1


def test_deadline_passes_and_the_fetch_goes_on_for_the_retry() -> None:
    reg = FakeRegistry({"r.example/p/a:1": GOOD}, gate=asyncio.Event())
    store, _ = make(reg)

    async def go() -> str:
        with pytest.raises(NotReady, match="is still being fetched, retry"):
            await store.get(TAG, time.monotonic() + 0.02)
        assert reg.gate is not None
        reg.gate.set()
        await asyncio.sleep(0.01)
        return (await store.get(TAG, soon())).source

    assert run(go()) == "memory"
    assert len(reg.calls) == 1


def test_fetch_slower_than_the_answer_finishes_under_its_own_bound() -> None:
    """A registry slower than the request's deadline: the request is answered "retry",
    the fetch runs on under ``background_total`` (not the request's deadline), and
    the kubelet's retry is served."""
    reg = FakeRegistry({"r.example/p/a:1": GOOD}, delay=0.3)
    store, _ = make(reg, background_total=5.0)

    async def go() -> str:
        started = time.monotonic()
        with pytest.raises(NotReady, match="is still being fetched, retry"):
            await store.get(TAG, time.monotonic() + 0.05)
        assert time.monotonic() - started < 0.1
        [deadline] = reg.deadlines
        assert deadline - started == pytest.approx(5.0, abs=0.1)
        await asyncio.sleep(0.35)
        return (await store.get(TAG, soon())).source

    assert run(go()) == "memory"
    assert len(reg.calls) == 1


def test_fetch_past_background_total_is_cut_with_its_own_message() -> None:
    """A registry slower than ``background_total``: the fetch is cut there, and the
    retries within ``failure_ttl`` read which registry and which bound, at no cost."""
    reg = FakeRegistry({"r.example/p/a:1": GOOD}, delay=30.0)
    store, _ = make(reg, background_total=0.2, failure_ttl=5.0)

    async def go() -> list[str]:
        with pytest.raises(NotReady):
            await store.get(TAG, time.monotonic() + 0.05)
        await asyncio.sleep(0.25)
        messages = []
        for _ in range(2):
            with pytest.raises(errors.RegistryUnavailable) as info:
                await store.get(TAG, soon())
            assert info.value.registry == "r.example"
            messages.append(str(info.value))
        return messages

    first, second = run(go())
    assert first == second == (
        "r.example/p/a:1: registry r.example did not serve the profile within 0.2 s "
        "(registry.background_total): registry r.example did not answer before the deadline")
    assert len(reg.calls) == 1


def test_prefetch_then_get_costs_one_fetch() -> None:
    reg = FakeRegistry({"r.example/p/a:1": GOOD})
    store, _ = make(reg)

    async def go() -> tuple[bool, bool, str]:
        started = store.prefetch(TAG, owner="ns")
        again = store.prefetch(TAG, owner="ns")
        await asyncio.sleep(0.01)
        return started, again, (await store.get(TAG, soon(), owner="ns")).source

    assert run(go()) == (True, False, "memory")
    assert len(reg.calls) == 1


def test_policy_applies_to_cached_profiles() -> None:
    reg = FakeRegistry({"r.example/p/a:1": GOOD})
    store, _ = make(reg)

    async def go() -> None:
        await store.get(TAG, soon())
        store.set_fetcher(FakeRegistry({"r.example/p/a:1": GOOD}, allowed=("other.example/",)))
        await store.get(TAG, soon())

    with pytest.raises(errors.PolicyError):
        run(go())


def test_refused_layer_is_remembered_and_never_compiled_again() -> None:
    reg = FakeRegistry({"r.example/p/a:1": BOMB, "r.example/p/b:1": BOMB})
    store, compiler = make(reg, FakeDisk(), failure_ttl=0.0)

    async def go() -> list[str]:
        messages = []
        for name in ("a", "a", "b"):
            with pytest.raises(ProfileRejected) as info:
                await store.get(parse(f"r.example/p/{name}:1"), soon())
            messages.append(str(info.value))
        return messages

    messages = run(go())
    assert compiler.compiles == 1  # the same layer under another tag costs nothing either
    assert all("too many conditions" in m for m in messages)  # type: ignore[union-attr]


def test_layer_stopped_at_the_wall_clock_is_refused_briefly_then_compiled_again() -> None:
    # the wall-clock budget says as much about a busy node as about the profile: the
    # refusal lasts failure_ttl, not refused_ttl
    reg = FakeRegistry({"r.example/p/a:1": SLOW})
    store, compiler = make(reg, FakeDisk(), failure_ttl=0.05, refused_ttl=600.0)

    async def go() -> str:
        with pytest.raises(ProfileRejected, match="wall-clock"):
            await store.get(TAG, soon())
        with pytest.raises(ProfileRejected, match="wall-clock"):
            await store.get(TAG, soon())  # within failure_ttl: from memory
        assert compiler.compiles == 1
        await asyncio.sleep(0.1)
        ready = await store.get(TAG, soon())
        return ready.compiled.digest

    assert run(go())
    assert compiler.compiles == 2


def test_failed_reference_is_answered_from_memory_for_failure_ttl() -> None:
    reg = FakeRegistry({})
    store, _ = make(reg, failure_ttl=60.0)

    async def go() -> None:
        for _ in range(3):
            with pytest.raises(errors.NotFound):
                await store.get(TAG, soon())

    run(go())
    assert len(reg.calls) == 1


def test_one_namespace_cannot_fill_the_fetch_slots() -> None:
    reg = FakeRegistry({f"r.example/p/x{i}:1": GOOD for i in range(10)}
                       | {"r.example/p/other:1": GOOD}, gate=asyncio.Event())
    store, _ = make(reg, owner_inflight_limit=4, owner_concurrency=2)

    async def go() -> str:
        started = [store.prefetch(parse(f"r.example/p/x{i}:1"), owner="greedy")
                   for i in range(10)]
        assert started == [True] * 4 + [False] * 6
        with pytest.raises(NotReady, match="4 profiles of greedy are being fetched already"):
            await store.get(parse("r.example/p/x9:1"), soon(), owner="greedy")
        other = asyncio.create_task(store.get(parse("r.example/p/other:1"), soon(),
                                              owner="quiet"))
        await asyncio.sleep(0.01)
        # two of greedy's resolve at a time; the quiet namespace's runs beside them
        assert reg.active == 3
        assert reg.gate is not None
        reg.gate.set()
        return (await other).source

    assert run(go()) == "registry"


def test_one_registry_gets_at_most_registry_concurrency_fetches() -> None:
    reg = FakeRegistry({f"r.example/p/x{i}:1": GOOD for i in range(10)}, gate=asyncio.Event())
    store, _ = make(reg, registry_concurrency=3, owner_concurrency=10)

    async def go() -> None:
        for i in range(10):
            store.prefetch(parse(f"r.example/p/x{i}:1"), owner="ns")
        await asyncio.sleep(0.01)
        assert reg.active == 3
        assert reg.gate is not None
        reg.gate.set()
        await asyncio.sleep(0.01)

    run(go())
    assert reg.peak == 3


def test_memory_is_bounded_in_bytes() -> None:
    layers = {f"r.example/p/x{i}:1": f"profile {i} ".encode() * 100 for i in range(20)}
    reg = FakeRegistry(layers)
    store, _ = make(reg, memory_max_bytes=4 * 1024)

    async def go() -> None:
        for i in range(20):
            await store.get(parse(f"r.example/p/x{i}:1"), soon())

    run(go())
    held = store._compiled
    assert held.total_bytes <= 4 * 1024 and 0 < len(held) < 20
