"""Image reference → the annotations of its manifest (CRI-O's "image annotations").

containerd does not hand image annotations to NRI plugins, so they are read
from the image's registry: one manifest request per image, cached in memory,
shared by concurrent requests, bounded by the request's deadline like every
other registry call. A failed lookup is remembered briefly so a broken or
private registry is not asked again for every container.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from concurrent.futures import Executor

from nri_seccomp.artifacts import ArtifactError, ArtifactFetcher
from nri_seccomp.reference import Reference

log = logging.getLogger(__name__)

KEEP = 1024
FAILURE_TTL = 60.0
FETCH_BUDGET = 30.0


class ImageLookupError(Exception):
    pass


class ImageAnnotations:
    def __init__(self, fetcher: ArtifactFetcher, executor: Executor) -> None:
        self._fetcher = fetcher
        self._executor = executor
        self._known: collections.OrderedDict[str, dict[str, str]] = collections.OrderedDict()
        self._failed: dict[str, tuple[float, str]] = {}
        self._inflight: dict[str, asyncio.Task[dict[str, str]]] = {}

    async def get(self, ref: Reference, deadline: float) -> dict[str, str]:
        """The annotations; ImageLookupError when they cannot be read, TimeoutError if late."""
        key = str(ref)
        known = self._known.get(key)
        if known is not None:
            self._known.move_to_end(key)
            return known
        failed = self._failed.get(key)
        if failed is not None and time.monotonic() - failed[0] < FAILURE_TTL:
            raise ImageLookupError(failed[1])
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._lookup(ref, key))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._finished, key))
        return await asyncio.wait_for(asyncio.shield(task), max(deadline - time.monotonic(), 0))

    def _finished(self, key: str, task: asyncio.Task[dict[str, str]]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: a failure nobody awaited is not an error to log

    async def _lookup(self, ref: Reference, key: str) -> dict[str, str]:
        try:
            # PolicyError (registry not in registry.allowed) too: annotations not read
            annotations = await self._fetcher.manifest_annotations(
                ref, time.monotonic() + FETCH_BUDGET
            )
        except ArtifactError as exc:
            message = f"cannot read annotations of image {key}: {exc}"
            self._failed[key] = (time.monotonic(), message)
            raise ImageLookupError(message) from exc
        self._known[key] = annotations
        while len(self._known) > KEEP:
            self._known.popitem(last=False)
        return annotations
