"""Image annotations from containerd's content store: the gRPC client and the image lookup
against a real gRPC server process (devtools.fakecontainerd) on a unix socket, and the
pure parts (the node's platform in an index, containerd's image names) as tables."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtools.fakecontainerd import FakeContainerd
from nri_seccomp.containerd import platform
from nri_seccomp.containerd.client import ContainerdError, ContainerdImages, store_name
from nri_seccomp.decide.resolver import KEY_V1
from nri_seccomp.service.images import ContainerdSource, Image, ImageAnnotations, ImageLookupError

PROFILE = "r.example/p/prof:1"
AMD64 = {"os": "linux", "architecture": "amd64"}
ARM64 = {"os": "linux", "architecture": "arm64", "variant": "v8"}
NODE = platform.Platform("linux", "amd64")

# ---- pure: the node's entry in an index, containerd's names ---------------------------

PICKS = [
    # (name, node, index platforms, expected index or None)
    ("amd64 node", NODE, [ARM64, AMD64], 1),
    ("first of equals", NODE, [AMD64, AMD64], 0),
    ("no linux/amd64", NODE, [ARM64, {"os": "windows", "architecture": "amd64"}], None),
    ("arm64 takes v8 or none", platform.Platform("linux", "arm64", "v8"),
     [{"os": "linux", "architecture": "arm64"}], 0),
    ("arm64 prefers v8", platform.Platform("linux", "arm64", "v8"),
     [{"os": "linux", "architecture": "arm64"}, ARM64], 1),
    ("arm v7 runs v6", platform.Platform("linux", "arm", "v7"),
     [{"os": "linux", "architecture": "arm", "variant": "v6"}], 0),
    ("arm v6 does not run v7", platform.Platform("linux", "arm", "v6"),
     [{"os": "linux", "architecture": "arm", "variant": "v7"}], None),
    ("amd64 v3 is not plain amd64", NODE,
     [{"os": "linux", "architecture": "amd64", "variant": "v3"}], None),
    ("no platform at all", NODE, [None], None),
]


@pytest.mark.parametrize(("node", "platforms", "expected"), [p[1:] for p in PICKS],
                         ids=[p[0] for p in PICKS])
def test_pick(node: platform.Platform, platforms: list[dict[str, str] | None],
              expected: int | None) -> None:
    entries = [{"digest": f"d{i}", "platform": p} if p else {"digest": f"d{i}"}
               for i, p in enumerate(platforms)]
    picked = platform.pick(entries, node)
    assert (None if picked is None else entries.index(picked)) == expected


@pytest.mark.parametrize(("machine", "expected"), [
    ("x86_64", "linux/amd64"), ("aarch64", "linux/arm64/v8"), ("armv7l", "linux/arm/v7"),
    ("ppc64le", "linux/ppc64le"), ("s390x", "linux/s390x"), ("riscv64", "linux/riscv64")])
def test_node_platform(machine: str, expected: str) -> None:
    assert str(platform.node_platform(machine)) == expected


@pytest.mark.parametrize(("given", "stored"), [
    ("nginx:1.27", "docker.io/library/nginx:1.27"),
    ("nginx", "docker.io/library/nginx:latest"),
    ("index.docker.io/x/y:2", "docker.io/x/y:2"),
    ("registry.k8s.io/pause:3.10", "registry.k8s.io/pause:3.10"),
    ("nginx:1.27@sha256:" + "a" * 64, "docker.io/library/nginx@sha256:" + "a" * 64),
    ("sha256:" + "b" * 64, "sha256:" + "b" * 64),
])
def test_store_name(given: str, stored: str) -> None:
    assert store_name(given) == stored


# ---- against the gRPC server ------------------------------------------------------------

integration = pytest.mark.integration


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[FakeContainerd]:
    with FakeContainerd(tmp_path / "ctrd") as server:
        yield server


def lookup(server: FakeContainerd, image: Image, node: platform.Platform = NODE,
           namespace: str = "k8s.io", images: ImageAnnotations | None = None,
           max_bytes: int = 4 * 1024 * 1024) -> dict[str, str]:
    async def go() -> dict[str, str]:
        client = ContainerdImages(server.socket, namespace, node, max_bytes)
        reader = images or ImageAnnotations(ContainerdSource(client))
        try:
            return await reader.get(image, time.monotonic() + 5)
        finally:
            await client.aclose()

    return asyncio.run(go())


@integration
def test_single_manifest_by_the_kubelets_name(containerd: FakeContainerd) -> None:
    digest, size = containerd.add_manifest({KEY_V1: PROFILE, "other": "x"})
    containerd.tag("docker.io/library/nginx:1.27", digest, size)
    assert lookup(containerd, Image("nginx:1.27")) == {KEY_V1: PROFILE}
    assert containerd.calls() == ["Images/Get docker.io/library/nginx:1.27",
                                  f"Content/Read {digest}"]


def two_platforms(server: FakeContainerd, on_platform: bool, on_index: bool) -> str:
    ours, ours_size = server.add_manifest(
        {f"{KEY_V1}/POD": "r.example/p/amd64:1"} if on_platform else {}, seed="amd64")
    other, other_size = server.add_manifest(
        {f"{KEY_V1}/POD": "r.example/p/arm64:1"}, seed="arm64")
    index, size = server.add_index(
        [(other, other_size, ARM64), (ours, ours_size, AMD64)],
        {KEY_V1: "r.example/p/index:1"} if on_index else None)
    server.tag("r.example/app/multi:1", index, size,
               media_type="application/vnd.oci.image.index.v1+json")
    return index


@integration
@pytest.mark.parametrize(("on_platform", "on_index", "expected"), [
    ("yes", "no", {f"{KEY_V1}/POD": "r.example/p/amd64:1"}),
    # CRI-O reads the pulled platform manifest: an index-only annotation names nothing
    ("no", "yes", {}),
    ("yes", "yes", {f"{KEY_V1}/POD": "r.example/p/amd64:1"}),
])
def test_index_uses_the_nodes_platform_manifest(containerd: FakeContainerd, on_platform: str,
                                                on_index: str,
                                                expected: dict[str, str]) -> None:
    index = two_platforms(containerd, on_platform == "yes", on_index == "yes")
    assert lookup(containerd, Image("r.example/app/multi:1")) == expected
    reads = [c for c in containerd.calls() if c.startswith("Content/Read")]
    assert reads[0] == f"Content/Read {index}" and len(reads) == 2  # index, then amd64 only


@integration
def test_index_without_the_nodes_platform_fails(containerd: FakeContainerd) -> None:
    two_platforms(containerd, True, False)
    with pytest.raises(ImageLookupError, match="has no manifest for linux/s390x"):
        lookup(containerd, Image("r.example/app/multi:1"), platform.Platform("linux", "s390x"))


@integration
def test_by_digest_costs_no_image_call_and_a_seen_image_no_call(
        containerd: FakeContainerd) -> None:
    digest, _ = containerd.add_manifest({KEY_V1: PROFILE})
    client = ContainerdImages(containerd.socket, "k8s.io", NODE)
    images = ImageAnnotations(ContainerdSource(client))

    async def go() -> list[dict[str, str]]:
        try:
            return [await images.get(Image("whatever:1", digest), time.monotonic() + 5)
                    for _ in range(3)]
        finally:
            await client.aclose()

    assert asyncio.run(go()) == [{KEY_V1: PROFILE}] * 3
    assert containerd.calls() == [f"Content/Read {digest}"]  # once, never Images/Get


NGINX = "docker.io/library/nginx:1.27"
#: settle time of the subscriptions in these tests: short, they wait for it anyway
SETTLE = 0.1


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``check`` until it holds; fail the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


def watched(server: FakeContainerd) -> tuple[ContainerdImages, ImageAnnotations]:
    client = ContainerdImages(server.socket, "k8s.io", NODE, events_settle=SETTLE)
    return client, ImageAnnotations(ContainerdSource(client))


async def get(images: ImageAnnotations, name: str) -> dict[str, str]:
    return await images.get(Image(name), time.monotonic() + 5)


def gets(server: FakeContainerd) -> int:
    return sum(c.startswith("Images/Get") for c in server.calls())


@integration
def test_by_name_a_seen_image_costs_no_call_while_events_are_live(
        containerd: FakeContainerd, caplog: pytest.LogCaptureFixture) -> None:
    digest, size = containerd.add_manifest({})
    containerd.tag(NGINX, digest, size)
    client, images = watched(containerd)

    async def go() -> None:
        try:
            client.watch_events()
            await until(lambda: client.names_trusted)
            for _ in range(3):
                assert await get(images, "nginx:1.27") == {}
            await asyncio.sleep(client.events_settle + 0.1)
        finally:
            await client.aclose()

    with caplog.at_level(logging.INFO, logger="nri_seccomp"):
        asyncio.run(go())
    # an operator sees that the stream works, once
    assert [r.getMessage() for r in caplog.records
            if "watching containerd's image events" in r.getMessage()] == [
        f"watching containerd's image events at {containerd.socket} (namespace k8s.io): an "
        "image name is looked up once, and again when containerd says it moved"]
    # the event stream says when the name moves: asked once, the manifest read once
    assert containerd.calls() == [f"Images/Get {NGINX}", f"Content/Read {digest}"]
    assert containerd.subscriptions() == ['namespace=="k8s.io",topic~="^/images/"']


@integration
def test_by_name_before_the_subscription_settles_costs_one_images_get_each(
        containerd: FakeContainerd) -> None:
    """A lookup sent before the subscription is trusted may miss an event that came
    between its answer and the subscription: it is not remembered."""
    digest, size = containerd.add_manifest({})
    containerd.tag(NGINX, digest, size)
    client = ContainerdImages(containerd.socket, "k8s.io", NODE, events_settle=60)
    images = ImageAnnotations(ContainerdSource(client))

    async def go() -> None:
        try:
            for _ in range(3):
                assert await get(images, "nginx:1.27") == {}
        finally:
            await client.aclose()

    asyncio.run(go())
    assert containerd.calls() == [f"Images/Get {NGINX}", f"Content/Read {digest}",
                                  f"Images/Get {NGINX}", f"Images/Get {NGINX}"]


@integration
def test_an_image_event_moves_the_name(containerd: FakeContainerd) -> None:
    """Re-tagged in containerd (/images/update): the next container sees the new
    manifest's annotations; deleted (/images/delete): not found."""
    first, size = containerd.add_manifest({KEY_V1: "r.example/p/one:1"}, seed="1")
    containerd.tag(NGINX, first, size)
    client, images = watched(containerd)

    async def go() -> None:
        try:
            client.watch_events()
            await until(lambda: client.names_trusted)
            assert await get(images, "nginx:1.27") == {KEY_V1: "r.example/p/one:1"}
            assert await get(images, "nginx:1.27") == {KEY_V1: "r.example/p/one:1"}
            assert gets(containerd) == 1
            second, size2 = containerd.add_manifest({KEY_V1: "r.example/p/two:1"}, seed="2")
            containerd.tag(NGINX, second, size2)  # the node re-pulled: /images/update
            await until(lambda: client.cached_target("nginx:1.27") is None)
            assert await get(images, "nginx:1.27") == {KEY_V1: "r.example/p/two:1"}
            assert await get(images, "nginx:1.27") == {KEY_V1: "r.example/p/two:1"}
            assert gets(containerd) == 2
            containerd.untag(NGINX)  # /images/delete
            await until(lambda: client.cached_target("nginx:1.27") is None)
            with pytest.raises(ImageLookupError, match="not found in containerd"):
                await get(images, "nginx:1.27")
        finally:
            await client.aclose()

    asyncio.run(go())


@integration
@pytest.mark.parametrize("raw_topic", [("/images/update", b"\xff\xff\xff"),
                                       ("/images/update", b""),
                                       ("/images/retag", b"")],
                         ids=["undecodable", "no name", "unknown image topic"])
def test_a_malformed_image_event_drops_every_name(containerd: FakeContainerd,
                                                  raw_topic: tuple[str, bytes]) -> None:
    digest, size = containerd.add_manifest({})
    containerd.tag(NGINX, digest, size)
    client, images = watched(containerd)

    async def go() -> None:
        try:
            client.watch_events()
            await until(lambda: client.names_trusted)
            await get(images, "nginx:1.27")
            assert client.cached_target("nginx:1.27") == digest
            containerd.publish(raw_topic[0], raw=raw_topic[1])
            await until(lambda: client.cached_target("nginx:1.27") is None)
            assert client.names_trusted  # the stream itself is fine
        finally:
            await client.aclose()

    asyncio.run(go())


async def reconnected(client: ContainerdImages) -> None:
    """Until the channel reaches the (restarted) server: a lookup fails meanwhile."""
    end = time.monotonic() + 5
    while True:
        try:
            await client.target("nginx:1.27", time.monotonic() + 5)
            return
        except ContainerdError:
            assert time.monotonic() < end, "not reconnected"
            await asyncio.sleep(0.05)


@integration
@pytest.mark.parametrize("how", ["stream ended", "containerd restarted"])
def test_a_broken_event_stream_asks_every_time_until_resubscribed(
        containerd: FakeContainerd, how: str) -> None:
    digest, size = containerd.add_manifest({})
    containerd.tag(NGINX, digest, size)
    client, images = watched(containerd)

    async def go() -> None:
        try:
            client.watch_events()
            await until(lambda: client.names_trusted)
            await get(images, "nginx:1.27")
            await get(images, "nginx:1.27")
            assert gets(containerd) == 1
            # new subscriptions are refused until the test allows them again
            containerd.drop_event_streams(refuse=True)
            if how == "containerd restarted":
                await asyncio.to_thread(containerd.stop)
                await asyncio.to_thread(containerd.start)
            await until(lambda: not client.names_trusted)
            assert client.cached_target("nginx:1.27") is None
            await reconnected(client)
            before = gets(containerd)
            for _ in range(3):
                await get(images, "nginx:1.27")
            assert gets(containerd) == before + 3  # one each while there is no stream
            containerd.allow_event_streams()
            await until(lambda: client.names_trusted)  # re-subscribed (back-off)
            for _ in range(3):
                await get(images, "nginx:1.27")
            assert gets(containerd) == before + 4  # remembered again
        finally:
            await client.aclose()

    asyncio.run(go())
    assert len(containerd.subscriptions()) >= 2


@integration
def test_without_an_events_service_every_lookup_by_name_asks(tmp_path: Path) -> None:
    """A containerd (or a proxy) without Events/Subscribe: today's behaviour, one
    Images/Get per container, and the manifest read once."""
    with FakeContainerd(tmp_path / "ctrd", events=False) as server:
        digest, size = server.add_manifest({})
        server.tag(NGINX, digest, size)
        client, images = watched(server)

        async def go() -> None:
            try:
                client.watch_events()
                await asyncio.sleep(SETTLE * 3)
                assert not client.names_trusted
                for _ in range(3):
                    assert await get(images, "nginx:1.27") == {}
            finally:
                await client.aclose()

        asyncio.run(go())
        assert server.calls() == [f"Images/Get {NGINX}", f"Content/Read {digest}",
                                  f"Images/Get {NGINX}", f"Images/Get {NGINX}"]


@integration
def test_a_moved_tag_is_judged_by_what_the_node_pulled(containerd: FakeContainerd) -> None:
    first, size = containerd.add_manifest({KEY_V1: "r.example/p/one:1"}, seed="1")
    containerd.tag("r.example/app/moving:1", first, size)
    client = ContainerdImages(containerd.socket, "k8s.io", NODE)
    images = ImageAnnotations(ContainerdSource(client))

    async def go() -> list[dict[str, str]]:
        try:
            out = [await images.get(Image("r.example/app/moving:1"), time.monotonic() + 5)]
            second, size2 = containerd.add_manifest({KEY_V1: "r.example/p/two:1"}, seed="2")
            containerd.tag("r.example/app/moving:1", second, size2)  # the node re-pulled
            out.append(await images.get(Image("r.example/app/moving:1"), time.monotonic() + 5))
            return out
        finally:
            await client.aclose()

    assert asyncio.run(go()) == [{KEY_V1: "r.example/p/one:1"}, {KEY_V1: "r.example/p/two:1"}]


@integration
def test_unknown_image(containerd: FakeContainerd) -> None:
    with pytest.raises(ImageLookupError, match=r"cannot read annotations of image "
                       r"nginx:9: image docker.io/library/nginx:9 not found in containerd "
                       r"\(namespace k8s.io\)"):
        lookup(containerd, Image("nginx:9"))


@integration
def test_another_namespace_does_not_see_the_image(containerd: FakeContainerd) -> None:
    digest, size = containerd.add_manifest({KEY_V1: PROFILE})
    containerd.tag("docker.io/library/nginx:1.27", digest, size)
    with pytest.raises(ImageLookupError, match=r"not found in containerd \(namespace moby\)"):
        lookup(containerd, Image("nginx:1.27"), namespace="moby")


@integration
def test_oversized_manifest_is_cut_off(containerd: FakeContainerd) -> None:
    digest, size = containerd.add_manifest({KEY_V1: PROFILE, "pad": "x" * 5000})
    containerd.tag("docker.io/library/big:1", digest, size)
    with pytest.raises(ImageLookupError, match="is larger than 4096 bytes"):
        lookup(containerd, Image("big:1"), max_bytes=4096)


@integration
def test_too_deep_manifest_is_not_parsed(containerd: FakeContainerd) -> None:
    raw = b'{"schemaVersion": 2, "annotations": {"a": ' + b"[" * 40 + b"]" * 40 + b"}}"
    digest = containerd.add_blob(raw)
    with pytest.raises(ImageLookupError, match="nested more than 32 levels"):
        lookup(containerd, Image("x:1", digest))


def test_socket_down(tmp_path: Path) -> None:
    server = FakeContainerd(tmp_path / "none")  # never started: nothing listens
    started = time.monotonic()
    with pytest.raises(ImageLookupError, match=r"cannot read annotations of image nginx:1.27: "
                       r"containerd at .*/c.sock is unavailable: no such file: .*/c.sock "
                       r"does not exist"):
        lookup(server, Image("nginx:1.27"))
    assert time.monotonic() - started < 2


def unavailable(socket_path: str) -> str:
    client = ContainerdImages(socket_path, "k8s.io", NODE)

    async def go() -> str:
        try:
            await client.target("nginx:1.27", time.monotonic() + 5)
        except ContainerdError as exc:
            return str(exc)
        finally:
            await client.aclose()
        raise AssertionError("no error")

    return asyncio.run(go())


def test_socket_missing_says_so_in_fixed_words(tmp_path: Path) -> None:
    """gRPC's text starts with "failed to connect to all addresses" and ends with the
    errno's words; a head cut at 120 characters lost them. A stat of the path says it."""
    path = str(tmp_path / "nonexistent.sock")
    message = unavailable(path)
    assert message == (f"containerd at {path} is unavailable: no such file: {path} does not "
                       "exist (is containerd running, and is containerd_socket its address?)")


def test_path_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    path.write_text("")
    assert unavailable(str(path)).endswith(f"is unavailable: {path} is not a socket "
                                           "(a regular file)")


def test_socket_nobody_listens_on_quotes_the_end_of_grpcs_text(tmp_path: Path) -> None:
    """A socket file left by a containerd that is gone (bound, not listening): the file
    system cannot tell, so gRPC's text is quoted, its end, where the cause is."""
    path = str(tmp_path / "c.sock")
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(path)  # never listen(): connect() is refused
    try:
        message = unavailable(path)
    finally:
        left.close()
    assert message.startswith(f"containerd at {path} is unavailable: ")
    assert message.endswith("Connection refused'"), message
    assert len(message) < len(path) + 300


@integration
def test_containerd_gone_says_why(containerd: FakeContainerd) -> None:
    """The gRPC server process stopped (SIGTERM): whether it left its socket file or
    not, the message names the cause, not only "failed to connect to all addresses"."""
    containerd.stop()
    message = unavailable(containerd.socket)
    assert message.endswith(("Connection refused'", "containerd_socket its address?)")), message


# ---- an image given by ID (sha256:<config digest>) ----------------------------------------

BLOG = "r.example/p/blog:1"


def same_config_images(server: FakeContainerd, first: dict[str, str],
                       second: dict[str, str]) -> tuple[str, str, str]:
    """Two images pulled with one config (so one ID) and these annotations; containerd's
    record of the ID points at the last pulled, as CRI keeps it. (ID, first, second)."""
    one, size1 = server.add_manifest({**first, "org.example/n": "1"}, seed="busybox")
    two, size2 = server.add_manifest({**second, "org.example/n": "2"}, seed="busybox")
    server.tag("r.example/test/annotated:v1", one, size1)
    server.tag("r.example/test/blog:v1", two, size2)
    image_id = server.image_id("busybox")
    server.tag(image_id, two, size2)
    return image_id, one, two


@integration
@pytest.mark.parametrize("second", [{KEY_V1: BLOG}, {}], ids=["other profile", "none"])
def test_image_id_whose_images_disagree_is_refused(containerd: FakeContainerd,
                                                   second: dict[str, str]) -> None:
    """/work/rt/RESULTS.md A-extra: by ID, containerd's record gave the last pulled
    manifest's profile. Fail closed, naming the ID and the images."""
    image_id, one, two = same_config_images(containerd, {KEY_V1: PROFILE}, second)
    other = f"{KEY_V1}='{BLOG}'" if second else "none"
    with pytest.raises(ImageLookupError) as info:
        lookup(containerd, Image(image_id))
    assert str(info.value) == (
        f"cannot read annotations of image {image_id}: it is an image ID, and the 2 images "
        f"with ID {image_id} in containerd differ in their seccomp-profile annotations ("
        + "; ".join(sorted([f"r.example/test/annotated:v1 ({one}): {KEY_V1}='{PROFILE}'",
                            f"r.example/test/blog:v1 ({two}): {other}"],
                           key=lambda s: s.split("(")[1]))
        + "): which of them the container runs cannot be told from the ID")


@integration
def test_image_id_whose_images_agree_is_served(containerd: FakeContainerd) -> None:
    """Same seccomp annotations (other annotations differ): any of them will do. An image
    for other platforms only and an unrelated image are passed over."""
    image_id, _, _ = same_config_images(containerd, {KEY_V1: PROFILE}, {KEY_V1: PROFILE})
    arm, arm_size = containerd.add_manifest({KEY_V1: BLOG}, seed="arm")
    index, size = containerd.add_index([(arm, arm_size, ARM64)])
    containerd.tag("r.example/test/arm-only:1", index, size,
                   media_type="application/vnd.oci.image.index.v1+json")
    plain, plain_size = containerd.add_manifest({}, seed="plain")
    containerd.tag("r.example/test/plain:1", plain, plain_size)
    client = ContainerdImages(containerd.socket, "k8s.io", NODE)
    images = ImageAnnotations(ContainerdSource(client))

    async def go() -> list[dict[str, str]]:
        try:
            return [await images.get(Image(image_id), time.monotonic() + 5) for _ in range(2)]
        finally:
            await client.aclose()

    assert asyncio.run(go()) == [{KEY_V1: PROFILE}] * 2
    calls = containerd.calls()
    # each manifest read once; the second time only the list again (a pull may add one)
    assert calls.count("Images/List ") == 2
    assert len([c for c in calls if c.startswith("Content/Read")]) == len(set(calls)) - 1


@integration
def test_image_id_in_an_index(containerd: FakeContainerd) -> None:
    """The ID is the config of the node's platform manifest of a multi-platform image;
    a single-platform image with the same config and another profile disagrees."""
    ours, ours_size = containerd.add_manifest({KEY_V1: PROFILE}, seed="multi")
    arm, arm_size = containerd.add_manifest({}, seed="arm")
    index, size = containerd.add_index([(arm, arm_size, ARM64), (ours, ours_size, AMD64)])
    containerd.tag("r.example/test/multi:1", index, size,
                   media_type="application/vnd.oci.image.index.v1+json")
    image_id = containerd.image_id("multi")
    assert lookup(containerd, Image(image_id)) == {KEY_V1: PROFILE}
    single, single_size = containerd.add_manifest({KEY_V1: BLOG}, seed="multi")
    containerd.tag("r.example/test/single:1", single, single_size)
    with pytest.raises(ImageLookupError, match=f"the 2 images with ID {image_id} in "
                       "containerd differ"):
        lookup(containerd, Image(image_id))
