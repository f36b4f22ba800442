"""dbt: commands with timeouts that kill the whole process tree, per-invocation artifacts,
warehouse-aware retries, and streaming inside ``@dbt_assets``, over dagster-dbt.

- :mod:`.resource`: :class:`DbtResource`, the Dagster resource;
- :mod:`.invocation`: one command's settings, environment and :class:`DbtResult`;
- :mod:`.assets`: :func:`stream_dbt` for ``@dbt_assets``;
- :mod:`.process`: running dbt in its own process group (also under dagster-dbt, through a
  launcher); :mod:`.artifacts`: ``run_results.json`` and ``manifest.json``; :mod:`.output`:
  dbt's console output; :mod:`.errors`: the errors and the per-adapter classifier of
  transient and permanent warehouse failures.

The guide is ``docs/dbt.md``.
"""

from flowstone_dagster.dbt.artifacts import DbtNodeResult
from flowstone_dagster.dbt.assets import stream_dbt
from flowstone_dagster.dbt.errors import (
    DbtExecutableNotFound,
    DbtNothingSelected,
    DbtProfileNotFound,
    DbtProjectNotFound,
    DbtTransientFailure,
    DbtWarehouseRejected,
    DbtWarehouseUnreachable,
    classify_adapter_message,
)
from flowstone_dagster.dbt.invocation import DbtOptions, DbtResult, DbtSelection, DbtSettings
from flowstone_dagster.dbt.output import DbtOutputSummary, parse_dbt_output
from flowstone_dagster.dbt.resource import DbtResource

__all__ = [
    "DbtExecutableNotFound",
    "DbtNodeResult",
    "DbtNothingSelected",
    "DbtOptions",
    "DbtOutputSummary",
    "DbtProfileNotFound",
    "DbtProjectNotFound",
    "DbtResource",
    "DbtResult",
    "DbtSelection",
    "DbtSettings",
    "DbtTransientFailure",
    "DbtWarehouseRejected",
    "DbtWarehouseUnreachable",
    "classify_adapter_message",
    "parse_dbt_output",
    "stream_dbt",
]
