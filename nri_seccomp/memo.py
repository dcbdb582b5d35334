"""The three bounded mechanisms the data path shares: a map, single-flight work, a keyed limit.

Every key here can be chosen by a pod author (a reference, a registry, a
digest), so nothing grows with the number of distinct keys: maps are bounded in
entries and in bytes and forget the least recently used first; work in flight is
bounded in count; a per-key limiter keeps no state for idle keys.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedMap(Generic[K, V]):
    """Least-recently-used map bounded in entries and, with ``size``, in bytes.

    Entries may carry an expiry (``time.monotonic()``); an expired entry is a miss.
    """

    def __init__(
        self,
        max_entries: int,
        max_bytes: int | None = None,
        size: Callable[[V], int] | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._size = size or (lambda _v: 0)
        self._items: collections.OrderedDict[K, tuple[V, int, float | None]] = (
            collections.OrderedDict()
        )
        self.total_bytes = 0

    def get(self, key: K) -> V | None:
        items = self._items
        item = items.get(key)
        if item is None:
            return None
        expires = item[2]
        if expires is not None and time.monotonic() >= expires:
            self.pop(key)
            return None
        items.move_to_end(key)
        return item[0]

    def put(self, key: K, value: V, ttl: float | None = None) -> None:
        self.pop(key)
        nbytes = self._size(value)
        expires = None if ttl is None else time.monotonic() + ttl
        self._items[key] = (value, nbytes, expires)
        self.total_bytes += nbytes
        while len(self._items) > self.max_entries or (
            self.max_bytes is not None and self.total_bytes > self.max_bytes
            and len(self._items) > 1
        ):
            _, (_, gone, _) = self._items.popitem(last=False)
            self.total_bytes -= gone

    def pop(self, key: K) -> V | None:
        item = self._items.pop(key, None)
        if item is None:
            return None
        self.total_bytes -= item[1]
        return item[0]

    def clear(self) -> None:
        self._items.clear()
        self.total_bytes = 0

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> Iterator[K]:
        return iter(list(self._items))


class Busy(Exception):
    """Too much work of this kind is in flight already; nothing was started."""


class SingleFlight(Generic[K, V]):
    """At most one task per key, at most ``limit`` tasks in all; waiters never cancel the work.

    A caller waits until its own deadline; the task goes on for the next caller
    (the kubelet's retry), because ``asyncio.shield`` keeps a timeout from
    cancelling it.
    """

    def __init__(self, limit: int, name: str) -> None:
        self.limit = limit
        self.name = name
        self._tasks: dict[K, asyncio.Task[V]] = {}
        self.started = 0

    def __contains__(self, key: object) -> bool:
        return key in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def start(
        self,
        key: K,
        work: Callable[[], Awaitable[V]],
        on_done: Callable[[K, asyncio.Task[V]], None] | None = None,
    ) -> asyncio.Task[V]:
        """The task for ``key``, started now if none runs; :class:`Busy` at the limit."""
        task = self._tasks.get(key)
        if task is not None:
            return task
        if len(self._tasks) >= self.limit:
            raise Busy(f"{self.limit} {self.name} already in flight")

        async def run() -> V:
            return await work()

        task = asyncio.create_task(run(), name=f"{self.name} {key}")
        self._tasks[key] = task
        self.started += 1

        def done(t: asyncio.Task[V]) -> None:
            if self._tasks.get(key) is t:
                del self._tasks[key]
            if on_done is not None:
                on_done(key, t)
            elif not t.cancelled():
                t.exception()  # retrieved: nobody may be waiting any more

        task.add_done_callback(done)
        return task

    @staticmethod
    async def wait(task: asyncio.Task[V], deadline: float) -> V:
        """The task's result, or TimeoutError at ``deadline`` (monotonic) with the task going on."""
        if task.done():
            return task.result()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        return await asyncio.wait_for(asyncio.shield(task), remaining)

    def cancel_all(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()


class KeyedLimiter(Generic[K]):
    """At most ``per_key`` holders per key; a key with no holder costs nothing."""

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self._slots: dict[K, tuple[asyncio.Semaphore, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: K) -> AsyncIterator[None]:
        sem, users = self._slots.get(key, (asyncio.Semaphore(self.per_key), 0))
        self._slots[key] = (sem, users + 1)
        try:
            async with sem:
                yield
        finally:
            sem, users = self._slots[key]
            if users <= 1:
                del self._slots[key]
            else:
                self._slots[key] = (sem, users - 1)

    def __len__(self) -> int:
        return len(self._slots)
