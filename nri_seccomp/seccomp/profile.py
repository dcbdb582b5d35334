"""Docker/OCI seccomp JSON profile → the node's rules → NRI ``LinuxSeccomp`` → libseccomp check.

The pipeline is ``parse`` (bytes to a validated :class:`Profile`), ``for_node``
(evaluate ``archMap`` and every rule's ``includes``/``excludes`` for this node),
``to_nri`` (the spec's ``linux.seccomp``) and ``compile_check`` (build the filter
with libseccomp for every architecture and export its BPF, never load it).

Validation is stricter than Docker's or CRI-O's: a profile pulled from a registry
is untrusted input, and the runtimes accept many mistakes silently (an unknown
field is ignored, an ``errnoRet`` over 65535 becomes 0 so the call *succeeds*,
an oversized argument value wraps). Every such case is an error here, and every
error names the rule, the syscall and the field at fault.

``action_table`` answers "what would libseccomp's filter do for syscall S on
architecture A" by running the exported BPF in a small interpreter. It follows
the filter's own comparisons to choose argument values, so conditional rules
(and libseccomp's own rewrites, such as the socketcall multiplexing on x86) are
covered without modelling libseccomp's rule merging.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_mod
import functools
import itertools
import json
import os
import platform
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NoReturn

import pyseccomp

from nri_seccomp.nri.pb import nri_pb2

# ---------------------------------------------------------------------------
# errors


class ProfileError(ValueError):
    """A profile (or the policy made from it) cannot be used; the message says where and why."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        rule_index: int | None = None,
        names: Sequence[str] = (),
        syscall: str | None = None,
        arch: str | None = None,
    ) -> None:
        super().__init__(message)
        #: JSON path of the offending value, e.g. ``syscalls[2].args[0].op``
        self.field = field
        #: index of the rule in the profile's ``syscalls`` list
        self.rule_index = rule_index
        #: the names the offending rule lists
        self.names = tuple(names)
        #: the one syscall at fault, when there is one
        self.syscall = syscall
        #: the architecture at fault, when there is one (``SCMP_ARCH_…``)
        self.arch = arch


class ProfileSyntaxError(ProfileError):
    """The layer is not JSON at all."""


class ProfileFieldError(ProfileError):
    """The JSON is not a valid profile: missing, unknown, mistyped or out-of-range field."""


class CompileError(ProfileError):
    """libseccomp refused the policy."""


class UnknownSyscallError(CompileError):
    """A rule names a syscall that libseccomp does not know."""


# ---------------------------------------------------------------------------
# vocabulary (OCI runtime-spec names)

ACTIONS: Mapping[str, int] = {
    "SCMP_ACT_KILL": pyseccomp.KILL_THREAD,
    "SCMP_ACT_KILL_THREAD": pyseccomp.KILL_THREAD,
    "SCMP_ACT_KILL_PROCESS": pyseccomp.KILL_PROCESS,
    "SCMP_ACT_TRAP": pyseccomp.TRAP,
    "SCMP_ACT_ERRNO": 0x00050000,
    "SCMP_ACT_TRACE": 0x7FF00000,
    "SCMP_ACT_ALLOW": pyseccomp.ALLOW,
    "SCMP_ACT_LOG": pyseccomp.LOG,
    "SCMP_ACT_NOTIFY": pyseccomp.NOTIFY,
}
#: actions whose 16-bit data is the errnoRet; runc uses EPERM when it is absent
ERRNO_ACTIONS = frozenset({"SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"})
EPERM = errno_mod.EPERM

OPS: Mapping[str, int] = {
    "SCMP_CMP_NE": pyseccomp.NE,
    "SCMP_CMP_LT": pyseccomp.LT,
    "SCMP_CMP_LE": pyseccomp.LE,
    "SCMP_CMP_EQ": pyseccomp.EQ,
    "SCMP_CMP_GE": pyseccomp.GE,
    "SCMP_CMP_GT": pyseccomp.GT,
    "SCMP_CMP_MASKED_EQ": pyseccomp.MASKED_EQ,
}

FLAGS = frozenset(
    {
        "SECCOMP_FILTER_FLAG_TSYNC",
        "SECCOMP_FILTER_FLAG_LOG",
        "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
        "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
    }
)

_A = pyseccomp.Arch


@dataclass(frozen=True)
class ArchInfo:
    scmp: str
    #: the name ``includes``/``excludes`` use (libseccomp-golang's, as Docker's profile does)
    docker: str
    #: libseccomp's token; None when this libseccomp (2.5.x) has no such architecture
    token: int | None
    #: the AUDIT_ARCH value the kernel puts in seccomp_data.arch (x32 shares x86_64's)
    audit: int | None
    #: argument width libseccomp compares (x32 and the MIPS n32 ABIs are 32-bit)
    bits: int = 64


ARCHES: Mapping[str, ArchInfo] = {
    a.scmp: a
    for a in (
        ArchInfo("SCMP_ARCH_X86", "x86", _A.X86, _A.X86, 32),
        ArchInfo("SCMP_ARCH_X86_64", "amd64", _A.X86_64, _A.X86_64),
        ArchInfo("SCMP_ARCH_X32", "x32", _A.X32, _A.X86_64, 32),
        ArchInfo("SCMP_ARCH_ARM", "arm", _A.ARM, _A.ARM, 32),
        ArchInfo("SCMP_ARCH_AARCH64", "arm64", _A.AARCH64, _A.AARCH64),
        ArchInfo("SCMP_ARCH_MIPS", "mips", _A.MIPS, _A.MIPS, 32),
        ArchInfo("SCMP_ARCH_MIPS64", "mips64", _A.MIPS64, _A.MIPS64),
        ArchInfo("SCMP_ARCH_MIPS64N32", "mips64n32", _A.MIPS64N32, _A.MIPS64N32, 32),
        ArchInfo("SCMP_ARCH_MIPSEL", "mipsel", _A.MIPSEL, _A.MIPSEL, 32),
        ArchInfo("SCMP_ARCH_MIPSEL64", "mipsel64", _A.MIPSEL64, _A.MIPSEL64),
        ArchInfo("SCMP_ARCH_MIPSEL64N32", "mipsel64n32", _A.MIPSEL64N32, _A.MIPSEL64N32, 32),
        ArchInfo("SCMP_ARCH_PPC", "ppc", _A.PPC, _A.PPC, 32),
        ArchInfo("SCMP_ARCH_PPC64", "ppc64", _A.PPC64, _A.PPC64),
        ArchInfo("SCMP_ARCH_PPC64LE", "ppc64le", _A.PPC64LE, _A.PPC64LE),
        ArchInfo("SCMP_ARCH_S390", "s390", _A.S390, _A.S390, 32),
        ArchInfo("SCMP_ARCH_S390X", "s390x", _A.S390X, _A.S390X),
        ArchInfo("SCMP_ARCH_PARISC", "parisc", _A.PARISC, _A.PARISC, 32),
        ArchInfo("SCMP_ARCH_PARISC64", "parisc64", _A.PARISC64, _A.PARISC64),
        ArchInfo("SCMP_ARCH_RISCV64", "riscv64", _A.RISCV64, _A.RISCV64),
        # in the runtime spec, unknown to libseccomp 2.5.4: parse, refuse to compile
        ArchInfo("SCMP_ARCH_LOONGARCH64", "loong64", None, None),
        ArchInfo("SCMP_ARCH_M68K", "m68k", None, None),
        ArchInfo("SCMP_ARCH_SH", "sh", None, None),
        ArchInfo("SCMP_ARCH_SHEB", "sheb", None, None),
    )
}
DOCKER_ARCHES = frozenset(a.docker for a in ARCHES.values())
_BY_DOCKER = {a.docker: a for a in ARCHES.values()}

#: platform.machine() → Docker architecture name
_MACHINES = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "i386": "x86",
    "i486": "x86",
    "i586": "x86",
    "i686": "x86",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv6l": "arm",
    "armv7l": "arm",
    "armv8l": "arm",
    "ppc": "ppc",
    "ppc64": "ppc64",
    "ppc64le": "ppc64le",
    "s390": "s390",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "parisc": "parisc",
    "parisc64": "parisc64",
    "loongarch64": "loong64",
    "m68k": "m68k",
}

#: Linux capabilities (through 5.9), for typo checks in includes/excludes
CAPABILITIES = frozenset(
    "CAP_" + c
    for c in (
        "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
        "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
        "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
        "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
        "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
        "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
        "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
    )
)

#: containerd's default capability set for a container (what a pod without
#: securityContext.capabilities gets); rules gated on ``caps`` are chosen with it
DEFAULT_CAPABILITIES = frozenset(
    {
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    }
)

MAX_ERRNO_RET = 0xFFFF  # libseccomp keeps 16 bits: 65536 would become 0, a success
MAX_ARG_INDEX = 5
MAX_U64 = 2**64 - 1
#: the kernel refuses a longer seccomp filter (BPF_MAXINSNS), at container start
MAX_BPF_INSTRUCTIONS = 4096

# ---------------------------------------------------------------------------
# the profile model


@dataclass(frozen=True)
class Condition:
    """One ``args[]`` entry: ``op`` compares argument ``index`` with ``value`` (``value_two``)."""

    index: int
    value: int
    op: str
    value_two: int = 0


@dataclass(frozen=True)
class Selector:
    """``includes`` or ``excludes``: empty fields select nothing."""

    arches: tuple[str, ...] = ()
    caps: tuple[str, ...] = ()
    min_kernel: tuple[int, int] | None = None

    def is_empty(self) -> bool:
        return not self.arches and not self.caps and self.min_kernel is None


@dataclass(frozen=True)
class Rule:
    names: tuple[str, ...]
    action: str
    errno_ret: int | None = None
    args: tuple[Condition, ...] = ()
    includes: Selector = Selector()
    excludes: Selector = Selector()
    comment: str = ""
    #: position in the profile's ``syscalls`` list, kept through ``for_node`` for messages
    index: int = 0


@dataclass(frozen=True)
class ArchMapEntry:
    architecture: str
    sub_architectures: tuple[str, ...] = ()


@dataclass(frozen=True)
class Profile:
    default_action: str
    default_errno_ret: int | None = None
    architectures: tuple[str, ...] = ()
    arch_map: tuple[ArchMapEntry, ...] = ()
    flags: tuple[str, ...] = ()
    listener_path: str = ""
    listener_metadata: str = ""
    syscalls: tuple[Rule, ...] = ()
    #: True once ``for_node`` has resolved ``archMap`` and ``includes``/``excludes``
    selected: bool = False

    @property
    def rule_indexes(self) -> tuple[int, ...]:
        """The profile index of each rule, to pass as ``compile_check(origin=…)``."""
        return tuple(r.index for r in self.syscalls)


@dataclass(frozen=True)
class NodeContext:
    #: Docker architecture name of the node ("amd64", "arm64", "x86", "s390x", …)
    arch: str
    #: (major, minor) of the running kernel
    kernel: tuple[int, int]
    #: the container's capabilities, "CAP_…" names
    caps: frozenset[str] = DEFAULT_CAPABILITIES

    @property
    def native_arch(self) -> str:
        """The node's own SCMP_ARCH_… name."""
        return _BY_DOCKER[self.arch].scmp


# ---------------------------------------------------------------------------
# parse

_TOP_FIELDS = frozenset(
    {
        "defaultAction",
        "defaultErrnoRet",
        "defaultErrno",  # errno name, informational (containers-common writes it)
        "architectures",
        "archMap",
        "flags",
        "listenerPath",
        "listenerMetadata",
        "syscalls",
    }
)
_RULE_FIELDS = frozenset(
    {"names", "name", "action", "errnoRet", "errno", "args", "includes", "excludes", "comment"}
)
_ARG_FIELDS = frozenset({"index", "value", "valueTwo", "op"})
_ARCHMAP_FIELDS = frozenset({"architecture", "subArchitectures"})
_SELECTOR_FIELDS = frozenset({"arches", "caps", "minKernel"})


def parse(data: bytes) -> Profile:
    """Validate a Docker/OCI seccomp profile; raise :class:`ProfileError` naming the fault."""
    try:
        doc = json.loads(
            data,
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_no_constant,
        )
    except _DuplicateKey as exc:
        raise ProfileSyntaxError(
            f"layer is not usable JSON: duplicate key {quote(exc.key)}"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProfileSyntaxError(f"layer is not JSON: {exc}") from None
    except RecursionError:
        raise ProfileSyntaxError("layer is not JSON a profile can be: nested too deeply") from None
    if not isinstance(doc, dict):
        raise ProfileFieldError(
            f"profile must be a JSON object, not {_json_type(doc)}", field="(top level)"
        )
    _only_known(doc, _TOP_FIELDS, "", "profile")
    if "defaultAction" not in doc or doc["defaultAction"] in (None, ""):
        raise ProfileFieldError(
            "profile has no defaultAction (CRI-O would run such a container unconfined; "
            "we refuse it)",
            field="defaultAction",
        )
    default_action = _action(doc["defaultAction"], "defaultAction")
    if default_action == "SCMP_ACT_NOTIFY":
        raise ProfileFieldError(
            "defaultAction: SCMP_ACT_NOTIFY cannot be the default action", field="defaultAction"
        )
    default_errno = _opt_uint(doc.get("defaultErrnoRet"), "defaultErrnoRet", MAX_ERRNO_RET)
    if default_errno is not None and default_action not in ERRNO_ACTIONS:
        raise ProfileFieldError(
            f"defaultErrnoRet: {default_errno} has no effect with {default_action}; "
            "it only applies to SCMP_ACT_ERRNO and SCMP_ACT_TRACE",
            field="defaultErrnoRet",
        )
    _errno_name(doc.get("defaultErrno"), default_errno, default_action, "defaultErrno", None)

    architectures = tuple(
        _scmp_arch(a, f"architectures[{i}]")
        for i, a in enumerate(_list(doc.get("architectures"), "architectures"))
    )
    arch_map = tuple(
        _arch_map_entry(e, f"archMap[{i}]")
        for i, e in enumerate(_list(doc.get("archMap"), "archMap"))
    )
    if architectures and arch_map:
        raise ProfileFieldError(
            "architectures and archMap are both set; use one of them", field="archMap"
        )
    flags = tuple(
        _flag(f, f"flags[{i}]") for i, f in enumerate(_list(doc.get("flags"), "flags"))
    )
    listener_path = _opt_str(doc.get("listenerPath"), "listenerPath")
    listener_metadata = _opt_str(doc.get("listenerMetadata"), "listenerMetadata")
    rules = tuple(
        _rule(r, i) for i, r in enumerate(_list(doc.get("syscalls"), "syscalls"))
    )
    for r in rules:
        if r.action == "SCMP_ACT_NOTIFY" and not listener_path:
            raise ProfileFieldError(
                f"{rule_label(r.index, r.names)}: SCMP_ACT_NOTIFY needs listenerPath",
                field=f"syscalls[{r.index}].action",
                rule_index=r.index,
                names=r.names,
            )
    return Profile(
        default_action=default_action,
        default_errno_ret=default_errno,
        architectures=architectures,
        arch_map=arch_map,
        flags=flags,
        listener_path=listener_path,
        listener_metadata=listener_metadata,
        syscalls=rules,
    )


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal keys; which one a runtime honours is a guess
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


_RuleCtx = tuple[int, Sequence[str]] | None


def rule_label(index: int, names: Sequence[str], sub: str = "") -> str:
    """``syscalls[3] (names: foo, bar)``: how every message names a rule."""
    label = f"syscalls[{index}]{sub}"
    if names:
        shown = ", ".join(show(n) for n in names[:5]) + (
            f", … ({len(names)} names)" if len(names) > 5 else ""
        )
        label += f" (names: {shown})"
    return label


#: the most of one profile value a message shows
MAX_SHOWN = 64
_CONTROL = dict.fromkeys([*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029])


def show(value: object) -> str:
    """A profile value fit for a message: control characters removed, at most MAX_SHOWN
    characters (a hostile profile must not fill or forge log lines)."""
    text = str(value).translate(_CONTROL)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 1] + "…"


def quote(value: object) -> str:
    """:func:`show` in quotes, as messages quote a value the profile gave."""
    return repr(show(value))


def _fail(message: str, path: str, rule: _RuleCtx = None) -> NoReturn:
    if rule is None:
        raise ProfileFieldError(f"{path}: {message}", field=path)
    index, names = rule
    # label = the path up to its last [i], so a message reads
    # "syscalls[2].args[0] (names: socket): unknown op 'X'"
    cut = path.rfind("]") + 1
    label, rest = path[:cut], path[cut:].lstrip(".")
    if rest and rest.split("[")[0] not in message:
        message = f"{rest}: {message}"
    shown = label[len(f"syscalls[{index}]") :]
    raise ProfileFieldError(
        f"{rule_label(index, names, shown)}: {message}", field=path, rule_index=index, names=names
    )


def _only_known(
    obj: Mapping[str, Any],
    known: frozenset[str],
    path: str,
    what: str,
    rule: _RuleCtx = None,
) -> None:
    unknown = sorted(set(obj) - known)
    if unknown:
        lowered = {k.lower(): k for k in known}
        # at most five keys shown: a profile can have a million of them
        listed = ", ".join(
            quote(u) + (f" (did you mean {lowered[u.lower()]!r}?)" if u.lower() in lowered else "")
            for u in unknown[:5]
        ) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        plural = "s" if len(unknown) > 1 else ""
        msg = f"unknown {what} field{plural} {listed} (known: {', '.join(sorted(known))})"
        if not path:
            raise ProfileFieldError(msg, field=show(unknown[0]))
        _fail(msg, path, rule)


def _list(value: object, path: str, rule: _RuleCtx = None) -> list[Any]:
    # Go's encoding/json decodes null as an empty slice: accept it the same way
    if value is None:
        return []
    if not isinstance(value, list):
        _fail(f"must be an array, not {_json_type(value)}", path, rule)
    return value


def _opt_str(value: object, path: str, rule: _RuleCtx = None) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        _fail(f"must be a string, not {_json_type(value)}", path, rule)
    return value


def _str(value: object, path: str, rule: _RuleCtx = None) -> str:
    if not isinstance(value, str):
        _fail(f"must be a string, not {_json_type(value)}", path, rule)
    return value


def _uint(
    value: object, path: str, maximum: int, rule: _RuleCtx = None
) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(f"must be a non-negative integer, not {_json_type(value)}", path, rule)
    if value < 0:
        _fail(f"{show(value)} is negative", path, rule)
    if value > maximum:
        _fail(f"{show(value)} is out of range (maximum {maximum})", path, rule)
    return value


def _opt_uint(
    value: object, path: str, maximum: int, rule: _RuleCtx = None
) -> int | None:
    return None if value is None else _uint(value, path, maximum, rule)


def _action(value: object, path: str, rule: _RuleCtx = None) -> str:
    name = _str(value, path, rule)
    if name not in ACTIONS:
        _fail(f"unknown action {quote(name)} (known: {', '.join(ACTIONS)})", path, rule)
    return name


def _scmp_arch(value: object, path: str) -> str:
    name = _str(value, path)
    if name not in ARCHES:
        raise ProfileFieldError(
            f"{path}: unknown architecture {quote(name)} (known: {', '.join(ARCHES)})", field=path
        )
    return name


def _flag(value: object, path: str) -> str:
    name = _str(value, path)
    if name not in FLAGS:
        raise ProfileFieldError(
            f"{path}: unknown flag {quote(name)} (known: {', '.join(sorted(FLAGS))})", field=path
        )
    return name


def _arch_map_entry(value: object, path: str) -> ArchMapEntry:
    if not isinstance(value, dict):
        raise ProfileFieldError(f"{path}: must be an object, not {_json_type(value)}", field=path)
    _only_known(value, _ARCHMAP_FIELDS, path, "archMap")
    if "architecture" not in value:
        raise ProfileFieldError(f"{path}: architecture is missing", field=f"{path}.architecture")
    arch = _scmp_arch(value["architecture"], f"{path}.architecture")
    subs = tuple(
        _scmp_arch(s, f"{path}.subArchitectures[{i}]")
        for i, s in enumerate(_list(value.get("subArchitectures"), f"{path}.subArchitectures"))
    )
    return ArchMapEntry(arch, subs)


def _errno_name(
    value: object, number: int | None, action: str, path: str, ctx: _RuleCtx
) -> None:
    """Check the informational errno name against the number that takes effect."""
    if value is None:
        return
    name = _str(value, path, ctx)
    code = getattr(errno_mod, name, None) if name.startswith("E") else None
    if not isinstance(code, int):
        _fail(f"unknown errno name {quote(name)}", path, ctx)
    number_field = "defaultErrnoRet" if ctx is None else "errnoRet"
    if action not in ERRNO_ACTIONS:
        _fail(f"{name} has no effect with {action}", path, ctx)
    effective = EPERM if number is None else number
    if code != effective:
        if number is None:
            _fail(
                f"{name} is only a label: without {number_field} the runtime returns EPERM; "
                f"set {number_field}: {code}",
                path,
                ctx,
            )
        _fail(f"{name} ({code}) disagrees with {number_field} {number}", path, ctx)


def _rule(value: object, index: int) -> Rule:
    path = f"syscalls[{index}]"
    if not isinstance(value, dict):
        raise ProfileFieldError(
            f"{path}: must be an object, not {_json_type(value)}", field=path, rule_index=index
        )
    # names first, so every later message can say which rule this is
    has_names = value.get("names") not in (None, [])
    has_name = value.get("name") not in (None, "")
    if has_names and has_name:
        _fail("name and names are both set; use one of them", f"{path}.name", (index, ()))
    if has_name:
        names: tuple[str, ...] = (_str(value["name"], f"{path}.name", (index, ())),)
    else:
        names = tuple(
            _str(n, f"{path}.names[{i}]", (index, ()))
            for i, n in enumerate(_list(value.get("names"), f"{path}.names", (index, ())))
        )
    rule = (index, names)
    _only_known(value, _RULE_FIELDS, path, "rule", rule)
    for i, n in enumerate(names):
        if not n:
            _fail("empty syscall name", f"{path}.names[{i}]", rule)
    if not names:
        _fail("no syscall names (names is missing or empty)", f"{path}.names", rule)
    if "action" not in value:
        _fail("action is missing", f"{path}.action", rule)
    action = _action(value["action"], f"{path}.action", rule)
    errno_ret = _opt_uint(value.get("errnoRet"), f"{path}.errnoRet", MAX_ERRNO_RET, rule)
    if errno_ret is not None and action not in ERRNO_ACTIONS:
        _fail(
            f"errnoRet {errno_ret} has no effect with {action}; it only applies to "
            "SCMP_ACT_ERRNO and SCMP_ACT_TRACE",
            f"{path}.errnoRet",
            rule,
        )
    _errno_name(value.get("errno"), errno_ret, action, f"{path}.errno", rule)
    args = tuple(
        _condition(a, f"{path}.args[{i}]", rule)
        for i, a in enumerate(_list(value.get("args"), f"{path}.args", rule))
    )
    return Rule(
        names=names,
        action=action,
        errno_ret=errno_ret,
        args=args,
        includes=_selector(value.get("includes"), f"{path}.includes", rule),
        excludes=_selector(value.get("excludes"), f"{path}.excludes", rule),
        comment=_opt_str(value.get("comment"), f"{path}.comment", rule),
        index=index,
    )


def _condition(value: object, path: str, rule: tuple[int, Sequence[str]]) -> Condition:
    if not isinstance(value, dict):
        _fail(f"must be an object, not {_json_type(value)}", path, rule)
    _only_known(value, _ARG_FIELDS, path, "args", rule)
    for required in ("index", "op"):
        if required not in value:
            _fail(f"{required} is missing", f"{path}.{required}", rule)
    index = _uint(value["index"], f"{path}.index", MAX_ARG_INDEX, rule)
    op = _str(value["op"], f"{path}.op", rule)
    if op not in OPS:
        _fail(f"unknown op {quote(op)} (known: {', '.join(OPS)})", f"{path}.op", rule)
    # Go leaves an absent uint64 at 0; so does the runtime
    val = _uint(value.get("value", 0), f"{path}.value", MAX_U64, rule)
    val2 = _uint(value.get("valueTwo", 0), f"{path}.valueTwo", MAX_U64, rule)
    return Condition(index=index, value=val, op=op, value_two=val2)


def _selector(value: object, path: str, rule: tuple[int, Sequence[str]]) -> Selector:
    if value is None:
        return Selector()
    if not isinstance(value, dict):
        _fail(f"must be an object, not {_json_type(value)}", path, rule)
    _only_known(value, _SELECTOR_FIELDS, path, path.rsplit(".", 1)[-1], rule)
    arches = []
    for i, a in enumerate(_list(value.get("arches"), f"{path}.arches", rule)):
        name = _str(a, f"{path}.arches[{i}]", rule)
        if name not in DOCKER_ARCHES:
            _fail(
                f"unknown architecture {quote(name)} (known: {', '.join(sorted(DOCKER_ARCHES))})",
                f"{path}.arches[{i}]",
                rule,
            )
        arches.append(name)
    caps = []
    for i, c in enumerate(_list(value.get("caps"), f"{path}.caps", rule)):
        name = _str(c, f"{path}.caps[{i}]", rule)
        if name.upper() not in CAPABILITIES:
            _fail(f"unknown capability {quote(name)}", f"{path}.caps[{i}]", rule)
        caps.append(name.upper())
    min_kernel = None
    if value.get("minKernel") not in (None, ""):
        min_kernel = _kernel(value["minKernel"], f"{path}.minKernel", rule)
    return Selector(tuple(arches), tuple(caps), min_kernel)


def _kernel(value: object, path: str, rule: tuple[int, Sequence[str]]) -> tuple[int, int]:
    text = _str(value, path, rule)
    parts = text.split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        _fail(f"{quote(text)} is not a kernel version of the form MAJOR.MINOR", path, rule)
    return int(parts[0]), int(parts[1])


# ---------------------------------------------------------------------------
# the node


def node_context(caps: frozenset[str] = DEFAULT_CAPABILITIES) -> NodeContext:
    """This node: architecture from ``platform.machine()``, kernel from ``uname``."""
    machine = platform.machine()
    arch = _MACHINES.get(machine)
    if arch is None and machine.startswith("mips"):
        little = sys.byteorder == "little"
        arch = ("mipsel" if little else "mips") + ("64" if "64" in machine else "")
    if arch is None:
        raise ValueError(f"unsupported machine {machine!r}: no seccomp architecture for it")
    return NodeContext(arch=arch, kernel=kernel_version(os.uname().release), caps=caps)


def kernel_version(release: str) -> tuple[int, int]:
    """``"6.1.0-18-amd64"`` → ``(6, 1)``."""
    nums: list[int] = []
    for part in release.split(".")[:2]:
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        nums.append(int(digits))
    if len(nums) != 2:
        raise ValueError(f"cannot read a kernel version from {release!r}")
    return nums[0], nums[1]


def _selected(rule: Rule, node: NodeContext) -> bool:
    # Docker's semantics: any excluded arch/cap or a new-enough kernel drops the
    # rule; every included cap must be present and the kernel new enough
    ex, inc = rule.excludes, rule.includes
    if ex.arches and node.arch in ex.arches:
        return False
    if ex.caps and any(c in node.caps for c in ex.caps):
        return False
    if ex.min_kernel is not None and node.kernel >= ex.min_kernel:
        return False
    if inc.arches and node.arch not in inc.arches:
        return False
    if inc.caps and not all(c in node.caps for c in inc.caps):
        return False
    return not (inc.min_kernel is not None and node.kernel < inc.min_kernel)


def for_node(profile: Profile, node: NodeContext) -> Profile:
    """The profile as this node's runtime would apply it: archMap and includes/excludes resolved."""
    if node.arch not in _BY_DOCKER:
        raise ValueError(f"unknown node architecture {node.arch!r}")
    caps = frozenset(c.upper() for c in node.caps)
    node = replace(node, caps=caps)
    architectures = profile.architectures
    if profile.arch_map:
        native = node.native_arch
        picked: list[str] = []
        for entry in profile.arch_map:
            if entry.architecture == native:
                for a in (entry.architecture, *entry.sub_architectures):
                    if a not in picked:
                        picked.append(a)
        # no entry for this node: like the runtimes, leave only the native architecture
        architectures = tuple(picked)
    rules = tuple(
        replace(r, includes=Selector(), excludes=Selector())
        for r in profile.syscalls
        if _selected(r, node)
    )
    return replace(profile, architectures=architectures, arch_map=(), syscalls=rules, selected=True)


# ---------------------------------------------------------------------------
# NRI


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


# ---------------------------------------------------------------------------
# normalisation and limits: what libseccomp is given is bounded before it runs

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
    default = _action_value(profile.default_action, profile.default_errno_ret)
    seen: dict[_RuleKey, set[str]] = {}
    kept: list[Rule] = []
    dropped: list[Rule] = []
    for rule in profile.syscalls:
        if _action_value(rule.action, rule.errno_ret) == default:
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
    """How many libseccomp rules one name of ``rule`` becomes (see _build)."""
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


def _check_dropped_names(
    dropped: Sequence[Rule], kept: Profile, unknown_syscalls: str
) -> tuple[list[str], list[str]]:
    """libseccomp's name check for rules normalisation dropped: refuse or (unknown names,
    warnings) for names no kept rule lists (those, compile_check reports)."""
    if not dropped:
        return [], []
    native = native_arch()
    token = _token(native)
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
            if _resolve(token, name) != _NR_SCMP_ERROR:
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


# ---------------------------------------------------------------------------
# libseccomp


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


# own handle with declared prototypes: pyseccomp leaves resolve_name_arch
# undeclared, and ctypes cannot pass an AUDIT_ARCH value above 2**31 as an int
_lib_path = ctypes.util.find_library("seccomp")
if _lib_path is None:  # pragma: no cover - pyseccomp has already failed the same way
    raise ImportError("libseccomp not found")
_lib = ctypes.CDLL(_lib_path)
_lib.seccomp_syscall_resolve_name_arch.argtypes = (ctypes.c_uint32, ctypes.c_char_p)
_lib.seccomp_syscall_resolve_name_arch.restype = ctypes.c_int
_lib.seccomp_version.argtypes = ()
_lib.seccomp_version.restype = ctypes.POINTER(_Version)
_NR_SCMP_ERROR = -1


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


def _resolve(token: int, name: str) -> int:
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
    token = _token(arch)
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
            if _resolve(token, name) >= 0:
                names.add(name)
    return tuple(sorted(names))


def _token(arch: str) -> int:
    info = ARCHES.get(arch)
    if info is None:
        raise CompileError(f"unknown architecture {quote(arch)}", arch=arch)
    if info.token is None:
        raise CompileError(
            f"architecture {arch} is not supported by libseccomp {libseccomp_version()}",
            arch=arch,
        )
    return info.token


def _action_value(action: str, errno_ret: int | None) -> int:
    base = ACTIONS[action]
    if action in ERRNO_ACTIONS:
        return base | ((EPERM if errno_ret is None else errno_ret) & 0xFFFF)
    return base


def action_of(action: str, errno_ret: int | None) -> tuple[str, int | None]:
    """The (action, errno) a rule has once applied: errno only for ERRNO/TRACE, EPERM if absent."""
    return describe_action(_action_value(action, errno_ret))


def describe_action(ret: int) -> tuple[str, int | None]:
    """A seccomp return value as (SCMP_ACT_… name, errno or None)."""
    full = ret & 0xFFFF0000
    data = ret & 0xFFFF
    names = {
        0x80000000: "SCMP_ACT_KILL_PROCESS",
        0x00000000: "SCMP_ACT_KILL_THREAD",
        0x00030000: "SCMP_ACT_TRAP",
        0x00050000: "SCMP_ACT_ERRNO",
        0x7FC00000: "SCMP_ACT_NOTIFY",
        0x7FF00000: "SCMP_ACT_TRACE",
        0x7FFC0000: "SCMP_ACT_LOG",
        0x7FFF0000: "SCMP_ACT_ALLOW",
    }
    name = names.get(full, f"unknown({ret:#x})")
    return name, (data if name in ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE") else None)


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
    default = _action_value(policy.default_action, default_errno)
    filt = pyseccomp.SyscallFilter(default)
    native = native_arch()
    arches = [native]
    for a in policy.architectures:
        token = _token(a)
        if a not in arches:
            arches.append(a)
            if not filt.exist_arch(token):
                filt.add_arch(token)
    built = _Built(filt, arches)
    native_token = _token(native)
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
            nr = _resolve(native_token, name)
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
        action = _action_value(sc.action, errno_ret)
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
        word = _M64 if ARCHES[arch].bits == 64 else _M32
        names: set[str] = set()
        conds: set[tuple[int, str, int, int]] = set()
        for sc in policy.syscalls:
            if sc.action not in ACTIONS:
                continue
            if _action_value(sc.action, _opt(sc, "errno_ret")) == default:
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
    unknown, warnings = _check_dropped_names(normal.dropped, selected, unknown_syscalls)
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


# ---------------------------------------------------------------------------
# what the compiled filter does: a classic-BPF interpreter over the export

#: an assignment of 32-bit words of seccomp_data's args (byte offset → value)
Probe = tuple[tuple[int, int], ...]
_M32 = 0xFFFFFFFF
_M64 = MAX_U64
_ARGS_OFFSET = 16
_MAX_PROBES = 256


_Code = tuple[tuple[int, int, int, int], ...]


class _Program:
    """One policy's exported filter, with the explorations done on it so far."""

    def __init__(self, code: _Code) -> None:
        self.code = code
        self._explored: dict[tuple[int, int], dict[Probe, int]] = {}

    def explore(self, nr: int, audit: int) -> dict[Probe, int]:
        key = (nr, audit)
        found = self._explored.get(key)
        if found is None:
            found = self._explored[key] = _explore(self.code, nr, audit)
        return found

    def run(self, nr: int, audit: int, probe: Probe) -> int:
        words = {0: nr & _M32, 4: audit}
        words.update(probe)
        ret, _, steps = _run(self.code, words)
        _work.done += steps
        return ret


@functools.lru_cache(maxsize=32)
def _program_of(policy_bytes: bytes) -> _Program:
    policy = nri_pb2.LinuxSeccomp.FromString(policy_bytes)
    bpf = _export(_build(policy, "skip", None).filt)
    return _Program(tuple(struct.iter_unpack("=HBBI", bpf)))


def clear_caches() -> None:
    """Forget compiled filters and what was learnt about them (not the syscall tables)."""
    _program_of.cache_clear()


def _program(policy: nri_pb2.LinuxSeccomp) -> _Program:
    return _program_of(policy.SerializeToString(deterministic=True))


def _run(prog: _Code, words: Mapping[int, int]) -> tuple[int, list[tuple[int, int]], int]:
    """Run the filter on seccomp_data given as 32-bit words; also return argument
    values worth trying next (the constants the filter compared argument words with)
    and how far the run went (jumps only go forward: a bound on the work done)."""
    a = x = 0
    mem = [0] * 16
    # the argument word A was loaded from, and the mask applied to it since
    src: int | None = None
    mask = _M32
    seen: list[tuple[int, int]] = []
    pc = 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        cls = code & 0x07
        if cls == 0x00:  # BPF_LD
            mode = code & 0xE0
            if mode == 0x20:  # ABS
                if k & 3 or k >= 64 or code & 0x18:
                    raise CompileError(f"BPF loads seccomp_data at {k} in a way the kernel refuses")
                a = words.get(k, 0)
                src, mask = (k, _M32) if k >= _ARGS_OFFSET else (None, _M32)
            elif mode == 0x00:  # IMM
                a, src = k, None
            elif mode == 0x60:  # MEM
                a, src = mem[k], None
            elif mode == 0x80:  # LEN
                a, src = 64, None
            else:
                raise CompileError(f"unsupported BPF load {code:#x}")
        elif cls == 0x01:  # BPF_LDX
            mode = code & 0xE0
            x = k if mode == 0x00 else mem[k] if mode == 0x60 else 64
        elif cls == 0x02:  # BPF_ST
            mem[k] = a
        elif cls == 0x03:  # BPF_STX
            mem[k] = x
        elif cls == 0x04:  # BPF_ALU
            op = code & 0xF0
            v = x if code & 0x08 else k
            if op == 0x50:
                a &= v
                mask &= v
            elif op == 0x00:
                a = (a + v) & _M32
            elif op == 0x10:
                a = (a - v) & _M32
            elif op == 0x20:
                a = (a * v) & _M32
            elif op == 0x30:
                a = a // v if v else 0
            elif op == 0x40:
                a |= v
            elif op == 0xA0:
                a ^= v
            elif op == 0x60:
                a = (a << v) & _M32 if v < 32 else 0
            elif op == 0x70:
                a = a >> v if v < 32 else 0
            elif op == 0x80:
                a = (-a) & _M32
            elif op == 0x90:
                a = a % v if v else 0
            else:
                raise CompileError(f"unsupported BPF ALU op {code:#x}")
        elif cls == 0x05:  # BPF_JMP
            op = code & 0xF0
            if op == 0x00:
                pc += k
                continue
            v = x if code & 0x08 else k
            if op == 0x10:
                taken = a == v
            elif op == 0x20:
                taken = a > v
            elif op == 0x30:
                taken = a >= v
            elif op == 0x40:
                taken = (a & v) != 0
            else:
                raise CompileError(f"unsupported BPF jump {code:#x}")
            if src is not None:
                cands: tuple[int, ...]
                if op == 0x40:
                    cands = (v, 0, v ^ _M32)
                else:
                    # the boundary itself and its neighbours decide every outcome; with a
                    # mask, also a value that matches with every unmasked bit set
                    cands = (v, (v + 1) & _M32, (v - 1) & _M32, v | (~mask & _M32))
                seen.extend((src, c) for c in cands)
            pc += jt if taken else jf
        elif cls == 0x06:  # BPF_RET
            return (a if (code & 0x18) == 0x10 else k), seen, pc
        else:  # BPF_MISC
            if (code & 0xF8) == 0x00:
                x = a
            else:
                a, src = x, None


class _Work(threading.local):
    """Instructions this thread's interpreter ran so far (a bound, see _run)."""

    done = 0


_work = _Work()
#: what one action_table may cost: ten times Debian's default profile on its
#: busiest architecture, so that a hostile profile cannot stall the plugin
ANALYSIS_BUDGET = 5_000_000


class AnalysisTooCostly(CompileError):
    """The filter is too complex to analyse within ANALYSIS_BUDGET."""


def _explore(prog: _Code, nr: int, audit: int) -> dict[Probe, int]:
    base = {0: nr & _M32, 4: audit}
    results: dict[Probe, int] = {}
    todo: list[Probe] = [()]
    while todo and len(results) < _MAX_PROBES:
        probe = todo.pop()
        if probe in results:
            continue
        words = dict(base)
        words.update(probe)
        ret, seen, steps = _run(prog, words)
        _work.done += steps
        results[probe] = ret
        assigned = dict(probe)
        for off, value in seen:
            if assigned.get(off, 0) == value:
                continue
            nxt = dict(assigned)
            nxt[off] = value
            cand = tuple(sorted((o, v) for o, v in nxt.items() if v))
            if cand not in results:
                todo.append(cand)
    return results


def word_of(arch: str, offset: int) -> tuple[int, bool]:
    """A seccomp_data offset of ``arch`` as (argument index, is the high 32 bits)."""
    info = ARCHES[arch]
    assert info.audit is not None
    index, word = divmod(offset - _ARGS_OFFSET, 8)
    little = bool(info.audit & 0x40000000)
    return index, (word == 4) == little


def probe_args(arch: str, probe: Probe) -> dict[int, int]:
    """A probe as argument values: index → 64-bit value (zero arguments left out)."""
    args: dict[int, int] = {}
    for off, value in probe:
        index, high = word_of(arch, off)
        args[index] = args.get(index, 0) | (value << 32 if high else value)
    return {i: v for i, v in sorted(args.items()) if v}


def probe_for(arch: str, args: Mapping[int, int]) -> Probe:
    """Argument values (index → 64-bit value) as a probe for ``syscall_outcomes(extra=…)``."""
    info = ARCHES[arch]
    assert info.audit is not None
    little = bool(info.audit & 0x40000000)
    words: list[tuple[int, int]] = []
    for index, value in args.items():
        low, high = _ARGS_OFFSET + 8 * index, _ARGS_OFFSET + 8 * index + 4
        if not little:
            low, high = high, low
        words += [(low, value & _M32), (high, value >> 32)]
    return tuple(sorted((o, v) for o, v in words if v))


def action_for(
    policy: nri_pb2.LinuxSeccomp, arch: str, name: str, args: Mapping[int, int] | None = None
) -> tuple[str, int | None]:
    """What the filter does for one call: ``name`` on ``arch`` with these argument values."""
    nr, audit = _syscall_on(policy, arch, name)
    return describe_action(_program(policy).run(nr, audit, probe_for(arch, args or {})))


def _probe_key(name: str, arch: str, probe: Probe) -> str:
    shown = ", ".join(f"a{i}={v:#x}" for i, v in probe_args(arch, probe).items())
    return f"{name}({shown})" if shown else name


ActionTable = dict[str, tuple[str, int | None]]


def _filter_arches(policy: nri_pb2.LinuxSeccomp) -> list[str]:
    arches = [native_arch()]
    arches.extend(a for a in policy.architectures if a not in arches)
    return arches


def policy_arches(policy: nri_pb2.LinuxSeccomp) -> tuple[str, ...]:
    """Architectures the runtime's filter covers: the native one plus the policy's."""
    return tuple(_filter_arches(policy))


def syscall_outcomes(
    policy: nri_pb2.LinuxSeccomp,
    arch: str,
    name: str,
    *,
    probe_with: Iterable[nri_pb2.LinuxSeccomp] = (),
    extra: Iterable[Probe] = (),
) -> dict[Probe, tuple[str, int | None]]:
    """What the filter does for ``name`` on ``arch``, per argument probe.

    Probes are the argument values the filter (and the ``probe_with`` filters)
    distinguish, found by following their comparisons, plus ``extra``.
    """
    nr, audit = _syscall_on(policy, arch, name)
    raw = _outcomes(_program(policy), [_program(p) for p in probe_with], nr, audit, extra)
    return {probe: describe_action(ret) for probe, ret in raw.items()}


def _syscall_on(policy: nri_pb2.LinuxSeccomp, arch: str, name: str) -> tuple[int, int]:
    if arch not in _filter_arches(policy):
        raise ValueError(f"{arch} is not an architecture of the policy")
    info = ARCHES[arch]
    nr = _resolve(_token(arch), name)
    if nr < 0:
        raise ValueError(f"{name} is not a syscall of {arch} for libseccomp")
    assert info.audit is not None
    return nr, info.audit


def _outcomes(
    prog: _Program, others: Sequence[_Program], nr: int, audit: int, extra: Iterable[Probe] = ()
) -> dict[Probe, int]:
    results = dict(prog.explore(nr, audit))
    for probe in itertools.chain(extra, *(o.explore(nr, audit) for o in others)):
        if probe not in results:
            results[probe] = prog.run(nr, audit, probe)
    return results


def action_table(
    policy: nri_pb2.LinuxSeccomp,
    arch: str,
    *,
    probe_with: Iterable[nri_pb2.LinuxSeccomp] = (),
) -> ActionTable:
    """What libseccomp's filter for ``policy`` does, for every syscall it knows on ``arch``.

    Keys are syscall names for the call with all arguments zero, and
    ``name(a0=0x10, a2=0x9)`` for argument values the filter distinguishes
    (found by following its comparisons). Values are (SCMP_ACT_… name, errno or
    None). Tables of two policies are only comparable on the same probes:
    pass the other policy in ``probe_with`` (then both tables have the same keys).
    Names libseccomp does not know are skipped as the runtime skips them.
    """
    if arch not in _filter_arches(policy):
        raise ValueError(f"{arch} is not an architecture of the policy")
    info = ARCHES[arch]
    token = _token(arch)
    assert info.audit is not None
    prog = _program(policy)
    others = [_program(p) for p in probe_with]
    table: ActionTable = {}
    start = _work.done
    for name in known_syscalls(arch):
        nr = _resolve(token, name)
        for probe, ret in _outcomes(prog, others, nr, info.audit).items():
            table[_probe_key(name, arch, probe)] = describe_action(ret)
        if _work.done - start > ANALYSIS_BUDGET:
            raise AnalysisTooCostly(
                f"the filter for {arch} is too complex to analyse (over {ANALYSIS_BUDGET} "
                f"BPF instructions interpreted by {name})",
                arch=arch,
            )
    return table
