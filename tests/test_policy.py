"""Eligibility: the container's own seccomp profile against the runtime's capabilities."""

from __future__ import annotations

import pytest

from nri_seccomp.decide import policy
from nri_seccomp.decide.policy import Decision, Outcome, eligibility
from nri_seccomp.decide.runtimes import RuntimeCaps, capabilities
from nri_seccomp.nri.pb import nri_pb2

E, N, R = Outcome.ELIGIBLE, Outcome.NOT_ELIGIBLE, Outcome.REFUSE
LOCAL_REF = "profiles/audit.json"

RUNTIMES = {
    "containerd-1.7": capabilities("containerd", "v1.7.27"),
    "containerd-2.2.0": capabilities("containerd", "v2.2.0"),
    "containerd-2.2.4": capabilities("containerd", "v2.2.4"),
    "containerd-2.3.0": capabilities("containerd", "v2.3.0", "v0.12.0"),
    "nri-0.12.2": capabilities("containerd", "v2.3.0-57-g0123abc", "v0.12.2"),
}


def _linux(profile: str) -> nri_pb2.LinuxContainer | None:
    """The container's linux section as containerd passes it for each security context."""
    if profile == "no-linux":
        return None
    linux = nri_pb2.LinuxContainer(cgroups_path="/kubepods/pod1/c1")
    if profile == "unconfined":
        linux.seccomp_profile.profile_type = nri_pb2.SecurityProfile.UNCONFINED
    elif profile == "runtime-default":
        # the enum's zero: the message is present, with nothing in it
        linux.seccomp_profile.SetInParent()
    elif profile == "localhost":
        linux.seccomp_profile.profile_type = nri_pb2.SecurityProfile.LOCALHOST
        linux.seccomp_profile.localhost_ref = LOCAL_REF
    else:
        assert profile == "unset"
    # what the plugin sees went through the wire: presence must survive it
    return nri_pb2.LinuxContainer.FromString(linux.SerializeToString())


# runtime x profile -> outcome (with when_profile_unknown "refuse", then "apply")
MATRIX: dict[str, dict[str, tuple[Outcome, Outcome]]] = {
    "containerd-1.7": {
        "unset": (R, R), "no-linux": (R, R), "unconfined": (R, R),
        "runtime-default": (N, N), "localhost": (N, N),
    },
    "containerd-2.2.0": {
        "unset": (R, E), "no-linux": (R, E), "unconfined": (E, E),
        "runtime-default": (N, N), "localhost": (N, N),
    },
    "containerd-2.2.4": {
        "unset": (E, E), "no-linux": (E, E), "unconfined": (E, E),
        "runtime-default": (N, N), "localhost": (N, N),
    },
    "containerd-2.3.0": {
        "unset": (E, E), "no-linux": (E, E), "unconfined": (E, E),
        "runtime-default": (N, N), "localhost": (N, N),
    },
    "nri-0.12.2": {
        "unset": (E, E), "no-linux": (E, E), "unconfined": (E, E),
        "runtime-default": (N, N), "localhost": (N, N),
    },
}

# what the reason must say, per (outcome, profile); "{desc}" is the runtime's description
REASONS = {
    (E, "unset"): "seccomp profile is unset",
    (E, "no-linux"): "seccomp profile is unset",
    (E, "unconfined"): "seccomp profile is Unconfined",
    (N, "runtime-default"): "RuntimeDefault seccomp profile wins over annotations",
    (N, "localhost"): f"Localhost seccomp profile {LOCAL_REF} wins over annotations",
}

CASES = [
    (runtime, profile, unknown, MATRIX[runtime][profile][i])
    for runtime in MATRIX
    for profile in MATRIX[runtime]
    for i, unknown in enumerate(("refuse", "apply"))
]


@pytest.mark.parametrize(("runtime", "profile", "unknown", "want"), CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3].name.lower()}" for c in CASES])
def test_eligibility(runtime: str, profile: str, unknown: str, want: Outcome) -> None:
    caps = RUNTIMES[runtime]
    d = eligibility(_linux(profile), caps, unknown)
    assert d.outcome is want
    assert d.eligible == (want is E) and d.refuse == (want is R)
    if want is R and not caps.applies_seccomp_adjustment:
        assert f"{caps.description} does not apply seccomp adjustments" in d.reason
    elif want is R:
        assert f"{caps.description} does not say which seccomp profile" in d.reason
        assert "when_profile_unknown: refuse" in d.reason
    elif runtime == "containerd-2.2.0" and profile in ("unset", "no-linux"):
        assert "when_profile_unknown: apply" in d.reason
    else:
        assert REASONS[want, profile] in d.reason


def test_default_is_refuse_when_profile_unknown() -> None:
    assert eligibility(None, RUNTIMES["containerd-2.2.0"]).outcome is R


def test_runtime_default_set_by_enum_zero_assignment_is_present() -> None:
    # assigning the zero value still marks the sub-message present
    linux = nri_pb2.LinuxContainer()
    linux.seccomp_profile.profile_type = nri_pb2.SecurityProfile.RUNTIME_DEFAULT
    wire = nri_pb2.LinuxContainer.FromString(linux.SerializeToString())
    assert wire.HasField("seccomp_profile")
    assert eligibility(wire, RUNTIMES["containerd-2.3.0"]).outcome is N


def test_annotations_cannot_replace_an_administrators_profile_even_when_told_to_apply() -> None:
    for runtime, caps in RUNTIMES.items():
        for profile in ("runtime-default", "localhost"):
            assert eligibility(_linux(profile), caps, "apply").outcome is N, (runtime, profile)


def test_unknown_profile_type_is_not_replaced() -> None:
    linux = nri_pb2.LinuxContainer()
    linux.seccomp_profile.profile_type = 7  # type: ignore[assignment]
    d = eligibility(linux, RUNTIMES["containerd-2.3.0"])
    assert d.outcome is N and "unknown type 7" in d.reason


def test_hostile_localhost_ref_is_quoted() -> None:
    linux = nri_pb2.LinuxContainer()
    linux.seccomp_profile.profile_type = nri_pb2.SecurityProfile.LOCALHOST
    linux.seccomp_profile.localhost_ref = "x.json\nforged log line"
    d = eligibility(linux, RUNTIMES["containerd-2.3.0"])
    assert d.outcome is N and "\n" not in d.reason and "'x.json\\nforged log line'" in d.reason


@pytest.mark.parametrize(
    ("overrides", "profile", "want"),
    [
        ({"applies_seccomp_adjustment": True, "passes_seccomp_profile": True}, "unset", E),
        ({"applies_seccomp_adjustment": True}, "unconfined", E),
        ({"applies_seccomp_adjustment": True}, "unset", R),
        ({"passes_seccomp_profile": True}, "unset", R),
        ({"passes_seccomp_profile": True}, "runtime-default", N),
    ],
    ids=["distro-backport", "applies-only-unconfined", "applies-only-unset",
         "passes-only-unset", "passes-only-runtime-default"],
)
def test_overridden_caps(overrides: dict[str, bool], profile: str, want: Outcome) -> None:
    caps = capabilities("containerd", "v2.1.4", overrides=overrides)
    assert eligibility(_linux(profile), caps).outcome is want


def test_unknown_runtime_refuses_annotated_containers() -> None:
    caps = capabilities("cri-o", "1.30.0")
    d = eligibility(_linux("unconfined"), caps)
    assert d.refuse and "cri-o 1.30.0" in d.reason


@pytest.mark.parametrize("value", ["", "Refuse", "warn", "apply "])
def test_bad_when_profile_unknown(value: str) -> None:
    with pytest.raises(ValueError, match=f"when_profile_unknown: .*got {value!r}"):
        eligibility(None, RUNTIMES["containerd-2.3.0"], value)


def test_decision_is_a_value() -> None:
    caps: RuntimeCaps = RUNTIMES["containerd-2.3.0"]
    assert eligibility(None, caps) == Decision(E, "the container's seccomp profile is unset")


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
