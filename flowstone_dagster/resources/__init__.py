"""Dagster resources: LLMs, Python workers, dbt and notifications."""
