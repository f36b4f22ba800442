"""A dbt-duckdb Python model that opens the DuckDB file named by FLOWSTONE_DBT_LOCK_PROBE (if
set) before returning one row: while another process holds that file, DuckDB raises its real
"Could not set lock on file" error, a transient failure that a retry resolves."""

import os


def model(dbt, session):  # dbt-duckdb's Python model API
    probe = os.environ.get("FLOWSTONE_DBT_LOCK_PROBE")
    if probe:
        import duckdb

        duckdb.connect(probe).close()
    return session.sql("select 1 as id")
