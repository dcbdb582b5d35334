"""containerd's own images and content services over gRPC: the pulled image's annotations.

CRI-O reads an image's annotations from the manifest it pulled, in local storage.
containerd keeps that exact manifest in its content store, so this client reads it
there, the way ``ctr`` does, over containerd's socket:

- the image's target descriptor: known at once when the runtime sends
  ``Container.image.digest`` (containerd 2.4+, NRI v0.12.2), else from
  ``Images/Get`` with the name the kubelet gave, normalised as containerd stores it
  (``nginx:1.27`` → ``docker.io/library/nginx:1.27``);
- the target's bytes with ``Content/Read``: at most ``max_bytes``, hashed against
  the digest, nested at most ``MAX_JSON_DEPTH`` deep;
- for an index (OCI or Docker list) the entry of the node's platform
  (``platform.pick``), read the same way: **its** annotations are the image's. The
  index's own annotations are not read: CRI-O reads the platform manifest it pulled
  (its image source for a list resolves to the instance), so an annotation on the
  index only does not select a profile there either.

An image given by name costs no call once seen, as long as containerd's event stream
says when names move: a background task subscribes to ``Events/Subscribe`` for the
image topics (``/images/create``, ``/images/update``, ``/images/delete``) of the
namespace, and every image event drops its name from a bounded name → target cache.
The cache is *trusted* (read and filled) only while that subscription is live and has
been for ``events_settle`` seconds or has delivered an event (containerd sends no
headers before its first event, so nothing else tells that its exchange registered
us); a fill counts only when the ``Images/Get`` started while trusted, and no event
and no loss of the stream came while it was answered. A broken stream empties the
cache and distrusts it until re-subscribed (back-off, at most ``EVENTS_BACKOFF_MAX``);
a containerd without the events service leaves every lookup by name to
``Images/Get``, as before.

Every call carries the ``containerd-namespace`` metadata (``k8s.io`` for CRI images)
and the time left before the caller's deadline. Errors say what failed in fixed
words; containerd's own text is quoted short. An unreachable socket says why in fixed
words when a ``stat`` of the path tells (missing, not a socket, permission denied),
else quotes the end of gRPC's text, where its cause is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import stat
import time
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from nri_seccomp import digest as digest_mod
from nri_seccomp.bounded import quote_untrusted, quote_untrusted_tail
from nri_seccomp.containerd import platform
from nri_seccomp.containerd.pb import (
    content_pb2,
    content_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
)
from nri_seccomp.decide import reference
from nri_seccomp.errors import NriSeccompError
from nri_seccomp.memo import BoundedMap
from nri_seccomp.registry.artifact import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MAX_IMAGE_MANIFEST,
    MAX_JSON_DEPTH,
    OCI_INDEX,
    OCI_MANIFEST,
    TooDeep,
    checked_json,
)

DEFAULT_SOCKET = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "k8s.io"
NAMESPACE_HEADER = "containerd-namespace"
_IMAGE_ID = re.compile(r"sha256:[a-f0-9]{64}")
#: names whose image target is remembered while the event stream is trusted
NAMES_KEPT = 1024
#: seconds a fresh subscription must stay open before it is trusted (see the module doc)
EVENTS_SETTLE = 0.5
#: re-subscription back-off, seconds: first, and the bound it doubles up to
EVENTS_BACKOFF = 0.1
EVENTS_BACKOFF_MAX = 5.0
#: a containerd without the events service is asked again this rarely (it may be upgraded)
EVENTS_UNIMPLEMENTED_RETRY = 300.0
#: an image name longer than this in an event is malformed (containerd's own limit is
#: lower); the whole cache is dropped rather than guessing which entry it meant
MAX_EVENT_NAME = 4096
#: bytes of one event envelope accepted (image events carry a name and labels)
MAX_EVENT_BYTES = 256 * 1024
#: seconds between two log lines about malformed events
MALFORMED_LOG_EVERY = 60.0
IMAGE_TOPICS = {
    "/images/create": events_pb2.ImageCreate,
    "/images/update": events_pb2.ImageUpdate,
    "/images/delete": events_pb2.ImageDelete,
}

log = logging.getLogger(__name__)


class ContainerdError(NriSeccompError):
    """The image's annotations could not be read from containerd; the message says why."""


class ContainerdUnavailable(ContainerdError):
    """containerd's socket cannot be reached (as opposed to one image or blob failing)."""


def is_image_id(name: str) -> bool:
    """``sha256:<64 hex>``: an image ID (the config's digest), a name of its own in CRI."""
    return _IMAGE_ID.fullmatch(name) is not None


def _annotations(body: dict[str, Any], digest: str) -> dict[str, str]:
    found = body.get("annotations") or {}
    if not isinstance(found, dict):
        raise ContainerdError(f"manifest of image {digest}: annotations are not an object")
    return {str(k): str(v) for k, v in found.items()}


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return f"mode {mode:o}"


def store_name(name: str) -> str:
    """The name containerd's image store has for ``name`` as the kubelet gave it.

    ``nginx:1.27`` → ``docker.io/library/nginx:1.27``; with a digest the tag is
    dropped, as containerd's ``ParseDockerRef`` does; an image ID (``sha256:…``)
    is a name of its own in the CRI namespace. ReferenceError if it is not a name.
    """
    if _IMAGE_ID.fullmatch(name):
        return name
    ref = reference.parse(name)
    if ref.digest is not None:
        return f"{ref.name}@{ref.digest}"
    return f"{ref.name}:{ref.tag}"


class ContainerdImages:
    """Reads image manifests from containerd; one channel, made on first use."""

    def __init__(self, socket: str = DEFAULT_SOCKET, namespace: str = DEFAULT_NAMESPACE,
                 node: platform.Platform | None = None,
                 max_bytes: int = MAX_IMAGE_MANIFEST,
                 events_settle: float = EVENTS_SETTLE) -> None:
        self.socket = socket
        self.namespace = namespace
        self.node = node or platform.node_platform()
        self.max_bytes = max_bytes
        self.events_settle = events_settle
        self._channel: grpc.aio.Channel | None = None
        self._images: Any = None
        self._content: Any = None
        self._events: Any = None
        #: store name → target digest; only read or filled while ``names_trusted``
        self._names: BoundedMap[str, str] = BoundedMap(NAMES_KEPT)
        self._watch: asyncio.Task[None] | None = None
        self._closed = False
        #: when the current subscription was opened (monotonic), None while there is none
        self._subscribed_at: float | None = None
        #: the last refusal of the subscription already logged (quiet until it changes)
        self._refused_with: str | None = None
        #: counts subscriptions, so a pending "watching" line of an ended one is dropped
        self._stream = 0
        #: the current subscription delivered an event: containerd registered it
        self._delivered = False
        #: bumped on every image event and every loss of the stream: a Get answered
        #: across a bump may have read a name an event has since moved
        self._generation = 0
        self._malformed = 0
        self._malformed_logged = 0.0

    def _stubs(self) -> tuple[Any, Any]:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                f"unix:{self.socket}",
                options=[
                    ("grpc.max_receive_message_length", self.max_bytes + 64 * 1024),
                    ("grpc.max_send_message_length", 64 * 1024),
                    # containerd restarts: reconnect within a second, not after minutes
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000),
                    ("grpc.enable_retries", 0),
                ],
            )
            self._images = images_pb2_grpc.ImagesStub(self._channel)  # type: ignore[no-untyped-call]
            self._content = content_pb2_grpc.ContentStub(self._channel)  # type: ignore[no-untyped-call]
            self._events = events_pb2_grpc.EventsStub(self._channel)  # type: ignore[no-untyped-call]
        return self._images, self._content

    async def aclose(self) -> None:
        self._closed = True
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        self._distrust()
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    # ---- the event stream and the name cache ----

    def watch_events(self) -> None:
        """Start the event subscription (once; needs a running loop, else a no-op that
        the next lookup repeats)."""
        if self._watch is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._watch = loop.create_task(self._watch_loop(), name="containerd image events")

    @property
    def names_trusted(self) -> bool:
        """Whether the name cache may be read and filled now (see the module doc)."""
        since = self._subscribed_at
        return since is not None and (
            self._delivered or time.monotonic() - since >= self.events_settle)

    def cached_target(self, name: str) -> str | None:
        """The target digest remembered for ``name`` (as the kubelet gave it), if the
        name cache is trusted; no I/O."""
        if not self.names_trusted or _IMAGE_ID.fullmatch(name):
            return None
        try:
            return self._names.get(store_name(name))
        except reference.ReferenceError:
            return None

    def _distrust(self) -> None:
        self._subscribed_at = None
        self._delivered = False
        self._generation += 1
        self._names.clear()

    def _filters(self) -> list[str]:
        # a namespace name is [A-Za-z0-9._-] (containerd validates it): quoting is plain
        return [f'namespace=="{self.namespace}",topic~="^/images/"']

    async def _watch_loop(self) -> None:
        backoff = EVENTS_BACKOFF
        while not self._closed:
            self._stubs()
            assert self._channel is not None
            # the settle time counts from a request sent on a connected channel, not
            # from a connection attempt that may take longer than it. (The call cannot
            # tell when it was sent: gRPC's Python client waits for the server's headers,
            # which containerd sends with its first event only.) The channel reconnects
            # with its own bounded back-off meanwhile.
            await self._channel.channel_ready()
            call = self._events.Subscribe(
                events_pb2.SubscribeRequest(filters=self._filters()),
                metadata=self._metadata())
            self._subscribed_at = time.monotonic()
            self._delivered = False
            self._stream += 1
            # containerd answers a subscription with its first event only: the stream is
            # known good once it has lasted the settle time, and an operator should see
            # that it is (lookups by name then cost nothing), as they see it break
            asyncio.get_running_loop().call_later(
                self.events_settle, self._say_watching, self._stream)
            retry = backoff
            try:
                async for envelope in call:
                    self._on_event(envelope)
                    backoff = EVENTS_BACKOFF  # a working stream: the next loss starts over
                if self.names_trusted:  # once per trusted stream: a flapping one is quiet
                    log.info("containerd's event stream ended: image names are looked up "
                             "on every container until it is back")
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.info("containerd at %s serves no event stream: every container "
                             "started by image name costs one Images/Get", self.socket)
                    retry = EVENTS_UNIMPLEMENTED_RETRY
                elif self.names_trusted:
                    log.info("containerd's event stream broke (%s): image names are looked "
                             "up on every container until it is back", exc.code().name)
                elif exc.code().name != self._refused_with:
                    # refused before it ever worked (a filter containerd rejects, say):
                    # once per kind of refusal, not at every retry
                    self._refused_with = exc.code().name
                    log.warning("containerd refused the image event stream (%s: %s): image "
                                "names are looked up on every container", exc.code().name,
                                quote_untrusted(exc.details() or ""))
            finally:
                call.cancel()
                self._stream += 1
                if self.names_trusted:
                    backoff = EVENTS_BACKOFF  # it worked: the next attempt starts soon
                    retry = min(retry, backoff)
                self._distrust()
            await asyncio.sleep(retry)
            backoff = min(backoff * 2, EVENTS_BACKOFF_MAX)

    def _say_watching(self, stream: int) -> None:
        if stream == self._stream and not self._closed and self.names_trusted:
            log.info("watching containerd's image events at %s (namespace %s): an image "
                     "name is looked up once, and again when containerd says it moved",
                     self.socket, self.namespace)

    def _on_event(self, envelope: Any) -> None:
        self._delivered = True
        self._refused_with = None
        self._generation += 1
        if envelope.namespace != self.namespace:
            return  # another namespace's images are other records (the filter says so too)
        kind = IMAGE_TOPICS.get(envelope.topic)
        if kind is None:
            if envelope.topic.startswith("/images/"):
                # an image event this plugin does not know: which name moved is unknown
                self._malformed_event("unknown image topic", envelope.topic)
            return
        event = kind()
        try:
            if envelope.ByteSize() > MAX_EVENT_BYTES:
                raise ValueError("too large")
            event.ParseFromString(envelope.event.value)
        except (DecodeError, ValueError):
            self._malformed_event("undecodable event", envelope.topic)
            return
        name = event.name
        if not name or len(name) > MAX_EVENT_NAME:
            self._malformed_event("no usable image name", envelope.topic)
            return
        self._names.pop(name)

    def _malformed_event(self, what: str, topic: str) -> None:
        """Drop every name (the event may have meant any) and say so, rarely."""
        self._names.clear()
        self._malformed += 1
        now = time.monotonic()
        if now - self._malformed_logged >= MALFORMED_LOG_EVERY:
            self._malformed_logged = now
            log.warning("containerd image event with %s (topic %s; %d so far): every "
                        "remembered image name dropped", what, quote_untrusted(topic, 60),
                        self._malformed)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return ((NAMESPACE_HEADER, self.namespace),)

    @staticmethod
    def _timeout(deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        return remaining

    def _error(self, exc: grpc.aio.AioRpcError, what: str) -> Exception:
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return TimeoutError()
        if code == grpc.StatusCode.NOT_FOUND:
            return ContainerdError(f"{what} not found in containerd (namespace "
                                   f"{self.namespace})")
        if code == grpc.StatusCode.UNAVAILABLE:
            return ContainerdUnavailable(f"containerd at {self.socket} is unavailable: "
                                   f"{self._unavailable_cause(exc.details() or '')}")
        return ContainerdError(f"containerd answered {code.name} for {what}: "
                               f"{quote_untrusted(exc.details() or '', 120)}")

    def _unavailable_cause(self, details: str) -> str:
        """Why the socket cannot be reached, in fixed words when the file system says
        (one stat, no connection); else the end of gRPC's text, where it puts the
        errno's words, since its start ("failed to connect to all addresses; last
        error: …") is the same every time."""
        path = self.socket
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return (f"no such file: {path} does not exist (is containerd running, and is "
                    "containerd_socket its address?)")
        except NotADirectoryError:
            return f"no such file: a directory on the way to {path} is not a directory"
        except PermissionError:
            return (f"permission denied: a directory on the way to {path} is not "
                    f"searchable by uid {os.geteuid()}")
        except OSError as exc:
            return f"cannot stat {path}: {exc.strerror or exc}"
        if not stat.S_ISSOCK(st.st_mode):
            return f"{path} is not a socket ({_file_kind(st.st_mode)})"
        if not os.access(path, os.R_OK | os.W_OK):
            return (f"permission denied: uid {os.geteuid()} may not connect to {path} "
                    f"(mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid} "
                    f"gid {st.st_gid})")
        return quote_untrusted_tail(details, 160)

    async def target(self, name: str, deadline: float) -> str:
        """The digest of the image ``name`` (as the kubelet gave it) in containerd's store."""
        try:
            stored = store_name(name)
        except reference.ReferenceError as exc:
            raise ContainerdError(f"image name {exc.value!r} {exc.problem}") from None
        images, _ = self._stubs()
        self.watch_events()
        # a fill counts only if the subscription was trusted before the Get was sent, and
        # nothing (an image event, a lost stream) came before its answer is stored
        generation = self._generation if self.names_trusted else None
        try:
            response = await images.Get(images_pb2.GetImageRequest(name=stored),
                                        timeout=self._timeout(deadline),
                                        metadata=self._metadata())
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, f"image {stored}") from None
        digest = response.image.target.digest
        if not digest_mod.is_valid(digest):
            raise ContainerdError(f"image {stored} has an invalid target digest "
                                  f"{quote_untrusted(digest)}")
        if (generation is not None and generation == self._generation
                and self.names_trusted and not _IMAGE_ID.fullmatch(stored)):
            self._names.put(stored, str(digest))
        return str(digest)

    async def image_targets(self, deadline: float) -> dict[str, list[str]]:
        """Every image record's target digest → the record names pointing at it
        (``Images/List``, one call)."""
        images, _ = self._stubs()
        try:
            response = await images.List(images_pb2.ListImagesRequest(),
                                         timeout=self._timeout(deadline),
                                         metadata=self._metadata())
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, "the image list") from None
        out: dict[str, list[str]] = {}
        for image in response.images:
            digest = image.target.digest
            if digest_mod.is_valid(digest):
                out.setdefault(str(digest), []).append(str(image.name))
        return out

    async def config_and_annotations(self, digest: str,
                                     deadline: float) -> tuple[str | None, dict[str, str]]:
        """For the image whose target is ``digest``: the config digest of the node's
        platform manifest (its image ID; None if it names none) and its annotations."""
        body = await self.platform_manifest(digest, deadline)
        config = body.get("config")
        config_digest = config.get("digest") if isinstance(config, dict) else None
        if not isinstance(config_digest, str) or not digest_mod.is_valid(config_digest):
            config_digest = None
        return config_digest, _annotations(body, digest)

    async def annotations(self, digest: str, deadline: float) -> dict[str, str]:
        """The annotations of the image whose target is ``digest`` (see the module doc)."""
        return _annotations(await self.platform_manifest(digest, deadline), digest)

    async def platform_manifest(self, digest: str, deadline: float) -> dict[str, Any]:
        """The manifest of the image whose target is ``digest``: itself, or the node's
        platform entry of an index (see the module doc)."""
        body = await self._manifest(digest, deadline)
        media_type = body.get("mediaType")
        if media_type in (OCI_INDEX, DOCKER_LIST) or (
                media_type is None and isinstance(body.get("manifests"), list)):
            manifests = body.get("manifests")
            entry = platform.pick(manifests if isinstance(manifests, list) else [], self.node)
            if entry is None:
                raise ContainerdError(f"image index {digest} has no manifest for {self.node}")
            child = entry.get("digest")
            if not isinstance(child, str) or not digest_mod.is_valid(child):
                raise ContainerdError(f"image index {digest} names an invalid digest "
                                      f"{quote_untrusted(child)} for {self.node}")
            body = await self._manifest(child, deadline)
            media_type = body.get("mediaType")
            if media_type in (OCI_INDEX, DOCKER_LIST) or "manifests" in body:
                raise ContainerdError(f"image index {digest}: the entry for {self.node} is "
                                      "an index again")
        elif media_type not in (OCI_MANIFEST, DOCKER_MANIFEST, None):
            raise ContainerdError(f"image {digest} has media type "
                                  f"{quote_untrusted(media_type)}, not a manifest or index")
        return body

    async def _manifest(self, digest: str, deadline: float) -> dict[str, Any]:
        raw = await self.read(digest, deadline)
        try:
            body = checked_json(raw)
        except TooDeep:
            raise ContainerdError(f"manifest {digest} is nested more than {MAX_JSON_DEPTH} "
                                  "levels deep") from None
        except (ValueError, RecursionError):
            raise ContainerdError(f"manifest {digest} is not valid JSON") from None
        if not isinstance(body, dict):
            raise ContainerdError(f"manifest {digest} is not a JSON object")
        return body

    async def read(self, digest: str, deadline: float) -> bytes:
        """The blob ``digest``, at most ``max_bytes``, checked against its digest."""
        _, content = self._stubs()
        # containerd clamps a size past the end of the blob: one byte more than the cap
        # tells a blob that is too large from one that fits exactly
        call = content.Read(content_pb2.ReadContentRequest(digest=digest,
                                                           size=self.max_bytes + 1),
                            timeout=self._timeout(deadline), metadata=self._metadata())
        chunks: list[bytes] = []
        total = 0
        try:
            async for response in call:
                total += len(response.data)
                if total > self.max_bytes:
                    call.cancel()
                    raise ContainerdError(f"manifest {digest} is larger than {self.max_bytes} "
                                          "bytes")
                chunks.append(response.data)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, f"content {digest}") from None
        data = b"".join(chunks)
        if not digest_mod.matches(digest, data):
            raise ContainerdError(f"content {digest} does not match its digest")
        return data
