"""Send each runtime only what it applies correctly: the profile's exact errnos, or a refusal.

Two defects of containerd's NRI code decide what a seccomp adjustment may carry
(nri-protocol.md in the shared docs, "Runtime defects"):

* a per-syscall ``errno_ret`` makes containerd 2.2.x (NRI < 0.12) panic, taking
  the node's runtime down;
* ``default_errno`` is dropped by every NRI release so far, so the runtime's
  runc falls back to EPERM for the default action.

runc returns EPERM for ``SCMP_ACT_ERRNO`` (and ``SCMP_ACT_TRACE``) without an
errno, so an errno of 1 can always be left out with no change of meaning.
Anything else is kept exactly or refused:

* a rule's ``errnoRet`` other than EPERM needs a runtime where ``errno_ret`` is
  safe;
* a ``defaultErrnoRet`` other than EPERM, where ``errno_ret`` is safe, becomes an
  explicit rule with that errno listing every syscall that would reach the
  default action: every syscall libseccomp (here) knows for the policy's
  architectures that no rule decides. Only calls this libseccomp does not know
  (newer syscalls, or numbers no libseccomp names) still fall to the runtime's
  default, which is then EPERM. A syscall that reaches the default only for
  some values of one argument (Docker's and Debian's ``personality``, allowed
  for five values; libseccomp's socketcall and ipc multiplexing on x86) gets one
  rule per block of those values (``argset``: LE, GT, EQ or MASKED_EQ), written
  so that 32-bit architectures, where libseccomp compares only the low 32 bits,
  keep their meaning too. What still cannot be written (conditions on several
  arguments, values above 32 bits that 32-bit architectures would misread, more
  than ``_MAX_COMPLEMENT_RULES`` rules) is refused, naming the syscall and why.

``allow_errno_degrade`` turns each refusal into a warning and EPERM. Whenever an
explicit default rule is added, the result is checked by compiling both policies
with libseccomp and comparing what their filters do for every syscall on every
architecture, at every value either filter compares and at both ends of every
condition of either (so a wrong block cannot hide between them); a difference
is a refusal, never a silently different filter.
"""

from __future__ import annotations

import errno as errno_mod
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from nri_seccomp.errors import NriSeccompError
from nri_seccomp.nri.pb import nri_pb2
from nri_seccomp.seccomp import argset, bpf, libseccomp, model, parse, vocabulary

EPERM = errno_mod.EPERM


class RuntimeCapsLike(Protocol):
    """What this module needs to know of a runtime (``runtimes.RuntimeCaps`` has it)."""

    @property
    def errno_ret_safe(self) -> bool: ...

    @property
    def keeps_default_errno(self) -> bool: ...

    @property
    def description(self) -> str: ...


class UnsupportedByRuntime(NriSeccompError):
    """The runtime cannot apply this policy with its exact meaning; the container is refused."""

    def __init__(
        self,
        message: str,
        *,
        runtime: str,
        errno: int,
        syscalls: Sequence[str] = (),
        rule_index: int | None = None,
    ) -> None:
        super().__init__(message)
        #: the runtime's description (e.g. "containerd 2.2.4 (NRI v0.11.0)")
        self.runtime = runtime
        #: the errno that cannot be carried
        self.errno = errno
        #: the syscalls whose errno would change
        self.syscalls = tuple(syscalls)
        #: the rule at fault (policy index, or the profile's when ``origin`` was given)
        self.rule_index = rule_index


class RuntimeWouldCrash(ValueError):
    """``effective_policy`` was given a policy the runtime would crash on."""


@dataclass(frozen=True)
class Translation:
    #: what to send as the adjustment's ``linux.seccomp``; the input is left untouched
    policy: nri_pb2.LinuxSeccomp
    #: meaning changed because allow_errno_degrade permitted it: log per container
    warnings: tuple[str, ...] = ()
    #: meaning kept, representation changed: worth a debug line
    notes: tuple[str, ...] = ()
    #: names listed in the explicit rule that carries defaultErrnoRet, if one was added
    materialised: tuple[str, ...] = ()
    #: syscalls given argument-conditional rules with defaultErrnoRet (personality, socketcall)
    complemented: tuple[str, ...] = ()


def _errno_name(n: int) -> str:
    return errno_mod.errorcode.get(n, "unknown errno")


def translate(
    policy: nri_pb2.LinuxSeccomp,
    caps: RuntimeCapsLike,
    *,
    allow_errno_degrade: bool = False,
    origin: Sequence[int] | None = None,
) -> Translation:
    """Rewrite ``policy`` so that ``caps``' runtime applies exactly its meaning, or raise.

    ``origin`` (``Profile.rule_indexes``) makes messages use the profile's rule numbers.
    """
    if origin is not None and len(origin) != len(policy.syscalls):
        raise ValueError("origin must give one index per policy rule")
    out = nri_pb2.LinuxSeccomp()
    out.CopyFrom(policy)
    warnings: list[str] = []
    notes: list[str] = []

    if not caps.errno_ret_safe:
        _strip_errno_ret(out, caps, allow_errno_degrade, origin, warnings, notes)

    materialised: tuple[str, ...] = ()
    complemented: tuple[str, ...] = ()
    if out.HasField("default_errno") and not caps.keeps_default_errno:
        d = out.default_errno.value
        what = f"defaultErrnoRet {d} ({_errno_name(d)})"
        if out.default_action not in vocabulary.ERRNO_ACTIONS:
            out.ClearField("default_errno")
            notes.append(f"{what} dropped: it has no effect with {out.default_action}")
        elif d == EPERM:
            out.ClearField("default_errno")
            notes.append(f"{what} left out: the runtime uses EPERM without it")
        elif caps.errno_ret_safe:
            try:
                materialised, complemented = _materialise(
                    policy, out, caps, d, allow_errno_degrade, warnings
                )
            except bpf.AnalysisTooCostly as exc:
                raise UnsupportedByRuntime(
                    f"{what} cannot be shown to be kept on {caps.description} (its NRI drops "
                    f"default_errno): {exc}",
                    runtime=caps.description,
                    errno=d,
                ) from exc
            notes.append(
                f"{what} carried by an explicit {out.default_action} rule over "
                f"{len(materialised)} syscalls libseccomp {libseccomp.libseccomp_version()} knows "
                f"for {', '.join(libseccomp.policy_arches(policy))}"
                + (
                    f" and by argument-conditional rules for {', '.join(complemented)}"
                    if complemented
                    else ""
                )
                + f": {caps.description} drops default_errno; syscalls unknown to "
                "libseccomp get EPERM"
            )
        elif allow_errno_degrade:
            out.ClearField("default_errno")
            warnings.append(
                f"{what} degraded to EPERM (allow_errno_degrade): {caps.description} drops "
                "default_errno and cannot carry a per-syscall errno_ret"
            )
        else:
            raise UnsupportedByRuntime(
                f"{what} cannot be kept on {caps.description}: its NRI drops default_errno "
                "(every call reaching the default action would get EPERM), and the "
                "per-syscall errno_ret that could carry it crashes this runtime; "
                "allow_errno_degrade accepts EPERM",
                runtime=caps.description,
                errno=d,
            )
    return Translation(out, tuple(warnings), tuple(notes), materialised, complemented)


def _strip_errno_ret(
    out: nri_pb2.LinuxSeccomp,
    caps: RuntimeCapsLike,
    allow_errno_degrade: bool,
    origin: Sequence[int] | None,
    warnings: list[str],
    notes: list[str],
) -> None:
    omitted = 0
    for pos, sc in enumerate(out.syscalls):
        if not sc.HasField("errno_ret"):
            continue
        index = origin[pos] if origin is not None else pos
        where = parse.rule_label(index, tuple(sc.names))
        e = sc.errno_ret.value
        sc.ClearField("errno_ret")
        if sc.action not in vocabulary.ERRNO_ACTIONS:
            notes.append(f"{where}: errnoRet {e} dropped: it has no effect with {sc.action}")
        elif e == EPERM:
            omitted += 1
        elif allow_errno_degrade:
            warnings.append(
                f"{where}: errnoRet {e} ({_errno_name(e)}) degraded to EPERM "
                f"(allow_errno_degrade): {caps.description} cannot carry a per-syscall errno_ret"
            )
        else:
            first = sc.names[0] if sc.names else "?"
            raise UnsupportedByRuntime(
                f"{where}: errnoRet {e} ({_errno_name(e)}) for {first} cannot be sent to "
                f"{caps.description}: a per-syscall errno_ret crashes its NRI, and without it "
                "the call would get EPERM; allow_errno_degrade accepts EPERM",
                runtime=caps.description,
                errno=e,
                syscalls=tuple(sc.names),
                rule_index=index,
            )
    if omitted:
        notes.append(
            f"errnoRet 1 (EPERM) left out of {omitted} rule(s): {caps.description} crashes on "
            "errno_ret, and the runtime uses EPERM without it"
        )


def _materialise(
    original: nri_pb2.LinuxSeccomp,
    out: nri_pb2.LinuxSeccomp,
    caps: RuntimeCapsLike,
    d: int,
    allow_errno_degrade: bool,
    warnings: list[str],
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    default = vocabulary.action_of(original.default_action, d)
    # decided from what the original filter does, not from the names the profile
    # lists: rules equal to the default are skipped, a later unconditional rule
    # loses to an earlier one, and libseccomp adds rules of its own (socketcall
    # and ipc on x86), so the names alone would mislead.
    # name → architecture → "all" / "none" / "some" of its calls reach the default
    reach: dict[str, dict[str, str]] = {}
    for arch in libseccomp.policy_arches(original):
        outcomes: dict[str, set[bool]] = {}
        for key, act in bpf.action_table(original, arch).items():
            outcomes.setdefault(key.partition("(")[0], set()).add(act == default)
        for name, seen in outcomes.items():
            kind = "all" if seen == {True} else "none" if seen == {False} else "some"
            reach.setdefault(name, {})[arch] = kind
    names = sorted(n for n, by in reach.items() if set(by.values()) == {"all"})
    # "some" cannot be expressed; "all" on one architecture and "none" on another
    # cannot either, as a rule names a syscall on every architecture at once
    mixed = {
        n: [a for a, kind in by.items() if kind != "none"]
        for n, by in sorted(reach.items())
        if "some" in by.values() or len(set(by.values())) > 1
    }
    # a syscall that reaches the default only for some values of one argument
    # (personality in Docker's and Debian's profiles; socketcall and ipc on x86,
    # multiplexed by libseccomp) gets explicit rules for exactly those values;
    # anything else cannot be expressed
    complements: dict[str, list[tuple[int, str, int, int]]] = {}
    why: dict[str, str] = {}
    for n in list(mixed):
        conds = _default_region(original, n, default)
        if isinstance(conds, str):
            why[n] = conds
        else:
            complements[n] = conds
            del mixed[n]
    what = f"defaultErrnoRet {d} ({_errno_name(d)})"
    if mixed:
        listed = "; ".join(
            f"{n} ({', '.join(arches)}): {why[n]}" for n, arches in mixed.items()
        )
        if not allow_errno_degrade:
            raise UnsupportedByRuntime(
                f"{what} cannot be kept exactly on {caps.description}: its NRI drops "
                "default_errno, and these syscalls reach the default action only for some "
                "argument values or architectures, which no explicit rule can express: "
                f"{listed}; allow_errno_degrade accepts EPERM for them",
                runtime=caps.description,
                errno=d,
                syscalls=tuple(mixed),
            )
        warnings.append(
            f"{what} degraded to EPERM (allow_errno_degrade) where these syscalls reach the "
            f"default action: {listed}"
        )
    out.ClearField("default_errno")
    if names:
        rule = out.syscalls.add(names=names, action=original.default_action)
        rule.errno_ret.value = d
    for n, conds in complements.items():
        for index, op, value, value_two in conds:
            rule = out.syscalls.add(names=[n], action=original.default_action)
            rule.errno_ret.value = d
            rule.args.add(index=index, op=op, value=value, value_two=value_two)
    try:
        # the explicit rules make the filter longer: it must still load
        libseccomp.compile_check(out, unknown_syscalls="warn")
    except model.CompileError as exc:
        raise UnsupportedByRuntime(
            f"{what} cannot be kept on {caps.description} by explicit rules (its NRI drops "
            f"default_errno): {exc}",
            runtime=caps.description,
            errno=d,
        ) from exc
    _verify(original, out, caps, d, set(mixed))
    return tuple(names), tuple(complements)


#: beyond this many rules for one syscall, refuse rather than bloat the filter (Debian's
#: personality takes 83; the filter must also stay within the kernel's 4096 instructions)
_MAX_COMPLEMENT_RULES = 256
#: a gap between two compared high words whose low words reach the default only in part
#: is written one high word at a time, for at most this many high words
_MAX_HIGH_WORDS = 4

_Region = tuple[int | None, list[argset.Range]]


def _default_region(
    policy: nri_pb2.LinuxSeccomp, name: str, default: tuple[str, int | None]
) -> list[tuple[int, str, int, int]] | str:
    """Conditions (index, op, value, valueTwo), one rule each, that match exactly the
    calls of ``name`` that reach the default action on every architecture, or why
    there are none (a short reason)."""
    wide: dict[str, list[argset.Range]] = {}
    narrow: dict[str, list[argset.Range]] = {}
    indexes: set[int] = set()
    for arch in libseccomp.policy_arches(policy):
        if name not in libseccomp.known_syscalls(arch):
            continue
        found = _region_on(policy, arch, name, default)
        if isinstance(found, str):
            return found
        index, ranges = found
        if index is not None:
            indexes.add(index)
        (wide if vocabulary.ARCHES[arch].bits == 64 else narrow)[arch] = ranges
    if len(indexes) != 1:
        return (
            "its rules compare different arguments on different architectures"
            if indexes
            else "it reaches the default action on some architectures only"
        )
    (index,) = indexes
    for group in (wide, narrow):
        if len({tuple(r) for r in group.values()}) > 1:
            return f"it reaches the default for different values on {', '.join(group)}"
    conds: list[argset.Cond] | None
    if wide:
        (region,) = {tuple(r) for r in wide.values()}
        low = list(next(iter(narrow.values()))) if narrow else None
        if low is not None and low != argset.intersect(region, 0, argset.M32):
            return (
                "its 32-bit architectures reach the default for other values than the low "
                "32 bits of its 64-bit ones"
            )
        conds = argset.encode(region, low)
        if conds is None:
            return (
                "its values above 32 bits cannot be written without changing 32-bit "
                "architectures, where libseccomp compares only the low 32 bits"
            )
    else:
        conds = argset.conditions(next(iter(narrow.values())), 32)
    if len(conds) > _MAX_COMPLEMENT_RULES:
        return f"it would take {len(conds)} rules (at most {_MAX_COMPLEMENT_RULES})"
    return [(index, op, value, value_two) for op, value, value_two in conds]


def _points(constants: set[int], full: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The values worth evaluating for a word compared with ``constants`` (each with its
    neighbours, and both ends), sorted, and the gaps between them (as first, last)."""
    points = {0, full}
    for v in constants:
        points.update(x for x in (v - 1, v, v + 1) if 0 <= x <= full)
    ordered = sorted(points)
    gaps = [(a + 1, b - 1) for a, b in itertools.pairwise(ordered) if b - a > 1]
    return ordered, gaps


def _region_on(
    policy: nri_pb2.LinuxSeccomp, arch: str, name: str, default: tuple[str, int | None]
) -> _Region | str:
    """The values of the one argument ``name`` is decided by on ``arch`` (index, or None
    when no argument matters) for which the filter reaches ``default``, as ranges.

    The filter compares each 32-bit word of the argument with constants; between two
    consecutive constants (and their neighbours) its answer is taken to be constant, which
    is checked at both ends of every gap. Masked comparisons can break that assumption
    without the check seeing it: the comparison of the two filters (``_verify``) does.
    """
    bits = vocabulary.ARCHES[arch].bits
    outcomes = bpf.syscall_outcomes(policy, arch, name)
    words = {off: bpf.word_of(arch, off) for probe in outcomes for off, _ in probe}
    if not words:
        reached = next(iter(outcomes.values())) == default
        return None, [(0, argset.top(bits))] if reached else []
    indexes = {index for index, _ in words.values()}
    if len(indexes) > 1:
        args = ", ".join(str(i) for i in sorted(indexes))
        return f"its rules compare more than one argument ({args})"
    (index,) = indexes
    low = {v for p in outcomes for off, v in p if not words[off][1]}
    high = {v for p in outcomes for off, v in p if words[off][1]}
    lows, low_gaps = _points(low, argset.M32)
    if bits == 64:
        highs, high_gaps = _points(high, argset.M32)
    else:
        highs, high_gaps = [0], []
    low_reps = sorted(set(lows).union(*low_gaps))
    high_reps = sorted(set(highs).union(*high_gaps))
    probes = {
        (h, lo): bpf.probe_for(arch, {index: h << 32 | lo}) for h in high_reps for lo in low_reps
    }
    acts = bpf.syscall_outcomes(policy, arch, name, extra=probes.values())
    hit = {key: acts[p] == default for key, p in probes.items()}

    def low_set(h: int) -> list[argset.Range] | None:
        ranges = [(lo, lo) for lo in lows if hit[h, lo]]
        for a, b in low_gaps:
            if hit[h, a] != hit[h, b]:
                return None
            if hit[h, a]:
                ranges.append((a, b))
        return argset.normalise(ranges, 32)

    region: list[argset.Range] = []
    cells = [(h, h) for h in highs] + high_gaps
    for first, last in cells:
        got = low_set(first)
        if got is None or (last != first and low_set(last) != got):
            return "its filter's answer changes between the values it compares"
        if got == [(0, argset.M32)]:
            region.append((first << 32, last << 32 | argset.M32))
        elif got and last - first >= _MAX_HIGH_WORDS:
            return "the values reaching the default are not a few ranges"
        else:
            region += [(h << 32 | a, h << 32 | b) for h in range(first, last + 1) for a, b in got]
    return index, argset.normalise(region, bits)


def _verify(
    original: nri_pb2.LinuxSeccomp,
    translated: nri_pb2.LinuxSeccomp,
    caps: RuntimeCapsLike,
    d: int,
    degraded: set[str],
) -> None:
    diffs = [
        _fmt_diff(diff)
        for diff in _differences(original, effective_policy(translated, caps))
        if diff[1].partition("(")[0] not in degraded
    ]
    if diffs:
        shown = "; ".join(diffs[:5]) + (f"; … ({len(diffs)} in all)" if len(diffs) > 5 else "")
        raise UnsupportedByRuntime(
            f"the policy rewritten for {caps.description} would not keep the profile's "
            f"meaning, refusing it: {shown}",
            runtime=caps.description,
            errno=d,
        )


def effective_policy(
    policy: nri_pb2.LinuxSeccomp, caps: RuntimeCapsLike
) -> nri_pb2.LinuxSeccomp:
    """The policy as ``caps``' runtime applies it: default_errno dropped where NRI drops it.

    Raises :class:`RuntimeWouldCrash` for an ``errno_ret`` the runtime cannot take.
    """
    out = nri_pb2.LinuxSeccomp()
    out.CopyFrom(policy)
    if not caps.keeps_default_errno:
        out.ClearField("default_errno")
    if not caps.errno_ret_safe:
        for i, sc in enumerate(out.syscalls):
            if sc.HasField("errno_ret"):
                raise RuntimeWouldCrash(
                    f"syscalls[{i}] has errno_ret {sc.errno_ret.value}: {caps.description} "
                    "would crash on it"
                )
    return out


_Act = tuple[str, int | None] | None
_Diff = tuple[str, str, _Act, _Act]


def _differences(a: nri_pb2.LinuxSeccomp, b: nri_pb2.LinuxSeccomp) -> list[_Diff]:
    arches_a = libseccomp.policy_arches(a)
    arches_b = libseccomp.policy_arches(b)
    if set(arches_a) != set(arches_b):
        return [(", ".join(arches_a), "(architectures)", None, None)]
    out: list[_Diff] = []
    for arch in arches_a:
        edges = _boundary_probes((a, b), arch)
        ta = bpf.action_table(a, arch, probe_with=[b], extra=edges)
        tb = bpf.action_table(b, arch, probe_with=[a], extra=edges)
        for key in sorted(ta.keys() | tb.keys()):
            va, vb = ta.get(key), tb.get(key)
            if va != vb:
                out.append((arch, key, va, vb))
    return out


def _boundary_probes(
    policies: Sequence[nri_pb2.LinuxSeccomp], arch: str
) -> dict[str, list[bpf.Probe]]:
    """Per syscall, the edges of every condition of the policies' rules on ``arch``: the
    lowest and highest value each matches and the values next to them, one argument at a
    time, so that a wrong block cannot hide between the values the filters compare.
    A 32-bit architecture sees what libseccomp compares there: the low 32 bits."""
    bits = vocabulary.ARCHES[arch].bits
    known = set(libseccomp.known_syscalls(arch))
    found: dict[str, set[bpf.Probe]] = {}
    for policy in policies:
        for rule in policy.syscalls:
            names = [n for n in rule.names if n in known]
            if not rule.args or not names:
                continue
            probes: set[bpf.Probe] = set()
            for cond in rule.args:
                c = (cond.op, cond.value, cond.value_two)
                if bits == 32:
                    c = argset.truncated(c)
                edges = argset.boundaries(c, bits)
                probes.update(bpf.probe_for(arch, {cond.index: v}) for v in edges)
            for n in names:
                found.setdefault(n, set()).update(probes)
    return {n: sorted(p) for n, p in found.items()}


def differences(a: nri_pb2.LinuxSeccomp, b: nri_pb2.LinuxSeccomp) -> list[str]:
    """Where libseccomp's filters for ``a`` and ``b`` act differently, on every architecture.

    Entries read ``SCMP_ARCH_X86 personality(a0=0x1): SCMP_ACT_ERRNO(38) → SCMP_ACT_ERRNO(1)``;
    an empty list means the same action for every syscall libseccomp knows.
    """
    if set(libseccomp.policy_arches(a)) != set(libseccomp.policy_arches(b)):
        return [
            f"architectures differ: {', '.join(libseccomp.policy_arches(a))} → "
            f"{', '.join(libseccomp.policy_arches(b))}"
        ]
    return [_fmt_diff(d) for d in _differences(a, b)]


def _fmt_diff(d: _Diff) -> str:
    arch, key, va, vb = d
    return f"{arch} {key}: {_fmt(va)} → {_fmt(vb)}"


def _fmt(v: _Act) -> str:
    if v is None:
        return "absent"
    name, data = v
    return name if data is None else f"{name}({data})"
