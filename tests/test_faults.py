"""Never late, never open: the plugin under slow, broken and hostile registries and inputs.

Each case runs the real plugin subprocess; the runtime driver enforces the 2 s request
timeout as containerd does (a late answer closes the plugin: ``result.fatal``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devtools import driver
from devtools.badregistry import BadRegistry
from devtools.registry import LocalRegistry
from nri_seccomp.decide.resolver import KEY_V1
from nri_seccomp.nri.pb import nri_pb2
from nri_seccomp.seccomp import model, prepare, select

from .plugin_harness import base_config, container, plugin, pod, run, until_settled

pytestmark = pytest.mark.integration  # real processes: plugin, registries, servers

PROFILE = json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
    {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"}]}).encode()


def _blobs(cache: Path) -> list[Path]:
    d = cache / "blobs" / "sha256"
    return list(d.iterdir()) if d.exists() else []


BAD = [
    # answered "retry" after answer_wait (0.5 s): the fetch goes on for the retry
    ("hang", "still being fetched, retry"),
    ("trickle", "still being fetched, retry"),
    ("status:500", "HTTP 500"),
    ("status:401", "requires authentication"),
    ("status:404", "not found"),
    ("status:429", "HTTP 429"),
    ("reset", "cannot connect to registry"),
    ("lying-size", "sent more than its advertised size"),
    ("bad-digest", "layer digest mismatch"),
]


@pytest.mark.parametrize(("mode", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_registry_answered_before_deadline(tmp_path: Path, mode: str, message: str) -> None:
    with BadRegistry(mode, profile=PROFILE, interval=0.05) as bad:
        ref = f"{bad.address}/x/y:v1"

        async def scenario() -> list[driver.CreateResult]:
            async with plugin(base_config(tmp_path / "cache", bad.address)) as session:
                first = await session.conn.create_container(pod({f"{KEY_V1}/POD": ref}),
                                                            container())
                # the plugin is still there for the next container
                second = await session.conn.create_container(pod(), container("other"))
                return [first, second]

        first, second = run(scenario())
    assert first.fatal is None, first.fatal
    assert first.latency < 2.0
    assert first.error is not None and first.seccomp is None
    assert message in first.error.message
    assert second.error is None and second.fatal is None
    assert _blobs(tmp_path / "cache") == []


def test_hanging_registry_retry_gets_the_timeout(tmp_path: Path) -> None:
    """The first answer comes after answer_wait; the kubelet's retry, once the fetch's
    per-call timeout has passed (``registry.background_timeout``, 10 s by default, 1.5 s
    here), names what went wrong."""
    with BadRegistry("hang", profile=PROFILE) as bad:
        ref = f"{bad.address}/x/y:v1"
        config = base_config(tmp_path / "cache", bad.address,
                             registry_extra="background_timeout: 1.5")

        async def scenario() -> list[driver.CreateResult]:
            async with plugin(config) as session:
                first = await session.conn.create_container(pod({f"{KEY_V1}/POD": ref}),
                                                            container())
                await asyncio.sleep(1.6)
                retry = await session.conn.create_container(pod({f"{KEY_V1}/POD": ref}),
                                                            container())
                return [first, retry]

        first, retry = run(scenario())
    assert first.error is not None and "still being fetched, retry" in first.error.message
    assert retry.fatal is None and retry.error is not None
    assert "did not answer within 1.50s" in retry.error.message


def test_redirect_to_other_host_is_followed(tmp_path: Path) -> None:
    with BadRegistry("ok", profile=PROFILE, host="127.0.0.2") as target, \
         BadRegistry("redirect", profile=PROFILE, target=target.address) as front:
        config = base_config(tmp_path / "cache", f"{front.address}, {target.address}")

        async def scenario() -> driver.CreateResult:
            async with plugin(config) as session:
                return await session.conn.create_container(
                    pod({f"{KEY_V1}/POD": f"{front.address}/x/y:v1"}), container())

        result = run(scenario())
    assert result.error is None and result.seccomp is not None


def test_200_concurrent_requests_20_fetches(registry: LocalRegistry, tmp_path: Path) -> None:
    refs = []
    for i in range(20):
        data = json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": i, "op": "SCMP_CMP_EQ"}]}]}).encode()
        registry.push_profile(f"flight/p{i}", "v1", data)
        refs.append(f"{registry.address}/flight/p{i}:v1")
    before = registry.requests_seen(r"GET /v2/flight/[^ ]+/blobs/")

    async def scenario() -> list[driver.CreateResult]:
        async with plugin(base_config(tmp_path / "cache", registry.address),
                          request_timeout=5.0) as session:
            # each retried as the kubelet would: the question is how many fetches 200
            # creations cost, not whether each was ready within answer_wait
            calls = [until_settled(session.conn, pod({f"{KEY_V1}/POD": refs[i % 20]}),
                                   container(f"c{i}")) for i in range(200)]
            return [attempts[-1] for attempts in await asyncio.gather(*calls)]

    results = run(scenario())
    assert all(r.error is None and r.fatal is None for r in results), [
        r.error for r in results if r.error][:3]
    for i, r in enumerate(results):
        assert r.seccomp is not None
        assert r.seccomp.syscalls[0].args[0].value == i % 20
    assert registry.requests_seen(r"GET /v2/flight/[^ ]+/blobs/") - before == 20


@pytest.mark.parametrize("delivery", ["RunPodSandbox", "StateChange"])
def test_prefetch_on_pod_creation(registry: LocalRegistry, tmp_path: Path,
                                  delivery: str) -> None:
    repo = f"prefetch/{delivery.lower()}"
    registry.push_profile(repo, "v1", PROFILE)
    ref = f"{registry.address}/{repo}:v1"

    async def scenario() -> driver.CreateResult:
        async with plugin(base_config(tmp_path / "cache", registry.address)) as session:
            # the plugin subscribes to exactly the events it handles
            assert session.conn.events == (1 << (nri_pb2.RUN_POD_SANDBOX - 1)) | (
                1 << (nri_pb2.CREATE_CONTAINER - 1))
            the_pod = pod({f"{KEY_V1}/POD": ref})
            if delivery == "RunPodSandbox":
                await session.conn.run_pod_sandbox(the_pod)
            else:
                await session.conn.state_change(nri_pb2.RUN_POD_SANDBOX, the_pod)
            for _ in range(100):
                if registry.requests_seen(rf"GET /v2/{repo}/blobs/"):
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
            return await session.conn.create_container(the_pod, container())

    result = run(scenario())
    assert result.seccomp is not None
    assert registry.requests_seen(rf"GET /v2/{repo}/blobs/") == 1


def test_stale_tag_served_when_registry_down(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with LocalRegistry() as reg:
        reg.push_profile("stale/p", "v1", PROFILE)
        ref = f"{reg.address}/stale/p:v1"
        # tag_ttl 0: every use re-checks the registry
        config = base_config(cache, reg.address, "tag_ttl: 0\n")

        async def warm() -> None:
            async with plugin(config) as session:
                r = await session.conn.create_container(pod({f"{KEY_V1}/POD": ref}),
                                                        container())
                assert r.seccomp is not None

        run(warm())

    async def offline() -> tuple[driver.CreateResult, str]:
        async with plugin(config) as session:
            r = await session.conn.create_container(pod({f"{KEY_V1}/POD": ref}), container())
        return r, session.log

    result, log = run(offline())
    assert result.seccomp is not None, result.error
    assert f"registry unavailable for {ref}" in log
    assert "using the cached profile sha256:" in log

    # beyond stale_if_error_max_age the stale copy is refused
    config_strict = base_config(cache, reg.address, "tag_ttl: 0\nstale_if_error_max_age: 0\n")

    async def strict() -> driver.CreateResult:
        async with plugin(config_strict) as session:
            return await session.conn.create_container(pod({f"{KEY_V1}/POD": ref}),
                                                       container())

    result = run(strict())
    assert result.error is not None and "cannot connect to registry" in result.error.message


@pytest.mark.parametrize("damage", ["truncate", "mismatch", "missing-index", "garbage-index"])
def test_cache_damage_is_refetched_or_refused(tmp_path: Path, damage: str) -> None:
    cache = tmp_path / "cache"
    with LocalRegistry() as reg:
        digest = reg.push_profile("dmg/p", "v1", PROFILE)
        ref = f"{reg.address}/dmg/p@{digest}"
        config = base_config(cache, reg.address)

        async def use() -> driver.CreateResult:
            async with plugin(config) as session:
                return await session.conn.create_container(pod({f"{KEY_V1}/POD": ref}),
                                                           container())

        assert run(use()).seccomp is not None
        [blob] = _blobs(cache)
        if damage == "truncate":
            blob.write_bytes(blob.read_bytes()[:10])
        elif damage == "mismatch":
            blob.write_bytes(b'{"defaultAction": "SCMP_ACT_ALLOW"}')
        elif damage == "missing-index":
            (cache / "index.json").unlink()
        else:
            (cache / "index.json").write_text("{garbage")
        refetched = run(use())
        assert refetched.seccomp is not None, refetched.error
        assert refetched.seccomp.default_action == "SCMP_ACT_ERRNO"
        assert len(_blobs(cache)) == 1
        if damage in ("truncate", "mismatch"):
            blob.write_bytes(b"x")
    # registry gone and the copy damaged: refused, never served
    result = run(use())
    if damage in ("truncate", "mismatch"):
        assert result.error is not None and result.seccomp is None
        assert "cannot connect to registry" in result.error.message
    else:
        assert result.seccomp is not None


def test_full_disk_still_answers_from_memory(tmp_path: Path, registry: LocalRegistry) -> None:
    registry.push_profile("full/p", "v1", PROFILE + b" " * 100_000)
    ref = f"{registry.address}/full/p:v1"
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mnt)], check=True)
    try:
        async def scenario() -> tuple[list[driver.CreateResult], str]:
            async with plugin(base_config(mnt, registry.address)) as session:
                results = [await session.conn.create_container(
                    pod({f"{KEY_V1}/POD": ref}), container()) for _ in range(2)]
            return results, session.log

        results, log = run(scenario())
        assert all(r.seccomp is not None for r in results)
        assert "could not cache" in log and "No space left on device" in log
        assert not [p for p in mnt.rglob("*") if p.name.startswith(".tmp-")]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


HOSTILE = [
    ("100 KB value", "x" * 100_000, "is 100000 characters long"),
    ("control characters", "reg.example/a:b\x07", "control or space character '\\x07'"),
    ("newline", "reg.example/a:b\nc", "control or space character '\\n'"),
    ("file URL", "file:///etc/passwd", "is a URL"),
    ("https URL", "https://reg.example/a:b", "is a URL"),
    ("dot-dot", "127.0.0.1:1/../../etc/passwd", "'..' path component"),
    ("upper case", "127.0.0.1:1/Evil", "repositories are lower case"),
]


@pytest.mark.parametrize(("value", "message"), [h[1:] for h in HOSTILE],
                         ids=[h[0] for h in HOSTILE])
def test_hostile_annotations(registry: LocalRegistry, tmp_path: Path, value: str,
                             message: str) -> None:
    before = registry.requests_seen(r"GET ")

    async def scenario() -> driver.CreateResult:
        async with plugin(base_config(tmp_path / "c", registry.address)) as session:
            return await session.conn.create_container(pod({f"{KEY_V1}/POD": value}),
                                                       container())

    result = run(scenario())
    assert result.error is not None and result.seccomp is None and result.fatal is None
    assert message in result.error.message
    assert len(result.error.message) < 500
    assert registry.requests_seen(r"GET ") == before


def test_registry_outside_allow_list(registry: LocalRegistry, tmp_path: Path) -> None:
    registry.push_profile("outside/p", "v1", PROFILE)
    ref = f"{registry.address}/outside/p:v1"
    before = registry.requests_seen(r"GET ")
    config = base_config(tmp_path / "c", registry.address, allowed=["ghcr.io/acme/*"])

    async def scenario() -> driver.CreateResult:
        async with plugin(config) as session:
            return await session.conn.create_container(pod({f"{KEY_V1}/POD": ref}),
                                                       container())

    result = run(scenario())
    assert result.error is not None
    assert f"repository {registry.address}/outside/p is not in the allowed registries" in (
        result.error.message)
    assert registry.requests_seen(r"GET ") == before


# ---- fuzzing the profile parser (the frame and reference parsers have their own) ----

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=12)
    | st.sampled_from(["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "read", "SCMP_CMP_EQ",
                       "SCMP_ARCH_X86_64"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["defaultAction", "syscalls", "names", "action", "args", "index",
                         "value", "op", "errnoRet", "architectures", "includes", "excludes",
                         "arches", "caps", "minKernel", "archMap", "flags", "x"]),
        inner, max_size=5),
    max_leaves=20,
)


@given(_json)
@settings(max_examples=400, deadline=None)
def test_fuzz_profile_parser(value: object) -> None:
    data = json.dumps(value).encode()
    node = select.node_context()
    try:
        prepare.prepare(data, node)
    except model.ProfileError as exc:
        assert str(exc)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_fuzz_profile_parser_bytes(data: bytes) -> None:
    with contextlib.suppress(model.ProfileError):
        prepare.prepare(data, select.node_context())




def test_plugin_killed_mid_fetch_never_leaves_a_partial_cache(registry: LocalRegistry,
                                                               tmp_path: Path) -> None:
    """SIGKILL the real plugin at random moments while it fetches and caches large
    profiles; every restart must find only whole, verified files."""
    import random

    from nri_seccomp.storage.cache import Cache

    rng = random.Random(42)
    cache = tmp_path / "cache"
    big = json.loads(PROFILE)
    big["syscalls"][0]["comment"] = "x" * 900_000
    refs = []
    for i in range(8):
        big["syscalls"][0]["names"] = ["read", "write"][: 1 + i % 2]
        big["syscalls"][0]["comment"] = str(i) * 900_000
        registry.push_profile(f"kill/p{i}", "v1", json.dumps(big).encode())
        refs.append(f"{registry.address}/kill/p{i}:v1")
    config = base_config(cache, registry.address)

    for round_, ref in enumerate(refs):
        async def doomed(ref: str = ref) -> None:
            conn = await driver.spawn_plugin(driver.plugin_command(), config=config,
                                             stderr=asyncio.subprocess.DEVNULL)
            await conn.handshake()
            task = asyncio.create_task(
                conn.create_container(pod({f"{KEY_V1}/POD": ref}), container()))
            await asyncio.sleep(rng.uniform(0.0, 0.06))
            assert conn.process is not None
            conn.process.kill()
            await conn.process.wait()
            await asyncio.gather(task, return_exceptions=True)
            await conn.wait_closed()

        run(doomed())
        disk = Cache(cache, max_bytes=1 << 40)
        assert not list(cache.rglob(".tmp-*")), f"round {round_}: leftovers after open"
        for path in (cache / "blobs" / "sha256").iterdir():
            assert disk.get_blob("sha256:" + path.name) is not None, f"round {round_}: {path}"
        disk.close()

    async def survivor() -> list[driver.CreateResult]:
        async with plugin(config) as session:
            return [await session.conn.create_container(pod({f"{KEY_V1}/POD": r}), container())
                    for r in refs]

    assert all(r.seccomp is not None for r in run(survivor()))


def test_tag_recheck_downloads_only_the_manifest(registry: LocalRegistry, tmp_path: Path) -> None:
    registry.push_profile("recheck/p", "v1", PROFILE)
    ref = f"{registry.address}/recheck/p:v1"
    config = base_config(tmp_path / "cache", registry.address, "tag_ttl: 0\n")

    async def scenario() -> list[driver.CreateResult]:
        async with plugin(config) as session:
            return [await session.conn.create_container(pod({f"{KEY_V1}/POD": ref}),
                                                        container()) for _ in range(3)]

    results = run(scenario())
    assert all(r.seccomp is not None for r in results)
    # tag_ttl 0: every use asks the registry, but the unchanged layer is downloaded once
    assert registry.requests_seen(r"GET /v2/recheck/p/manifests/v1") == 3
    assert registry.requests_seen(r"GET /v2/recheck/p/blobs/") == 1
    # a new push under the same tag is picked up by the next re-check
    registry.push_profile("recheck/p", "v1", PROFILE.replace(b"write", b"close"))
    results = run(scenario())
    assert [n for n in results[-1].seccomp.syscalls[0].names] == ["read", "close"]  # type: ignore[union-attr]


@pytest.mark.parametrize(("on_error", "fails"), [("ignore", False), ("refuse", True)])
def test_hanging_image_registry(tmp_path: Path, on_error: str, fails: bool) -> None:
    """An unannotated pod whose image registry hangs: answered in time either way."""
    with BadRegistry("hang") as bad:
        config = base_config(tmp_path / "cache", bad.address,
                             f"image_annotations_on_error: {on_error}\n"
                             "image_annotations_source: registry\n")

        async def scenario() -> driver.CreateResult:
            async with plugin(config) as session:
                return await session.conn.create_container(
                    pod(), container(image=f"{bad.address}/some/image:1"))

        result = run(scenario())
    assert result.fatal is None and result.latency < 2.0
    if fails:
        assert result.error is not None
        assert "image_annotations_on_error: refuse" in result.error.message
    else:
        assert result.error is None and result.seccomp is None
