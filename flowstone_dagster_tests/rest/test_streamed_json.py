"""A JSON array body streamed element by element: the same values as ``json.loads``, whatever
the chunking, and the errors of an invalid body."""

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest_httpserver import HTTPServer

from flowstone_dagster import RestClient, formats
from flowstone_dagster.errors import DecodeError
from flowstone_dagster.formats import iter_records
from flowstone_dagster.rest.client import STREAM_PAGE_ITEMS

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(
    value=json_values | st.lists(json_values, max_size=8),
    read_chars=st.integers(min_value=1, max_value=16),
    chunk_bytes=st.integers(min_value=1, max_value=32),
    indent=st.sampled_from([None, 0, 2]),
)
def test_a_streamed_json_body_yields_what_json_loads_does(
    value: Any, read_chars: int, chunk_bytes: int, indent: int | None
) -> None:
    body = json.dumps(value, indent=indent, ensure_ascii=False).encode()
    chunks = [body[i : i + chunk_bytes] for i in range(0, len(body), chunk_bytes)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(formats, "_JSON_READ", read_chars)  # cut values at every possible place
        records = list(iter_records(chunks, "json", url="http://api/x"))
    assert records == (value if isinstance(value, list) else [value])


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (b"[1, 2", "character 5"),
        (b"[1 2]", "Expecting ',' delimiter"),
        (b"[1] x", "Extra data"),
        (b'{"a": 1', "character"),
        (b"[1, nope]", "Expecting value"),
    ],
)
def test_an_invalid_streamed_json_body_is_a_decode_error(body: bytes, where: str) -> None:
    with pytest.raises(DecodeError, match="not valid json") as raised:
        list(iter_records([body], "json", url="http://api/x"))
    assert where in str(raised.value)


def test_a_streamed_json_array_comes_in_pages(httpserver: HTTPServer) -> None:
    rows = [{"id": i, "tags": ["a", "b"]} for i in range(STREAM_PAGE_ITEMS + 5)]
    body = b"\xef\xbb\xbf" + json.dumps(rows).encode()  # a BOM too
    httpserver.expect_request("/big").respond_with_data(body, content_type="application/json")
    client = RestClient(lambda _: httpserver.url_for("/big"))
    pages = list(client.iter_pages())
    assert [len(p) for p in pages] == [STREAM_PAGE_ITEMS, 5]
    assert [r for p in pages for r in p] == rows


def test_a_streamed_json_object_is_one_record(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/one").respond_with_json({"total": 3})
    httpserver.expect_request("/none").respond_with_data("", status=204)
    assert list(RestClient(lambda _: httpserver.url_for("/one")).iter_items()) == [{"total": 3}]
    assert list(RestClient(lambda _: httpserver.url_for("/none")).iter_items()) == []
