"""Tests of flowstone_dagster.rest."""
