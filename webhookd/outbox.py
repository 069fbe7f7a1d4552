"""The producer side for Python applications: put an event in the outbox inside your own
transaction. Other languages insert the row with plain SQL (see the README).

    with conn:  # one transaction: your change and its event commit together
        conn.execute("UPDATE bookings SET status = 'CONFIRMED' WHERE id = ?", ("book_123",))
        enqueue(conn, "booking.confirmed", {"id": "book_123", "status": "CONFIRMED"},
                tenant="org_42")
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from webhookd import canonical_json
from webhookd.errors import PayloadError
from webhookd.events import format_timestamp, normalize_timestamp, parse_event_id, parse_tenant
from webhookd.routing import event_type_problem
from webhookd.settings import DEFAULT_MAX_PAYLOAD_BYTES

_INSERT = (
    "INSERT INTO webhook_outbox (event_type, payload, event_id, tenant, occurred_at) "
    "VALUES (?, ?, ?, ?, ?)"
)
_INSERT_NUMBERED = _INSERT.replace("(?, ?, ?, ?, ?)", "($1, $2, $3, $4, $5)")


def enqueue(
    conn: Any,
    event_type: str,
    data: Mapping[str, Any],
    *,
    tenant: str | None = None,
    event_id: str | None = None,
    occurred_at: datetime | str | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> str:
    """Insert one event into ``webhook_outbox`` without committing; return its event id.

    ``conn``: a ``sqlite3`` connection, or a psycopg (3) connection to PostgreSQL. For asyncpg
    use :func:`enqueue_async`.

    Raises :class:`~webhookd.errors.PayloadError` (a ValueError) when the event could not be
    delivered unaltered: a bad type name, a payload that is not a JSON object or would change
    in JavaScript (integers beyond 2**53-1, NaN, ...), or one over the size limit. A repeated
    ``event_id`` raises the driver's integrity error: event ids are idempotency keys.
    """
    values = outbox_values(
        event_type,
        data,
        tenant=tenant,
        event_id=event_id,
        occurred_at=occurred_at,
        max_payload_bytes=max_payload_bytes,
    )
    if isinstance(conn, sqlite3.Connection):
        conn.execute(_INSERT, values)
    else:  # psycopg and other DB-API drivers with the "format" parameter style
        conn.execute(_INSERT.replace("?", "%s"), values)
    return values[2]


async def enqueue_async(
    conn: Any,
    event_type: str,
    data: Mapping[str, Any],
    *,
    tenant: str | None = None,
    event_id: str | None = None,
    occurred_at: datetime | str | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> str:
    """:func:`enqueue` for an asyncpg connection (inside your ``async with conn.transaction()``)."""
    values = outbox_values(
        event_type,
        data,
        tenant=tenant,
        event_id=event_id,
        occurred_at=occurred_at,
        max_payload_bytes=max_payload_bytes,
    )
    await conn.execute(_INSERT_NUMBERED, *values)
    return values[2]


def outbox_values(
    event_type: str,
    data: Mapping[str, Any],
    *,
    tenant: str | None = None,
    event_id: str | None = None,
    occurred_at: datetime | str | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> tuple[str, str, str, str | None, str]:
    """The checked (event_type, payload, event_id, tenant, occurred_at) of one outbox row."""
    problem = event_type_problem(event_type)
    if problem:
        raise PayloadError("bad_event_type", problem)
    if not isinstance(data, Mapping):
        raise PayloadError("not_object", f"data must be a mapping, got {type(data).__name__}")
    payload = canonical_json.dumps(dict(data))
    size = len(payload.encode("utf-8"))
    if size > max_payload_bytes:
        raise PayloadError(
            "too_large", f"payload is {size} bytes, over the limit of {max_payload_bytes}"
        )
    # The same checks the daemon applies at fan-out: what enqueue accepts is never quarantined.
    event_id = parse_event_id(event_id, time.time())
    tenant = parse_tenant(tenant)
    if isinstance(occurred_at, datetime):
        if occurred_at.tzinfo is None:
            raise PayloadError("bad_occurred_at", "occurred_at must be timezone-aware")
        stamp = format_timestamp(occurred_at.astimezone(UTC))
    elif occurred_at is None:
        stamp = format_timestamp(datetime.now(UTC))
    else:
        stamp = normalize_timestamp(occurred_at)
    return event_type, payload, event_id, tenant, stamp
