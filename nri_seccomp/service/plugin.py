"""The CreateContainer handler: glue from an NRI request to a linux.seccomp adjustment.

resolution (decide.resolver) → eligibility (decide.policy) → reference
(decide.reference) → profile (service.store: cache, registry, compile workers) →
runtime translation (seccomp.compat, in a worker). Every refusal is a
:class:`~nri_seccomp.errors.Refusal`, which fails the container creation: a
workload that asked for a profile never runs without it.

containerd serves NRI requests one at a time for the whole node (one lock in
its NRI adaptation, seen on containerd 2.3.4), so time this handler spends
waiting is time every other pod on the node waits. Work that is not ready within
``answer_wait`` is answered "retry" and goes on in the background: the pod's
creation started it early (RunPodSandbox), and the kubelet's retry is served
from memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable

from nri_seccomp import bounded, config, logline, wiring
from nri_seccomp.decide import policy, reference, resolver, runtimes
from nri_seccomp.errors import Kind, NriSeccompError, Refusal
from nri_seccomp.memo import BoundedMap
from nri_seccomp.nri.pb import nri_pb2
from nri_seccomp.nri.stub import RuntimeInfo
from nri_seccomp.registry.client import ArtifactFetcher
from nri_seccomp.registry.errors import ArtifactError, PolicyError
from nri_seccomp.seccomp import compat
from nri_seccomp.seccomp.worker import CompileBudgetExceeded, CompileTimedOut, SeccompWorkers
from nri_seccomp.service import images
from nri_seccomp.service.images import Image, ImageLookupError
from nri_seccomp.service.store import Compiled, NotReady, ProfileRejected

log = logging.getLogger(__name__)

IMAGE_NAME_ANNOTATION = "io.kubernetes.cri.image-name"
#: translations (profile digest, runtime) kept in memory, in entries and in bytes
TRANSLATIONS_KEPT = 256
TRANSLATIONS_BYTES = 32 * 1024 * 1024
#: translation failures that are the profile's own (kept like an answer until Configure)
_KEPT_FAILURES = (compat.UnsupportedByRuntime, CompileBudgetExceeded)
#: answers kept for the cached path (a reference's store lookup, policy check and
#: translation memo in one), in entries, and for at most this long
HOT_KEPT = 1024
HOT_BYTES = 32 * 1024 * 1024
HOT_SECONDS = 30.0
#: profiles prepared in the background at pod creation, at most, at once
WARMING_LIMIT = 64
#: answers one pod's creation files for the cached path, at most: any key suffix is a
#: container name to the resolver, and a pod must not flush other pods' answers
FILED_PER_POD = 8


class SeccompPlugin:
    def __init__(self, config_path: str | None = None) -> None:
        self._config_path = config_path
        self.config = config.Config()
        self.caps = runtimes.capabilities("", "")
        self.runtime = RuntimeInfo()
        self.services: wiring.Services | None = None
        #: the registry client in use (profiles; image annotations when their source)
        self._client: ArtifactFetcher | None = None
        self._retired: set[asyncio.Task[None]] = set()
        #: background preparations started at pod creation
        self._warming: set[asyncio.Task[None]] = set()
        #: bumped at each Configure: translations depend on the runtime and the config
        self._generation = 0
        #: the deciding pod annotation's "Found …" line (its key and value) → the answer,
        #: while the store would serve it from memory; forgotten at Configure and when
        #: the runtime reconnects, when policy and runtime can change
        #: A plain dict in insertion order, not an LRU map: this lookup is most of what
        #: a cached decision costs beyond the transport, an entry lives at most
        #: HOT_SECONDS anyway, and a miss only means the slower path.
        self._hot: dict[str, Hot] = {}
        self._hot_bytes = 0
        #: bumped whenever _hot is emptied: work started before does not file answers
        self._hot_epoch = 0
        #: whether a container without a seccomp profile of its own takes an annotation's
        #: profile on this runtime (policy.eligibility's answer, once per Configure)
        self._unset_eligible = False
        self._translations: BoundedMap[
            tuple[str, int], asyncio.Future[Answer]
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
            if self.services is not None and cfg.cache_dir != self.config.cache_dir:
                raise config.ConfigError(
                    f"cache_dir changed from {self.config.cache_dir} to {cfg.cache_dir}: "
                    "restart the plugin to move its cache")
            fetcher = wiring.fetcher(cfg.registry) if (
                self.services is None or cfg.registry != self.config.registry) else None
        except (config.ConfigError, ValueError) as exc:
            log.error("refusing configuration: %s", exc)
            raise Refusal(Kind.INVALID, str(exc)) from exc
        logging.getLogger("nri_seccomp").setLevel(cfg.log_level.upper())
        previous = self.config
        self.config, self.caps, self.runtime = cfg, caps, runtime
        self.policy_changed()
        log.info(
            "runtime %s: seccomp adjustment %s, errnoRet %s, defaultErrnoRet %s",
            caps.description,
            "applied" if caps.applies_seccomp_adjustment else "NOT applied (annotated "
            "containers will be refused)",
            "carried" if caps.errno_ret_safe else "crashes the runtime (kept out)",
            "carried" if caps.keeps_default_errno else "dropped (materialised or refused)",
        )
        legacy = [name for name, used in (
            ("registry.insecure", bool(cfg.registry.insecure)),
            ("registry.ca_file", cfg.registry.ca_file is not None),
            ("registry.tls_verify: false", not cfg.registry.tls_verify)) if used]
        if legacy:
            # the node already says these things for its images, in one place
            log.info("%s: applied to registries without a hosts.toml; containerd's "
                     "hosts.toml (registry.config_path) is the node's own place for them "
                     "(server = \"http://…\", ca, skip_verify)", ", ".join(legacy))
        if fetcher is not None:
            self._client = fetcher
        if self.services is None:
            assert fetcher is not None
            # the worker pool's fork server and the disk cache's scan take a while:
            # off the event loop
            self.services = await asyncio.to_thread(wiring.services, cfg, fetcher)
            self.services.images.start()
        else:
            if fetcher is not None:
                old = self.services.store.set_fetcher(fetcher, cfg.registry.background_total)
                # fetches (and image lookups) already under way finish with the old
                # client, within their bounds
                self._retire_later(old.aclose(), max(previous.registry.background_total,
                                                     images.FETCH_BUDGET))
                log.info("registry settings changed: %s",
                         _changed(previous.registry, cfg.registry))
            if fetcher is not None or (wiring.image_source_settings(cfg)
                                       != wiring.image_source_settings(previous)):
                assert self._client is not None
                old_source = self.services.images.set_source(
                    wiring.image_source(cfg, self._client))
                self._retire_later(old_source.aclose(), images.FETCH_BUDGET)

    def policy_changed(self) -> None:
        """``config`` or ``caps`` changed: nothing answered under the old ones stands."""
        self._generation += 1
        self._translations.clear()
        self._hot.clear()
        self._hot_bytes = 0
        self._hot_epoch += 1
        self._unset_eligible = policy.eligibility(
            None, self.caps, self.config.when_profile_unknown).eligible

    def _retire_later(self, closing: Awaitable[None], after: float) -> None:
        retiring = asyncio.create_task(self._retire(closing, after))
        self._retired.add(retiring)
        retiring.add_done_callback(self._retired.discard)

    async def _retire(self, closing: Awaitable[None], after: float) -> None:
        try:
            await asyncio.sleep(after)
        finally:
            await closing

    async def on_disconnect(self) -> None:
        self._translations.clear()
        self._hot.clear()
        self._hot_bytes = 0
        self._hot_epoch += 1

    async def shutdown(self) -> None:
        if self.services is not None:
            await self.services.aclose()

    # ---- events ----------------------------------------------------------------

    async def run_pod_sandbox(self, pod: nri_pb2.PodSandbox) -> None:
        """Prepare the profiles the pod's annotations name before its containers ask:
        fetch, compile, and translate for this runtime, so the first container finds
        its answer ready.

        At most ``prefetch_per_pod`` of them: a pod with hundreds of annotations
        must not fill the fetch lanes; the rest are fetched when a container asks.
        """
        if self.services is None:
            return
        skipped = 0
        #: each profile to prepare, with the annotations that name it (FILED_PER_POD in all)
        wanted: dict[str, tuple[reference.Reference, list[resolver.Match]]] = {}
        filed = 0
        for key, value in pod.annotations.items():
            if not value or not key.startswith((resolver.KEY_V2 + "/", resolver.KEY_V1 + "/")):
                continue
            try:
                match = resolver.pod_match(key, value)
                ref = reference.parse(value)
            except (resolver.AnnotationError, reference.ReferenceError):
                continue  # refused with its message when a container uses it
            if match is None:
                continue
            known = wanted.get(str(ref))
            if known is not None:
                if filed < FILED_PER_POD:
                    known[1].append(match)
                    filed += 1
                continue
            if len(wanted) >= self.config.prefetch_per_pod:
                skipped += 1
                continue
            wanted[str(ref)] = (ref, [match] if filed < FILED_PER_POD else [])
            filed += 1
        for ref, matches in wanted.values():
            # fetched and compiled unless it is already, then translated for this runtime
            # (translations are forgotten when the runtime reconnects, profiles are not)
            self.services.store.prefetch(ref, owner=pod.namespace)
            self._warm(ref, pod.namespace, matches)
        if skipped:
            log.info("pod %s/%s names %d more profiles than prefetch_per_pod (%d); they are "
                     "fetched when a container asks", pod.namespace, pod.name, skipped,
                     self.config.prefetch_per_pod)

    def _warm(self, ref: reference.Reference, owner: str,
              matches: list[resolver.Match]) -> None:
        """Translate ``ref`` for this runtime once it is compiled, in the background, and
        file the answer for the cached path under ``matches``: the pod's first container
        then costs what a cached one does."""
        if len(self._warming) >= WARMING_LIMIT:
            return  # the container's own request does it then
        epoch = self._hot_epoch

        async def warm() -> None:
            assert self.services is not None
            # background work under the fetch's own bounds (the store applies them), with
            # room for the compile after it; the translation gets a compile's budget
            fetch = self.config.registry.background_total + self.config.compile_wall_seconds
            try:
                ready = await self.services.store.get(ref, time.monotonic() + fetch, owner)
                answer = await self._translate(
                    ref, ready.compiled, time.monotonic() + 2 * self.config.compile_wall_seconds)
            except NriSeccompError as exc:
                # the container that uses it gets the refusal, with its message
                log.debug("preparing %s at pod creation: %s", ref, exc)
                return
            # as the container's own request would file it, but without pushing out
            # answers in use: preparing is a guess at what will be asked
            if answer.refusal is None:
                for match in matches:
                    if len(self._hot) >= HOT_KEPT:
                        break
                    self._file_hot(epoch, match, ref, ready.compiled.digest, answer)

        task = asyncio.create_task(warm(), name=f"warm {ref}")
        self._warming.add(task)
        task.add_done_callback(self._warming.discard)

    async def create_container(
        self, pod: nri_pb2.PodSandbox, container: nri_pb2.Container, deadline: float
    ) -> bytes | None:
        """The seccomp adjustment for a new container, or None when it keeps its own.

        ``deadline`` is the runtime's (monotonic); the answer leaves
        ``deadline_margin`` before it, and work that needs longer than
        ``answer_wait`` is answered "retry" while it goes on.
        """
        found: list[str] = []
        try:
            name = container.name
            try:
                match = resolver.resolve(pod.annotations, name)
            except resolver.AnnotationError as exc:
                raise Refusal(Kind.INVALID, str(exc)) from exc
            if match is not None and self._unset_eligible:
                hot = self._hot.get(match.log_line)
                if (hot is not None and hot.expires > time.monotonic()
                        and not container.linux.HasField("seccomp_profile")):
                    # the cached path, whole: this annotation was answered under this
                    # configuration and the store still holds the profile in memory
                    known = hot.answer
                    if known.warnings:
                        self._warn(pod, container, known)
                    logline.decision(log, f"{pod.namespace}/{pod.name}/{name}", hot.head)
                    return known.adjustment
            wait_until = min(deadline - self.config.deadline_margin,
                             time.monotonic() + self.config.answer_wait)
            answer = await self._seccomp_for(pod, container, match, wait_until, found)
        except Refusal as exc:
            # one line per decision: CRI-O's "Found …" line, then what became of it; a
            # "retry" is the normal first answer for a profile not ready yet, not an error
            log.log(logging.INFO if exc.kind is Kind.RETRY else logging.ERROR,
                    "%srefusing container %s/%s/%s: %s", "".join(f"{f}; " for f in found),
                    pod.namespace, pod.name, container.name, exc)
            raise
        return None if answer is None else answer.adjustment

    async def _seccomp_for(
        self, pod: nri_pb2.PodSandbox, container: nri_pb2.Container,
        match: resolver.Match | None, deadline: float, found: list[str],
    ) -> Answer | None:
        """The answer for ``container``; ``match`` is what its pod's annotations say."""
        epoch = self._hot_epoch  # before any wait (see _file_hot)
        decision = policy.eligibility(
            container.linux if container.HasField("linux") else None,
            self.caps,
            self.config.when_profile_unknown,
        )
        if match is None and decision.outcome is not policy.Outcome.NOT_ELIGIBLE:
            # pod annotations come first in CRI-O's order: the image's registry is asked
            # only when they decide nothing, and only for a container that could take
            # the image's profile
            image_annotations = await self._image_annotations(container, deadline)
            if image_annotations:
                try:
                    match = resolver.resolve(pod.annotations, container.name,
                                             image_annotations)
                except resolver.AnnotationError as exc:
                    raise Refusal(Kind.INVALID, str(exc)) from exc
        if match is None:
            return None
        if not match.reference:
            log.info("%s", match.log_line)
            return None
        found.append(match.log_line)
        if decision.refuse:
            raise Refusal(Kind.UNUSABLE, decision.reason)
        if not decision.eligible:
            log.info("%s; not applying %s to container %s: %s",
                     match.log_line, match.reference, container.name, decision.reason)
            return None
        hot = self._hot.get(match.log_line)
        if hot is not None and hot.expires > time.monotonic():
            # an image's annotation answered before (a pod's is served before this)
            self._hot_decision(pod, container, hot)
            return hot.answer
        try:
            ref = reference.parse(match.reference)
        except reference.ReferenceError as exc:
            raise Refusal(Kind.INVALID, f"{match.key}: {exc}") from exc
        assert self.services is not None, "CreateContainer before Configure"
        try:
            ready = await self.services.store.get(ref, deadline, owner=pod.namespace)
        except NotReady as exc:
            raise Refusal(Kind.RETRY, str(exc)) from exc
        except PolicyError as exc:
            raise Refusal(Kind.FORBIDDEN, str(exc)) from exc
        except ArtifactError as exc:
            raise Refusal(
                Kind.UNUSABLE,
                f"try to pull OCI artifact seccomp profile: pull OCI artifact: {exc}",
            ) from exc
        except ProfileRejected as exc:
            raise Refusal(Kind.UNUSABLE, f"{ref}: {exc}") from exc
        translation = await self._translate(ref, ready.compiled, deadline)
        if translation.refusal is not None:
            raise Refusal(Kind.FORBIDDEN, f"{ref}: {translation.refusal}")
        self._file_hot(epoch, match, ref, ready.compiled.digest, translation)
        self._applying(pod, container, match, translation, str(ref), ready.compiled.digest,
                       ready.source)
        return translation

    def _applying(self, pod: nri_pb2.PodSandbox, container: nri_pb2.Container,
                  match: resolver.Match, answer: Answer, ref: str, digest: str,
                  source: str) -> None:
        self._warn(pod, container, answer)
        logline.decision(log, f"{pod.namespace}/{pod.name}/{container.name}",
                         _head(match, ref, digest, source))

    def _file_hot(self, epoch: int, match: resolver.Match, ref: reference.Reference,
                  digest: str, answer: Answer) -> None:
        """Remember ``answer`` for the cached path, for as long as the store would serve
        ``ref`` as ``digest`` from memory. Not if the memo was emptied since ``epoch``:
        work begun before a Configure or a reconnection may have been allowed, or
        translated, under what no longer holds."""
        assert self.services is not None
        fresh = min(self.services.store.fresh_for(ref, digest), HOT_SECONDS)
        if fresh <= 0 or self._hot_epoch != epoch:
            return
        self._keep_hot(match.log_line, Hot(answer, _head(match, str(ref), digest, "memory"),
                                           time.monotonic() + fresh))

    def _keep_hot(self, key: str, hot: Hot) -> None:
        hot_map = self._hot
        gone = hot_map.pop(key, None)
        if gone is not None:
            self._hot_bytes -= _answer_bytes(gone.answer)
        size = _answer_bytes(hot.answer)
        while hot_map and (len(hot_map) >= HOT_KEPT or self._hot_bytes + size > HOT_BYTES):
            # the oldest entry, whether used since or not (see __init__)
            oldest = next(iter(hot_map))
            self._hot_bytes -= _answer_bytes(hot_map.pop(oldest).answer)
        hot_map[key] = hot
        self._hot_bytes += size

    def _hot_decision(self, pod: nri_pb2.PodSandbox, container: nri_pb2.Container,
                      hot: Hot) -> None:
        self._warn(pod, container, hot.answer)
        logline.decision(log, f"{pod.namespace}/{pod.name}/{container.name}", hot.head)

    @staticmethod
    def _warn(pod: nri_pb2.PodSandbox, container: nri_pb2.Container, answer: Answer) -> None:
        for warning in answer.warnings:
            log.warning("container %s/%s: %s", pod.name, container.name, warning)

    async def _image_annotations(
        self, container: nri_pb2.Container, deadline: float
    ) -> dict[str, str]:
        """The image's annotations; fails closed (``image_annotations_on_error: refuse``,
        the default) when they cannot be read, since the image may name a profile."""
        if not self.config.image_annotations or self.services is None:
            return {}
        sent = container.image if container.HasField("image") else None
        name = (sent.name if sent else "") or container.annotations.get(
            IMAGE_NAME_ANNOTATION, "")
        digest = sent.digest if sent else ""
        if not name and not digest:
            return {}
        image = Image(name or digest, digest)
        # at most half of what is left: a profile the image names must still be fetched
        now = time.monotonic()
        budget = now + max(deadline - now, 0) / 2
        refuse = self.config.image_annotations_on_error == "refuse"
        try:
            return await self.services.images.get(image, budget)
        except TimeoutError:
            if refuse:
                raise Refusal(Kind.RETRY, f"annotations of image {image.name} are still "
                              "being read, retry (image_annotations_on_error: refuse)"
                              ) from None
            log.warning("annotations of image %s not read in time; ignoring image annotations "
                        "(image_annotations_on_error: ignore)", image.name)
            return {}
        except ImageLookupError as exc:
            if refuse:
                raise Refusal(Kind.UNUSABLE, f"{exc}; the image may name a seccomp profile, "
                              "so the container is not created without it "
                              "(image_annotations_on_error: refuse)") from exc
            log.warning("%s; ignoring image annotations (image_annotations_on_error: ignore)",
                        exc)
            return {}

    async def _translate(
        self, ref: reference.Reference, compiled: Compiled, deadline: float
    ) -> Answer:
        """The policy as this runtime can carry it; memoized, computed in a worker process."""
        # the runtime and errno settings change only at Configure, which bumps the
        # generation: hashing a short tuple per request instead of the capabilities
        key = (compiled.digest, self._generation)
        fut = self._translations.get(key)
        if fut is None:
            assert self.services is not None
            fut = asyncio.ensure_future(self._translated(compiled, self.services.workers))
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
            raise Refusal(
                Kind.RETRY,
                f"seccomp profile {ref} is still being prepared for {self.caps.description}, "
                "retry",
            ) from None
        except (compat.UnsupportedByRuntime, CompileBudgetExceeded) as exc:
            raise Refusal(Kind.UNUSABLE, f"{ref}: {exc}") from exc

    async def _translated(self, compiled: Compiled, workers: SeccompWorkers) -> Answer:
        done = await workers.translate(
            compiled.policy.SerializeToString(deterministic=True),
            compiled.origin,
            self.caps,
            self.config.allow_errno_degrade,
        )
        # parsed once here, not on every request that uses it
        return Answer.of(done.message(), done.warnings,
                         policy.profile_refusal(compiled.policy, self.config.allow_listener))

    def _resize(
        self, key: tuple[str, int], fut: asyncio.Future[Answer]
    ) -> None:
        if self._translations.get(key) is not fut:
            return
        failed = BaseException() if fut.cancelled() else fut.exception()
        if failed is not None and (isinstance(failed, CompileTimedOut)
                                   or not isinstance(failed, _KEPT_FAILURES)):
            # a busy node, a worker that died: the next container tries again
            self._translations.pop(key)
        else:
            self._translations.put(key, fut)


@dataclasses.dataclass(frozen=True, slots=True)
class Hot:
    """An answer for the cached path, with its decision line up to the container."""

    answer: Answer
    head: str
    #: time.monotonic() after which the store is asked again
    expires: float


def _head(match: resolver.Match, ref: str, digest: str, source: str) -> str:
    """The decision line up to the container's name, cleaned (logline.decision's head)."""
    return bounded.clean(f"{match.log_line}; applying seccomp profile {ref} ({digest}, "
                         f"{source}) to container ")


@dataclasses.dataclass(frozen=True)
class Answer:
    """A profile as one runtime can carry it: the linux.seccomp to send, its warnings, and
    the ContainerAdjustment carrying it, serialised once for every container that uses it."""

    policy: nri_pb2.LinuxSeccomp
    warnings: tuple[str, ...]
    adjustment: bytes
    #: why a pod author may not choose this profile (a listener socket), if so
    refusal: str | None = None

    @classmethod
    def of(cls, seccomp: nri_pb2.LinuxSeccomp, warnings: tuple[str, ...],
           refusal: str | None = None) -> Answer:
        adjust = nri_pb2.ContainerAdjustment()
        adjust.linux.seccomp_policy.CopyFrom(seccomp)
        return cls(seccomp, warnings, adjust.SerializeToString(), refusal)


def _answer_bytes(answer: Answer) -> int:
    """What a kept answer holds, about: its bytes, and the message parsed from them."""
    return 4 * len(answer.adjustment) + 1024


def _translation_bytes(fut: asyncio.Future[Answer]) -> int:
    if not fut.done() or fut.cancelled() or fut.exception() is not None:
        return 1024
    return 4 * fut.result().policy.ByteSize() + 1024


def _changed(old: config.RegistrySettings, new: config.RegistrySettings) -> str:
    keys = [f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)]
    return ", ".join(keys) or "nothing"
