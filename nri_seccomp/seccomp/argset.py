"""Sets of values of one syscall argument, and the seccomp conditions that match them.

Pure functions over inclusive ranges ``(lo, hi)`` of unsigned ``bits``-wide values
(32 or 64). ``compat`` uses them to write, as explicit rules, the calls of a syscall
that reach a profile's default action when the runtime drops ``default_errno``.

One rule holds at most one condition per argument (runc turns several into an OR),
so a set becomes one rule per condition, each condition a single comparison:

* a range starting at 0 is ``SCMP_CMP_LE hi``; one ending at the top is
  ``SCMP_CMP_GT lo-1``; a single value is ``SCMP_CMP_EQ``;
* any other range is a union of disjoint aligned power-of-two ("prefix") blocks,
  each ``SCMP_CMP_MASKED_EQ`` (``arg & mask == value``): at most two per bit.

On a 32-bit architecture (x86, x32, arm, the MIPS o32/n32 ABIs) libseccomp
compares only the low 32 bits of the argument with the low 32 bits of each
operand: ``MASKED_EQ(0xffffffff00000000, 0x100000000)`` becomes ``arg & 0 == 0``,
true for every call, and ``GE 0x100000000`` becomes ``GE 0``. :func:`truncated`
models that, so a condition written for a 64-bit range can be checked to do no
harm there; ``GT 0xffffffff`` (the upper half of a 64-bit argument) becomes a
comparison no 32-bit value passes, which is why the top range is written with GT.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Range = tuple[int, int]
#: (op, value, valueTwo) as the runtime-spec writes a condition on one argument
Cond = tuple[str, int, int]

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF


def top(bits: int) -> int:
    """The largest value of a ``bits``-wide argument."""
    if bits not in (32, 64):
        raise ValueError(f"arguments are 32 or 64 bits wide, not {bits}")
    return (1 << bits) - 1


def normalise(ranges: Iterable[Range], bits: int = 64) -> list[Range]:
    """Sorted, merged (overlapping or adjacent ranges joined), checked to fit ``bits``."""
    hi_max = top(bits)
    merged: list[Range] = []
    for lo, hi in sorted(ranges):
        if not 0 <= lo <= hi <= hi_max:
            raise ValueError(f"({lo:#x}, {hi:#x}) is not a range of {bits}-bit values")
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def of_values(values: Iterable[int], bits: int = 64) -> list[Range]:
    return normalise(((v, v) for v in values), bits)


def complement(ranges: Iterable[Range], bits: int = 64) -> list[Range]:
    """Every ``bits``-wide value outside ``ranges``."""
    out: list[Range] = []
    nxt = 0
    for lo, hi in normalise(ranges, bits):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= top(bits):
        out.append((nxt, top(bits)))
    return out


def intersect(ranges: Iterable[Range], lo: int, hi: int) -> list[Range]:
    """The part of (normalised) ``ranges`` within [lo, hi]."""
    return [(max(a, lo), min(b, hi)) for a, b in ranges if a <= hi and b >= lo]


def contains(ranges: Sequence[Range], value: int) -> bool:
    return any(lo <= value <= hi for lo, hi in ranges)


def prefix_blocks(lo: int, hi: int, bits: int = 64) -> list[tuple[int, int]]:
    """[lo, hi] as the fewest disjoint aligned power-of-two blocks, as (mask, value).

    A block of size 2**k starting at a multiple of 2**k is the values ``x`` with
    ``x & mask == value`` where mask clears the low k bits.
    """
    full = top(bits)
    if not 0 <= lo <= hi <= full:
        raise ValueError(f"({lo:#x}, {hi:#x}) is not a range of {bits}-bit values")
    out: list[tuple[int, int]] = []
    while lo <= hi:
        size = lo & -lo or 1 << bits
        while lo + size - 1 > hi:
            size >>= 1
        out.append((full & ~(size - 1), lo))
        lo += size
    return out


def block_range(mask: int, value: int, bits: int = 64) -> Range:
    """The values of a prefix block (``mask`` must clear only low bits)."""
    free = top(bits) & ~mask
    if free & (free + 1) or value & free:
        raise ValueError(f"mask {mask:#x} with value {value:#x} is not a prefix block")
    return value, value | free


def _range_conditions(lo: int, hi: int, bits: int) -> list[list[Cond]]:
    """Ways to write [lo, hi] as conditions, shortest first."""
    ways: list[list[Cond]] = []
    if lo == hi:
        ways.append([("SCMP_CMP_EQ", lo, 0)])
    elif hi == top(bits) and lo > 0:
        ways.append([("SCMP_CMP_GT", lo - 1, 0)])
    elif lo == 0 and hi < top(bits):
        ways.append([("SCMP_CMP_LE", hi, 0)])
    blocks = [
        ("SCMP_CMP_EQ", value, 0) if mask == top(bits) else ("SCMP_CMP_MASKED_EQ", mask, value)
        for mask, value in prefix_blocks(lo, hi, bits)
    ]
    if not ways or len(blocks) < len(ways[0]):
        ways.insert(0, blocks)
    elif blocks != ways[0]:
        ways.append(blocks)
    return ways


def conditions(ranges: Iterable[Range], bits: int = 64) -> list[Cond]:
    """One condition per rule, together matching exactly ``ranges`` of a ``bits``-wide argument."""
    out: list[Cond] = []
    for lo, hi in normalise(ranges, bits):
        out.extend(_range_conditions(lo, hi, bits)[0])
    return out


def matched(cond: Cond, bits: int = 64) -> list[Range]:
    """The ``bits``-wide values a condition matches (MASKED_EQ: prefix masks only)."""
    op, value, value_two = cond
    full = top(bits)
    if op == "SCMP_CMP_EQ":
        return [(value, value)] if value <= full else []
    if op == "SCMP_CMP_NE":
        return complement([(value, value)], bits) if value <= full else [(0, full)]
    if op == "SCMP_CMP_LT":
        return [(0, min(value, full + 1) - 1)] if value > 0 else []
    if op == "SCMP_CMP_LE":
        return [(0, min(value, full))]
    if op == "SCMP_CMP_GT":
        return [(value + 1, full)] if value < full else []
    if op == "SCMP_CMP_GE":
        return [(value, full)] if value <= full else []
    if op == "SCMP_CMP_MASKED_EQ":
        mask, want = value & full, value_two & full
        if want & ~mask:
            return []
        return [block_range(mask, want, bits)]
    raise ValueError(f"unknown comparison {op}")


def truncated(cond: Cond) -> Cond:
    """What libseccomp compares on a 32-bit architecture: the low 32 bits of each operand."""
    op, value, value_two = cond
    return op, value & M32, value_two & M32


def encode(ranges: Iterable[Range], narrow: Sequence[Range] | None = None) -> list[Cond] | None:
    """Conditions matching exactly ``ranges`` of a 64-bit argument, one rule each.

    With ``narrow`` (the set wanted on the policy's 32-bit architectures, which
    must be ``ranges``' part below 2**32), the conditions must also match exactly
    ``narrow`` once :func:`truncated`: for each range the shortest way is taken
    whose truncation stays within ``narrow``. None if a range has no such way.
    """
    wanted = normalise(ranges, 64)
    out: list[Cond] = []
    if narrow is not None:
        narrow = normalise(narrow, 32)
        if narrow != intersect(wanted, 0, M32):
            raise ValueError("the 32-bit set must be the 64-bit set's part below 2**32")
    for lo, hi in wanted:
        ways = _range_conditions(lo, hi, 64)
        if narrow is not None:
            ways = [w for w in ways if _keeps(w, lo, hi, narrow)]
            if not ways:
                return None
        out.extend(ways[0])
    return out


def _keeps(way: list[Cond], lo: int, hi: int, narrow: list[Range]) -> bool:
    """Truncated to 32 bits, ``way`` matches [lo, hi]'s low part and nothing outside narrow."""
    seen = normalise(r for c in way for r in matched(truncated(c), 32))
    inside = all(any(a <= lo2 and hi2 <= b for a, b in narrow) for lo2, hi2 in seen)
    needed = intersect([(lo, hi)], 0, M32)
    covered = all(any(a <= lo2 and hi2 <= b for a, b in seen) for lo2, hi2 in needed)
    return inside and covered


def boundaries(cond: Cond, bits: int = 64) -> list[int]:
    """The lowest and highest values a condition matches and the values next to them
    (for a MASKED_EQ with any mask: its lowest and highest matching values)."""
    full = top(bits)
    op, value, value_two = cond
    if op == "SCMP_CMP_MASKED_EQ":
        mask, want = value & full, value_two & full
        ends = [] if want & ~mask else [(want, want | (full & ~mask))]
    else:
        ends = matched(cond, bits)
    out: set[int] = set()
    for lo, hi in ends:
        out.update(v for v in (lo - 1, lo, lo + 1, hi - 1, hi, hi + 1) if 0 <= v <= full)
    return sorted(out)
