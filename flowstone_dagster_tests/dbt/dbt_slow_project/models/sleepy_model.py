"""A dbt-duckdb Python model that takes about 8 s, then returns one row."""

import time

SECONDS = 8.0


def model(dbt, session):  # dbt-duckdb's Python model API
    time.sleep(SECONDS)
    return session.sql("select 1 as id")
