"""Calls that take a while, reporting when and where they ran."""

import os
import time


def sleep_span(seconds: float) -> tuple[int, float, float]:
    """Sleep; return (worker pid, start, end) in wall-clock seconds."""
    started = time.time()
    time.sleep(seconds)
    return os.getpid(), started, time.time()


def cpu_work(n: int) -> int:
    """Pure-Python CPU work (about 1 ms per 20,000 on a typical core)."""
    return sum(i * i for i in range(n))
