"""libseccomp compiles and errno translations, run where they can be stopped.

A profile from a registry is untrusted, and what libseccomp does with it is not
bounded by its size: four rules on one syscall with six ``SCMP_CMP_GT``
conditions each (1,251 bytes) keep libseccomp busy for minutes. That work is a
call into a C library: a thread running it cannot be interrupted, and it would
hold the plugin's event loop (or a thread pool slot, and the GIL between C
calls) as long as it likes. So it runs in worker *processes*:

* each job arms a CPU budget in its worker: ``RLIMIT_CPU`` (whole seconds, the
  kernel's SIGXCPU) and a ``ITIMER_PROF`` timer with the exact budget (SIGPROF,
  whose default action ends the process even inside a C call);
* pebble's per-task timeout kills the worker at the wall-clock budget;
* the pool replaces a dead worker; the job's caller gets
  :class:`CompileBudgetExceeded`;
* a pool that pebble gave up on is replaced by a new one at the next job (see
  :meth:`SeccompWorkers._live_pool`);
* workers run at ``nice 10``, so the plugin's event loop wins the CPU.

Workers are forked from a ``forkserver`` with the heavy modules preloaded (the
plugin runs asyncio with threads: it must not fork itself), and the pool is
started when :class:`SeccompWorkers` is built, not at the first profile.

Parsing runs in the worker too: a 1 MiB JSON document is not parsed on the event
loop. Exceptions come back as tagged tuples and are rebuilt in the parent with
the same class and message (exceptions with keyword-only arguments do not
unpickle). ``prepare_inline`` and ``translate_inline`` give the same results in
this process, for tests and for code without a pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import multiprocessing
import os
import resource
import signal
import threading
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import pebble
from pebble.common import types as pebble_types

from nri_seccomp.decide import runtimes
from nri_seccomp.errors import NriSeccompError
from nri_seccomp.nri.pb import nri_pb2
from nri_seccomp.seccomp import bpf, compat, libseccomp, model, prepare

#: the modules a worker needs, imported once in the fork server: the stages of
#: ``prepare`` (libseccomp's handle and syscall tables among them) and ``compat``
PRELOAD = [
    f"nri_seccomp.seccomp.{m}"
    for m in (
        "worker",
        "vocabulary",
        "model",
        "parse",
        "select",
        "normalise",
        "nri",
        "libseccomp",
        "bpf",
        "prepare",
        "compat",
        "warm",  # builds the syscall tables once, for every worker forked after
    )
]
NICE = 10
#: how often pebble's pool threads look at the pool when nothing reaches them: a
#: job's result wakes them at once, so this bounds how late a wall-clock budget or a
#: dead worker is noticed, and how long stopping the pool takes. pebble's 0.1 s woke
#: two threads 20 times a second on an idle node (4.1 ms of CPU a second, measured;
#: 0.9 ms at 0.5 s, at the price of a slower stop). pebble documents the constant as
#: changing its pools' behaviour, and its maintainer names setting it as the way to
#: change the interval (noxdafox/pebble#65).
POOL_POLL_SECONDS = 0.25
pebble_types.CONSTS.sleep_unit = POOL_POLL_SECONDS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    #: CPU one job may use (seconds)
    cpu_seconds: float = 2.0
    #: wall-clock time one job may take once a worker runs it (seconds)
    wall_seconds: float = 5.0
    #: worker processes
    workers: int = 1


class CompileBudgetExceeded(NriSeccompError):
    """The job was stopped at its budget; the profile is refused."""


class CompileTimedOut(CompileBudgetExceeded):
    """The job was stopped at its wall-clock budget before its CPU budget: on a busy
    node that says as much about the node as about the profile, so the refusal is
    remembered briefly (``failure_ttl``), not for ``refused_ttl``."""


@dataclass(frozen=True)
class PreparedProfile:
    #: the node's normalised, compiled rules: a serialized ``nri_pb2.LinuxSeccomp``
    #: (deterministic serialization)
    policy: bytes
    #: each policy rule's index in the profile
    origin: tuple[int, ...]
    warnings: tuple[str, ...]

    def message(self) -> nri_pb2.LinuxSeccomp:
        return nri_pb2.LinuxSeccomp.FromString(self.policy)


@dataclass(frozen=True)
class Translated:
    #: what to send as the adjustment's ``linux.seccomp``: a serialized ``LinuxSeccomp``
    policy: bytes
    warnings: tuple[str, ...]

    def message(self) -> nri_pb2.LinuxSeccomp:
        return nri_pb2.LinuxSeccomp.FromString(self.policy)


# ---------------------------------------------------------------------------
# the jobs, as run in a worker or inline


def prepare_inline(
    data: bytes, node: model.NodeContext, unknown_syscalls: str
) -> PreparedProfile:
    """parse → … → compile_check in this process (no budget); see :func:`prepare.prepare`."""
    prepared = prepare.prepare(data, node, unknown_syscalls=unknown_syscalls)
    return PreparedProfile(
        prepared.policy.SerializeToString(deterministic=True),
        prepared.profile.rule_indexes,
        tuple(prepared.report.warnings),
    )


def translate_inline(
    policy: bytes,
    origin: tuple[int, ...],
    caps: runtimes.RuntimeCaps,
    allow_errno_degrade: bool,
) -> Translated:
    """:func:`compat.translate` in this process (no budget)."""
    t = compat.translate(
        nri_pb2.LinuxSeccomp.FromString(policy),
        caps,
        allow_errno_degrade=allow_errno_degrade,
        origin=origin,
    )
    return Translated(t.policy.SerializeToString(deterministic=True), t.warnings)


_PROFILE_ERRORS: dict[str, type[model.ProfileError]] = {
    c.__name__: c
    for c in (
        model.ProfileError,
        model.ProfileSyntaxError,
        model.ProfileFieldError,
        model.CompileError,
        model.UnknownSyscallError,
        bpf.AnalysisTooCostly,
    )
}

#: ("ok", result) | ("profile", class, message, attributes) | ("runtime", message,
#: attributes) | ("value", message) | ("crash", description)
_Tagged = tuple[Any, ...]


def _tag(exc: BaseException) -> _Tagged:
    if isinstance(exc, model.ProfileError) and type(exc).__name__ in _PROFILE_ERRORS:
        attrs = {
            "field": exc.field,
            "rule_index": exc.rule_index,
            "names": exc.names,
            "syscall": exc.syscall,
            "arch": exc.arch,
        }
        return ("profile", type(exc).__name__, str(exc), attrs)
    if isinstance(exc, compat.UnsupportedByRuntime):
        attrs = {
            "runtime": exc.runtime,
            "errno": exc.errno,
            "syscalls": exc.syscalls,
            "rule_index": exc.rule_index,
        }
        return ("runtime", str(exc), attrs)
    if isinstance(exc, ValueError):
        return ("value", str(exc))
    return ("crash", f"{type(exc).__name__}: {exc}")


def _untag(tagged: _Tagged) -> Any:
    kind = tagged[0]
    if kind == "ok":
        return tagged[1]
    if kind == "profile":
        raise _PROFILE_ERRORS[tagged[1]](tagged[2], **tagged[3])
    if kind == "runtime":
        raise compat.UnsupportedByRuntime(tagged[1], **tagged[2])
    if kind == "value":
        raise ValueError(tagged[1])
    raise RuntimeError(f"seccomp worker failed: {tagged[1]}")


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _limited(cpu_seconds: float, fn: Callable[..., Any], *args: Any) -> tuple[_Tagged, float]:
    """Run ``fn`` in this worker with a CPU budget; (tagged result, CPU it used)."""
    start = _cpu_self()
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    limit = math.ceil(start + cpu_seconds)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    # the kernel's limit is in whole seconds: the profiling timer gives the exact budget
    resource.setrlimit(resource.RLIMIT_CPU, (limit, hard))
    signal.setitimer(signal.ITIMER_PROF, cpu_seconds)
    try:
        tagged: _Tagged = ("ok", fn(*args))
    except Exception as exc:
        tagged = _tag(exc)
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    return tagged, _cpu_self() - start


def _prepare_job(
    data: bytes, node: model.NodeContext, unknown_syscalls: str, cpu_seconds: float
) -> tuple[_Tagged, float]:
    return _limited(cpu_seconds, prepare_inline, data, node, unknown_syscalls)


def _translate_job(
    policy: bytes,
    origin: tuple[int, ...],
    caps: runtimes.RuntimeCaps,
    allow_errno_degrade: bool,
    cpu_seconds: float,
) -> tuple[_Tagged, float]:
    return _limited(cpu_seconds, translate_inline, policy, origin, caps, allow_errno_degrade)


def _init_worker() -> None:
    os.nice(NICE)
    # SIGXCPU's default action dumps core: a stopped job must not write one
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for sig in (signal.SIGPROF, signal.SIGXCPU):
        signal.signal(sig, signal.SIG_DFL)


def _warm() -> None:
    libseccomp.known_syscalls(libseccomp.native_arch())


# ---------------------------------------------------------------------------
# the pool


_CPU_SIGNALS = (signal.SIGXCPU, signal.SIGPROF)


class SeccompWorkers:
    """A warm pool of worker processes for :func:`prepare.prepare` and :func:`compat.translate`."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD)
        self._lock = threading.Lock()
        self._cpu = 0.0
        self._closed = False
        #: pools replaced since start (tests, diagnostics)
        self.restarts = 0
        self._pool = self._new_pool()

    def _new_pool(self) -> pebble.ProcessPool:
        pool = pebble.ProcessPool(
            max_workers=self.budget.workers, initializer=_init_worker, context=self._ctx
        )
        # starts the pool and its workers now, not at the first profile
        pool.schedule(_warm)
        return pool

    def _live_pool(self) -> pebble.ProcessPool:
        """The pool, replaced first if pebble gave up on it.

        pebble stops serving for good ("Unexpected error within the Pool") when it
        sees a worker end while no job runs, and that is what it sees for every
        worker when the fork server dies (a worker's exit status comes through the
        fork server: its pipe closes, the worker counts as ended). A broken pool
        would refuse every later profile while the plugin stays registered, so the
        probes would never restart it. The new pool's first worker start runs
        multiprocessing's fork server check, which reaps the dead server and starts
        another. The old pool is stopped: its workers see their channel close and
        exit (if the fork server died they are PID 1's to reap: tini in the image).
        """
        if not self._pool.active and not self._closed:
            log.error("the seccomp worker pool stopped working; starting a new one")
            old, self._pool = self._pool, self._new_pool()
            self.restarts += 1
            old.stop()  # type: ignore[no-untyped-call]
            # join closes its channels and ends its workers; it waits for them, so not
            # on the event loop
            threading.Thread(target=old.join, name="seccomp-pool-stop", daemon=True).start()
        return self._pool

    async def prepare(
        self, data: bytes, node: model.NodeContext, unknown_syscalls: str
    ) -> PreparedProfile:
        """:func:`prepare_inline` in a worker, within the budget."""
        result: PreparedProfile = await self._run(
            _prepare_job, data, node, unknown_syscalls, self.budget.cpu_seconds
        )
        return result

    async def translate(
        self,
        policy: bytes,
        origin: tuple[int, ...],
        caps: runtimes.RuntimeCaps,
        allow_errno_degrade: bool,
    ) -> Translated:
        """:func:`translate_inline` in a worker, within the budget."""
        result: Translated = await self._run(
            _translate_job, policy, origin, caps, allow_errno_degrade, self.budget.cpu_seconds
        )
        return result

    def cpu_seconds(self) -> float:
        """CPU used by the jobs finished so far, as each worker measured it (rusage of
        the worker around the job). A killed job cannot report: one stopped at its CPU
        budget counts that budget, one stopped at the wall-clock budget counts the
        smaller of the two budgets (an upper bound of what it used)."""
        with self._lock:
            return self._cpu

    def _charge(self, seconds: float) -> None:
        with self._lock:
            self._cpu += seconds

    async def _run(self, job: Callable[..., tuple[_Tagged, float]], *args: Any) -> Any:
        future = self._live_pool().schedule(job, args=args, timeout=self.budget.wall_seconds)
        try:
            tagged, used = await asyncio.wrap_future(future)
        except BrokenProcessPool as exc:
            # the pool broke while the job waited or ran: the next job gets a new pool
            raise RuntimeError(f"seccomp worker pool failed: {exc}") from exc
        except concurrent.futures.TimeoutError:
            self._charge(min(self.budget.cpu_seconds, self.budget.wall_seconds))
            raise CompileTimedOut(
                f"compiling the profile exceeded its budget of {self.budget.wall_seconds} s "
                "wall-clock time"
            ) from None
        except pebble.ProcessExpired as exc:
            if exc.exitcode is not None and -exc.exitcode in _CPU_SIGNALS:
                self._charge(self.budget.cpu_seconds)
                raise CompileBudgetExceeded(
                    f"compiling the profile exceeded its budget of {self.budget.cpu_seconds} s CPU"
                ) from None
            raise RuntimeError(f"seccomp worker died (exit code {exc.exitcode})") from exc
        self._charge(used)
        return _untag(tagged)

    async def aclose(self) -> None:
        """Stop the workers (a running job is killed)."""
        self._closed = True
        self._pool.stop()  # type: ignore[no-untyped-call]
        await asyncio.to_thread(self._pool.join)
