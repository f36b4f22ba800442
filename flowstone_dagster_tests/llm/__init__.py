"""Tests of flowstone_dagster.llm."""
