"""Every pagination kind against a loopback API that pages the way real APIs do, in the client
and inside ``materialize``; streamed pages and records; partition ranges into typed inputs."""

import json
import logging
from collections.abc import Iterator
from typing import Any

import dagster as dg
import pandas as pd
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from flowstone_dagster import (
    CursorPagination,
    HeaderCursorPagination,
    JsonLinkPagination,
    LinkPagination,
    OffsetPagination,
    PageNumberPagination,
    RestClient,
    RestIOManager,
    telemetry,
)
from flowstone_dagster.errors import ConfigurationError, DecodeError, ExternalServiceError
from flowstone_dagster.rest.client import STREAM_PAGE_ITEMS

ROWS = [{"id": i, "name": f"row-{i}"} for i in range(25)]
PAGE = 10


class PagedApi:
    """One data set served under each pagination style real APIs use, ``PAGE`` rows a page:

    - ``/link``: GitHub's ``Link: <...?page=2>; rel="next"``
    - ``/json_link``: ``{"data": [...], "links": {"next": "/json_link?page=2"}}`` (relative)
    - ``/cursor``: ``{"data": [...], "meta": {"next_cursor": "c10"}}``
    - ``/header_cursor``: ``X-Next-Cursor: c10`` header, the page a bare list
    - ``/offset``: ``?offset=&limit=`` with ``{"results": [...], "total": 25}``
    - ``/offset_no_total``: the same without a total (an empty page ends)
    - ``/page_number``: ``?page=1&per_page=10`` with ``{"items": [...], "pages": 3}``
    - ``/page_number_no_total``: the same without the page count
    """

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.queries: list[tuple[str, dict[str, str]]] = []
        for path in (
            "link",
            "json_link",
            "cursor",
            "header_cursor",
            "offset",
            "offset_no_total",
            "page_number",
            "page_number_no_total",
        ):
            server.expect_request(f"/{path}").respond_with_handler(self._handler(path))

    def _handler(self, kind: str) -> Any:
        def handle(request: Request) -> Response:
            args = dict(request.args)
            self.queries.append((kind, args))
            if kind in ("link", "json_link", "page_number", "page_number_no_total"):
                number = int(args.get("page", "1"))
                size = int(args.get("per_page", PAGE))
                rows = ROWS[(number - 1) * size : number * size]
                more = number * size < len(ROWS)
                if kind == "link":
                    headers = {}
                    if more:
                        headers["Link"] = (
                            f'<{self.server.url_for("/link")}?page={number + 1}>; rel="next"'
                        )
                    return Response(
                        json.dumps(rows), headers=headers, content_type="application/json"
                    )
                if kind == "json_link":
                    nxt = f"/json_link?page={number + 1}" if more else None
                    return _json({"data": rows, "links": {"next": nxt}})
                body: dict[str, Any] = {"items": rows}
                if kind == "page_number":
                    body["pages"] = -(-len(ROWS) // size)
                return _json(body)
            if kind in ("cursor", "header_cursor"):
                start = int(args.get("cursor", "c0")[1:])
                rows = ROWS[start : start + PAGE]
                nxt = f"c{start + PAGE}" if start + PAGE < len(ROWS) else None
                if kind == "cursor":
                    return _json({"data": rows, "meta": {"next_cursor": nxt}})
                headers = {"X-Next-Cursor": nxt} if nxt else {}
                return Response(json.dumps(rows), headers=headers, content_type="application/json")
            offset, limit = int(args["offset"]), int(args["limit"])
            body = {"results": ROWS[offset : offset + limit]}
            if kind == "offset":
                body["total"] = len(ROWS)
            return _json(body)

        return handle


def _json(value: Any) -> Response:
    return Response(json.dumps(value), content_type="application/json")


KINDS = [
    ("link", LinkPagination(), 3),
    ("json_link", JsonLinkPagination(next_url_path="links.next", items_path="data"), 3),
    ("cursor", CursorPagination(cursor_path="meta.next_cursor", items_path="data"), 3),
    ("header_cursor", HeaderCursorPagination(cursor_header="X-Next-Cursor"), 3),
    ("offset", OffsetPagination(limit=PAGE, total_path="total", items_path="results"), 3),
    # Without a total the load asks once more and stops at the empty page.
    ("offset_no_total", OffsetPagination(limit=PAGE, items_path="results"), 4),
    (
        "page_number",
        PageNumberPagination(page_size=PAGE, total_pages_path="pages", items_path="items"),
        3,
    ),
    ("page_number_no_total", PageNumberPagination(page_size=PAGE, items_path="items"), 4),
]


@pytest.mark.parametrize(("path", "pagination", "requests"), KINDS, ids=[k[0] for k in KINDS])
def test_each_pagination_kind_loads_every_row_once(
    httpserver: HTTPServer, path: str, pagination: Any, requests: int
) -> None:
    api = PagedApi(httpserver)
    events: list[telemetry.TelemetryEvent] = []
    remove = telemetry.add_listener(events.append)
    try:
        client = RestClient(lambda _: httpserver.url_for(f"/{path}"), pagination=pagination)
        assert client.load() == ROWS
    finally:
        remove()
    assert len(api.queries) == requests
    (event,) = [e for e in events if e.name == "flowstone.rest.load"]
    assert event.measures["pages"] == requests
    assert event.measures["status"] == 200


def test_offset_and_page_number_send_their_parameters(httpserver: HTTPServer) -> None:
    api = PagedApi(httpserver)
    offset = OffsetPagination(limit=PAGE, total_path="total", items_path="results")
    RestClient(lambda _: httpserver.url_for("/offset"), pagination=offset).load()
    assert [q for _, q in api.queries] == [
        {"offset": "0", "limit": "10"},
        {"offset": "10", "limit": "10"},
        {"offset": "20", "limit": "10"},
    ]
    api.queries.clear()
    numbered = PageNumberPagination(page_size=5, total_pages_path="pages", items_path="items")
    assert RestClient(lambda _: httpserver.url_for("/page_number"), pagination=numbered).load() == (
        ROWS
    )
    assert [q["page"] for _, q in api.queries] == ["1", "2", "3", "4", "5"]
    assert {q["per_page"] for _, q in api.queries} == {"5"}


def test_a_json_link_to_the_same_page_is_a_loop(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/p").respond_with_json({"items": [1], "next": "/p"})
    pagination = JsonLinkPagination(next_url_path="next", items_path="items")
    client = RestClient(lambda _: httpserver.url_for("/p"), pagination=pagination)
    with pytest.raises(ExternalServiceError, match="pagination loop"):
        client.load()
    assert len(httpserver.log) == 1


def test_a_header_cursor_repeated_is_a_loop(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/p").respond_with_json([1], headers={"X-Next-Cursor": "same"})
    client = RestClient(lambda _: httpserver.url_for("/p"), pagination=HeaderCursorPagination())
    with pytest.raises(ExternalServiceError, match="pagination loop"):
        client.load()
    assert len(httpserver.log) == 2


def test_an_endless_offset_api_stops_at_max_pages(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/p").respond_with_json({"results": [1]})  # never empty
    pagination = OffsetPagination(limit=1, items_path="results", max_pages=4)
    client = RestClient(lambda _: httpserver.url_for("/p"), pagination=pagination)
    with pytest.raises(ExternalServiceError, match="more than max_pages=4 pages"):
        client.load()
    assert len(httpserver.log) == 4


def test_a_total_that_is_not_a_number_is_a_decode_error(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/p").respond_with_json({"results": [1], "total": "many"})
    pagination = OffsetPagination(limit=1, items_path="results", total_path="total")
    with pytest.raises(DecodeError, match="the total at 'total' is 'many'"):
        RestClient(lambda _: httpserver.url_for("/p"), pagination=pagination).load()


def test_incomplete_pagination_fails_when_built_naming_the_field() -> None:
    with pytest.raises(Exception, match="cursor_path"):
        CursorPagination()  # type: ignore[call-arg]
    with pytest.raises(Exception, match="limit"):
        OffsetPagination(limit=0)
    with pytest.raises(Exception, match="max_pages"):
        LinkPagination(max_pages=0)


def test_iter_pages_requests_each_page_when_the_previous_is_consumed(
    httpserver: HTTPServer,
) -> None:
    api = PagedApi(httpserver)
    pagination = OffsetPagination(limit=PAGE, total_path="total", items_path="results")
    pages = RestClient(lambda _: httpserver.url_for("/offset"), pagination=pagination).iter_pages()
    assert next(pages) == ROWS[:10]
    assert len(api.queries) == 1  # the next page is not fetched ahead
    assert next(pages) == ROWS[10:20]
    assert len(api.queries) == 2
    assert list(pages) == [ROWS[20:]]


@pytest.mark.parametrize("fmt", ["ndjson", "csv"])
def test_an_unpaginated_ndjson_or_csv_body_streams_in_pages(
    httpserver: HTTPServer, fmt: str
) -> None:
    rows = [{"id": str(i), "name": f"row, {i}"} for i in range(STREAM_PAGE_ITEMS + 5)]
    if fmt == "ndjson":
        body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    else:
        body = ("\ufeffid,name\n" + "".join(f'{r["id"]},"{r["name"]}"\n' for r in rows)).encode()
    httpserver.expect_request("/big").respond_with_data(body, content_type="text/plain")
    client = RestClient(lambda _: httpserver.url_for("/big"), format=fmt)
    events: list[telemetry.TelemetryEvent] = []
    remove = telemetry.add_listener(events.append)
    try:
        pages = list(client.iter_pages())
    finally:
        remove()
    (event,) = [e for e in events if e.name == "flowstone.rest.load"]
    assert event.measures["bytes"] == len(body)
    assert event.measures["status"] == 200
    assert [len(p) for p in pages] == [STREAM_PAGE_ITEMS, 5]
    assert [r for p in pages for r in p] == rows
    assert list(client.iter_items()) == rows


def test_a_stream_abandoned_early_ends_the_load_without_an_error(httpserver: HTTPServer) -> None:
    rows = [{"id": i} for i in range(3 * STREAM_PAGE_ITEMS)]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    httpserver.expect_request("/big").respond_with_data(body)
    client = RestClient(lambda _: httpserver.url_for("/big"), format="ndjson")
    events: list[telemetry.TelemetryEvent] = []
    remove = telemetry.add_listener(events.append)
    try:
        pages = client.iter_pages()
        assert next(pages) == rows[:STREAM_PAGE_ITEMS]
        pages.close()
        # The half-read connection was released: the client goes on working.
        assert len(list(client.iter_items())) == len(rows)
    finally:
        remove()
    loads = [e for e in events if e.name == "flowstone.rest.load"]
    assert [e.ok for e in loads] == [True, True]


def test_a_streamed_body_larger_than_the_limit_fails(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/big").respond_with_data(b'{"a": 1}\n' * 1000)
    client = RestClient(lambda _: httpserver.url_for("/big"), format="ndjson", max_body_bytes=500)
    with pytest.raises(Exception, match="max_body_bytes is 500"):
        list(client.iter_items())


def test_a_bad_streamed_line_names_the_line(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/big").respond_with_data(b'{"a": 1}\n{"a": 2}\nNaN-ish\n')
    client = RestClient(lambda _: httpserver.url_for("/big"), format="ndjson")
    with pytest.raises(DecodeError, match="not valid ndjson at line 3"):
        list(client.iter_items())


# -- inside Dagster ------------------------------------------------------------------------------


@dg.asset(io_manager_key="rest")
def rows() -> list[dict]:  # never materialized here: the API serves it
    return []


@dg.asset
def row_count(rows: list[dict]) -> int:
    return len(rows)


@pytest.mark.dagster
@pytest.mark.parametrize(("path", "pagination", "requests"), KINDS, ids=[k[0] for k in KINDS])
def test_each_pagination_kind_inside_materialize(
    httpserver: HTTPServer,
    dagster_instance: dg.DagsterInstance,
    path: str,
    pagination: Any,
    requests: int,
) -> None:
    api = PagedApi(httpserver)
    manager = RestIOManager(
        base_url=httpserver.url_for("/"), path_template=f"/{path}", pagination=pagination
    )
    result = dg.materialize(
        [rows, row_count],
        selection=[row_count],
        resources={"rest": manager},
        instance=dagster_instance,
    )
    assert result.success
    assert result.output_for_node("row_count") == len(ROWS)
    assert len(api.queries) == requests


@pytest.mark.dagster
def test_pagination_is_a_selector_in_run_config(
    httpserver: HTTPServer, dagster_instance: dg.DagsterInstance
) -> None:
    api = PagedApi(httpserver)
    result = dg.materialize(
        [rows, row_count],
        selection=[row_count],
        resources={"rest": RestIOManager.configure_at_launch()},
        instance=dagster_instance,
        run_config={
            "resources": {
                "rest": {
                    "config": {
                        "base_url": httpserver.url_for("/"),
                        "path_template": "/offset",
                        "pagination": {
                            "offset": {
                                "limit": PAGE,
                                "total_path": "total",
                                "items_path": "results",
                            }
                        },
                    }
                }
            }
        },
    )
    assert result.success
    assert result.output_for_node("row_count") == len(ROWS)
    assert len(api.queries) == 3


@dg.asset(ins={"rows": dg.AssetIn(metadata={"rest/stream": True}, dagster_type=dg.Any)})
def streamed_count(rows: Iterator[dict]) -> int:
    count = 0
    for row in rows:
        assert isinstance(row, dict)
        count += 1
    return count


@dg.asset(ins={"rows": dg.AssetIn(metadata={"rest/stream": "pages"})})
def page_sizes(rows: Any) -> list[int]:
    return [len(page) for page in rows]


@pytest.mark.dagster
def test_an_input_streams_items_or_pages(
    httpserver: HTTPServer, dagster_instance: dg.DagsterInstance
) -> None:
    PagedApi(httpserver)
    manager = RestIOManager(
        base_url=httpserver.url_for("/"),
        path_template="/cursor",
        pagination=CursorPagination(cursor_path="meta.next_cursor", items_path="data"),
    )
    result = dg.materialize(
        [rows, streamed_count, page_sizes],
        selection=[streamed_count, page_sizes],
        resources={"rest": manager},
        instance=dagster_instance,
    )
    assert result.success
    assert result.output_for_node("streamed_count") == len(ROWS)
    assert result.output_for_node("page_sizes") == [10, 10, 5]


@dg.asset(ins={"rows": dg.AssetIn(metadata={"rest/stream": "everything"})})
def bad_stream(rows: Any) -> int:
    return 0


@pytest.mark.dagster
def test_an_unknown_stream_mode_names_the_metadata(
    httpserver: HTTPServer, dagster_instance: dg.DagsterInstance
) -> None:
    manager = RestIOManager(base_url=httpserver.url_for("/"))
    with pytest.raises(ConfigurationError, match="rest/stream"):
        dg.materialize(
            [rows, bad_stream],
            selection=[bad_stream],
            resources={"rest": manager},
            instance=dagster_instance,
        )


# -- a range of upstream partitions into typed inputs ---------------------------------------------

days = dg.DailyPartitionsDefinition(start_date="2025-01-01", end_date="2025-01-04")


@dg.asset(partitions_def=days, io_manager_key="rest")
def daily_rows(context: dg.AssetExecutionContext) -> list[dict]:
    return [{"day": context.partition_key, "n": i} for i in range(2)]


@dg.asset(io_manager_key="io_manager")
def as_list(daily_rows: list[dict]) -> list[dict]:
    return daily_rows


@dg.asset(io_manager_key="io_manager")
def as_frame(daily_rows: pd.DataFrame) -> pd.DataFrame:
    return daily_rows


@dg.asset(io_manager_key="io_manager")
def as_mapping(daily_rows: dict) -> dict:
    return daily_rows


class DayStore:
    """A REST backend that stores bodies by path and serves them back."""

    def __init__(self, server: HTTPServer) -> None:
        self.bodies: dict[str, bytes] = {}
        for day in days.get_partition_keys():
            server.expect_request(f"/api/daily_rows/{day}").respond_with_handler(self)

    def __call__(self, request: Request) -> Response:
        if request.method == "POST":
            self.bodies[request.path] = request.get_data()
            return Response("", status=201)
        if request.method == "HEAD":
            return Response("")
        return Response(self.bodies[request.path], content_type="application/json")


@pytest.mark.dagster
def test_a_partition_range_loads_into_list_dataframe_or_mapping(
    httpserver: HTTPServer, dagster_instance: dg.DagsterInstance
) -> None:
    DayStore(httpserver)
    resources = {"rest": RestIOManager(base_url=httpserver.url_for("/api"))}
    # Materialized out of order: the input still comes in partition order.
    for day in ("2025-01-03", "2025-01-01", "2025-01-02"):
        assert dg.materialize(
            [daily_rows], partition_key=day, resources=resources, instance=dagster_instance
        ).success
    result = dg.materialize(
        [daily_rows, as_list, as_frame, as_mapping],
        selection=[as_list, as_frame, as_mapping],
        resources=resources,
        instance=dagster_instance,
    )
    assert result.success
    ordered = [
        {"day": day, "n": n} for day in ("2025-01-01", "2025-01-02", "2025-01-03") for n in (0, 1)
    ]
    assert result.output_for_node("as_list") == ordered
    frame = result.output_for_node("as_frame")
    assert list(frame.columns) == ["partition_key", "day", "n"]
    assert frame["partition_key"].tolist() == frame["day"].tolist()
    assert frame[["day", "n"]].to_dict(orient="records") == ordered
    mapping = result.output_for_node("as_mapping")
    assert list(mapping) == ["2025-01-01", "2025-01-02", "2025-01-03"]
    assert mapping["2025-01-02"] == ordered[2:4]


# -- verify_tls=False is said in the step's log ---------------------------------------------------


@dg.asset(io_manager_key="rest")
def first() -> list[dict]:
    return []


@dg.asset(io_manager_key="rest")
def second() -> list[dict]:
    return []


@dg.asset
def both(first: list[dict], second: list[dict]) -> int:
    return len(first) + len(second)


@pytest.mark.dagster
@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_verify_tls_off_warns_once_in_the_step_log(
    untrusted_https_server: HTTPServer, dagster_instance: dg.DagsterInstance
) -> None:
    for name in ("first", "second"):
        untrusted_https_server.expect_request(f"/api/{name}").respond_with_json([{"n": 1}])
    manager = RestIOManager(base_url=untrusted_https_server.url_for("/api"), verify_tls=False)
    result = dg.materialize(
        [first, second, both],
        selection=[both],
        resources={"rest": manager},
        instance=dagster_instance,
    )
    assert result.success
    assert result.output_for_node("both") == 2
    records = dagster_instance.all_logs(result.run_id)
    warnings = [
        r for r in records if r.level == logging.WARNING and "verify_tls=False" in r.user_message
    ]
    assert len(warnings) == 1  # two loads from two assets, one warning
    origin = untrusted_https_server.url_for("/").rstrip("/")
    assert origin in warnings[0].user_message
