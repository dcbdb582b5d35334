"""What a profile is once read: frozen dataclasses, and the errors every stage raises.

A :class:`Profile` holds its rules (:class:`Rule`), each with its position in the
profile's ``syscalls`` list, kept through every stage so that messages point into
the profile the user wrote. :class:`NodeContext` is what ``includes``/``excludes``
and ``archMap`` are evaluated against. :class:`ProfileError` (and its
subclasses) carries the JSON path, rule index, names, syscall and architecture at
fault; the worker rebuilds it from these attributes across a process boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nri_seccomp.errors import NriSeccompError
from nri_seccomp.seccomp.vocabulary import BY_DOCKER, DEFAULT_CAPABILITIES

# ---------------------------------------------------------------------------
# errors


class ProfileError(ValueError, NriSeccompError):
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
        return BY_DOCKER[self.arch].scmp
