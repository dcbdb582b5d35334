"""Content digests (``algo:hex``): the one place that names, computes and checks them.

References pin manifests by digest, descriptors name layers by digest, the cache
stores blobs under their digest, and containerd's content store is read by
digest: all of them use these functions, so an algorithm or a format is decided
once.
"""

from __future__ import annotations

import hashlib
import re

#: the algorithms OCI and containerd accept, with the hex length of each
PATTERNS = {"sha256": re.compile(r"[a-f0-9]{64}"), "sha512": re.compile(r"[a-f0-9]{128}")}


def is_valid(value: str) -> bool:
    """``algo:hex`` with an algorithm containerd accepts and hex of its length."""
    algo, _, hexpart = value.partition(":")
    pattern = PATTERNS.get(algo)
    return pattern is not None and pattern.fullmatch(hexpart) is not None


def compute(algo: str, data: bytes) -> str:
    return f"{algo}:{hashlib.new(algo, data).hexdigest()}"


def matches(expected: str, data: bytes) -> bool:
    """``data`` hashes to ``expected``, computed with ``expected``'s own algorithm."""
    return compute(expected.split(":", 1)[0], data) == expected


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_hex(value: str) -> str:
    """The hex part of a sha256 digest; ValueError for anything else (before any disk access)."""
    if not isinstance(value, str) or not value.startswith("sha256:") or not PATTERNS[
            "sha256"].fullmatch(value[7:]):
        raise ValueError(f"not a sha256 digest: {str(value)[:80]!r}")
    return value[7:]
