"""Tests of flowstone_dagster.external_db."""
