"""A second Configure (an external plugin reconnecting) applies its registry settings
completely, or is refused and the configuration in force stays."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nri_seccomp.decide.reference import parse
from nri_seccomp.errors import Kind, Refusal
from nri_seccomp.nri.stub import RuntimeInfo
from nri_seccomp.registry import errors
from nri_seccomp.service.images import Image
from nri_seccomp.service.plugin import SeccompPlugin

pytestmark = pytest.mark.integration  # real processes: plugin, registries, servers

RUNTIME = RuntimeInfo(name="containerd", version="v2.3.0", nri_version="v0.12.0")


def config(cache: Path, allowed: str, extra: str = "") -> str:
    return (f"cache_dir: {cache}\nregistry: {{allowed: [{allowed}]}}\n"
            f"image_annotations_source: registry\n{extra}")


def test_second_configure_replaces_the_registry_policy(tmp_path: Path) -> None:
    """Defect: the fetcher kept the first Configure's allowed and require_digest."""

    async def go() -> None:
        plugin = SeccompPlugin()
        try:
            await plugin.configure(config(tmp_path / "c", "'a.example/*'"), RUNTIME)
            assert plugin.services is not None
            ref = parse("a.example/p/x:1")
            plugin.services.store._fetcher.check_policy(ref)  # allowed now
            await plugin.configure(
                config(tmp_path / "c", "'b.example/*'", "registry_concurrency: 2\n"), RUNTIME)
            with pytest.raises(errors.PolicyError, match="not in the allowed"):
                plugin.services.store._fetcher.check_policy(ref)
            # image lookups from the registry (opt-in) follow too
            assert await plugin.services.images.get(Image(str(ref)), 0.0) == {}
            await plugin.configure(
                config(tmp_path / "c", "'b.example/*'").replace(
                    "registry: {", "registry: {require_digest: true, "), RUNTIME)
            with pytest.raises(errors.PolicyError, match="digest reference"):
                plugin.services.store._fetcher.check_policy(parse("b.example/p/x:1"))
        finally:
            await plugin.shutdown()

    asyncio.run(go())


def test_a_bad_second_configure_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async def go() -> None:
        plugin = SeccompPlugin()
        try:
            await plugin.configure(config(tmp_path / "c", "'a.example/*'"), RUNTIME)
            first = plugin.config
            for bad in (config(tmp_path / "c", "'a.example/*'", "tag_ttl: -1\n"),
                        config(tmp_path / "other", "'b.example/*'")):
                with pytest.raises(Refusal) as info:
                    await plugin.configure(bad, RUNTIME)
                assert info.value.kind is Kind.INVALID
                assert plugin.config is first
            assert plugin.services is not None
            plugin.services.store._fetcher.check_policy(parse("a.example/p/x:1"))
        finally:
            await plugin.shutdown()

    asyncio.run(go())
