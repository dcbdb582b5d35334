"""Sets of argument values as seccomp conditions (nri_seccomp.seccomp.argset): pure functions,
checked by tables and by properties over random sets and the edges of the value space."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nri_seccomp.seccomp import argset as A

from .examples import examples

M32, M64 = A.M32, A.M64
#: Debian's (and Docker's) personality rules: the values allowed, the rest gets the default
PERSONALITY = [0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF]


def in_block(x: int, block: tuple[int, int]) -> bool:
    mask, value = block
    return x & mask == value


def in_cond(x: int, cond: A.Cond, bits: int = 64) -> bool:
    """The condition's meaning, written independently of argset.matched."""
    op, value, two = cond
    x &= A.top(bits)
    return {
        "SCMP_CMP_EQ": lambda: x == value,
        "SCMP_CMP_NE": lambda: x != value,
        "SCMP_CMP_LT": lambda: x < value,
        "SCMP_CMP_LE": lambda: x <= value,
        "SCMP_CMP_GT": lambda: x > value,
        "SCMP_CMP_GE": lambda: x >= value,
        "SCMP_CMP_MASKED_EQ": lambda: x & value == two,
    }[op]()


def neighbours(values: list[int], bits: int = 64) -> set[int]:
    full = A.top(bits)
    return {v + d for v in values for d in (-1, 0, 1) if 0 <= v + d <= full} | {0, full}


@pytest.mark.parametrize(("lo", "hi", "bits", "blocks"), [
    (5, 5, 64, [(M64, 5)]),
    (0, M64, 64, [(0, 0)]),
    (0, M32, 32, [(0, 0)]),
    (4, 7, 64, [(M64 & ~3, 4)]),
    (1, 7, 64, [(M64, 1), (M64 & ~1, 2), (M64 & ~3, 4)]),
    (3, 8, 32, [(M32, 3), (M32 & ~3, 4), (M32, 8)]),
    (1 << 32, (1 << 33) - 1, 64, [(M64 & ~M32, 1 << 32)]),
    (1 << 63, M64, 64, [(1 << 63, 1 << 63)]),
])
def test_prefix_blocks(lo: int, hi: int, bits: int, blocks: list[tuple[int, int]]) -> None:
    assert A.prefix_blocks(lo, hi, bits) == blocks
    for block in blocks:
        assert A.block_range(*block, bits=bits)[0] >= lo


def test_the_upper_half_takes_one_block_per_bit() -> None:
    # [2**32, 2**64): 32 blocks [2**k, 2**(k+1)); GT 0xffffffff says it in one
    assert len(A.prefix_blocks(1 << 32, M64)) == 32
    assert A.conditions([(1 << 32, M64)]) == [("SCMP_CMP_GT", M32, 0)]


@pytest.mark.parametrize(("ranges", "bits", "expected"), [
    ([], 64, [(0, M64)]),
    ([(0, M64)], 64, []),
    ([(0, 0)], 32, [(1, M32)]),
    ([(M32, M32)], 32, [(0, M32 - 1)]),
    ([(3, 4), (5, 9), (20, 20)], 64, [(0, 2), (10, 19), (21, M64)]),
    ([(5, 9), (3, 6)], 64, [(0, 2), (10, M64)]),
])
def test_complement(ranges: list[A.Range], bits: int, expected: list[A.Range]) -> None:
    assert A.complement(ranges, bits) == expected
    assert A.complement(expected, bits) == A.normalise(ranges, bits)


@pytest.mark.parametrize(("ranges", "bits", "expected"), [
    ([(5, 5)], 64, [("SCMP_CMP_EQ", 5, 0)]),
    ([(0, 99)], 64, [("SCMP_CMP_LE", 99, 0)]),
    ([(109, M64)], 64, [("SCMP_CMP_GT", 108, 0)]),
    ([(109, M32)], 32, [("SCMP_CMP_GT", 108, 0)]),
    ([(0, M64)], 64, [("SCMP_CMP_MASKED_EQ", 0, 0)]),
    # a range in the middle: prefix blocks
    ([(101, 107)], 32, [("SCMP_CMP_EQ", 101, 0), ("SCMP_CMP_MASKED_EQ", M32 - 1, 102),
                        ("SCMP_CMP_MASKED_EQ", M32 - 3, 104)]),
    ([(101, 107)], 64, [("SCMP_CMP_EQ", 101, 0), ("SCMP_CMP_MASKED_EQ", M64 - 1, 102),
                        ("SCMP_CMP_MASKED_EQ", M64 - 3, 104)]),
    # an aligned top range is one block, but GT is as short and safe on 32-bit arches
    ([(1 << 63, M64)], 64, [("SCMP_CMP_GT", (1 << 63) - 1, 0)]),
])
def test_conditions(ranges: list[A.Range], bits: int, expected: list[A.Cond]) -> None:
    assert A.conditions(ranges, bits) == expected


def test_personality_complement() -> None:
    allowed = A.of_values(PERSONALITY)
    region = A.complement(allowed)
    assert region == [(1, 7), (9, 0x1FFFF), (0x20001, 0x20007), (0x20009, 0xFFFFFFFE),
                      (1 << 32, M64)]
    # the count: 114 MASKED_EQ blocks; GT for the upper half makes it 83 rules
    assert sum(len(A.prefix_blocks(lo, hi)) for lo, hi in region) == 114
    conds = A.encode(region, A.complement(allowed, 32))
    assert conds is not None and len(conds) == 83
    assert conds[-1] == ("SCMP_CMP_GT", M32, 0)
    probes = neighbours(PERSONALITY) | {0x7, 0x9, 0x1FFFF, 0x20001, 0xFFFFFFFE, 1 << 32, M64}
    for x in probes:
        assert sum(in_cond(x, c) for c in conds) == (x not in PERSONALITY), hex(x)
        # what libseccomp compares on x86 and x32: the low 32 bits of both sides
        low = x & M32
        hits = sum(in_cond(low, A.truncated(c), 32) for c in conds)
        assert bool(hits) == (low not in PERSONALITY), hex(x)


@pytest.mark.parametrize(("cond", "truncated_matches"), [
    # libseccomp 2.5.4 on x86, measured: the upper-half block matches every call there
    (("SCMP_CMP_MASKED_EQ", M64 & ~M32, 1 << 32), [(0, M32)]),
    (("SCMP_CMP_GE", 1 << 32, 0), [(0, M32)]),
    # and GT 0xffffffff none: the right meaning, as a 32-bit argument never exceeds it
    (("SCMP_CMP_GT", M32, 0), []),
    (("SCMP_CMP_EQ", (1 << 32) | 5, 0), [(5, 5)]),
    (("SCMP_CMP_MASKED_EQ", M64 - 3, 104), [(104, 107)]),
])
def test_truncation(cond: A.Cond, truncated_matches: list[A.Range]) -> None:
    assert A.matched(A.truncated(cond), 32) == truncated_matches


def test_encode_refuses_what_32_bit_architectures_would_misread() -> None:
    # allowed: 0 and 2**40. Every block covering 2**32 (low word 0) reads, on x86 where
    # libseccomp compares the low word only, as covering 0, which is allowed there
    region = A.complement([(0, 0), (1 << 40, 1 << 40)])
    assert A.encode(region, A.complement([(0, 0)], 32)) is None
    # without a 32-bit architecture it is only blocks
    assert A.encode(region) == A.conditions(region)
    # the 32-bit set must be what the 64-bit one is below 2**32
    with pytest.raises(ValueError, match=r"below 2\*\*32"):
        A.encode(region, A.complement([(0, 0), (5, 5)], 32))


def test_boundaries() -> None:
    assert A.boundaries(("SCMP_CMP_MASKED_EQ", M64 - 3, 104)) == [103, 104, 105, 106, 107, 108]
    assert A.boundaries(("SCMP_CMP_GT", M32, 0)) == [M32, 1 << 32, (1 << 32) + 1, M64 - 1, M64]
    assert A.boundaries(("SCMP_CMP_EQ", 0, 0), 32) == [0, 1]
    # any mask (Docker's clone rule): the lowest and highest matching value
    assert A.boundaries(("SCMP_CMP_MASKED_EQ", 0x7E020000, 0), 32)[-2:] == [
        M32 & ~0x7E020000, (M32 & ~0x7E020000) + 1]


# ---- properties ----

values64 = st.one_of(
    st.integers(0, M64),
    # the edges: near 0, 2**32 and 2**64, and powers of two
    st.integers(0, 16),
    st.integers(M32 - 8, M32 + 8),
    st.integers(M64 - 16, M64),
    st.builds(lambda k, d: max(0, min(M64, (1 << k) + d)), st.integers(0, 64), st.integers(-2, 2)),
)


@st.composite
def allowed_ranges(draw: st.DrawFn) -> list[A.Range]:
    ends = draw(st.lists(values64, max_size=12))
    pairs = [(min(a, b), max(a, b)) for a, b in zip(ends[::2], ends[1::2], strict=False)]
    singles = draw(st.lists(values64, max_size=4))
    return A.normalise(pairs + [(v, v) for v in singles])


def probes_for(ranges: list[A.Range], extra: list[int], bits: int = 64) -> set[int]:
    return neighbours([v for r in ranges for v in r] + extra, bits)


@settings(max_examples=examples(300), deadline=None)
@given(allowed=allowed_ranges(), extra=st.lists(values64, max_size=8))
def test_blocks_cover_exactly_the_complement(allowed: list[A.Range], extra: list[int]) -> None:
    """Every 64-bit value is in exactly one block iff it is outside the allowed set."""
    region = A.complement(allowed)
    blocks = [b for lo, hi in region for b in A.prefix_blocks(lo, hi)]
    assert len(blocks) <= 2 * 64 * max(1, len(region))
    for x in probes_for(allowed, extra) | {b[1] for b in blocks} | {
            b[1] | (M64 & ~b[0]) for b in blocks}:
        inside = A.contains(allowed, x)
        assert sum(in_block(x, b) for b in blocks) == (0 if inside else 1), hex(x)


@settings(max_examples=examples(300), deadline=None)
@given(allowed=allowed_ranges(), extra=st.lists(values64, max_size=8))
def test_conditions_match_exactly_the_complement(allowed: list[A.Range], extra: list[int]
                                                 ) -> None:
    region = A.complement(allowed)
    conds = A.conditions(region)
    edges = {v for c in conds for v in A.boundaries(c)}
    for x in probes_for(allowed, extra) | edges:
        hits = sum(in_cond(x, c) for c in conds)
        assert hits == (0 if A.contains(allowed, x) else 1), hex(x)


@settings(max_examples=examples(300), deadline=None)
@given(allowed=allowed_ranges(), extra=st.lists(values64, max_size=8))
def test_encoded_for_32_bit_architectures_too(allowed: list[A.Range], extra: list[int]) -> None:
    """With 32-bit architectures in the policy, the conditions must mean the 64-bit set
    and, as libseccomp truncates them, its low part: or encode must say it cannot."""
    region = A.complement(allowed)
    narrow = A.intersect(region, 0, M32)
    conds = A.encode(region, narrow)
    if conds is None:
        return
    edges = {v for c in conds for v in A.boundaries(c)}
    for x in probes_for(allowed, extra) | edges:
        assert sum(in_cond(x, c) for c in conds) == (not A.contains(allowed, x)), hex(x)
    for x in probes_for(narrow, [e & M32 for e in extra] + [e & M32 for e in edges], 32):
        hit = any(in_cond(x, A.truncated(c), 32) for c in conds)
        assert hit == A.contains(narrow, x), hex(x)


@settings(max_examples=examples(200), deadline=None)
@given(allowed=st.lists(st.integers(0, M32), max_size=8))
def test_allowed_values_below_2_32_always_encode(allowed: list[int]) -> None:
    """Sets like Debian's (values of 32 bits or less allowed): always expressible."""
    region = A.complement(A.of_values(allowed))
    assert A.encode(region, A.intersect(region, 0, M32)) is not None
