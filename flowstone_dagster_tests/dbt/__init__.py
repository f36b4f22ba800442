"""Tests of flowstone_dagster.dbt."""
