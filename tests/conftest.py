"""Shared fixtures: a real docker-registry process for the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nri_seccomp.testing.registry import LocalRegistry


@pytest.fixture(scope="session")
def registry() -> Iterator[LocalRegistry]:
    with LocalRegistry() as reg:
        yield reg
