"""The seccomp plugin: glue from an NRI CreateContainer to a linux.seccomp adjustment.

resolution (resolver) → eligibility (policy) → reference (reference) →
profile (store: cache, registry, libseccomp) → runtime translation (compat).
Every refusal becomes an error status, which fails the container creation: a
workload that asked for a profile never runs without it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nri_seccomp import config
from nri_seccomp.decide import policy, reference, resolver, runtimes
from nri_seccomp.memo import BoundedMap
from nri_seccomp.nri import ttrpc
from nri_seccomp.nri.pb import nri_pb2
from nri_seccomp.nri.stub import RuntimeInfo
from nri_seccomp.registry.artifacts import (
    ArtifactError,
    ArtifactFetcher,
    FetchSettings,
    PolicyError,
)
from nri_seccomp.seccomp import compat
from nri_seccomp.seccomp import select as profile
from nri_seccomp.seccomp.worker import Budget, CompileBudgetExceeded, SeccompWorkers
from nri_seccomp.service import store as store_mod
from nri_seccomp.service.images import ImageAnnotations, ImageLookupError
from nri_seccomp.service.store import (
    Compiled,
    NotReady,
    ProfileRejected,
    ProfileStore,
    StoreSettings,
)
from nri_seccomp.storage.cache import Cache, CacheError

log = logging.getLogger(__name__)

IMAGE_NAME_ANNOTATION = "io.kubernetes.cri.image-name"
#: translations (profile digest, runtime) kept in memory, in entries and in bytes
TRANSLATIONS_KEPT = 256
TRANSLATIONS_BYTES = 32 * 1024 * 1024


class SeccompPlugin:
    def __init__(self, config_path: str | None = None) -> None:
        self._config_path = config_path
        self.config = config.Config()
        self.caps = runtimes.capabilities("", "")
        self.runtime = RuntimeInfo()
        self.store: ProfileStore | None = None
        self.images: ImageAnnotations | None = None
        self._disk_executor: ThreadPoolExecutor | None = None
        self.workers: SeccompWorkers | None = None
        self._retired: set[asyncio.Task[None]] = set()
        self._translations: BoundedMap[
            tuple[str, runtimes.RuntimeCaps, bool], asyncio.Future[Answer]
        ] = BoundedMap(TRANSLATIONS_KEPT, TRANSLATIONS_BYTES, _translation_bytes)

    # ---- lifecycle -----------------------------------------------------------

    async def configure(self, text: str, runtime: RuntimeInfo) -> None:
        """Apply a configuration completely, or refuse it and keep the one in force.

        An external plugin is configured again each time it reconnects: the new
        registry settings (allow-list, digest rule, credentials, TLS) then apply to
        every later request, cached profiles included.
        """
        try:
            cfg = (
                config.load_file(self._config_path)
                if self._config_path
                else config.load(text, "NRI plugin configuration")
            )
            caps = runtimes.capabilities(
                runtime.name, runtime.version, runtime.nri_version, cfg.runtime_overrides
            )
            if self.store is not None and cfg.cache_dir != self.config.cache_dir:
                raise config.ConfigError(
                    f"cache_dir changed from {self.config.cache_dir} to {cfg.cache_dir}: "
                    "restart the plugin to move its cache")
            fetcher = self._fetcher(cfg.registry) if (
                self.store is None or cfg.registry != self.config.registry) else None
        except (config.ConfigError, ValueError) as exc:
            log.error("refusing configuration: %s", exc)
            raise ttrpc.RpcError(ttrpc.Code.INVALID_ARGUMENT, str(exc)) from exc
        logging.getLogger("nri_seccomp").setLevel(cfg.log_level.upper())
        previous = self.config
        self.config, self.caps, self.runtime = cfg, caps, runtime
        self._translations.clear()
        log.info(
            "runtime %s: seccomp adjustment %s, errnoRet %s, defaultErrnoRet %s",
            caps.description,
            "applied" if caps.applies_seccomp_adjustment else "NOT applied (annotated "
            "containers will be refused)",
            "carried" if caps.errno_ret_safe else "crashes the runtime (kept out)",
            "carried" if caps.keeps_default_errno else "dropped (materialised or refused)",
        )
        if self.store is None:
            assert fetcher is not None
            self.store = self._build_store(cfg, fetcher)
        elif fetcher is not None:
            old = self.store.set_fetcher(fetcher)
            if self.images is not None:
                self.images.set_fetcher(fetcher)
            # fetches already under way finish with the old client, within their own budget
            retiring = asyncio.create_task(self._retire(old, StoreSettings.background_budget))
            self._retired.add(retiring)
            retiring.add_done_callback(self._retired.discard)
            log.info("registry settings changed: %s", _changed(previous.registry, cfg.registry))

    def _build_store(self, cfg: config.Config, fetcher: ArtifactFetcher) -> ProfileStore:
        # lanes of their own: registry calls, disk I/O and compiling never wait for each other
        self._disk_executor = ThreadPoolExecutor(2, thread_name_prefix="disk")
        # libseccomp and the errno analysis run in processes that can be stopped
        self.workers = SeccompWorkers(
            Budget(cfg.compile_cpu_seconds, cfg.compile_wall_seconds, cfg.compile_workers))
        self.images = ImageAnnotations(fetcher, cfg.image_lookup_concurrency)
        disk: Cache | None
        try:
            disk = Cache(Path(cfg.cache_dir), cfg.cache_max_bytes)
        except (CacheError, OSError) as exc:
            # still correct without the disk copy, only slower after a restart
            log.error("on-disk cache %s unavailable, continuing without it: %s", cfg.cache_dir, exc)
            disk = None
        return ProfileStore(
            fetcher,
            disk,
            self._disk_executor,
            self.workers,
            StoreSettings(
                tag_ttl=cfg.tag_ttl,
                stale_if_error_max_age=cfg.stale_if_error_max_age,
                unknown_syscalls=cfg.unknown_syscalls,
                memory_max_bytes=cfg.memory_max_bytes,
                fetch_concurrency=cfg.fetch_workers,
                registry_concurrency=cfg.registry_concurrency,
                owner_concurrency=cfg.namespace_concurrency,
                owner_inflight_limit=cfg.namespace_inflight,
                refused_ttl=cfg.refused_ttl,
                failure_ttl=cfg.failure_ttl,
            ),
            profile.node_context(),
        )

    def _fetcher(self, reg: config.RegistrySettings) -> ArtifactFetcher:
        """The registry client for these settings; ValueError for an unreadable docker config."""
        return ArtifactFetcher(
            FetchSettings(
                timeout=reg.timeout,
                max_size=reg.max_profile_bytes,
                insecure_registries=frozenset(reg.insecure),
                tls_verify=reg.tls_verify,
                ca_file=reg.ca_file,
                docker_config=reg.docker_config,
                allowed=reg.allowed,
                require_digest=reg.require_digest,
                token_realm_hosts=reg.token_realm_hosts,
            )
        )

    async def _retire(self, fetcher: store_mod.Fetcher, after: float) -> None:
        await asyncio.sleep(after)
        await fetcher.aclose()

    async def on_disconnect(self) -> None:
        self._translations.clear()

    async def shutdown(self) -> None:
        if self.workers is not None:
            await self.workers.aclose()

    # ---- events ----------------------------------------------------------------

    async def run_pod_sandbox(self, pod: nri_pb2.PodSandbox) -> None:
        """Start fetching the profiles the pod's annotations name, before its containers.

        At most ``prefetch_per_pod`` of them: a pod with hundreds of annotations
        must not fill the fetch lanes; the rest are fetched when a container asks.
        """
        if self.store is None:
            return
        started = skipped = 0
        seen: set[str] = set()
        for key, value in pod.annotations.items():
            if not value or not key.startswith((resolver.KEY_V2 + "/", resolver.KEY_V1 + "/")):
                continue
            try:
                resolver.check_value(key, value)
                ref = reference.parse(value)
            except (resolver.AnnotationError, reference.ReferenceError):
                continue  # refused with its message when a container uses it
            if str(ref) in seen:
                continue
            seen.add(str(ref))
            if started >= self.config.prefetch_per_pod:
                skipped += 1
                continue
            if self.store.prefetch(ref, owner=pod.namespace):
                started += 1
        if skipped:
            log.info("pod %s/%s names %d more profiles than prefetch_per_pod (%d); they are "
                     "fetched when a container asks", pod.namespace, pod.name, skipped,
                     self.config.prefetch_per_pod)

    async def create_container(
        self, pod: nri_pb2.PodSandbox, container: nri_pb2.Container, call: ttrpc.Call
    ) -> nri_pb2.CreateContainerResponse:
        deadline = self._deadline(call)
        try:
            seccomp = await self._seccomp_for(pod, container, deadline)
        except Refused as exc:
            log.error("refusing container %s/%s/%s: %s",
                      pod.namespace, pod.name, container.name, exc)
            raise ttrpc.RpcError(exc.code, str(exc)) from None
        resp = nri_pb2.CreateContainerResponse()
        if seccomp is not None:
            resp.adjust.linux.seccomp_policy.CopyFrom(seccomp)
        return resp

    def _deadline(self, call: ttrpc.Call) -> float:
        limit = call.received + self.runtime.request_timeout
        if call.deadline is not None:
            limit = min(limit, call.deadline)
        return limit - self.config.deadline_margin

    async def _seccomp_for(
        self, pod: nri_pb2.PodSandbox, container: nri_pb2.Container, deadline: float
    ) -> nri_pb2.LinuxSeccomp | None:
        decision = policy.eligibility(
            container.linux if container.HasField("linux") else None,
            self.caps,
            self.config.when_profile_unknown,
        )
        try:
            # pod annotations come first in CRI-O's order: the image's registry is asked
            # only when they decide nothing, and only for a container that could take
            # the image's profile
            match = resolver.resolve(pod.annotations, container.name, {})
            if match is None and decision.outcome is not policy.Outcome.NOT_ELIGIBLE:
                image_annotations = await self._image_annotations(container, deadline)
                if image_annotations:
                    match = resolver.resolve(pod.annotations, container.name, image_annotations)
        except resolver.AnnotationError as exc:
            raise Refused(ttrpc.Code.INVALID_ARGUMENT, str(exc)) from exc
        if match is None:
            return None
        log.info("%s", match.log_line)
        if not match.reference:
            return None
        if decision.refuse:
            raise Refused(ttrpc.Code.FAILED_PRECONDITION, decision.reason)
        if not decision.eligible:
            log.info("not applying %s to container %s: %s",
                     match.reference, container.name, decision.reason)
            return None
        try:
            ref = reference.parse(match.reference)
        except reference.ReferenceError as exc:
            raise Refused(ttrpc.Code.INVALID_ARGUMENT, f"{match.key}: {exc}") from exc
        assert self.store is not None, "CreateContainer before Configure"
        try:
            ready = await self.store.get(ref, deadline, owner=pod.namespace)
        except NotReady as exc:
            raise Refused(ttrpc.Code.UNAVAILABLE, str(exc)) from exc
        except PolicyError as exc:
            raise Refused(ttrpc.Code.PERMISSION_DENIED, str(exc)) from exc
        except ArtifactError as exc:
            raise Refused(
                ttrpc.Code.FAILED_PRECONDITION,
                f"try to pull OCI artifact seccomp profile: pull OCI artifact: {exc}",
            ) from exc
        except ProfileRejected as exc:
            raise Refused(ttrpc.Code.FAILED_PRECONDITION, f"{ref}: {exc}") from exc
        refusal = policy.profile_refusal(ready.compiled.policy, self.config.allow_listener)
        if refusal is not None:
            raise Refused(ttrpc.Code.PERMISSION_DENIED, f"{ref}: {refusal}")
        translation = await self._translate(ref, ready.compiled, deadline)
        for warning in translation.warnings:
            log.warning("container %s/%s: %s", pod.name, container.name, warning)
        log.info("applying seccomp profile %s (%s, %s) to container %s/%s/%s",
                 ref, ready.compiled.digest, ready.source, pod.namespace, pod.name,
                 container.name)
        return translation.policy

    async def _image_annotations(
        self, container: nri_pb2.Container, deadline: float
    ) -> dict[str, str]:
        if not self.config.image_annotations or self.images is None:
            return {}
        name = container.image.name or container.annotations.get(IMAGE_NAME_ANNOTATION, "")
        if not name:
            return {}
        # at most half of what is left: a profile the image names must still be fetched
        now = time.monotonic()
        budget = now + max(deadline - now, 0) / 2
        try:
            ref = reference.parse(name)
            return await self.images.get(ref, budget)
        except TimeoutError:
            if self.config.image_annotations_on_error == "refuse":
                raise Refused(ttrpc.Code.UNAVAILABLE, f"annotations of image {name} are still "
                              "being fetched, retry (image_annotations_on_error: refuse)"
                              ) from None
            log.warning("annotations of image %s not read in time; ignoring image annotations "
                        "(image_annotations_on_error: ignore)", name)
            return {}
        except (ImageLookupError, reference.ReferenceError) as exc:
            if self.config.image_annotations_on_error == "refuse":
                raise Refused(ttrpc.Code.FAILED_PRECONDITION,
                              f"{exc} (image_annotations_on_error: refuse)") from exc
            log.warning("%s; ignoring image annotations (image_annotations_on_error: ignore)",
                        exc)
            return {}

    async def _translate(
        self, ref: reference.Reference, compiled: Compiled, deadline: float
    ) -> Answer:
        """The policy as this runtime can carry it; memoized, computed in a worker process."""
        key = (compiled.digest, self.caps, self.config.allow_errno_degrade)
        fut = self._translations.get(key)
        if fut is None:
            assert self.workers is not None
            fut = asyncio.ensure_future(self._translated(compiled, self.workers))
            self._translations.put(key, fut)
            # sized again once done: a pending translation counts as small
            fut.add_done_callback(functools.partial(self._resize, key))
        try:
            if fut.done():  # the common case: no task, no timer
                return fut.result()
            return await asyncio.wait_for(
                asyncio.shield(fut), max(deadline - time.monotonic(), 0)
            )
        except TimeoutError:
            raise Refused(
                ttrpc.Code.UNAVAILABLE,
                f"seccomp profile {ref} is still being prepared for {self.caps.description}, "
                "retry",
            ) from None
        except (compat.UnsupportedByRuntime, CompileBudgetExceeded) as exc:
            raise Refused(ttrpc.Code.FAILED_PRECONDITION, f"{ref}: {exc}") from exc

    async def _translated(self, compiled: Compiled, workers: SeccompWorkers) -> Answer:
        done = await workers.translate(
            compiled.policy.SerializeToString(deterministic=True),
            compiled.origin,
            self.caps,
            self.config.allow_errno_degrade,
        )
        # parsed once here, not on every request that uses it
        return Answer(done.message(), done.warnings)

    def _resize(
        self, key: tuple[str, runtimes.RuntimeCaps, bool], fut: asyncio.Future[Answer]
    ) -> None:
        if self._translations.get(key) is fut:
            self._translations.put(key, fut)


@dataclasses.dataclass(frozen=True)
class Answer:
    """A profile as one runtime can carry it: the linux.seccomp to send, and its warnings."""

    policy: nri_pb2.LinuxSeccomp
    warnings: tuple[str, ...]


def _translation_bytes(fut: asyncio.Future[Answer]) -> int:
    if not fut.done() or fut.cancelled() or fut.exception() is not None:
        return 1024
    return 4 * fut.result().policy.ByteSize() + 1024


def _changed(old: config.RegistrySettings, new: config.RegistrySettings) -> str:
    keys = [f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)]
    return ", ".join(keys) or "nothing"


class Refused(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


