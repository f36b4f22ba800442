"""Functions that kill, hang or exhaust the worker running them."""

import ctypes
import os
import signal
import subprocess
import threading
from pathlib import Path


def exit_now(code: int) -> None:
    os._exit(code)


def kill_self(signum: int) -> None:
    """What the OOM killer does: SIGKILL, no clean-up."""
    os.kill(os.getpid(), signum)
    threading.Event().wait()


def segfault() -> None:
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def abort() -> None:
    os.abort()


def hang() -> None:
    threading.Event().wait()


def hang_with_child(pid_file: str) -> None:
    """Start a child process (in the worker's process group), record its pid, then hang."""
    child = subprocess.Popen(["sleep", "1000"])
    Path(pid_file).write_text(str(child.pid))
    threading.Event().wait()


def allocate(megabytes: int) -> int:
    return len(bytearray(megabytes * 1024 * 1024))


def misbehave(mode: str) -> None:
    """One of the ways a worker can die or hang, by name."""
    if mode == "exit":
        exit_now(3)
    elif mode == "sigkill":
        kill_self(signal.SIGKILL)
    elif mode == "segfault":
        segfault()
    elif mode == "abort":
        abort()
    elif mode == "hang":
        hang()
    raise ValueError(f"unknown mode {mode!r}")


def crash_once(marker: str) -> str:
    """Dies on the first call (no marker file yet), succeeds on the next."""
    path = Path(marker)
    if not path.exists():
        path.write_text("crashed once")
        os._exit(9)
    return "second attempt"


_held: list[threading.Thread] = []


def starve_threads_then_sigint() -> int:
    """What OpenBLAS does when ``pthread_create`` fails (its ``blas_thread_init``): start
    threads until the address space has no room for another stack, keep them, then raise
    SIGINT on itself."""
    hold = threading.Event()
    while True:
        thread = threading.Thread(target=hold.wait, daemon=True)
        try:
            thread.start()
        except RuntimeError:  # "can't start new thread"
            break
        _held.append(thread)
    signal.raise_signal(signal.SIGINT)
    return len(_held)  # not reached: the SIGINT raised KeyboardInterrupt
