"""Fetching helpers shared by the registry client's tests: fetchers, a loop, a profile."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from nri_seccomp.decide.reference import Reference
from nri_seccomp.registry import artifact
from nri_seccomp.registry.client import ArtifactFetcher, FetchSettings

PROFILE = json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
                      "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": []}],
                      "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}).encode()

T = TypeVar("T")
_OPEN: list[ArtifactFetcher] = []


def fetcher(*insecure: str, **kw: Any) -> ArtifactFetcher:
    """A fetcher for plain-HTTP ``insecure`` registries; ``allowed`` defaults to ["*"]."""
    kw.setdefault("allowed", ("*",))
    f = ArtifactFetcher(FetchSettings(insecure_registries=frozenset(insecure), **kw))
    _OPEN.append(f)
    return f


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``coro`` on a new event loop; the fetchers' connections are closed before it ends."""
    async def main() -> T:
        try:
            return await coro
        finally:
            for f in _OPEN:
                await f.aclose()

    return asyncio.run(main())


def fetch(f: ArtifactFetcher, ref: Reference, deadline: float | None = None,
          have: Callable[[str], Awaitable[bytes | None]] | None = None) -> artifact.Artifact:
    return run(f.fetch(ref, deadline if deadline is not None else time.monotonic() + 30, have))


def head(f: ArtifactFetcher, ref: Reference) -> str:
    return run(f.fetch_manifest_digest(ref, time.monotonic() + 30))


def self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    return cert, key

