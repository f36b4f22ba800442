"""The example code location: a daily pipeline that touches the outside world through every
flowstone-dagster integration, and survives it.

For each day (a daily partition):

1. **dbt** builds a small DuckDB warehouse from seeds (``dim_customers``, ``dim_products``),
   through ``DbtResource`` inside ``@dbt_assets``;
2. **REST**: ``raw_orders`` is read from a source API through ``RestIOManager``, with retries
   through ``ResilienceResource`` (the demo's own API fails the first request of each day
   once, so the run's log shows a retried call);
3. ``order_features`` joins the orders with the warehouse dimensions, ``order_audit`` checks
   them, both stored in **SQLite** through ``ExternalDBIOManager`` (PostgreSQL when
   ``FLOWSTONE_DEMO_PG_URL`` is set); re-running a day replaces its rows;
4. **Python workers**: ``scored_orders`` fits and applies a scikit-learn model in an isolated
   worker process (``PythonWorkerResource``);
5. **LLM**: ``daily_summary`` asks the configured model for a one-paragraph summary, or records
   that it skipped and which variable to set;
6. **Notifications**: the summary goes to Slack / email when configured, else to the step's
   log; the notification sensor reports failed runs the same way.

No network and no accounts are needed: see :mod:`example_project.settings` for the variables
that point the demo at real systems.
"""

import statistics
import warnings
from typing import Any

import dagster as dg
from dagster_dbt import DbtProject, dbt_assets

from example_project import settings
from flowstone_dagster import (
    DbtResource,
    ExternalDBIOManager,
    LLMResource,
    NotificationsResource,
    PythonWorkerResource,
    RestIOManager,
    make_notification_sensor,
    telemetry,
)

daily = dg.DailyPartitionsDefinition(start_date="2025-01-13", end_date="2025-01-17")
#: One run per day for every asset (dagster-dbt's own default would be one run for all days).
one_day_per_run = dg.BackfillPolicy.multi_run(1)
# Dagster marks ``@asset``'s ``backfill_policy`` parameter as beta (``@multi_asset``'s, which
# ``@dbt_assets`` uses, is not) and warns once per asset when this module is imported, so every
# ``make demo`` and ``dagster`` command printed four BetaWarnings a user cannot act on. One run
# per day is what this project needs; only that parameter's warning is ignored.
warnings.filterwarnings(
    "ignore",
    message="Parameter `backfill_policy` of function `asset` is currently in beta",
    category=dg.BetaWarning,
)

# -- dbt: the warehouse ---------------------------------------------------------------------

dbt_project = DbtProject(project_dir=settings.DBT_DIR, profiles_dir=settings.DBT_DIR)
settings.prepare_dbt_manifest(dbt_project)


@dbt_assets(
    manifest=dbt_project.manifest_path,
    partitions_def=daily,
    backfill_policy=one_day_per_run,
    # Every day's run rebuilds the same seeds and dimension tables: one build at a time across
    # the deployment (a Dagster concurrency pool limits steps; flowstone's max_concurrent
    # limits calls within them).
    pool="warehouse",
)
def warehouse(context: dg.AssetExecutionContext, dbt: DbtResource) -> Any:
    """Seeds and dimension models, rebuilt (idempotently) with each day's run."""
    yield from dbt.stream(["build"], context=context)


# -- REST: the source system ----------------------------------------------------------------

raw_orders = dg.AssetSpec(
    "raw_orders",
    partitions_def=daily,
    description="Each day's orders in the source API: GET {source}/raw_orders/<day>.",
    group_name="source",
).with_io_manager_key("source_api")


# -- features, audit, scores: stored in the external database -------------------------------


def _dimensions() -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    customers = settings.read_warehouse(
        "select customer_id, tenure_days, country from dim_customers"
    )
    products = settings.read_warehouse("select product_id, category, unit_price from dim_products")
    return (
        {row[0]: {"tenure_days": row[1], "country": row[2]} for row in customers},
        {row[0]: {"category": row[1], "unit_price": float(row[2])} for row in products},
    )


@dg.asset(
    partitions_def=daily,
    backfill_policy=one_day_per_run,
    io_manager_key="warehouse_db",
    deps=[dg.AssetKey("dim_customers"), dg.AssetKey("dim_products")],
    metadata={"partition_expr": "order_date"},
    description="Orders joined with customer tenure and product category.",
)
def order_features(
    context: dg.AssetExecutionContext, raw_orders: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    if settings.serving_bundled_data():
        context.log.info(
            "FLOWSTONE_DEMO_API_URL is not set: raw_orders came from the demo's own source API "
            "on loopback, serving the bundled sample data"
        )
    customers, products = _dimensions()
    rows = [
        {
            "order_date": context.partition_key,
            "order_id": order["order_id"],
            "customer_id": order["customer_id"],
            "product_id": order["product_id"],
            "quantity": order["quantity"],
            "amount": order["amount"],
            "tenure_days": customers[order["customer_id"]]["tenure_days"],
            "is_hardware": products[order["product_id"]]["category"] == "hardware",
            "returned": order["returned"],
        }
        for order in raw_orders
    ]
    return rows  # its row count is the I/O manager's dagster/partition_row_count


@dg.asset(
    partitions_def=daily,
    backfill_policy=one_day_per_run,
    io_manager_key="warehouse_db",
    metadata={"partition_expr": "order_date"},
    description="A per-product check of the day's orders from the source API.",
)
def order_audit(
    context: dg.AssetExecutionContext, raw_orders: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    by_product: dict[int, list[dict[str, Any]]] = {}
    for order in raw_orders:
        by_product.setdefault(order["product_id"], []).append(order)
    rows = [
        {
            "order_date": context.partition_key,
            "product_id": product,
            "orders": len(orders),
            "revenue": round(sum(o["amount"] for o in orders), 2),
            "suspicious": any(o["amount"] <= 0 or o["quantity"] <= 0 for o in orders),
        }
        for product, orders in sorted(by_product.items())
    ]
    return rows  # its row count is the I/O manager's dagster/partition_row_count


@dg.asset(
    partitions_def=daily,
    backfill_policy=one_day_per_run,
    io_manager_key="warehouse_db",
    metadata={"partition_expr": "order_date"},
    description="Each order's return risk from a model fitted in an isolated Python worker.",
)
def scored_orders(
    context: dg.AssetExecutionContext,
    order_features: list[dict[str, Any]],
    workers: PythonWorkerResource,
) -> list[dict[str, Any]]:
    with telemetry.observe(context):
        rows = workers.call("scoring", "train_and_score", args=(order_features,))
    context.add_output_metadata(
        {
            "mean_return_risk": round(statistics.fmean(r["return_risk"] for r in rows), 4),
            "model_accuracy": rows[0]["model_accuracy"] if rows else 0.0,
        }
    )
    return rows


# -- LLM summary and notification -----------------------------------------------------------


def _summary_prompt(day: str, rows: list[dict[str, Any]]) -> str:
    risky = sorted(rows, key=lambda r: r["return_risk"], reverse=True)[:3]
    lines = [f"order {r['order_id']}: risk {r['return_risk']:.2f}" for r in risky]
    return (
        f"On {day} we scored {len(rows)} orders for return risk; the mean risk was "
        f"{statistics.fmean(r['return_risk'] for r in rows):.2f}. Riskiest: {'; '.join(lines)}. "
        "Write a two-sentence summary for the operations team."
    )


@dg.asset(
    partitions_def=daily,
    backfill_policy=one_day_per_run,
    description="A short summary of the day's scores by the configured LLM, sent as a "
    "notification.",
)
def daily_summary(
    context: dg.AssetExecutionContext,
    scored_orders: list[dict[str, Any]],
    llm: dg.ResourceParam[LLMResource | None],
    notifications: NotificationsResource,
) -> str:
    day = context.partition_key
    metadata: dict[str, Any] = {"summarized_orders": len(scored_orders)}
    with telemetry.observe(context):
        if llm is None:
            summary = (
                f"{len(scored_orders)} orders scored on {day}; mean return risk "
                f"{statistics.fmean(r['return_risk'] for r in scored_orders):.2f}."
            )
            metadata["skipped"] = f"LLM summary skipped: {settings.LLM_HINT}"
            context.log.info(metadata["skipped"])
        else:
            summary = llm.call(_summary_prompt(day, scored_orders), max_tokens=200)
        result = notifications.notify(
            "materialization_succeeded",
            {"asset": "daily_summary", "partition": day, "message": summary},
        )
    metadata["notified"] = ", ".join(result.delivered)
    context.add_output_metadata(metadata)
    return summary


# -- jobs, schedule, sensor, resources -------------------------------------------------------

daily_pipeline = dg.define_asset_job(
    "daily_pipeline",
    selection=dg.AssetSelection.assets(
        warehouse, order_features, order_audit, scored_orders, daily_summary
    ),
    description="The main job: one day through dbt, REST, the external DB, a Python worker, "
    "an LLM and notifications.",
)

defs = dg.Definitions(
    executor=settings.executor(),
    assets=[warehouse, raw_orders, order_features, order_audit, scored_orders, daily_summary],
    jobs=[daily_pipeline],
    schedules=[dg.build_schedule_from_partitioned_job(daily_pipeline, hour_of_day=6)],
    sensors=[make_notification_sensor(webserver_base_url=settings.WEBSERVER_URL)],
    resources={
        "dbt": DbtResource(
            project_dir=str(settings.DBT_DIR),
            profiles_dir=str(settings.DBT_DIR),
            dbt_executable=settings.dbt_executable(),
            resilience=settings.resilience(),
            service="dbt",  # the name of its policy in settings.resilience()
        ),
        "source_api": RestIOManager(
            base_url=settings.source_api_url(),
            service="source-api",
            resilience=settings.resilience(),
        ),
        "warehouse_db": ExternalDBIOManager(
            database=settings.external_db_config(), resilience=settings.resilience()
        ),
        "workers": PythonWorkerResource(paths=[str(settings.ML_DIR)], pool_size=1, timeout=120),
        "llm": settings.llm_resource(),
        "notifications": settings.notifications_resource(),
    },
)
