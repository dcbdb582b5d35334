"""The CreateContainer handler over fakes of its services: CRI-O's outcomes as a table, in ms.

The registry and the disk are in-memory fakes; libseccomp, the profile checks and
the errno translation are the real ones, run in this process.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from nri_seccomp import config, wiring
from nri_seccomp.decide import resolver, runtimes
from nri_seccomp.decide.resolver import KEY_V1, KEY_V2
from nri_seccomp.errors import Kind, Refusal
from nri_seccomp.nri.pb import nri_pb2
from nri_seccomp.service.images import ImageAnnotations, RegistrySource
from nri_seccomp.service.plugin import SeccompPlugin
from nri_seccomp.service.store import ProfileStore

from .fakes import NODE, FakeDisk, FakeRegistry, InlineWorkers

PROFILE = json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
    {"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW"}]}).encode()
LISTENER = json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/agent.sock",
                       "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}).encode()
REF = "r.example/p/prof:1"
IMAGE = "r.example/app/img:1"


def handler(caps: runtimes.RuntimeCaps, registry: FakeRegistry,
            cfg: config.Config | None = None) -> SeccompPlugin:
    plugin = SeccompPlugin()
    plugin.config = cfg or config.Config()
    plugin.caps = caps
    plugin.policy_changed()
    store = ProfileStore(registry, FakeDisk(), None, InlineWorkers(),  # type: ignore[arg-type]
                         wiring.store_settings(plugin.config), NODE)
    images = ImageAnnotations(RegistrySource(registry))
    plugin.services = wiring.Services(store, images, InlineWorkers(),
                                      ThreadPoolExecutor(1))  # type: ignore[arg-type]
    return plugin


def ctr(profile: str | None = None, image: str = IMAGE, name: str = "app") -> nri_pb2.Container:
    c = nri_pb2.Container(name=name, annotations={"io.kubernetes.cri.image-name": image})
    if profile == "unconfined":
        c.linux.seccomp_profile.profile_type = nri_pb2.SecurityProfile.UNCONFINED
    elif profile == "runtime-default":
        c.linux.seccomp_profile.SetInParent()
    elif profile == "localhost":
        c.linux.seccomp_profile.profile_type = nri_pb2.SecurityProfile.LOCALHOST
        c.linux.seccomp_profile.localhost_ref = "/var/lib/kubelet/seccomp/x.json"
    return c


def pod(annotations: dict[str, str] | None = None) -> nri_pb2.PodSandbox:
    return nri_pb2.PodSandbox(name="pod", namespace="ns", annotations=annotations or {})


C23 = runtimes.capabilities("containerd", "v2.3.0", "v0.12.0")
C224 = runtimes.capabilities("containerd", "v2.2.4")
C17 = runtimes.capabilities("containerd", "v1.7.20")

CASES = [
    # (name, pod annotations, image annotations, container profile, runtime, expect)
    ("unannotated", {}, {}, None, C23, None),
    ("pod KEY/POD", {f"{KEY_V1}/POD": REF}, {}, None, C23, "applied"),
    ("pod v2 KEY/<container>", {f"{KEY_V2}/app": REF}, {}, "unconfined", C23, "applied"),
    ("pod annotation for another container", {f"{KEY_V1}/other": REF}, {}, None, C23, None),
    ("empty value opts out", {f"{KEY_V1}/POD": REF, f"{KEY_V1}/app": ""}, {}, None, C23, None),
    ("image bare key", {}, {KEY_V1: REF}, None, C23, "applied"),
    ("image KEY/<container>", {}, {f"{KEY_V1}/app": REF}, None, C23, "applied"),
    ("RuntimeDefault wins", {f"{KEY_V1}/POD": REF}, {}, "runtime-default", C23, None),
    ("Localhost wins", {f"{KEY_V1}/POD": REF}, {}, "localhost", C23, None),
    ("runtime drops seccomp adjustments", {f"{KEY_V1}/POD": REF}, {}, None, C17,
     Kind.UNUSABLE),
    ("RuntimeDefault on an old runtime starts", {f"{KEY_V1}/POD": REF}, {}, "runtime-default",
     C17, None),
    ("2.2.4 carries an allow-list", {f"{KEY_V1}/POD": REF}, {}, None, C224, "applied"),
    ("control character in the value", {f"{KEY_V1}/POD": "r.example/p\n:1"}, {}, None, C23,
     Kind.INVALID),
    ("not a reference", {f"{KEY_V1}/POD": "https://r.example/p"}, {}, None, C23, Kind.INVALID),
    ("registry not allowed", {f"{KEY_V1}/POD": "evil.example/p/x:1"}, {}, None, C23,
     Kind.FORBIDDEN),
    ("missing artifact", {f"{KEY_V1}/POD": "r.example/p/missing:1"}, {}, None, C23,
     Kind.UNUSABLE),
    ("listener profile", {f"{KEY_V1}/POD": "r.example/p/listener:1"}, {}, None, C23,
     Kind.FORBIDDEN),
]


@pytest.mark.parametrize(("name", "pod_ann", "image_ann", "profile", "caps", "expect"), CASES,
                         ids=[c[0] for c in CASES])
def test_outcomes(name: str, pod_ann: dict[str, str], image_ann: dict[str, str],
                  profile: str | None, caps: runtimes.RuntimeCaps,
                  expect: str | Kind | None) -> None:
    reg = FakeRegistry({REF: PROFILE, "r.example/p/listener:1": LISTENER},
                       images={IMAGE: image_ann})
    plugin = handler(caps, reg)

    async def go() -> nri_pb2.ContainerAdjustment | None:
        raw = await plugin.create_container(pod(pod_ann), ctr(profile), time.monotonic() + 2.0)
        return None if raw is None else nri_pb2.ContainerAdjustment.FromString(raw)

    if isinstance(expect, Kind):
        with pytest.raises(Refusal) as info:
            asyncio.run(go())
        assert info.value.kind is expect, info.value
        return
    adjust = asyncio.run(go())
    if expect is None:
        assert adjust is None
    else:
        assert adjust is not None
        seccomp = adjust.linux.seccomp_policy
        assert seccomp.default_action == "SCMP_ACT_ERRNO"
        assert [list(r.names) for r in seccomp.syscalls] == [["read", "write", "exit_group"]]


def test_ineligible_container_asks_no_image() -> None:
    reg = FakeRegistry({REF: PROFILE}, images={IMAGE: {KEY_V1: REF}})
    plugin = handler(C23, reg)
    adjust = asyncio.run(plugin.create_container(pod(), ctr("localhost"), time.monotonic() + 2))
    assert adjust is None and reg.calls == []


def test_not_ready_within_answer_wait_is_retry_and_the_work_goes_on() -> None:
    reg = FakeRegistry({REF: PROFILE})
    reg.gate = None
    plugin = handler(C23, reg, config.Config(answer_wait=0.05))

    async def go() -> tuple[Kind, bytes | None]:
        reg.gate = asyncio.Event()
        with pytest.raises(Refusal) as info:
            await plugin.create_container(pod({f"{KEY_V1}/POD": REF}), ctr(),
                                          time.monotonic() + 2)
        reg.gate.set()
        await asyncio.sleep(0.05)
        again = await plugin.create_container(pod({f"{KEY_V1}/POD": REF}), ctr(),
                                              time.monotonic() + 2)
        return info.value.kind, again

    kind, again = asyncio.run(go())
    assert kind is Kind.RETRY and again is not None
    assert reg.calls == [REF]


def test_translation_is_done_once_per_profile_and_runtime() -> None:
    reg = FakeRegistry({REF: PROFILE})
    plugin = handler(C23, reg)
    assert plugin.services is not None
    workers = plugin.services.workers

    async def go() -> None:
        for _ in range(5):
            await plugin.create_container(pod({f"{KEY_V1}/POD": REF}), ctr(),
                                          time.monotonic() + 2)

    asyncio.run(go())
    assert workers.translated == 1  # type: ignore[attr-defined]


def test_pod_creation_prepares_the_answer_before_the_container_asks() -> None:
    """Fetch, compile and the runtime's translation happen at RunPodSandbox."""
    reg = FakeRegistry({REF: PROFILE})
    plugin = handler(C23, reg)
    assert plugin.services is not None
    workers = plugin.services.workers

    async def go() -> bytes | None:
        await plugin.run_pod_sandbox(pod({f"{KEY_V1}/POD": REF}))
        for _ in range(100):
            if workers.translated:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.01)
        # no waiting at all now: an answer_wait of zero would still be served
        plugin.config = config.Config(answer_wait=0.0)
        return await plugin.create_container(pod({f"{KEY_V1}/POD": REF}), ctr(),
                                             time.monotonic() + 2)

    assert asyncio.run(go()) is not None
    assert workers.translated == 1 and reg.calls == [REF]  # type: ignore[attr-defined]


def test_pod_creation_files_the_answer_the_container_would_have_filed() -> None:
    """What RunPodSandbox prepares is filed for the cached path under each annotation
    that names it, exactly as the container's own request files it: the pod's first
    container costs what a cached one does."""
    ref2 = "r.example/p/other:1"
    annotations = {f"{KEY_V1}/POD": REF, f"{KEY_V2}/app": ref2, f"{KEY_V2}/side": ref2}

    async def prepared() -> dict[str, tuple[bytes, str]]:
        plugin = handler(C23, FakeRegistry({REF: PROFILE, ref2: PROFILE}))
        await plugin.run_pod_sandbox(pod(annotations))
        await asyncio.gather(*plugin._warming)
        return {k: (h.answer.adjustment, h.head) for k, h in plugin._hot.items()}

    async def asked() -> dict[str, tuple[bytes, str]]:
        plugin = handler(C23, FakeRegistry({REF: PROFILE, ref2: PROFILE}))
        for name in ("app", "side", "other"):  # "other" takes the pod's profile
            assert await plugin.create_container(pod(annotations), ctr(name=name),
                                                 time.monotonic() + 2) is not None
        return {k: (h.answer.adjustment, h.head) for k, h in plugin._hot.items()}

    filed = asyncio.run(prepared())
    assert len(filed) == 3 and filed == asyncio.run(asked())


def test_pod_creation_files_nothing_once_a_configure_voided_it() -> None:
    plugin = handler(C23, FakeRegistry({REF: PROFILE}))

    async def go() -> None:
        await plugin.run_pod_sandbox(pod({f"{KEY_V1}/POD": REF}))
        plugin.policy_changed()  # while the preparation is under way
        await asyncio.gather(*plugin._warming)

    asyncio.run(go())
    assert plugin._hot == {}


def test_an_answer_begun_before_a_configure_is_not_remembered() -> None:
    """A request that was fetching when a Configure came is answered as decided, but its
    answer is not kept for the containers after it: the allow-list or the runtime may
    have changed meanwhile."""
    reg = FakeRegistry({REF: PROFILE})
    plugin = handler(C23, reg)

    async def go() -> tuple[bytes | None, int]:
        reg.gate = asyncio.Event()
        request = asyncio.create_task(plugin.create_container(
            pod({f"{KEY_V1}/POD": REF}), ctr(), time.monotonic() + 2))
        await asyncio.sleep(0.05)  # waiting on the registry
        plugin.policy_changed()
        reg.gate.set()
        return await request, len(plugin._hot)

    answer, kept = asyncio.run(go())
    assert answer is not None and kept == 0


def test_pod_creation_files_a_bounded_number_of_answers() -> None:
    """Any key suffix is a container name to the resolver: one pod's creation files at
    most FILED_PER_POD answers, and never pushes out answers already kept."""
    from nri_seccomp.service import plugin as plugin_module

    names = [f"c{i}" for i in range(3 * plugin_module.FILED_PER_POD)]
    plugin = handler(C23, FakeRegistry({REF: PROFILE}))

    async def go() -> tuple[int, bool]:
        await plugin.create_container(pod({f"{KEY_V1}/POD": REF}), ctr(),
                                      time.monotonic() + 2)
        kept = next(iter(plugin._hot))
        await plugin.run_pod_sandbox(pod({f"{KEY_V2}/{n}": REF for n in names}))
        await asyncio.gather(*plugin._warming)
        return len(plugin._hot), kept in plugin._hot

    filed, still = asyncio.run(go())
    assert filed == 1 + plugin_module.FILED_PER_POD and still


def test_pod_creation_translates_a_cached_profile_again_after_a_reconnect() -> None:
    reg = FakeRegistry({REF: PROFILE})
    plugin = handler(C23, reg)
    assert plugin.services is not None
    workers = plugin.services.workers

    async def go() -> None:
        await plugin.create_container(pod({f"{KEY_V1}/POD": REF}), ctr(), time.monotonic() + 2)
        await plugin.on_disconnect()  # the runtime restarted: translations are forgotten
        await plugin.run_pod_sandbox(pod({f"{KEY_V1}/POD": REF}))
        for _ in range(100):
            if workers.translated == 2:  # type: ignore[attr-defined]
                return
            await asyncio.sleep(0.01)

    asyncio.run(go())
    assert workers.translated == 2 and reg.calls == [REF]  # type: ignore[attr-defined]


def test_translation_stopped_at_the_wall_clock_is_not_kept() -> None:
    """A translation that failed because the node was busy (or a worker died) is
    tried again by the next container; one the runtime cannot carry is kept."""
    from nri_seccomp.seccomp import compat
    from nri_seccomp.seccomp.worker import CompileTimedOut
    from nri_seccomp.service.plugin import SeccompPlugin

    async def go() -> list[bool]:
        plugin = SeccompPlugin()
        kept = []
        for exc in (CompileTimedOut("wall-clock"), RuntimeError("worker died"),
                    compat.UnsupportedByRuntime("no errnoRet", runtime="containerd", errno=1)):
            key = ("sha256:" + type(exc).__name__, 1)
            fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            plugin._translations.put(key, fut)  # type: ignore[arg-type]
            fut.set_exception(exc)
            plugin._resize(key, fut)  # type: ignore[arg-type]
            fut.exception()  # retrieved: no "never retrieved" warning
            kept.append(key in plugin._translations)
        return kept

    assert asyncio.run(go()) == [False, False, True]


def test_cached_path_answers_from_memory_while_the_store_would() -> None:
    """The answer is remembered per deciding annotation for as long as the store would serve
    it from memory (a tag: tag_ttl), and forgotten when the runtime reconnects or
    configures again, after which the allow-list is asked again."""
    reg = FakeRegistry({REF: PROFILE})
    plugin = handler(C23, reg, config.Config(tag_ttl=0.3))
    p = pod({f"{KEY_V1}/POD": REF})

    async def go() -> list[int]:
        fetches = []
        for _ in range(3):
            assert await plugin.create_container(p, ctr(), time.monotonic() + 2) is not None
            fetches.append(len([c for c in reg.calls if not c.startswith("image")]))
        # remembered under the deciding annotation (its key and value)
        found = resolver.resolve(p.annotations, ctr().name)
        assert found is not None and found.log_line in plugin._hot
        await asyncio.sleep(0.4)  # past tag_ttl: the store asks the registry again
        assert await plugin.create_container(p, ctr(), time.monotonic() + 2) is not None
        fetches.append(len([c for c in reg.calls if not c.startswith("image")]))
        reg.allowed = ("other.example/",)
        await plugin.on_disconnect()
        with pytest.raises(Refusal) as info:
            await plugin.create_container(p, ctr(), time.monotonic() + 2)
        assert info.value.kind is Kind.FORBIDDEN
        return fetches

    fetches = asyncio.run(go())
    assert fetches[0] == fetches[1] == fetches[2] >= 1
    assert fetches[3] > fetches[2]


def test_cached_path_keeps_at_most_hot_kept_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pod authors choose the references: the answers kept for the cached path are bounded
    in number, the oldest forgotten first, and a forgotten one is answered again."""
    from nri_seccomp.service import plugin as plugin_module
    monkeypatch.setattr(plugin_module, "HOT_KEPT", 2)
    refs = [f"r.example/p/prof:{i}" for i in range(4)]
    plugin = handler(C23, FakeRegistry(dict.fromkeys(refs, PROFILE)))

    async def go() -> list[list[str]]:
        kept = []
        for ref in [*refs, refs[0]]:
            assert await plugin.create_container(pod({f"{KEY_V1}/POD": ref}), ctr(),
                                                 time.monotonic() + 2) is not None
            kept.append([line.rsplit("=", 1)[1] for line in plugin._hot])
        return kept

    assert asyncio.run(go()) == [refs[:1], refs[:2], refs[1:3], refs[2:4], [refs[3], refs[0]]]


def test_cached_path_keeps_answers_within_hot_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    from nri_seccomp.service import plugin as plugin_module
    refs = [f"r.example/p/prof:{i}" for i in range(3)]
    plugin = handler(C23, FakeRegistry(dict.fromkeys(refs, PROFILE)))

    async def go() -> list[int]:
        kept = []
        for i, ref in enumerate(refs):
            await plugin.create_container(pod({f"{KEY_V1}/POD": ref}), ctr(),
                                          time.monotonic() + 2)
            if i == 0:  # room for two answers of this size, not three
                one = plugin._hot_bytes
                monkeypatch.setattr(plugin_module, "HOT_BYTES", 2 * one + one // 2)
            kept.append(len(plugin._hot))
        return kept

    assert asyncio.run(go()) == [1, 2, 2]


@pytest.mark.parametrize("profile", ["runtime-default", "localhost"])
def test_cached_answer_is_not_given_to_a_container_with_its_own_profile(profile: str) -> None:
    """The cached path answers only containers that could take the annotation's profile:
    a later container of the same pod with an administrator's profile keeps it."""
    plugin = handler(C23, FakeRegistry({REF: PROFILE}))
    p = pod({f"{KEY_V1}/POD": REF})

    async def go() -> tuple[bytes | None, bytes | None, bytes | None]:
        first = await plugin.create_container(p, ctr(), time.monotonic() + 2)
        own = await plugin.create_container(p, ctr(profile), time.monotonic() + 2)
        again = await plugin.create_container(p, ctr(), time.monotonic() + 2)
        return first, own, again

    first, own, again = asyncio.run(go())
    assert first is not None and again == first and own is None
    assert len(plugin._hot) == 1  # the third answer came from memory


def test_cached_answer_follows_the_runtime() -> None:
    """A Configure that says the runtime no longer applies adjustments turns the cached
    answer into a refusal at once."""
    plugin = handler(C23, FakeRegistry({REF: PROFILE}))
    p = pod({f"{KEY_V1}/POD": REF})

    async def go() -> Kind:
        assert await plugin.create_container(p, ctr(), time.monotonic() + 2) is not None
        plugin.caps = C17
        plugin.policy_changed()
        with pytest.raises(Refusal) as info:
            await plugin.create_container(p, ctr(), time.monotonic() + 2)
        return info.value.kind

    assert asyncio.run(go()) is Kind.UNUSABLE


def test_cached_decision_line_cleans_the_pod_names() -> None:
    """The line's fixed part is cleaned once; what changes per container (names the
    runtime passes on) is cleaned on every line, cached path included."""
    import io
    import logging

    from nri_seccomp import logline

    plugin = handler(C23, FakeRegistry({REF: PROFILE}))
    p = pod({f"{KEY_V1}/POD": REF})
    hostile = nri_pb2.PodSandbox(name="pod\nFAKE forged line", namespace="ns",
                                 annotations={f"{KEY_V1}/POD": REF})
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    root.handlers[:] = [logline.LineHandler(stream)]
    root.setLevel(logging.INFO)

    async def go() -> None:
        await plugin.create_container(p, ctr(), time.monotonic() + 2)
        await plugin.create_container(hostile, ctr(), time.monotonic() + 2)
        await asyncio.sleep(0)

    try:
        asyncio.run(go())
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    lines = [x for x in stream.getvalue().splitlines() if "applying seccomp profile" in x]
    assert len(lines) == 2, stream.getvalue()
    assert "memory) to container ns/pod\\nFAKE forged line/app" in lines[1]
