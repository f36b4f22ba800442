"""Where the example project's resources point, from the environment.

With nothing set, everything runs on this machine: the bundled source API on loopback, DuckDB
and SQLite files under ``$DAGSTER_HOME`` (or this folder), notifications to the step's log, and
no LLM call. Each variable points one integration at a real system:

======================================  =====================================================
``FLOWSTONE_DEMO_API_URL``              a source API serving ``GET /raw_orders/<day>``
``FLOWSTONE_DEMO_PG_URL``               ``postgresql://user:password@host:port/db`` for the
                                        external database (instead of SQLite)
``FLOWSTONE_RESILIENCE_STORE``          the shared breaker/limiter store (scale-out: the same
                                        PostgreSQL as Dagster's storage)
``ANTHROPIC_API_KEY`` /                 the LLM summary through Anthropic / OpenAI, or a local
``OPENAI_API_KEY`` /                    OpenAI-compatible server (Ollama, vLLM, llama.cpp);
``FLOWSTONE_LLM_BASE_URL``              ``FLOWSTONE_LLM_MODEL`` picks the model
``SLACK_WEBHOOK_URL``                   Slack notifications through an incoming webhook
``SMTP_HOST``, ``SMTP_PORT``,           email notifications (``SMTP_SECURITY``: starttls,
``SMTP_USER``, ``SMTP_PASSWORD``,       ssl or none)
``SMTP_FROM``, ``SMTP_TO``
``FLOWSTONE_DEMO_INJECT_FAILURES``      ``1`` (default): the bundled API fails each day's first
                                        request once; ``0``: never; ``outage``: always
``FLOWSTONE_DEMO_BREAKER_TIMEOUT``      seconds the source API's circuit stays open (30)
``FLOWSTONE_DEMO_SOURCE_RATE``          calls per second allowed to the source API, shared
                                        by every process through the store (no limit)
``FLOWSTONE_DEMO_WAREHOUSE_URL``        ``postgresql://...``: dbt builds the warehouse in
                                        PostgreSQL (schema ``analytics``) instead of DuckDB
``FLOWSTONE_DEMO_EXECUTOR``             ``celery``: steps run on Celery workers
                                        (``FLOWSTONE_CELERY_BROKER`` and
                                        ``FLOWSTONE_CELERY_BACKEND``); ``k8s``: each step in
                                        a Kubernetes Job; see ``cluster/``
======================================  =====================================================
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import dagster as dg
from dagster_dbt import DbtProject

from example_project.source_api import start_source_api
from flowstone_dagster import (
    CircuitBreakerConfig,
    EmailConfig,
    LLMResource,
    NotificationsResource,
    PostgresConfig,
    RateLimitConfig,
    ResilienceResource,
    RetryConfig,
    ServicePolicy,
    SlackWebhookConfig,
    SQLiteConfig,
)

HERE = Path(__file__).resolve().parent
DBT_DIR = HERE / "dbt_project"
ML_DIR = HERE / "ml"
WEBSERVER_URL = os.environ.get("FLOWSTONE_DEMO_WEBSERVER_URL", "http://127.0.0.1:3000")
LLM_HINT = (
    "set ANTHROPIC_API_KEY or OPENAI_API_KEY, or FLOWSTONE_LLM_BASE_URL for a local "
    "OpenAI-compatible server"
)


def data_dir() -> Path:
    """Where the demo keeps its databases: ``$DAGSTER_HOME``, else this folder."""
    home = os.environ.get("DAGSTER_HOME")
    path = Path(home) if home else HERE
    path.mkdir(parents=True, exist_ok=True)
    return path


def warehouse_path() -> Path:
    """The DuckDB file dbt builds; also exported as ``FLOWSTONE_DEMO_WAREHOUSE`` for dbt's
    profile (``profiles.yml`` reads it), so dbt and the assets use the same file."""
    path = Path(os.environ.get("FLOWSTONE_DEMO_WAREHOUSE") or data_dir() / "warehouse.duckdb")
    os.environ["FLOWSTONE_DEMO_WAREHOUSE"] = str(path)
    return path


#: The schema dbt builds in when the warehouse is PostgreSQL (``FLOWSTONE_DEMO_WAREHOUSE_URL``).
WAREHOUSE_SCHEMA = "analytics"


def warehouse_url() -> str | None:
    """``FLOWSTONE_DEMO_WAREHOUSE_URL``: the warehouse in PostgreSQL rather than a DuckDB file,
    for deployments whose steps run on different machines. Exported as the variables that
    ``profiles.yml``'s ``postgres`` output reads, and selects that output."""
    url = os.environ.get("FLOWSTONE_DEMO_WAREHOUSE_URL")
    if not url:
        return None
    parts = urlsplit(url)
    os.environ.update(
        {
            "FLOWSTONE_DEMO_DBT_TARGET": "postgres",
            "FLOWSTONE_DEMO_WAREHOUSE_HOST": parts.hostname or "127.0.0.1",
            "FLOWSTONE_DEMO_WAREHOUSE_PORT": str(parts.port or 5432),
            "FLOWSTONE_DEMO_WAREHOUSE_USER": unquote(parts.username or ""),
            "FLOWSTONE_DEMO_WAREHOUSE_PASSWORD": unquote(parts.password or ""),
            "FLOWSTONE_DEMO_WAREHOUSE_DATABASE": parts.path.lstrip("/") or "postgres",
        }
    )
    return url


def read_warehouse(query: str) -> list[tuple[Any, ...]]:
    """Rows of ``query`` from the warehouse dbt built: the DuckDB file, or PostgreSQL."""
    url = warehouse_url()
    if url is None:
        import duckdb

        with duckdb.connect(str(warehouse_path()), read_only=True) as warehouse_db:
            return warehouse_db.execute(query).fetchall()
    import psycopg2

    connection = psycopg2.connect(url, options=f"-c search_path={WAREHOUSE_SCHEMA}")
    try:
        with connection.cursor() as cursor:
            cursor.execute(query)
            return cursor.fetchall()
    finally:
        connection.close()


def executor() -> dg.ExecutorDefinition | None:
    """The Celery executor when ``FLOWSTONE_DEMO_EXECUTOR=celery`` (broker and result backend
    from ``FLOWSTONE_CELERY_BROKER`` / ``FLOWSTONE_CELERY_BACKEND``), dagster-k8s's
    ``k8s_job_executor`` with ``k8s``, else Dagster's default (multiprocess)."""
    name = os.environ.get("FLOWSTONE_DEMO_EXECUTOR", "")
    if name in ("", "multiprocess"):
        return None
    if name == "k8s":
        # Each step in its own Kubernetes Job (dagster-k8s; see cluster/k8s/README.md).
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    if name != "celery":
        raise ValueError(f"FLOWSTONE_DEMO_EXECUTOR={name!r}: use 'celery', 'k8s' or leave it unset")
    from dagster_celery import celery_executor

    return celery_executor.configured(
        {
            "broker": {"env": "FLOWSTONE_CELERY_BROKER"},
            "backend": {"env": "FLOWSTONE_CELERY_BACKEND"},
        },
        name="celery",
    )


def dbt_executable() -> str:
    """``dbt`` on PATH, else the one installed beside this Python (``.venv/bin/dbt``)."""
    return shutil.which("dbt") or str(Path(sys.executable).with_name("dbt"))


def prepare_dbt_manifest(project: DbtProject) -> None:
    """Parse the dbt project once, so that ``@dbt_assets`` has a manifest outside
    ``dagster dev`` too (``dagster job execute``, tests)."""
    warehouse_path()
    warehouse_url()
    if project.manifest_path.exists():
        return
    subprocess.run(
        [
            dbt_executable(),
            "parse",
            "--quiet",
            "--project-dir",
            str(project.project_dir),
            "--profiles-dir",
            str(project.profiles_dir),
        ],
        check=True,
        cwd=project.project_dir,
    )


def source_api_url() -> str:
    """``FLOWSTONE_DEMO_API_URL``, else the bundled source API (started in this process)."""
    return os.environ.get("FLOWSTONE_DEMO_API_URL") or start_source_api()


def serving_bundled_data() -> bool:
    return not os.environ.get("FLOWSTONE_DEMO_API_URL")


def resilience() -> ResilienceResource:
    """Retries and a circuit breaker for the source API and the warehouse, shared by every
    step process through the store (``FLOWSTONE_RESILIENCE_STORE``, default SQLite in
    ``$DAGSTER_HOME``)."""
    return ResilienceResource(
        store_url=os.environ.get("FLOWSTONE_RESILIENCE_STORE")
        or f"sqlite:///{data_dir() / 'resilience.sqlite3'}",
        policies={
            "source-api": ServicePolicy(
                retry=RetryConfig(max_attempts=3, base_delay=0.1, max_delay=2.0, deadline=30),
                circuit_breaker=CircuitBreakerConfig(
                    threshold=3,
                    timeout=float(os.environ.get("FLOWSTONE_DEMO_BREAKER_TIMEOUT", "30")),
                ),
                rate_limit=_source_rate_limit(),
            ),
            "dbt": ServicePolicy(retry=RetryConfig(max_attempts=2, base_delay=1.0)),
        },
        retry_requested_after=5.0,
    )


def _source_rate_limit() -> RateLimitConfig | None:
    rate = os.environ.get("FLOWSTONE_DEMO_SOURCE_RATE")
    return RateLimitConfig(limit=float(rate), period=1.0) if rate else None


def external_db_config() -> PostgresConfig | SQLiteConfig:
    """``ExternalDBIOManager`` database: PostgreSQL from ``FLOWSTONE_DEMO_PG_URL``, else SQLite."""
    url = os.environ.get("FLOWSTONE_DEMO_PG_URL")
    if not url:
        return SQLiteConfig(path=str(data_dir() / "warehouse.sqlite3"))
    parts = urlsplit(url)
    return PostgresConfig(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 5432,
        database=parts.path.lstrip("/") or "postgres",
        user=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
    )


def llm_resource() -> LLMResource | dg.ResourceDefinition:
    """The configured LLM, or a ``None`` resource: the summary then says it skipped."""
    model = os.environ.get("FLOWSTONE_LLM_MODEL")
    if os.environ.get("FLOWSTONE_LLM_BASE_URL"):
        return LLMResource(
            provider="openai_compatible",
            base_url=os.environ["FLOWSTONE_LLM_BASE_URL"],
            model=model or "llama3.2",
            resilience=resilience(),
        )
    if os.environ.get("ANTHROPIC_API_KEY"):
        return LLMResource(
            provider="anthropic",
            model=model or "claude-sonnet-4-5",
            api_key=dg.EnvVar("ANTHROPIC_API_KEY"),
            rpm_limit=50,
            resilience=resilience(),
        )
    if os.environ.get("OPENAI_API_KEY"):
        return LLMResource(
            provider="openai",
            model=model or "gpt-4o-mini",
            api_key=dg.EnvVar("OPENAI_API_KEY"),
            rpm_limit=500,
            resilience=resilience(),
        )
    return dg.ResourceDefinition.none_resource(description=f"No LLM: {LLM_HINT}.")


def notifications_resource() -> NotificationsResource:
    """Slack and email when configured; always the step's log."""
    slack = (
        SlackWebhookConfig(url=dg.EnvVar("SLACK_WEBHOOK_URL"))
        if os.environ.get("SLACK_WEBHOOK_URL")
        else None
    )
    email = None
    if os.environ.get("SMTP_HOST"):
        email = EmailConfig(
            host=os.environ["SMTP_HOST"],
            port=int(os.environ["SMTP_PORT"]) if os.environ.get("SMTP_PORT") else None,
            security=os.environ.get("SMTP_SECURITY", "starttls"),  # type: ignore[arg-type]
            username=os.environ.get("SMTP_USER"),
            password=dg.EnvVar("SMTP_PASSWORD") if os.environ.get("SMTP_PASSWORD") else None,
            sender=os.environ.get("SMTP_FROM", "flowstone-demo@localhost"),
            recipients=[a.strip() for a in os.environ.get("SMTP_TO", "").split(",") if a.strip()],
        )
    return NotificationsResource(slack_webhook=slack, email=email, log=True)
