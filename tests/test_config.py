"""Every bad configuration value gets a message naming the key and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from nri_seccomp.config import Config, ConfigError, RegistrySettings, load, load_file


def test_empty_text_gives_defaults() -> None:
    assert load("") == Config()
    assert load("# nothing\n") == Config()


def test_full_configuration() -> None:
    cfg = load(
        """
cache_dir: /tmp/x
deadline_margin: 0.3
tag_ttl: 60
unknown_syscalls: warn
when_profile_unknown: apply
allow_errno_degrade: true
runtime_overrides: {errno_ret_safe: true}
registry:
  timeout: 1
  insecure: [127.0.0.1:5000]
  allowed: ["ghcr.io/acme/*", "127.0.0.1:5000/*"]
  require_digest: true
  max_profile_bytes: 65536
  token_realm_hosts: [auth.example.com, "10.0.0.5:8443"]
"""
    )
    assert cfg.cache_dir == "/tmp/x"
    assert cfg.deadline_margin == 0.3
    assert cfg.tag_ttl == 60.0
    assert cfg.runtime_overrides == {"errno_ret_safe": True}
    assert cfg.registry == RegistrySettings(
        timeout=1.0,
        insecure=("127.0.0.1:5000",),
        allowed=("ghcr.io/acme/*", "127.0.0.1:5000/*"),
        require_digest=True,
        max_profile_bytes=65536,
        token_realm_hosts=("auth.example.com", "10.0.0.5:8443"),
    )


def test_registry_defaults_allow_nothing() -> None:
    # no registry until the administrator lists some; Docker Hub's token server known
    assert load("").registry.allowed == ()
    assert load("").registry.token_realm_hosts == ("auth.docker.io",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "expected a mapping at the top level, got list [1, 2]"),
        ("a: [", "not valid YAML"),
        ("cache_dri: /x", "unknown configuration key 'cache_dri' (did you mean 'cache_dir'?)"),
        ("registry: {timout: 1}", "unknown configuration key 'registry.timout' (did you mean "
         "'registry.timeout'?)"),
        ("registry: 5", "registry: expected a mapping, got int 5"),
        ("registry: {timeout: 0}", "registry.timeout: 0.0 is out of range [0.05, 30]"),
        ("registry: {timeout: fast}", "registry.timeout: expected a number of seconds, got str"),
        ("registry: {timeout: 5, background_timeout: 2}", "registry.background_timeout: 2 "
         "must be at least registry.timeout (5)"),
        ("registry: {background_timeout: 30, background_total: 10}",
         "registry.background_total: 10 must be at least registry.background_timeout (30)"),
        ("registry: {background_total: 1}", "registry.background_total: 1.0 is out of range "
         "[2, 3600]"),
        ("registry: {background_total: .inf}", "registry.background_total: inf is out of range"),
        ("registry: {background_timeout: .nan}", "registry.background_timeout: nan is out of "
         "range"),
        ("registry: {max_profile_bytes: 2000000}", "registry.max_profile_bytes: 2000000 is out "
         "of range [1024, 1048576]"),
        ("registry: {tls_verify: 'no'}", "registry.tls_verify: expected true or false, got str"),
        ("registry: {allowed: ['https://ghcr.io/x']}", "must be registry/repository, not a URL"),
        ("registry: {allowed: ['ghcr.io']}", "names no repository; write 'ghcr.io/*'"),
        ("registry: {allowed: [1]}", "registry.allowed: expected a list of non-empty strings"),
        ("registry: {ca_file: ''}", "registry.ca_file: expected a non-empty string"),
        ("registry: {token_realm_hosts: ['https://auth.example.com/token']}",
         "registry.token_realm_hosts: 'https://auth.example.com/token' must be a host or "
         "host:port"),
        ("unknown_syscalls: ignore",
         "unknown_syscalls: expected one of refuse, warn, got 'ignore'"),
        ("when_profile_unknown: yes",
         "when_profile_unknown: expected one of refuse, apply, got True"),
        ("deadline_margin: 2", "deadline_margin: 2.0 is out of range [0.01, 1.5]"),
        ("fetch_workers: 0", "fetch_workers: 0 is out of range [1, 64]"),
        ("fetch_workers: true", "fetch_workers: expected a whole number, got bool True"),
        ("runtime_overrides: {errno_safe: true}", "unknown capability 'errno_safe'"),
        ("runtime_overrides: {errno_ret_safe: 1}", "runtime_overrides.errno_ret_safe: expected "
         "true or false, got int 1"),
        ("cache_max_bytes: 10", "cache_max_bytes: 10 is out of range"),
        ("image_annotations_source: cri",
         "image_annotations_source: expected one of containerd, registry, got 'cri'"),
        ("image_annotations_on_error: warn",
         "image_annotations_on_error: expected one of refuse, ignore, got 'warn'"),
        ("containerd_socket: run/containerd.sock",
         "containerd_socket: 'run/containerd.sock' must be an absolute path"),
        ("containerd_namespace: ''", "containerd_namespace: expected a non-empty string"),
    ],
)
def test_bad_values(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(text)
    assert message in str(info.value)


def test_background_bounds_are_well_above_the_answer() -> None:
    """A profile fetch outlives the request that started it: its bounds are its own."""
    reg = load("").registry
    assert (reg.timeout, reg.background_timeout, reg.background_total) == (1.5, 10.0, 60.0)
    # left unset, they follow a timeout raised above them rather than contradict it
    reg = load("registry: {timeout: 20}").registry
    assert (reg.background_timeout, reg.background_total) == (20.0, 60.0)
    reg = load("registry: {background_timeout: 90}").registry
    assert (reg.background_timeout, reg.background_total) == (90.0, 90.0)
    reg = load("registry: {background_timeout: 3, background_total: 20}").registry
    assert (reg.timeout, reg.background_timeout, reg.background_total) == (1.5, 3.0, 20.0)


def test_image_annotations_fail_closed_from_containerd_by_default() -> None:
    cfg = load("")
    assert (cfg.image_annotations_source, cfg.image_annotations_on_error,
            cfg.containerd_socket, cfg.containerd_namespace) == (
        "containerd", "refuse", "/run/containerd/containerd.sock", "k8s.io")


def test_sample_configuration_lists_the_defaults() -> None:
    """config/nri-seccomp.yaml says "the values below are the defaults": keep it true."""
    sample = Path(__file__).resolve().parent.parent / "config" / "nri-seccomp.yaml"
    assert load_file(sample) == Config()
