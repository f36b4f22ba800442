"""A deadline for the whole of one request, not only for each read.

The SDKs' ``timeout`` is httpx's: it bounds each read, so a server that trickles its answer
(a few bytes every quarter second) holds a ``timeout=1`` call for as long as it likes. Python
cannot interrupt a blocked read from outside, but shutting the socket down ends it at once:
one watchdog thread per process keeps the deadlines of the requests in flight and shuts down
the connection of any request still reading when its deadline passes. The SDK's read then
fails, and the adapter reports :class:`WholeRequestTimeout` (mapped to ``CallTimeout``).

::

    deadline = RequestDeadline(5.0)
    with deadline.watching():
        message = sdk.messages.create(...)      # the response hook registers the socket
    deadline.close()                            # the request is over: stop watching

Registering a request costs one heap push under a lock (no thread per request).
"""

from __future__ import annotations

import contextvars
import heapq
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import httpx2

__all__ = ["RequestDeadline", "WholeRequestTimeout", "on_response"]


class WholeRequestTimeout(httpx2.TimeoutException):
    """The whole request (headers, body, or a stream's events) outlasted its deadline."""


class _Watch:
    __slots__ = ("active", "deadline", "sock")

    def __init__(self, deadline: RequestDeadline, sock: socket.socket) -> None:
        self.deadline = deadline
        self.sock = sock
        self.active = True


class _Watchdog:
    """One daemon thread shutting down the sockets of requests past their deadline."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Watch]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: RequestDeadline, sock: socket.socket) -> _Watch:
        entry = _Watch(deadline, sock)
        with self._wake:
            order = next(self._order)
            if order % 1024 == 0 and len(self._heap) >= 1024:
                # Finished requests stay in the heap until their deadline; drop them now and
                # then, so that the heap holds about the requests in flight.
                self._heap = [item for item in self._heap if item[2].active]
                heapq.heapify(self._heap)
            heapq.heappush(self._heap, (deadline.at, order, entry))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="flowstone-llm-deadlines", daemon=True
                )
                self._thread.start()
            elif self._heap[0][2] is entry:
                self._wake.notify()
        return entry

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._heap and not self._heap[0][2].active:
                    heapq.heappop(self._heap)  # finished requests, dropped lazily
                if not self._heap:
                    self._wake.wait(30.0)
                    if not self._heap:
                        self._thread = None
                        return
                    continue
                at, _, entry = self._heap[0]
                wait = at - time.monotonic()
                if wait > 0:
                    self._wake.wait(wait)
                    continue
                heapq.heappop(self._heap)
            if entry.active:
                entry.deadline.expired = True
                with suppress(OSError):
                    entry.sock.shutdown(socket.SHUT_RDWR)


_WATCHDOG = _Watchdog()

_current: contextvars.ContextVar[RequestDeadline | None] = contextvars.ContextVar(
    "flowstone_llm_request_deadline", default=None
)


class RequestDeadline:
    """``seconds`` from now for one request; ``expired`` once the watchdog cut it."""

    __slots__ = ("_watches", "at", "expired", "request", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.expired = False
        self.request: httpx2.Request | None = None
        self._watches: list[_Watch] = []

    def remaining(self) -> float:
        return max(self.at - time.monotonic(), 0.001)

    @contextmanager
    def watching(self) -> Iterator[RequestDeadline]:
        """Requests sent in the block (in this thread) are watched until :meth:`close`."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)

    def register(self, response: httpx2.Response, request: httpx2.Request | None = None) -> None:
        self.request = request if request is not None else response.request
        stream: Any = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(sock, socket.socket):
            self._watches.append(_WATCHDOG.watch(self, sock))

    def close(self) -> None:
        """The request is over (answered, failed or abandoned): stop watching it."""
        for watch in self._watches:
            watch.active = False
        self._watches.clear()

    def timeout_error(self, cause: BaseException | None = None) -> WholeRequestTimeout:
        error = WholeRequestTimeout(
            f"the request did not finish within {self.seconds:g} s (its whole timeout)",
            request=self.request,
        )
        error.__cause__ = cause
        return error


def on_response(response: httpx2.Response) -> None:
    """The httpx response hook: watch the response's connection under the current deadline."""
    deadline = _current.get()
    if deadline is not None:
        deadline.register(response)
