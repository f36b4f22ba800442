"""How a REST load follows pages: one Dagster config class per kind, chosen by ``kind``.

::

    RestIOManager(base_url=..., pagination=LinkPagination())            # Link: <...>; rel="next"
    RestIOManager(base_url=..., pagination=CursorPagination(cursor_path="meta.next"))
    RestIOManager(base_url=..., pagination=JsonLinkPagination(next_url_path="links.next"))
    RestIOManager(base_url=..., pagination=OffsetPagination(limit=500, total_path="total"))
    RestIOManager(base_url=..., pagination=PageNumberPagination(total_pages_path="pages"))
    RestIOManager(base_url=..., pagination=HeaderCursorPagination(cursor_header="X-Next-Cursor"))
    RestIOManager(base_url=...)  # one request: NoPagination(), the default

In run config the union is a selector keyed by ``kind``:
``pagination: {offset: {limit: 500, total_path: total}}``. Every paginating kind has
``items_path`` (where a page's items are) and ``max_pages`` (more pages fail the load, nothing is
dropped silently); a next page that was already requested is a loop and fails the load too.

Each kind computes the next request from the one just made, the response and its decoded page
(:meth:`next_request`); the request loop, its guards and the decoding live in the client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urljoin

import dagster as dg
import requests
from pydantic import Field

__all__ = [
    "CursorPagination",
    "HeaderCursorPagination",
    "JsonLinkPagination",
    "LinkPagination",
    "NoPagination",
    "OffsetPagination",
    "PageNumberPagination",
    "PageRequest",
    "RestPagination",
    "dig",
]

#: One page's request: its URL and the query parameters added to it.
PageRequest = tuple[str, dict[str, str]]


def dig(value: Any, path: str) -> Any:
    """``value["a"]["b"]`` for ``path="a.b"`` (a digit indexes a list); ``None`` when a step
    is missing."""
    for part in path.split("."):
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def _int_at(page: Any, path: str, what: str) -> int | None:
    value = dig(page, path)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} at {path!r} is {value!r}, not a whole number") from None


class NoPagination(dg.Config):
    """One request; its body is the value (the default)."""

    kind: Literal["none"] = "none"


class _Paginated(dg.Config):
    items_path: str | None = Field(
        default=None,
        min_length=1,
        description="Dotted path of a page's items (e.g. data); default: the page is a list.",
    )
    max_pages: int = Field(
        default=100, ge=1, description="More pages than this fails the load (never truncates)."
    )

    def first_request(self, url: str) -> PageRequest:
        return url, {}

    def next_request(
        self, current: PageRequest, response: requests.Response, page: Any, items: list[Any]
    ) -> PageRequest | None:
        raise NotImplementedError


class LinkPagination(_Paginated):
    """The next page's URL from the RFC 8288 ``Link: <...>; rel="next"`` header (GitHub)."""

    kind: Literal["link"] = "link"

    def next_request(
        self, current: PageRequest, response: requests.Response, page: Any, items: list[Any]
    ) -> PageRequest | None:
        target = response.links.get("next", {}).get("url")
        return (urljoin(current[0], target), {}) if target else None


class JsonLinkPagination(_Paginated):
    """The next page's URL (absolute or relative) from the body at ``next_url_path``; a
    missing, null or empty value ends."""

    kind: Literal["json_link"] = "json_link"
    next_url_path: str = Field(
        min_length=1, description="Dotted path of the next page's URL, e.g. links.next."
    )

    def next_request(
        self, current: PageRequest, response: requests.Response, page: Any, items: list[Any]
    ) -> PageRequest | None:
        target = dig(page, self.next_url_path)
        if target in (None, ""):
            return None
        return urljoin(current[0], str(target)), {}


class CursorPagination(_Paginated):
    """The next cursor from the body at ``cursor_path``, sent back as ``cursor_param``; a
    missing, null or empty cursor ends."""

    kind: Literal["cursor"] = "cursor"
    cursor_path: str = Field(
        min_length=1, description="Dotted path of the next cursor in a page, e.g. meta.next."
    )
    cursor_param: str = Field(
        default="cursor", min_length=1, description="Query parameter of the cursor."
    )

    def next_request(
        self, current: PageRequest, response: requests.Response, page: Any, items: list[Any]
    ) -> PageRequest | None:
        cursor = dig(page, self.cursor_path)
        if cursor in (None, ""):
            return None
        return current[0], {**current[1], self.cursor_param: str(cursor)}


class HeaderCursorPagination(_Paginated):
    """The next cursor from the response header ``cursor_header``, sent back as
    ``cursor_param``; no header (or an empty one) ends."""

    kind: Literal["header_cursor"] = "header_cursor"
    cursor_header: str = Field(
        default="X-Next-Cursor", min_length=1, description="Response header of the next cursor."
    )
    cursor_param: str = Field(
        default="cursor", min_length=1, description="Query parameter of the cursor."
    )

    def next_request(
        self, current: PageRequest, response: requests.Response, page: Any, items: list[Any]
    ) -> PageRequest | None:
        cursor = response.headers.get(self.cursor_header, "").strip()
        if not cursor:
            return None
        return current[0], {**current[1], self.cursor_param: cursor}


class OffsetPagination(_Paginated):
    """``?offset=0&limit=N``, then ``offset=N``, ``2N``...; ends at ``total_path``'s total when
    the body has one, else at the first empty page."""

    kind: Literal["offset"] = "offset"
    limit: int = Field(ge=1, description="Items asked for per page.")
    offset_param: str = Field(default="offset", min_length=1, description="Offset parameter.")
    limit_param: str = Field(default="limit", min_length=1, description="Limit parameter.")
    start: int = Field(default=0, ge=0, description="Offset of the first page.")
    total_path: str | None = Field(
        default=None,
        min_length=1,
        description="Dotted path of the total number of items (e.g. meta.total); without it "
        "the load ends at the first empty page.",
    )

    def first_request(self, url: str) -> PageRequest:
        return url, {self.offset_param: str(self.start), self.limit_param: str(self.limit)}

    def next_request(
        self, current: PageRequest, response: requests.Response, page: Any, items: list[Any]
    ) -> PageRequest | None:
        if not items:
            return None
        offset = int(current[1][self.offset_param]) + len(items)
        if self.total_path:
            total = _int_at(page, self.total_path, "the total")
            if total is not None and offset >= total:
                return None
        return current[0], {**current[1], self.offset_param: str(offset)}


class PageNumberPagination(_Paginated):
    """``?page=1``, ``page=2``...; ends at ``total_pages_path``'s page count when the body has
    one, else at the first empty page."""

    kind: Literal["page_number"] = "page_number"
    page_param: str = Field(default="page", min_length=1, description="Page number parameter.")
    base_page: int = Field(default=1, ge=0, description="Number of the first page (0 or 1).")
    page_size: int | None = Field(
        default=None, ge=1, description="Items per page, sent as page_size_param when set."
    )
    page_size_param: str = Field(
        default="per_page", min_length=1, description="Query parameter of the page size."
    )
    total_pages_path: str | None = Field(
        default=None,
        min_length=1,
        description="Dotted path of the number of pages (e.g. meta.pages); without it the "
        "load ends at the first empty page.",
    )

    def first_request(self, url: str) -> PageRequest:
        params = {self.page_param: str(self.base_page)}
        if self.page_size is not None:
            params[self.page_size_param] = str(self.page_size)
        return url, params

    def next_request(
        self, current: PageRequest, response: requests.Response, page: Any, items: list[Any]
    ) -> PageRequest | None:
        if not items:
            return None
        number = int(current[1][self.page_param]) + 1
        if self.total_pages_path:
            pages = _int_at(page, self.total_pages_path, "the number of pages")
            if pages is not None and number - self.base_page >= pages:
                return None
        return current[0], {**current[1], self.page_param: str(number)}


#: The kinds that follow pages.
Paginated = (
    LinkPagination
    | JsonLinkPagination
    | CursorPagination
    | HeaderCursorPagination
    | OffsetPagination
    | PageNumberPagination
)
#: The ``pagination`` field's type: one of these, chosen by ``kind``.
RestPagination = NoPagination | Paginated
