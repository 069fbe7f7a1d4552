"""``webhookd.outbox.enqueue``: an event joins the caller's own SQLite transaction."""

from __future__ import annotations

import math
import re
import sqlite3
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from webhookd.errors import PayloadError
from webhookd.events import MAX_EVENT_ID_LENGTH, MAX_TENANT_LENGTH, event_from_row
from webhookd.models import Event, OutboxRow
from webhookd.outbox import enqueue

GENERATED_ID = re.compile(r"evt_[0-9a-hjkmnp-tv-z]{26}")
UTC_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z")


@pytest.fixture
def conn(outbox_db: Path) -> Iterator[sqlite3.Connection]:
    """The application's connection, with Python's default (implicit) transactions."""
    c = sqlite3.connect(outbox_db, timeout=5)
    yield c
    c.close()


@pytest.fixture
def other(outbox_db: Path) -> Iterator[sqlite3.Connection]:
    """Another connection to the same file: what webhookd (or anyone else) sees."""
    c = sqlite3.connect(outbox_db, timeout=5, isolation_level=None)
    yield c
    c.close()


def outbox_rows(c: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return c.execute(
        "SELECT id, event_type, payload, event_id, tenant, occurred_at FROM webhook_outbox"
    ).fetchall()


def booking_status(c: sqlite3.Connection) -> str:
    status: str = c.execute("SELECT status FROM bookings WHERE id = 'book_123'").fetchone()[0]
    return status


def confirm(c: sqlite3.Connection) -> None:
    c.execute("UPDATE bookings SET status = 'CONFIRMED' WHERE id = 'book_123'")


def test_enqueue_does_not_commit_and_a_rollback_leaves_no_row(
    conn: sqlite3.Connection, other: sqlite3.Connection
) -> None:
    confirm(conn)
    enqueue(conn, "booking.confirmed", {"id": "book_123"})
    assert conn.in_transaction
    assert len(outbox_rows(conn)) == 1  # the caller sees its own write
    assert outbox_rows(other) == []  # nobody else does before the commit
    assert booking_status(other) == "PENDING"
    conn.rollback()
    assert outbox_rows(conn) == []
    assert outbox_rows(other) == []
    assert booking_status(other) == "PENDING"


def test_the_change_and_its_event_commit_together(
    conn: sqlite3.Connection, other: sqlite3.Connection
) -> None:
    with conn:
        confirm(conn)
        event_id = enqueue(conn, "booking.confirmed", {"id": "book_123"}, tenant="org_42")
    [(_, event_type, payload, stored_id, tenant, occurred_at)] = outbox_rows(other)
    assert booking_status(other) == "CONFIRMED"
    assert (event_type, payload, stored_id, tenant) == (
        "booking.confirmed",
        '{"id":"book_123"}',
        event_id,
        "org_42",
    )
    assert GENERATED_ID.fullmatch(event_id)
    assert UTC_Z.fullmatch(occurred_at)


def test_an_explicit_transaction_on_an_autocommit_connection_is_respected(
    outbox_db: Path, other: sqlite3.Connection
) -> None:
    c = sqlite3.connect(outbox_db, timeout=5, isolation_level=None)
    try:
        c.execute("BEGIN")
        enqueue(c, "booking.confirmed", {"id": "book_123"})
        assert c.in_transaction
        assert outbox_rows(other) == []
        c.execute("ROLLBACK")
        assert outbox_rows(other) == []
    finally:
        c.close()


def test_the_payload_is_stored_as_canonical_json(conn: sqlite3.Connection) -> None:
    data = {"b": 1.0, "a": [1e-7, 1e21, -0.0], "10": "ten", "2": "two", "name": "Zoë"}
    enqueue(conn, "booking.created", data, event_id="evt_given")
    [(_, _, payload, event_id, _, _)] = outbox_rows(conn)
    assert payload == '{"2":"two","10":"ten","b":1,"a":[1e-7,1e+21,0],"name":"Zoë"}'
    assert event_id == "evt_given"


@pytest.mark.parametrize(
    ("occurred_at", "stored"),
    [
        ("2024-01-15T10:00:00Z", "2024-01-15T10:00:00Z"),
        ("2024-01-15T12:00:00+02:00", "2024-01-15T10:00:00Z"),
        (
            datetime(2024, 1, 15, 5, 0, 0, 250_000, tzinfo=timezone(timedelta(hours=-5))),
            "2024-01-15T10:00:00.250Z",
        ),
        (datetime(2024, 1, 15, 10, 0, 0, tzinfo=UTC), "2024-01-15T10:00:00Z"),
    ],
)
def test_occurred_at_is_stored_in_utc_with_z(
    conn: sqlite3.Connection, occurred_at: datetime | str, stored: str
) -> None:
    enqueue(conn, "booking.created", {}, occurred_at=occurred_at)
    assert outbox_rows(conn)[0][5] == stored


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"event_type": "Booking.Created"}, "bad_event_type"),
        ({"event_type": "booking"}, "bad_event_type"),
        ({"event_type": "booking created"}, "bad_event_type"),
        ({"data": [1, 2]}, "not_object"),
        ({"data": "text"}, "not_object"),
        ({"data": None}, "not_object"),
        ({"data": {"n": 2**60}}, "unsafe_integer"),
        ({"data": {"n": math.nan}}, "non_finite_number"),
        ({"data": {"n": math.inf}}, "non_finite_number"),
        ({"data": {"a": "x" * 100}, "max_payload_bytes": 64}, "too_large"),
        ({"event_id": ""}, "bad_event_id"),
        ({"event_id": "e" * (MAX_EVENT_ID_LENGTH + 1)}, "bad_event_id"),
        ({"event_id": "evt\n1"}, "bad_event_id"),
        ({"occurred_at": "yesterday"}, "bad_occurred_at"),
        ({"occurred_at": datetime(2024, 1, 15, 10, 0, 0)}, "bad_occurred_at"),  # naive
    ],
)
def test_invalid_events_are_refused_before_anything_is_written(
    conn: sqlite3.Connection, kwargs: dict[str, Any], reason: str
) -> None:
    args: dict[str, Any] = {"event_type": "booking.created", "data": {"id": "book_123"}}
    args.update(kwargs)
    with pytest.raises(PayloadError) as caught:
        enqueue(conn, args.pop("event_type"), args.pop("data"), **args)
    assert caught.value.reason == reason
    assert str(caught.value)
    assert not conn.in_transaction  # nothing was started on the caller's behalf
    assert outbox_rows(conn) == []


def test_a_payload_at_the_size_limit_is_accepted(conn: sqlite3.Connection) -> None:
    data = {"a": "x" * 56}  # {"a":"…"} is 8 bytes of syntax
    enqueue(conn, "booking.created", data, max_payload_bytes=64)
    assert len(outbox_rows(conn)[0][2].encode()) == 64


def test_a_repeated_event_id_raises_integrity_error(conn: sqlite3.Connection) -> None:
    with conn:
        enqueue(conn, "booking.created", {}, event_id="evt_once")
    with pytest.raises(sqlite3.IntegrityError):
        enqueue(conn, "booking.created", {}, event_id="evt_once")


def _daemon_reading(c: sqlite3.Connection) -> Event | object:
    [r] = outbox_rows(c)
    return event_from_row(OutboxRow(*r), max_payload_bytes=64 * 1024, now=0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"tenant": "org_42", "event_id": "order-42:confirmed"},
        {"event_id": "e" * MAX_EVENT_ID_LENGTH, "tenant": "t" * MAX_TENANT_LENGTH},
        {"data": {"n": 2**53 - 1, "f": 0.1, "nested": {"list": [True, None, "é"]}}},
    ],
)
def test_what_enqueue_accepts_the_daemon_delivers(
    conn: sqlite3.Connection, kwargs: Mapping[str, Any]
) -> None:
    args = dict(kwargs)
    data = args.pop("data", {"id": "book_123"})
    enqueue(conn, "booking.created", data, **args)
    assert isinstance(_daemon_reading(conn), Event)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"event_id": "order 42"},  # a space: not safe in a header
        {"event_id": "évt_42"},  # not ASCII
        {"tenant": "t" * (MAX_TENANT_LENGTH + 1)},
    ],
    ids=["event-id-with-space", "non-ascii-event-id", "tenant-too-long"],
)
def test_enqueue_refuses_what_the_daemon_would_quarantine(
    conn: sqlite3.Connection, kwargs: Mapping[str, Any]
) -> None:
    """The helper exists so that Python apps find out at once, not from the quarantine."""
    try:
        enqueue(conn, "booking.created", {"id": "book_123"}, **kwargs)
    except PayloadError:
        return
    pytest.fail(
        f"enqueue accepted {kwargs}, but the daemon quarantines it: {_daemon_reading(conn)}"
    )
