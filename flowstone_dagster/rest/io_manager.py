"""``RestIOManager``: an asset's value per partition, loaded from and stored to an HTTP API
through :class:`~flowstone_dagster.rest.client.RestClient` (the guide is ``docs/rest.md``)."""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote

import dagster as dg
from pydantic import Field, PrivateAttr

from flowstone_dagster import telemetry
from flowstone_dagster.errors import (
    ConfigurationError,
)
from flowstone_dagster.formats import (
    NonFinite,
    RestFormat,
    require_pandas,
    wants_dataframe,
)
from flowstone_dagster.http import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
)
from flowstone_dagster.resilience import ResilienceResource, resolve
from flowstone_dagster.rest.auth import NoAuth, OAuth2ClientCredentials, RestAuth
from flowstone_dagster.rest.client import (
    DEFAULT_MAX_BODY_BYTES,
    HeadInfo,
    RestClient,
    StoreMethod,
    check_partition_key,
    rest_service,
)
from flowstone_dagster.rest.pagination import NoPagination, RestPagination

__all__ = ["RestIOManager"]

T = TypeVar("T")


def _asset_path(asset_key: dg.AssetKey) -> str:
    return "/".join(quote(part, safe="") for part in asset_key.path)


def _partition_fields(definition: dg.PartitionsDefinition | None, key: str) -> dict[str, str]:
    """Placeholders for a partition: ``partition_key`` and, for multi-partitions, one per
    dimension (``{date}``, ``{region}``, ...), all URL-encoded. A dot-segment or empty key
    (or dimension value) raises ``ConfigurationError`` (:func:`check_partition_key`)."""
    check_partition_key(key)
    fields = {"partition_key": quote(key, safe="")}
    multi: dg.MultiPartitionKey | None = None
    if isinstance(key, dg.MultiPartitionKey):
        multi = key
    elif isinstance(definition, dg.MultiPartitionsDefinition):
        multi = definition.get_partition_key_from_str(key)
    if multi is not None:
        for dimension, value in multi.keys_by_dimension.items():
            check_partition_key(value, what=f"partition key {key!r}: dimension {dimension!r}")
            fields[dimension] = quote(value, safe="")
    return fields


class RestIOManager(dg.ConfigurableIOManager):
    """Stores each asset output with an HTTP request and loads inputs with ``GET``.

    The URL is ``base_url`` + ``path_template`` (unpartitioned assets) or
    ``partition_path_template`` (partitioned ones), with ``{asset_key}`` (the key's parts joined
    by ``/``), ``{partition_key}`` and, for multi-partitioned assets, one placeholder per
    dimension, all URL-encoded. An asset overrides these with definition metadata:
    ``rest/path`` (a template), ``rest/format`` and ``rest/method``.

    A store records ``dagster/uri``, its status, method, ``Location`` and, from a ``HEAD`` on the
    same URL (``record_head``), content type, length, ETag and Last-Modified as ``flowstone/rest/``
    output metadata, beside the request's ``flowstone/rest.store/`` telemetry totals (calls,
    attempts, duration, bytes): each fact under one key (the table in ``docs/rest.md``).
    """

    base_url: str = Field(
        repr=False,  # may carry credentials (user:password@, a signed query)
        description="Base URL of the API, e.g. https://api.example.com/v1.",
    )
    path_template: str = Field(
        default="/{asset_key}",
        description="Path of an unpartitioned asset, appended to base_url. Placeholders: "
        "{asset_key}.",
    )
    partition_path_template: str = Field(
        default="/{asset_key}/{partition_key}",
        description="Path of a partitioned asset. Placeholders: {asset_key}, {partition_key}, "
        "and one per dimension of a multi-partitioned asset (e.g. {date}, {region}).",
    )
    format: RestFormat = Field(
        default="json",
        description="Body format: json, ndjson, csv (list of dicts, or a DataFrame when the "
        "input is annotated pd.DataFrame), text or bytes. Sets Content-Type and Accept.",
    )
    method: StoreMethod = Field(default="POST", description="HTTP method of stores.")
    non_finite: NonFinite = Field(
        default="null",
        description="NaN and infinities in a stored json/ndjson value (JSON cannot hold them): "
        "null writes them as null; error fails the step before anything is sent.",
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        repr=False,  # may carry credentials
        description="Extra headers sent with every request. Credential headers among them "
        "(Authorization, Proxy-Authorization, X-API-Key, API-Key, X-Auth-Token, Cookie, any name "
        "containing token, secret or key, and secret_headers) go only to base_url's origin, "
        "never to a redirect or next page elsewhere, and their values are redacted.",
    )
    secret_headers: list[str] = Field(
        default_factory=list,
        description="More header names (besides the usual credential headers) whose values are "
        "secrets: sent only to base_url's origin and redacted everywhere.",
    )
    auth: RestAuth = Field(
        default=NoAuth(),
        discriminator="kind",
        description="Credentials, chosen by kind: none (the default), bearer (token), basic "
        "(username, password), api_key (key, in the header header or the query_param query "
        "parameter) or oauth2_client_credentials (token_url, client_id, client_secret, scopes: "
        "a cached token, refreshed before expiry and once on a 401). Secrets: use "
        "EnvVar('...').",
    )
    connect_timeout: float = Field(
        default=DEFAULT_CONNECT_TIMEOUT, gt=0, description="Seconds to connect."
    )
    read_timeout: float = Field(
        default=DEFAULT_READ_TIMEOUT, gt=0, description="Seconds to wait between bytes."
    )
    max_body_bytes: int = Field(
        default=DEFAULT_MAX_BODY_BYTES,
        gt=0,
        description="Largest response body accepted; larger ones fail with ResponseTooLarge.",
    )
    max_redirects: int = Field(default=10, ge=0, description="Redirects followed.")
    store_follows_301: bool = Field(
        default=False,
        description="A store answered 301 (moved permanently) to the same origin re-sends its "
        "method and body there instead of failing with RedirectRefused. 302/303 always fail; "
        "307/308 to the same origin are always followed; any redirect to another origin fails.",
    )
    pagination: RestPagination = Field(
        default=NoPagination(),
        discriminator="kind",
        description="How loads follow pages, chosen by kind: none (the default), link (RFC 8288 "
        "Link rel=next), json_link (next URL in the body at next_url_path), cursor (cursor in "
        "the body at cursor_path, sent as cursor_param), header_cursor (cursor in the "
        "cursor_header response header), offset (offset/limit, until total_path or an empty "
        "page), page_number (page=1,2,..., until total_pages_path or an empty page); each with "
        "items_path and max_pages.",
    )
    verify_tls: bool = Field(
        default=True,
        description="Verify TLS certificates. Off logs a WARNING naming the origin in the "
        "step's log, once per step.",
    )
    ca_bundle: str | None = Field(default=None, description="PEM file of CAs to trust.")
    record_head: bool = Field(
        default=True,
        description="After a store, HEAD the URL and record its status, type, length, ETag and "
        "Last-Modified as output metadata.",
    )
    service: str | None = Field(
        default=None,
        description="Service name in errors, telemetry and the resilience policy. Null: the "
        "origin of base_url, e.g. rest:https://api.example.com (what fails together).",
    )
    resilience: ResilienceResource | None = Field(
        default=None,
        description="Retry/breaker/rate-limit policy for each request (policy `service`), and "
        "whether errors become Dagster control flow (its dagster_errors). Without it, each "
        "request is made exactly once and errors are mapped to Dagster.",
    )

    # One client (so one connection pool) per asset configuration, for the manager's lifetime.
    _clients: dict[tuple[Any, ...], RestClient] = PrivateAttr(default_factory=dict)
    # verify_tls=False is said once in the step's log (and once per process in Python's).
    _warned_insecure: bool = PrivateAttr(default=False)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.resolved_service()  # fail at set-up on a malformed base_url

    def resolved_service(self) -> str:
        """``service``, else the origin of ``base_url`` (:func:`rest_service`)."""
        return self.service or rest_service(self.base_url)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def _client(
        self, context: dg.InputContext | dg.OutputContext, metadata: Mapping[str, Any]
    ) -> RestClient:
        partitioned = context.has_asset_partitions
        template = metadata.get("rest/path") or (
            self.partition_path_template if partitioned else self.path_template
        )
        fmt = str(metadata.get("rest/format") or self.format)
        method = str(metadata.get("rest/method") or self.method)
        cache_key = (context.asset_key, partitioned, template, fmt, method)
        client = self._clients.get(cache_key)
        if client is None:
            client = self._clients[cache_key] = self._new_client(
                context, str(template), fmt, method
            )
            if not self.verify_tls and not self._warned_insecure:
                self._warned_insecure = True
                context.log.warning(
                    "TLS certificate verification is off (verify_tls=False) for "
                    f"{self.resolved_service().removeprefix('rest:')}: anyone on the network "
                    "path can impersonate the API; set ca_bundle to trust a private CA instead"
                )
        return client

    def _new_client(
        self,
        context: dg.InputContext | dg.OutputContext,
        template: str,
        fmt: str,
        method: str,
    ) -> RestClient:
        asset_path = _asset_path(context.asset_key)
        partitions_def = context.asset_partitions_def if context.has_asset_partitions else None
        base = self.base_url.rstrip("/")

        def url_fn(partition: Any) -> str:
            fields = {"asset_key": asset_path}
            if partition is not None:
                fields |= _partition_fields(partitions_def, partition)
            try:
                path = template.format(**fields)
            except KeyError as exc:
                raise ConfigurationError(
                    f"template {template!r} uses {{{exc.args[0]}}}, which asset "
                    f"{context.asset_key.to_user_string()} does not have "
                    f"(available: {', '.join(sorted(fields))})",
                    field="path_template",
                ) from None
            return base + (path if path.startswith("/") else "/" + path)

        credentials = self.auth.credentials()
        return RestClient(
            url_fn,
            format=fmt,
            method=method,
            headers=self.headers,
            secret_headers=self.secret_headers,
            auth_headers=credentials.headers,
            auth_params=credentials.params,
            secrets=credentials.secrets,
            oauth2=self.auth if isinstance(self.auth, OAuth2ClientCredentials) else None,
            timeout=(self.connect_timeout, self.read_timeout),
            max_body_bytes=self.max_body_bytes,
            max_redirects=self.max_redirects,
            store_follows_301=self.store_follows_301,
            non_finite=self.non_finite,
            pagination=self.pagination,
            verify=self.verify_tls,
            ca_bundle=self.ca_bundle,
            resilience=self.resilience,
            service=self.resolved_service(),
        )

    def _dagster_errors(self, call: Callable[[], T]) -> T:
        """The one mapping to Dagster (``resolve(resilience).dagster_retries``): an open circuit
        becomes RetryRequested, a failure Failure(allow_retries=<retryable>), unless the
        resilience resource's ``dagster_errors`` is off."""
        with resolve(self.resilience).dagster_retries(service=self.resolved_service()):
            return call()

    def _head(
        self, context: dg.OutputContext, client: RestClient, partition: str | None
    ) -> HeadInfo | None:
        """HEAD after a store is for metadata only: its failure must not fail a step whose
        store succeeded (a step retry would store again)."""
        try:
            return client.head(partition)
        except Exception as exc:
            context.log.warning(f"HEAD after the store failed, metadata skipped: {exc}")
            return None

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        metadata = context.definition_metadata or {}
        client = self._client(context, metadata)
        asset = context.asset_key.to_user_string()
        keys: list[str | None] = (
            list(context.asset_partition_keys) if context.has_asset_partitions else [None]
        )
        if len(keys) > 1:
            raise ConfigurationError(
                f"asset {asset} wrote {len(keys)} partitions in one run; the REST I/O manager "
                "stores one partition per request: run them as separate partitions",
                field="partitions",
            )
        partition = keys[0]
        with telemetry.observe(context):  # flowstone/rest.store/{calls,attempts,bytes,...}
            result = self._dagster_errors(lambda: client.store(obj, partition, asset=asset))
            head = self._head(context, client, partition) if self.record_head else None
        # One key per fact (the table in docs/rest.md): Dagster's dagster/uri for the URL; the
        # request's count, attempts, duration and bytes are the telemetry totals above.
        output: dict[str, Any] = {
            "dagster/uri": result.url,
            "flowstone/rest/method": result.method,
            "flowstone/rest/status": result.status,
        }
        if result.location:
            output["flowstone/rest/location"] = client.session.redact(result.location)
        etag = (head.etag if head is not None else None) or result.etag
        if etag:
            output["flowstone/rest/etag"] = etag
        if head is not None:
            output["flowstone/rest/head_status"] = head.status
            for key, value in (
                ("flowstone/rest/content_type", head.content_type),
                ("flowstone/rest/content_length", head.content_length),
                ("flowstone/rest/last_modified", head.last_modified),
            ):
                if value is not None:
                    output[key] = value
        context.add_output_metadata(output)

    def load_input(self, context: dg.InputContext) -> Any:
        """The upstream value, shaped by the input (the table in ``docs/rest.md``): one
        partition as it decodes (a DataFrame when annotated ``pd.DataFrame``); several
        partitions as ``{partition_key: value}``, or concatenated in partition order for a
        ``list`` / ``pd.DataFrame`` annotation; with input metadata ``rest/stream`` an iterator
        of items (``True``/``"items"``) or of pages (``"pages"``)."""
        upstream = context.upstream_output
        metadata = (upstream.definition_metadata if upstream is not None else None) or {}
        client = self._client(context, metadata)
        asset = context.asset_key.to_user_string()
        keys: list[str | None] = (
            list(context.asset_partition_keys) if context.has_asset_partitions else [None]
        )
        stream = (context.definition_metadata or {}).get("rest/stream")
        if stream:
            if stream not in (True, "items", "pages"):
                raise ConfigurationError(
                    f"input metadata rest/stream is {stream!r}: use True or 'items' (an "
                    "iterator of items) or 'pages' (an iterator of lists)",
                    field="rest/stream",
                )
            return self._stream(client, keys, asset, pages=stream == "pages")
        shape = input_shape(context)
        loaded: dict[str | None, Any] = {}
        # Dagster takes input metadata for one partition only; several are still logged.
        with telemetry.observe(context, attach_metadata=len(keys) == 1):
            for key in keys:
                loaded[key] = self._dagster_errors(
                    partial(client.load, key, asset=asset, as_dataframe=shape == "dataframe")
                )
        if len(keys) == 1:
            return loaded[keys[0]]
        if shape == "list":
            return _concatenated(loaded)
        if shape == "dataframe":
            return _concatenated_frames(loaded, asset)
        # An unannotated or dict input reading several upstream partitions: {key: value}.
        return loaded

    def _stream(
        self, client: RestClient, keys: list[str | None], asset: str, *, pages: bool
    ) -> Iterator[Any]:
        """Each partition's pages (or items), in partition order, fetched as the step consumes
        them; each request's errors mapped to Dagster like a load's."""
        end = object()
        for key in keys:
            page_iterator = client.iter_pages(key, asset=asset)
            try:
                while (page := self._dagster_errors(partial(next, page_iterator, end))) is not end:
                    if pages:
                        yield page
                    else:
                        yield from page
            finally:
                page_iterator.close()


def input_shape(context: dg.InputContext) -> str:
    """What the input's annotation asks for: ``dataframe`` (``pd.DataFrame``), ``list``
    (``list``, ``list[dict]``...), else ``value`` (``dict``, ``Any``, none: as loaded)."""
    if wants_dataframe(context):
        return "dataframe"
    try:
        annotation = context.dagster_type.typing_type
    except dg.DagsterInvariantViolationError:  # a context built without a type
        return "value"
    if annotation is list or typing.get_origin(annotation) is list:
        return "list"
    return "value"


def _concatenated(loaded: Mapping[str | None, Any]) -> list[Any]:
    """The partitions' values in one list, in partition order: a list value's items, another
    value as one item, nothing for a partition without a body."""
    values: list[Any] = []
    for value in loaded.values():
        if isinstance(value, list):
            values.extend(value)
        elif value is not None:
            values.append(value)
    return values


#: The column that says which partition a row of a concatenated DataFrame came from.
PARTITION_COLUMN = "partition_key"


def _concatenated_frames(loaded: Mapping[str | None, Any], asset: str) -> Any:
    """The partitions' DataFrames in one, in partition order, with a ``partition_key``
    column first (``None`` bodies are skipped)."""
    pandas = require_pandas()
    frames = []
    for key, frame in loaded.items():
        if frame is None:
            continue
        if PARTITION_COLUMN in frame.columns:
            raise ConfigurationError(
                f"asset {asset} partition {key} already has a {PARTITION_COLUMN!r} column, the "
                "one that would name each row's partition: rename it, or annotate the input as "
                "dict to get {partition_key: DataFrame}",
                field="partition_key",
            )
        frames.append(frame.assign(**{PARTITION_COLUMN: key})[[PARTITION_COLUMN, *frame.columns]])
    if not frames:
        return pandas.DataFrame({PARTITION_COLUMN: []})
    return pandas.concat(frames, ignore_index=True)
