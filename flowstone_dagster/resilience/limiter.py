"""Rate limiters whose budget every process shares.

A :class:`RateLimiter` admits at most ``limit`` units in any window of ``period`` seconds,
across every process (and machine) that opens the same store. Each admitted call records a
``(timestamp, cost)`` reservation in the store's sliding-window log; an admission is decided,
and recorded, in one atomic store update, so the guarantee is exact: no half-open window
``[t, t + period)`` of recorded timestamps ever holds more than ``limit`` units. Old entries
are pruned as they leave the window.

::

    from flowstone_dagster.resilience import RateLimiter

    anthropic_rpm = RateLimiter("anthropic", limit=50, period=60.0)        # mode="wait"
    anthropic_rpm.acquire()                  # blocks until the call may go (up to max_wait)
    with anthropic_rpm:                      # the same, as a context manager
        ...

    both = RateLimiter("search", rates=[(50, 1.0), (1000, 60.0)])        # 50/s and 1000/min

    @RateLimiter("geocoder", limit=10, period=1.0, mode="reject")
    def geocode(address: str) -> dict: ...   # raises RateLimitExceeded when over budget

In ``"wait"`` mode a caller that may not go yet sleeps exactly until the oldest reservation
that blocks it leaves the window, then asks again (it may lose the freed capacity to another
process and wait again; there is no FIFO across processes). When the wait would pass
``max_wait`` the caller gets :class:`RateLimitExceeded` at once, carrying the wait in
``retry_after``. In ``"reject"`` mode every refusal raises it at once.

Telemetry: ``flowstone.ratelimit.wait`` when a caller waited (measures ``limiter``, ``cost``,
``wait_s``), ``flowstone.ratelimit.rejected`` on refusals (``limiter``, ``cost``,
``retry_after_s``). Admissions without waiting emit nothing (they are the hot path).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Literal, NoReturn, ParamSpec, TypeVar

from flowstone_dagster import telemetry
from flowstone_dagster.errors import ConfigurationError, RateLimited
from flowstone_dagster.resilience.stores import Reservation, StateStore, open_store, window_key

__all__ = ["Mode", "RateLimitExceeded", "RateLimiter"]

P = ParamSpec("P")
T = TypeVar("T")

Mode = Literal["wait", "reject"]

DEFAULT_MAX_WAIT = 60.0


class RateLimitExceeded(RateLimited):
    """A local :class:`RateLimiter` refused a call; ``retry_after`` is when it may go.

    A subclass of :class:`~flowstone_dagster.errors.RateLimited`, so it is retryable and its
    wait is honoured by :func:`~flowstone_dagster.resilience.with_retry`; circuit breakers
    ignore it (the service was not called).
    """

    def __init__(self, name: str, retry_after: float, *, limit: float, period: float) -> None:
        super().__init__(
            f"rate limit {name!r} ({limit:g} per {period:g} s) exceeded; "
            f"capacity frees in {retry_after:.3f} s",
            retry_after=retry_after,
            service=None,
        )
        self.limiter = name
        self.limit = limit
        self.period = period


class RateLimiter:
    """At most ``limit`` units per ``period`` seconds for ``name``, shared through ``store``.

    ``mode`` is ``"wait"`` (block up to ``max_wait`` seconds) or ``"reject"`` (raise at once).
    ``store`` is a store or store URL (default :func:`~.stores.default_store_url`). ``clock``
    and ``sleep`` are injectable for tests; with a ``clock`` the store uses its times too.
    """

    def __init__(
        self,
        name: str,
        limit: float | None = None,
        period: float = 1.0,
        *,
        rates: Sequence[tuple[float, float]] = (),
        mode: Mode = "wait",
        max_wait: float = DEFAULT_MAX_WAIT,
        store: StateStore | str | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not name:
            raise ConfigurationError("a rate limiter needs a name", field="name")
        windows = [(float(limit), float(period))] if limit is not None else []
        windows += [(float(w_limit), float(w_period)) for w_limit, w_period in rates]
        if not windows:
            raise ConfigurationError("a rate limiter needs a limit or rates", field="limit")
        for w_limit, w_period in windows:
            if not w_limit > 0:
                raise ConfigurationError(f"must be positive, got {w_limit:g}", field="limit")
            if not w_period > 0:
                raise ConfigurationError(f"must be positive, got {w_period:g}", field="period")
        if mode not in ("wait", "reject"):
            raise ConfigurationError(f"must be 'wait' or 'reject', got {mode!r}", field="mode")
        if max_wait < 0:
            raise ConfigurationError(f"must not be negative, got {max_wait}", field="max_wait")
        self.name = name
        #: Every (limit, period) window enforced; ``limit``/``period`` are the first one's.
        self.windows: tuple[tuple[float, float], ...] = tuple(windows)
        self.limit, self.period = self.windows[0]
        self._smallest = min(limit for limit, _ in self.windows)
        self.mode: Mode = mode
        self.max_wait = float(max_wait)
        self.store: StateStore = (
            open_store(store) if store is None or isinstance(store, str) else store
        )
        self.clock = clock
        self.sleep = sleep

    def __repr__(self) -> str:
        rates = ", ".join(f"{limit:g}/{period:g}s" for limit, period in self.windows)
        return f"RateLimiter({self.name!r}, {rates}, mode={self.mode!r}, store={self.store!r})"

    def _check_cost(self, cost: float) -> None:
        if not cost > 0:
            raise ConfigurationError(f"must be positive, got {cost}", field="cost")
        if cost > self._smallest:
            smallest = self._smallest
            raise ConfigurationError(
                f"{cost:g} is more than the limit {smallest:g} of {self.name!r}: "
                "such a call could never be admitted",
                field="cost",
            )

    def try_acquire(self, cost: float = 1) -> Reservation:
        """One atomic attempt: admitted now (in every window), or the wait until ``cost``
        would fit in all of them."""
        self._check_cost(cost)
        now = None if self.clock is None else self.clock()
        if len(self.windows) == 1:
            return self.store.reserve(self.name, cost, self.limit, self.period, now)
        return self.store.reserve_all(self.name, cost, self.windows, now)

    def acquire(self, cost: float = 1, *, max_wait: float | None = None) -> float:
        """Take ``cost`` units, waiting in ``"wait"`` mode; returns the admission's store time.

        Raises :class:`RateLimitExceeded` when refused (``"reject"`` mode, or a wait beyond
        ``max_wait``, the limiter's or the lower one given here) and ``ConfigurationError``
        for a cost above the limit.
        """
        return self.admit(cost, max_wait=max_wait)[0]

    def admit(self, cost: float = 1, *, max_wait: float | None = None) -> tuple[float, float]:
        """:meth:`acquire`, returning the admission's store time and when it happened on this
        process's clock (``clock``, else ``time.monotonic``), which
        :class:`~.admission.Admission` compares with the send time: exact when the store
        keeps this machine's time (or ``clock``'s), else the moment the store answered (a
        database server's clock is not ours to compare)."""
        clock = self.clock or time.monotonic
        reservation = self.try_acquire(cost)
        if reservation.admitted:
            return reservation.at, self._local_time(reservation.at, clock)
        if self.mode == "reject":
            self._refuse(cost, reservation.wait)
        started = clock()
        limit = self.max_wait if max_wait is None else min(self.max_wait, max_wait)
        while True:
            waited = clock() - started
            if waited + reservation.wait > limit:
                self._refuse(cost, reservation.wait)
            self.sleep(reservation.wait)
            reservation = self.try_acquire(cost)
            if reservation.admitted:
                telemetry.emit(
                    "flowstone.ratelimit.wait",
                    outcome="ok",
                    limiter=self.name,
                    cost=cost,
                    wait_s=round(clock() - started, 4),
                )
                return reservation.at, self._local_time(reservation.at, clock)

    def _local_time(self, at: float, clock: Callable[[], float]) -> float:
        """Store time ``at``, just admitted, on ``clock``."""
        if self.clock is not None:
            return at  # the store used the clock's own time
        if getattr(self.store, "local_clock", False):
            return clock() - (time.time() - at)
        return clock()

    def _refuse(self, cost: float, wait: float) -> NoReturn:
        error = RateLimitExceeded(self.name, wait, limit=self.limit, period=self.period)
        telemetry.emit(
            "flowstone.ratelimit.rejected",
            error=error,
            limiter=self.name,
            cost=cost,
            retry_after_s=round(wait, 4),
        )
        raise error

    def usage(self) -> float:
        """Units admitted in the last ``period`` seconds (the first window's)."""
        now = None if self.clock is None else self.clock()
        key = self.name if len(self.windows) == 1 else window_key(self.name, *self.windows[0])
        return self.store.limiter_usage(key, self.period, now)

    def reset(self) -> None:
        """Forget every reservation (the full budget is available again)."""
        self.store.delete_limiter(self.name)
        if len(self.windows) > 1:
            for limit, period in self.windows:
                self.store.delete_limiter(window_key(self.name, limit, period))

    def __enter__(self) -> RateLimiter:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]:
        """Use the limiter as a decorator: each call of ``fn`` takes one unit."""

        def limited(*args: P.args, **kwargs: P.kwargs) -> T:
            self.acquire()
            return fn(*args, **kwargs)

        limited.__name__ = getattr(fn, "__name__", "limited")
        limited.__doc__ = fn.__doc__
        limited.__wrapped__ = fn  # type: ignore[attr-defined]
        return limited
