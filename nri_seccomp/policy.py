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
