"""Image reference → the annotations of its manifest (CRI-O's "image annotations").

containerd does not hand image annotations to NRI plugins, so they are read
from the image's registry: one manifest request per image, cached in memory,
shared by concurrent requests, bounded by the request's deadline like every
other registry call. A failed lookup is remembered briefly so a broken or
private registry is not asked again for every container.

Lookups have a lane of their own (``concurrency``), apart from profile fetches
and compiles: when it is full a lookup is not queued but answered as failed at
once, so a container whose image names no profile never waits behind anyone.
Images from registries outside ``registry.allowed`` are not looked up at all.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable
from typing import Protocol

from nri_seccomp.decide import resolver
from nri_seccomp.decide.reference import Reference
from nri_seccomp.errors import NriSeccompError
from nri_seccomp.memo import BoundedMap, Busy, SingleFlight
from nri_seccomp.registry.errors import ArtifactError, PolicyError

log = logging.getLogger(__name__)

KEEP = 1024
FAILURE_TTL = 60.0
FETCH_BUDGET = 30.0
#: seccomp-profile annotations kept per image
MAX_KEYS = 64


class ImageLookupError(NriSeccompError):
    pass


class ManifestSource(Protocol):
    def check_allowed(self, ref: Reference) -> None: ...

    def manifest_annotations(self, ref: Reference, deadline: float) -> Awaitable[dict[str, str]]:
        ...


class ImageAnnotations:
    def __init__(self, fetcher: ManifestSource, concurrency: int = 4) -> None:
        self._fetcher = fetcher
        self._known: BoundedMap[str, dict[str, str]] = BoundedMap(KEEP)
        self._failed: BoundedMap[str, str] = BoundedMap(KEEP)
        self._flight: SingleFlight[str, dict[str, str]] = SingleFlight(concurrency,
                                                                       "image lookups")

    def set_fetcher(self, fetcher: ManifestSource) -> None:
        self._fetcher = fetcher
        self._known.clear()
        self._failed.clear()

    async def get(self, ref: Reference, deadline: float) -> dict[str, str]:
        """The annotations; ImageLookupError when they cannot be read, TimeoutError if late.

        An image whose registry is not allowed has no annotations we may read: {}.
        """
        key = str(ref)
        try:
            # the allow-list alone: require_digest is about profiles, images come by tag
            self._fetcher.check_allowed(ref)
        except PolicyError:
            return {}
        known = self._known.get(key)
        if known is not None:
            return known
        failed = self._failed.get(key)
        if failed is not None:
            raise ImageLookupError(failed)
        try:
            task = self._flight.start(key, lambda: self._lookup(ref, key), self._finished)
        except Busy:
            raise ImageLookupError(f"cannot read annotations of image {key} now: "
                                   f"{self._flight.limit} image lookups in flight") from None
        return await SingleFlight.wait(task, deadline)

    def _finished(self, key: str, task: asyncio.Task[dict[str, str]]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved: a failure nobody awaited is not an error to log

    async def _lookup(self, ref: Reference, key: str) -> dict[str, str]:
        try:
            annotations = await self._fetcher.manifest_annotations(
                ref, time.monotonic() + FETCH_BUDGET)
        except ArtifactError as exc:
            message = f"cannot read annotations of image {key}: {exc}"
            self._failed.put(key, message, ttl=FAILURE_TTL)
            raise ImageLookupError(message) from exc
        # only what the resolver reads is kept: a manifest's other annotations are
        # the registry's to fill, and a thousand remembered images must stay small
        kept = dict(itertools.islice(
            ((k, v) for k, v in annotations.items() if k.startswith(resolver.KEYS)), MAX_KEYS))
        self._known.put(key, kept)
        return kept
