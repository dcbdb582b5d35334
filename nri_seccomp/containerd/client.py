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

Every call carries the ``containerd-namespace`` metadata (``k8s.io`` for CRI images)
and the time left before the caller's deadline. Errors say what failed in fixed
words; containerd's own text is quoted short. An unreachable socket says why in fixed
words when a ``stat`` of the path tells (missing, not a socket, permission denied),
else quotes the end of gRPC's text, where its cause is.
"""

from __future__ import annotations

import os
import re
import stat
import time
from typing import Any

import grpc
import grpc.aio

from nri_seccomp import digest as digest_mod
from nri_seccomp.bounded import quote_untrusted, quote_untrusted_tail
from nri_seccomp.containerd import platform
from nri_seccomp.containerd.pb import content_pb2, content_pb2_grpc, images_pb2, images_pb2_grpc
from nri_seccomp.decide import reference
from nri_seccomp.errors import NriSeccompError
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
                 max_bytes: int = MAX_IMAGE_MANIFEST) -> None:
        self.socket = socket
        self.namespace = namespace
        self.node = node or platform.node_platform()
        self.max_bytes = max_bytes
        self._channel: grpc.aio.Channel | None = None
        self._images: Any = None
        self._content: Any = None

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
        return self._images, self._content

    async def aclose(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

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
