"""Tests of flowstone_dagster.resilience."""
