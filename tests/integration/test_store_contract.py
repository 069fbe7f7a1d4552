"""One suite, every store backend: the in-memory backend must behave exactly like SQLite.

Each test gets a :class:`Harness`: a migrated ``Store`` plus ``app``, which plays the
application (plain ``sqlite3`` INSERTs into webhook_outbox / webhook_endpoints for SQLite, the
memory backend's helpers otherwise), so the tests never say which backend they run on.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import pytest

from webhookd.dispatcher import plan_fanout
from webhookd.errors import StorageError, StoreLockedError
from webhookd.models import (
    AttemptOutcome,
    AttemptResult,
    Delivery,
    DeliveryFilter,
    DeliveryState,
    Endpoint,
    Event,
    FanoutPlan,
    NewDelivery,
    OutboxRow,
    OversizedPayload,
)
from webhookd.store.base import Planner, Store, StoreBackend
from webhookd.store.memory import ENDPOINT_COLUMNS, ENDPOINT_DEFAULTS, MemoryBackend
from webhookd.store.sqlite import SQLiteBackend

NOW = 1_700_000_000.0
MAX_PAYLOAD_BYTES = 64 * 1024
BATCH = 100

EP_A = Endpoint(id="a", url="https://a.example/hook", secret="sa", events=("booking.*",))
EP_B = Endpoint(id="b", url="https://b.example/hook", secret="sb", events=("*",))


class App(Protocol):
    """The application's side of the database."""

    def insert_outbox(
        self,
        event_type: str | bytes,
        payload: str | bytes,
        *,
        event_id: str | bytes | int | None = None,
        tenant: str | bytes | int | None = None,
        occurred_at: str | bytes | None = None,
    ) -> int: ...
    def delete_outbox(self, outbox_id: int) -> None: ...
    def upsert_endpoint(self, row: Mapping[str, object]) -> None: ...
    def delete_endpoint(self, endpoint_id: str) -> None: ...


class SQLiteApp:
    """An application writing the SQLite file with the standard library, autocommit."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, timeout=10, isolation_level=None)

    def insert_outbox(
        self,
        event_type: str | bytes,
        payload: str | bytes,
        *,
        event_id: str | bytes | int | None = None,
        tenant: str | bytes | int | None = None,
        occurred_at: str | bytes | None = None,
    ) -> int:
        values: dict[str, object] = {
            "event_type": event_type,
            "payload": payload,
            "event_id": event_id,
            "tenant": tenant,
        }
        if occurred_at is not None:  # left out, the column's default applies
            values["occurred_at"] = occurred_at
        cur = self.conn.execute(
            f"INSERT INTO webhook_outbox ({', '.join(values)}) "
            f"VALUES ({', '.join('?' * len(values))})",
            tuple(values.values()),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def delete_outbox(self, outbox_id: int) -> None:
        self.conn.execute("DELETE FROM webhook_outbox WHERE id = ?", (outbox_id,))

    def upsert_endpoint(self, row: Mapping[str, object]) -> None:
        values = {**ENDPOINT_DEFAULTS, **row}
        columns = [c for c in ENDPOINT_COLUMNS if c in values]
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != "id")
        self.conn.execute(
            f"INSERT INTO webhook_endpoints ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' * len(columns))}) "
            f"ON CONFLICT (id) DO UPDATE SET {updates}",
            tuple(values[c] for c in columns),
        )

    def delete_endpoint(self, endpoint_id: str) -> None:
        self.conn.execute("DELETE FROM webhook_endpoints WHERE id = ?", (endpoint_id,))

    def close(self) -> None:
        self.conn.close()


@dataclass
class Harness:
    kind: str
    store: Store
    app: App
    make_backend: Callable[[], StoreBackend]  # another backend on the same data
    make_empty: Callable[[], StoreBackend]  # a backend on a new, empty database
    opened: list[Store] = field(default_factory=list)

    async def another_store(self, *, migrate: bool = True) -> Store:
        """A second store on the same database: a restarted or a second daemon."""
        store = Store(self.make_backend())
        await store.open()
        self.opened.append(store)
        if migrate:
            await store.migrate()
        return store


@pytest.fixture(params=["memory", "sqlite"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    sqlite_app: SQLiteApp | None = None
    make_backend: Callable[[], StoreBackend]
    make_empty: Callable[[], StoreBackend]
    if request.param == "memory":
        memory = MemoryBackend()
        make_backend = lambda: MemoryBackend(memory.database)  # noqa: E731
        make_empty = MemoryBackend
        backend: StoreBackend = memory
        app: App = memory
    else:
        path = tmp_path / "app.db"
        make_backend = lambda: SQLiteBackend(path)  # noqa: E731
        empties = iter(range(1_000_000))
        make_empty = lambda: SQLiteBackend(tmp_path / f"empty-{next(empties)}.db")  # noqa: E731
        backend = make_backend()
    store = Store(backend)
    await store.open()
    await store.migrate()
    if request.param == "sqlite":
        sqlite_app = SQLiteApp(tmp_path / "app.db")
        app = sqlite_app
    h = Harness(request.param, store, app, make_backend, make_empty, [store])
    yield h
    for s in h.opened:
        await s.close()
    if sqlite_app is not None:
        sqlite_app.close()


def planner(endpoints: Sequence[Endpoint] = (EP_A, EP_B), now: float = NOW) -> Planner:
    def plan(rows: Sequence[OutboxRow]) -> FanoutPlan:
        return plan_fanout(rows, endpoints, max_payload_bytes=MAX_PAYLOAD_BYTES, now=now)

    return plan


def failed_attempt(
    d: Delivery, *, next_at: float | None, state: DeliveryState = DeliveryState.PENDING
) -> AttemptOutcome:
    return AttemptOutcome(
        delivery_pk=d.pk,
        attempt_no=d.attempts + 1,
        started_at=NOW + d.attempts,
        duration_seconds=0.25,
        result=AttemptResult.HTTP_ERROR,
        status_code=500,
        error="HTTP 500",
        response_excerpt="oops",
        new_state=state,
        next_attempt_at=next_at,
    )


def succeeded_attempt(d: Delivery) -> AttemptOutcome:
    return AttemptOutcome(
        delivery_pk=d.pk,
        attempt_no=d.attempts + 1,
        started_at=NOW + d.attempts,
        duration_seconds=0.5,
        result=AttemptResult.SUCCESS,
        status_code=200,
        error=None,
        response_excerpt="ok",
        new_state=DeliveryState.SUCCEEDED,
        next_attempt_at=None,
    )


def booking(app: App, n: int = 1, **kwargs: str | None) -> list[int]:
    return [
        app.insert_outbox(
            "booking.created",
            f'{{"id":"book_{i}"}}',
            occurred_at="2024-01-15T10:00:00Z",
            **kwargs,  # type: ignore[arg-type]
        )
        for i in range(n)
    ]


# -- fan-out ---------------------------------------------------------------------------------


async def test_fan_out_writes_events_deliveries_and_quarantine(harness: Harness) -> None:
    app, store = harness.app, harness.store
    app.insert_outbox(
        "booking.created",
        '{ "id": "book_1", "price": 10.0 }',
        tenant="org_1",
        event_id="evt_1",
        occurred_at="2024-01-15T12:00:00+02:00",
    )
    app.insert_outbox("payment.succeeded", '{"id":"pay_1"}', occurred_at="2024-01-15T10:00:00Z")
    bad = app.insert_outbox("booking.created", "{not json")

    result = await store.fan_out(planner(), BATCH, NOW)

    assert (result.rows, result.events, result.deliveries) == (3, 2, 3)
    assert result.endpoints == {"a", "b"}
    assert [(q.outbox_id, q.reason) for q in result.quarantined] == [(bad, "invalid_json")]
    deliveries = await store.list_deliveries(DeliveryFilter())
    assert sorted((d.endpoint_id, d.event_type) for d in deliveries) == [
        ("a", "booking.created"),
        ("b", "booking.created"),
        ("b", "payment.succeeded"),
    ]
    for d in deliveries:
        assert (d.state, d.attempts, d.next_attempt_at, d.created_at) == ("pending", 0, NOW, NOW)
    [claimed] = await store.claim_due("a", NOW, 10)
    assert claimed.body == (
        b'{"event":"booking.created","timestamp":"2024-01-15T10:00:00Z",'
        b'"data":{"id":"book_1","price":10}}'
    )
    assert (claimed.event_id, claimed.occurred_at) == ("evt_1", "2024-01-15T10:00:00Z")
    [q] = await store.list_quarantine(10)
    assert (q.outbox_id, q.reason, q.event_type, q.quarantined_at) == (
        bad,
        "invalid_json",
        "booking.created",
        NOW,
    )


async def test_fan_out_does_not_read_a_payload_over_the_limit(harness: Harness) -> None:
    app, store = harness.app, harness.store
    huge = app.insert_outbox("booking.created", '{"blob":"' + "x" * 200_000 + '"}')
    small = app.insert_outbox("booking.created", '{"id":"book_1"}')
    given: list[object] = []

    def recording(rows: Sequence[OutboxRow]) -> FanoutPlan:
        given.extend(r.payload for r in rows)
        return planner()(rows)

    result = await store.fan_out(recording, BATCH, NOW, max_payload_bytes=1000)

    assert given == [OversizedPayload(200_011), '{"id":"book_1"}']
    assert [(q.outbox_id, q.reason) for q in result.quarantined] == [(huge, "too_large")]
    assert "200011 bytes" in result.quarantined[0].detail
    deliveries = await store.list_deliveries(DeliveryFilter())
    assert sorted(d.endpoint_id for d in deliveries) == ["a", "b"]  # only the small event's
    [event_id] = {d.event_id for d in deliveries}
    [claimed] = await store.claim_due("a", NOW, 10)
    assert claimed.event_id == event_id
    assert b'"data":{"id":"book_1"}' in claimed.body
    assert small > huge


async def test_fan_out_never_reads_a_row_twice(harness: Harness) -> None:
    app, store = harness.app, harness.store
    seen: list[int] = []

    def recording(rows: Sequence[OutboxRow]) -> FanoutPlan:
        seen.extend(r.id for r in rows)
        return planner()(rows)

    first = booking(app, 2)
    assert (await store.fan_out(recording, BATCH, NOW)).rows == 2
    assert (await store.fan_out(recording, BATCH, NOW)).rows == 0
    later = booking(app, 1)
    assert (await store.fan_out(recording, BATCH, NOW)).rows == 1
    assert seen == first + later
    assert len(await store.list_deliveries(DeliveryFilter())) == 2 * 3  # EP_A and EP_B each


async def test_fan_out_reads_at_most_limit_rows_in_order(harness: Harness) -> None:
    ids = booking(harness.app, 5)
    batches = []
    for _ in range(4):
        seen: list[int] = []

        def recording(rows: Sequence[OutboxRow], seen: list[int] = seen) -> FanoutPlan:
            seen.extend(r.id for r in rows)
            return planner()(rows)

        result = await harness.store.fan_out(recording, 2, NOW)
        assert result.rows == len(seen)
        batches.append(seen)
    assert batches == [ids[0:2], ids[2:4], ids[4:5], []]


async def test_a_failing_planner_writes_nothing_and_the_rows_are_read_again(
    harness: Harness,
) -> None:
    app, store = harness.app, harness.store
    booking(app, 2)
    app.insert_outbox("booking.created", "[]")

    def broken(rows: Sequence[OutboxRow]) -> FanoutPlan:
        raise RuntimeError("planner bug")

    with pytest.raises(RuntimeError, match="planner bug"):
        await store.fan_out(broken, BATCH, NOW)
    assert await store.list_deliveries(DeliveryFilter()) == []
    assert await store.list_quarantine(10) == []
    result = await store.fan_out(planner(), BATCH, NOW)
    assert (result.rows, result.events, len(result.quarantined)) == (3, 2, 1)
    assert sorted({d.event_type for d in await store.list_deliveries(DeliveryFilter())}) == [
        "booking.created"
    ]


async def test_a_failed_write_rolls_back_the_whole_batch(harness: Harness) -> None:
    """A constraint failure halfway through the batch leaves no event, delivery, quarantine
    row or cursor move behind."""
    app, store = harness.app, harness.store
    booking(app, 2)
    app.insert_outbox("Bad Type", "{}")

    def same_delivery_ids(rows: Sequence[OutboxRow]) -> FanoutPlan:
        plan = planner([EP_A])(rows)
        events = tuple(replace(p, deliveries=(NewDelivery("dlv_same", "a"),)) for p in plan.events)
        return replace(plan, events=events)

    with pytest.raises(StorageError):
        await store.fan_out(same_delivery_ids, BATCH, NOW)
    assert await store.list_deliveries(DeliveryFilter()) == []
    assert await store.list_quarantine(10) == []
    result = await store.fan_out(planner([EP_A]), BATCH, NOW)
    assert (result.rows, result.events, result.deliveries, len(result.quarantined)) == (3, 2, 2, 1)


async def test_an_event_id_seen_before_is_quarantined_as_duplicate(harness: Harness) -> None:
    """The app pruned its outbox and reused an idempotency key: not delivered a second time."""
    app, store = harness.app, harness.store
    [first] = booking(app, 1, event_id="evt_dup")
    await store.fan_out(planner(), BATCH, NOW)
    app.delete_outbox(first)
    [again] = booking(app, 1, event_id="evt_dup")
    booking(app, 1, event_id="evt_next")

    result = await store.fan_out(planner(), BATCH, NOW)

    assert (result.rows, result.events) == (2, 1)
    [q] = result.quarantined
    assert (q.outbox_id, q.reason, q.event_id) == (again, "duplicate_event_id", "evt_dup")
    assert len(await store.list_deliveries(DeliveryFilter(event_id="evt_dup"))) == 2
    assert len(await store.list_deliveries(DeliveryFilter(event_id="evt_next"))) == 2
    [listed] = await store.list_quarantine(10)
    assert listed.reason == "duplicate_event_id"


async def test_equal_event_ids_in_one_batch_quarantine_the_second_and_do_not_wedge(
    harness: Harness,
) -> None:
    """SQLite's UNIQUE sees a BLOB and a TEXT with the same bytes as different values, so the
    outbox can hold two rows whose event ids read back equal. Fan-out must quarantine the second
    (not fail the batch forever and block every row behind it)."""
    app, store = harness.app, harness.store
    first = app.insert_outbox("booking.created", '{"n":1}', event_id="evt_same")
    second = app.insert_outbox("booking.created", '{"n":2}', event_id=b"evt_same")
    behind = app.insert_outbox("booking.created", '{"n":3}', event_id="evt_behind")

    result = await store.fan_out(planner([EP_A]), BATCH, NOW)

    assert (result.rows, result.events) == (3, 2)
    assert [(q.outbox_id, q.reason) for q in result.quarantined] == [(second, "duplicate_event_id")]
    delivered = {d.event_id for d in await store.list_deliveries(DeliveryFilter())}
    assert delivered == {"evt_same", "evt_behind"}
    assert first < second < behind


async def test_oldest_unprocessed_is_the_next_rows_occurred_at(harness: Harness) -> None:
    app, store = harness.app, harness.store
    assert await store.oldest_unprocessed() is None
    app.insert_outbox("booking.created", "{}", occurred_at="2024-01-15T10:00:00Z")
    app.insert_outbox("booking.created", "{}", occurred_at="2024-01-15T11:00:00Z")
    assert await store.oldest_unprocessed() == "2024-01-15T10:00:00Z"
    await store.fan_out(planner(), 1, NOW)
    assert await store.oldest_unprocessed() == "2024-01-15T11:00:00Z"
    await store.fan_out(planner(), 1, NOW)
    assert await store.oldest_unprocessed() is None


async def test_outbox_changed_reports_commits_since_the_last_call(harness: Harness) -> None:
    store = harness.store
    assert await store.outbox_changed() is True  # the first call cannot know: it says yes
    assert await store.outbox_changed() is False
    booking(harness.app, 1)
    assert await store.outbox_changed() is True
    assert await store.outbox_changed() is False


# -- claiming and leases ----------------------------------------------------------------------


async def test_claim_due_orders_by_next_attempt_then_pk_and_respects_limit(
    harness: Harness,
) -> None:
    store = harness.store
    booking(harness.app, 4)
    await store.fan_out(planner([EP_A]), BATCH, NOW)
    d1, d2, d3, d4 = await store.claim_due("a", NOW, 10)
    assert [d.pk for d in (d1, d2, d3, d4)] == sorted(d.pk for d in (d1, d2, d3, d4))
    await store.record(
        [
            failed_attempt(d1, next_at=NOW + 30),
            failed_attempt(d2, next_at=NOW + 10),
            failed_attempt(d3, next_at=NOW + 20),
            failed_attempt(d4, next_at=NOW + 10),
        ],
        {},
    )
    assert await store.claim_due("a", NOW + 5, 10) == []
    first_two = await store.claim_due("a", NOW + 100, 2)
    assert [d.delivery_id for d in first_two] == [d2.delivery_id, d4.delivery_id]
    rest = await store.claim_due("a", NOW + 100, 10)
    assert [d.delivery_id for d in rest] == [d3.delivery_id, d1.delivery_id]
    assert [d.attempts for d in first_two + rest] == [1, 1, 1, 1]


async def test_claim_due_returns_only_that_endpoints_due_deliveries(harness: Harness) -> None:
    store = harness.store
    harness.app.insert_outbox("payment.succeeded", '{"id":"pay_1"}')
    booking(harness.app, 1)
    await store.fan_out(planner(), BATCH, NOW)
    assert await store.claim_due("a", NOW - 1, 10) == []  # not due yet
    assert await store.claim_due("nobody", NOW, 10) == []
    assert [d.event_type for d in await store.claim_due("a", NOW, 10)] == ["booking.created"]
    got_b = await store.claim_due("b", NOW, 10)
    assert sorted(d.event_type for d in got_b) == ["booking.created", "payment.succeeded"]
    assert all(d.endpoint_id == "b" for d in got_b)


async def test_a_claimed_delivery_is_not_claimed_again_until_recorded_or_released(
    harness: Harness,
) -> None:
    store = harness.store
    booking(harness.app, 2)
    await store.fan_out(planner([EP_A]), BATCH, NOW)
    first, second = await store.claim_due("a", NOW, 10)
    assert await store.claim_due("a", NOW + 1000, 10) == []
    await store.release([first.pk])
    assert [d.pk for d in await store.claim_due("a", NOW, 10)] == [first.pk]
    await store.record([failed_attempt(second, next_at=NOW + 5)], {})
    assert await store.claim_due("a", NOW + 4, 10) == []
    assert [d.pk for d in await store.claim_due("a", NOW + 5, 10)] == [second.pk]
    await store.release([first.pk, second.pk, 999_999])  # unknown pks are ignored


async def test_leases_die_with_the_daemon(harness: Harness) -> None:
    """After a crash nothing stays leased: a restarted daemon sends in-flight deliveries again."""
    booking(harness.app, 1)
    await harness.store.fan_out(planner([EP_A]), BATCH, NOW)
    [claimed] = await harness.store.claim_due("a", NOW, 10)
    restarted = await harness.another_store()
    [again] = await restarted.claim_due("a", NOW, 10)
    assert again.delivery_id == claimed.delivery_id
    assert again.body == claimed.body


# -- recording attempts -----------------------------------------------------------------------


async def test_record_moves_state_attempts_schedule_and_appends_attempts(
    harness: Harness,
) -> None:
    store = harness.store
    booking(harness.app, 1, tenant="org_1")
    await store.fan_out(planner([EP_A]), BATCH, NOW)
    [d] = await store.claim_due("a", NOW, 10)

    await store.record([failed_attempt(d, next_at=NOW + 10)], {d.pk: "a"})
    rec = await store.get_delivery(d.delivery_id)
    assert rec is not None
    assert (rec.state, rec.attempts, rec.next_attempt_at) == ("pending", 1, NOW + 10)
    assert (rec.last_status, rec.last_error) == (500, "HTTP 500")
    [a1] = rec.attempt_log
    assert (a1.attempt_no, a1.started_at, a1.duration_seconds, a1.result) == (
        1,
        NOW,
        0.25,
        "http_error",
    )
    assert (a1.status_code, a1.error, a1.response_excerpt) == (500, "HTTP 500", "oops")

    [d] = await store.claim_due("a", NOW + 10, 10)
    assert d.attempts == 1
    await store.record([succeeded_attempt(d)], {d.pk: "a"})
    rec = await store.get_delivery(d.delivery_id)
    assert rec is not None
    assert (rec.state, rec.attempts, rec.next_attempt_at) == ("succeeded", 2, None)
    assert (rec.last_status, rec.last_error) == (200, None)
    assert [(a.attempt_no, a.result) for a in rec.attempt_log] == [
        (1, "http_error"),
        (2, "success"),
    ]
    assert rec.tenant == "org_1"


async def test_a_terminal_state_is_final(harness: Harness) -> None:
    store = harness.store
    booking(harness.app, 2)
    await store.fan_out(planner([EP_A]), BATCH, NOW)
    done, dead = await store.claim_due("a", NOW, 10)
    await store.record(
        # (a stray next_attempt_at on a failed delivery must not make it due again)
        [succeeded_attempt(done), failed_attempt(dead, next_at=NOW, state=DeliveryState.FAILED)],
        {},
    )
    # A stale outcome arriving later must not bring either back to life.
    await store.record(
        [failed_attempt(done, next_at=NOW), failed_attempt(dead, next_at=NOW)],
        {},
    )
    got_done = await store.get_delivery(done.delivery_id)
    got_dead = await store.get_delivery(dead.delivery_id)
    assert got_done is not None
    assert got_dead is not None
    assert (got_done.state, got_done.attempts, got_done.next_attempt_at) == ("succeeded", 1, None)
    assert (got_dead.state, got_dead.attempts, got_dead.next_attempt_at) == ("failed", 1, None)
    assert await store.claim_due("a", NOW + 1e6, 10) == []
    assert await store.next_due_at("a") is None
    assert await store.pending_counts() == {}


async def test_next_due_at_is_the_earliest_unleased_pending_delivery(harness: Harness) -> None:
    store = harness.store
    assert await store.next_due_at("a") is None
    booking(harness.app, 2)
    await store.fan_out(planner([EP_A]), BATCH, NOW)
    assert await store.next_due_at("a") == NOW
    first, second = await store.claim_due("a", NOW, 10)
    assert await store.next_due_at("a") is None  # both leased
    await store.record([failed_attempt(first, next_at=NOW + 60)], {})
    assert await store.next_due_at("a") == NOW + 60
    await store.release([second.pk])
    assert await store.next_due_at("a") == NOW
    [second] = await store.claim_due("a", NOW, 10)
    await store.record([succeeded_attempt(second)], {})
    assert await store.next_due_at("a") == NOW + 60
    assert await store.next_due_at("b") is None


async def test_pending_counts_per_endpoint(harness: Harness) -> None:
    store = harness.store
    assert await store.pending_counts() == {}
    booking(harness.app, 2)
    harness.app.insert_outbox("payment.succeeded", "{}")
    await store.fan_out(planner(), BATCH, NOW)
    assert await store.pending_counts() == {"a": 2, "b": 3}
    [d, _] = await store.claim_due("a", NOW, 10)
    assert await store.pending_counts() == {"a": 2, "b": 3}  # leased is still pending
    await store.record([succeeded_attempt(d)], {})
    assert await store.pending_counts() == {"a": 1, "b": 3}


# -- listing ---------------------------------------------------------------------------------


async def test_list_and_get_deliveries_with_filters(harness: Harness) -> None:
    app, store = harness.app, harness.store
    app.insert_outbox("booking.created", "{}", tenant="org_1", event_id="e1")
    app.insert_outbox("booking.cancelled", "{}", tenant="org_2", event_id="e2")
    app.insert_outbox("payment.succeeded", "{}", event_id="e3")
    await store.fan_out(planner(), BATCH, NOW)
    [a_first, _] = await store.claim_due("a", NOW, 10)
    await store.record([succeeded_attempt(a_first)], {})

    def keys(records: Sequence[object]) -> list[tuple[str, str]]:
        return [(r.endpoint_id, r.event_id) for r in records]  # type: ignore[attr-defined]

    everything = await store.list_deliveries(DeliveryFilter())
    assert len(everything) == 5
    assert len({d.delivery_id for d in everything}) == 5
    # newest first: e3 was fanned out last, and b's delivery of e1 after a's
    assert keys(everything)[0] == ("b", "e3")
    assert keys(everything)[-1] == ("a", "e1")
    assert keys(await store.list_deliveries(DeliveryFilter(state="succeeded"))) == [("a", "e1")]
    assert len(await store.list_deliveries(DeliveryFilter(state="pending"))) == 4
    assert await store.list_deliveries(DeliveryFilter(state="failed")) == []
    assert sorted(keys(await store.list_deliveries(DeliveryFilter(endpoint_id="a")))) == [
        ("a", "e1"),
        ("a", "e2"),
    ]
    assert keys(await store.list_deliveries(DeliveryFilter(event_type="payment.succeeded"))) == [
        ("b", "e3")
    ]
    assert sorted(keys(await store.list_deliveries(DeliveryFilter(event_id="e2")))) == [
        ("a", "e2"),
        ("b", "e2"),
    ]
    assert sorted(keys(await store.list_deliveries(DeliveryFilter(tenant="org_1")))) == [
        ("a", "e1"),
        ("b", "e1"),
    ]
    both = await store.list_deliveries(DeliveryFilter(endpoint_id="b", tenant="org_2"))
    assert keys(both) == [("b", "e2")]
    assert both[0].tenant == "org_2"
    assert keys(await store.list_deliveries(DeliveryFilter(limit=2))) == keys(everything)[:2]

    got = await store.get_delivery(a_first.delivery_id)
    assert got is not None
    assert (got.endpoint_id, got.event_id, got.event_type, got.state) == (
        "a",
        "e1",
        "booking.created",
        "succeeded",
    )
    assert len(got.attempt_log) == 1
    assert await store.get_delivery("dlv_does_not_exist") is None


async def test_list_quarantine_newest_first_with_limit(harness: Harness) -> None:
    app, store = harness.app, harness.store
    bad = [
        app.insert_outbox("booking.created", "[1]"),
        app.insert_outbox("Not.A.Type", "{}"),
        app.insert_outbox("booking.created", '{"n":1152921504606846976}'),
    ]
    booking(app, 1)
    await store.fan_out(planner(), BATCH, NOW)
    listed = await store.list_quarantine(10)
    assert [(q.outbox_id, q.reason) for q in listed] == [
        (bad[2], "unsafe_integer"),
        (bad[1], "bad_event_type"),
        (bad[0], "not_object"),
    ]
    assert [q.outbox_id for q in await store.list_quarantine(2)] == [bad[2], bad[1]]
    assert all(q.detail for q in listed)


# -- endpoints -------------------------------------------------------------------------------


async def test_rotate_secret_keeps_the_old_secret_until_it_expires(harness: Harness) -> None:
    app, store = harness.app, harness.store
    app.upsert_endpoint({"id": "shop", "url": "https://shop.example/h", "secret": "old"})
    v1 = await store.endpoints_version()

    assert await store.rotate_secret("shop", "new", "2030-01-01T00:00:00Z")
    assert not await store.rotate_secret("nope", "x", "2030-01-01T00:00:00Z")

    [row] = await store.table_endpoints()
    assert (row["secret"], row["previous_secret"], row["previous_secret_expires_at"]) == (
        "new",
        "old",
        "2030-01-01T00:00:00Z",
    )
    assert await store.endpoints_version() > v1  # the daemon picks the new secret up


async def test_endpoints_version_moves_on_insert_update_and_delete(harness: Harness) -> None:
    app, store = harness.app, harness.store
    v0 = await store.endpoints_version()
    assert await store.table_endpoints() == []

    app.upsert_endpoint({"id": "shop", "url": "https://shop.example/h", "secret": "s1"})
    v1 = await store.endpoints_version()
    assert v1 > v0
    assert await store.table_endpoints() == [
        {
            "id": "shop",
            "url": "https://shop.example/h",
            "secret": "s1",
            "events": "*",
            "tenant": None,
            "enabled": 1,
            "max_concurrency": None,
            "headers": None,
            "description": "",
            "signature_schemes": "seed",
            "previous_secret": None,
            "previous_secret_expires_at": None,
        }
    ]
    assert await store.endpoints_version() == v1  # reading changes nothing

    app.upsert_endpoint(
        {
            "id": "shop",
            "url": "https://shop.example/h2",
            "secret": "s2",
            "events": '["booking.*"]',
            "tenant": "org_1",
            "enabled": 0,
            "max_concurrency": 3,
            "headers": '{"X-Team":"ops"}',
            "description": "the shop",
        }
    )
    v2 = await store.endpoints_version()
    assert v2 > v1
    app.upsert_endpoint({"id": "crm", "url": "https://crm.example/h", "secret": "s3"})
    v3 = await store.endpoints_version()
    assert v3 > v2
    rows = await store.table_endpoints()
    assert [r["id"] for r in rows] == ["crm", "shop"]
    assert rows[1] == {
        "id": "shop",
        "url": "https://shop.example/h2",
        "secret": "s2",
        "events": '["booking.*"]',
        "tenant": "org_1",
        "enabled": 0,
        "max_concurrency": 3,
        "headers": '{"X-Team":"ops"}',
        "description": "the shop",
        "signature_schemes": "seed",
        "previous_secret": None,
        "previous_secret_expires_at": None,
    }

    app.delete_endpoint("shop")
    v4 = await store.endpoints_version()
    assert v4 > v3
    assert [r["id"] for r in await store.table_endpoints()] == ["crm"]
    app.delete_endpoint("shop")  # nothing to delete: nothing changed
    assert await store.endpoints_version() == v4


# -- schema, lifecycle -------------------------------------------------------------------------


async def test_migrate_is_idempotent(harness: Harness) -> None:
    store = harness.store
    version = await store.schema_version()
    assert version >= 1
    [row] = booking(harness.app, 1)
    assert await store.migrate() == []
    assert await store.schema_version() == version
    result = await store.fan_out(planner(), BATCH, NOW)  # the data survived
    assert result.rows == 1
    assert await (await harness.another_store(migrate=False)).migrate() == []
    assert row >= 1


async def test_migrate_from_empty_applies_every_version_once(harness: Harness) -> None:
    fresh = Store(harness.make_empty())
    await fresh.open()
    harness.opened.append(fresh)
    assert await fresh.schema_version() == 0
    applied = await fresh.migrate()
    assert applied
    assert applied == sorted(applied)
    assert await fresh.schema_version() == applied[-1]
    assert await fresh.migrate() == []


async def test_operations_before_migrate_or_open_raise_storage_errors(harness: Harness) -> None:
    store = Store(harness.make_empty())
    with pytest.raises(StorageError, match="not open"):
        await store.ping()
    with pytest.raises(StorageError, match="not open"):
        await store.claim_due("a", NOW, 1)
    await store.open()
    harness.opened.append(store)
    assert await store.schema_version() == 0
    with pytest.raises(StorageError):
        await store.ping()  # readiness: a database without webhookd's tables is not ready
    with pytest.raises(StorageError):
        await store.fan_out(planner(), BATCH, NOW)
    with pytest.raises(StorageError):
        await store.claim_due("a", NOW, 1)
    with pytest.raises(StorageError):
        await store.endpoints_version()
    await store.migrate()
    await store.ping()
    await store.close()
    with pytest.raises(StorageError, match="not open"):
        await store.ping()


async def test_only_one_daemon_owns_a_database(harness: Harness) -> None:
    await harness.store.backend.claim_ownership()
    second = await harness.another_store()
    with pytest.raises(StoreLockedError):
        await second.backend.claim_ownership()
    await harness.store.close()
    harness.opened.remove(harness.store)
    await second.backend.claim_ownership()  # the first one let go when it closed


# -- test sends (`webhookd send-test`) --------------------------------------------------------


def sent_test_event(event_id: str = "evt_test_1", tenant: str | None = "org_1") -> Event:
    timestamp = "2024-01-15T10:00:00Z"
    return Event(
        outbox_id=0,  # ignored: a test event has no outbox row
        event_id=event_id,
        event_type="webhook.test",
        tenant=tenant,
        occurred_at=timestamp,
        body=b'{"event":"webhook.test","timestamp":"2024-01-15T10:00:00Z","data":{}}',
    )


def sent_test_outcome(
    state: DeliveryState, status: int | None = 200, result: AttemptResult = AttemptResult.SUCCESS
) -> AttemptOutcome:
    return AttemptOutcome(
        delivery_pk=0,  # ignored: the delivery is new
        attempt_no=1,
        started_at=NOW,
        duration_seconds=0.125,
        result=result,
        status_code=status,
        error=None if result is AttemptResult.SUCCESS else f"HTTP {status}",
        response_excerpt="ok" if status == 200 else "nope",
        new_state=state,
        next_attempt_at=None,
    )


async def test_a_test_send_is_recorded_as_a_final_delivery_with_its_attempt(
    harness: Harness,
) -> None:
    store = harness.store
    event = sent_test_event()
    await store.record_test_send(
        event, "a", "dlv_test_ok", sent_test_outcome(DeliveryState.SUCCEEDED)
    )
    await store.record_test_send(
        sent_test_event("evt_test_2", tenant=None),
        "b",
        "dlv_test_bad",
        sent_test_outcome(DeliveryState.FAILED, 401, AttemptResult.HTTP_ERROR),
    )

    ok = await store.get_delivery("dlv_test_ok")
    assert ok is not None
    assert (ok.endpoint_id, ok.event_id, ok.event_type, ok.tenant) == (
        "a",
        "evt_test_1",
        "webhook.test",
        "org_1",
    )
    assert (ok.state, ok.attempts, ok.next_attempt_at, ok.last_status, ok.last_error) == (
        "succeeded",
        1,
        None,
        200,
        None,
    )
    [attempt] = ok.attempt_log
    assert (attempt.attempt_no, attempt.started_at, attempt.duration_seconds) == (1, NOW, 0.125)
    assert (attempt.result, attempt.status_code, attempt.response_excerpt) == (
        "success",
        200,
        "ok",
    )

    bad = await store.get_delivery("dlv_test_bad")
    assert bad is not None
    assert (bad.state, bad.attempts, bad.last_status, bad.last_error) == (
        "failed",
        1,
        401,
        "HTTP 401",
    )
    assert [(a.result, a.status_code) for a in bad.attempt_log] == [("http_error", 401)]

    listed = await store.list_deliveries(DeliveryFilter())
    assert [d.delivery_id for d in listed] == ["dlv_test_bad", "dlv_test_ok"]  # newest first
    assert [d.delivery_id for d in await store.list_deliveries(DeliveryFilter(state="failed"))] == [
        "dlv_test_bad"
    ]
    # never retried: nothing pending, nothing due
    assert await store.pending_counts() == {}
    assert await store.claim_due("b", NOW + 1e6, 10) == []
    assert await store.next_due_at("b") is None


async def test_test_sends_and_fan_out_share_the_tables(harness: Harness) -> None:
    store = harness.store
    await store.record_test_send(
        sent_test_event(), "a", "dlv_test_1", sent_test_outcome(DeliveryState.SUCCEEDED)
    )
    booking(harness.app, 2)
    result = await store.fan_out(planner([EP_A]), BATCH, NOW)
    assert (result.events, result.deliveries, result.quarantined) == (2, 2, ())
    await store.record_test_send(
        sent_test_event("evt_test_2"), "a", "dlv_test_2", sent_test_outcome(DeliveryState.SUCCEEDED)
    )
    assert len(await store.claim_due("a", NOW, 10)) == 2  # only the fanned-out ones
    listed = await store.list_deliveries(DeliveryFilter(endpoint_id="a"))
    assert len(listed) == 4
    assert listed[0].delivery_id == "dlv_test_2"
    assert listed[-1].delivery_id == "dlv_test_1"


async def test_a_test_send_is_all_or_nothing(harness: Harness) -> None:
    store = harness.store
    await store.record_test_send(
        sent_test_event(), "a", "dlv_taken", sent_test_outcome(DeliveryState.FAILED)
    )
    # The delivery id is taken: nothing of this second send may stay behind, not even its event.
    with pytest.raises(StorageError):
        await store.record_test_send(
            sent_test_event("evt_test_2"),
            "a",
            "dlv_taken",
            sent_test_outcome(DeliveryState.SUCCEEDED),
        )
    await store.record_test_send(
        sent_test_event("evt_test_2"), "a", "dlv_free", sent_test_outcome(DeliveryState.SUCCEEDED)
    )
    taken = await store.get_delivery("dlv_taken")
    assert taken is not None
    assert (taken.event_id, taken.state, len(taken.attempt_log)) == ("evt_test_1", "failed", 1)
    assert len(await store.list_deliveries(DeliveryFilter())) == 2


async def test_a_test_send_outcome_must_be_final(harness: Harness) -> None:
    pending = replace(sent_test_outcome(DeliveryState.PENDING), next_attempt_at=NOW + 60)
    with pytest.raises(ValueError, match="never retried"):
        await harness.store.record_test_send(sent_test_event(), "a", "dlv_test_1", pending)
    assert await harness.store.list_deliveries(DeliveryFilter()) == []
