"""From an outbox row to an event with its final body, or to a quarantine reason. Pure.

The body is the seed's envelope ``{"event":…,"timestamp":…,"data":…}`` in JavaScript-canonical
form, built once here and stored, so every endpoint and every attempt sends the same bytes.
The data is parsed once, and checked against the event catalogue as the ``[events]`` policy says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from webhookd import canonical_json
from webhookd.catalogue import CATALOGUE, DEFAULT_POLICY, CataloguePolicy, check_data
from webhookd.errors import PayloadError
from webhookd.ids import new_id
from webhookd.models import Event, OutboxRow, OversizedPayload, Quarantined
from webhookd.routing import event_type_problem

MAX_EVENT_ID_LENGTH = 200
MAX_TENANT_LENGTH = 200
MAX_QUARANTINED_TEXT_CHARS = 200  # at least MAX_EVENT_ID_LENGTH: valid values are kept whole
_PRINTABLE_ID_RE = re.compile(r"[\x21-\x7e]+")  # visible ASCII: safe in headers and logs


def build_body(event_type: str, timestamp: str, data_json: str) -> bytes:
    """The envelope around already-canonical ``data_json`` (keys in the seed's order)."""
    return (
        '{"event":'
        + canonical_json.dumps(event_type)
        + ',"timestamp":'
        + canonical_json.dumps(timestamp)
        + ',"data":'
        + data_json
        + "}"
    ).encode("utf-8")


class ParsedPayload(NamedTuple):
    """An outbox payload parsed once: the object, and its JavaScript-canonical text."""

    data: dict[str, Any]
    text: str


def parse_payload(payload: object, *, max_bytes: int) -> ParsedPayload:
    """Parse an object payload given as JSON text (or bytes) into its value and canonical text.

    Raises :class:`PayloadError` with a stable reason code when it cannot be sent unaltered.
    """
    if isinstance(payload, OversizedPayload):
        raise _too_large(payload.size, max_bytes)
    if isinstance(payload, bytes | bytearray | memoryview):
        payload = bytes(payload)
    elif not isinstance(payload, str):
        raise PayloadError(
            "not_object", f"payload must be a JSON object as text, got {type(payload).__name__}"
        )
    size = len(payload) if isinstance(payload, bytes) else len(payload.encode("utf-8", "replace"))
    if size > max_bytes:
        raise _too_large(size, max_bytes)
    value = canonical_json.loads(payload)
    if not isinstance(value, dict):
        raise PayloadError(
            "not_object", f"payload must be a JSON object, got a JSON {_json_kind(value)}"
        )
    return ParsedPayload(value, canonical_json.dumps(value))


def canonical_payload(payload: object, *, max_bytes: int) -> str:
    """The canonical text of an object payload (see :func:`parse_payload`)."""
    return parse_payload(payload, max_bytes=max_bytes).text


def _too_large(size: int, max_bytes: int) -> PayloadError:
    return PayloadError(
        "too_large",
        f"payload is {size} bytes, over the limit of {max_bytes} "
        "(outbox.max_payload_bytes); receivers' JSON parsers refuse large bodies",
    )


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def normalize_timestamp(value: object) -> str:
    """UTC ISO-8601 as in the seed (``2024-01-15T10:00:00Z``; milliseconds kept if present).

    Accepts ISO-8601 with ``Z`` or an offset, and SQLite's ``YYYY-MM-DD HH:MM:SS`` (UTC).
    """
    if not isinstance(value, str):
        raise PayloadError("bad_occurred_at", "occurred_at must be ISO-8601 text")
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise PayloadError(
            "bad_occurred_at",
            f"occurred_at {value[:40]!r} is not an ISO-8601 time like 2024-01-15T10:00:00Z",
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        parsed = parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        raise PayloadError(
            "bad_occurred_at", f"occurred_at {value[:40]!r} is out of range"
        ) from None
    return format_timestamp(parsed)


def format_timestamp(moment: datetime) -> str:
    # Not strftime("%Y"): glibc writes years before 1000 with fewer than four digits.
    base = f"{moment.year:04d}-" + moment.strftime("%m-%dT%H:%M:%S")
    millis = moment.microsecond // 1000
    return f"{base}.{millis:03d}Z" if millis else f"{base}Z"


def timestamp_to_unix(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True, slots=True)
class RowOutcome:
    """What fan-out makes of one outbox row: an event or a quarantine, and, for an event
    delivered although its data does not match the catalogue (policy "warn"), the problem."""

    item: Event | Quarantined
    schema_problem: str | None = None


def classify_row(
    row: OutboxRow,
    *,
    max_payload_bytes: int,
    now: float,
    policy: CataloguePolicy = DEFAULT_POLICY,
) -> RowOutcome:
    """Validate one outbox row, and check its data against the event catalogue as ``policy``
    says. Never raises for bad data: the outcome holds a Quarantined instead."""
    event_type = _kept(row.event_type)
    event_id = _kept(row.event_id)
    try:
        problem = event_type_problem(row.event_type)
        if problem:
            raise PayloadError("bad_event_type", problem)
        assert isinstance(row.event_type, str)
        payload = parse_payload(row.payload, max_bytes=max_payload_bytes)
        event_id = parse_event_id(row.event_id, now)
        tenant = parse_tenant(row.tenant)
        if row.occurred_at is None or row.occurred_at == "":
            occurred_at = format_timestamp(datetime.fromtimestamp(now, UTC))
        else:
            occurred_at = normalize_timestamp(row.occurred_at)
        schema_problem = catalogue_problem(row.event_type, payload.data, policy)
    except PayloadError as exc:
        return RowOutcome(
            Quarantined(
                outbox_id=row.id,
                reason=exc.reason,
                detail=str(exc),
                event_type=event_type,
                event_id=event_id,
            )
        )
    event = Event(
        outbox_id=row.id,
        event_id=event_id,
        event_type=row.event_type,
        tenant=tenant,
        occurred_at=occurred_at,
        body=build_body(row.event_type, occurred_at, payload.text),
    )
    return RowOutcome(event, schema_problem)


def _kept(value: object) -> str | None:
    """A text column as a quarantine row (and its log line) keeps it: an overlong value, which
    is never valid, is cut short so that a megabyte in one column stays out of the logs."""
    if not isinstance(value, str):
        return None
    if len(value) <= MAX_QUARANTINED_TEXT_CHARS:
        return value
    return value[:MAX_QUARANTINED_TEXT_CHARS] + "…"


def event_from_row(
    row: OutboxRow,
    *,
    max_payload_bytes: int,
    now: float,
    policy: CataloguePolicy = DEFAULT_POLICY,
) -> Event | Quarantined:
    """Validate one outbox row (see :func:`classify_row`, which also reports a "warn" problem).
    Never raises for bad data: returns a Quarantined instead."""
    return classify_row(row, max_payload_bytes=max_payload_bytes, now=now, policy=policy).item


def catalogue_problem(event_type: str, data: dict[str, Any], policy: CataloguePolicy) -> str | None:
    """The catalogue's verdict on ``data`` under ``policy``: raises :class:`PayloadError` when
    the row must be quarantined; returns the problem to warn about, or None."""
    if event_type not in CATALOGUE:
        if policy.allow_unknown_types:
            return None
        raise PayloadError(
            "unknown_event_type",
            f"event type {event_type!r} is not in the event catalogue and "
            "events.allow_unknown_types is false (see `webhookd events list`)",
        )
    if policy.schema_mismatch == "deliver":
        return None
    problem = check_data(event_type, data)
    if problem is not None and policy.schema_mismatch == "quarantine":
        raise PayloadError(
            "schema_mismatch", f"data does not match the catalogue's {event_type}: {problem}"
        )
    return problem


def parse_event_id(value: object, now: float) -> str:
    """The event id to use: the app's (validated) or a new one when it gave none."""
    if value is None:
        return new_id("evt", now)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if (
        not isinstance(value, str)
        or len(value) > MAX_EVENT_ID_LENGTH
        or not _PRINTABLE_ID_RE.fullmatch(value)
    ):
        raise PayloadError(
            "bad_event_id",
            f"event_id must be 1-{MAX_EVENT_ID_LENGTH} visible ASCII characters without spaces",
        )
    return value


def parse_tenant(value: object) -> str | None:
    """The tenant, validated; empty means none."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or len(value) > MAX_TENANT_LENGTH:
        raise PayloadError(
            "bad_tenant", f"tenant must be text of at most {MAX_TENANT_LENGTH} chars"
        )
    return value
