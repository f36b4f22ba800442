"""Tests of flowstone_dagster.python_worker."""
