"""A slow registry for the tests: a real registry behind a proxy that holds every request.

``DelayingProxy(upstream, delay)`` listens on 127.0.0.1 and passes each HTTP request
to ``upstream`` ("host:port") only ``delay`` seconds after it arrived; answers come
back as the registry sends them. Every call, on a new connection or a kept-alive
one, is answered no sooner than ``delay``: the proxy reads requests one by one
(request line and headers, then a ``Content-Length`` body), so keep-alive does not
let later calls through early. Requests with a chunked body are not supported (a
registry client pulling never sends one).

The registry, its artifact and its authentication are real (``devtools.registry``);
only the time is added. ``requests`` records what arrived and when, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from types import TracebackType

#: request heads larger than this close the connection (no registry client sends one)
MAX_HEAD = 64 * 1024


class DelayingProxy:
    def __init__(self, upstream: str, delay: float, host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.delay = delay
        self.host = host
        self.address = ""
        #: (request line, time.monotonic() it arrived), in arrival order
        self.requests: list[tuple[str, float]] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="delaying-proxy", daemon=True)

    def __enter__(self) -> DelayingProxy:
        self._thread.start()
        self._ready.wait(10)
        if self._failure is not None or not self.address:
            raise RuntimeError(f"delaying proxy did not start: {self._failure}")
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        stopped = self._stopped
        if stopped is not None:
            self._loop.call_soon_threadsafe(stopped.set)
        self._thread.join(10)

    def seen(self, fragment: str) -> list[float]:
        """Arrival times of the requests whose request line contains ``fragment``."""
        with self._lock:
            return [at for line, at in self.requests if fragment in line]

    # ---- the proxy's own thread ----------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to __enter__, which raises it
            self._failure = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stopped = asyncio.Event()
        server = await asyncio.start_server(self._serve, self.host, 0)
        port = server.sockets[0].getsockname()[1]
        self.address = f"{self.host}:{port}"
        self._ready.set()
        await self._stopped.wait()
        server.close()
        # connections still open (a plugin's kept-alive pool) are cut: server.wait_closed()
        # would wait for them
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader,
                     client_w: asyncio.StreamWriter) -> None:
        host, _, port = self.upstream.rpartition(":")
        try:
            up_r, up_w = await asyncio.open_connection(host, int(port), limit=MAX_HEAD)
        except OSError:
            client_w.close()
            return
        answers = asyncio.create_task(self._pipe(up_r, client_w))
        try:
            while True:
                head = await client_r.readuntil(b"\r\n\r\n")
                if len(head) > MAX_HEAD:
                    break
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                body = b""
                length = _content_length(head)
                if length:
                    body = await client_r.readexactly(length)
                with self._lock:
                    self.requests.append((line, time.monotonic()))
                # the registry sees the request only now: its answer is `delay` late
                await asyncio.sleep(self.delay)
                up_w.write(head + body)
                await up_w.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                ValueError):
            pass  # the client closed, or sent what a registry client never sends
        finally:
            up_w.close()
            answers.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await answers
            client_w.close()

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while chunk := await src.read(65536):
                dst.write(chunk)
                await dst.drain()
        except ConnectionError:
            pass
        finally:
            # the registry closed: so does the client's connection
            dst.close()


def _content_length(head: bytes) -> int:
    for raw in head.split(b"\r\n")[1:]:
        name, _, value = raw.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


__all__ = ["DelayingProxy"]
