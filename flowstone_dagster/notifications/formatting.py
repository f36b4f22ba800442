"""What a notification says, and how it looks in Slack (Block Kit) and in an email.

Both renderers start from one :class:`Notice` built by :func:`compose` from an event name and
its payload, so Slack and email always say the same thing::

    from flowstone_dagster.notifications import format_email_body, format_slack_message

    message = format_slack_message(
        "materialization_failed",
        {"asset": "orders", "partition": "2025-01-15", "error": "disk full"},
    )
    message["text"]                       # 'Materialization Failed: orders (partition ...'
    message["blocks"][0]["text"]["text"]  # ':red_circle: *Materialization Failed*: orders ...'

    body = format_email_body("test_event", {"message": "Test notification"})
    body.subject                          # 'Test Event'

Events with their own layout: ``checkpoint_pending``, ``materialization_failed``,
``materialization_succeeded``, ``run_failed`` and ``asset_check_failed``; any other event name
gets the generic layout (its title is the event name in words, ``test_event`` -> ``Test
Event``). The payload keys each event reads are listed in ``docs/notifications.md``.

Slack safety: every payload value is escaped (``&``, ``<``, ``>``), so that an error message
cannot ping ``<!channel>`` or forge a ``<https://...|link>``; and every text is cut to Slack's
documented limits (section text 3,000 characters, a field 2,000, 10 fields per section, button
text 75, URLs 3,000, the fallback ``text`` 4,000), so that Slack never rejects a message for
its size.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict
from urllib.parse import urlsplit

from slack_sdk.models.blocks import (
    ActionsBlock,
    ButtonElement,
    ContextBlock,
    MarkdownTextObject,
    PlainTextObject,
    SectionBlock,
)

from flowstone_dagster.errors import ConfigurationError, truncate

__all__ = [
    "MAX_SUBJECT_CHARS",
    "SLACK_LIMITS",
    "EmailBody",
    "Link",
    "Notice",
    "SlackMessage",
    "compose",
    "escape_mrkdwn",
    "event_title",
    "format_email_body",
    "format_slack_message",
    "single_line",
    "validate_event",
]

Severity = Literal["info", "success", "warning", "error"]


@dataclass(frozen=True)
class _SlackLimits:
    """Slack's documented Block Kit limits (api.slack.com/reference/block-kit)."""

    text: int = 4000  # chat.postMessage: "text ... should be limited to 4,000 characters"
    section_text: int = 3000
    field_text: int = 2000
    fields_per_section: int = 10
    blocks_per_message: int = 50
    button_text: int = 75
    url: int = 3000
    context_text: int = 3000


#: The limits every Slack message is cut to.
SLACK_LIMITS = _SlackLimits()

#: Longest email subject produced (RFC 5322 recommends lines under 78 characters; a subject is
#: folded, so this only keeps it readable in a mail client).
MAX_SUBJECT_CHARS = 200

_EVENT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")

_EMOJI: dict[Severity, str] = {
    "info": ":information_source:",
    "success": ":white_check_mark:",
    "warning": ":raising_hand:",
    "error": ":red_circle:",
}


@dataclass(frozen=True)
class Link:
    """A button (Slack) or link (email) to a URL."""

    label: str
    url: str
    primary: bool = False


@dataclass(frozen=True)
class Notice:
    """What one notification says, independent of the channel.

    ``topic`` is what it is about (``"orders (partition 2025-01-15)"``), ``message`` prose,
    ``fields`` labelled values, ``detail`` preformatted text (an error) shown verbatim,
    ``note`` a footnote (for example how many similar alerts were held back).
    """

    event: str
    title: str
    severity: Severity
    topic: str | None = None
    message: str | None = None
    fields: tuple[tuple[str, str], ...] = ()
    detail: str | None = None
    link: Link | None = None
    note: str | None = None

    @property
    def headline(self) -> str:
        """``"<title>: <topic>"`` (or the title alone): the email subject and Slack fallback."""
        return f"{self.title}: {self.topic}" if self.topic else self.title


class SlackMessage(TypedDict):
    """A Slack message as posted: a ``text`` fallback and Block Kit ``blocks``."""

    text: str
    blocks: list[dict[str, Any]]


@dataclass(frozen=True)
class EmailBody:
    """The subject (one line) and the two bodies of a notification email."""

    subject: str
    text: str
    html: str


# -- payload helpers -------------------------------------------------------------------------


def validate_event(event: str) -> str:
    """``event`` if it is a valid event name (letters, digits, ``_ . -``; at most 64)."""
    if not isinstance(event, str) or not _EVENT_NAME.match(event):
        raise ConfigurationError(
            f"{event!r} is not an event name: use letters, digits, '_', '.' or '-' "
            "(starting with a letter, at most 64 characters)",
            field="event",
        )
    return event


def event_title(event: str) -> str:
    """An event name in words: ``"materialization_failed"`` -> ``"Materialization Failed"``."""
    return re.sub(r"[_.-]+", " ", event).strip().title()


def single_line(text: str) -> str:
    """``text`` with every run of whitespace (CR and LF included) turned into one space."""
    return " ".join(text.split())


def _text(value: Any) -> str:
    """A payload value as text: asset keys as ``a/b``, lists comma-separated, dicts as JSON."""
    if value is None:
        return ""
    to_user_string = getattr(value, "to_user_string", None)
    if callable(to_user_string):  # dagster.AssetKey
        return str(to_user_string())
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return ", ".join(_text(item) for item in value)
    if isinstance(value, Mapping):
        return json.dumps(value, default=str, ensure_ascii=False, sort_keys=True)
    return str(value)


def _optional(payload: Mapping[str, Any], key: str) -> str | None:
    text = _text(payload.get(key)).strip()
    return text or None


def _required(payload: Mapping[str, Any], key: str, event: str) -> str:
    text = _optional(payload, key)
    if text is None:
        raise ConfigurationError(
            f"event {event!r} needs payload[{key!r}] (got keys: {', '.join(payload) or 'none'})",
            field=f"payload.{key}",
        )
    return text


def _url(payload: Mapping[str, Any], key: str, event: str, *, required: bool = False) -> str | None:
    value = _optional(payload, key) if not required else _required(payload, key, event)
    if value is None:
        return None
    parts = urlsplit(value)
    if (
        parts.scheme not in ("http", "https")
        or not parts.netloc
        or any(c.isspace() for c in value)
        or len(value) > SLACK_LIMITS.url
    ):
        raise ConfigurationError(
            f"event {event!r}: payload[{key!r}] must be an http(s) URL without spaces of at most "
            f"{SLACK_LIMITS.url} characters, got {truncate(value, 80)!r}",
            field=f"payload.{key}",
        )
    return value


def _topic(asset: str | None, partition: str | None) -> str | None:
    if asset and partition:
        return f"{asset} (partition {partition})"
    return asset or (f"partition {partition}" if partition else None)


def _fields(pairs: Sequence[tuple[str, str | None]]) -> tuple[tuple[str, str], ...]:
    return tuple((label, value) for label, value in pairs if value)


# -- one function per event --------------------------------------------------------------------


def _checkpoint_pending(event: str, payload: Mapping[str, Any]) -> Notice:
    # One text section and one actions block (the button), nothing else.
    checkpoint = _optional(payload, "checkpoint")
    asset = _optional(payload, "asset")
    topic = " / ".join(part for part in (asset, checkpoint) if part) or None
    return Notice(
        event=event,
        title="Approval Needed",
        severity="warning",
        topic=topic,
        message=_optional(payload, "message") or "A human decision is needed before this goes on.",
        link=Link(
            _optional(payload, "button_text") or "Review",
            _url(payload, "url", event, required=True) or "",
            primary=True,
        ),
    )


def _materialization_failed(event: str, payload: Mapping[str, Any]) -> Notice:
    asset = _required(payload, "asset", event)
    partition = _optional(payload, "partition")
    return Notice(
        event=event,
        title="Materialization Failed",
        severity="error",
        topic=_topic(asset, partition),
        message=_optional(payload, "message"),
        fields=_fields([("Run ID", _optional(payload, "run_id"))]),
        detail=_optional(payload, "error"),
        link=_link(payload, event, "View run"),
        note=_optional(payload, "note"),
    )


def _materialization_succeeded(event: str, payload: Mapping[str, Any]) -> Notice:
    asset = _required(payload, "asset", event)
    partition = _optional(payload, "partition")
    metadata = payload.get("metadata")
    extra = (
        [(str(key), _text(value)) for key, value in metadata.items()]
        if isinstance(metadata, Mapping)
        else []
    )
    return Notice(
        event=event,
        title="Materialization Succeeded",
        severity="success",
        topic=_topic(asset, partition),
        message=_optional(payload, "message"),
        fields=_fields([("Run ID", _optional(payload, "run_id")), *extra]),
        link=_link(payload, event, "View asset"),
        note=_optional(payload, "note"),
    )


def _run_failed(event: str, payload: Mapping[str, Any]) -> Notice:
    job = _required(payload, "job", event)
    return Notice(
        event=event,
        title="Run Failed",
        severity="error",
        topic=job,
        message=_optional(payload, "message"),
        fields=_fields(
            [
                ("Run ID", _optional(payload, "run_id")),
                ("Failed steps", _optional(payload, "failed_steps")),
                ("Assets", _optional(payload, "assets")),
                ("Error type", _optional(payload, "error_type")),
            ]
        ),
        detail=_optional(payload, "error"),
        link=_link(payload, event, "View run"),
        note=_optional(payload, "note"),
    )


def _asset_check_failed(event: str, payload: Mapping[str, Any]) -> Notice:
    asset = _required(payload, "asset", event)
    check = _required(payload, "check", event)
    return Notice(
        event=event,
        title="Asset Check Failed",
        severity="error" if _optional(payload, "severity") != "WARN" else "warning",
        topic=f"{check} on {asset}",
        message=_optional(payload, "description"),
        fields=_fields(
            [
                ("Asset", asset),
                ("Check", check),
                ("Severity", _optional(payload, "severity")),
                ("Partition", _optional(payload, "partition")),
                ("Run ID", _optional(payload, "run_id")),
            ]
        ),
        link=_link(payload, event, "View checks"),
        note=_optional(payload, "note"),
    )


#: Payload keys the generic layout shows in their own place, not as fields.
_GENERIC_KEYS = frozenset({"message", "url", "button_text", "error", "note", "recipients", "title"})


def _generic(event: str, payload: Mapping[str, Any]) -> Notice:
    fields = tuple(
        (event_title(str(key)), _text(value))
        for key, value in payload.items()
        if key not in _GENERIC_KEYS and _text(value)
    )
    return Notice(
        event=event,
        title=single_line(_optional(payload, "title") or event_title(event)),
        severity="info",
        message=_optional(payload, "message"),
        fields=fields,
        detail=_optional(payload, "error"),
        link=_link(payload, event, "Open"),
        note=_optional(payload, "note"),
    )


def _link(payload: Mapping[str, Any], event: str, default_label: str) -> Link | None:
    url = _url(payload, "url", event)
    if url is None:
        return None
    return Link(_optional(payload, "button_text") or default_label, url)


_LAYOUTS: dict[str, Callable[[str, Mapping[str, Any]], Notice]] = {
    "checkpoint_pending": _checkpoint_pending,
    "materialization_failed": _materialization_failed,
    "materialization_succeeded": _materialization_succeeded,
    "run_failed": _run_failed,
    "asset_check_failed": _asset_check_failed,
}


def compose(event: str, payload: Mapping[str, Any] | None = None) -> Notice:
    """The :class:`Notice` for ``event``: its own layout, or the generic one.

    Raises ``ConfigurationError`` naming the payload key when a required key is missing
    (``asset`` for ``materialization_failed``, ``url`` for ``checkpoint_pending``, ...) or a URL
    is not an http(s) URL.
    """
    validate_event(event)
    payload = payload or {}
    if not isinstance(payload, Mapping):
        raise ConfigurationError(
            f"must be a mapping, got {type(payload).__name__}", field="payload"
        )
    return _LAYOUTS.get(event, _generic)(event, payload)


# -- Slack ---------------------------------------------------------------------------------------


def escape_mrkdwn(text: str) -> str:
    """Escape ``&``, ``<`` and ``>`` as Slack requires, so that text cannot make a mention
    (``<!channel>``, ``<@U123>``) or a link (``<https://x|y>``)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _fit(raw: str, limit: int, render: Callable[[str], str] = escape_mrkdwn) -> str:
    """``render(raw)`` cut to at most ``limit`` characters, the cut made in ``raw``.

    Cutting before rendering never splits an escape (``&amp;``) or a code fence.
    """
    budget = limit
    while budget > 0:
        text = render(truncate(raw, budget))
        if len(text) <= limit:
            return text
        budget -= len(text) - limit  # escaping grew it: cut the overflow off the raw text
    return render("")[:limit]


def _code_block(text: str) -> str:
    # A ``` inside the text would close the block early; a zero-width space defuses it.
    return "```" + escape_mrkdwn(text.replace("```", "`\u200b``")) + "```"


def _plain(text: str, limit: int) -> PlainTextObject:
    return PlainTextObject(text=_fit(single_line(text), limit, render=str), emoji=True)


def _fields_for_slack(fields: Sequence[tuple[str, str]]) -> list[MarkdownTextObject]:
    limit = SLACK_LIMITS.fields_per_section
    shown = list(fields)
    if len(shown) > limit:
        # Keep the first nine and say what else there was, rather than be rejected.
        rest = shown[limit - 1 :]
        summary = ", ".join(f"{label}: {value}" for label, value in rest)
        shown = [*shown[: limit - 1], (f"+{len(rest)} more", summary)]
    objects = []
    for label, value in shown:
        head = f"*{_fit(single_line(label), 100)}*\n"
        body = _fit(value, SLACK_LIMITS.field_text - len(head))
        objects.append(MarkdownTextObject(text=head + body))
    return objects


def render_slack(notice: Notice) -> SlackMessage:
    """The Block Kit message for ``notice`` (see :func:`format_slack_message`)."""
    limits = SLACK_LIMITS
    # Title and topic are short by nature; their caps leave the message most of the section.
    first = f"{_EMOJI[notice.severity]} *{_fit(single_line(notice.title), 200)}*"
    if notice.topic:
        first += ": " + _fit(single_line(notice.topic), 1000)
    if notice.message:
        first += "\n" + _fit(notice.message, limits.section_text - len(first) - 1)
    blocks: list[dict[str, Any]] = [
        SectionBlock(
            text=MarkdownTextObject(text=first),
            fields=_fields_for_slack(notice.fields) or None,
        ).to_dict()
    ]
    if notice.detail:
        blocks.append(
            SectionBlock(
                text=MarkdownTextObject(
                    text=_fit(notice.detail, limits.section_text, render=_code_block)
                )
            ).to_dict()
        )
    if notice.note:
        blocks.append(
            ContextBlock(
                elements=[MarkdownTextObject(text=_fit(notice.note, limits.context_text))]
            ).to_dict()
        )
    if notice.link:
        button = ButtonElement(
            text=_plain(notice.link.label, limits.button_text),
            url=notice.link.url,
            action_id=f"flowstone_{notice.event}"[:255],
            style="primary" if notice.link.primary else None,
        )
        blocks.append(ActionsBlock(elements=[button]).to_dict())
    # The fallback is what a phone's notification shows: the headline and the gist.
    gist = notice.message or next(iter((notice.detail or "").strip().splitlines()), "")
    fallback = notice.headline + (f": {single_line(gist)}" if gist else "")
    # The layout makes at most four blocks; the cap is Slack's rule, kept here explicitly.
    return {
        "text": _fit(fallback, limits.text),
        "blocks": blocks[: limits.blocks_per_message],
    }


def format_slack_message(event: str, payload: Mapping[str, Any] | None = None) -> SlackMessage:
    """The Slack message for ``event``: ``{"text": fallback, "blocks": [...]}``.

    ``text`` is the plain fallback Slack shows in notifications; ``blocks`` the Block Kit
    layout: a section (title, topic, message, fields), the detail (an error) as a code block,
    a context line for the note, and an actions block with a button when the payload has a
    ``url``. A ``checkpoint_pending`` message is exactly a section and an actions block::

        message = format_slack_message(
            "checkpoint_pending",
            {"message": "Review needed", "url": "https://example.com/checkpoint/123"},
        )
        [block["type"] for block in message["blocks"]]    # ['section', 'actions']
    """
    return render_slack(compose(event, payload))


# -- email ---------------------------------------------------------------------------------------


def render_email(notice: Notice) -> EmailBody:
    """The email for ``notice`` (see :func:`format_email_body`)."""
    subject = truncate(single_line(notice.headline), MAX_SUBJECT_CHARS)
    lines = [notice.headline, "=" * min(len(notice.headline), 78), ""]
    if notice.message:
        lines += [notice.message, ""]
    if notice.fields:
        width = max(len(label) for label, _ in notice.fields)
        lines += [f"{label + ':':<{width + 1}} {value}" for label, value in notice.fields]
        lines.append("")
    if notice.detail:
        lines += ["    " + line for line in notice.detail.splitlines()]
        lines.append("")
    if notice.link:
        lines += [f"{notice.link.label}: {notice.link.url}", ""]
    if notice.note:
        lines += [notice.note, ""]
    text = "\n".join(lines).rstrip() + "\n"

    e = html.escape
    parts = [f"<h2>{e(notice.title)}</h2>"]
    if notice.topic:
        parts.append(f"<p><strong>{e(notice.topic)}</strong></p>")
    if notice.message:
        parts.append("<p>" + e(notice.message).replace("\n", "<br>\n") + "</p>")
    if notice.fields:
        rows = "".join(
            f'<tr><th align="left" style="padding-right:1em">{e(label)}</th>'
            f"<td>{e(value)}</td></tr>"
            for label, value in notice.fields
        )
        parts.append(f"<table>{rows}</table>")
    if notice.detail:
        parts.append(f'<pre style="white-space:pre-wrap">{e(notice.detail)}</pre>')
    if notice.link:
        parts.append(
            f'<p><a href="{e(notice.link.url, quote=True)}">{e(notice.link.label)}</a></p>'
        )
    if notice.note:
        parts.append(f"<p><em>{e(notice.note)}</em></p>")
    body = "\n".join(parts)
    document = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{e(subject)}</title></head>\n<body>\n{body}\n</body></html>\n"
    )
    return EmailBody(subject=subject, text=text, html=document)


def format_email_body(event: str, payload: Mapping[str, Any] | None = None) -> EmailBody:
    """The email for ``event``: a one-line ``subject``, a ``text`` and an ``html`` body.

    The subject is the title, then the topic: ``"Materialization Failed: orders (partition
    2025-01-15)"``, ``"Test Event"`` for a generic event. Line breaks in payload values never
    reach the subject (it is one line); the HTML body escapes every value::

        body = format_email_body("run_failed", {"job": "daily", "error": "ValueError: bad"})
        body.subject    # 'Run Failed: daily'
    """
    return render_email(compose(event, payload))
