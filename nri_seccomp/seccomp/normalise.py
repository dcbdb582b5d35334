"""The same filter from fewer rules, and bounds on what libseccomp is given.

:func:`normalise` drops what libseccomp would ignore or refuse anyway (repeated
names, exact duplicates, rules equal to the default action) without changing the
filter. :func:`check_limits` then refuses a profile beyond the work libseccomp is
given: its filter generation grows faster than linearly, so a hostile profile is
stopped here, with a message naming the rule, before any compile.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nri_seccomp.seccomp.model import Condition, Profile, ProfileFieldError, Rule
from nri_seccomp.seccomp.parse import rule_label, show
from nri_seccomp.seccomp.vocabulary import action_value

#: rules (each (syscall, rule) pair, a rule split by argument counting once per
#: condition) that may name one syscall: KEP-6061's limit
MAX_RULES_PER_SYSCALL = 128
#: conditions in one rule: libseccomp compares at most six arguments
MAX_CONDITIONS = 6
#: syscall names over all rules, and rules, of a profile (after normalisation)
MAX_NAMES = 4096
MAX_RULES = 4096

_RuleKey = tuple[str, int | None, tuple[Condition, ...]]


@dataclass(frozen=True)
class Normalised:
    #: the profile with duplicates and default-action rules removed: the same filter
    profile: Profile
    #: the rules dropped because their action is the default action (their names are
    #: still checked, as libseccomp's build checks them)
    dropped: tuple[Rule, ...]


def normalise(profile: Profile) -> Normalised:
    """The same filter from fewer rules; rules keep their profile index for messages.

    * a name listed again by a rule with the same action, errno and conditions as
      an earlier rule (or twice in one rule) is dropped: libseccomp ignores the
      repeated rule, whatever came in between (the first unconditional rule of a
      syscall wins, a later unconditional rule replaces conditional ones: both
      are already decided by the first occurrence);
    * a rule left without names (an exact duplicate) is dropped;
    * a rule whose action is the default action is dropped: libseccomp refuses it
      and runc skips it, so it never was part of the filter.
    """
    default = action_value(profile.default_action, profile.default_errno_ret)
    seen: dict[_RuleKey, set[str]] = {}
    kept: list[Rule] = []
    dropped: list[Rule] = []
    for rule in profile.syscalls:
        if action_value(rule.action, rule.errno_ret) == default:
            dropped.append(rule)
            continue
        names_seen = seen.setdefault((rule.action, rule.errno_ret, rule.args), set())
        names: list[str] = []
        for name in rule.names:
            if name not in names_seen:
                names_seen.add(name)
                names.append(name)
        if not names:
            continue
        kept.append(rule if len(names) == len(rule.names) else replace(rule, names=tuple(names)))
    return Normalised(replace(profile, syscalls=tuple(kept)), tuple(dropped))


def _split(rule: Rule) -> int:
    """How many libseccomp rules one name of ``rule`` becomes (as compile_check adds them)."""
    indexes = [c.index for c in rule.args]
    return len(indexes) if len(set(indexes)) < len(indexes) else 1


def check_limits(profile: Profile) -> None:
    """Refuse a (normalised) profile beyond the bounds libseccomp is given work for."""
    per_syscall: dict[str, int] = {}
    names = 0
    for count, rule in enumerate(profile.syscalls, 1):
        where = rule_label(rule.index, rule.names)
        first = show(rule.names[0]) if rule.names else "?"
        fail: str | None = None
        if count > MAX_RULES:
            fail = f"rule {count} (for {first}) is over the limit of {MAX_RULES} rules"
        elif len(rule.args) > MAX_CONDITIONS:
            fail = (
                f"{len(rule.args)} conditions for {first}; a rule may have at most "
                f"{MAX_CONDITIONS} (libseccomp compares six arguments)"
            )
        else:
            names += len(rule.names)
            if names > MAX_NAMES:
                fail = (
                    f"{first}: the profile names over {MAX_NAMES} syscalls in all its rules; "
                    f"at most {MAX_NAMES} are allowed"
                )
        if fail is None:
            split = _split(rule)
            for name in rule.names:
                n = per_syscall[name] = per_syscall.get(name, 0) + split
                if n > MAX_RULES_PER_SYSCALL:
                    fail = (
                        f"{show(name)} has {n} rules (conditions on one argument counting one "
                        f"rule each); at most {MAX_RULES_PER_SYSCALL} rules may name a syscall"
                    )
                    break
        if fail is not None:
            raise ProfileFieldError(
                f"{where}: {fail}",
                field=f"syscalls[{rule.index}]",
                rule_index=rule.index,
                names=rule.names[:5],
                syscall=rule.names[0] if rule.names else None,
            )
