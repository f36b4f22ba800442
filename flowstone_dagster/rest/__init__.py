"""REST APIs: an asset's value per partition, loaded from and stored to an HTTP API.

- :mod:`.client`: :class:`RestClient` (formats, auth, pagination, the outcome of every status;
  testable without Dagster);
- :mod:`.auth`: the ``auth`` kinds, :class:`BearerAuth`, :class:`BasicAuth`,
  :class:`ApiKeyAuth`, :class:`OAuth2ClientCredentials` and :class:`NoAuth` (Dagster config
  classes, chosen by ``kind``);
- :mod:`.pagination`: the ``pagination`` kinds (Link header, JSON link, cursor, header cursor,
  offset/limit, page number; Dagster config classes, chosen by ``kind``);
- :mod:`.io_manager`: :class:`RestIOManager`, the Dagster I/O manager.

The guide is ``docs/rest.md``.
"""

from flowstone_dagster.rest.auth import (
    ApiKeyAuth,
    BasicAuth,
    BearerAuth,
    NoAuth,
    OAuth2ClientCredentials,
)
from flowstone_dagster.rest.client import (
    DEFAULT_MAX_BODY_BYTES,
    HeadInfo,
    RestClient,
    StoreResult,
    rest_service,
)
from flowstone_dagster.rest.io_manager import RestIOManager
from flowstone_dagster.rest.pagination import (
    CursorPagination,
    HeaderCursorPagination,
    JsonLinkPagination,
    LinkPagination,
    NoPagination,
    OffsetPagination,
    PageNumberPagination,
)

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "ApiKeyAuth",
    "BasicAuth",
    "BearerAuth",
    "HeadInfo",
    "NoAuth",
    "CursorPagination",
    "HeaderCursorPagination",
    "JsonLinkPagination",
    "LinkPagination",
    "NoPagination",
    "OAuth2ClientCredentials",
    "OffsetPagination",
    "PageNumberPagination",
    "RestClient",
    "RestIOManager",
    "StoreResult",
    "rest_service",
]
