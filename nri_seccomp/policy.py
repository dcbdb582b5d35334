"""May an annotation give this container its seccomp profile? A pure decision.

Only containers whose seccomp profile is unset or Unconfined are eligible: an
administrator's RuntimeDefault or Localhost profile always wins, so a pod author
cannot swap it for a weaker one. ``SecurityProfile.RUNTIME_DEFAULT`` is the
enum's zero, so RuntimeDefault arrives as a present but empty message: presence,
not the enum value, tells it apart from "unset".
"""

from __future__ import annotations

from dataclasses import dataclass

from nri_seccomp.pb import nri_pb2
from nri_seccomp.runtimes import RuntimeCaps

_TYPES = nri_pb2.SecurityProfile


@dataclass(frozen=True)
class Decision:
    eligible: bool
    #: the container must be refused (creation fails) rather than run without the profile
    refuse: bool
    reason: str


def eligibility(
    linux: nri_pb2.LinuxContainer | None,
    caps: RuntimeCaps,
    when_profile_unknown: str = "refuse",
) -> Decision:
    if not caps.applies_seccomp_adjustment:
        return Decision(False, True, f"{caps.description} does not apply seccomp adjustments "
                        "from NRI plugins: the container would run without its profile")
    profile = linux.seccomp_profile if linux is not None and linux.HasField(
        "seccomp_profile") else None
    if profile is None:
        if caps.passes_seccomp_profile:
            return Decision(True, False, "seccomp profile unset")
        if when_profile_unknown == "apply":
            return Decision(True, False, f"{caps.description} does not say which seccomp "
                            "profile the container has; applying (when_profile_unknown: apply)")
        return Decision(False, True, f"{caps.description} does not say which seccomp profile "
                        "the container has, so a RuntimeDefault or Localhost profile could be "
                        "replaced; refusing (when_profile_unknown: refuse)")
    if profile.profile_type == _TYPES.UNCONFINED:
        return Decision(True, False, "seccomp profile Unconfined")
    if profile.profile_type == _TYPES.LOCALHOST:
        return Decision(False, False, f"Localhost seccomp profile {profile.localhost_ref} wins "
                        "over annotations")
    if profile.profile_type == _TYPES.RUNTIME_DEFAULT:
        return Decision(False, False, "RuntimeDefault seccomp profile wins over annotations")
    return Decision(False, True, f"unknown seccomp profile type {profile.profile_type}")


def profile_refusal(seccomp: nri_pb2.LinuxSeccomp, allow_listener: bool = False) -> str | None:
    """Why a profile from a registry must not be applied, or None.

    A seccomp listener makes runc connect to ``listenerPath`` on the host and hand
    it the container's notification fd: a pod author must not choose that socket.
    """
    if allow_listener:
        return None
    if seccomp.listener_path:
        return (f"profile sets listenerPath {seccomp.listener_path!r}: a seccomp agent socket "
                "on the host is chosen by the administrator (allow_listener: true), not by a "
                "pod annotation")
    notify = [name for rule in seccomp.syscalls if rule.action == "SCMP_ACT_NOTIFY"
              for name in rule.names]
    if notify or seccomp.default_action == "SCMP_ACT_NOTIFY":
        return (f"profile uses SCMP_ACT_NOTIFY ({', '.join(notify[:5]) or 'default action'}): "
                "refused unless allow_listener: true")
    return None
