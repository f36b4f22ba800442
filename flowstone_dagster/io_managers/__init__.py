"""I/O managers: where asset values are stored and loaded from."""

from flowstone_dagster.io_managers.external_db import (
    ExternalDB,
    ExternalDBIOManager,
    TableStoreResult,
)
from flowstone_dagster.io_managers.rest import HeadInfo, RestClient, RestIOManager, StoreResult

__all__ = [
    "ExternalDB",
    "ExternalDBIOManager",
    "HeadInfo",
    "RestClient",
    "RestIOManager",
    "StoreResult",
    "TableStoreResult",
]
