"""Hostile and broken outbox rows, written with ``sqlite3`` into a real database the way a buggy
or careless application would, then fanned out by the real store and planner (and, for a mixed
batch, by a running daemon delivering to a real receiver).

What must hold for every row: it becomes exactly one event (with a delivery for every subscribed
endpoint) or exactly one quarantine row with a stable reason; nothing raises; the cursor passes
every row, so the rows behind a bad one still flow. Rows that keep the contract are delivered
with their data unaltered, and rows that break it in one known way get that reason.

Also here: a ``webhook_endpoints`` row whose extra headers try to replace the signature headers
is never sent to, while its well-behaved neighbour gets its extra header and valid signatures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sqlite3
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from daemon_fixtures import (
    Receiver,
    daemon_settings,
    deliveries,
    eventually,
    http_base,
    query,
    running_daemon,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from webhookd.canonical_json import MAX_SAFE_INTEGER
from webhookd.dispatcher import plan_fanout
from webhookd.log import _Formatter
from webhookd.models import Endpoint, FanoutPlan, OutboxRow
from webhookd.settings import DeliverySettings
from webhookd.store.base import Store
from webhookd.store.sqlite import SQLiteBackend

MAX_PAYLOAD_BYTES = 4096
NOW = 1_705_312_800.0  # 2024-01-15T10:00:00Z: the fan-out's clock, and a row's default time
NOW_TEXT = "2024-01-15T10:00:00Z"
EXAMPLES = 40
LOOPBACK_NETWORKS = ["127.0.0.0/8", "::1/128"]
MEGABYTE = 1024 * 1024

EVENT_TYPE_PATTERN = r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)+"
EVENT_ID_RE = re.compile(r"[\x21-\x7e]{1,200}")
TIMESTAMP_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{3})?Z")
# Every reason fan-out may give (DESIGN.md: "quarantined with its reason"); anything else would
# be an internal failure dressed up as a quarantine.
KNOWN_REASONS = frozenset(
    {
        "bad_event_type",
        "invalid_json",
        "invalid_utf8",
        "non_finite_number",
        "unsafe_integer",
        "too_deep",
        "bad_key",
        "unsupported_type",
        "not_object",
        "too_large",
        "bad_event_id",
        "bad_tenant",
        "bad_occurred_at",
        "duplicate_event_id",
        "unknown_event_type",
        "schema_mismatch",
    }
)

ENDPOINTS = (
    Endpoint(id="all", url="https://all.example/h", secret="s-all"),
    Endpoint(id="org", url="https://org.example/h", secret="s-org", tenant="org_1"),
    Endpoint(id="bookings", url="https://b.example/h", secret="s-b", events=("booking.*",)),
    Endpoint(id="exact", url="https://p.example/h", secret="s-p", events=("payment.succeeded",)),
)


def routed(event_type: str, tenant: str | None) -> set[str]:
    """Which of ENDPOINTS an event goes to (DESIGN.md, "Routing"), worked out independently."""
    out = {"all"}
    if tenant == "org_1":
        out.add("org")
    if event_type.startswith("booking."):
        out.add("bookings")
    if event_type == "payment.succeeded":
        out.add("exact")
    return out


def loopback_delivery() -> dict[str, Any]:
    """Delivery settings that let the daemon post to receivers on 127.0.0.1 (SSRF protection
    refuses loopback by default once it exists)."""
    delivery: dict[str, Any] = {"allow_http": True}
    if "allowed_networks" in DeliverySettings.model_fields:
        delivery["allowed_networks"] = LOOPBACK_NETWORKS
    return delivery


# -- rows as an application writes them ----------------------------------------------------------


@dataclass(frozen=True)
class AsText:
    """Bytes stored as TEXT (``CAST(? AS TEXT)``): SQLite does not check that they are UTF-8."""

    raw: bytes


Value = str | bytes | int | float | AsText | None
COLUMNS = ("event_type", "payload", "event_id", "tenant", "occurred_at")


@dataclass(frozen=True)
class Good:
    """What a row that keeps the contract must become."""

    event_type: str
    data: dict[str, Any]
    event_id: str | None  # None: webhookd generates one
    tenant: str | None
    timestamp: str


@dataclass(frozen=True)
class Spec:
    """One row to INSERT and what it must become: ``good`` (an event), ``reason`` (that
    quarantine reason), or neither (anything, as long as the invariants hold)."""

    event_type: Value
    payload: Value
    event_id: Value = None
    tenant: Value = None
    occurred_at: Value = None
    good: Good | None = None
    reason: str | None = None
    reasons: frozenset[str] = frozenset()  # several acceptable reasons (order of checks)

    def values(self) -> list[Value]:
        return [getattr(self, c) for c in COLUMNS]


def insert_rows(db: Path, specs: Sequence[Spec]) -> list[tuple[int, Spec]]:
    """INSERT each row in its own transaction; rows the database refuses (NOT NULL, UNIQUE: the
    application's own error) are left out. Returns (outbox id, spec) of the rows written."""
    written = []
    conn = sqlite3.connect(db, timeout=10.0, isolation_level=None)
    try:
        for spec in specs:
            marks = []
            params: list[object] = []
            for value in spec.values():
                if isinstance(value, AsText):
                    marks.append("CAST(? AS TEXT)")
                    params.append(value.raw)
                else:
                    marks.append("?")
                    params.append(value)
            try:
                cursor = conn.execute(
                    f"INSERT INTO webhook_outbox ({', '.join(COLUMNS)}) "
                    f"VALUES ({', '.join(marks)})",
                    params,
                )
            except sqlite3.IntegrityError:
                continue
            assert cursor.lastrowid is not None
            written.append((cursor.lastrowid, spec))
    finally:
        conn.close()
    return written


# -- what the rows became ------------------------------------------------------------------------


@dataclass
class Outcome:
    events: dict[int, sqlite3.Row] = field(default_factory=dict)  # by outbox id
    quarantined: dict[int, sqlite3.Row] = field(default_factory=dict)
    routes: dict[int, set[str]] = field(default_factory=dict)  # event pk -> endpoint ids
    cursor: int = 0


def read_outcome(db: Path, *, sent: bool = False) -> Outcome:
    """What fan-out wrote; unless ``sent``, no delivery may have been attempted yet."""
    out = Outcome()
    for row in query(db, "SELECT * FROM webhookd_events WHERE outbox_id IS NOT NULL"):
        out.events[row["outbox_id"]] = row
    for row in query(db, "SELECT * FROM webhookd_quarantine"):
        out.quarantined[row["outbox_id"]] = row
    for row in query(db, "SELECT event_pk, endpoint_id, state, attempts FROM webhookd_deliveries"):
        if not sent:
            assert (row["state"], row["attempts"]) == ("pending", 0)
        out.routes.setdefault(row["event_pk"], set()).add(row["endpoint_id"])
    [cursor] = query(db, "SELECT value FROM webhookd_state WHERE key = 'outbox_cursor'")
    out.cursor = cursor[0]
    return out


def planner(max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> Any:
    def plan(rows: Sequence[OutboxRow]) -> FanoutPlan:
        return plan_fanout(rows, ENDPOINTS, max_payload_bytes=max_payload_bytes, now=NOW)

    return plan


async def fan_out_all(
    db: Path, batch: int, max_payload_bytes: int = MAX_PAYLOAD_BYTES
) -> list[int]:
    """Fan out until the store reports no new rows (bounded); returns the rows per call."""
    store = Store(SQLiteBackend(db))
    await store.open()
    try:
        sizes = []
        for _ in range(1000):
            result = await store.fan_out(
                planner(max_payload_bytes), batch, NOW, max_payload_bytes=max_payload_bytes
            )
            sizes.append(result.rows)
            if result.rows == 0:
                return sizes
        raise AssertionError("fan-out kept finding rows: the cursor does not move")
    finally:
        await store.close()


async def fresh_database(db: Path) -> None:
    store = Store(SQLiteBackend(db))
    await store.open()
    try:
        await store.migrate()
    finally:
        await store.close()


def check_event(event: sqlite3.Row, outcome: Outcome) -> dict[str, Any]:
    """The invariants of every event, whatever row it came from; returns its parsed body."""
    assert re.fullmatch(EVENT_TYPE_PATTERN, event["event_type"]), event["event_type"]
    assert len(event["event_type"]) <= 100
    assert EVENT_ID_RE.fullmatch(event["event_id"]), event["event_id"]
    assert event["tenant"] is None or (isinstance(event["tenant"], str) and event["tenant"])
    assert TIMESTAMP_RE.fullmatch(event["occurred_at"]), event["occurred_at"]
    body = json.loads(event["body"])
    assert list(body) == ["event", "timestamp", "data"]
    assert body["event"] == event["event_type"]
    assert body["timestamp"] == event["occurred_at"]
    assert isinstance(body["data"], dict)
    assert outcome.routes.get(event["id"], set()) == routed(event["event_type"], event["tenant"])
    return body  # type: ignore[no-any-return]


def same_numbers(value: Any) -> Any:
    """``value`` with every number as a double, as JavaScript holds it (JSON.stringify writes
    4.402947989233689e16 as 44029479892336890, which Python would read as an exact int)."""
    return json.loads(json.dumps(value), parse_int=float)


def check_partition(written: Sequence[tuple[int, Spec]], outcome: Outcome) -> None:
    """Every row written became exactly one event or one quarantine row, and none is left."""
    ids = [outbox_id for outbox_id, _ in written]
    assert not set(outcome.events) & set(outcome.quarantined)
    assert set(outcome.events) | set(outcome.quarantined) == set(ids)
    assert outcome.cursor == max(ids, default=0)
    for q in outcome.quarantined.values():
        assert q["reason"] in KNOWN_REASONS, dict(q)
        assert isinstance(q["detail"], str), dict(q)
        assert q["detail"].strip(), dict(q)


# -- strategies ----------------------------------------------------------------------------------

json_text = st.text(
    alphabet=st.characters(exclude_categories=()) | st.characters(categories=["Cs"]), max_size=12
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-MAX_SAFE_INTEGER, max_value=MAX_SAFE_INTEGER)
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_text, inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(json_text, json_values, max_size=6)

event_types = st.from_regex(EVENT_TYPE_PATTERN, fullmatch=True).filter(
    lambda t: len(t) <= 100
) | st.sampled_from(["booking.created", "booking.sub.x", "payment.succeeded", "a.b"])

good_tenants: st.SearchStrategy[tuple[Value, str | None]] = st.one_of(
    st.sampled_from([(None, None), ("", None), ("org_1", "org_1"), ("org_2", "org_2")]),
    st.text(min_size=1, max_size=200).map(lambda t: (t, t)),
    st.integers(min_value=0, max_value=10**12).map(lambda n: (n, str(n))),
)

_OFFSETS = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda m: timezone(timedelta(minutes=m))
)


def expected_timestamp(moment: datetime) -> str:
    """UTC, four-digit year, milliseconds only when there are some (DESIGN.md, wire format)."""
    u = moment.astimezone(UTC)
    base = f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}"
    millis = u.microsecond // 1000
    return f"{base}.{millis:03d}Z" if millis else f"{base}Z"


def _iso_text(moment: datetime, style: int) -> str:
    """``moment`` written the ways an application might: ISO-8601 with an offset, with ``Z``,
    or SQLite's ``YYYY-MM-DD HH:MM:SS`` (UTC)."""
    if style == 0:
        return moment.isoformat()
    u = moment.astimezone(UTC)
    text = f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}" + (
        f".{u.microsecond:06d}" if u.microsecond else ""
    )
    if style == 1:
        return text + "Z"
    return text.replace("T", " ")


@st.composite
def good_times(draw: st.DrawFn) -> tuple[Value, str]:
    """(the occurred_at to write, the timestamp the receiver must see)."""
    if draw(st.booleans()):
        return draw(st.sampled_from([None, ""])), NOW_TEXT
    moment = draw(
        st.datetimes(
            min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
        )
    )
    moment = moment.astimezone(draw(_OFFSETS))
    return _iso_text(moment, draw(st.integers(0, 2))), expected_timestamp(moment)


@st.composite
def good_rows(draw: st.DrawFn, index: int) -> Spec:
    event_type = draw(event_types)
    data = draw(json_objects)
    ascii_only = draw(st.booleans())
    text = json.dumps(
        data, ensure_ascii=ascii_only, separators=draw(st.sampled_from([None, (",", ":")]))
    )
    if not ascii_only and any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        text = json.dumps(data)  # lone surrogates only as \u escapes: SQLite stores UTF-8
    payload: Value = text.encode() if draw(st.booleans()) else text  # BLOB or TEXT
    event_id: str | None = None
    stored_id: Value = None
    if draw(st.booleans()):
        event_id = f"g00d:{index}:" + draw(st.from_regex(r"[\x21-\x7e]{0,150}", fullmatch=True))
        stored_id = event_id
    tenant_value, tenant = draw(good_tenants)
    occurred_at, timestamp = draw(good_times())
    good = Good(event_type, data, event_id, tenant, timestamp)
    if len(text.encode()) > MAX_PAYLOAD_BYTES:
        return Spec(event_type, payload, stored_id, tenant_value, occurred_at, reason="too_large")
    return Spec(event_type, payload, stored_id, tenant_value, occurred_at, good=good)


def _not_iso(text: str) -> bool:
    try:
        datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        return True
    return False


BAD_EVENT_TYPES: list[Value] = [
    "", "booking", "Booking.Created", "booking.", ".booking", "booking..created",
    "booking created", "booking.created\n", "booking.créé", "1booking.created", "booking.Created",
    "booking-created.x", "a." + "b" * 99, 42, 1.5, AsText(b"booking.\xff"), b"\xffbooking.x",
]  # fmt: skip
BAD_PAYLOADS: dict[str, list[Value]] = {
    "invalid_json": [
        "", " ", "{", "{'a': 1}", '{"a":}', '{"a":1,}', "{}x", '{"a":1}{"b":2}', "\ufeff{}",
        '{"a":"\x01"}', "nul", '{"a":01}', '{"a":.5}', '{"a":+1}', '{"a":"\\x41"}',
    ],
    "invalid_utf8": [b'{"a":"\xff"}', AsText(b'{"a":"\xc3"}'), b"\xfe\xff", AsText(b"\x80")],
    "non_finite_number": ['{"a":NaN}', '{"a":Infinity}', '{"a":-Infinity}', '{"a":[1,NaN]}'],
    "unsafe_integer": [
        '{"a":9007199254740993}', '{"a":-9007199254740993}', '{"a":1152921504606846976}',
        '{"a":[123456789012345678901234]}',
    ],
    "not_object": [
        "[]", "[1,2]", '"text"', "1", "-0", "true", "false", "null", 12, 7.5, '[{"a":1}]', b"[]",
    ],
}  # fmt: skip
BAD_EVENT_IDS: list[Value] = [
    "", " ", "has space", "tab\there", "new\nline", "ümlaut", "x" * 201, "\x7f", AsText(b"id\xff"),
    b"\xff\xfe", "é",
]  # fmt: skip
BAD_TENANTS: list[Value] = ["t" * 201, AsText(b"org\xff"), b"\x80\x81"]
BAD_TIMES: list[Value] = [
    "yesterday", "2024-13-01T00:00:00Z", "2024-01-32", "2024-01-15T25:00:00Z",
    "2024-01-15T10:00:00+24:00", "0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59-00:01",
    "15/01/2024", "2024-01-15T10:00:00ZZ", AsText(b"2024-01-15\xff"), b"\xff", 1705312800,
    "\u0662\u0660\u0662\u0664-01-15",
]  # fmt: skip


@st.composite
def deep_payloads(draw: st.DrawFn) -> str:
    depth = draw(st.integers(min_value=256, max_value=(MAX_PAYLOAD_BYTES - 10) // 2))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"k":', "}")]))
    if opener == "[":
        return '{"a":' + "[" * depth + "]" * depth + "}"
    # {"k":{"k":...{}...}}: an object at every level.
    inner = (MAX_PAYLOAD_BYTES - 10) // 6
    depth = min(depth, inner)
    return opener * depth + "{}" + closer * depth


@st.composite
def faulty_rows(draw: st.DrawFn, index: int) -> Spec:
    """A good row with exactly one fault, and the reason that fault must give."""
    base = draw(good_rows(index))
    if base.good is None:
        return base  # already over the size limit
    kind = draw(
        st.sampled_from(
            ["event_type", "payload", "event_id", "tenant", "occurred_at", "too_large", "deep"]
        )
    )
    if kind == "event_type":
        value = draw(
            st.sampled_from(BAD_EVENT_TYPES)
            | st.text(max_size=30).filter(lambda t: not re.fullmatch(EVENT_TYPE_PATTERN, t))
        )
        return replace(base, event_type=value, good=None, reason="bad_event_type")
    if kind == "payload":
        reason = draw(st.sampled_from(sorted(BAD_PAYLOADS)))
        value = draw(st.sampled_from(BAD_PAYLOADS[reason]))
        return replace(base, payload=value, good=None, reason=reason)
    if kind == "event_id":
        value = draw(st.sampled_from(BAD_EVENT_IDS))
        return replace(base, event_id=value, good=None, reason="bad_event_id")
    if kind == "tenant":
        return replace(
            base, tenant=draw(st.sampled_from(BAD_TENANTS)), good=None, reason="bad_tenant"
        )
    if kind == "occurred_at":
        value = draw(
            st.sampled_from(BAD_TIMES)
            | st.text(
                alphabet=st.characters(exclude_categories=["Nd"]), min_size=1, max_size=30
            ).filter(lambda t: t != "" and _not_iso(t))
        )
        return replace(base, occurred_at=value, good=None, reason="bad_occurred_at")
    if kind == "too_large":
        size = draw(st.integers(min_value=MAX_PAYLOAD_BYTES + 1, max_value=MAX_PAYLOAD_BYTES * 3))
        if draw(st.booleans()):
            text = '{"x":"' + "a" * (size - 8) + '"}'
        else:
            # Fewer characters than the limit, more bytes: the limit counts bytes.
            text = '{"x":"' + "é" * (MAX_PAYLOAD_BYTES // 2 + 1) + '"}'
        payload: Value = text.encode() if draw(st.booleans()) else text
        return replace(base, payload=payload, good=None, reason="too_large")
    return replace(base, payload=draw(deep_payloads()), good=None, reason="too_deep")


_any_text = st.text(max_size=40) | st.text(
    alphabet=st.characters(codec="ascii"), min_size=0, max_size=300
)
_any_bytes = st.binary(max_size=60)


def any_value(nullable: bool) -> st.SearchStrategy[Value]:
    values: list[st.SearchStrategy[Value]] = [
        _any_text,
        _any_bytes,
        _any_bytes.map(AsText),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(allow_nan=False),
    ]
    if nullable:
        values.append(st.none())
    return st.one_of(values)


@st.composite
def chaos_rows(draw: st.DrawFn, index: int) -> Spec:
    """Anything at all in every column (NULL only where the table allows it)."""
    good = draw(good_rows(index))
    spec = Spec(
        event_type=draw(any_value(False) | event_types),
        payload=draw(any_value(False) | st.just(good.payload)),
        event_id=draw(any_value(True)),
        tenant=draw(any_value(True)),
        occurred_at=draw(any_value(True) | st.just(good.occurred_at)),
    )
    return spec


@st.composite
def batches(draw: st.DrawFn) -> list[Spec]:
    """Good rows, rows with one fault, rows of anything, and rows that repeat an earlier good
    row's event id (stored as a BLOB, so the outbox's UNIQUE index lets them in)."""
    kinds = draw(
        st.lists(st.sampled_from(["good", "faulty", "chaos", "duplicate"]), min_size=1, max_size=14)
    )
    specs: list[Spec] = []
    for i, kind in enumerate(kinds):
        earlier = [s for s in specs if s.good is not None and s.good.event_id is not None]
        if kind == "good" or (kind == "duplicate" and not earlier):
            specs.append(draw(good_rows(i)))
        elif kind == "faulty":
            specs.append(draw(faulty_rows(i)))
        elif kind == "chaos":
            specs.append(draw(chaos_rows(i)))
        else:
            original = draw(st.sampled_from(earlier))
            assert original.good is not None
            assert original.good.event_id is not None
            again = draw(good_rows(i))
            specs.append(
                replace(
                    again,
                    event_id=original.good.event_id.encode(),
                    good=None,
                    reason="duplicate_event_id" if again.good is not None else again.reason,
                )
            )
    return specs


# -- the properties ------------------------------------------------------------------------------


def check_rows(written: Sequence[tuple[int, Spec]], outcome: Outcome) -> None:
    check_partition(written, outcome)
    delivered_ids: set[str] = set()
    for outbox_id, spec in written:
        event = outcome.events.get(outbox_id)
        where = f"row {outbox_id}: {spec!r}"
        if event is not None:
            body = check_event(event, outcome)
            delivered_ids.add(event["event_id"])
        if spec.good is not None:
            good = spec.good
            if good.event_id is not None and good.event_id in delivered_ids and event is None:
                raise AssertionError(f"{where} was refused although it keeps the contract")
            assert event is not None, (
                f"{where} was quarantined: {dict(outcome.quarantined[outbox_id])}"
            )
            assert same_numbers(body["data"]) == same_numbers(good.data), where
            assert event["event_type"] == good.event_type, where
            assert event["tenant"] == good.tenant, where
            assert event["occurred_at"] == good.timestamp, where
            if good.event_id is not None:
                assert event["event_id"] == good.event_id, where
        elif spec.reason is not None:
            q = outcome.quarantined.get(outbox_id)
            assert q is not None, f"{where} became an event: {dict(event) if event else None}"
            assert q["reason"] == spec.reason, f"{where}: {dict(q)}"
        quarantine = outcome.quarantined.get(outbox_id)
        if quarantine is not None and quarantine["reason"] == "duplicate_event_id":
            # Only a row whose id an earlier row already made an event is a duplicate.
            assert quarantine["event_id"] in {
                e["event_id"] for i, e in outcome.events.items() if i < outbox_id
            }, where


def _scenario(specs: Sequence[Spec], batch: int) -> None:
    with tempfile.TemporaryDirectory(prefix="hostile-rows-") as tmp:
        db = Path(tmp) / "app.db"
        asyncio.run(fresh_database(db))
        written = insert_rows(db, specs)
        sizes = asyncio.run(fan_out_all(db, batch))
        assert sum(sizes) == len(written)
        check_rows(written, read_outcome(db))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=batches(), batch=st.integers(min_value=1, max_value=6))
@example(  # a year below 1000 must still be written with four digits
    specs=[
        Spec(
            "booking.created",
            '{"id":"b1"}',
            occurred_at="0999-05-01T10:00:00Z",
            good=Good("booking.created", {"id": "b1"}, None, None, "0999-05-01T10:00:00Z"),
        )
    ],
    batch=1,
)
def test_every_row_becomes_one_event_or_one_quarantine_row(specs: list[Spec], batch: int) -> None:
    _scenario(specs, batch)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(st.integers(0, 10**6).flatmap(chaos_rows), min_size=1, max_size=12),
    batch=st.integers(min_value=1, max_value=5),
)
def test_rows_of_anything_never_crash_fan_out_or_stop_the_cursor(
    specs: list[Spec], batch: int
) -> None:
    _scenario(specs, batch)


@pytest.mark.node
@settings(
    max_examples=EXAMPLES // 2,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(specs=st.lists(st.integers(0, 10**6).flatmap(good_rows), min_size=1, max_size=8))
def test_every_body_survives_javascripts_round_trip(js_json: Any, specs: list[Spec]) -> None:
    """The seed's verifier signs JSON.stringify(JSON.parse(body)): every stored body must be a
    fixed point of that, as real Node.js sees it."""
    with tempfile.TemporaryDirectory(prefix="hostile-rows-") as tmp:
        db = Path(tmp) / "app.db"
        asyncio.run(fresh_database(db))
        written = insert_rows(db, specs)
        asyncio.run(fan_out_all(db, 50))
        bodies = [bytes(e["body"]) for e in read_outcome(db).events.values()]
    assert bodies or not any(s.good for _, s in written)
    for body, answer in zip(bodies, js_json.bodies(*bodies), strict=True):
        # (A double such as 2.0**53 may be written as a long integer: it still reads back as
        # the same double, which is what matters here.)
        assert answer["ok"], (body, answer)
        assert answer["out"] == body.decode("utf-8"), body


# -- fixed cases the generators reach rarely ------------------------------------------------------


async def test_a_payload_exactly_at_the_limit_is_sent_and_one_byte_more_is_quarantined(
    tmp_path: Path,
) -> None:
    db = tmp_path / "app.db"
    await fresh_database(db)
    at_limit = '{"x":"' + "a" * (MAX_PAYLOAD_BYTES - 8) + '"}'
    over = '{"x":"' + "a" * (MAX_PAYLOAD_BYTES - 7) + '"}'
    assert (len(at_limit), len(over)) == (MAX_PAYLOAD_BYTES, MAX_PAYLOAD_BYTES + 1)
    written = insert_rows(
        db,
        [
            Spec("booking.created", at_limit, good=Good(
                "booking.created", json.loads(at_limit), None, None, NOW_TEXT)),
            Spec("booking.created", over, reason="too_large"),
            Spec("booking.created", over.encode(), reason="too_large"),
        ],
    )  # fmt: skip
    await fan_out_all(db, 10)
    outcome = read_outcome(db)
    check_rows(written, outcome)
    q = outcome.quarantined[written[1][0]]
    assert f"{MAX_PAYLOAD_BYTES + 1} bytes" in q["detail"]
    assert "outbox.max_payload_bytes" in q["detail"]


async def test_hundreds_of_thousands_of_nesting_levels_are_quarantined_not_a_crash(
    tmp_path: Path,
) -> None:
    db = tmp_path / "app.db"
    await fresh_database(db)
    depth = 300_000
    specs = [
        Spec("booking.created", '{"a":' + "[" * depth + "]" * depth + "}", reason="too_deep"),
        Spec("booking.created", "[" * depth, reasons=frozenset({"invalid_json", "too_deep"})),
        Spec("booking.created", '{"a":' + '{"b":' * depth + "1" + "}" * depth + "}",
             reason="too_deep"),
        # The deepest accepted: the object and 255 arrays are 256 levels.
        Spec("booking.created", '{"ok":' + "[" * 255 + "]" * 255 + "}", good=Good(
            "booking.created", {"ok": _nested_list(255)}, None, None, NOW_TEXT)),
        Spec("booking.created", '{"no":' + "[" * 256 + "]" * 256 + "}", reason="too_deep"),
    ]  # fmt: skip
    written = insert_rows(db, specs)
    await fan_out_all(db, 10, max_payload_bytes=2 * 1024 * 1024)
    outcome = read_outcome(db)
    check_partition(written, outcome)
    assert outcome.quarantined[written[0][0]]["reason"] == "too_deep"
    assert outcome.quarantined[written[1][0]]["reason"] in specs[1].reasons
    assert outcome.quarantined[written[2][0]]["reason"] == "too_deep"
    event = outcome.events[written[3][0]]
    assert json.loads(event["body"])["data"] == {"ok": _nested_list(255)}
    assert outcome.quarantined[written[4][0]]["reason"] == "too_deep"


async def test_a_megabyte_in_any_text_column_stays_out_of_the_quarantine_and_the_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the payload has a size limit; the other columns are checked by their rules, and
    what the quarantine row and its log line keep of an overlong value is bounded."""
    db = tmp_path / "app.db"
    await fresh_database(db)
    huge = "x" * MEGABYTE
    specs = [
        Spec(huge, '{"a":1}', reason="bad_event_type"),
        Spec("booking." + huge, '{"a":1}', reason="bad_event_type"),
        Spec("booking.created", '{"a":1}', event_id=huge, reason="bad_event_id"),
        Spec("booking.created", '{"a":1}', tenant=huge, reason="bad_tenant"),
        Spec("booking.created", '{"a":1}', occurred_at=huge, reason="bad_occurred_at"),
        Spec("booking.created", '{"a":1}', event_id=b"\xff" * MEGABYTE, reason="bad_event_id"),
    ]
    written = insert_rows(db, specs)
    caplog.set_level(logging.WARNING, logger="webhookd.store")
    await fan_out_all(db, 10)
    outcome = read_outcome(db)
    check_rows(written, outcome)
    for q in outcome.quarantined.values():
        assert len(q["detail"]) < 1000, q["detail"][:100]
        assert len(q["event_type"] or "") <= 201
        assert len(q["event_id"] or "") <= 201
    formatter = _Formatter("json")
    lines = [formatter.format(r) for r in caplog.records if r.name == "webhookd.store"]
    assert len(lines) == len(specs)
    assert max(map(len, lines)) < 2000


def _nested_list(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


async def test_event_ids_are_unique_across_a_reused_id_and_blob_twins(tmp_path: Path) -> None:
    """The outbox's UNIQUE index refuses a second row with the same event id (the
    application's error, at its INSERT). A row pruned by retention no longer holds its id, and
    a BLOB is not equal to TEXT in SQLite: such rows reach fan-out and are quarantined as
    duplicate_event_id, while the original event keeps its deliveries."""
    db = tmp_path / "app.db"
    await fresh_database(db)
    [(first, _)] = insert_rows(db, [Spec("booking.created", '{"id":1}', event_id="evt_1")])
    with pytest.raises(sqlite3.IntegrityError), contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(
            "INSERT INTO webhook_outbox (event_type, payload, event_id)"
            " VALUES ('booking.created', '{\"id\":2}', 'evt_1')"
        )
    await fan_out_all(db, 10)
    before = read_outcome(db)
    assert set(before.events) == {first}
    # Retention deletes the outbox row once it was fanned out; the application reuses the id.
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DELETE FROM webhook_outbox WHERE id = ?", (first,))
    written = insert_rows(
        db,
        [
            Spec("booking.updated", '{"id":3}', event_id="evt_1"),
            Spec("booking.updated", '{"id":4}', event_id=b"evt_1"),
            Spec("booking.updated", '{"id":5}', event_id=b"evt_2"),
            Spec("booking.updated", '{"id":6}', event_id="evt_2"),
        ],
    )
    assert len(written) == 4  # TEXT and BLOB twins both pass the UNIQUE index
    await fan_out_all(db, 2)
    after = read_outcome(db)
    reasons = {i: q["reason"] for i, q in after.quarantined.items()}
    assert reasons == {
        written[0][0]: "duplicate_event_id",
        written[1][0]: "duplicate_event_id",
        written[3][0]: "duplicate_event_id",
    }
    assert after.events[written[2][0]]["event_id"] == "evt_2"
    assert after.events[first]["event_id"] == "evt_1"
    assert after.routes[after.events[first]["id"]] == {"all", "bookings"}
    assert after.cursor == written[-1][0]


# -- with a running daemon -----------------------------------------------------------------------

SECRET = "hostile-rows-secret"


def _metric(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=batches())
def test_a_running_daemon_delivers_the_good_rows_and_quarantines_the_rest(
    specs: list[Spec],
) -> None:
    """A fixed row of every fault sits among generated ones; the daemon keeps running, the
    receiver gets each good row once with a valid signature, and /readyz stays ready."""
    fixed: list[Spec] = [
        Spec("booking.created", v, reason=r)
        for r, values in BAD_PAYLOADS.items()
        for v in values[:2]
    ]
    fixed += [Spec(v, '{"a":1}', reason="bad_event_type") for v in BAD_EVENT_TYPES[:4]]
    fixed += [
        Spec("booking.created", '{"a":1}', event_id=v, reason="bad_event_id")
        for v in BAD_EVENT_IDS[:3]
    ]
    fixed += [
        Spec("booking.created", '{"a":1}', occurred_at=v, reason="bad_occurred_at")
        for v in BAD_TIMES[:4]
    ]
    fixed.append(
        Spec("booking.created", '{"x":"' + "a" * MAX_PAYLOAD_BYTES + '"}', reason="too_large")
    )
    fixed.append(Spec("booking.created", '{"ok":true}', event_id="after-the-bad-ones",
                      good=Good("booking.created", {"ok": True}, "after-the-bad-ones", None,
                                NOW_TEXT)))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="hostile-daemon-") as tmp:
        asyncio.run(_run_daemon(Path(tmp), specs + fixed))


async def _run_daemon(tmp: Path, specs: Sequence[Spec]) -> None:
    async with Receiver() as receiver:
        settings_ = daemon_settings(
            tmp,
            endpoints=[{"id": "all", "url": receiver.url("/all"), "secret": SECRET}],
            http=True,
            delivery=loopback_delivery(),
            outbox={"max_payload_bytes": MAX_PAYLOAD_BYTES, "batch_size": 7},
        )
        db = settings_.database.path
        async with running_daemon(settings_) as daemon:
            written = await asyncio.to_thread(insert_rows, db, specs)
            last = max(i for i, _ in written)
            await eventually(
                lambda: (
                    query(db, "SELECT value FROM webhookd_state WHERE key='outbox_cursor'")[0][0]
                    == last
                ),
                what="the cursor to pass every row",
            )
            outcome = read_outcome(db, sent=True)
            expected = len(outcome.events)
            await eventually(
                lambda: len(deliveries(db, state="succeeded")) == expected,
                what=f"{expected} deliveries to succeed",
            )
            async with aiohttp.ClientSession() as http:

                async def ready() -> bool:
                    async with http.get(http_base(daemon) + "/readyz") as response:
                        return response.status == 200

                # Back-dated rows count as outbox lag until the next housekeeping tick (1 s)
                # notices they were fanned out: ready again within a few seconds at most.
                await eventually(ready, within=10.0, what="/readyz to answer 200")
                async with http.get(http_base(daemon) + "/metrics") as response:
                    metrics = await response.text()
            assert daemon.dispatcher.crashed is None
        final = read_outcome(db, sent=True)
    good_outbox_ids = {i for i, s in written if s.good is not None}
    check_partition(written, final)
    for outbox_id, spec in written:
        if spec.reason is not None:
            assert final.quarantined[outbox_id]["reason"] == spec.reason, spec
    assert good_outbox_ids <= set(final.events)
    requests = receiver.on_path("/all")
    assert len(requests) == len(final.events)  # each event once: nothing failed, nothing twice
    assert all(r.signature_valid(SECRET) for r in requests)
    assert sorted(r.body for r in requests) == sorted(
        bytes(e["body"]) for e in final.events.values()
    )
    rejected = _metric(metrics, "webhookd_events_rejected_total")
    counted: dict[str, float] = {}
    for labels, value in rejected.items():
        counted[dict(labels)["reason"]] = counted.get(dict(labels)["reason"], 0) + value
    by_reason: dict[str, int] = {}
    for q in final.quarantined.values():
        by_reason[q["reason"]] = by_reason.get(q["reason"], 0) + 1
    assert {r: int(v) for r, v in counted.items() if v} == by_reason


# -- endpoint rows whose extra headers try to replace ours ------------------------------------


FORGED = "0" * 64


async def test_a_table_endpoint_whose_headers_would_replace_the_signature_is_never_sent_to(
    tmp_path: Path,
) -> None:
    """An app-managed endpoint may carry extra headers, but never one of webhookd's own (any
    case, either scheme) and never a value that smuggles a header in: such a row is shown with
    its problem and never routed to, while a well-behaved row gets its extra header."""
    forgeries: dict[str, dict[str, str]] = {
        "forge-sig": {"X-BookingScheduler-Signature": FORGED},
        "forge-lower": {"x-bookingscheduler-signature": FORGED},
        "forge-upper": {"X-BOOKINGSCHEDULER-DELIVERY": "dlv_forged"},
        "forge-prev": {"X-BookingScheduler-Signature-Previous": FORGED},
        "forge-event": {"X-BookingScheduler-Event": "payment.succeeded"},
        "forge-std": {"webhook-signature": "v1,Zm9yZ2Vk"},
        "forge-ctype": {"Content-Type": "text/plain"},
        "forge-host": {"Host": "evil.example"},
        "forge-crlf": {"X-Note": "a\r\nX-BookingScheduler-Signature: " + FORGED},
    }
    async with Receiver() as receiver:
        settings_ = daemon_settings(tmp_path, http=True, delivery=loopback_delivery())
        db = settings_.database.path
        async with running_daemon(settings_) as daemon:
            rows = [("honest", {"X-Custom": "yes", "Authorization": "Bearer t0ken"})]
            rows += list(forgeries.items())
            for ep_id, headers in rows:
                await asyncio.to_thread(
                    _insert_endpoint, db, ep_id, receiver.url(f"/{ep_id}"), headers
                )
            await eventually(
                lambda: set(daemon.dispatcher.endpoints) >= {ep for ep, _ in rows},
                what="the daemon to load the table endpoints",
            )
            for ep_id in forgeries:
                problem = daemon.dispatcher.endpoints[ep_id].problem
                assert problem, ep_id
                assert FORGED not in problem
                assert "Bearer" not in problem
            assert daemon.dispatcher.endpoints["honest"].problem is None
            await asyncio.to_thread(
                insert_rows, db, [Spec("booking.created", '{"id":"b1"}', event_id="evt_h1")]
            )
            await eventually(lambda: receiver.on_path("/honest"), what="the honest delivery")
    # Fan-out writes all of an event's deliveries at once: none went to a forger.
    assert {d["endpoint_id"] for d in deliveries(db)} == {"honest"}
    assert [r.path for r in receiver.requests] == ["/honest"]
    [request] = receiver.requests
    assert request.signature_valid(SECRET)
    assert request.headers["X-Custom"] == "yes"
    assert request.headers["Authorization"] == "Bearer t0ken"
    assert request.headers["X-BookingScheduler-Event"] == "booking.created"
    assert request.headers["Content-Type"] == "application/json"


def _insert_endpoint(db: Path, ep_id: str, url: str, headers: Mapping[str, str]) -> None:
    with contextlib.closing(sqlite3.connect(db, timeout=10.0)) as conn, conn:
        conn.execute(
            "INSERT INTO webhook_endpoints (id, url, secret, events, headers)"
            " VALUES (?, ?, ?, '*', ?)",
            (ep_id, url, SECRET, json.dumps(headers)),
        )
