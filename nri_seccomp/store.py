"""Reference → checked, compiled profile: memory, then disk cache, then the registry.

The runtime's deadline rules this module. A request waits for its profile only
until its own deadline; the fetch goes on in the background (single-flight: one
fetch per reference however many requests wait for it), lands in the cache, and
the kubelet's retry is then served from memory. Registry and disk work runs in a
bounded thread pool, never on the event loop.

A profile is cached only after it parsed and compiled: a malformed layer is
refused every time and never stored.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeVar

from nri_seccomp import artifacts, cache, profile
from nri_seccomp.pb import nri_pb2
from nri_seccomp.reference import Reference

log = logging.getLogger(__name__)

T = TypeVar("T")

#: how long a background fetch may run after the request that started it gave up
BACKGROUND_FETCH_BUDGET = 30.0
#: compiled profiles kept in memory, by digest
MEMORY_ENTRIES = 512


class NotReady(Exception):
    """The profile is still being fetched; the runtime should retry the creation."""

    def __init__(self, reference: str) -> None:
        super().__init__(f"seccomp profile {reference} is still being fetched, retry")
        self.reference = reference


class ProfileRejected(Exception):
    """The artifact was fetched but is not a usable profile (CRI-O: 'apply profile from bytes')."""

    def __init__(self, digest: str, cause: Exception) -> None:
        super().__init__(f"apply profile from bytes: layer {digest}: {cause}")
        self.digest = digest
        self.cause = cause


@dataclass(frozen=True)
class Compiled:
    digest: str
    size: int
    #: the node's rules as the spec's linux.seccomp, compiled by libseccomp
    policy: nri_pb2.LinuxSeccomp
    #: each policy rule's index in the profile, so later messages point into the profile
    origin: tuple[int, ...]
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class Ready:
    reference: str
    compiled: Compiled
    #: "memory", "cache", "registry" or "stale"
    source: str


@dataclass(frozen=True)
class StoreSettings:
    tag_ttl: float = 300.0
    stale_if_error_max_age: float = 7 * 24 * 3600.0
    unknown_syscalls: str = "refuse"


class ProfileStore:
    def __init__(
        self,
        fetcher: artifacts.ArtifactFetcher,
        disk: cache.Cache | None,
        executor: Executor,
        settings: StoreSettings,
        node: profile.NodeContext,
    ) -> None:
        self._fetcher = fetcher
        self._disk = disk
        self._executor = executor
        self._settings = settings
        self._node = node
        self._compiled: collections.OrderedDict[str, Compiled] = collections.OrderedDict()
        #: reference → (layer digest, fetched at); a digest reference names the
        #: manifest, so even those need this step to reach the profile blob
        self._refs: dict[str, tuple[str, float]] = {}
        self._inflight: dict[str, asyncio.Task[Ready]] = {}
        self.fetches = 0

    async def get(self, ref: Reference, deadline: float) -> Ready:
        """The profile for ``ref``, or NotReady if it cannot be had by ``deadline``."""
        key = str(ref)
        ready = self._from_memory(ref, key)
        if ready is not None:
            return ready
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._resolve(ref, key), name=f"fetch {key}")
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NotReady(key)
        try:
            # shield: the fetch outlives a request that gives up on it
            return await asyncio.wait_for(asyncio.shield(task), remaining)
        except TimeoutError:
            log.warning("seccomp profile %s not ready before the deadline, fetch continues", key)
            raise NotReady(key) from None

    def prefetch(self, ref: Reference) -> None:
        """Start fetching ``ref`` (pod creation), without waiting."""
        key = str(ref)
        if self._from_memory(ref, key) is None and key not in self._inflight:
            task = asyncio.create_task(self._resolve(ref, key), name=f"prefetch {key}")
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._done, key))

    def _done(self, key: str, task: asyncio.Task[Ready]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled() and task.exception() is not None:
            # consumed here so an abandoned background failure is logged once, not lost
            log.info("fetch of %s failed: %s", key, task.exception())

    # ---- memory ------------------------------------------------------------

    def _from_memory(self, ref: Reference, key: str) -> Ready | None:
        entry = self._refs.get(key)
        if entry is None:
            return None
        digest, fetched_at = entry
        # a manifest digest pins the content for ever; a tag only for tag_ttl
        if ref.digest is None and time.time() - fetched_at > self._settings.tag_ttl:
            return None
        compiled = self._compiled.get(digest)
        if compiled is None:
            return None
        self._compiled.move_to_end(digest)
        return Ready(key, compiled, "memory")

    def _remember(self, compiled: Compiled) -> None:
        self._compiled[compiled.digest] = compiled
        self._compiled.move_to_end(compiled.digest)
        while len(self._compiled) > MEMORY_ENTRIES:
            self._compiled.popitem(last=False)

    # ---- disk and registry ---------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _resolve(self, ref: Reference, key: str) -> Ready:
        now = time.time()
        cached_digest: str | None = None
        cached_age: float | None = None
        if self._disk is not None:
            entry = await self._run(self._disk.lookup, key)
            if entry is not None:
                cached_digest, cached_age = entry.digest, now - entry.fetched_at
        if cached_digest is not None and cached_age is not None and (
            ref.digest is not None or cached_age <= self._settings.tag_ttl
        ):
            ready = await self._from_disk(key, cached_digest, now - cached_age)
            if ready is not None:
                return ready
        try:
            return await self._fetch(ref, key)
        except artifacts.RegistryUnavailable as exc:
            # stale-if-error: a tag we fetched before keeps working while the registry is down
            if (
                ref.digest is None
                and cached_digest is not None
                and cached_age is not None
                and cached_age <= self._settings.stale_if_error_max_age
            ):
                ready = await self._from_disk(key, cached_digest, now - cached_age, "stale")
                if ready is not None:
                    log.warning(
                        "registry unavailable for %s (%s); using the cached profile %s "
                        "fetched %.0fs ago",
                        key, exc, cached_digest, cached_age,
                    )
                    return ready
            raise

    async def _from_disk(
        self, key: str, digest: str, fetched_at: float, source: str = "cache"
    ) -> Ready | None:
        compiled = self._compiled.get(digest)
        if compiled is None:
            if self._disk is None:
                return None
            data = await self._run(self._disk.get_blob, digest)
            if data is None:
                return None
            try:
                compiled = await self._run(self._compile, data, digest)
            except ProfileRejected as exc:
                # a blob that no longer compiles (e.g. a stricter configuration): refetch
                log.warning("cached profile %s for %s is refused: %s", digest, key, exc)
                return None
            self._remember(compiled)
        self._refs[key] = (digest, fetched_at)
        return Ready(key, compiled, source)

    async def _fetch(self, ref: Reference, key: str) -> Ready:
        self.fetches += 1
        deadline = time.monotonic() + BACKGROUND_FETCH_BUDGET
        have = self._held if self._disk is not None else None
        art = await self._fetcher.fetch(ref, deadline, have)
        compiled = self._compiled.get(art.layer_digest)
        if compiled is None:
            compiled = await self._run(self._compile, art.data, art.layer_digest)
        if self._disk is not None:
            try:
                await self._run(self._disk.put_blob, art.data, art.layer_digest)
                await self._run(self._disk.record, key, art.layer_digest)
            except cache.CacheError as exc:
                # the profile is verified and usable now; only the restart copy is lost
                log.warning("could not cache %s: %s", key, exc)
        self._remember(compiled)
        self._refs[key] = (art.layer_digest, time.time())
        return Ready(key, compiled, "registry")

    async def _held(self, digest: str) -> bytes | None:
        """The fetcher's ``have``: a blob already on disk, read off the event loop."""
        assert self._disk is not None
        return await self._run(self._disk.get_blob, digest)

    def _compile(self, data: bytes, digest: str) -> Compiled:
        try:
            prepared = profile.prepare(
                data, self._node, unknown_syscalls=self._settings.unknown_syscalls
            )
        except profile.ProfileError as exc:
            raise ProfileRejected(digest, exc) from exc
        return Compiled(
            digest,
            len(data),
            prepared.policy,
            prepared.profile.rule_indexes,
            tuple(prepared.report.warnings),
        )
