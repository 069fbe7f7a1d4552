"""From an outbox row to the exact body receivers get, or to a quarantine reason."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest

from webhookd.events import MAX_EVENT_ID_LENGTH, MAX_TENANT_LENGTH, event_from_row
from webhookd.models import Event, OutboxRow, Quarantined

NOW = datetime(2024, 1, 15, 10, 0, 0, tzinfo=UTC).timestamp()
MAX_BYTES = 1024
GENERATED_ID = re.compile(r"evt_[0-9a-hjkmnp-tv-z]{26}")


def row(
    payload: object = '{"id":"book_123"}',
    *,
    event_type: object = "booking.created",
    event_id: object = "evt_1",
    tenant: object = None,
    occurred_at: object = "2024-01-15T10:00:00Z",
    outbox_id: int = 7,
) -> OutboxRow:
    return OutboxRow(outbox_id, event_type, payload, event_id, tenant, occurred_at)


def event(r: OutboxRow, *, now: float = NOW, max_bytes: int = MAX_BYTES) -> Event:
    result = event_from_row(r, max_payload_bytes=max_bytes, now=now)
    assert isinstance(result, Event), result
    return result


def quarantined(r: OutboxRow, *, max_bytes: int = MAX_BYTES) -> Quarantined:
    result = event_from_row(r, max_payload_bytes=max_bytes, now=NOW)
    assert isinstance(result, Quarantined), result
    return result


def test_the_envelope_is_the_seeds_with_keys_in_order() -> None:
    e = event(row('{"id":"book_123","status":"CONFIRMED"}', tenant="org_42"))
    assert e.body == (
        b'{"event":"booking.created","timestamp":"2024-01-15T10:00:00Z",'
        b'"data":{"id":"book_123","status":"CONFIRMED"}}'
    )
    assert list(json.loads(e.body)) == ["event", "timestamp", "data"]
    assert (e.outbox_id, e.event_id, e.event_type, e.tenant) == (
        7,
        "evt_1",
        "booking.created",
        "org_42",
    )
    assert e.occurred_at == "2024-01-15T10:00:00Z"


def test_the_data_is_made_javascript_canonical() -> None:
    e = event(row('{ "b": 1.0, "a": [1e-7, 2E3], "10": "ten", "2": "two", "s": "\\u00e9" }'))
    assert e.body.endswith(b'"data":{"2":"two","10":"ten","b":1,"a":[1e-7,2000],"s":"\xc3\xa9"}}')


def test_payload_bytes_that_are_utf8_are_accepted() -> None:
    e = event(row('{"name":"Zoë"}'.encode()))
    assert e.body.endswith('"data":{"name":"Zoë"}}'.encode())


@pytest.mark.parametrize(
    ("occurred_at", "timestamp"),
    [
        ("2024-01-15T10:00:00Z", "2024-01-15T10:00:00Z"),
        ("2024-01-15T10:00:00z", "2024-01-15T10:00:00Z"),
        ("2024-01-15T12:00:00+02:00", "2024-01-15T10:00:00Z"),
        ("2024-01-15T05:00:00-05:00", "2024-01-15T10:00:00Z"),
        ("2024-01-15 10:00:00", "2024-01-15T10:00:00Z"),  # SQLite's datetime('now'): UTC
        ("2024-01-15T10:00:00.000Z", "2024-01-15T10:00:00Z"),  # the column default's form
        ("2024-01-15T10:00:00.123Z", "2024-01-15T10:00:00.123Z"),
        ("2024-01-15T10:00:00.123456+00:00", "2024-01-15T10:00:00.123Z"),
        ("2024-01-16T00:30:00+14:00", "2024-01-15T10:30:00Z"),
    ],
)
def test_timestamps_are_normalized_to_utc_with_z(occurred_at: str, timestamp: str) -> None:
    e = event(row(occurred_at=occurred_at))
    assert e.occurred_at == timestamp
    assert json.loads(e.body)["timestamp"] == timestamp


@pytest.mark.parametrize("occurred_at", [None, ""])
def test_a_missing_occurred_at_becomes_now(occurred_at: object) -> None:
    e = event(row(occurred_at=occurred_at), now=NOW + 1.5)
    assert e.occurred_at == "2024-01-15T10:00:01.500Z"


def test_an_event_id_is_generated_when_missing() -> None:
    first = event(row(event_id=None))
    second = event(row(event_id=None))
    assert GENERATED_ID.fullmatch(first.event_id), first.event_id
    assert GENERATED_ID.fullmatch(second.event_id), second.event_id
    assert first.event_id != second.event_id


@pytest.mark.parametrize("tenant", [None, ""])
def test_no_tenant(tenant: object) -> None:
    assert event(row(tenant=tenant)).tenant is None


def test_limits_are_inclusive() -> None:
    payload = '{"a":"' + "x" * (MAX_BYTES - 8) + '"}'
    assert len(payload) == MAX_BYTES
    event(row(payload))
    event(row(event_id="e" * MAX_EVENT_ID_LENGTH, tenant="t" * MAX_TENANT_LENGTH))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"payload": "{not json"}, "invalid_json"),
        ({"payload": ""}, "invalid_json"),
        ({"payload": '{"a":1} trailing'}, "invalid_json"),
        ({"payload": "[1, 2]"}, "not_object"),
        ({"payload": '"a string"'}, "not_object"),
        ({"payload": "null"}, "not_object"),
        ({"payload": "42"}, "not_object"),
        ({"payload": None}, "not_object"),
        ({"event_type": "Booking.Created"}, "bad_event_type"),
        ({"event_type": "booking"}, "bad_event_type"),
        ({"event_type": "booking created"}, "bad_event_type"),
        ({"event_type": b"booking.\xffcreated"}, "bad_event_type"),
        ({"event_type": None}, "bad_event_type"),
        ({"payload": '{"n":1152921504606846976}'}, "unsafe_integer"),  # 2**60
        ({"payload": '{"n":-9007199254740993}'}, "unsafe_integer"),
        ({"payload": '{"n":NaN}'}, "non_finite_number"),
        ({"payload": '{"n":Infinity}'}, "non_finite_number"),
        ({"payload": '{"n":1e400}'}, "non_finite_number"),
        ({"payload": '{"a":"' + "x" * MAX_BYTES + '"}'}, "too_large"),
        ({"payload": b'{"a":"\xff\xfe"}'}, "invalid_utf8"),
        ({"event_id": "has space"}, "bad_event_id"),
        ({"event_id": ""}, "bad_event_id"),
        ({"event_id": "évt_1"}, "bad_event_id"),
        ({"event_id": "evt\n1"}, "bad_event_id"),
        ({"event_id": "e" * (MAX_EVENT_ID_LENGTH + 1)}, "bad_event_id"),
        ({"event_id": b"evt_\xff"}, "bad_event_id"),
        ({"occurred_at": "yesterday"}, "bad_occurred_at"),
        ({"occurred_at": "2024-13-01T00:00:00Z"}, "bad_occurred_at"),
        ({"occurred_at": "15/01/2024 10:00"}, "bad_occurred_at"),
        ({"occurred_at": b"2024-01-15T10:00:00\xffZ"}, "bad_occurred_at"),
        ({"tenant": "t" * (MAX_TENANT_LENGTH + 1)}, "bad_tenant"),
    ],
)
def test_rows_that_break_the_contract_are_quarantined_with_a_reason(
    changes: dict[str, object], reason: str
) -> None:
    q = quarantined(row(**changes))  # type: ignore[arg-type]
    assert (q.outbox_id, q.reason) == (7, reason)
    assert q.detail


def test_a_quarantine_keeps_what_is_known_of_the_row() -> None:
    q = quarantined(row("[1]", event_type="booking.created", event_id="evt_9"))
    assert (q.event_type, q.event_id) == ("booking.created", "evt_9")
    q = quarantined(row(event_type=b"\xff", event_id=b"\xfe"))
    assert (q.event_type, q.event_id) == (None, None)


def test_the_reason_says_what_to_do() -> None:
    q = quarantined(row('{"n":1152921504606846976}'))
    assert "1152921504606846976" in q.detail
    assert "string" in q.detail  # send it as a string instead
