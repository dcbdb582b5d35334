"""The plugin's YAML configuration, validated with a message for every bad value.

A pre-installed plugin receives the text of ``/etc/nri/conf.d/IDX-NAME.conf``
in Configure; an external plugin reads ``--config``. Empty text means defaults.
Unknown keys are errors, not warnings: a misspelt security setting must not be
silently ignored.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from nri_seccomp.decide.runtimes import CAPABILITY_NAMES
from nri_seccomp.errors import NriSeccompError

DEFAULT_CACHE_DIR = "/var/lib/nri-seccomp/cache"
MAX_PROFILE_BYTES = 1024 * 1024  # CRI-O's cap


class ConfigError(ValueError, NriSeccompError):
    """The configuration is invalid; the message names the key and the problem."""


@dataclass(frozen=True)
class RegistrySettings:
    #: per HTTP call (connect and each read), seconds, for image-annotation lookups
    timeout: float = 1.5
    #: per HTTP call of a profile fetch: it goes on in the background after the answer
    #: ("retry"), so a registry slower than the answer's deadline can still finish it
    background_timeout: float = 10.0
    #: one profile fetch in all (token, manifest, blob, redirects, waiting for a lane);
    #: also how long a registry that drips bytes can hold a fetch lane
    background_total: float = 60.0
    #: registries spoken to over plain HTTP, "host:port"
    insecure: tuple[str, ...] = ()
    tls_verify: bool = True
    ca_file: str | None = None
    #: docker config.json with "auths" credentials
    docker_config: str | None = None
    #: glob patterns over "registry/repository"; empty (the default) allows no registry
    allowed: tuple[str, ...] = ()
    require_digest: bool = False
    #: hosts ("host" or "host:port") a registry may name as its token realm besides itself
    token_realm_hosts: tuple[str, ...] = ("auth.docker.io",)
    max_profile_bytes: int = MAX_PROFILE_BYTES
    #: containerd's registry host configuration (hosts.toml) roots; [] reads none
    config_path: tuple[str, ...] = ("/etc/containerd/certs.d",)
    #: docker credential helpers (credHelpers, credsStore): seconds per run, seconds an
    #: answer is reused, and where they are looked up (default: $PATH)
    credential_helper_timeout: float = 1.0
    credential_helper_ttl: float = 300.0
    credential_helper_dir: str | None = None


@dataclass(frozen=True)
class Config:
    cache_dir: str = DEFAULT_CACHE_DIR
    cache_max_bytes: int = 256 * 1024 * 1024
    #: answer this long before the runtime's request timeout
    deadline_margin: float = 0.25
    #: the longest a request waits for work not ready yet (fetch, compile, translation)
    #: before it is answered "retry": containerd serves NRI one request at a time for the
    #: whole node, so every other pod waits as long as this one
    answer_wait: float = 0.5
    #: a tag reference is re-resolved at the registry when its cache entry is older
    tag_ttl: float = 300.0
    #: serve a cached tag this old at most when the registry cannot be reached
    stale_if_error_max_age: float = 7 * 24 * 3600.0
    #: "refuse" a profile naming a syscall libseccomp does not know, or "warn" and skip it
    unknown_syscalls: str = "refuse"
    #: what to do when the runtime does not say which seccomp profile a container has
    #: (containerd 2.2.0): "refuse" annotated containers, or "apply" the annotation
    when_profile_unknown: str = "refuse"
    #: on a runtime that cannot carry a per-syscall errno, send EPERM instead (warned)
    allow_errno_degrade: bool = False
    #: read CRI-O's image annotations (the image's manifest) for containers that could
    #: take the profile they name
    image_annotations: bool = True
    #: where image annotations come from: "containerd" (the manifest the node pulled, from
    #: containerd's content store) or "registry" (what the image's registry serves now)
    image_annotations_source: str = "containerd"
    #: when image annotations cannot be read: "refuse" the creation (fail closed) or
    #: "ignore" them (warn; the container may run without the profile its image names)
    image_annotations_on_error: str = "refuse"
    #: containerd's gRPC socket (image_annotations_source: containerd)
    containerd_socket: str = "/run/containerd/containerd.sock"
    #: the containerd namespace CRI images live in
    containerd_namespace: str = "k8s.io"
    #: accept profiles with listenerPath / SCMP_ACT_NOTIFY (a host socket runc connects to)
    allow_listener: bool = False
    #: force runtime capabilities (a distribution that backported a fix)
    runtime_overrides: Mapping[str, bool] = field(default_factory=dict)
    #: concurrent registry fetches, in all
    fetch_workers: int = 8
    #: concurrent fetches from one registry
    registry_concurrency: int = 4
    #: profiles one namespace (tenant) resolves at a time; more wait their turn
    namespace_concurrency: int = 2
    #: profiles one namespace may have waiting or in flight; more are refused as busy
    namespace_inflight: int = 32
    #: distinct profiles one pod's creation starts fetching early
    prefetch_per_pod: int = 4
    #: concurrent image-annotation lookups (an unannotated container never waits for more)
    image_lookup_concurrency: int = 4
    #: bytes of compiled profiles kept in memory (least recently used go first)
    memory_max_bytes: int = 64 * 1024 * 1024
    #: seconds a refused profile layer is remembered with its message (retries cost nothing)
    refused_ttl: float = 600.0
    #: seconds any failed reference is answered from memory before it is tried again
    failure_ttl: float = 5.0
    #: CPU one profile compile (or errno translation) may use before it is refused
    compile_cpu_seconds: float = 2.0
    #: wall-clock time one compile (or translation) may take before it is refused
    compile_wall_seconds: float = 5.0
    #: worker processes for compiles and translations
    compile_workers: int = 1
    log_level: str = "info"
    registry: RegistrySettings = field(default_factory=RegistrySettings)


_CHOICES = {
    "unknown_syscalls": ("refuse", "warn"),
    "when_profile_unknown": ("refuse", "apply"),
    "image_annotations_on_error": ("refuse", "ignore"),
    "image_annotations_source": ("containerd", "registry"),
    "log_level": ("debug", "info", "warning", "error"),
}



def load_file(path: str | Path) -> Config:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror or exc}") from exc
    return load(text, source=str(path))


def load(text: str, source: str = "configuration") -> Config:
    if not text.strip():
        return Config()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if data is None:
        return Config()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {_kind(data)}")
    try:
        config: Config = _build(Config, data, "")
    except ConfigError as exc:
        # name the file (or "NRI plugin configuration") the operator has to fix
        raise ConfigError(f"{source}: {exc}") from None
    return config


def _build(cls: Any, data: Mapping[str, Any], prefix: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1, cutoff=0.7)
            raise ConfigError(
                f"unknown configuration key {where!r}"
                + (f" (did you mean {prefix + hint[0]!r}?)" if hint else "")
            )
        kwargs[key] = _value(key, value, where, getattr(cls(), key))
    return cls(**kwargs)


def _value(key: str, value: Any, where: str, default: Any) -> Any:
    if isinstance(default, RegistrySettings):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_kind(value)}")
        return _registry(_build(RegistrySettings, value, f"{where}."), value, where)
    if key == "runtime_overrides":
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_kind(value)}")
        for cap, flag in value.items():
            if cap not in CAPABILITY_NAMES:
                raise ConfigError(
                    f"{where}: unknown capability {cap!r}, expected one of "
                    + ", ".join(CAPABILITY_NAMES)
                )
            if not isinstance(flag, bool):
                raise ConfigError(f"{where}.{cap}: expected true or false, got {_kind(flag)}")
        return dict(value)
    if key in _CHOICES:
        if value not in _CHOICES[key]:
            raise ConfigError(
                f"{where}: expected one of {', '.join(_CHOICES[key])}, got {value!r}"
            )
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_kind(value)}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {_kind(value)}")
        return _check_number(key, value, where)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number of seconds, got {_kind(value)}")
        return _check_number(key, float(value), where)
    if key == "config_path":
        return _config_path(value, where)
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{where}: expected a list of non-empty strings")
        if key == "allowed":
            for pattern in value:
                _check_pattern(pattern, where)
        if key == "token_realm_hosts":
            for host in value:
                _check_host(host, where)
        return tuple(value)
    # strings, possibly optional
    if value is None and default is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string, got {_kind(value)}")
    if key == "credential_helper_dir" and not value.startswith("/"):
        raise ConfigError(f"{where}: {value!r} must be an absolute path to a directory")
    if key == "containerd_socket" and not value.startswith("/"):
        raise ConfigError(f"{where}: {value!r} must be an absolute path to a unix socket")
    return value


_RANGES: dict[str, tuple[float, float]] = {
    "cache_max_bytes": (1024 * 1024, 1 << 40),
    "deadline_margin": (0.01, 1.5),
    "answer_wait": (0.01, 1.9),
    "tag_ttl": (0.0, 365 * 86400.0),
    "stale_if_error_max_age": (0.0, 365 * 86400.0),
    "fetch_workers": (1, 64),
    "registry_concurrency": (1, 64),
    "namespace_concurrency": (1, 64),
    "namespace_inflight": (1, 1024),
    "prefetch_per_pod": (0, 64),
    "image_lookup_concurrency": (1, 64),
    "memory_max_bytes": (1024 * 1024, 1 << 34),
    "refused_ttl": (0.0, 7 * 86400.0),
    "failure_ttl": (0.0, 3600.0),
    "compile_cpu_seconds": (0.05, 60.0),
    "compile_wall_seconds": (0.1, 120.0),
    "compile_workers": (1, 16),
    "timeout": (0.05, 30.0),
    "background_timeout": (0.05, 300.0),
    # at least containerd's request timeout (2 s): the bound is for work the answer
    # does not wait for; at most an hour, so nothing holds a lane for ever
    "background_total": (2.0, 3600.0),
    "credential_helper_timeout": (0.05, 10.0),
    "credential_helper_ttl": (0.0, 86400.0),
    "max_profile_bytes": (1024, MAX_PROFILE_BYTES),
}


def _registry(reg: RegistrySettings, given: Mapping[str, Any], where: str) -> RegistrySettings:
    """The background bounds checked against the foreground one; left unset, they follow
    a longer ``timeout`` instead of contradicting it (a configuration that raised
    ``timeout`` to let slow registries finish keeps working)."""
    if "background_timeout" not in given:
        reg = replace(reg, background_timeout=max(reg.background_timeout, reg.timeout))
    if "background_total" not in given:
        reg = replace(reg, background_total=max(reg.background_total, reg.background_timeout))
    # a background bound shorter than the foreground one would cut exactly the fetches
    # it exists to let finish
    if reg.background_timeout < reg.timeout:
        raise ConfigError(f"{where}.background_timeout: {_num(reg.background_timeout)} must be "
                          f"at least {where}.timeout ({_num(reg.timeout)})")
    if reg.background_total < reg.background_timeout:
        raise ConfigError(f"{where}.background_total: {_num(reg.background_total)} must be at "
                          f"least {where}.background_timeout ({_num(reg.background_timeout)})")
    return reg


def _check_number(key: str, value: float, where: str) -> Any:
    low, high = _RANGES.get(key, (0, float("inf")))
    if not low <= value <= high:
        raise ConfigError(f"{where}: {value} is out of range [{_num(low)}, {_num(high)}]")
    return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _check_pattern(pattern: str, where: str) -> None:
    if "://" in pattern:
        raise ConfigError(f"{where}: {pattern!r} must be registry/repository, not a URL")
    if pattern != "*" and "/" not in pattern and "*" not in pattern:
        raise ConfigError(
            f"{where}: {pattern!r} names no repository; write {pattern + '/*'!r} to allow "
            "the whole registry"
        )


def _config_path(value: Any, where: str) -> tuple[str, ...]:
    """containerd's form ("/a:/b") or a list; absolute paths only."""
    if isinstance(value, str):
        value = [p for p in value.split(":") if p]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: expected a path, paths separated by ':', or a list")
    for path in value:
        if not path.startswith("/"):
            raise ConfigError(f"{where}: {path!r} must be an absolute path")
    if len(value) > 8:
        raise ConfigError(f"{where}: more than 8 paths")
    return tuple(value)


def _check_host(host: str, where: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?", host):
        raise ConfigError(f"{where}: {host!r} must be a host or host:port")


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"[:80]
