"""with_timeout (and its abandoned thread), Deadline and deadline scopes."""

from __future__ import annotations

import threading
import time

import pytest

from flowstone_dagster.errors import CallTimeout, ConfigurationError
from flowstone_dagster.resilience import Deadline, current_deadline, deadline_scope, with_timeout


def test_returns_the_result_in_time() -> None:
    assert with_timeout(lambda x: x * 2, 5.0, 21) == 42


def test_reraises_the_functions_error_unchanged() -> None:
    error = ValueError("bad input")

    def boom() -> None:
        raise error

    with pytest.raises(ValueError, match="bad input") as caught:
        with_timeout(boom, 5.0)
    assert caught.value is error


def test_times_out_and_the_thread_keeps_running() -> None:
    release = threading.Event()
    finished = threading.Event()

    def stuck() -> None:
        release.wait(10)
        finished.set()

    started = time.monotonic()
    with pytest.raises(CallTimeout, match="abandoned") as caught:
        with_timeout(stuck, 0.1)
    assert 0.1 <= time.monotonic() - started < 1.0
    assert caught.value.timeout == 0.1
    # The documented caveat: the thread was not stopped; it finishes when fn does.
    abandoned = [t for t in threading.enumerate() if t.name.startswith("flowstone-timeout:")]
    assert any(t.is_alive() for t in abandoned)
    release.set()
    assert finished.wait(5)


def test_none_means_no_timeout_and_no_thread() -> None:
    assert with_timeout(threading.current_thread, None) is threading.current_thread()
    with pytest.raises(ConfigurationError, match="timeout"):
        with_timeout(lambda: None, -1)


def test_the_deadline_reaches_the_thread() -> None:
    with deadline_scope(30.0):
        remaining = with_timeout(lambda: current_deadline().remaining(), 5.0)  # type: ignore[union-attr]
    assert 29 < remaining <= 30


def test_deadline() -> None:
    deadline = Deadline(10.0)
    assert 9.9 < deadline.remaining() <= 10
    assert deadline.timeout(default=3.0) == 3.0
    assert not deadline.expired
    deadline.check()
    expired = Deadline(0.0)
    assert expired.expired
    assert expired.remaining() == 0.0
    with pytest.raises(CallTimeout, match="reading the header passed its 0 s deadline"):
        expired.check("reading the header")


def test_scopes_never_extend_an_outer_deadline() -> None:
    assert current_deadline() is None
    with deadline_scope(5.0) as outer:
        with deadline_scope(60.0) as inner:
            assert inner is outer
        with deadline_scope(1.0) as tighter:
            assert tighter is not None
            assert tighter.remaining() <= 1.0
            assert current_deadline() is tighter
        with deadline_scope(None) as same:
            assert same is outer
        assert current_deadline() is outer
    assert current_deadline() is None
