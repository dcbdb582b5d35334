"""Shared fixtures: real registry processes, started once per session and only when used;
Debian's default seccomp profile; the PyInstaller bundle and the container image, built
once per session (test_bundle, test_image)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

# before grpc is imported (devtools.fakecontainerd, the client tests): this process forks
# the plugin with a preexec_fn while grpc's threads may be busy; see nri_seccomp.containerd
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import pytest

from devtools import driver
from devtools.fakecontainerd import FakeContainerd
from devtools.registry import LocalRegistry
from tests.profiles import SYSTEM_PROFILE

#: (user, password) every authenticated test registry knows
REGISTRY_USER = ("alice", "s3cret")


@pytest.fixture(scope="session")
def registry() -> Iterator[LocalRegistry]:
    """docker-registry over plain HTTP, no authentication."""
    with LocalRegistry() as reg:
        yield reg


@pytest.fixture(scope="session")
def htpasswd_registry() -> Iterator[LocalRegistry]:
    """docker-registry with htpasswd (Basic) authentication for REGISTRY_USER."""
    with LocalRegistry(users=dict([REGISTRY_USER])) as reg:
        yield reg


@pytest.fixture(scope="session")
def token_registry() -> Iterator[LocalRegistry]:
    """docker-registry with token (Bearer) authentication; its token server knows REGISTRY_USER."""
    with LocalRegistry(users=dict([REGISTRY_USER]), token_auth=True) as reg:
        yield reg


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeContainerd]:
    """containerd's images and content services (devtools.fakecontainerd), on a unix socket."""
    with FakeContainerd(tmp_path_factory.mktemp("ctrd")) as server:
        yield server


@pytest.fixture(scope="session")
def debian_profile(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Debian's default profile, from the golang-github-containers-common package."""
    assert SYSTEM_PROFILE.exists(), (
        f"{SYSTEM_PROFILE} is missing: install golang-github-containers-common (make deps)")
    return SYSTEM_PROFILE.read_bytes()


def _make(target: str) -> None:
    proc = subprocess.run(["make", "-C", str(driver.CHECKOUT), target],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, f"make {target}:\n{proc.stderr}"


@pytest.fixture(scope="session")
def bundle() -> Path:
    """dist/nri-seccomp (`make bundle`; PyInstaller runs only when a source changed)."""
    _make("bundle")
    return driver.CHECKOUT / "dist/nri-seccomp"


@pytest.fixture(scope="session")
def image_archive(bundle: Path) -> Path:
    """build/nri-seccomp-image.oci.tar (`make image`), from the session's bundle."""
    _make("image")
    return driver.CHECKOUT / "build/nri-seccomp-image.oci.tar"


def pytest_configure(config: pytest.Config) -> None:
    # the fast subset runs a tenth of each property test's examples (tests/examples.py)
    from tests import examples

    examples.FAST = "not integration" in (config.option.markexpr or "")
