# ruff: noqa: E501  (verbatim dbt output has long lines)
"""``parse_dbt_output`` on an old (dbt 1.0) summary and on real dbt 1.11 console output.

The ``*_OUTPUT`` constants are verbatim captures of dbt-core 1.11.16 running the fixture project
(``flowstone_dagster_tests/dbt/dbt_project``), colours included where dbt wrote them.
"""

from flowstone_dagster.dbt.output import parse_dbt_output

# fmt: off
RUN_OUTPUT = (
    '\x1b[0m13:29:57  Running with dbt=1.11.16\n'
    '\x1b[0m13:29:58  Registered adapter: duckdb=1.11.1\n'
    '\x1b[0m13:29:58  Found 6 models, 6 data tests, 2 seeds, 511 macros\n'
    '\x1b[0m13:29:58  \n'
    "\x1b[0m13:29:58  Concurrency: 2 threads (target='duckdb')\n"
    '\x1b[0m13:29:58  \n'
    '\x1b[0m13:29:59  1 of 2 START sql table model main.stg_orders ................................... [RUN]\n'
    '\x1b[0m13:29:59  1 of 2 OK created sql table model main.stg_orders .............................. [\x1b[32mOK\x1b[0m in 0.14s]\n'
    '\x1b[0m13:29:59  2 of 2 START sql table model main.customer_revenue ............................. [RUN]\n'
    '\x1b[0m13:29:59  2 of 2 OK created sql table model main.customer_revenue ........................ [\x1b[32mOK\x1b[0m in 0.04s]\n'
    '\x1b[0m13:29:59  \n'
    '\x1b[0m13:29:59  Finished running 2 table models in 0 hours 0 minutes and 0.36 seconds (0.36s).\n'
    '\x1b[0m13:29:59  \n'
    '\x1b[0m13:29:59  \x1b[32mCompleted successfully\x1b[0m\n'
    '\x1b[0m13:29:59  \n'
    '\x1b[0m13:29:59  Done. PASS=2 WARN=0 ERROR=0 SKIP=0 NO-OP=0 TOTAL=2\n'
)

FAILED_MODEL_OUTPUT = (
    '\x1b[0m13:24:35  Running with dbt=1.11.16\n'
    '\x1b[0m13:24:35  Registered adapter: duckdb=1.11.1\n'
    '\x1b[0m13:24:36  Found 6 models, 6 data tests, 2 seeds, 511 macros\n'
    '\x1b[0m13:24:36  \n'
    "\x1b[0m13:24:36  Concurrency: 2 threads (target='duckdb')\n"
    '\x1b[0m13:24:36  \n'
    '\x1b[0m13:24:36  1 of 1 START sql table model main.broken_model ................................. [RUN]\n'
    '\x1b[0m13:24:36  1 of 1 ERROR creating sql table model main.broken_model ........................ [\x1b[31mERROR\x1b[0m in 0.07s]\n'
    '\x1b[0m13:24:36  \n'
    '\x1b[0m13:24:36  Finished running 1 table model in 0 hours 0 minutes and 0.17 seconds (0.17s).\n'
    '\x1b[0m13:24:36  \n'
    '\x1b[0m13:24:36  \x1b[31mCompleted with 1 error, 0 partial successes, and 0 warnings:\x1b[0m\n'
    '\x1b[0m13:24:36  \n'
    '\x1b[0m13:24:36  \x1b[31mFailure in model broken_model (models/broken_model.sql)\x1b[0m\n'
    '\x1b[0m13:24:36    Runtime Error in model broken_model (models/broken_model.sql)\n'
    '  Binder Error: Referenced column "no_such_column" not found in FROM clause!\n'
    '  Candidate bindings: "ordered_on"\n'
    '  \n'
    '  LINE 13: select no_such_column from "fixture"."main"."stg_orders"\n'
    '                  ^^^^^^^^^^^^^^\n'
    '\x1b[0m13:24:36  \n'
    '\x1b[0m13:24:36    compiled code at target/compiled/flowstone_fixture/models/broken_model.sql\n'
    '\x1b[0m13:24:36  \n'
    '\x1b[0m13:24:36  Done. PASS=0 WARN=0 ERROR=1 SKIP=0 NO-OP=0 TOTAL=1\n'
)

FAILED_TEST_OUTPUT = (
    '\x1b[0m13:24:38  Running with dbt=1.11.16\n'
    '\x1b[0m13:24:38  Registered adapter: duckdb=1.11.1\n'
    '\x1b[0m13:24:38  Found 6 models, 6 data tests, 2 seeds, 511 macros\n'
    '\x1b[0m13:24:38  \n'
    "\x1b[0m13:24:38  Concurrency: 2 threads (target='duckdb')\n"
    '\x1b[0m13:24:38  \n'
    '\x1b[0m13:24:38  1 of 2 START sql table model main.revenue_targets .............................. [RUN]\n'
    '\x1b[0m13:24:39  1 of 2 OK created sql table model main.revenue_targets ......................... [\x1b[32mOK\x1b[0m in 0.12s]\n'
    '\x1b[0m13:24:39  2 of 2 START test revenue_meets_target ......................................... [RUN]\n'
    '\x1b[0m13:24:39  2 of 2 FAIL 3 revenue_meets_target ............................................. [\x1b[31mFAIL 3\x1b[0m in 0.03s]\n'
    '\x1b[0m13:24:39  \n'
    '\x1b[0m13:24:39  Finished running 1 table model, 1 test in 0 hours 0 minutes and 0.26 seconds (0.26s).\n'
    '\x1b[0m13:24:39  \n'
    '\x1b[0m13:24:39  \x1b[31mCompleted with 1 error, 0 partial successes, and 0 warnings:\x1b[0m\n'
    '\x1b[0m13:24:39  \n'
    '\x1b[0m13:24:39  \x1b[31mFailure in test revenue_meets_target (tests/revenue_meets_target.sql)\x1b[0m\n'
    '\x1b[0m13:24:39    Got 3 results, configured to fail if != 0\n'
    '\x1b[0m13:24:39  \n'
    '\x1b[0m13:24:39    compiled code at target/compiled/flowstone_fixture/tests/revenue_meets_target.sql\n'
    '\x1b[0m13:24:39  \n'
    '\x1b[0m13:24:39  Done. PASS=1 WARN=0 ERROR=1 SKIP=0 NO-OP=0 TOTAL=2\n'
)

CONNECTION_REFUSED_OUTPUT = (
    '\x1b[0m13:24:40  Running with dbt=1.11.16\n'
    '\x1b[0m13:24:41  Registered adapter: postgres=1.11.0\n'
    '\x1b[0m13:24:41  Unable to do partial parsing because config vars, config profile, or config target have changed\n'
    '\x1b[0m13:24:41  Unable to do partial parsing because profile has changed\n'
    '\x1b[0m13:24:41  Unable to do partial parsing because a project dependency has been added\n'
    '\x1b[0m13:24:42  Found 6 models, 6 data tests, 2 seeds, 477 macros\n'
    '\x1b[0m13:24:42  Using default selector healthy\n'
    '\x1b[0m13:24:42  \n'
    "\x1b[0m13:24:42  Concurrency: 2 threads (target='postgres')\n"
    '\x1b[0m13:24:42  \n'
    '\x1b[0m13:24:42  \n'
    '\x1b[0m13:24:42  Finished running  in 0 hours 0 minutes and 0.04 seconds (0.04s).\n'
    '\x1b[0m13:24:42  Encountered an error:\n'
    'Database Error\n'
    '  connection to server at "127.0.0.1", port 1 failed: Connection refused\n'
    '  \tIs the server running on that host and accepting TCP/IP connections?\n'
    '  \n'
)

NOTHING_SELECTED_OUTPUT = (
    '13:29:50  Running with dbt=1.11.16\n'
    '13:29:51  Registered adapter: duckdb=1.11.1\n'
    '13:29:51  Unable to do partial parsing because config vars, config profile, or config target have changed\n'
    '13:29:51  Unable to do partial parsing because profile has changed\n'
    '13:29:51  Unable to do partial parsing because a project dependency has been added\n'
    '13:29:53  Found 6 models, 6 data tests, 2 seeds, 511 macros\n'
    "13:29:53  The selection criterion 'nonexistent_model' does not match any enabled nodes\n"
    '13:29:53  Nothing to do. Try checking your model configs and model specification args\n'
)
# fmt: on


def test_parses_dbt_output() -> None:
    """An old (dbt 1.0) summary with no per-model lines."""
    output = """
    Running with dbt=1.0.0
    Found 3 models, 2 tests, 0 snapshots
    Completed successfully
    """
    result = parse_dbt_output(output)
    assert result.models_run == 3
    assert result.errors == []
    assert result.success is True
    assert result.dbt_version == "1.0.0"
    assert result.found == {"model": 3, "test": 2, "snapshot": 0}
    assert result.tests_found == 2


def test_successful_run() -> None:
    result = parse_dbt_output(RUN_OUTPUT)
    assert result.dbt_version == "1.11.16"
    assert result.found == {"model": 6, "data test": 6, "seed": 2, "macro": 511}
    assert (result.models_found, result.tests_found) == (6, 6)
    assert result.models_run == 2  # from "Finished running 2 table models", not the 6 found
    assert (result.passed, result.warned, result.errored, result.skipped) == (2, 0, 0, 0)
    assert (result.no_op, result.total) == (0, 2)
    assert result.success is True
    assert result.errors == []
    assert result.warnings == []


def test_failed_model_keeps_dbt_error_block() -> None:
    result = parse_dbt_output(FAILED_MODEL_OUTPUT)
    assert result.success is False
    assert (result.models_run, result.passed, result.errored, result.total) == (1, 0, 1, 1)
    [error] = result.errors
    assert error.startswith("Failure in model broken_model (models/broken_model.sql)")
    assert 'Referenced column "no_such_column" not found' in error
    assert "LINE 13: select no_such_column" in error
    assert "compiled code at" not in error


def test_failed_test() -> None:
    result = parse_dbt_output(FAILED_TEST_OUTPUT)
    assert result.success is False
    assert (result.models_run, result.passed, result.errored, result.total) == (1, 1, 1, 2)
    assert result.errors == [
        "Failure in test revenue_meets_target (tests/revenue_meets_target.sql)\n"
        "Got 3 results, configured to fail if != 0"
    ]


def test_fatal_connection_error() -> None:
    result = parse_dbt_output(CONNECTION_REFUSED_OUTPUT)
    assert result.success is False
    assert result.models_run == 0
    assert result.total is None  # dbt stopped before its summary
    [error] = result.errors
    assert error.startswith("Encountered an error:\nDatabase Error")
    assert "Connection refused" in error


def test_nothing_selected_is_a_warning_not_a_success() -> None:
    result = parse_dbt_output(NOTHING_SELECTED_OUTPUT)
    assert result.warnings == [
        "The selection criterion 'nonexistent_model' does not match any enabled nodes",
        "Nothing to do. Try checking your model configs and model specification args",
    ]
    assert result.success is None
    assert result.models_run == 0  # found 6, ran none
    assert result.errors == []


def test_older_done_line_and_unstamped_error_block() -> None:
    result = parse_dbt_output(
        "Found 2 models, 1 test\n"
        "Completed with 1 error and 0 warnings:\n"
        "\n"
        "Database Error in model orders (models/orders.sql)\n"
        '  relation "raw.orders" does not exist\n'
        "\n"
        "Done. PASS=1 WARN=0 ERROR=1 SKIP=0 TOTAL=2\n"
    )
    assert (result.passed, result.errored, result.total, result.no_op) == (1, 1, 2, None)
    assert result.errors == [
        'Database Error in model orders (models/orders.sql)\n  relation "raw.orders" does not exist'
    ]
    assert result.success is False
    assert result.models_run == 0  # dbt failed and says nothing about models run


def test_empty_text() -> None:
    result = parse_dbt_output("")
    assert (result.models_run, result.errors, result.success, result.total) == (0, [], None, None)
