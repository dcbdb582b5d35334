"""A selected profile → the spec's ``linux.seccomp``, as NRI's ``LinuxSeccomp`` message.

The conversion is field for field; ``errno_ret`` and ``default_errno`` are set
only when the profile gives them (the runtime then uses EPERM). A profile that
still has ``archMap`` or ``includes``/``excludes`` is refused: sending it would
apply rules meant for other nodes.
"""

from __future__ import annotations

from nri_seccomp.nri.pb import nri_pb2
from nri_seccomp.seccomp.model import Profile, ProfileError


def to_nri(profile: Profile) -> nri_pb2.LinuxSeccomp:
    """The spec's ``linux.seccomp`` for a profile that went through :func:`for_node`."""
    if not profile.selected and (
        profile.arch_map
        or any(not r.includes.is_empty() or not r.excludes.is_empty() for r in profile.syscalls)
    ):
        # sending unresolved includes/excludes would apply rules meant for other nodes
        raise ProfileError("profile has archMap or includes/excludes: call for_node() first")
    out = nri_pb2.LinuxSeccomp(
        default_action=profile.default_action,
        architectures=list(profile.architectures),
        flags=list(profile.flags),
        listener_path=profile.listener_path,
        listener_metadata=profile.listener_metadata,
    )
    if profile.default_errno_ret is not None:
        out.default_errno.value = profile.default_errno_ret
    for r in profile.syscalls:
        sc = out.syscalls.add(names=list(r.names), action=r.action)
        if r.errno_ret is not None:
            sc.errno_ret.value = r.errno_ret
        for c in r.args:
            sc.args.add(index=c.index, value=c.value, value_two=c.value_two, op=c.op)
    return out
