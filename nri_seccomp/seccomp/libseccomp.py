"""The one place that calls libseccomp: build the filter, export its BPF, resolve names.

:func:`compile_check` builds the filter with libseccomp for every architecture of
the policy and exports its BPF, never loads it: the same build the runtime's runc
will do, so a policy libseccomp refuses (an unknown syscall, an out-of-range
value, a filter longer than the kernel accepts) is refused before the container
starts. Rules are added as runc adds them (a rule equal to the default action is
skipped; several conditions on one argument become one rule each), and what
libseccomp then silently decides is reported as a warning.

pyseccomp does most of it; a ctypes handle of our own declares what pyseccomp
leaves undeclared (resolving a name on one architecture, whose AUDIT_ARCH token
ctypes cannot pass as a plain int; the library's version).
:func:`check_dropped_names` repeats the build's name check for the rules
normalisation dropped, and :func:`export_filter` hands the BPF to
:mod:`nri_seccomp.seccomp.bpf`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pyseccomp

from nri_seccomp.nri.pb import nri_pb2
from nri_seccomp.seccomp.model import (
    CompileError,
    Profile,
    Rule,
    UnknownSyscallError,
)
from nri_seccomp.seccomp.parse import quote, rule_label
from nri_seccomp.seccomp.vocabulary import (
    ACTIONS,
    ARCHES,
    MAX_ARG_INDEX,
    MAX_BPF_INSTRUCTIONS,
    MAX_ERRNO_RET,
    MAX_U64,
    OPS,
    action_value,
)


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


# own handle with declared prototypes: pyseccomp leaves resolve_name_arch
# undeclared, and ctypes cannot pass an AUDIT_ARCH value above 2**31 as an int
def _find_libseccomp() -> str | None:
    """The bundled copy in a PyInstaller bundle (find_library looks only at the system's
    ld cache, which a node without libseccomp does not have), else the system's."""
    bundle = getattr(sys, "_MEIPASS", None)
    if getattr(sys, "frozen", False) and bundle:
        path = os.path.join(bundle, "libseccomp.so.2")
        if os.path.exists(path):
            return path
    return ctypes.util.find_library("seccomp")


_lib_path = _find_libseccomp()
if _lib_path is None:  # pragma: no cover - pyseccomp has already failed the same way
    raise ImportError("libseccomp not found")
_lib = ctypes.CDLL(_lib_path)
_lib.seccomp_syscall_resolve_name_arch.argtypes = (ctypes.c_uint32, ctypes.c_char_p)
_lib.seccomp_syscall_resolve_name_arch.restype = ctypes.c_int
_lib.seccomp_version.argtypes = ()
_lib.seccomp_version.restype = ctypes.POINTER(_Version)
_NR_SCMP_ERROR = -1
_M32 = 0xFFFFFFFF


def libseccomp_version() -> str:
    v = _lib.seccomp_version().contents
    return f"{v.major}.{v.minor}.{v.micro}"


def native_arch() -> str:
    """The SCMP_ARCH_… name of the architecture libseccomp runs on."""
    token = pyseccomp.system_arch()
    for info in ARCHES.values():
        if info.token == token:
            return info.scmp
    raise CompileError(f"libseccomp reports an unknown native architecture {token:#x}")


def syscall_number(token: int, name: str) -> int:
    return int(_lib.seccomp_syscall_resolve_name_arch(token, name.encode()))


# syscall numbers libseccomp's tables use, per family: plain, MIPS o32/n64/n32
# bases, the x32 bit, and ARM's private calls (breakpoint, cacheflush, set_tls)
_SCAN_RANGES = (
    range(0, 1024),
    range(4000, 4600),
    range(5000, 5600),
    range(6000, 6600),
    range(0x40000000, 0x40000000 + 1024),
    range(0x0F0000, 0x0F0000 + 16),
)


@functools.cache
def known_syscalls(arch: str) -> tuple[str, ...]:
    """Every syscall name libseccomp knows on ``arch`` (SCMP_ARCH_…), sorted."""
    token = arch_token(arch)
    names: set[str] = set()
    for rng in _SCAN_RANGES:
        for nr in rng:
            try:
                raw = pyseccomp.resolve_syscall(token, nr)
            except ValueError:
                continue
            name = raw.decode()
            # the table maps some numbers to names that resolve elsewhere: keep
            # only names whose own number is the one the filter will test
            if syscall_number(token, name) >= 0:
                names.add(name)
    return tuple(sorted(names))


def arch_token(arch: str) -> int:
    info = ARCHES.get(arch)
    if info is None:
        raise CompileError(f"unknown architecture {quote(arch)}", arch=arch)
    if info.token is None:
        raise CompileError(
            f"architecture {arch} is not supported by libseccomp {libseccomp_version()}",
            arch=arch,
        )
    return info.token


def policy_arches(policy: nri_pb2.LinuxSeccomp) -> tuple[str, ...]:
    """Architectures the runtime's filter covers: the native one plus the policy's."""
    arches = [native_arch()]
    arches.extend(a for a in policy.architectures if a not in arches)
    return tuple(arches)


def _opt(msg: Any, name: str) -> int | None:
    return int(getattr(msg, name).value) if msg.HasField(name) else None


@dataclass(frozen=True)
class CompileReport:
    #: architectures in the filter, native first (SCMP_ARCH_…)
    architectures: tuple[str, ...]
    bpf_bytes: int
    bpf_instructions: int
    #: rules of the policy (after for_node)
    rules: int
    #: libseccomp rule additions (one per syscall name and per split condition)
    rules_added: int
    #: rules skipped because their action equals the default action (as runc does)
    rules_skipped: int
    #: names libseccomp does not know, skipped (only with unknown_syscalls="warn")
    unknown_syscalls: tuple[str, ...]
    warnings: tuple[str, ...]
    seconds: float


@dataclass
class _Built:
    filt: Any
    arches: list[str]
    rules_added: int = 0
    rules_skipped: int = 0
    unknown: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _build(
    policy: nri_pb2.LinuxSeccomp,
    unknown_syscalls: Literal["refuse", "warn", "skip"],
    origin: Sequence[int] | None,
) -> _Built:
    if not policy.default_action:
        raise CompileError("policy has no default action", field="defaultAction")
    if policy.default_action not in ACTIONS:
        raise CompileError(
            f"unknown default action {quote(policy.default_action)}", field="defaultAction"
        )
    default_errno = _opt(policy, "default_errno")
    if default_errno is not None and default_errno > MAX_ERRNO_RET:
        raise CompileError(
            f"defaultErrnoRet: {default_errno} is out of range (maximum {MAX_ERRNO_RET})",
            field="defaultErrnoRet",
        )
    default = action_value(policy.default_action, default_errno)
    filt = pyseccomp.SyscallFilter(default)
    native = native_arch()
    arches = [native]
    for a in policy.architectures:
        token = arch_token(a)
        if a not in arches:
            arches.append(a)
            if not filt.exist_arch(token):
                filt.add_arch(token)
    built = _Built(filt, arches)
    native_token = arch_token(native)
    least = _least_instructions(policy, arches, default)
    if least > MAX_BPF_INSTRUCTIONS:
        # refused before libseccomp, whose filter generation grows faster than
        # linearly: a hostile profile must not keep it busy for minutes
        raise CompileError(
            f"the filter would have at least {least} BPF instructions for "
            f"{', '.join(arches)}; the kernel accepts at most {MAX_BPF_INSTRUCTIONS}"
        )
    first_uncond: dict[str, int] = {}
    conditional: dict[str, int] = {}
    for pos, sc in enumerate(policy.syscalls):
        index = origin[pos] if origin is not None else pos
        names = tuple(sc.names)
        where = rule_label(index, names)
        if sc.action not in ACTIONS:
            raise CompileError(
                f"{where}: unknown action {quote(sc.action)}",
                rule_index=index,
                names=names,
                field=f"syscalls[{index}].action",
            )
        errno_ret = _opt(sc, "errno_ret")
        if errno_ret is not None and errno_ret > MAX_ERRNO_RET:
            raise CompileError(
                f"{where}: errnoRet {errno_ret} is out of range (maximum {MAX_ERRNO_RET})",
                rule_index=index,
                names=names,
                field=f"syscalls[{index}].errnoRet",
            )
        # names first, even for a rule that is then skipped: a typo is refused
        # wherever it is
        resolved: list[tuple[str, int]] = []
        for name in names:
            nr = syscall_number(native_token, name)
            if nr != _NR_SCMP_ERROR:
                resolved.append((name, nr))
                continue
            if unknown_syscalls == "refuse":
                raise UnknownSyscallError(
                    f"{where}: unknown syscall {quote(name)} for {', '.join(arches)} "
                    f"(libseccomp {libseccomp_version()})",
                    rule_index=index,
                    names=names,
                    syscall=name,
                    arch=arches[0],
                    field=f"syscalls[{index}].names",
                )
            if name not in built.unknown:
                built.unknown.append(name)
                if unknown_syscalls == "warn":
                    built.warnings.append(
                        f"{where}: unknown syscall {quote(name)} for {', '.join(arches)} "
                        f"(libseccomp {libseccomp_version()}), skipped as the runtime does"
                    )
        conds: list[Any] = []
        per_index: dict[int, int] = {}
        for j, cond in enumerate(sc.args):
            if cond.op not in OPS:
                raise CompileError(
                    f"{rule_label(index, names, f'.args[{j}]')}: unknown op {quote(cond.op)}",
                    rule_index=index,
                    names=names,
                    field=f"syscalls[{index}].args[{j}].op",
                )
            if cond.index > MAX_ARG_INDEX:
                raise CompileError(
                    f"{rule_label(index, names, f'.args[{j}]')}: index {cond.index} is out of "
                    f"range (maximum {MAX_ARG_INDEX})",
                    rule_index=index,
                    names=names,
                    field=f"syscalls[{index}].args[{j}].index",
                )
            per_index[cond.index] = per_index.get(cond.index, 0) + 1
            conds.append(pyseccomp.Arg(cond.index, OPS[cond.op], cond.value, cond.value_two))
        action = action_value(sc.action, errno_ret)
        if action == default:
            # libseccomp refuses a rule equal to the default action; runc skips it
            built.rules_skipped += 1
            continue
        if any(n > 1 for n in per_index.values()):
            # libseccomp refuses two conditions on one argument; runc then adds
            # every condition as a rule of its own, so any one of them matches
            groups: list[list[Any]] = [[c] for c in conds]
            built.warnings.append(
                f"{where}: several conditions on one argument; the runtime applies each "
                "condition as a separate rule (any one matching is enough)"
            )
        else:
            groups = [conds]
        for name, nr in resolved:
            if not conds:
                if name in first_uncond and first_uncond[name] != index:
                    built.warnings.append(
                        f"{where}: {name} already has an unconditional rule "
                        f"(syscalls[{first_uncond[name]}]); libseccomp keeps the first one"
                    )
                elif name in conditional:
                    built.warnings.append(
                        f"{where}: unconditional rule for {name} replaces its conditional "
                        f"rules (syscalls[{conditional[name]}])"
                    )
                first_uncond.setdefault(name, index)
            else:
                if name in first_uncond:
                    built.warnings.append(
                        f"{where}: conditional rule for {name} has no effect: the unconditional "
                        f"rule syscalls[{first_uncond[name]}] takes precedence in libseccomp"
                    )
                conditional.setdefault(name, index)
            for group in groups:
                try:
                    filt.add_rule(action, nr, *group)
                except OSError as exc:
                    raise CompileError(
                        f"{where}: libseccomp refused the rule for {quote(name)} on "
                        f"{', '.join(arches)}: {exc.strerror or exc}",
                        rule_index=index,
                        names=names,
                        syscall=name,
                        arch=arches[0],
                        field=f"syscalls[{index}]",
                    ) from exc
                built.rules_added += 1
    return built


def _least_instructions(policy: nri_pb2.LinuxSeccomp, arches: Sequence[str], default: int) -> int:
    """A lower bound of the filter's length: per architecture, one test per syscall
    that has a rule and one per distinct argument comparison."""
    total = 0
    for arch in arches:
        known = frozenset(known_syscalls(arch))
        word = MAX_U64 if ARCHES[arch].bits == 64 else _M32
        names: set[str] = set()
        conds: set[tuple[int, str, int, int]] = set()
        for sc in policy.syscalls:
            if sc.action not in ACTIONS:
                continue
            if action_value(sc.action, _opt(sc, "errno_ret")) == default:
                continue
            present = [n for n in sc.names if n in known]
            names.update(present)
            if present:
                conds.update((c.index, c.op, c.value & word, c.value_two & word) for c in sc.args)
        total += len(names) + len(conds)
    return total


def _export(filt: Any) -> bytes:
    with tempfile.TemporaryFile() as f:
        filt.export_bpf(f)
        f.seek(0)
        return f.read()


def compile_check(
    policy: nri_pb2.LinuxSeccomp,
    *,
    unknown_syscalls: str = "refuse",
    origin: Sequence[int] | None = None,
) -> CompileReport:
    """Build the filter with libseccomp for every architecture of the policy and export its BPF.

    Nothing is loaded into the kernel. ``unknown_syscalls`` is "refuse" (raise
    :class:`UnknownSyscallError`) or "warn" (skip the name, as runc does, and
    report it). ``origin`` gives each policy rule's index in the profile (see
    :attr:`Profile.rule_indexes`) so that messages point into the profile.
    """
    if unknown_syscalls not in ("refuse", "warn"):
        raise ValueError(f"unknown_syscalls must be 'refuse' or 'warn', not {unknown_syscalls!r}")
    if origin is not None and len(origin) != len(policy.syscalls):
        raise ValueError("origin must give one index per policy rule")
    started = time.perf_counter()
    built = _build(policy, "refuse" if unknown_syscalls == "refuse" else "warn", origin)
    bpf = _export(built.filt)
    if len(bpf) // 8 > MAX_BPF_INSTRUCTIONS:
        raise CompileError(
            f"the filter has {len(bpf) // 8} BPF instructions for {', '.join(built.arches)}; "
            f"the kernel accepts at most {MAX_BPF_INSTRUCTIONS}"
        )
    return CompileReport(
        architectures=tuple(built.arches),
        bpf_bytes=len(bpf),
        bpf_instructions=len(bpf) // 8,
        rules=len(policy.syscalls),
        rules_added=built.rules_added,
        rules_skipped=built.rules_skipped,
        unknown_syscalls=tuple(built.unknown),
        warnings=tuple(built.warnings),
        seconds=time.perf_counter() - started,
    )


def export_filter(policy: nri_pb2.LinuxSeccomp) -> bytes:
    """The BPF libseccomp builds for ``policy``, for :mod:`bpf` to run: unknown names
    are skipped silently and nothing is loaded."""
    return _export(_build(policy, "skip", None).filt)


def check_dropped_names(
    dropped: Sequence[Rule], kept: Profile, unknown_syscalls: str
) -> tuple[list[str], list[str]]:
    """libseccomp's name check for rules normalisation dropped: refuse or (unknown names,
    warnings) for names no kept rule lists (those, compile_check reports)."""
    if not dropped:
        return [], []
    native = native_arch()
    token = arch_token(native)
    arches = ", ".join([native, *(a for a in kept.architectures if a != native)])
    listed = {n for r in kept.syscalls for n in r.names}
    unknown: list[str] = []
    warnings: list[str] = []
    checked: set[str] = set()
    for rule in dropped:
        for name in rule.names:
            if name in checked:
                continue
            checked.add(name)
            if syscall_number(token, name) != _NR_SCMP_ERROR:
                continue
            where = rule_label(rule.index, rule.names)
            if unknown_syscalls == "refuse":
                raise UnknownSyscallError(
                    f"{where}: unknown syscall {quote(name)} for {arches} "
                    f"(libseccomp {libseccomp_version()})",
                    rule_index=rule.index,
                    names=rule.names[:5],
                    syscall=name,
                    arch=native,
                    field=f"syscalls[{rule.index}].names",
                )
            if name not in listed:
                unknown.append(name)
                warnings.append(
                    f"{where}: unknown syscall {quote(name)} for {arches} "
                    f"(libseccomp {libseccomp_version()}), skipped as the runtime does"
                )
    return unknown, warnings
