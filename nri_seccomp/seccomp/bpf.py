"""What the compiled filter does: a classic-BPF interpreter over libseccomp's export.

:func:`action_table` answers "what would libseccomp's filter do for syscall S on
architecture A" by running the exported BPF in a small interpreter. It follows
the filter's own comparisons to choose argument values, so conditional rules
(and libseccomp's own rewrites, such as the socketcall multiplexing on x86) are
covered without modelling libseccomp's rule merging. ``compat`` uses it to prove
that a rewritten policy behaves as the original.

The interpreter counts the instructions it runs: one table may cost at most
``ANALYSIS_BUDGET``, so a filter crafted to be expensive to explore is refused
(:class:`AnalysisTooCostly`) rather than stalling the plugin.
"""

from __future__ import annotations

import functools
import itertools
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from nri_seccomp.nri.pb import nri_pb2
from nri_seccomp.seccomp.libseccomp import (
    arch_token,
    export_filter,
    known_syscalls,
    policy_arches,
    syscall_number,
)
from nri_seccomp.seccomp.model import CompileError
from nri_seccomp.seccomp.vocabulary import ARCHES, describe_action

#: an assignment of 32-bit words of seccomp_data's args (byte offset → value)
Probe = tuple[tuple[int, int], ...]
_M32 = 0xFFFFFFFF
_ARGS_OFFSET = 16
_MAX_PROBES = 256


_Code = tuple[tuple[int, int, int, int], ...]


class _Paused(NamedTuple):
    """The interpreter's state just before the filter first loads an argument word."""

    pc: int
    a: int
    x: int
    mem: tuple[int, ...]


class _Program:
    """One policy's exported filter, with the explorations done on it so far."""

    def __init__(self, code: _Code) -> None:
        self.code = code
        self._explored: dict[tuple[int, int], dict[Probe, int]] = {}
        self._entries: dict[tuple[int, int], int | _Paused] = {}

    def entry(self, nr: int, audit: int) -> int | _Paused:
        """Where every run for this syscall gets before it looks at an argument (what it
        returns, if it never does): that part depends on nothing else, so it is run once."""
        key = (nr, audit)
        found = self._entries.get(key)
        if found is None:
            found, _, steps = _run(self.code, {0: nr & _M32, 4: audit}, pause=True)
            _work.done += steps
            self._entries[key] = found
        return found

    def explore(self, nr: int, audit: int) -> dict[Probe, int]:
        key = (nr, audit)
        found = self._explored.get(key)
        if found is None:
            found = self._explored[key] = _explore(self, nr, audit)
        return found

    def run(self, nr: int, audit: int, probe: Probe) -> int:
        return self.run_seen(nr, audit, probe)[0]

    def run_seen(self, nr: int, audit: int, probe: Probe) -> tuple[int, list[tuple[int, int]]]:
        """What the filter returns for these argument words, and the argument values it
        compared (see _run)."""
        start = self.entry(nr, audit)
        if isinstance(start, int):
            return start, []
        words = {0: nr & _M32, 4: audit}
        words.update(probe)
        ret, seen, steps = _run(self.code, words, start)
        _work.done += steps
        assert isinstance(ret, int)
        return ret, seen


@functools.lru_cache(maxsize=32)
def _program_of(policy_bytes: bytes) -> _Program:
    policy = nri_pb2.LinuxSeccomp.FromString(policy_bytes)
    bpf = export_filter(policy)
    return _Program(tuple(struct.iter_unpack("=HBBI", bpf)))


def clear_caches() -> None:
    """Forget compiled filters and what was learnt about them (not the syscall tables)."""
    _program_of.cache_clear()


def _program(policy: nri_pb2.LinuxSeccomp) -> _Program:
    return _program_of(policy.SerializeToString(deterministic=True))


def _run(
    prog: _Code,
    words: Mapping[int, int],
    start: _Paused | None = None,
    *,
    pause: bool = False,
) -> tuple[int | _Paused, list[tuple[int, int]], int]:
    """Run the filter on seccomp_data given as 32-bit words; also return argument
    values worth trying next (the constants the filter compared argument words with)
    and how far the run went (jumps only go forward: a bound on the work done).

    From ``start`` if given; with ``pause``, stop before the first load of an argument
    word and return the state there instead of an action."""
    if start is None:
        a = x = pc = 0
        mem = [0] * 16
    else:
        pc, a, x, mem = start.pc, start.a, start.x, list(start.mem)
    first = pc
    # the argument word A was loaded from, and the mask applied to it since
    src: int | None = None
    mask = _M32
    seen: list[tuple[int, int]] = []
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == 0x15 and src is None:
            # JEQ K on the syscall number or architecture: most of what a filter runs
            pc += jt if a == k else jf
            continue
        cls = code & 0x07
        if cls == 0x00:  # BPF_LD
            mode = code & 0xE0
            if mode == 0x20:  # ABS
                if k & 3 or k >= 64 or code & 0x18:
                    raise CompileError(f"BPF loads seccomp_data at {k} in a way the kernel refuses")
                if pause and k >= _ARGS_OFFSET:
                    return _Paused(pc - 1, a, x, tuple(mem)), seen, pc - 1 - first
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
            return (a if (code & 0x18) == 0x10 else k), seen, pc - first
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


def _explore(prog: _Program, nr: int, audit: int) -> dict[Probe, int]:
    results: dict[Probe, int] = {}
    todo: list[Probe] = [()]
    while todo and len(results) < _MAX_PROBES:
        probe = todo.pop()
        if probe in results:
            continue
        ret, seen = prog.run_seen(nr, audit, probe)
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
    if arch not in policy_arches(policy):
        raise ValueError(f"{arch} is not an architecture of the policy")
    info = ARCHES[arch]
    nr = syscall_number(arch_token(arch), name)
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
    extra: Mapping[str, Iterable[Probe]] | None = None,
) -> ActionTable:
    """What libseccomp's filter for ``policy`` does, for every syscall it knows on ``arch``.

    Keys are syscall names for the call with all arguments zero, and
    ``name(a0=0x10, a2=0x9)`` for argument values the filter distinguishes
    (found by following its comparisons). Values are (SCMP_ACT_… name, errno or
    None). Tables of two policies are only comparable on the same probes:
    pass the other policy in ``probe_with`` (then both tables have the same keys).
    ``extra`` adds probes of its own per syscall name (the same for both tables).
    Names libseccomp does not know are skipped as the runtime skips them.
    """
    if arch not in policy_arches(policy):
        raise ValueError(f"{arch} is not an architecture of the policy")
    info = ARCHES[arch]
    token = arch_token(arch)
    assert info.audit is not None
    prog = _program(policy)
    others = [_program(p) for p in probe_with]
    table: ActionTable = {}
    start = _work.done
    for name in known_syscalls(arch):
        nr = syscall_number(token, name)
        more = extra.get(name, ()) if extra else ()
        for probe, ret in _outcomes(prog, others, nr, info.audit, more).items():
            table[_probe_key(name, arch, probe)] = describe_action(ret)
        if _work.done - start > ANALYSIS_BUDGET:
            raise AnalysisTooCostly(
                f"the filter for {arch} is too complex to analyse (over {ANALYSIS_BUDGET} "
                f"BPF instructions interpreted by {name})",
                arch=arch,
            )
    return table
