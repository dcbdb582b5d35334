"""May an annotation give this container its seccomp profile? A pure decision.

Only containers whose seccomp profile is unset or Unconfined are eligible: an
administrator's RuntimeDefault or Localhost profile always wins, so a pod author
cannot swap it for a weaker one. ``SecurityProfile.RUNTIME_DEFAULT`` is the
enum's zero, so RuntimeDefault arrives as a present but empty message: presence,
not the enum value, tells it apart from "unset".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nri_seccomp.decide.runtimes import RuntimeCaps
from nri_seccomp.nri.pb import nri_pb2

_TYPES = nri_pb2.SecurityProfile
#: what to do when the runtime does not pass the container's seccomp profile (containerd 2.2.0)
WHEN_PROFILE_UNKNOWN = ("refuse", "apply")
_ANNOTATIONS_IGNORED = "wins over annotations"


class Outcome(enum.Enum):
    #: the annotation's profile replaces the container's seccomp section
    ELIGIBLE = "eligible"
    #: the container keeps its own profile; the annotation is only logged
    NOT_ELIGIBLE = "not eligible"
    #: the container creation must fail: running it would silently drop the profile
    #: the annotation asks for, or could replace an administrator's profile
    REFUSE = "refuse"


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str

    @property
    def eligible(self) -> bool:
        return self.outcome is Outcome.ELIGIBLE

    @property
    def refuse(self) -> bool:
        return self.outcome is Outcome.REFUSE


def eligibility(
    linux: nri_pb2.LinuxContainer | None,
    caps: RuntimeCaps,
    when_profile_unknown: str = "refuse",
) -> Decision:
    """May an annotated container get its profile from the annotation on this runtime?

    Only asked for a container an annotation names a profile for, so a refusal
    fails exactly the containers that would otherwise run without what they asked for.
    """
    if when_profile_unknown not in WHEN_PROFILE_UNKNOWN:
        raise ValueError(f"when_profile_unknown: expected one of {', '.join(WHEN_PROFILE_UNKNOWN)}"
                         f", got {when_profile_unknown!r}")
    # RUNTIME_DEFAULT is the enum's zero: only presence tells RuntimeDefault from unset
    profile = (linux.seccomp_profile
               if linux is not None and linux.HasField("seccomp_profile") else None)
    if profile is not None:
        # an administrator's profile wins even where the runtime could not apply ours,
        # so such containers start normally on every runtime
        kind = profile.profile_type
        if kind == _TYPES.RUNTIME_DEFAULT:
            return Decision(
                Outcome.NOT_ELIGIBLE,
                f"the container's RuntimeDefault seccomp profile {_ANNOTATIONS_IGNORED}",
            )
        if kind == _TYPES.LOCALHOST:
            ref = profile.localhost_ref
            shown = ref if ref.isprintable() else repr(ref)
            return Decision(Outcome.NOT_ELIGIBLE,
                            f"the container's Localhost seccomp profile {shown} "
                            f"{_ANNOTATIONS_IGNORED}")
        if kind != _TYPES.UNCONFINED:
            # CRI-O only replaces unset or Unconfined; a type we cannot name is neither
            return Decision(Outcome.NOT_ELIGIBLE,
                            f"the container's seccomp profile of unknown type {kind} "
                            f"{_ANNOTATIONS_IGNORED}")
    if not caps.applies_seccomp_adjustment:
        return Decision(Outcome.REFUSE,
                        f"{caps.description} does not apply seccomp adjustments from NRI "
                        "plugins: the container would run without the seccomp profile its "
                        "annotation names")
    if profile is not None:
        return Decision(Outcome.ELIGIBLE, "the container's seccomp profile is Unconfined")
    if caps.passes_seccomp_profile:
        return Decision(Outcome.ELIGIBLE, "the container's seccomp profile is unset")
    if when_profile_unknown == "apply":
        return Decision(Outcome.ELIGIBLE,
                        f"{caps.description} does not say which seccomp profile the container "
                        "has; applying the annotation's profile (when_profile_unknown: apply)")
    return Decision(Outcome.REFUSE,
                    f"{caps.description} does not say which seccomp profile the container has, "
                    "so the annotation's profile could replace a RuntimeDefault or Localhost "
                    "profile (when_profile_unknown: refuse; set it to apply to accept that)")


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
