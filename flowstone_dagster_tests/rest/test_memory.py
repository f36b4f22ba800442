"""Peak memory of large loads, measured as the process's peak resident set (reset through
``/proc/self/clear_refs`` just before the load), against a server in its own process."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flowstone_dagster import RestClient
from flowstone_dagster_tests.support.loopback import serve_bodies

LINE = b'{"id": 123456, "name": "customer-123456", "score": 30864.0, "tags": ["a", "b"]}\n'
MB = 1_000_000


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} not in /proc/self/status")


def peak_growth(load: Callable[[], Any]) -> int:
    """Bytes the resident set grew to at its peak during ``load()``, beyond where it started."""
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from now
    value = load()
    peak = _status_bytes("VmHWM")
    del value
    return peak - before


@pytest.mark.multiprocess
def test_a_streamed_ndjson_load_holds_a_page_not_the_body() -> None:
    count = 48 * MB // len(LINE)
    with serve_bodies({}, repeated={"/big": (LINE, count)}) as base_url:
        client = RestClient(lambda _: f"{base_url}/big", format="ndjson")
        seen = [0]

        def stream() -> None:
            for record in client.iter_items():
                assert record["id"] == 123456
                seen[0] += 1

        growth = peak_growth(stream)
    assert seen[0] == count
    # One page of 10,000 records and the read buffers: a fraction of the 48 MB body (a whole
    # load holds the body, its text and every record: several times the body).
    assert growth < 24 * MB, f"peak grew {growth / MB:.0f} MB for a 48 MB streamed body"


@pytest.mark.multiprocess
def test_a_large_bytes_load_peaks_at_about_its_size() -> None:
    body = b"x" * (64 * MB)
    with serve_bodies({"/big": body}) as base_url:
        client = RestClient(lambda _: f"{base_url}/big", format="bytes", max_body_bytes=100 * MB)
        loaded: list[bytes] = []
        growth = peak_growth(lambda: loaded.append(client.load()))
    assert loaded == [body]
    # The body once (a list of chunks joined at the end peaked at twice the body).
    assert growth < 1.5 * len(body), f"peak grew {growth / MB:.0f} MB for a 64 MB body"


@pytest.mark.multiprocess
def test_a_streamed_json_array_holds_a_page_not_the_body() -> None:
    body = b"[" + b",".join([LINE.strip()] * (48 * MB // len(LINE))) + b"]"
    with serve_bodies({"/big": body}) as base_url:
        client = RestClient(lambda _: f"{base_url}/big", format="json")
        seen = [0]

        def stream() -> None:
            for record in client.iter_items():
                assert record["id"] == 123456
                seen[0] += 1

        growth = peak_growth(stream)
    assert seen[0] == 48 * MB // len(LINE)
    # A whole load holds the body's text and every record: several times the 48 MB body.
    assert growth < 24 * MB, f"peak grew {growth / MB:.0f} MB for a 48 MB streamed body"
