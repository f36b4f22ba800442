"""What a guarded attempt was admitted under, checked again when its request goes on the wire.

A rate limiter admits a call at one instant; the service counts the request when it arrives.
Whatever runs in between (the SDK building the request, a wait for a bulkhead slot, a new
connection's TLS handshake, a 200 ms garbage collection of a large heap) moves the arrival
later than the admission, into a window the limiter has already filled again: the service
then sees more than the limit, although every admission was exact. Measured with two
processes on one 6,000 rpm limit: each process's one full collection (about 180 ms) held a
request admitted just before it, and the provider answered 429 a second later.

:meth:`ResilienceResource.call` publishes the attempt's :class:`Admission`, readable through
:func:`current_admission` in the thread that runs the attempt (and in a ``with_timeout``
thread, which copies the context). An integration calls :meth:`Admission.confirm` at the last
moment before its request's bytes are written (the LLM client does it from httpx's
``send_request_headers`` trace); when more than ``late_after`` seconds passed since the
admission, the limits are taken again, waiting as the call may, so that the reservation the
service's window sees is the send's. The first reservation stays in the log: a late send
costs one unit of the limit, never a request over it.

Telemetry: ``flowstone.ratelimit.readmitted`` (measures ``limiter``, ``late_s``, ``wait_s``)
for each limit taken again.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from flowstone_dagster import telemetry
from flowstone_dagster.resilience.limiter import RateLimiter

__all__ = ["Admission", "current_admission"]


@dataclass(slots=True)
class _Taken:
    limiter: RateLimiter
    units: float
    at: float  # when the store admitted it, on the limiter's local clock (RateLimiter.admit)

    def age(self) -> float:
        return (self.limiter.clock or time.monotonic)() - self.at


class Admission:
    """The limits one attempt took, each with the local time it was admitted at (on the
    limiter's ``clock``, else ``time.monotonic``).

    ``budget`` returns how long a limiter may wait now (``None``: its own ``max_wait``).
    """

    __slots__ = ("_taken", "budget", "readmitted")

    def __init__(self, budget: Callable[[], float | None] = lambda: None) -> None:
        self.budget = budget
        self._taken: list[_Taken] = []
        #: How many limits were taken again (by :meth:`confirm`) in this attempt.
        self.readmitted = 0

    def take(self, limiter: RateLimiter, units: float) -> None:
        """Take ``units`` of ``limiter`` (waiting as it may) and remember when."""
        _, at = limiter.admit(units, max_wait=self.budget())
        self._taken.append(_Taken(limiter, units, at))

    @property
    def limiters(self) -> list[str]:
        """The names of the limits taken, in order."""
        return [taken.limiter.name for taken in self._taken]

    def confirm(self, late_after: float, limiters: Collection[str] | None = None) -> float:
        """Just before the request is sent: take again every limit (of those named in
        ``limiters``, default all) admitted more than ``late_after`` seconds ago; returns
        the longest lateness seen. Raises ``RateLimitExceeded`` when a limit cannot be taken
        again within the call's wait budget (and nothing must be sent)."""
        latest = 0.0
        for taken in self._taken:
            if limiters is not None and taken.limiter.name not in limiters:
                continue
            late = taken.age()
            latest = max(latest, late)
            if late <= late_after:
                continue
            asked = taken.at + late
            _, taken.at = taken.limiter.admit(taken.units, max_wait=self.budget())
            self.readmitted += 1
            telemetry.emit(
                "flowstone.ratelimit.readmitted",
                outcome="ok",
                limiter=taken.limiter.name,
                late_s=round(late, 4),
                wait_s=round(max(taken.at - asked, 0.0), 4),
            )
        return latest


_current: contextvars.ContextVar[Admission | None] = contextvars.ContextVar(
    "flowstone_admission", default=None
)


def current_admission() -> Admission | None:
    """The admission of the attempt running in this context (``None`` outside a guarded
    attempt, or when it took no rate limit)."""
    return _current.get()


@contextmanager
def admitted(admission: Admission | None) -> Iterator[None]:
    """Publish ``admission`` to :func:`current_admission` for the block."""
    if admission is None:
        yield
        return
    token = _current.set(admission)
    try:
        yield
    finally:
        _current.reset(token)
