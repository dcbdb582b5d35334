"""The object graph, built from a configuration: the one place that knows every part.

A configuration yields a registry client (``registry``), a disk cache
(``storage``), budgeted compile workers (``seccomp.worker``), the image
annotation reader and the profile store over them (``service``). The handler
(``service.plugin``) only uses what this module hands it.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nri_seccomp import config
from nri_seccomp.containerd.client import ContainerdImages
from nri_seccomp.registry.client import ArtifactFetcher, FetchSettings
from nri_seccomp.seccomp import select
from nri_seccomp.seccomp.worker import Budget, SeccompWorkers
from nri_seccomp.service.images import (
    AnnotationSource,
    ContainerdSource,
    ImageAnnotations,
    RegistrySource,
)
from nri_seccomp.service.store import ProfileStore, StoreSettings
from nri_seccomp.storage.cache import Cache, CacheError

log = logging.getLogger(__name__)


@dataclass
class Services:
    store: ProfileStore
    images: ImageAnnotations
    workers: SeccompWorkers
    disk_executor: ThreadPoolExecutor

    async def aclose(self) -> None:
        await self.images.source.aclose()
        await self.workers.aclose()
        self.disk_executor.shutdown(wait=False, cancel_futures=True)


def fetcher(reg: config.RegistrySettings) -> ArtifactFetcher:
    """The registry client for these settings; ValueError for an unreadable docker config."""
    return ArtifactFetcher(
        FetchSettings(
            timeout=reg.timeout,
            background_timeout=reg.background_timeout,
            max_size=reg.max_profile_bytes,
            insecure_registries=frozenset(reg.insecure),
            tls_verify=reg.tls_verify,
            ca_file=reg.ca_file,
            docker_config=reg.docker_config,
            allowed=reg.allowed,
            require_digest=reg.require_digest,
            token_realm_hosts=reg.token_realm_hosts,
            config_path=reg.config_path,
            credential_helper_timeout=reg.credential_helper_timeout,
            credential_helper_ttl=reg.credential_helper_ttl,
            credential_helper_dir=reg.credential_helper_dir,
        )
    )


def image_source(cfg: config.Config, client: ArtifactFetcher) -> AnnotationSource:
    """Where image annotations are read: containerd's content store, or (opt-in) registries."""
    if cfg.image_annotations_source == "registry":
        return RegistrySource(client)
    return ContainerdSource(ContainerdImages(cfg.containerd_socket, cfg.containerd_namespace))


def image_source_settings(cfg: config.Config) -> tuple[str, str, str]:
    """What ``image_source`` depends on besides the registry client."""
    return cfg.image_annotations_source, cfg.containerd_socket, cfg.containerd_namespace


def store_settings(cfg: config.Config) -> StoreSettings:
    return StoreSettings(
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
        background_total=cfg.registry.background_total,
    )


def services(cfg: config.Config, client: ArtifactFetcher) -> Services:
    # lanes of their own: registry calls (the event loop), disk I/O (two threads) and
    # compiling (processes that can be stopped) never wait for each other
    disk_executor = ThreadPoolExecutor(2, thread_name_prefix="disk")
    workers = SeccompWorkers(
        Budget(cfg.compile_cpu_seconds, cfg.compile_wall_seconds, cfg.compile_workers))
    disk: Cache | None
    try:
        disk = Cache(Path(cfg.cache_dir), cfg.cache_max_bytes)
    except (CacheError, OSError) as exc:
        # still correct without the disk copy, only slower after a restart
        log.error("on-disk cache %s unavailable, continuing without it: %s", cfg.cache_dir, exc)
        disk = None
    store = ProfileStore(client, disk, disk_executor, workers, store_settings(cfg),
                         select.node_context())
    images = ImageAnnotations(image_source(cfg, client), cfg.image_lookup_concurrency)
    return Services(store, images, workers, disk_executor)
