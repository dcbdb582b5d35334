"""In-memory fakes of the service layer's Protocols (registry, disk, compiler, clock),
faithful to what the real parts do, so the orchestration runs in milliseconds."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nri_seccomp.decide import runtimes
from nri_seccomp.decide.reference import Reference
from nri_seccomp.nri.pb import nri_pb2
from nri_seccomp.registry import artifact, errors
from nri_seccomp.seccomp import model
from nri_seccomp.seccomp.worker import (
    CompileTimedOut,
    PreparedProfile,
    Translated,
    prepare_inline,
    translate_inline,
)
from nri_seccomp.storage import cache

NODE = model.NodeContext(arch="amd64", kernel=(6, 1))
GOOD = b'{"defaultAction": "SCMP_ACT_ALLOW"}'
BOMB = b'{"bomb": true}'
#: its first compile is stopped at the wall-clock budget (a busy node), the next succeeds
SLOW = b'{"slow": true}'


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class FakeRegistry:
    """Reference → layer bytes; ``down`` raises RegistryUnavailable, ``gate`` holds fetches."""

    layers: dict[str, bytes] = field(default_factory=dict)
    down: bool = False
    gate: asyncio.Event | None = None
    allowed: tuple[str, ...] = ("r.example/",)
    calls: list[str] = field(default_factory=list)
    downloads: int = 0
    active: int = 0
    peak: int = 0
    #: seconds each fetch takes, cut at the fetch's deadline as the real client cuts it
    delay: float = 0.0
    #: the deadline each fetch was given (time.monotonic())
    deadlines: list[float] = field(default_factory=list)

    #: image reference → its manifest annotations
    images: dict[str, dict[str, str]] = field(default_factory=dict)
    require_digest: bool = False

    def check_allowed(self, ref: Reference) -> None:
        if not str(ref).startswith(self.allowed):
            raise errors.PolicyError(str(ref), "not in the allowed registries",
                                     registry=ref.registry)

    def check_policy(self, ref: Reference) -> None:
        self.check_allowed(ref)
        if self.require_digest and ref.digest is None:
            raise errors.PolicyError(str(ref), "a digest reference is required",
                                     registry=ref.registry)

    async def manifest_annotations(self, ref: Reference, deadline: float) -> dict[str, str]:
        self.calls.append(f"image {ref}")
        found = self.images.get(str(ref))
        if found is None:
            raise errors.NotFound(str(ref), "not found", registry=ref.registry)
        return found

    async def aclose(self) -> None:
        pass

    async def fetch(
        self,
        ref: Reference,
        deadline: float,
        have: Callable[[str], Awaitable[bytes | None]] | None = None,
    ) -> artifact.Artifact:
        self.calls.append(str(ref))
        self.deadlines.append(deadline)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay:
                try:
                    async with asyncio.timeout(deadline - time.monotonic()):
                        await asyncio.sleep(self.delay)
                except TimeoutError:
                    raise errors.RegistryUnavailable(
                        str(ref), f"registry {ref.registry} did not answer before the deadline",
                        registry=ref.registry) from None
            if self.down:
                raise errors.RegistryUnavailable(str(ref), "cannot connect",
                                                 registry=ref.registry)
            data = self.layers.get(f"{ref.registry}/{ref.repository}:{ref.tag}")
            if data is None:
                raise errors.NotFound(str(ref), "not found", registry=ref.registry)
            held = await have(digest(data)) if have is not None else None
            if held is None:
                self.downloads += 1
            return artifact.Artifact(str(ref), "sha256:" + "0" * 64, digest(data), data,
                                     artifact.SECCOMP_CONFIG_MEDIA_TYPE, len(data),
                                     held=held is not None)
        finally:
            self.active -= 1


@dataclass
class FakeCompiler:
    compiles: int = 0

    async def prepare(self, data: bytes, node: model.NodeContext,
                      unknown_syscalls: str) -> PreparedProfile:
        self.compiles += 1
        if data == BOMB:
            raise model.ProfileFieldError("syscalls[0] (names: read): too many conditions")
        if data == SLOW and self.compiles == 1:
            raise CompileTimedOut("compiling the profile exceeded its budget of 5.0 s "
                                  "wall-clock time")
        policy = nri_pb2.LinuxSeccomp(default_action="SCMP_ACT_ALLOW")
        policy.syscalls.add(names=[data.decode()[:20]], action="SCMP_ACT_ERRNO")
        return PreparedProfile(policy.SerializeToString(), (0,), ())


class FakeDisk:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.index: dict[str, cache.IndexEntry] = {}

    def lookup(self, reference: str) -> cache.IndexEntry | None:
        return self.index.get(reference)

    def get_blob(self, digest: str) -> bytes | None:
        return self.blobs.get(digest)

    def put_blob(self, data: bytes, expected_digest: str | None = None) -> str:
        self.blobs[digest(data)] = data
        return digest(data)

    def record(self, reference: str, digest: str, fetched_at: float | None = None) -> None:
        now = time.time() if fetched_at is None else fetched_at
        self.index[reference] = cache.IndexEntry(digest, now, now)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class InlineWorkers:
    """The compile workers' API, run in this process (no budget): real libseccomp."""

    def __init__(self) -> None:
        self.prepared = 0
        self.translated = 0

    async def prepare(self, data: bytes, node: model.NodeContext,
                      unknown_syscalls: str) -> PreparedProfile:
        self.prepared += 1
        return prepare_inline(data, node, unknown_syscalls)

    async def translate(self, policy: bytes, origin: tuple[int, ...],
                        caps: runtimes.RuntimeCaps, allow_errno_degrade: bool) -> Translated:
        self.translated += 1
        return translate_inline(policy, origin, caps, allow_errno_degrade)

    async def aclose(self) -> None:
        pass
