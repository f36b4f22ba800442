"""Tests of flowstone_dagster.notifications."""
