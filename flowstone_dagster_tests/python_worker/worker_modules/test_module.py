"""Functions the worker tests call: arithmetic, a raised exception, nested data, and more."""

import logging
import os
import sys
from typing import Any

# Counts imports of this module per worker process (the tests read the file): a module is
# imported once per worker, not once per call.
if os.environ.get("IMPORT_LOG"):
    with open(os.environ["IMPORT_LOG"], "a") as log:
        log.write(f"{os.getpid()}\n")

logger = logging.getLogger("test_module")


def add(a: Any, b: Any) -> Any:
    return a + b


def raise_error() -> None:
    raise ValueError("something went wrong in the worker")


def process_data(data: dict[str, Any]) -> dict[str, Any]:
    return {"keys": sorted(data), "total": sum(data.get("numbers", [])), "echo": data}


def echo(value: Any) -> Any:
    return value


def describe(value: Any) -> str:
    """The value's type, as the worker sees it."""
    return type(value).__name__


def whoami() -> dict[str, Any]:
    return {"pid": os.getpid(), "prefix": sys.prefix, "executable": sys.executable}


def noisy(lines: int) -> str:
    """Writes to stdout, stderr and the raw file descriptors, and logs, then returns."""
    for i in range(lines):
        print(f"stdout line {i}")
        print(f"stderr line {i}", file=sys.stderr)
    os.write(1, b"raw fd 1 write\n")
    os.write(2, b"raw fd 2 write\n")
    print("no newline at the end", end="")
    logger.info("logged at info")
    logger.warning("logged at warning")
    logger.debug("logged at debug (below the worker's INFO level)")
    return "done"


def raise_with_cause() -> None:
    try:
        {}["missing"]
    except KeyError as exc:
        raise RuntimeError("wrapped failure") from exc


def raise_exit(code: int) -> None:
    sys.exit(code)


def make_generator() -> Any:
    return (i for i in range(3))


def nested_unpicklable() -> dict[str, Any]:
    return {"ok": [1, 2], "bad": {"lock": __import__("threading").Lock()}}


NOT_A_FUNCTION = 42


class Scorer:
    @staticmethod
    def double(x: float) -> float:
        return 2 * x
