"""The Python worker pool against its floor and against Dagster Pipes, in one run.

    .venv/bin/python bench/python_worker.py [--calls 3000] [--pipes-calls 15] [--rounds 3]

(a) Round-trip latency (p50, p99) of ``test_module.add(2, 3)``:
    - *floor*: a raw subprocess echoing the same frames (same 15-byte header, same pickled
      request) over a pipe; no pickling, no pool, no telemetry;
    - *pool*: ``WorkerPool.call`` on a warm worker (size 1), through the one resilience path
      (``resolve(None).call``: one attempt, ``flowstone.resilience.call`` telemetry);
    - *resource*: ``PythonWorkerResource.call`` (the pool plus the one Dagster mapping);
    - *pipes*: Dagster's ``PipesSubprocessClient`` running the same function, one process per
      call (what Dagster offers for code in another environment), inside ``materialize``.
    Aim: pool within 1.5x of the floor. Then where the pool's time goes: the one resilience
    path alone (``resolve(None).call`` of a no-op), one ``telemetry.emit``, and the worker's own
    side (unpickle the request, find the function, call it, pickle the result, build the frame),
    each timed in this process.
(b) Throughput, pool size 1 vs 2, for trivial calls and for ~5 ms of pure-Python CPU work per
    call, both through ``map``. Aim: >= 1.6x for CPU work on 2 cores.
(c) A 1,000,000-float64 numpy array sent and returned, against ``pickle.dumps`` + ``loads`` of
    it in this process.

Rounds alternate the contenders; each figure is the median over rounds.
"""

import argparse
import logging
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import dagster as dg  # noqa: E402
import numpy as np  # noqa: E402

from flowstone_dagster import telemetry  # noqa: E402
from flowstone_dagster.python_worker import PythonWorkerResource  # noqa: E402
from flowstone_dagster.python_worker import _main as wire  # noqa: E402
from flowstone_dagster.python_worker.pool import WorkerPool  # noqa: E402
from flowstone_dagster.python_worker.process import WorkerSpec  # noqa: E402
from flowstone_dagster.resilience import resolve  # noqa: E402

WORKER_MODULES = str(ROOT / "flowstone_dagster_tests" / "python_worker" / "worker_modules")
SPEC = WorkerSpec(python=sys.executable, paths=(WORKER_MODULES,))

# The floor: read one frame (header, then the rest), write it back. Nothing else.
ECHO = r"""
import os, struct
HEADER = struct.Struct("<BHIQ")
while True:
    data = os.read(0, 65536)
    if not data:
        break
    kind, meta, count, payload = HEADER.unpack_from(data)
    need = HEADER.size + 8 * count + meta + payload
    while len(data) < need:
        data += os.read(0, need - len(data))
    os.write(1, data)
"""

PIPES_SCRIPT = textwrap.dedent(
    f"""
    import sys
    sys.path.insert(0, {WORKER_MODULES!r})
    from dagster_pipes import open_dagster_pipes
    import test_module

    with open_dagster_pipes() as pipes:
        pipes.report_custom_message(test_module.add(2, 3))
    """
)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def floor_latencies(calls: int) -> list[float]:
    payload, _ = wire.dumps(("test_module", "add", (2, 3), {}))
    (frame,) = wire.frame_parts(wire.CALL, "test_module:add", payload)
    echo = subprocess.Popen(
        [sys.executable, "-c", ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert echo.stdin is not None
    assert echo.stdout is not None
    write_fd, read_fd = echo.stdin.fileno(), echo.stdout.fileno()
    samples = []
    try:
        for _ in range(calls):
            started = time.perf_counter()
            os.write(write_fd, frame)
            answer = os.read(read_fd, 65536)
            samples.append(time.perf_counter() - started)
            assert len(answer) == len(frame)
    finally:
        echo.stdin.close()
        echo.wait()
        echo.stdout.close()
    return samples


def pool_latencies(pool: WorkerPool, calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        assert pool.call("test_module", "add", (2, 3)) == 5
        samples.append(time.perf_counter() - started)
    return samples


def resource_latencies(resource: PythonWorkerResource, calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        assert resource.call("test_module", "add", (2, 3)) == 5
        samples.append(time.perf_counter() - started)
    return samples


def per_call(fn: Callable[[], object], calls: int) -> float:
    """Median seconds of ``fn()`` over 5 batches of ``calls``."""
    batches = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        batches.append((time.perf_counter() - started) / calls)
    return statistics.median(batches)


def worker_side() -> Callable[[], object]:
    """What a worker does per call, minus the pipe: unpickle, resolve, call, pickle, frame."""
    sys.path.insert(0, WORKER_MODULES)
    worker = wire.Worker(-1, -1)
    payload, _ = wire.dumps(("test_module", "add", (2, 3), {}))

    def once() -> object:
        module, function, args, kwargs = wire.loads(payload, [])
        result = worker.resolve(module, function)(*args, **kwargs)
        body, buffers = wire.dumps(result)
        return wire.frame_parts(wire.RESULT, wire.type_name(result), body, buffers)

    return once


def breakdown(calls: int) -> list[tuple[str, float]]:
    """In-process costs of the pieces of one pool call (seconds each)."""
    path = resolve(None)
    return [
        ("resolve(None).call(no-op)", per_call(lambda: path.call("bench", int), calls)),
        ("telemetry.emit (1 event)", per_call(lambda: telemetry.emit("bench.event"), calls)),
        ("worker side without pipe", per_call(worker_side(), calls)),
    ]


def pipes_latencies(calls: int) -> list[float]:
    samples: list[float] = []
    with tempfile.TemporaryDirectory() as directory:
        script = Path(directory) / "pipes_add.py"
        script.write_text(PIPES_SCRIPT)

        @dg.asset
        def pipes_calls(
            context: dg.AssetExecutionContext, pipes: dg.PipesSubprocessClient
        ) -> dg.MaterializeResult:
            for _ in range(calls):
                started = time.perf_counter()
                invocation = pipes.run(context=context, command=[sys.executable, str(script)])
                messages = invocation.get_custom_messages()
                samples.append(time.perf_counter() - started)
                assert list(messages) == [5], messages
            return invocation.get_materialize_result()  # Pipes insists on one being returned

        with dg.DagsterInstance.ephemeral() as instance, warnings.catch_warnings():
            # Pipes reads a preview property of its own message reader on every call; nothing a
            # bench reader can act on.
            warnings.filterwarnings("ignore", category=dg.PreviewWarning)
            dg.materialize(
                [pipes_calls],
                resources={"pipes": dg.PipesSubprocessClient()},
                instance=instance,
                # The run's console log (every event at DEBUG, one INFO line per Pipes call)
                # would otherwise be printed between the tables.
                run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
            )
    return samples


def throughput(size: int, function: str, items: list[int], rounds: int) -> float:
    """Calls per second through map, best of the rounds' medians."""
    with WorkerPool(SPEC, size=size) as pool:
        pool.start()
        pool.map("slow" if function == "cpu_work" else "test_module", function, items[:10])
        rates = []
        for _ in range(rounds):
            started = time.perf_counter()
            if function == "cpu_work":
                pool.map("slow", "cpu_work", items)
            else:
                pool.map("test_module", "echo", items)
            rates.append(len(items) / (time.perf_counter() - started))
    return statistics.median(rates)


def timed(fn: Callable[[], object], repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat


def latency(args: argparse.Namespace) -> None:
    """(a): round trips against the floor and Pipes, and where the pool's time goes."""
    floor: list[float] = []
    ours: list[float] = []
    via_resource: list[float] = []
    resource = PythonWorkerResource(paths=[WORKER_MODULES], pool_size=1)
    with WorkerPool(SPEC, size=1) as pool:
        pool.start()
        resource.start()
        pool_latencies(pool, 500)  # warm: module imported, caches hot
        resource_latencies(resource, 500)
        floor_latencies(500)
        p50s: dict[str, list[float]] = {"floor": [], "pool": [], "resource": []}
        for _ in range(args.rounds):
            round_floor = floor_latencies(args.calls)
            round_ours = pool_latencies(pool, args.calls)
            round_resource = resource_latencies(resource, args.calls)
            p50s["floor"].append(statistics.median(round_floor))
            p50s["pool"].append(statistics.median(round_ours))
            p50s["resource"].append(statistics.median(round_resource))
            floor += round_floor
            ours += round_ours
            via_resource += round_resource
    resource.close()
    pipes = pipes_latencies(args.pipes_calls)
    floor_p50, ours_p50 = statistics.median(p50s["floor"]), statistics.median(p50s["pool"])
    resource_p50 = statistics.median(p50s["resource"])
    pipes_p50 = statistics.median(pipes)
    print("\n(a) round trip of test_module.add(2, 3)")
    print(f"{'':28}{'p50':>12}{'p99':>12}{'p50 vs floor':>15}")
    rows = [
        ("raw pipe echo (floor)", floor_p50, percentile(floor, 0.99)),
        ("WorkerPool.call", ours_p50, percentile(ours, 0.99)),
        ("PythonWorkerResource.call", resource_p50, percentile(via_resource, 0.99)),
        ("PipesSubprocessClient.run", pipes_p50, percentile(pipes, 0.99)),
    ]
    for name, p50, p99 in rows:
        print(f"{name:28}{p50 * 1e6:>10.1f}us{p99 * 1e6:>10.1f}us{p50 / floor_p50:>14.2f}x")
    print(f"pool vs Pipes: {pipes_p50 / ours_p50:,.0f}x faster per call")
    print("where a pool call's time goes (in-process, per call):")
    for name, seconds in breakdown(args.calls):
        print(f"  {name:30}{seconds * 1e6:>8.1f}us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--pipes-calls", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("dagster").setLevel(logging.ERROR)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs (shared machine)")

    latency(args)

    # (b) throughput ---------------------------------------------------------------------------
    print("\n(b) throughput through map (calls/s)")
    trivial = list(range(4000))
    cpu = [100_000] * 200
    one_trivial = throughput(1, "echo", trivial, args.rounds)
    two_trivial = throughput(2, "echo", trivial, args.rounds)
    one_cpu = throughput(1, "cpu_work", cpu, args.rounds)
    two_cpu = throughput(2, "cpu_work", cpu, args.rounds)
    print(f"{'':28}{'size 1':>12}{'size 2':>12}{'2 vs 1':>10}")
    print(
        f"{'trivial calls':28}{one_trivial:>12,.0f}{two_trivial:>12,.0f}"
        f"{two_trivial / one_trivial:>9.2f}x"
    )
    print(
        f"{'~5 ms CPU work per call':28}{one_cpu:>12,.1f}{two_cpu:>12,.1f}"
        f"{two_cpu / one_cpu:>9.2f}x"
    )

    # (c) a large array ------------------------------------------------------------------------
    array = np.random.default_rng(0).random(1_000_000)
    with WorkerPool(SPEC, size=1) as pool:
        pool.start()
        pool.call("test_module", "echo", (array,))
        worker_s, local_s = [], []
        for _ in range(args.rounds):
            worker_s.append(timed(lambda: pool.call("test_module", "echo", (array,)), 10))
            local_s.append(timed(lambda: pickle.loads(pickle.dumps(array, protocol=5)), 10))  # noqa: S301
    worker, local = statistics.median(worker_s), statistics.median(local_s)
    print("\n(c) 1,000,000 float64 (8 MB)")
    print(f"{'in-process pickle dumps+loads':36}{local * 1e3:>8.2f} ms")
    print(f"{'sent to a worker and returned':36}{worker * 1e3:>8.2f} ms  ({worker / local:.2f}x)")
    print(f"{'':36}{2 * array.nbytes / worker / 1e9:>8.2f} GB/s moved (both ways)")


if __name__ == "__main__":
    main()
