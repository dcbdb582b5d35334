"""An image → the annotations of its manifest (CRI-O's "image annotations").

Two sources, chosen by ``image_annotations_source``:

- ``containerd`` (the default): the manifest containerd pulled, read from its
  content store (``containerd.client``), as CRI-O reads the pulled manifest from
  local storage. Known by digest: when the runtime sends ``Container.image.digest``
  (containerd 2.4+) an image seen once costs no call at all; otherwise the digest
  the name points to *now* (a name is not an identity: the node may have pulled a
  moved tag) is remembered while containerd's image event stream is live, which
  says when a name moves, and asked with one ``Images/Get`` per container while it
  is not (``containerd.client``). The manifest reads are cached by that digest.
- ``registry`` (opt-in, for runtimes without a reachable content store): the
  manifest the image's registry serves now, under ``registry.allowed``, cached by
  reference. It may differ from what the node runs when a tag moved.

Either way: one lookup per key in flight, shared by concurrent requests, bounded
by the request's deadline; a failure is remembered briefly. Lookups have a lane
of their own (``concurrency``): when it is full a lookup is not queued but
answered as failed at once. Only seccomp-profile annotations are kept.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from nri_seccomp.bounded import quote_untrusted
from nri_seccomp.containerd.client import (
    ContainerdError,
    ContainerdImages,
    ContainerdUnavailable,
    is_image_id,
)
from nri_seccomp.decide import reference, resolver
from nri_seccomp.decide.reference import Reference
from nri_seccomp.errors import NriSeccompError
from nri_seccomp.memo import BoundedMap, Busy, SingleFlight
from nri_seccomp.registry.errors import ArtifactError, PolicyError

log = logging.getLogger(__name__)

KEEP = 1024
FETCH_BUDGET = 30.0
#: seccomp-profile annotations kept per image
MAX_KEYS = 64
#: images' manifests remembered for lookups by image ID (config digest, annotations)
ID_FACTS_KEPT = 4096
#: images named in the refusal of an image ID whose images disagree
ID_SHOWN = 4

T = TypeVar("T")


class ImageLookupError(NriSeccompError):
    pass


class NotLooked(Exception):
    """This image's annotations are not to be read (its registry is not allowed): {}."""


@dataclass(frozen=True)
class Image:
    #: the name the runtime gave (``Container.image.name`` or the CRI annotation)
    name: str
    #: ``Container.image.digest`` (containerd 2.4+, NRI v0.12.2), "" when not sent
    digest: str = ""


class AnnotationSource(Protocol):
    #: how failures are remembered, seconds
    failure_ttl: float

    def key(self, image: Image) -> str | None:
        """The cache key known without I/O; None when ``resolve`` must find it.
        NotLooked when the image is not to be looked up, ImageLookupError if unusable."""
        ...

    def resolve(self, image: Image, deadline: float) -> Awaitable[str]: ...

    def read(self, key: str, image: Image, deadline: float) -> Awaitable[dict[str, str]]: ...

    def aclose(self) -> Awaitable[None]: ...

    def start(self) -> None:
        """Begin background work that needs the event loop (called on it)."""
        ...


class ContainerdSource:
    """The pulled manifest, from containerd's content store (``containerd.client``).

    An image given by ID (``sha256:<config digest>``, a kubelet or pod naming images
    that way) is not one manifest: every image pulled with that config has it, and
    containerd's record of that name points at whichever was pulled last. So all
    records are looked at (``Images/List``, and each target's platform manifest, read
    once per digest): when the manifests with that config agree on their seccomp
    annotations those are the image's, when they differ the lookup fails (closed).
    """

    #: containerd is local: a failure (socket down, image not yet recorded) is retried soon
    failure_ttl = 2.0

    def __init__(self, client: ContainerdImages) -> None:
        self.client = client
        #: target digest → (its platform manifest's config digest, seccomp annotations);
        #: content-addressed, so never stale
        self._facts: BoundedMap[str, tuple[str | None, dict[str, str]]] = BoundedMap(
            ID_FACTS_KEPT)

        # the name cache is only trusted once the subscription was live before a lookup:
        # subscribing now (when a loop runs; else at start() or the first lookup) lets
        # the first containers fill it
        client.watch_events()

    def start(self) -> None:
        # built in a thread at the first Configure, where no loop runs: subscribe here,
        # before the first container, so its lookup already fills the name cache
        self.client.watch_events()

    def key(self, image: Image) -> str | None:
        if image.digest:
            return image.digest
        # an image by name: its target, if containerd's events vouch it has not moved
        return self.client.cached_target(image.name)

    async def resolve(self, image: Image, deadline: float) -> str:
        try:
            if is_image_id(image.name):
                return await self._resolve_id(image.name, deadline)
            return await self.client.target(image.name, deadline)
        except ContainerdError as exc:
            raise ImageLookupError(f"cannot read annotations of image {image.name}: {exc}"
                                   ) from None

    async def _resolve_id(self, image_id: str, deadline: float) -> str:
        """A target digest whose annotations stand for every image with this ID."""
        same: dict[str, tuple[dict[str, str], list[str]]] = {}
        for digest, names in sorted((await self.client.image_targets(deadline)).items()):
            facts = self._facts.get(digest)
            if facts is None:
                try:
                    config, annotations = await self.client.config_and_annotations(
                        digest, deadline)
                except ContainerdUnavailable:
                    raise
                except ContainerdError as exc:
                    # an image for other platforms only, or content containerd no longer
                    # holds: no container on this node runs it under any ID. Remembered
                    # as having no config, so the next lookup does not read it again
                    log.debug("image %s (%s) skipped looking for ID %s: %s",
                              names[0], digest, image_id, exc)
                    config, annotations = None, {}
                facts = (config, _seccomp_only(annotations))
                self._facts.put(digest, facts)
            if facts[0] == image_id:
                same[digest] = (facts[1], names)
        if not same:
            # no manifest names that config (an image format without one?): containerd's
            # own record of the ID, as before
            return await self.client.target(image_id, deadline)
        if len({tuple(sorted(a.items())) for a, _ in same.values()}) > 1:
            shown = "; ".join(
                f"{_display_name(names)} ({digest}): "
                + (", ".join(f"{k}={quote_untrusted(v, 80)}" for k, v in sorted(a.items()))
                   or "none")
                for digest, (a, names) in itertools.islice(same.items(), ID_SHOWN))
            more = f"; and {len(same) - ID_SHOWN} more" if len(same) > ID_SHOWN else ""
            raise ContainerdError(
                f"it is an image ID, and the {len(same)} images with ID {image_id} in "
                f"containerd differ in their seccomp-profile annotations ({shown}{more}): "
                "which of them the container runs cannot be told from the ID")
        # they agree: any of them will do; containerd's own record of the ID if it is one
        for digest, (_, names) in same.items():
            if image_id in names:
                return digest
        return next(iter(same))

    async def read(self, key: str, image: Image, deadline: float) -> dict[str, str]:
        facts = self._facts.get(key)
        if facts is not None and facts[0] is not None:
            return dict(facts[1])  # read already, looking for an image ID
        try:
            return await self.client.annotations(key, deadline)
        except ContainerdError as exc:
            raise ImageLookupError(f"cannot read annotations of image {image.name} "
                                   f"({key}): {exc}") from None

    async def aclose(self) -> None:
        await self.client.aclose()


class ManifestSource(Protocol):
    def check_allowed(self, ref: Reference) -> None: ...

    def manifest_annotations(self, ref: Reference, deadline: float) -> Awaitable[dict[str, str]]:
        ...


class RegistrySource:
    """The manifest the image's registry serves now (opt-in), under ``registry.allowed``."""

    failure_ttl = 60.0

    def __init__(self, fetcher: ManifestSource) -> None:
        self.fetcher = fetcher

    def start(self) -> None:
        pass  # nothing runs in the background

    def key(self, image: Image) -> str | None:
        try:
            ref = reference.parse(image.name)
        except reference.ReferenceError as exc:
            raise ImageLookupError(str(exc)) from None
        try:
            # the allow-list alone: require_digest is about profiles, images come by tag
            self.fetcher.check_allowed(ref)
        except PolicyError:
            raise NotLooked from None
        return str(ref)

    async def resolve(self, image: Image, deadline: float) -> str:  # pragma: no cover
        raise AssertionError("a registry source knows its key")

    async def read(self, key: str, image: Image, deadline: float) -> dict[str, str]:
        try:
            return await self.fetcher.manifest_annotations(reference.parse(key), deadline)
        except ArtifactError as exc:
            raise ImageLookupError(f"cannot read annotations of image {key}: {exc}") from exc

    async def aclose(self) -> None:
        pass  # the fetcher belongs to the profile store


class ImageAnnotations:
    def __init__(self, source: AnnotationSource, concurrency: int = 4) -> None:
        self._source = source
        self._known: BoundedMap[str, dict[str, str]] = BoundedMap(KEEP)
        self._failed: BoundedMap[str, str] = BoundedMap(KEEP)
        self._flight: SingleFlight[str, dict[str, str]] = SingleFlight(concurrency,
                                                                       "image lookups")
        self._names: SingleFlight[str, str] = SingleFlight(concurrency, "image resolutions")

    @property
    def source(self) -> AnnotationSource:
        return self._source

    def set_source(self, source: AnnotationSource) -> AnnotationSource:
        """Use ``source`` from now on; the previous one is returned for closing."""
        old, self._source = self._source, source
        self._known.clear()
        self._failed.clear()
        source.start()
        return old

    def start(self) -> None:
        """Start the source's background work; on the event loop, once it runs."""
        self._source.start()

    async def get(self, image: Image, deadline: float) -> dict[str, str]:
        """The annotations; ImageLookupError when they cannot be read, TimeoutError if late.

        An image the source is not to look up (the registry source's allow-list) has {}.
        """
        source = self._source
        try:
            key = source.key(image)
        except NotLooked:
            return {}
        if key is None:
            # by name, not vouched for by containerd's events: what the name points to
            # now, one call
            key = await self._in_lane(self._names, f"name {image.name}",
                                      lambda: source.resolve(image, time.monotonic()
                                                             + FETCH_BUDGET), deadline)
        known = self._known.get(key)
        if known is not None:
            return known
        failed = self._failed.get(key)
        if failed is not None:
            raise ImageLookupError(failed)
        return await self._in_lane(self._flight, key,
                                   lambda: self._lookup(source, key, image), deadline)

    async def _in_lane(self, lane: SingleFlight[str, T], key: str,
                       work: Callable[[], Awaitable[T]], deadline: float) -> T:
        try:
            task = lane.start(key, work, _finished)
        except Busy:
            raise ImageLookupError(f"cannot read annotations of image {key} now: "
                                   f"{lane.limit} {lane.name} in flight") from None
        return await SingleFlight.wait(task, deadline)

    async def _lookup(self, source: AnnotationSource, key: str,
                      image: Image) -> dict[str, str]:
        try:
            annotations = await source.read(key, image, time.monotonic() + FETCH_BUDGET)
        except ImageLookupError as exc:
            if source is self._source:
                self._failed.put(key, str(exc), ttl=source.failure_ttl)
            raise
        # only what the resolver reads is kept: a manifest's other annotations are
        # the image author's to fill, and a thousand remembered images must stay small
        kept = _seccomp_only(annotations)
        if source is self._source:
            self._known.put(key, kept)
        return kept


def _seccomp_only(annotations: dict[str, str]) -> dict[str, str]:
    """What the resolver reads of an image's annotations, at most MAX_KEYS of them."""
    return dict(itertools.islice(
        ((k, v) for k, v in annotations.items() if k.startswith(resolver.KEYS)), MAX_KEYS))


def _display_name(names: list[str]) -> str:
    """A record's name for a message: a reference rather than the bare ID."""
    return next((n for n in names if not is_image_id(n)), names[0])


def _finished(key: str, task: asyncio.Task[T]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a failure nobody awaited is not an error to log
