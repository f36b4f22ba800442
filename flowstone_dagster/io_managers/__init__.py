"""I/O managers: where asset values are stored and loaded from."""

from flowstone_dagster.io_managers.rest import HeadInfo, RestClient, RestIOManager, StoreResult

__all__ = ["HeadInfo", "RestClient", "RestIOManager", "StoreResult"]
