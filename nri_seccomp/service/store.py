"""Reference → checked, compiled profile: memory, then disk cache, then the registry.

The runtime's deadline rules this module. A request waits for its profile only
until its own deadline; the work goes on in the background (single-flight: one
resolution per reference however many requests wait for it), lands in the
cache, and the kubelet's retry is then served from memory.

A shared node serves tenants who do not trust each other, so every kind of work
has its own bounded lane and no key a pod author chooses makes anything grow:

* policy (``registry.allowed``, ``require_digest``) is checked on every request,
  cache hits included, so a tightened configuration applies at once;
* resolutions in flight are bounded in all and per owner (the pod's namespace),
  beyond which the request is refused as busy rather than queued for ever;
* each owner resolves at most ``owner_concurrency`` references at a time, each
  registry serves at most ``registry_concurrency`` fetches, and all fetches share
  ``fetch_concurrency``: a slow registry or a greedy tenant delays only itself;
* compiling runs in the compiler's own processes under its CPU budget;
* a refused layer digest is remembered with its message (``refused_ttl``) and
  any failed reference briefly (``failure_ttl``), so retries cost nothing;
* compiled profiles are kept in memory bounded in bytes, not in count;
* a cached tag past ``tag_ttl`` is re-checked, but served as it is when the
  re-check is not done within ``revalidate_wait``: a cached profile is always served;
* a fetch has bounds of its own, not the answer's: the fetcher's per-call
  ``registry.background_timeout`` and ``background_total`` in all, so a registry
  slower than the answer's deadline still serves the kubelet's retry, and one that
  drips bytes holds a lane for ``background_total`` at most.

A profile is cached only after it parsed and compiled: a malformed layer is
refused every time and never stored.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

from nri_seccomp.decide.reference import Reference
from nri_seccomp.errors import NriSeccompError
from nri_seccomp.memo import BoundedMap, Busy, KeyedLimiter, SingleFlight
from nri_seccomp.nri.pb import nri_pb2
from nri_seccomp.registry import artifact, errors
from nri_seccomp.seccomp import model
from nri_seccomp.seccomp.worker import CompileBudgetExceeded, CompileTimedOut, PreparedProfile
from nri_seccomp.storage import cache

log = logging.getLogger(__name__)

T = TypeVar("T")


#: Ready.source when the registry was asked for the manifest (a tag past tag_ttl, a
#: reference the disk index does not know) and it named a layer already on disk: the
#: profile's bytes were not downloaded
HELD_AFTER_RECHECK = "cache, manifest from registry"

#: what a compiler raises for a layer that must be refused (and remembered as refused)
REFUSING_ERRORS: tuple[type[Exception], ...] = (model.ProfileError, CompileBudgetExceeded)


class NotReady(NriSeccompError):
    """The profile is still being fetched; the runtime should retry the creation."""

    def __init__(self, reference: str, why: str = "is still being fetched") -> None:
        super().__init__(f"seccomp profile {reference} {why}, retry")
        self.reference = reference


class ProfileRejected(NriSeccompError):
    """The artifact was fetched but is not a usable profile (CRI-O: 'apply profile from bytes')."""

    def __init__(self, digest: str, cause: Exception | str) -> None:
        super().__init__(f"apply profile from bytes: layer {digest}: {cause}")
        self.digest = digest
        self.cause = str(cause)


@dataclass(frozen=True)
class Compiled:
    digest: str
    size: int
    #: the node's rules as the spec's linux.seccomp, compiled by libseccomp
    policy: nri_pb2.LinuxSeccomp
    #: each policy rule's index in the profile, so later messages point into the profile
    origin: tuple[int, ...]
    warnings: tuple[str, ...]

    @property
    def memory(self) -> int:
        """What keeping it costs, roughly: the parsed message is a few times its wire size."""
        return 4 * self.policy.ByteSize() + 8 * len(self.origin) + 1024


@dataclass(frozen=True)
class Ready:
    reference: str
    compiled: Compiled
    #: where the profile came from, for the decision's log line: "memory", "cache"
    #: (disk), "registry" (downloaded), "stale" (cached tag, registry down or slow), or
    #: HELD_AFTER_RECHECK (the registry's manifest named a layer the disk held)
    source: str


class Fetcher(Protocol):
    """The registry client (``client.ArtifactFetcher``)."""

    def check_policy(self, ref: Reference) -> None: ...

    async def fetch(
        self,
        ref: Reference,
        deadline: float,
        have: Callable[[str], Awaitable[bytes | None]] | None = None,
    ) -> artifact.Artifact: ...

    async def aclose(self) -> None: ...


class Compiler(Protocol):
    """Profile bytes → compiled policy, under a budget (``worker.SeccompWorkers``).

    Raises one of :data:`REFUSING_ERRORS` for a layer that must be refused (not a
    usable profile, or its budget exceeded); anything else is a fault of ours and
    refuses nothing for later.
    """

    async def prepare(
        self, data: bytes, node: model.NodeContext, unknown_syscalls: str
    ) -> PreparedProfile: ...


class BlobStore(Protocol):
    """The on-disk cache (``cache.Cache``); called in the store's disk lane."""

    def lookup(self, reference: str) -> cache.IndexEntry | None: ...

    def get_blob(self, digest: str) -> bytes | None: ...

    def put_blob(self, data: bytes, expected_digest: str | None = None) -> str: ...

    def record(self, reference: str, digest: str, fetched_at: float | None = None) -> None: ...


@dataclass(frozen=True)
class StoreSettings:
    tag_ttl: float = 300.0
    stale_if_error_max_age: float = 7 * 24 * 3600.0
    unknown_syscalls: str = "refuse"
    #: how long one fetch may take in all, lanes, token, manifest and blob included
    #: (``registry.background_total``); it runs in the background, for the kubelet's
    #: retry, so this is far above the answer's deadline
    background_total: float = 60.0
    memory_max_bytes: int = 64 * 1024 * 1024
    fetch_concurrency: int = 8
    registry_concurrency: int = 4
    owner_concurrency: int = 2
    #: resolutions waiting or running, in all and per owner
    inflight_limit: int = 256
    owner_inflight_limit: int = 32
    refused_ttl: float = 600.0
    failure_ttl: float = 5.0
    #: how long a request waits for the re-check of a cached tag before it is served as is
    revalidate_wait: float = 0.3


class ProfileStore:
    def __init__(
        self,
        fetcher: Fetcher,
        disk: BlobStore | None,
        disk_executor: Executor | None,
        compiler: Compiler,
        settings: StoreSettings,
        node: model.NodeContext,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fetcher = fetcher
        self._disk = disk
        self._disk_executor = disk_executor
        self._compiler = compiler
        self._settings = settings
        self._node = node
        self._clock = clock
        s = settings
        self._compiled: BoundedMap[str, Compiled] = BoundedMap(
            4096, s.memory_max_bytes, lambda c: c.memory)
        #: reference → (layer digest, fetched at); a digest reference names the
        #: manifest, so even those need this step to reach the profile blob
        self._refs: BoundedMap[str, tuple[str, float]] = BoundedMap(8192)
        self._refused: BoundedMap[str, ProfileRejected] = BoundedMap(4096)
        self._failed: BoundedMap[str, Exception] = BoundedMap(4096)
        self._flight: SingleFlight[str, Ready] = SingleFlight(s.inflight_limit, "fetch")
        self._owners: dict[str, int] = {}
        self._owner_lane: KeyedLimiter[str] = KeyedLimiter(s.owner_concurrency)
        self._registry_lane: KeyedLimiter[str] = KeyedLimiter(s.registry_concurrency)
        self._fetch_lane = asyncio.Semaphore(s.fetch_concurrency)
        self.fetches = 0

    def set_fetcher(self, fetcher: Fetcher, background_total: float | None = None) -> Fetcher:
        """A new registry configuration: what failed under the old one may work now.

        Returns the fetcher it replaces, for the caller to close once its work is done
        (fetches under way finish within the ``background_total`` they started with).
        """
        old, self._fetcher = self._fetcher, fetcher
        if background_total is not None:
            self._settings = replace(self._settings, background_total=background_total)
        self._failed.clear()
        return old

    async def get(self, ref: Reference, deadline: float, owner: str = "") -> Ready:
        """The profile for ``ref``, or NotReady if it cannot be had by ``deadline``.

        Raises ``errors.PolicyError`` before anything else when the configuration
        does not allow ``ref``, even if it is cached.
        """
        self._fetcher.check_policy(ref)
        key = str(ref)
        entry = self._refs.get(key)
        compiled = self._compiled.get(entry[0]) if entry is not None else None
        if entry is not None and compiled is not None:
            age = self._clock() - entry[1]
            if ref.digest is not None or age <= self._settings.tag_ttl:
                return Ready(key, compiled, "memory")
            if age <= self._settings.stale_if_error_max_age:
                return await self._revalidate(ref, key, compiled, deadline, owner)
        failed = self._failed.get(key)
        if failed is not None:
            # a fresh traceback each time: re-raising one object would grow its chain
            raise failed.with_traceback(None)
        task = self._start(ref, key, owner)
        try:
            return await SingleFlight.wait(task, deadline)
        except TimeoutError:
            log.info("seccomp profile %s not ready before the deadline, fetch continues", key)
            raise NotReady(key) from None

    def fresh_for(self, ref: Reference, digest: str | None = None) -> float:
        """Seconds ``ref`` stays servable from memory without asking the registry (0: not
        in memory, or, with ``digest``, no longer pointing at it; a digest reference,
        for ever)."""
        entry = self._refs.get(str(ref))
        if (entry is None or (digest is not None and entry[0] != digest)
                or self._compiled.get(entry[0]) is None):
            return 0.0
        if ref.digest is not None:
            return math.inf
        return self._settings.tag_ttl - (self._clock() - entry[1])

    def prefetch(self, ref: Reference, owner: str = "") -> bool:
        """Start resolving ``ref`` (pod creation) without waiting; False if not started."""
        try:
            self._fetcher.check_policy(ref)
        except errors.PolicyError:
            return False  # refused with its message when a container asks for it
        key = str(ref)
        if key in self._flight or self._failed.get(key) is not None:
            return False
        entry = self._refs.get(key)
        if entry is not None and self._compiled.get(entry[0]) is not None and (
            ref.digest is not None or self._clock() - entry[1] <= self._settings.tag_ttl
        ):
            return False
        try:
            self._start(ref, key, owner)
        except NotReady:
            return False
        return True

    async def _revalidate(
        self, ref: Reference, key: str, compiled: Compiled, deadline: float, owner: str
    ) -> Ready:
        stale = Ready(key, compiled, "stale")
        try:
            task = self._start(ref, key, owner)
        except NotReady:
            return stale
        try:
            return await SingleFlight.wait(
                task, min(deadline, time.monotonic() + self._settings.revalidate_wait))
        except TimeoutError:
            log.info("re-check of %s not done in time; serving the cached profile %s",
                     key, compiled.digest)
            return stale
        except errors.RegistryUnavailable:
            return stale

    def _start(self, ref: Reference, key: str, owner: str) -> asyncio.Task[Ready]:
        if key in self._flight:
            return self._flight.start(key, lambda: self._resolve(ref, key, owner))
        if self._owners.get(owner, 0) >= self._settings.owner_inflight_limit:
            raise NotReady(key, f"is not fetched now: {self._settings.owner_inflight_limit} "
                           f"profiles of {owner or 'this namespace'} are being fetched already")
        try:
            task = self._flight.start(key, lambda: self._resolve(ref, key, owner), self._done)
        except Busy:
            raise NotReady(key, "is not fetched now: the plugin is busy fetching other "
                           "profiles") from None
        self._owners[owner] = self._owners.get(owner, 0) + 1
        task.add_done_callback(lambda _t: self._release(owner))
        return task

    def _release(self, owner: str) -> None:
        left = self._owners.get(owner, 1) - 1
        if left <= 0:
            self._owners.pop(owner, None)
        else:
            self._owners[owner] = left

    def _done(self, key: str, task: asyncio.Task[Ready]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        if isinstance(exc, errors.ArtifactError | ProfileRejected):
            # retries within failure_ttl get the same answer without any work
            self._failed.put(key, exc, ttl=self._settings.failure_ttl)
            # consumed here so an abandoned background failure is logged once, not lost
            log.info("fetch of %s failed: %s", key, exc)
        else:
            log.error("fetch of %s failed unexpectedly: %s: %s", key, type(exc).__name__, exc)

    # ---- disk and registry ---------------------------------------------------

    async def _on_disk(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._disk_executor, fn, *args)

    async def _resolve(self, ref: Reference, key: str, owner: str) -> Ready:
        async with self._owner_lane.hold(owner):
            return await self._resolve_now(ref, key)

    async def _resolve_now(self, ref: Reference, key: str) -> Ready:
        now = self._clock()
        cached_digest: str | None = None
        cached_age: float | None = None
        if self._disk is not None:
            entry = await self._on_disk(self._disk.lookup, key)
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
        except errors.RegistryUnavailable as exc:
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
            data = await self._on_disk(self._disk.get_blob, digest)
            if data is None:
                return None
            try:
                compiled = await self._compile(data, digest)
            except ProfileRejected as exc:
                # a blob that no longer compiles (e.g. a stricter configuration): refetch
                log.warning("cached profile %s for %s is refused: %s", digest, key, exc)
                return None
        self._refs.put(key, (digest, fetched_at))
        return Ready(key, compiled, source)

    async def _have(self, digest: str) -> bytes | None:
        """The fetcher's question once it knows the layer: refused before, or held already?"""
        refused = self._refused.get(digest)
        if refused is not None:
            raise refused.with_traceback(None)
        if self._disk is None:
            return None
        return await self._on_disk(self._disk.get_blob, digest)

    async def _fetch(self, ref: Reference, key: str) -> Ready:
        # the fetch's own bound, not the request's: the request that started it has
        # probably been answered "retry" already, and its retry needs this to finish.
        # Waiting for a lane counts: a fetch queued behind a slow registry ends too
        total = self._settings.background_total
        deadline = time.monotonic() + total
        try:
            async with self._fetch_lane, self._registry_lane.hold(ref.registry):
                self.fetches += 1
                art = await self._fetcher.fetch(ref, deadline, self._have)
        except errors.RegistryUnavailable as exc:
            if time.monotonic() < deadline:
                raise
            # what the retry reads: which registry, which bound, and where it was
            raise errors.RegistryUnavailable(
                key, f"registry {ref.registry} did not serve the profile within {total:g} s "
                f"(registry.background_total): {exc.detail}",
                registry=ref.registry, url=exc.url, status=exc.status) from None
        compiled = await self._compile(art.data, art.layer_digest)
        fetched_at = self._clock()
        if self._disk is not None:
            try:
                await self._on_disk(self._disk.put_blob, art.data, art.layer_digest)
                await self._on_disk(self._disk.record, key, art.layer_digest, fetched_at)
            except cache.CacheError as exc:
                # the profile is verified and usable now; only the restart copy is lost
                log.warning("could not cache %s: %s", key, exc)
        self._refs.put(key, (art.layer_digest, fetched_at))
        source = (HELD_AFTER_RECHECK if art.held
                  else f"registry via {art.via}" if art.via else "registry")
        return Ready(key, compiled, source)

    async def _compile(self, data: bytes, digest: str) -> Compiled:
        compiled = self._compiled.get(digest)
        if compiled is not None:
            return compiled
        refused = self._refused.get(digest)
        if refused is not None:
            raise refused.with_traceback(None)
        try:
            prepared = await self._compiler.prepare(
                data, self._node, self._settings.unknown_syscalls)
        except REFUSING_ERRORS as exc:
            # a profile error or a budget exceeded: either way this layer is refused,
            # and remembered so that a retry costs nothing
            rejected = ProfileRejected(digest, exc)
            ttl = (self._settings.failure_ttl if isinstance(exc, CompileTimedOut)
                   else self._settings.refused_ttl)
            self._refused.put(digest, rejected, ttl=ttl)
            raise rejected from exc
        compiled = Compiled(
            digest,
            len(data),
            nri_pb2.LinuxSeccomp.FromString(prepared.policy),
            prepared.origin,
            prepared.warnings,
        )
        self._compiled.put(digest, compiled)
        return compiled
