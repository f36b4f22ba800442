"""Crashes, hangs, memory blow-ups, orphans and queueing, counted in real OS processes."""

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from flowstone_dagster.errors import CallTimeout, PythonWorkerError, WorkerCrashed, is_retryable
from flowstone_dagster.python_worker import (
    PythonWorkerResource,
    WorkerMemoryExceeded,
    WorkerPoolBusy,
)
from flowstone_dagster.python_worker.pool import WorkerPool
from flowstone_dagster.python_worker.process import DEFAULT_MEMORY_LIMIT_MB, WorkerSpec

pytestmark = pytest.mark.workers

WORKER_MODULES = str(Path(__file__).parent / "worker_modules")
SPEC = WorkerSpec(python=sys.executable, paths=(WORKER_MODULES,))


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) of a process, from /proc; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2])


def worker_processes(parent: int | None = None) -> dict[int, str]:
    """pid -> state of the worker processes of ``parent`` (default: this test process).

    A worker is a child that leads its own process group (the pool starts each one with
    ``start_new_session``). Its command line is no test: for a moment after ``Popen`` returns,
    ``/proc/<pid>/cmdline`` of a process that is still inside ``execve`` can be empty.
    """
    parent = os.getpid() if parent is None else parent
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] == parent and stat[2] == int(entry):
                found[int(entry)] = stat[0]
    return found


def is_running(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def wait_for_exit(pids: list[int], timeout: float) -> list[int]:
    """Block on pidfds until every process in ``pids`` has exited; the ones still running."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            continue
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    waiting = set(fds)
    while waiting and time.monotonic() < deadline:
        for fd, _event in poller.poll(max(int((deadline - time.monotonic()) * 1000), 1)):
            waiting.discard(fd)
            poller.unregister(fd)
    for fd in fds:
        os.close(fd)
    return [fds[fd] for fd in waiting]


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    with WorkerPool(SPEC, size=2, timeout=60) as pool:
        pool.start()
        yield pool
    assert worker_processes() == {}


# -- a crash costs one call ----------------------------------------------------------------------

CRASHES = [
    ("crashing", "exit_now", (3,), {"exit_code": 3, "signal": None}, "exited with code 3"),
    ("crashing", "kill_self", (signal.SIGKILL,), {"exit_code": None, "signal": 9}, "OOM killer"),
    ("crashing", "segfault", (), {"exit_code": None, "signal": 11}, "SIGSEGV"),
    ("crashing", "abort", (), {"exit_code": None, "signal": 6}, "SIGABRT"),
]


@pytest.mark.parametrize(
    ("module", "function", "args", "expected", "text"),
    CRASHES,
    ids=[c[1] for c in CRASHES],
)
def test_a_dying_worker_fails_only_its_call(
    pool: WorkerPool,
    module: str,
    function: str,
    args: tuple[int, ...],
    expected: dict[str, int | None],
    text: str,
) -> None:
    before = set(pool.pids())
    with pytest.raises(WorkerCrashed) as raised:
        pool.call(module, function, args)
    error = raised.value
    assert {"exit_code": error.exit_code, "signal": error.signal} == expected
    assert text in str(error)
    assert f"while running {module}.{function}" in str(error)
    assert is_retryable(error)
    # the pool refilled: still two workers, one of them new, and calls work
    after = set(pool.pids())
    assert len(after) == 2
    assert len(after - before) == 1
    assert set(worker_processes()) == after
    assert pool.map("test_module", "add", range(4), kwargs={"b": 1}) == [1, 2, 3, 4]


def test_a_segfault_report_quotes_the_python_traceback(pool: WorkerPool) -> None:
    with pytest.raises(WorkerCrashed) as raised:
        pool.call("crashing", "segfault")
    message = str(raised.value)
    assert "last stderr lines:" in message
    assert "Fatal Python error: Segmentation fault" in message
    assert 'crashing.py", line' in message  # faulthandler's traceback of the crash site


def test_a_memory_blow_up_is_a_memory_error_with_a_limit() -> None:
    spec = WorkerSpec(python=sys.executable, paths=(WORKER_MODULES,), memory_limit_mb=600)
    with WorkerPool(spec, size=1) as limited:
        limited.start()
        (pid,) = limited.pids()
        with pytest.raises(WorkerMemoryExceeded) as raised:
            limited.call("crashing", "allocate", (4096,))
        error = raised.value
        assert isinstance(error, PythonWorkerError)
        assert error.remote_type == "MemoryError"
        assert error.memory_limit_mb == 600
        assert error.reason == "allocation"
        assert "worker exceeded its memory limit of 600 MB (memory_limit_mb" in str(error)
        assert not is_retryable(error)  # the same call would blow up again
        assert limited.pids() == [pid]  # a plain MemoryError: the worker lived through it
        assert limited.call("crashing", "allocate", (10,)) == 10 * 1024 * 1024


def test_a_thread_that_cannot_start_is_a_memory_error_not_a_keyboard_interrupt() -> None:
    """OpenBLAS raises SIGINT on itself when it cannot start its threads: under a memory limit
    that used to surface as ``PythonWorkerError: KeyboardInterrupt:``."""
    spec = WorkerSpec(python=sys.executable, paths=(WORKER_MODULES,), memory_limit_mb=300)
    with WorkerPool(spec, size=1) as limited:
        limited.start()
        (pid,) = limited.pids()
        with pytest.raises(WorkerMemoryExceeded) as raised:
            limited.call("crashing", "starve_threads_then_sigint")
        error = raised.value
        assert error.reason == "thread"
        assert error.remote_type == "KeyboardInterrupt"
        assert str(error).startswith(
            "[python_worker] worker exceeded its memory limit of 300 MB (memory_limit_mb"
        )
        assert "a native library could not start a thread" in str(error)
        # a worker whose native libraries failed half-way is replaced
        assert limited.pids() != [pid]
        assert limited.call("crashing", "allocate", (10,)) == 10 * 1024 * 1024


def _numpy_under(limit: int) -> str:
    """``import numpy`` (and a small array) in a worker limited to ``limit`` MB: how it went."""
    spec = WorkerSpec(python=sys.executable, paths=(WORKER_MODULES,), memory_limit_mb=limit)
    with WorkerPool(spec, size=1) as limited:
        try:
            limited.call("numpy", "zeros", (3,))
        except WorkerMemoryExceeded as exc:
            return f"{exc.reason}: {exc}"
        except WorkerCrashed as exc:  # OpenBLAS exits when its buffers cannot be allocated
            return f"crash: {exc}"
    return "ok"


def test_import_numpy_under_tight_limits_says_memory_limit() -> None:
    """A real library: every limit too tight for ``import numpy`` is reported as a memory
    limit (never ``KeyboardInterrupt:``), whichever way numpy's native code failed."""
    outcomes = {limit: _numpy_under(limit) for limit in (64, 128, 192, 256)}
    failed = {limit: text for limit, text in outcomes.items() if text != "ok"}
    assert 64 in failed  # 64 MB never holds numpy's shared libraries
    for limit, text in failed.items():
        assert text.split(":")[0] in {"allocation", "map", "thread", "crash"}, text
        assert f"memory limit of {limit} MB (memory_limit_mb" in text, text
        assert "KeyboardInterrupt:" not in text.splitlines()[0]


def test_default_memory_limit_applies_and_none_disables_it() -> None:
    import resource as rlimits

    assert DEFAULT_MEMORY_LIMIT_MB == 4096
    assert PythonWorkerResource().memory_limit_mb == 4096
    assert WorkerSpec(python=sys.executable).memory_limit_mb == 4096
    limited = PythonWorkerResource(pool_size=1)
    unlimited = PythonWorkerResource(pool_size=1, memory_limit_mb=None)
    try:
        soft, hard = limited.call("resource", "getrlimit", (rlimits.RLIMIT_AS,))
        assert soft == hard == 4096 * 1024 * 1024
        assert limited.call("numpy", "arange", (3,)).tolist() == [0, 1, 2]  # numpy fits
        soft, _hard = unlimited.call("resource", "getrlimit", (rlimits.RLIMIT_AS,))
        assert soft == rlimits.RLIM_INFINITY
    finally:
        limited.close()
        unlimited.close()


def test_a_memory_error_through_the_resource_is_a_failure_naming_the_limit() -> None:
    workers = PythonWorkerResource(paths=[WORKER_MODULES], pool_size=1, memory_limit_mb=300)
    try:
        with pytest.raises(dg.Failure) as raised:
            workers.call("crashing", "allocate", (2048,))
    finally:
        workers.close()
    failure = raised.value
    assert "worker exceeded its memory limit of 300 MB (memory_limit_mb" in str(failure.description)
    assert not failure.allow_retries
    assert isinstance(failure.__cause__, WorkerMemoryExceeded)
    assert failure.metadata["flowstone/error_type"].value == "WorkerMemoryExceeded"


# -- timeouts ------------------------------------------------------------------------------------


def test_a_call_past_its_timeout_kills_the_worker_and_its_children(
    pool: WorkerPool, tmp_path: Path
) -> None:
    pid_file = tmp_path / "child.pid"
    before = set(pool.pids())
    started = time.monotonic()
    with pytest.raises(CallTimeout) as raised:
        pool.call("crashing", "hang_with_child", (str(pid_file),), timeout=1.0)
    elapsed = time.monotonic() - started
    assert raised.value.timeout == 1.0
    assert "crashing.hang_with_child did not finish within 1 s" in str(raised.value)
    assert is_retryable(raised.value)
    assert 1.0 <= elapsed < 30  # generous: the machine is shared
    child = int(pid_file.read_text())
    assert wait_for_exit([child], timeout=10) == []  # killed with its worker's process group
    assert not is_running(child)
    after = set(pool.pids())
    assert len(after) == 2
    assert len(after - before) == 1
    assert pool.call("test_module", "add", (2, 3)) == 5


def test_the_default_timeout_applies_and_a_call_can_override_it() -> None:
    with WorkerPool(SPEC, size=1, timeout=0.5) as short:
        with pytest.raises(CallTimeout):
            short.call("slow", "sleep_span", (30,))
        pid, started, ended = short.call("slow", "sleep_span", (0.8,), timeout=30)
        assert ended - started >= 0.8
        assert short.pids() == [pid]


# -- no orphans ----------------------------------------------------------------------------------


def test_two_hundred_crashes_and_timeouts_leave_exactly_the_pool_then_nothing() -> None:
    modes = ["exit", "sigkill", "segfault", "abort", "hang"] * 40
    with WorkerPool(SPEC, size=2, timeout=0.5) as pool:
        results = pool.map("crashing", "misbehave", modes, return_exceptions=True)
        assert len(results) == 200
        for mode, result in zip(modes, results, strict=True):
            expected = CallTimeout if mode == "hang" else WorkerCrashed
            assert isinstance(result, expected), (mode, result)
        processes = worker_processes()
        assert sorted(processes) == sorted(pool.pids())
        assert len(processes) == 2  # exactly the pool size, and no zombie among them
        assert "Z" not in processes.values()
        assert pool.call("test_module", "add", (1, 1)) == 2
    assert worker_processes() == {}


def test_workers_exit_by_themselves_when_the_parent_dies(tmp_path: Path) -> None:
    child_fifo = tmp_path / "child"
    os.mkfifo(child_fifo)
    parent_script = tmp_path / "parent.py"
    parent_script.write_text(
        textwrap.dedent(
            f"""
            import sys
            from flowstone_dagster.python_worker.pool import WorkerPool
            from flowstone_dagster.python_worker.process import WorkerSpec

            pool = WorkerPool(WorkerSpec(python=sys.executable, paths=({WORKER_MODULES!r},)),
                              size=2)
            pool.start()
            busy = pool.submit("crashing", "hang_with_child", ({str(child_fifo)!r},))
            print(*pool.pids(), flush=True)
            busy.result()   # hangs: the test kills this process
            """
        )
    )
    parent = subprocess.Popen(
        [sys.executable, str(parent_script)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == 2
        assert set(worker_processes(parent.pid)) == set(workers)
        # The hanging call writes its child's pid into a FIFO: reading it blocks until then.
        child = int(child_fifo.read_text())
    finally:
        parent.kill()  # SIGKILL: no clean-up code runs in the parent
        parent.wait()
    # The idle worker and the busy one (and the busy one's child) all end by themselves.
    assert wait_for_exit([*workers, child], timeout=30) == []


# -- queueing ------------------------------------------------------------------------------------


def test_slow_calls_on_n_workers_run_in_parallel(pool: WorkerPool) -> None:
    started = time.monotonic()
    spans = pool.map("slow", "sleep_span", [2.0, 2.0])
    elapsed = time.monotonic() - started
    (pid_a, start_a, end_a), (pid_b, start_b, end_b) = spans
    assert pid_a != pid_b
    assert max(start_a, start_b) < min(end_a, end_b)  # the two calls overlapped
    assert elapsed < 3.9  # about one call's time (2 s); in series it would be 4 s


def test_calls_queue_up_to_max_queued_then_are_refused() -> None:
    with WorkerPool(SPEC, size=1, max_queued=1) as single:
        single.start()
        running = single.submit("slow", "sleep_span", (1.0,))
        queued = single.submit("test_module", "add", (1, 2))
        with pytest.raises(WorkerPoolBusy) as raised:
            single.submit("test_module", "add", (3, 4))
        assert "max_queued=1" in str(raised.value)
        assert is_retryable(raised.value)
        assert queued.result(timeout=60) == 3
        assert running.result(timeout=60)[0] == single.pids()[0]
        # map paces itself: any number of items, never refused
        assert single.map("test_module", "add", range(10), kwargs={"b": 0}) == list(range(10))


def test_a_call_waits_for_a_free_worker_up_to_queue_timeout() -> None:
    with WorkerPool(SPEC, size=1, queue_timeout=0.5) as single:
        single.start()
        futures = [single.submit("slow", "sleep_span", (2.0,)) for _ in range(2)]
        outcomes = [f.exception(timeout=60) for f in futures]
    # one ran; the other waited 0.5 s for the busy worker and gave up
    assert sum(outcome is None for outcome in outcomes) == 1
    (waited,) = [o for o in outcomes if o is not None]
    assert isinstance(waited, CallTimeout)
    assert "no worker became free within 0.5 s" in str(waited)


def test_workers_are_recycled_after_max_calls() -> None:
    with WorkerPool(SPEC, size=1, max_calls_per_worker=3) as recycling:
        pids = [recycling.call("test_module", "whoami")["pid"] for _ in range(7)]
        assert len(worker_processes()) == 1
    assert pids[0] == pids[1] == pids[2] != pids[3]
    assert pids[3] == pids[4] == pids[5] != pids[6]
    assert worker_processes() == {}
