"""Time limits: cooperative deadlines, and a last-resort thread timeout.

Python cannot stop a thread. The only timeouts that leave nothing running are the ones the
I/O itself enforces: socket and HTTP timeouts (``requests``' ``timeout=``), SDK timeouts
(``anthropic.Anthropic(timeout=...)``), statement timeouts, and killing a subprocess. So an
integration should *pass its remaining time down* to its I/O. :class:`Deadline` carries it,
and :func:`deadline_scope` publishes it to the code it calls::

    from flowstone_dagster.resilience import current_deadline, deadline_scope

    with deadline_scope(30.0):
        fetch()                                   # deep inside:

    def fetch() -> bytes:
        deadline = current_deadline()
        timeout = deadline.timeout(default=10.0) if deadline else 10.0
        return session.get(url, timeout=timeout).content

:func:`with_timeout` is for code that cannot take a deadline. It runs ``fn`` in a daemon thread
and raises :class:`~flowstone_dagster.errors.CallTimeout` when ``seconds`` pass. **The
abandoned thread keeps running until ``fn`` returns by itself** (it cannot be stopped): it
still holds whatever it holds (a connection, a file, memory), its side effects still happen,
and its result or exception is discarded. Use it only where that is acceptable.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from flowstone_dagster.errors import CallTimeout, ConfigurationError

__all__ = ["Deadline", "current_deadline", "deadline_scope", "with_timeout"]

P = ParamSpec("P")
T = TypeVar("T")


class Deadline:
    """A point in (monotonic) time by which work must be done.

    ::

        deadline = Deadline(5.0)
        sock.settimeout(deadline.remaining())
        deadline.check("reading the header")      # raises CallTimeout once expired
    """

    __slots__ = ("at", "clock", "seconds")

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if seconds < 0:
            raise ConfigurationError(f"must not be negative, got {seconds}", field="timeout")
        self.seconds = float(seconds)
        self.clock = clock
        self.at = clock() + self.seconds

    def __repr__(self) -> str:
        return f"Deadline(remaining={self.remaining():.3f} s of {self.seconds:g} s)"

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(self.at - self.clock(), 0.0)

    @property
    def expired(self) -> bool:
        return self.clock() >= self.at

    def timeout(self, default: float | None = None) -> float:
        """The timeout to give an I/O call: the remaining time, or ``default`` if smaller."""
        remaining = self.remaining()
        return remaining if default is None else min(default, remaining)

    def check(self, what: str = "the call") -> None:
        """Raise ``CallTimeout`` when the deadline has passed."""
        if self.expired:
            raise CallTimeout(
                f"{what} passed its {self.seconds:g} s deadline", timeout=self.seconds
            )


_current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "flowstone_deadline", default=None
)


def current_deadline() -> Deadline | None:
    """The innermost active :func:`deadline_scope`'s deadline, or ``None``."""
    return _current.get()


class deadline_scope:
    """Publish a deadline ``seconds`` from now (or a :class:`Deadline`) to the code in the block.

    A scope never extends an enclosing one: the earlier deadline wins. ``None`` publishes
    nothing new (the enclosing deadline, if any, stays). ``as`` gives the deadline in force.
    (A class, not a generator: it is on the path of every guarded call.)
    """

    __slots__ = ("_seconds", "_token")

    def __init__(self, seconds: float | Deadline | None) -> None:
        self._seconds = seconds
        self._token: contextvars.Token[Deadline | None] | None = None

    def __enter__(self) -> Deadline | None:
        outer = _current.get()
        seconds = self._seconds
        if seconds is None:
            return outer
        deadline = seconds if isinstance(seconds, Deadline) else Deadline(seconds)
        if outer is not None and outer.at <= deadline.at and outer.clock is deadline.clock:
            return outer
        if outer is not None and outer.remaining() < deadline.remaining():
            deadline = outer
        self._token = _current.set(deadline)
        return deadline

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _current.reset(self._token)
            self._token = None


def with_timeout(
    fn: Callable[P, T], seconds: float | None, /, *args: P.args, **kwargs: P.kwargs
) -> T:
    """Return ``fn(*args, **kwargs)``, or raise ``CallTimeout`` after ``seconds``.

    ::

        text = with_timeout(legacy_client.fetch, 10.0, "report.csv")

    ``fn`` runs in a new daemon thread (with a copy of the caller's context variables, so
    :func:`current_deadline` works inside it). Its exception is re-raised unchanged.

    **Caveat: on timeout the thread is abandoned, not stopped.** Python cannot kill a thread:
    ``fn`` keeps running in the background until it returns by itself, keeps any connection or
    file it holds, and its side effects still happen; its result is discarded. A daemon thread
    does not keep the interpreter alive at exit. Integrations must instead pass deadlines to
    their I/O (socket and HTTP timeouts, SDK timeouts, killing subprocesses); use this only for
    code that offers no timeout. ``seconds=None`` calls ``fn`` directly in this thread.
    """
    if seconds is None:
        return fn(*args, **kwargs)
    if seconds < 0:
        raise ConfigurationError(f"must not be negative, got {seconds}", field="timeout")
    done = threading.Event()
    outcome: list[tuple[bool, object]] = []
    context = contextvars.copy_context()

    def run() -> None:
        try:
            outcome.append((True, context.run(fn, *args, **kwargs)))
        except BaseException as exc:  # handed to the caller, never lost in the thread
            outcome.append((False, exc))
        finally:
            done.set()

    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    thread = threading.Thread(target=run, name=f"flowstone-timeout:{name}", daemon=True)
    thread.start()
    if not done.wait(seconds):
        raise CallTimeout(
            f"{name} did not finish within {seconds:g} s (its thread was abandoned and may "
            "still be running)",
            timeout=seconds,
        )
    ok, value = outcome[0]
    if not ok:
        assert isinstance(value, BaseException)
        raise value
    return value  # type: ignore[return-value]
