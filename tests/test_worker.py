"""Bounded compile work: normalisation, limits, bounded messages, and the worker pool.

Real libseccomp, real worker processes; no wall-clock assertions (the CPU the
workers report is what is bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nri_seccomp.decide import runtimes
from nri_seccomp.seccomp import compat as C
from nri_seccomp.seccomp import libseccomp, model, normalise, nri, parse, prepare, select
from nri_seccomp.seccomp import worker as W
from tests.profiles import AMD64, CRIO_BLOG

pytestmark = pytest.mark.integration  # real processes: plugin, registries, servers

CONTAINERD_23 = runtimes.capabilities("containerd", "v2.3.0", "v0.12.0")
#: CPU margin over the budget for the cost of the job around libseccomp
MARGIN = 0.5


def dumps(doc: object) -> bytes:
    return json.dumps(doc).encode()


def gt_bomb() -> bytes:
    """4 rules on one syscall, 6 SCMP_CMP_GT conditions each: minutes in libseccomp."""
    return dumps({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["read"], "action": "SCMP_ACT_ALLOW", "args": [
            {"index": a, "value": 1000 * r + a + 1, "op": "SCMP_CMP_GT"} for a in range(6)]}
        for r in range(4)]})


def read_bomb() -> bytes:
    """One rule naming read 150,000 times: minutes in libseccomp before normalisation."""
    return dumps({"defaultAction": "SCMP_ACT_ERRNO",
                  "syscalls": [{"names": ["read"] * 150_000, "action": "SCMP_ACT_ALLOW"}]})


class Pool:
    """A SeccompWorkers driven from synchronous tests, on its own event loop."""

    def __init__(self, budget: W.Budget) -> None:
        self.loop = asyncio.new_event_loop()
        self.workers = self.run(self._make(budget))

    @staticmethod
    async def _make(budget: W.Budget) -> W.SeccompWorkers:
        return W.SeccompWorkers(budget)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 120))

    def close(self) -> None:
        self.run(self.workers.aclose())
        self.loop.close()


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    p = Pool(W.Budget(cpu_seconds=1.0, wall_seconds=30.0))
    yield p
    p.close()


# ---------------------------------------------------------------------------
# the bombs


def test_repeated_name_bomb_is_normalised_cheaply(pool: Pool) -> None:
    before = pool.workers.cpu_seconds()
    result = pool.run(pool.workers.prepare(read_bomb(), AMD64, "refuse"))
    assert [list(sc.names) for sc in result.message().syscalls] == [["read"]]
    assert pool.workers.cpu_seconds() - before < pool.workers.budget.cpu_seconds + MARGIN


def test_gt_condition_bomb_is_stopped_at_the_cpu_budget(pool: Pool) -> None:
    before = pool.workers.cpu_seconds()
    with pytest.raises(W.CompileBudgetExceeded,
                       match=r"^compiling the profile exceeded its budget of 1.0 s CPU$"):
        pool.run(pool.workers.prepare(gt_bomb(), AMD64, "refuse"))
    assert pool.workers.cpu_seconds() - before < pool.workers.budget.cpu_seconds + MARGIN
    # the worker was replaced: the next job is served, correctly
    result = pool.run(pool.workers.prepare(dumps(CRIO_BLOG), AMD64, "refuse"))
    assert result == W.prepare_inline(dumps(CRIO_BLOG), AMD64, "refuse")


def test_a_long_compile_is_stopped_at_a_small_budget_and_the_pool_recovers() -> None:
    # three such rules: about a second of legitimate libseccomp work, over 0.2 s
    slow = dumps({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["read"], "action": "SCMP_ACT_ALLOW", "args": [
            {"index": a, "value": 1000 * r + a + 1, "op": "SCMP_CMP_GT"} for a in range(6)]}
        for r in range(3)]})
    inline_cost = _cpu_of(lambda: W.prepare_inline(slow, AMD64, "refuse"))
    assert inline_cost > 0.4, "the profile no longer takes long to compile: pick another"
    small = Pool(W.Budget(cpu_seconds=0.2, wall_seconds=30.0))
    try:
        with pytest.raises(W.CompileBudgetExceeded, match=r"budget of 0.2 s CPU$"):
            small.run(small.workers.prepare(slow, AMD64, "refuse"))
        assert small.workers.cpu_seconds() < 0.2 + MARGIN
        for _ in range(2):
            ok = small.run(small.workers.prepare(dumps(CRIO_BLOG), AMD64, "refuse"))
            assert ok == W.prepare_inline(dumps(CRIO_BLOG), AMD64, "refuse")
    finally:
        small.close()


def test_wall_clock_budget_stops_a_job() -> None:
    tight = Pool(W.Budget(cpu_seconds=30.0, wall_seconds=0.3))
    try:
        with pytest.raises(W.CompileBudgetExceeded, match=r"budget of 0.3 s wall-clock time$"):
            tight.run(tight.workers.prepare(gt_bomb(), AMD64, "refuse"))
    finally:
        tight.close()


def _cpu_of(fn: Any) -> float:
    import resource

    def now() -> float:
        u = resource.getrusage(resource.RUSAGE_SELF)
        return u.ru_utime + u.ru_stime

    start = now()
    fn()
    return now() - start


# ---------------------------------------------------------------------------
# worker results equal the inline ones


@pytest.mark.parametrize("which", ["crio-blog", "debian"])
def test_worker_results_equal_inline(pool: Pool, which: str, debian_profile: bytes) -> None:
    data = dumps(CRIO_BLOG) if which == "crio-blog" else debian_profile
    inline = W.prepare_inline(data, AMD64, "refuse")
    remote = pool.run(pool.workers.prepare(data, AMD64, "refuse"))
    assert remote == inline
    for degrade in (False, True):
        # Debian's personality rules are refused without allow_errno_degrade: the
        # refusal must be the same too
        outcomes = []
        for run in (
            lambda d=degrade: W.translate_inline(inline.policy, inline.origin, CONTAINERD_23, d),
            lambda d=degrade: pool.run(
                pool.workers.translate(inline.policy, inline.origin, CONTAINERD_23, d)),
        ):
            try:
                outcomes.append(run())
            except C.UnsupportedByRuntime as exc:
                outcomes.append((str(exc), exc.errno, exc.syscalls))
        assert outcomes[0] == outcomes[1]


def test_errors_are_rebuilt_with_class_message_and_context(pool: Pool) -> None:
    data = dumps({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["open", "opne"], "action": "SCMP_ACT_ALLOW"}]})
    with pytest.raises(model.UnknownSyscallError) as inline:
        W.prepare_inline(data, AMD64, "refuse")
    with pytest.raises(model.UnknownSyscallError) as remote:
        pool.run(pool.workers.prepare(data, AMD64, "refuse"))
    assert str(remote.value) == str(inline.value)
    assert (remote.value.rule_index, remote.value.syscall, remote.value.names) == (
        0, "opne", ("open", "opne"))
    with pytest.raises(model.ProfileSyntaxError, match="not JSON"):
        pool.run(pool.workers.prepare(b"{", AMD64, "refuse"))
    # a runtime refusal: errnoRet 38 on containerd 2.2.4
    prepared = W.prepare_inline(dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]}), AMD64, "refuse")
    old = runtimes.capabilities("containerd", "v2.2.4", "")
    with pytest.raises(C.UnsupportedByRuntime) as refused:
        pool.run(pool.workers.translate(prepared.policy, prepared.origin, old, False))
    assert (refused.value.errno, refused.value.syscalls, refused.value.rule_index) == (
        38, ("clone3",), 0)


# ---------------------------------------------------------------------------
# normalisation keeps the filter's meaning


DUPLICATES: list[dict[str, Any]] = [
    {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38, "syscalls": [
        {"names": ["read", "write", "read", "close"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["write"], "action": "SCMP_ACT_KILL"},
        {"names": ["read", "write", "openat"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["mount"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},  # the default
        {"names": ["openat"], "action": "SCMP_ACT_ALLOW"},
    ]},
    # conditional rules repeated around an unconditional and a conflicting one
    {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
        {"names": ["personality"], "action": "SCMP_ACT_LOG",
         "args": [{"index": 0, "value": 4, "op": "SCMP_CMP_GT"}]},
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
        {"names": ["kill"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 1, "value": 9, "op": "SCMP_CMP_EQ"}]},
        {"names": ["kill"], "action": "SCMP_ACT_TRAP"},
        {"names": ["kill"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 1, "value": 9, "op": "SCMP_CMP_EQ"}]},
        {"names": ["socket"], "action": "SCMP_ACT_ALLOW", "args": [
            {"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
            {"index": 0, "value": 2, "op": "SCMP_CMP_EQ"}]},
        {"names": ["socket", "socket"], "action": "SCMP_ACT_ALLOW", "args": [
            {"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
            {"index": 0, "value": 2, "op": "SCMP_CMP_EQ"}]},
        {"names": ["mount"], "action": "SCMP_ACT_ERRNO"},  # the default: EPERM
        {"names": ["mount"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 2, "value": 0, "op": "SCMP_CMP_EQ"}]},
    ]},
]


@pytest.mark.parametrize("doc", DUPLICATES)
def test_normalisation_keeps_the_filter(doc: dict[str, Any]) -> None:
    original = nri.to_nri(select.for_node(parse.parse(dumps(doc)), AMD64))
    normal = prepare.prepare(dumps(doc), AMD64).policy
    assert len(normal.syscalls) < len(original.syscalls)
    assert C.differences(original, normal) == []


def test_normalisation_drops_repeats_and_default_rules() -> None:
    normal = normalise.normalise(select.for_node(parse.parse(dumps(DUPLICATES[0])), AMD64))
    assert [(r.index, r.names) for r in normal.profile.syscalls] == [
        (0, ("read", "write", "close")), (1, ("write",)), (2, ("openat",))]
    assert [r.index for r in normal.dropped] == [3]


def test_dropped_rules_names_are_still_checked() -> None:
    data = dumps({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["mount", "mountt"], "action": "SCMP_ACT_ERRNO"}]})
    with pytest.raises(model.UnknownSyscallError,
                       match=r"^syscalls\[1\] \(names: mount, mountt\): unknown syscall 'mountt'"):
        prepare.prepare(data, AMD64)
    report = prepare.prepare(data, AMD64, unknown_syscalls="warn").report
    assert report.unknown_syscalls == ("mountt",)
    assert report.rules_skipped == 1


# ---------------------------------------------------------------------------
# limits, each with its message


def rule(names: list[str], args: list[dict[str, Any]] | None = None,
         action: str = "SCMP_ACT_ALLOW") -> dict[str, Any]:
    return {"names": names, "action": action, **({"args": args} if args else {})}


def eq(index: int, value: int) -> dict[str, Any]:
    return {"index": index, "value": value, "op": "SCMP_CMP_EQ"}


def refused(doc: dict[str, Any]) -> str:
    with pytest.raises(model.ProfileFieldError) as info:
        prepare.prepare(dumps(doc), AMD64)
    return str(info.value)


def test_at_most_128_rules_per_syscall() -> None:
    doc = {"defaultAction": "SCMP_ACT_ERRNO",
           "syscalls": [rule(["read"], [eq(0, i)]) for i in range(129)]}
    assert refused(doc) == (
        "syscalls[128] (names: read): read has 129 rules (conditions on one argument "
        "counting one rule each); at most 128 rules may name a syscall")
    doc["syscalls"].pop()
    prepare.prepare(dumps(doc), AMD64)


def test_split_conditions_count_towards_the_syscall_limit() -> None:
    # two conditions on argument 0: libseccomp gets two rules per name
    doc = {"defaultAction": "SCMP_ACT_ERRNO",
           "syscalls": [rule(["read"], [eq(0, i), eq(0, i + 1000)]) for i in range(65)]}
    assert refused(doc) == (
        "syscalls[64] (names: read): read has 130 rules (conditions on one argument "
        "counting one rule each); at most 128 rules may name a syscall")


def test_at_most_6_conditions_per_rule() -> None:
    doc = {"defaultAction": "SCMP_ACT_ERRNO",
           "syscalls": [rule(["read"], [eq(i % 6, i) for i in range(7)])]}
    assert refused(doc) == (
        "syscalls[0] (names: read): 7 conditions for read; a rule may have at most 6 "
        "(libseccomp compares six arguments)")


def test_at_most_4096_names() -> None:
    names = list(libseccomp.known_syscalls("SCMP_ARCH_X86_64"))
    actions = ["SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_TRAP", "SCMP_ACT_KILL_PROCESS"]
    per = [{"names": names, "action": a, "args": [eq(0, k)]}
           for k in range(4096 // len(names) // len(actions) + 1) for a in actions]
    doc = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": per}
    total, at = 0, 0
    for at, r in enumerate(per):  # noqa: B007
        total += len(r["names"])
        if total > 4096:
            break
    assert refused(doc) == (
        f"syscalls[{at}] (names: {', '.join(names[:5])}, … ({len(names)} names)): "
        f"{names[0]}: the profile names over 4096 syscalls in all its rules; at most 4096 "
        "are allowed")


def test_at_most_4096_rules() -> None:
    doc = {"defaultAction": "SCMP_ACT_ERRNO",
           "syscalls": [rule(["read"], [eq(0, i)]) for i in range(4097)]}
    # the per-syscall limit comes first for one name: use distinct values on many names
    names = libseccomp.known_syscalls("SCMP_ARCH_X86_64")
    doc["syscalls"] = [rule([names[i % len(names)]], [eq(0, i)]) for i in range(4097)]
    assert refused(doc) == (
        f"syscalls[4096] (names: {names[4096 % len(names)]}): rule 4097 (for "
        f"{names[4096 % len(names)]}) is over the limit of 4096 rules")


# ---------------------------------------------------------------------------
# bounded messages


def test_an_error_for_a_megabyte_of_unknown_keys_is_short() -> None:
    keys: dict[str, int] = {}
    i = size = 0
    while size < 1024 * 1024:
        # case variants of a known key, each unique
        key = "".join(c.upper() if (i >> (k % 13)) & 1 else c
                      for k, c in enumerate("defaultaction")) + str(i)
        keys[key] = 0
        size += len(key) + 7
        i += 1
    doc = {"defaultAction": "SCMP_ACT_ERRNO", **keys}
    with pytest.raises(model.ProfileFieldError) as info:
        parse.parse(dumps(doc))
    assert len(str(info.value).encode()) < 1024
    assert str(info.value).count("more") == 1


def test_case_variant_keys_are_shown_at_most_five() -> None:
    doc = {"defaultAction": "SCMP_ACT_ERRNO",
           **{"DefaultAction" + "x" * n: 0 for n in range(8)}}
    with pytest.raises(model.ProfileFieldError, match=r"and 3 more \(known: ") as info:
        parse.parse(dumps(doc))
    assert str(info.value).count("'DefaultAction") == 5


def test_quoted_values_are_cut_and_cleaned() -> None:
    name = "evil\n\x1b[31mFAKE LOG LINE" + "x" * 1000
    with pytest.raises(model.UnknownSyscallError) as info:
        prepare.prepare(dumps({"defaultAction": "SCMP_ACT_ERRNO",
                         "syscalls": [rule([name])]}), AMD64)
    msg = str(info.value)
    assert "\n" not in msg and "\x1b" not in msg
    assert len(msg) < 400
    assert "'evil[31mFAKE LOG LINE" in msg
    with pytest.raises(model.ProfileFieldError) as action:
        parse.parse(dumps({"defaultAction": "X" * 10_000}))
    assert len(str(action.value)) < 400


# ---------------------------------------------------------------------------
# the pool after its fork server or an idle worker died


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


@pytest.mark.parametrize("victim", ["fork server", "idle worker"])
def test_pool_is_replaced_when_pebble_gives_up(victim: str) -> None:
    """pebble stops serving for good when a worker ends while no job runs, and every
    worker seems to end when the fork server dies (their exit status came through it).
    The next job gets a new pool (and a new fork server), not "Unexpected error
    within the Pool" for ever."""
    p = Pool(W.Budget(cpu_seconds=5.0, wall_seconds=30.0))
    try:
        doc = dumps(CRIO_BLOG)
        want = W.prepare_inline(doc, AMD64, "refuse")
        assert p.run(p.workers.prepare(doc, AMD64, "refuse")) == want
        servers = [c for c in _children(os.getpid())
                   if b"forkserver" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(servers) == 1
        (server,) = servers
        workers = _children(server)
        assert workers
        os.kill(server if victim == "fork server" else workers[0], signal.SIGKILL)
        # pebble notices within its polling interval; the pool then is inactive
        deadline = time.monotonic() + 10
        while p.workers._pool.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not p.workers._pool.active
        for _ in range(2):
            assert p.run(p.workers.prepare(doc, AMD64, "refuse")) == want
        assert p.workers.restarts == 1
    finally:
        p.close()
        if victim == "fork server":
            # the killed server was our child: reaped by the new pool's first start
            assert not Path(f"/proc/{server}").exists() or b"Z" not in Path(
                f"/proc/{server}/stat").read_bytes().split(b") ")[1][:1]
