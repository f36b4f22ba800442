"""Python and ML code in warm, isolated, killable worker processes.

- :mod:`.resource`: :class:`PythonWorkerResource`, the Dagster resource;
- :mod:`.pool`: :class:`WorkerPool` (queueing, crash and timeout recovery; testable without
  Dagster);
- :mod:`.process`: one worker process (:class:`WorkerSpec`); :mod:`._main`: the program a
  worker runs; :mod:`.output`: worker logs; :mod:`.errors`: what can go wrong.

The guide is ``docs/python_worker.md``.
"""

from flowstone_dagster.python_worker.errors import (
    WorkerDataError,
    WorkerMemoryExceeded,
    WorkerPoolBusy,
)
from flowstone_dagster.python_worker.pool import WorkerPool
from flowstone_dagster.python_worker.process import WorkerSpec
from flowstone_dagster.python_worker.resource import PythonWorkerResource

__all__ = [
    "PythonWorkerResource",
    "WorkerDataError",
    "WorkerMemoryExceeded",
    "WorkerPool",
    "WorkerPoolBusy",
    "WorkerSpec",
]
