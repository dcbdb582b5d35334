"""Profile bytes → the policy to send and the report of its compile, in one call.

:func:`prepare` runs the stages of this package in order: ``parse`` (bytes to a
validated profile), ``for_node`` (``archMap`` and every rule's
``includes``/``excludes`` for this node), ``normalise`` and ``check_limits``
(the same filter from fewer rules, bounded), ``to_nri`` (the spec's
``linux.seccomp``) and ``compile_check`` (libseccomp builds the filter for every
architecture and exports its BPF, never loads it). Messages point into the
profile, by rule index, whatever the stages dropped or merged. The worker runs
it in a process with a CPU budget.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nri_seccomp.nri.pb import nri_pb2
from nri_seccomp.seccomp.libseccomp import CompileReport, check_dropped_names, compile_check
from nri_seccomp.seccomp.model import NodeContext, Profile
from nri_seccomp.seccomp.normalise import check_limits, normalise
from nri_seccomp.seccomp.nri import to_nri
from nri_seccomp.seccomp.parse import parse
from nri_seccomp.seccomp.select import for_node


@dataclass(frozen=True)
class Prepared:
    profile: Profile
    policy: nri_pb2.LinuxSeccomp
    report: CompileReport


def prepare(data: bytes, node: NodeContext, *, unknown_syscalls: str = "refuse") -> Prepared:
    """parse → for_node → normalise → check_limits → to_nri → compile_check, with
    messages pointing into the profile. The policy is the normalised one."""
    if unknown_syscalls not in ("refuse", "warn"):
        raise ValueError(f"unknown_syscalls must be 'refuse' or 'warn', not {unknown_syscalls!r}")
    normal = normalise(for_node(parse(data), node))
    selected = normal.profile
    check_limits(selected)
    unknown, warnings = check_dropped_names(normal.dropped, selected, unknown_syscalls)
    policy = to_nri(selected)
    report = compile_check(
        policy, unknown_syscalls=unknown_syscalls, origin=selected.rule_indexes
    )
    if normal.dropped:
        report = replace(
            report,
            unknown_syscalls=(*report.unknown_syscalls, *unknown),
            warnings=(*report.warnings, *warnings),
            rules_skipped=report.rules_skipped + len(normal.dropped),
        )
    return Prepared(selected, policy, report)
