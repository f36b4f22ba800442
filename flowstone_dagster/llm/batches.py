"""Batch jobs: Anthropic's Message Batches and OpenAI's Batch API, for bulk work at half price.

::

    results = llm.batch([f"Classify: {row}" for row in rows], job="classify-2025-01-15")
    for result in results:                  # in input order
        result.response.text if result.ok else result.error

Submitting, polling and fetching go through the resource's governed SDK client (breaker, rpm
limit, retries, telemetry; :mod:`.governed`): Anthropic ``POST /v1/messages/batches``, then
``GET`` it until ``processing_status`` is ``ended``, then its ``results_url`` (JSONL);
OpenAI: the requests uploaded as a JSONL file (``purpose=batch``), ``POST /v1/batches``
(``/v1/chat/completions``, 24 h), ``GET`` it until ``completed``, then the output file
(answered items) and the error file (failed ones). Each item's request is built as
:meth:`LLMClient.chat <.client.LLMClient.chat>` builds one (same wire format; ``custom_id``
``<job>-<index>``). Polls back off from ``poll_interval`` to
``max_poll_interval``.

Results come back in input order, one :class:`BatchResult` per prompt: the reply, or the
provider's error for that item (per-item errors never fail the whole batch). Each answered
item emits ``flowstone.llm.call`` (``batch=True``, tokens), so the usage reaches the step's
metadata.

**Resumable.** Inside an asset, the batch is recorded as an ``AssetObservation`` of the
step's assets as soon as it is submitted: ``flowstone/llm/batch_id``,
``flowstone/llm/batch_job`` and ``flowstone/llm/batch_fingerprint`` (:func:`fingerprint`: a
SHA-256 of the exact items, custom ids and request bodies). Before submitting,
:func:`find_batches` looks for ``job``'s batches recorded by the step's assets in this run's
event log and in those of the runs it re-executes, up the ``parent_run_id`` chain to the root,
newest first; the newest with the same fingerprint is polled and collected instead of
submitted (and paid for) again (a re-executing run records it too, with
``flowstone/llm/batch_resumed_from`` naming the run it was found in). So a step retry in the
same run and a re-execution of a run that failed after submitting (from failure, in the UI)
resume it; an unrelated new run of the same job never does. A recorded batch for other
requests (the inputs changed) is not resumed: a new one is submitted, and the step log says
why. A found OpenAI batch that ended ``failed``, ``expired`` or ``cancelled`` is submitted
again, with a warning naming its id and status (a batch submitted by this attempt that ends
so raises); Anthropic's canceled or expired items are item errors. A batch that is not done
within ``max_wait`` raises, with Dagster errors on, ``RetryRequested`` (the step is retried
later and resumes it), otherwise :class:`BatchPending` carrying ``batch_id``.
"""

from __future__ import annotations

import hashlib
import io
import json as jsonlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dagster as dg
import openai
import pydantic

from flowstone_dagster import telemetry
from flowstone_dagster.errors import ConfigurationError, FlowstoneError
from flowstone_dagster.llm import usage as usage_module
from flowstone_dagster.llm.messages import LLMResponse, Prompt, System
from flowstone_dagster.llm.providers import anthropic_response, openai_response

if TYPE_CHECKING:
    from flowstone_dagster.llm.client import LLMClient

__all__ = [
    "BatchPending",
    "BatchResult",
    "RecordedBatch",
    "find_batches",
    "fingerprint",
    "run_batch",
]

BATCH_ID_KEY = "flowstone/llm/batch_id"
BATCH_JOB_KEY = "flowstone/llm/batch_job"
BATCH_FINGERPRINT_KEY = "flowstone/llm/batch_fingerprint"
BATCH_RESUMED_FROM_KEY = "flowstone/llm/batch_resumed_from"  # the run it was found in
#: What OpenAI calls a batch that will never complete (Anthropic's end per item instead).
ENDED_BADLY = frozenset({"failed", "expired", "cancelled"})

logger = logging.getLogger(__name__)


class BatchPending(FlowstoneError):
    """A batch was not done within ``max_wait``; ``batch_id`` resumes it. Retryable."""

    retryable = True

    def __init__(self, message: str, *, batch_id: str, retry_after: float) -> None:
        super().__init__(message)
        self.batch_id = batch_id
        self.retry_after = retry_after


@dataclass(frozen=True)
class BatchResult:
    """One prompt's outcome: ``response``, or ``error`` (the provider's ``type: message``)."""

    index: int
    custom_id: str
    response: LLMResponse | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.response is not None


@dataclass(frozen=True)
class RecordedBatch:
    """A batch an earlier attempt submitted: in this run, or in a run this one re-executes."""

    batch_id: str
    job: str
    fingerprint: str | None  # None: recorded without one (not resumed)
    run_id: str


def fingerprint(provider: str, ids: Sequence[str], requests: Sequence[dict[str, Any]]) -> str:
    """A hash of the exact items a batch sends (custom ids and request bodies: model, messages,
    system, max_tokens...): a recorded batch is resumed only for the same one."""
    payload = jsonlib.dumps(
        {"provider": provider, "items": [[i, r] for i, r in zip(ids, requests, strict=True)]},
        sort_keys=True,
        separators=(",", ":"),
        default=_jsonable,
    )
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"a batch request holds a {type(value).__name__}, which has no JSON form")


def run_lineage(context: Any) -> list[str]:
    """This run's id, then those of the runs it re-executes up to the root (newest first);
    only this run's for a run that re-executes nothing."""
    lineage = [context.run_id]
    try:
        parent_id = context.run.parent_run_id
    except dg.DagsterError:  # an asset invoked directly (build_asset_context): no run
        return lineage
    while parent_id is not None and parent_id not in lineage:
        lineage.append(parent_id)
        parent = context.instance.get_run_by_id(parent_id)
        # (Dagster refuses to re-execute a run one of whose ancestors was deleted.)
        parent_id = parent.parent_run_id if parent is not None else None
    return lineage


def find_batches(context: Any, job: str) -> list[RecordedBatch]:
    """``job``'s batches recorded by this step's assets in this run and in the runs it
    re-executes (:func:`run_lineage`), newest first. Never a batch of an unrelated run."""
    if context is None or not getattr(context, "has_assets_def", False):
        return []
    keys = set(context.assets_def.keys)
    found: list[RecordedBatch] = []
    for run_id in run_lineage(context):
        records = context.instance.get_records_for_run(
            run_id, of_type=dg.DagsterEventType.ASSET_OBSERVATION
        ).records
        in_run = []
        for record in records:
            observation = record.event_log_entry.asset_observation
            if observation is None or observation.asset_key not in keys:
                continue
            metadata = observation.metadata
            job_value = metadata.get(BATCH_JOB_KEY)
            batch_id = metadata.get(BATCH_ID_KEY)
            if job_value is None or batch_id is None or job_value.value != job:
                continue
            recorded_fingerprint = metadata.get(BATCH_FINGERPRINT_KEY)
            batch = RecordedBatch(
                batch_id=str(batch_id.value),
                job=job,
                fingerprint=str(recorded_fingerprint.value) if recorded_fingerprint else None,
                run_id=run_id,
            )
            if batch not in in_run:  # one observation per asset of the step
                in_run.append(batch)
        found.extend(reversed(in_run))
    return found


def _remember(
    context: Any,
    job: str,
    batch_id: str,
    batch_fingerprint: str,
    *,
    resumed_from: str | None = None,
) -> None:
    if context is None or not getattr(context, "has_assets_def", False):
        return
    metadata = {
        BATCH_ID_KEY: batch_id,
        BATCH_JOB_KEY: job,
        BATCH_FINGERPRINT_KEY: batch_fingerprint,
    }
    if resumed_from is not None:
        metadata[BATCH_RESUMED_FROM_KEY] = resumed_from
    for key in context.assets_def.keys:  # every asset the step materializes
        context.log_event(dg.AssetObservation(asset_key=key, metadata=metadata))


def _resumable(context: Any, job: str, batch_fingerprint: str) -> RecordedBatch | None:
    """The newest recorded batch of ``job`` for exactly these requests, if any."""
    recorded = find_batches(context, job)
    for batch in recorded:
        if batch.fingerprint == batch_fingerprint:
            return batch
    if recorded:
        newest = recorded[0]
        why = (
            "its requests differ from these (the inputs changed)"
            if newest.fingerprint is not None
            else "it was recorded without the fingerprint of its requests"
        )
        _log(
            context,
            "info",
            f"batch {newest.batch_id} ({job}, recorded in run {newest.run_id}) is not resumed: "
            f"{why}, so a new batch is submitted",
        )
    return None


def _log(context: Any, level: str, message: str) -> None:
    log = getattr(context, "log", None)
    getattr(log if log is not None else logger, level)(message)


def run_batch(
    client: LLMClient,
    prompts: Sequence[Prompt],
    *,
    job: str,
    system: System | None = None,
    model: str | None = None,
    max_tokens: int | None = None,
    poll_interval: float = 5.0,
    max_poll_interval: float = 60.0,
    max_wait: float = 3600.0,
    context: Any = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[BatchResult]:
    """Run ``prompts`` as one batch job; see the module docs."""
    if not prompts:
        raise ConfigurationError("must hold at least one prompt", field="prompts")
    if not job or len(job) > 40 or not job.replace("-", "").replace("_", "").isalnum():
        raise ConfigurationError(
            "must be 1-40 letters, digits, '-' or '_' (it names the items' custom_ids)",
            field="job",
        )
    if poll_interval <= 0 or max_poll_interval < poll_interval or max_wait <= 0:
        raise ConfigurationError("poll intervals and max_wait must be positive", field="poll")
    if client.provider == "openai_compatible":
        raise ConfigurationError("batches need the Anthropic or OpenAI batch API", field="provider")
    context = context or usage_module.bound_context() or usage_module.current_step_context()
    requests = [
        client.batch_request(prompt, system=system, model=model, max_tokens=max_tokens)
        for prompt in prompts
    ]
    ids = [f"{job}-{index}" for index in range(len(prompts))]
    sdk = client.sdk_client(context)
    # The op context underneath: an AssetExecutionContext's run_id is deprecated.
    step = (
        context.op_execution_context if isinstance(context, dg.AssetExecutionContext) else context
    )
    batch_fingerprint = fingerprint(client.provider, ids, requests)
    try:
        found = _resumable(step, job, batch_fingerprint)
        if found is None:
            batch_id = _submit(client, sdk, ids, requests)
            _remember(step, job, batch_id, batch_fingerprint)
        else:
            batch_id = found.batch_id
            _log(step, "info", f"batch {batch_id} ({job}) resumed from run {found.run_id}")
            if found.run_id != getattr(step, "run_id", None):
                # Shown on this run's asset too, and found here by the next re-execution.
                _remember(step, job, batch_id, batch_fingerprint, resumed_from=found.run_id)
        waited, interval = 0.0, poll_interval
        while (status := _status(client, sdk, batch_id)) != "ended":
            if status in ENDED_BADLY:
                if found is None or batch_id != found.batch_id:
                    raise FlowstoneError(f"OpenAI batch {batch_id} ended {status}")
                # Resuming it would fail every re-execution the same way: start over.
                _log(
                    step,
                    "warning",
                    f"batch {batch_id} ({job}, recorded in run {found.run_id}) ended {status} "
                    "at the provider: a new batch is submitted for the same requests",
                )
                batch_id = _submit(client, sdk, ids, requests)
                _remember(step, job, batch_id, batch_fingerprint)
                continue
            if waited + interval > max_wait:
                pending = BatchPending(
                    f"batch {batch_id} ({job}) is not done after {waited:g} s; it goes on at "
                    "the provider: run again with the same job to collect it",
                    batch_id=batch_id,
                    retry_after=max_poll_interval,
                )
                if client._to_dagster():
                    raise dg.RetryRequested(
                        max_retries=client.resilience.step_max_retries,
                        seconds_to_wait=max_poll_interval,
                    ) from pending
                raise pending
            sleep(interval)
            waited += interval
            interval = min(interval * 2, max_poll_interval)
        by_id = _collect(client, sdk, batch_id)
    finally:
        sdk.close()
    return _results(client, ids, by_id, model)


def _results(
    client: LLMClient,
    ids: list[str],
    by_id: dict[str, tuple[LLMResponse | None, str | None]],
    model: str | None,
) -> list[BatchResult]:
    """One result per item in input order, each emitting ``flowstone.llm.call``."""
    results = []
    for index, custom_id in enumerate(ids):
        response, error = by_id.get(custom_id, (None, "no result for this item"))
        measures: dict[str, Any] = {
            "provider": client.provider,
            "service": client.service,
            "model": response.model if response else (model or client.model),
            "batch": True,
        }
        if response is not None:
            measures["input_tokens"] = response.usage.input_tokens
            measures["output_tokens"] = response.usage.output_tokens
        telemetry.emit(
            "flowstone.llm.call",
            outcome="ok" if response is not None else "error",
            **measures,
        )
        results.append(BatchResult(index, custom_id, response, error))
    return results


def _submit(client: LLMClient, sdk: Any, ids: list[str], requests: list[dict[str, Any]]) -> str:
    if client.provider == "anthropic":
        batch = sdk.messages.batches.create(
            requests=[
                {"custom_id": custom_id, "params": params}
                for custom_id, params in zip(ids, requests, strict=True)
            ]
        )
        return str(batch.id)
    lines = "".join(
        jsonlib.dumps(
            {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
        )
        + "\n"
        for custom_id, body in zip(ids, requests, strict=True)
    )
    uploaded = sdk.files.create(file=("batch.jsonl", io.BytesIO(lines.encode())), purpose="batch")
    batch = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return str(batch.id)


def _status(client: LLMClient, sdk: Any, batch_id: str) -> str:
    """``ended`` when the results can be collected, else the provider's status."""
    if client.provider == "anthropic":
        return str(sdk.messages.batches.retrieve(batch_id).processing_status)
    status = str(sdk.batches.retrieve(batch_id).status)
    return "ended" if status == "completed" else status


def _error_text(error: Any) -> str:
    inner = error.get("error", error) if isinstance(error, dict) else error
    if isinstance(inner, dict):
        return f"{inner.get('type')}: {inner.get('message')}"
    return str(inner)


def _collect(
    client: LLMClient, sdk: Any, batch_id: str
) -> dict[str, tuple[LLMResponse | None, str | None]]:
    found: dict[str, tuple[LLMResponse | None, str | None]] = {}
    if client.provider == "anthropic":
        for item in sdk.messages.batches.results(batch_id):
            result = item.result
            if result.type == "succeeded":
                found[item.custom_id] = (anthropic_response(result.message, "anthropic"), None)
            else:
                error = getattr(result, "error", None)
                text = _error_text(error.model_dump() if error is not None else result.type)
                found[item.custom_id] = (None, text)
        return found
    batch = sdk.batches.retrieve(batch_id)
    # Answered items are in the output file, failed ones in the error file (each may be null).
    content = "".join(
        sdk.files.content(file_id).text + "\n"
        for file_id in (batch.output_file_id, batch.error_file_id)
        if file_id
    )
    for line in content.splitlines():
        if not line.strip():
            continue
        item = jsonlib.loads(line)
        response = item.get("response") or {}
        if item.get("error") is None and response.get("status_code") == 200:
            completion = openai.types.chat.ChatCompletion.model_validate(response["body"])
            found[item["custom_id"]] = (openai_response(completion, client.provider), None)
        else:
            found[item["custom_id"]] = (
                None,
                _error_text(item.get("error") or response.get("body")),
            )
    return found
