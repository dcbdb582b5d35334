"""The product end to end: CRI-O's scenarios against a real registry, with the plugin as a
subprocess started the way containerd starts it."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from devtools import driver
from devtools.fakecontainerd import FakeContainerd
from devtools.registry import LocalRegistry
from nri_seccomp.decide.resolver import KEY_V1, KEY_V2
from nri_seccomp.nri.pb import nri_pb2

from .plugin_harness import base_config, container, plugin, pod, run, until_settled

pytestmark = pytest.mark.integration  # real processes: plugin, registries, servers

PROFILE = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "architectures": ["SCMP_ARCH_X86_64"],
    "syscalls": [
        {"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
        {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
    ],
}


def expected_seccomp() -> nri_pb2.LinuxSeccomp:
    """The profile above as the spec's linux.seccomp, written out by hand."""
    want = nri_pb2.LinuxSeccomp(default_action="SCMP_ACT_ERRNO",
                                architectures=["SCMP_ARCH_X86_64"])
    want.syscalls.add(names=["read", "write", "exit_group"], action="SCMP_ACT_ALLOW")
    rule = want.syscalls.add(names=["personality"], action="SCMP_ACT_ALLOW")
    rule.args.add(index=0, value=8, op="SCMP_CMP_EQ")
    # mkdir's ERRNO(1) rule is the default action: normalisation leaves it out, as
    # libseccomp and runc would
    return want


@pytest.fixture(scope="module")
def artifacts(registry: LocalRegistry, containerd: FakeContainerd) -> dict[str, str]:
    """The profile in the registry; the images as the node pulled them, in containerd's
    content store (image annotations are read there, not at the registry)."""
    reg = registry.address
    registry.push_profile("crio/profile", "v1", json.dumps(PROFILE).encode())
    for repo, image_annotations in [("app/bare", {KEY_V1: f"{reg}/crio/profile:v1"}),
                                    ("app/pod", {f"{KEY_V1}/POD": f"{reg}/crio/profile:v1"}),
                                    ("app/ctr", {f"{KEY_V1}/app": f"{reg}/crio/profile:v1"}),
                                    ("app/none", {})]:
        digest, size = containerd.add_manifest(image_annotations, seed=repo)
        containerd.tag(f"{reg}/{repo}:1", digest, size)
    return {"profile": f"{reg}/crio/profile:v1", "image-bare": f"{reg}/app/bare:1",
            "image-pod": f"{reg}/app/pod:1", "image-ctr": f"{reg}/app/ctr:1",
            "wrong": f"{reg}/crio/wrong:v1"}


SCENARIOS = [
    # (name, pod annotations, image key, container profile, extra config, expect, log line)
    ("image annotation, bare key", {}, "image-bare", None, "", "applied",
     "Found image specific seccomp profile annotation: {k1}={profile}"),
    ("image annotation KEY/POD", {}, "image-pod", None, "", "applied",
     "Found image specific seccomp profile annotation for pod: {k1}/POD={profile}"),
    ("image annotation KEY/<container>", {}, "image-ctr", None, "", "applied",
     "Found image specific seccomp profile annotation for container app: {k1}/app={profile}"),
    ("annotation not allowed by the configuration", {}, "image-bare", None,
     "image_annotations: false\n", "null", None),
    ("image annotation, container Unconfined", {}, "image-bare", "unconfined", "", "applied",
     "Found image specific seccomp profile annotation: {k1}={profile}"),
    # an administrator's profile wins, so the image is not even looked up
    # (test_ineligible_container_costs_no_image_lookup)
    ("image annotation, container RuntimeDefault", {}, "image-bare", "runtime-default", "",
     "null", None),
    ("image annotation, container Localhost", {}, "image-bare", "localhost", "", "null", None),
    ("pod annotation KEY/POD", {"{k1}/POD": "{profile}"}, "", None, "", "applied",
     "Found pod specific seccomp profile annotation: {k1}/POD={profile}"),
    ("pod annotation KEY/<container>", {"{k2}/app": "{profile}"}, "", None, "", "applied",
     "Found container specific seccomp profile annotation: {k2}/app={profile}"),
    ("pod annotation for another container", {"{k1}/other": "{profile}"}, "", None, "",
     "null", None),
    ("pod annotation to a missing artifact", {"{k1}/POD": "{wrong}"}, "", None, "", "fails",
     "try to pull OCI artifact seccomp profile: pull OCI artifact: {wrong}: not found"),
]


@pytest.mark.parametrize(("pod_ann", "image", "profile", "extra", "expect", "line"),
                         [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS])
def test_crio_scenarios(registry: LocalRegistry, containerd: FakeContainerd,
                        artifacts: dict[str, str], tmp_path: Path,
                        pod_ann: dict[str, str], image: str, profile: str | None, extra: str,
                        expect: str, line: str | None) -> None:
    fmt = {"k1": KEY_V1, "k2": KEY_V2, **{k.replace("-", "_"): v for k, v in artifacts.items()}}
    fmt["profile"] = artifacts["profile"]
    fmt["wrong"] = artifacts["wrong"]
    annotations = {k.format(**fmt): v.format(**fmt) for k, v in pod_ann.items()}

    async def scenario() -> tuple[driver.CreateResult, str]:
        config = base_config(tmp_path / "cache", registry.address,
                             f"containerd_socket: {containerd.socket}\n{extra}")
        async with plugin(config) as session:
            # the kubelet retries a "retry" answer; the scenario is about the final one
            *_, result = await until_settled(
                session.conn, pod(annotations),
                container("app", profile, image=artifacts.get(image, "")))
        assert session.exit_code == 0
        return result, session.log

    result, log = run(scenario())
    assert result.fatal is None and result.crashed is None
    if expect == "applied":
        assert result.error is None, result.error
        assert result.seccomp == expected_seccomp()
    elif expect == "null":
        assert result.error is None, result.error
        assert result.seccomp is None
    else:
        assert result.error is not None and result.seccomp is None
    if line is not None:
        text = line.format(**fmt)
        assert text in (result.error.message if result.error else log), log
    else:
        assert "seccomp profile annotation" not in log


MALFORMED = [
    ("not JSON", b"this is not json", "layer is not JSON"),
    ("JSON but not a profile", b'["a", "b"]', "profile must be a JSON object"),
    ("no default action", b"{}", "defaultAction"),
    ("unknown action", json.dumps({"defaultAction": "SCMP_ACT_FOO"}).encode(),
     "SCMP_ACT_FOO"),
    ("unknown syscall", json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["opne"], "action": "SCMP_ACT_ALLOW"}]}).encode(), "'opne'"),
    ("bad arg op", json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["read"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_LIKE"}]}]}).encode(),
     "SCMP_CMP_LIKE"),
    ("over 1 MiB", b"{" + b" " * (1024 * 1024) + b"}",
     "exceeded maximum allowed artifact size of 1048576 bytes"),
]


@pytest.mark.parametrize(("data", "message"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_layers_fail_creation_and_are_not_cached(
        registry: LocalRegistry, tmp_path: Path, data: bytes, message: str) -> None:
    repo = "bad/" + message.strip("'").lower().replace(" ", "-")[:20].strip("-.")
    registry.push_profile(repo, "v1", data)
    ref = f"{registry.address}/{repo}:v1"

    async def scenario() -> driver.CreateResult:
        async with plugin(base_config(tmp_path / "cache", registry.address)) as session:
            return await session.conn.create_container(pod({f"{KEY_V1}/POD": ref}), container())

    result = run(scenario())
    assert result.error is not None, result
    assert message in result.error.message
    assert ref in result.error.message
    blobs = list((tmp_path / "cache" / "blobs" / "sha256").iterdir())
    assert blobs == []
    index = tmp_path / "cache" / "index.json"
    assert not index.exists() or ref not in index.read_text()


def test_restart_serves_from_disk_with_registry_stopped(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with LocalRegistry() as reg:
        digest = reg.push_profile("warm/p", "v1", json.dumps(PROFILE).encode())
        tag_ref, digest_ref = f"{reg.address}/warm/p:v1", f"{reg.address}/warm/p@{digest}"
        reg.push_profile("cold/p", "v1", json.dumps(PROFILE).encode())
        cold_ref = f"{reg.address}/cold/p:v1"
        config = base_config(cache, reg.address)

        async def warm() -> None:
            async with plugin(config) as session:
                for ref in (tag_ref, digest_ref):
                    r = await session.conn.create_container(pod({f"{KEY_V1}/POD": ref}),
                                                            container())
                    assert r.seccomp == expected_seccomp(), r

        run(warm())
    # the registry is gone; a new plugin process serves what the old one cached

    async def offline() -> list[driver.CreateResult]:
        async with plugin(config) as session:
            return [await session.conn.create_container(pod({f"{KEY_V1}/POD": ref}),
                                                        container())
                    for ref in (tag_ref, digest_ref, cold_ref)]

    t0 = time.monotonic()
    tag, dig, cold = run(offline())
    assert tag.seccomp == expected_seccomp()
    assert dig.seccomp == expected_seccomp()
    assert cold.error is not None and cold.seccomp is None
    assert f"{cold_ref}: cannot connect to registry" in cold.error.message
    assert cold.latency < 1.75
    assert time.monotonic() - t0 < 10


def test_bad_configuration_is_refused_at_configure(tmp_path: Path) -> None:
    async def scenario() -> str:
        conn = await driver.spawn_plugin(driver.plugin_command(), stderr=asyncio.subprocess.PIPE)
        with pytest.raises(driver.DriverError) as info:
            await conn.handshake("registry: {timout: 1}\n")
        assert conn.closed is not None
        await conn.wait_closed()
        return str(info.value)

    message = run(scenario())
    assert "unknown configuration key 'registry.timout' (did you mean 'registry.timeout'?)" in (
        message)


@pytest.mark.parametrize(("extra", "refused"), [("", True), ("allow_listener: true\n", False)])
def test_listener_profiles_need_the_administrator(registry: LocalRegistry, tmp_path: Path,
                                                  extra: str, refused: bool) -> None:
    data = json.dumps({"defaultAction": "SCMP_ACT_ALLOW",
                       "listenerPath": "/run/containerd/containerd.sock",
                       "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}).encode()
    registry.push_profile("listener/p", "v1", data)
    ref = f"{registry.address}/listener/p:v1"

    async def scenario() -> driver.CreateResult:
        async with plugin(base_config(tmp_path / "c", registry.address, extra)) as session:
            return await session.conn.create_container(pod({f"{KEY_V1}/POD": ref}), container())

    result = run(scenario())
    if refused:
        assert result.error is not None and result.seccomp is None
        assert ("profile sets listenerPath '/run/containerd/containerd.sock': a seccomp agent "
                "socket on the host is chosen by the administrator") in result.error.message
    else:
        assert result.seccomp is not None
        assert result.seccomp.listener_path == "/run/containerd/containerd.sock"


def calls_for(server: FakeContainerd, *needles: str) -> int:
    return sum(1 for c in server.calls() if any(n in c for n in needles))


def test_containerd_not_asked_when_pod_annotations_decide(
        registry: LocalRegistry, containerd: FakeContainerd, artifacts: dict[str, str],
        tmp_path: Path) -> None:
    before = len(containerd.calls())

    async def scenario() -> driver.CreateResult:
        config = base_config(tmp_path / "cache", registry.address,
                             f"containerd_socket: {containerd.socket}\n")
        async with plugin(config) as session:
            return await session.conn.create_container(
                pod({f"{KEY_V1}/POD": artifacts["profile"]}),
                container("app", image=artifacts["image-bare"]))

    result = run(scenario())
    assert result.seccomp == expected_seccomp()
    assert len(containerd.calls()) == before


@pytest.mark.parametrize("profile", ["runtime-default", "localhost"])
def test_ineligible_container_costs_no_image_lookup(
    registry: LocalRegistry, containerd: FakeContainerd, artifacts: dict[str, str],
    tmp_path: Path, profile: str
) -> None:
    """A container whose administrator chose its profile cannot take the image's: no lookup,
    not even when containerd is down (the socket named does not exist)."""
    before = len(containerd.calls())

    async def scenario() -> list[driver.CreateResult]:
        out = []
        for socket in (containerd.socket, str(tmp_path / "down.sock")):
            config = base_config(tmp_path / "cache", registry.address,
                                 f"containerd_socket: {socket}\n")
            async with plugin(config) as session:
                out.append(await session.conn.create_container(
                    pod(), container("app", profile, image=artifacts["image-bare"])))
        return out

    for result in run(scenario()):
        assert result.error is None and result.seccomp is None
    assert len(containerd.calls()) == before


def test_image_by_digest_seen_once_costs_no_call(
        registry: LocalRegistry, containerd: FakeContainerd, tmp_path: Path) -> None:
    """containerd 2.4 sends Container.image.digest: an index is read once, its platform
    manifest once, and later containers of the image cost no gRPC call at all."""
    from nri_seccomp.containerd import platform
    node = platform.node_platform()
    plat = {"os": node.os, "architecture": node.architecture}
    if node.variant:
        plat["variant"] = node.variant
    reg = registry.address
    ours, ours_size = containerd.add_manifest(
        {f"{KEY_V1}/app": f"{reg}/crio/profile:v1"}, seed="digest-ours")
    other, other_size = containerd.add_manifest({}, seed="digest-other")
    index, _ = containerd.add_index(
        [(other, other_size, {"os": "linux", "architecture": "mips64le"}),
         (ours, ours_size, plat)], {KEY_V1: f"{reg}/crio/wrong:v1"})  # index's: ignored
    registry.push_profile("crio/profile", "v1", json.dumps(PROFILE).encode())

    async def scenario() -> list[driver.CreateResult]:
        config = base_config(tmp_path / "cache", registry.address,
                             f"containerd_socket: {containerd.socket}\n")
        async with plugin(config, runtime=driver.RuntimeVersion.containerd("v2.4.0")) as s:
            return [await s.conn.create_container(
                pod(), container("app", image=f"{reg}/app/multi:1", image_digest=index))
                for _ in range(3)]

    results = run(scenario())
    assert all(r.error is None and r.seccomp == expected_seccomp() for r in results), results
    assert calls_for(containerd, index, ours, "app/multi") == 2  # Read index, Read manifest
    assert calls_for(containerd, other) == 0


def test_image_by_name_seen_once_costs_no_call_from_the_first_container(
        registry: LocalRegistry, containerd: FakeContainerd, tmp_path: Path) -> None:
    """containerd <= 2.3 sends only the kubelet's image name: the plugin subscribes to
    containerd's image events when it is configured, so the first container's lookup
    already fills the name cache and the next ones cost no gRPC call."""
    reg = registry.address
    digest, size = containerd.add_manifest({f"{KEY_V1}/app": f"{reg}/crio/profile:v1"},
                                           seed="by-name-seen")
    containerd.tag(f"{reg}/app/seen:1", digest, size)
    registry.push_profile("crio/profile", "v1", json.dumps(PROFILE).encode())

    async def scenario() -> list[driver.CreateResult]:
        config = base_config(tmp_path / "cache", registry.address,
                             f"containerd_socket: {containerd.socket}\n")
        async with plugin(config) as s:
            await asyncio.sleep(0.8)  # the subscription settles (0.5 s) before any pod
            return [await s.conn.create_container(pod(), container(
                "app", image=f"{reg}/app/seen:1")) for _ in range(3)]

    before = calls_for(containerd, "app/seen", digest)
    results = run(scenario())
    assert all(r.error is None and r.seccomp == expected_seccomp() for r in results), results
    assert calls_for(containerd, "app/seen", digest) - before == 2  # one Get, one Read


@pytest.mark.parametrize(("on_error", "socket"), [
    ("default", "up"), ("default", "down"), ("ignore", "up"), ("ignore", "down")])
def test_unreadable_image_annotations_fail_closed(
        registry: LocalRegistry, containerd: FakeContainerd, tmp_path: Path,
        on_error: str, socket: str) -> None:
    """An image containerd cannot describe (not in its store, or containerd down) may name
    a profile: the creation is refused, naming the image and the cause, unless the
    operator chose ``image_annotations_on_error: ignore``."""
    image = f"{registry.address}/app/unknown:1"
    path = containerd.socket if socket == "up" else str(tmp_path / "down.sock")
    extra = f"containerd_socket: {path}\n"
    if on_error != "default":
        extra += f"image_annotations_on_error: {on_error}\n"

    async def scenario() -> tuple[driver.CreateResult, str]:
        async with plugin(base_config(tmp_path / "cache", registry.address, extra)) as session:
            result = await session.conn.create_container(pod(), container("app", image=image))
        return result, session.log

    result, log = run(scenario())
    cause = ("not found in containerd (namespace k8s.io)" if socket == "up"
             else f"containerd at {path} is unavailable")
    if on_error == "default":
        assert result.error is not None and result.seccomp is None
        assert f"cannot read annotations of image {image}" in result.error.message
        assert cause in result.error.message
        assert "image_annotations_on_error: refuse" in result.error.message
    else:
        assert result.error is None and result.seccomp is None
        assert cause in log and "ignoring image annotations" in log


def test_hanging_containerd_is_answered_in_time(
        registry: LocalRegistry, containerd: FakeContainerd, artifacts: dict[str, str],
        tmp_path: Path) -> None:
    """containerd holds Images/Get: the creation is answered "retry" within answer_wait
    (fail closed), and a container of another image is served meanwhile."""
    config = base_config(tmp_path / "cache", registry.address,
                         f"containerd_socket: {containerd.socket}\n")

    async def scenario() -> list[driver.CreateResult]:
        async with plugin(config) as session:
            return [await session.conn.create_container(
                pod(), container("app", image=image))
                for image in (f"{registry.address}/hang/img:1", artifacts["image-bare"])]

    hung, other = run(scenario())
    assert hung.fatal is None and hung.latency < 1.5
    assert hung.error is not None and "are still being read, retry" in hung.error.message
    assert other.error is None and other.seccomp == expected_seccomp()


def test_image_annotations_from_the_registry_when_chosen(
        registry: LocalRegistry, tmp_path: Path) -> None:
    """The opt-in source for runtimes without a reachable content store: the registry's
    manifest, and no containerd socket needed."""
    reg = registry.address
    registry.push_profile("crio/profile", "v1", json.dumps(PROFILE).encode())
    registry.push_image("app/fromreg", "1", {KEY_V1: f"{reg}/crio/profile:v1"})
    extra = ("image_annotations_source: registry\n"
             f"containerd_socket: {tmp_path / 'down.sock'}\n")

    async def scenario() -> driver.CreateResult:
        async with plugin(base_config(tmp_path / "cache", reg, extra)) as session:
            return await session.conn.create_container(
                pod(), container("app", image=f"{reg}/app/fromreg:1"))

    result = run(scenario())
    assert result.error is None and result.seccomp == expected_seccomp()
    assert registry.requests_seen(r"GET /v2/app/fromreg/manifests/1") >= 1


@pytest.mark.parametrize("shape", ["typed", "untyped"])
def test_kep6061_typed_artifact(registry: LocalRegistry, tmp_path: Path, shape: str) -> None:
    """KEP-6061's typed form (the OCI empty config, the kind in artifactType, a JSON layer)
    is applied; the same without artifactType is refused with its media types named."""
    from devtools.registry import EMPTY_CONFIG, SECCOMP_CONFIG
    repo = f"kep/{shape}"
    registry.push_profile(repo, "v1", json.dumps(PROFILE).encode(),
                          config_media_type=EMPTY_CONFIG, config_bytes=b"{}",
                          layer_media_type="application/json", title="profile.json",
                          artifact_type=SECCOMP_CONFIG if shape == "typed" else None)
    ref = f"{registry.address}/{repo}:v1"

    async def scenario() -> driver.CreateResult:
        async with plugin(base_config(tmp_path / "cache", registry.address)) as session:
            return await session.conn.create_container(pod({f"{KEY_V1}/POD": ref}),
                                                       container())

    result = run(scenario())
    if shape == "typed":
        assert result.error is None and result.seccomp == expected_seccomp()
    else:
        assert result.error is not None and result.seccomp is None
        assert (f"config media type is '{EMPTY_CONFIG}'; expected '{SECCOMP_CONFIG}'"
                in result.error.message)
        assert registry.count("blobs", repo) == 0  # refused from the manifest alone
