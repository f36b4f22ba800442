"""What a Celery deployment's event log says about where steps ran."""

from __future__ import annotations

import dagster as dg


def step_workers(instance: dg.DagsterInstance, run_id: str) -> dict[str, str]:
    """Each step of the run and the Celery worker that executed it (the last one, when it was
    retried), from the engine event dagster-celery records in the worker
    (``Executing steps ... in celery worker``, metadata ``Celery worker``)."""
    workers: dict[str, str] = {}
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        event = entry.dagster_event
        if event is None or not entry.step_key:
            continue
        data = event.event_specific_data
        metadata = getattr(data, "metadata", None) or {}
        worker = metadata.get("Celery worker")
        if worker is not None:
            workers[entry.step_key] = str(getattr(worker, "value", worker))
    return workers
