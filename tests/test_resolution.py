"""CRI-O's annotation semantics and the eligibility rule, as tables (pure functions)."""

from __future__ import annotations

import pytest

from nri_seccomp import policy, runtimes
from nri_seccomp.pb import nri_pb2
from nri_seccomp.resolver import KEY_V1, KEY_V2, AnnotationError, resolve

V1, V2 = KEY_V1, KEY_V2

# (pod annotations, image annotations, expected (reference, key, source) or None)
PRECEDENCE = [
    ("nothing", {}, {}, None),
    ("pod container v1", {f"{V1}/app": "r1"}, {}, ("r1", f"{V1}/app", "pod-container")),
    ("pod container v2 over v1", {f"{V1}/app": "r1", f"{V2}/app": "r2"}, {},
     ("r2", f"{V2}/app", "pod-container")),
    ("pod POD", {f"{V1}/POD": "rp"}, {}, ("rp", f"{V1}/POD", "pod")),
    ("pod POD v2 over v1", {f"{V1}/POD": "a", f"{V2}/POD": "b"}, {}, ("b", f"{V2}/POD", "pod")),
    ("pod container over pod POD", {f"{V1}/POD": "rp", f"{V1}/app": "rc"}, {},
     ("rc", f"{V1}/app", "pod-container")),
    ("v1 container over v2 POD", {f"{V2}/POD": "rp", f"{V1}/app": "rc"}, {},
     ("rc", f"{V1}/app", "pod-container")),
    ("bare key on pod ignored", {V1: "x", V2: "y"}, {}, None),
    ("bogus container name", {f"{V1}/other": "x"}, {}, None),
    ("image bare", {}, {V1: "i"}, ("i", V1, "image")),
    ("image bare v2 over v1", {}, {V1: "i1", V2: "i2"}, ("i2", V2, "image")),
    ("image container", {}, {f"{V1}/app": "ic"}, ("ic", f"{V1}/app", "image-container")),
    ("image POD", {}, {f"{V1}/POD": "ip"}, ("ip", f"{V1}/POD", "image-pod")),
    ("image bare over image container", {}, {V1: "i", f"{V2}/app": "ic"}, ("i", V1, "image")),
    ("image container over image POD", {}, {f"{V1}/POD": "ip", f"{V1}/app": "ic"},
     ("ic", f"{V1}/app", "image-container")),
    ("pod POD over image bare", {f"{V1}/POD": "rp"}, {V2: "i"}, ("rp", f"{V1}/POD", "pod")),
    ("image other container", {}, {f"{V1}/other": "x"}, None),
    ("empty value opts out of pod POD", {f"{V1}/POD": "rp", f"{V1}/app": ""}, {},
     ("", f"{V1}/app", "pod-container")),
    ("empty pod POD stops before image", {f"{V2}/POD": ""}, {V1: "i"},
     ("", f"{V2}/POD", "pod")),
]


@pytest.mark.parametrize(("pod", "image", "want"), [r[1:] for r in PRECEDENCE],
                         ids=[r[0] for r in PRECEDENCE])
def test_precedence(pod: dict[str, str], image: dict[str, str],
                    want: tuple[str, str, str] | None) -> None:
    match = resolve(pod, "app", image)
    got = None if match is None else (match.reference, match.key, match.source)
    assert got == want


@pytest.mark.parametrize(
    ("pod", "image", "line"),
    [
        ({f"{V1}/app": "r"}, {}, f"Found container specific seccomp profile annotation: "
         f"{V1}/app=r"),
        ({f"{V1}/POD": "r"}, {}, f"Found pod specific seccomp profile annotation: {V1}/POD=r"),
        ({}, {V1: "r"}, f"Found image specific seccomp profile annotation: {V1}=r"),
        ({}, {f"{V1}/app": "r"}, f"Found image specific seccomp profile annotation for "
         f"container app: {V1}/app=r"),
        ({}, {f"{V1}/POD": "r"}, f"Found image specific seccomp profile annotation for pod: "
         f"{V1}/POD=r"),
    ],
    ids=["pod-container", "pod", "image", "image-container", "image-pod"],
)
def test_log_lines_use_crio_wording(pod: dict[str, str], image: dict[str, str],
                                    line: str) -> None:
    match = resolve(pod, "app", image)
    assert match is not None and match.log_line == line


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("x" * 100_000, "is 100000 characters long (at most 4096)"),
        ("reg/repo:tag\x00", "control or space character '\\x00' at position 12"),
        ("reg/repo:tag\nX-Injected: 1", "control or space character '\\n' at position 12"),
        ("reg/repo tag", "control or space character ' ' at position 8"),
        ("\x1b[31mred", "control or space character '\\x1b' at position 0"),
    ],
    ids=["100KB", "nul", "newline", "space", "escape"],
)
def test_hostile_values_refused(value: str, message: str) -> None:
    with pytest.raises(AnnotationError) as info:
        resolve({f"{V1}/POD": value}, "app", {})
    assert message in str(info.value)
    assert f"annotation {V1}/POD" in str(info.value)
    assert len(str(info.value)) < 300


CAPS = [
    ("containerd", "v1.7.27", "", (False, False, False, False)),
    ("containerd", "v2.1.4", "", (False, False, False, False)),
    ("containerd", "v2.2.0", "", (True, False, False, False)),
    ("containerd", "v2.2.4", "", (True, True, False, False)),
    ("containerd", "v2.2.4-12-gdeadbee", "", (True, True, False, False)),
    ("containerd", "2.2.0+unknown", "", (True, False, False, False)),
    ("containerd", "v2.3.0-rc.1", "", (True, True, True, False)),
    ("containerd", "v2.3.0", "v0.12.0", (True, True, True, False)),
    ("containerd", "v2.4.0-dev", "v0.12.2", (True, True, True, False)),
    ("containerd", "v2.2.4", "v0.12.2", (True, True, True, False)),
    ("containerd", "v2.5.0", "v0.13.0", (True, True, True, True)),
    ("cri-o", "1.30.0", "", (False, False, False, False)),
    ("", "", "", (False, False, False, False)),
    ("containerd", "garbage", "", (False, False, False, False)),
]


@pytest.mark.parametrize(("name", "version", "nri", "want"), [c[:4] for c in CAPS],
                         ids=[f"{c[0] or 'none'}-{c[1] or 'none'}-{c[2] or 'nri?'}" for c in CAPS])
def test_capabilities(name: str, version: str, nri: str,
                      want: tuple[bool, bool, bool, bool]) -> None:
    caps = runtimes.capabilities(name, version, nri)
    assert (caps.applies_seccomp_adjustment, caps.passes_seccomp_profile, caps.errno_ret_safe,
            caps.keeps_default_errno) == want
    assert caps.description


def test_capability_overrides() -> None:
    caps = runtimes.capabilities("containerd", "v2.2.4", overrides={"errno_ret_safe": True})
    assert caps.errno_ret_safe and "overrides" in caps.description
    with pytest.raises(ValueError, match="unknown runtime capability 'errno_safe'"):
        runtimes.capabilities("containerd", "v2.2.4", overrides={"errno_safe": True})


def _linux(kind: str | None) -> nri_pb2.LinuxContainer:
    linux = nri_pb2.LinuxContainer()
    if kind == "unconfined":
        linux.seccomp_profile.profile_type = nri_pb2.SecurityProfile.UNCONFINED
    elif kind == "runtime-default":
        linux.seccomp_profile.SetInParent()
    elif kind == "localhost":
        linux.seccomp_profile.profile_type = nri_pb2.SecurityProfile.LOCALHOST
        linux.seccomp_profile.localhost_ref = "profiles/x.json"
    return linux


E, N, R = "eligible", "not eligible", "refuse"
ELIGIBILITY = [
    # runtime version, profile, when_profile_unknown, outcome, reason fragment
    ("v2.3.0", None, "refuse", E, "unset"),
    ("v2.3.0", "unconfined", "refuse", E, "Unconfined"),
    ("v2.3.0", "runtime-default", "refuse", N, "RuntimeDefault seccomp profile wins"),
    ("v2.3.0", "localhost", "refuse", N, "Localhost seccomp profile profiles/x.json wins"),
    ("v2.2.4", None, "refuse", E, "unset"),
    ("v2.2.4", "unconfined", "refuse", E, "Unconfined"),
    ("v2.2.4", "runtime-default", "refuse", N, "RuntimeDefault"),
    ("v2.2.0", None, "refuse", R, "does not say which seccomp profile"),
    ("v2.2.0", None, "apply", E, "when_profile_unknown: apply"),
    ("v1.7.27", "unconfined", "refuse", R, "does not apply seccomp adjustments"),
    ("v2.1.0", None, "apply", R, "does not apply seccomp adjustments"),
]


@pytest.mark.parametrize(("version", "kind", "unknown", "outcome", "reason"), ELIGIBILITY,
                         ids=[f"{r[0]}-{r[1] or 'unset'}-{r[2]}" for r in ELIGIBILITY])
def test_eligibility(version: str, kind: str | None, unknown: str, outcome: str,
                     reason: str) -> None:
    caps = runtimes.capabilities("containerd", version)
    d = policy.eligibility(_linux(kind), caps, unknown)
    assert (E if d.eligible else R if d.refuse else N) == outcome
    assert reason in d.reason


def test_no_linux_section_is_unset() -> None:
    d = policy.eligibility(None, runtimes.capabilities("containerd", "v2.3.0"))
    assert d.eligible


def test_profile_refusal_of_listeners() -> None:
    plain = nri_pb2.LinuxSeccomp(default_action="SCMP_ACT_ERRNO")
    plain.syscalls.add(names=["read"], action="SCMP_ACT_ALLOW")
    assert policy.profile_refusal(plain) is None
    notify = nri_pb2.LinuxSeccomp(default_action="SCMP_ACT_ALLOW")
    notify.syscalls.add(names=["mkdir", "mount"], action="SCMP_ACT_NOTIFY")
    reason = policy.profile_refusal(notify)
    assert reason is not None and "SCMP_ACT_NOTIFY (mkdir, mount)" in reason
    assert policy.profile_refusal(notify, allow_listener=True) is None
    path = nri_pb2.LinuxSeccomp(default_action="SCMP_ACT_ALLOW", listener_path="/x.sock")
    assert "listenerPath '/x.sock'" in (policy.profile_refusal(path) or "")
