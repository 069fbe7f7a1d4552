"""One suite, every store backend: the in-memory backend must behave exactly like SQLite, and
PostgreSQL too, except where several replicas sharing one database must differ (leases outlive
a crashed replica until they expire; there is no single owner).

Each test gets a :class:`Harness`: a migrated ``Store`` plus ``app``, which plays the
application (plain ``sqlite3`` INSERTs into webhook_outbox / webhook_endpoints for SQLite,
``psycopg`` INSERTs for PostgreSQL, the memory backend's helpers otherwise), so the tests never
say which backend they run on.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import psycopg
import pytest
from postgres_fixtures import PostgresServer

from webhookd.dispatcher import plan_fanout
from webhookd.errors import StorageError, StoreLockedError
from webhookd.models import (
    AttemptOutcome,
    AttemptResult,
    Delivery,
    DeliveryFilter,
    DeliveryState,
    Endpoint,
    EndpointState,
    EndpointStatus,
    Event,
    FanoutPlan,
    NewDelivery,
    OutboxRow,
    OversizedPayload,
)
from webhookd.retention import PruneCounts, RetentionCutoffs
from webhookd.store.base import Planner, Store, StoreBackend
from webhookd.store.memory import ENDPOINT_COLUMNS, ENDPOINT_DEFAULTS, MemoryBackend
from webhookd.store.postgres import PostgresBackend
from webhookd.store.sqlite import SQLiteBackend

NOW = 1_700_000_000.0
# A notification reaches the listening connection a moment after the writer's commit returns.
NOTIFY_WAIT_SECONDS = 10.0
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


class SqlApp:
    """An application writing webhookd's database through a DB-API driver, autocommit: the
    standard library's sqlite3 (``?`` parameters) or psycopg (``%s``)."""

    def __init__(self, conn: Any, placeholder: str, *, text_only: bool = False) -> None:
        self.conn = conn
        self.mark = placeholder
        # A PostgreSQL TEXT column holds text: an application's driver sends bytes as text.
        self.text_only = text_only

    def _marks(self, n: int) -> str:
        return ", ".join([self.mark] * n)

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
        if self.text_only:
            values = {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}
        row = self.conn.execute(
            f"INSERT INTO webhook_outbox ({', '.join(values)}) "
            f"VALUES ({self._marks(len(values))}) RETURNING id",
            tuple(values.values()),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def delete_outbox(self, outbox_id: int) -> None:
        self.conn.execute(f"DELETE FROM webhook_outbox WHERE id = {self.mark}", (outbox_id,))

    def upsert_endpoint(self, row: Mapping[str, object]) -> None:
        values = {**ENDPOINT_DEFAULTS, **row}
        columns = [c for c in ENDPOINT_COLUMNS if c in values]
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != "id")
        self.conn.execute(
            f"INSERT INTO webhook_endpoints ({', '.join(columns)}) "
            f"VALUES ({self._marks(len(columns))}) "
            f"ON CONFLICT (id) DO UPDATE SET {updates}",
            tuple(values[c] for c in columns),
        )

    def delete_endpoint(self, endpoint_id: str) -> None:
        self.conn.execute(f"DELETE FROM webhook_endpoints WHERE id = {self.mark}", (endpoint_id,))

    def close(self) -> None:
        self.conn.close()


def sqlite_app(path: Path) -> SqlApp:
    """An application on the SQLite file at ``path`` (the standard library's sqlite3)."""
    return SqlApp(sqlite3.connect(path, timeout=10, isolation_level=None), "?")


def postgres_app(url: str) -> SqlApp:
    """An application on the PostgreSQL database at ``url`` (psycopg, synchronous)."""
    return SqlApp(psycopg.connect(url, autocommit=True), "%s", text_only=True)


def postgres_backend(url: str) -> PostgresBackend:
    # outbox_changed() says yes without a notification only after a minute: within a test,
    # only what was committed makes it say yes.
    return PostgresBackend(url, poll_fallback_seconds=60.0)


@dataclass
class Harness:
    kind: str
    store: Store
    app: App
    make_backend: Callable[[], StoreBackend]  # another backend on the same data
    make_empty: Callable[[], StoreBackend]  # a backend on a new, empty database
    opened: list[Store] = field(default_factory=list)
    # What the application's driver raises when a row breaks a constraint.
    integrity_error: type[Exception] = sqlite3.IntegrityError

    async def another_store(self, *, migrate: bool = True) -> Store:
        """A second store on the same database: a restarted or a second daemon."""
        store = Store(self.make_backend())
        await store.open()
        self.opened.append(store)
        if migrate:
            await store.migrate()
        return store


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    closers: list[Callable[[], None]] = []
    make_backend: Callable[[], StoreBackend]
    make_empty: Callable[[], StoreBackend]
    integrity_error: type[Exception] = sqlite3.IntegrityError
    if request.param == "memory":
        memory = MemoryBackend()
        make_backend = lambda: MemoryBackend(memory.database)  # noqa: E731
        make_empty = MemoryBackend
        backend: StoreBackend = memory
        app: App = memory
    elif request.param == "sqlite":
        path = tmp_path / "app.db"
        make_backend = lambda: SQLiteBackend(path)  # noqa: E731
        empties = iter(range(1_000_000))
        make_empty = lambda: SQLiteBackend(tmp_path / f"empty-{next(empties)}.db")  # noqa: E731
        backend = make_backend()
    else:
        url: str = request.getfixturevalue("postgres_url")
        server: PostgresServer = request.getfixturevalue("postgres_server")

        def make_empty() -> StoreBackend:
            name = server.create_database("t_empty")
            closers.append(lambda: server.drop_database(name))
            return postgres_backend(server.url(name))

        make_backend = lambda: postgres_backend(url)  # noqa: E731
        backend = make_backend()
        integrity_error = psycopg.errors.IntegrityError
    store = Store(backend)
    await store.open()
    await store.migrate()
    if request.param == "sqlite":
        lite = sqlite_app(tmp_path / "app.db")
        closers.insert(0, lite.close)
        app = lite
    elif request.param == "postgres":
        pg = postgres_app(url)
        closers.insert(0, pg.close)
        app = pg
    h = Harness(request.param, store, app, make_backend, make_empty, [store], integrity_error)
    yield h
    for s in h.opened:
        await s.close()
    for close in closers:
        close()


async def changed_soon(store: Store) -> bool:
    """outbox_changed(), asked again for a bounded while until it says yes: on PostgreSQL the
    notification of a commit reaches the listening connection a moment after the commit."""
    deadline = time.monotonic() + NOTIFY_WAIT_SECONDS
    while not await store.outbox_changed():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


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
    if harness.kind == "postgres":
        pytest.skip("PostgreSQL's TEXT holds text only: its UNIQUE refuses the second row")
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
    assert await changed_soon(store) is True
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
    """After a crash nothing stays leased: a restarted daemon sends in-flight deliveries again.
    On PostgreSQL the lease is in the database: another replica waits until it expires (see
    test_postgres_store), or until its holder closes, which frees it at once."""
    booking(harness.app, 1)
    await harness.store.fan_out(planner([EP_A]), BATCH, NOW)
    [claimed] = await harness.store.claim_due("a", NOW, 10)
    restarted = await harness.another_store()
    if harness.kind == "postgres":
        assert await restarted.claim_due("a", NOW, 10) == []
        await harness.store.close()
        harness.opened.remove(harness.store)
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
            "ca_bundle": None,
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
        "ca_bundle": None,
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
    if harness.kind == "postgres":
        await second.backend.claim_ownership()  # replicas share one PostgreSQL
        return
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


# -- retention ([retention]: prune, changes, checkpoint) --------------------------------------

FAR_FUTURE = 4_000_000_000.0  # a cutoff that every row is older than


def now_and_later() -> float:
    """The current time; what the store writes from here on is newer than it."""
    moment = time.time()
    while time.time() <= moment:
        pass
    return moment


def cutoffs(
    *, succeeded: float | None = None, failed: float | None = None, outbox: float | None = None
) -> RetentionCutoffs:
    return RetentionCutoffs(succeeded_before=succeeded, failed_before=failed, outbox_before=outbox)


async def prune(harness: Harness, cut: RetentionCutoffs, batch_size: int = BATCH) -> PruneCounts:
    return await harness.store.prune(cut, batch_size, pause_seconds=0)


async def deliver(harness: Harness, n: int, state: DeliveryState) -> list[Delivery]:
    """Fan ``n`` new events out to EP_A and record one attempt each, leaving them in ``state``
    (pending: retried only at FAR_FUTURE)."""
    booking(harness.app, n)
    await harness.store.fan_out(planner([EP_A]), BATCH, NOW)
    claimed = await harness.store.claim_due("a", NOW, n)
    assert len(claimed) == n
    if state is DeliveryState.SUCCEEDED:
        outcomes = [succeeded_attempt(d) for d in claimed]
    else:
        next_at = FAR_FUTURE if state is DeliveryState.PENDING else None
        outcomes = [failed_attempt(d, next_at=next_at, state=state) for d in claimed]
    await harness.store.record(outcomes, {})
    return claimed


async def test_prune_deletes_final_deliveries_with_their_attempts_after_retention(
    harness: Harness,
) -> None:
    store = harness.store
    [old_ok] = await deliver(harness, 1, DeliveryState.SUCCEEDED)
    [old_dead] = await deliver(harness, 1, DeliveryState.FAILED)
    [waiting] = await deliver(harness, 1, DeliveryState.PENDING)
    cut = now_and_later()
    [new_ok] = await deliver(harness, 1, DeliveryState.SUCCEEDED)
    [new_dead] = await deliver(harness, 1, DeliveryState.FAILED)

    counts = await prune(harness, cutoffs(succeeded=cut, failed=cut))

    assert (counts.deliveries_succeeded, counts.deliveries_failed, counts.attempts) == (1, 1, 2)
    assert (counts.events, counts.outbox, counts.quarantine) == (0, 0, 0)  # outbox: kept forever
    assert await store.get_delivery(old_ok.delivery_id) is None
    assert await store.get_delivery(old_dead.delivery_id) is None
    kept = {d.delivery_id for d in await store.list_deliveries(DeliveryFilter())}
    assert kept == {waiting.delivery_id, new_ok.delivery_id, new_dead.delivery_id}
    for delivery in (waiting, new_ok, new_dead):
        record = await store.get_delivery(delivery.delivery_id)
        assert record is not None
        assert len(record.attempt_log) == 1  # their attempts stay with them
    assert (await prune(harness, cutoffs(succeeded=cut, failed=cut))).total == 0


async def test_prune_keeps_each_final_state_for_its_own_period(harness: Harness) -> None:
    [ok] = await deliver(harness, 1, DeliveryState.SUCCEEDED)
    [dead] = await deliver(harness, 1, DeliveryState.FAILED)

    counts = await prune(harness, cutoffs(succeeded=FAR_FUTURE))  # dead letters: kept forever

    assert (counts.deliveries_succeeded, counts.deliveries_failed) == (1, 0)
    remaining = await harness.store.list_deliveries(DeliveryFilter())
    assert [d.delivery_id for d in remaining] == [dead.delivery_id]
    assert ok.delivery_id != dead.delivery_id


async def test_prune_never_touches_pending_deliveries_their_events_or_unprocessed_rows(
    harness: Harness,
) -> None:
    app, store = harness.app, harness.store
    [retrying] = await deliver(harness, 1, DeliveryState.PENDING)
    booking(app, 1)
    await store.fan_out(planner([EP_A]), BATCH, NOW)  # pending, never attempted
    app.insert_outbox("booking.created", '{"id":"late"}', occurred_at="2020-01-01T00:00:00Z")
    everything = cutoffs(succeeded=FAR_FUTURE, failed=FAR_FUTURE, outbox=FAR_FUTURE)

    counts = await prune(harness, everything)

    assert counts.outbox == 2  # the two fanned-out rows: their events keep the bodies
    assert counts.total == 2
    assert await store.pending_counts() == {"a": 2}
    due = await store.claim_due("a", FAR_FUTURE, 10)  # the events are still there to send
    assert len(due) == 2
    assert retrying.delivery_id in {d.delivery_id for d in due}
    assert all(b'"event":"booking.created"' in d.body for d in due)
    assert await store.oldest_unprocessed() == "2020-01-01T00:00:00Z"
    assert (await store.fan_out(planner([EP_A]), BATCH, NOW)).rows == 1


async def test_prune_deletes_events_once_they_have_no_deliveries_and_are_old(
    harness: Harness,
) -> None:
    app, store = harness.app, harness.store
    app.insert_outbox("booking.created", '{"id":"b1"}', event_id="evt_delivered")
    app.insert_outbox("payment.succeeded", '{"id":"p1"}', event_id="evt_unrouted")  # not EP_A's
    app.insert_outbox("booking.created", '{"id":"b2"}', event_id="evt_waiting")
    await store.fan_out(planner([EP_A]), BATCH, NOW)
    claimed = {d.event_id: d for d in await store.claim_due("a", NOW, 10)}
    await store.record(
        [
            succeeded_attempt(claimed["evt_delivered"]),
            failed_attempt(claimed["evt_waiting"], next_at=FAR_FUTURE),
        ],
        {},
    )
    app.insert_outbox("payment.succeeded", '{"id":"p2"}', event_id="evt_recent")
    await store.fan_out(planner([EP_A], NOW + 100), BATCH, NOW + 100)

    counts = await prune(harness, cutoffs(succeeded=FAR_FUTURE, outbox=NOW + 50))

    assert (counts.deliveries_succeeded, counts.events, counts.outbox) == (1, 2, 3)
    # An event id is recognised as a duplicate only while its event is kept.
    for event_id in ("evt_delivered", "evt_unrouted", "evt_waiting"):
        app.insert_outbox("payment.succeeded", '{"id":"again"}', event_id=event_id)
    result = await store.fan_out(planner([EP_A], NOW + 200), BATCH, NOW + 200)
    assert [(q.event_id, q.reason) for q in result.quarantined] == [
        ("evt_waiting", "duplicate_event_id")
    ]
    assert result.events == 2
    with pytest.raises(harness.integrity_error):  # evt_recent's outbox row is still there
        app.insert_outbox("payment.succeeded", "{}", event_id="evt_recent")


async def test_prune_deletes_processed_outbox_and_quarantine_rows_after_retention(
    harness: Harness,
) -> None:
    app, store = harness.app, harness.store
    booking(app, 1)
    app.insert_outbox("booking.created", "{not json")
    await store.fan_out(planner([EP_A]), BATCH, NOW)
    later_bad = app.insert_outbox("booking.created", "{not json either")
    booking(app, 1)
    await store.fan_out(planner([EP_A], NOW + 100), BATCH, NOW + 100)
    app.insert_outbox("booking.created", '{"id":"late"}', occurred_at="2020-01-01T00:00:00Z")

    counts = await prune(harness, cutoffs(outbox=NOW + 50))

    assert (counts.outbox, counts.quarantine, counts.events) == (2, 1, 0)  # events: pending
    assert [q.outbox_id for q in await store.list_quarantine(10)] == [later_bad]
    counts = await prune(harness, cutoffs(outbox=FAR_FUTURE))
    assert (counts.outbox, counts.quarantine) == (2, 1)
    assert await store.list_quarantine(10) == []
    assert await store.oldest_unprocessed() == "2020-01-01T00:00:00Z"  # not fanned out: kept
    assert (await store.fan_out(planner([EP_A]), BATCH, NOW + 200)).rows == 1


async def test_prune_deletes_in_transactions_of_batch_size_rows(harness: Harness) -> None:
    store = harness.store
    await deliver(harness, 25, DeliveryState.SUCCEEDED)
    backend = store.backend
    assert await backend.prune_deliveries(DeliveryState.SUCCEEDED, FAR_FUTURE, 10) == (10, 10)
    assert await backend.prune_outbox(FAR_FUTURE, 4) == 4

    counts = await prune(harness, cutoffs(succeeded=FAR_FUTURE, outbox=FAR_FUTURE), batch_size=10)

    assert counts.by_kind() == {
        "deliveries_succeeded": 15,
        "deliveries_failed": 0,
        "attempts": 15,
        "events": 25,
        "outbox": 21,
        "quarantine": 0,
    }
    # outbox 10 + 10 + 1, deliveries 10 + 5, events 10 + 10 + 5
    assert (counts.batches, counts.complete) == (8, True)
    assert await store.list_deliveries(DeliveryFilter()) == []
    assert await backend.prune_events(FAR_FUTURE, 0, 10) == (0, None)


async def test_a_stop_request_ends_a_prune_between_batches(harness: Harness) -> None:
    store = harness.store
    await deliver(harness, 3, DeliveryState.SUCCEEDED)
    stop = asyncio.Event()

    async def stop_after_the_first_batch() -> None:
        for _ in range(10_000):  # bounded: 10 s
            if len(await store.list_deliveries(DeliveryFilter())) < 3:
                break
            await asyncio.sleep(0.001)
        stop.set()

    stopper = asyncio.create_task(stop_after_the_first_batch())
    # The pause between batches is long: only the stop request can end it early.
    counts = await store.prune(cutoffs(succeeded=FAR_FUTURE), 1, pause_seconds=60, stop=stop)
    await stopper

    assert (counts.deliveries_succeeded, counts.batches, counts.complete) == (1, 1, False)
    assert len(await store.list_deliveries(DeliveryFilter())) == 2


async def test_changes_moves_on_every_commit_and_keeps_no_memory(harness: Harness) -> None:
    app, store = harness.app, harness.store
    await store.outbox_changed()
    first = await store.changes()
    assert await store.changes() == first

    booking(app, 1)
    by_app = await store.changes()
    assert by_app != first
    assert await store.changes() == by_app
    assert await changed_soon(store)  # watching changes() takes nothing from fan-out
    await store.fan_out(planner([EP_A]), BATCH, NOW)
    assert await store.changes() != by_app  # webhookd's own commits count too


async def test_a_checkpoint_after_writes_completes(harness: Harness) -> None:
    booking(harness.app, 5)
    await harness.store.fan_out(planner(), BATCH, NOW)
    for truncate in (False, True):
        result = await harness.store.checkpoint(truncate=truncate)
        assert (result.busy, result.done) == (False, True)


# -- administration (`webhookd endpoints|deliveries|events|stats`) ---------------------------

SHOP_ROW: Mapping[str, object] = {"id": "shop", "url": "https://shop.example/h", "secret": "s1"}


def attempt_outcome(
    d: Delivery,
    *,
    started_at: float,
    duration: float = 0.1,
    ok: bool = True,
    error: str = "HTTP 500",
    next_at: float | None = None,
) -> AttemptOutcome:
    """An attempt at ``started_at``: a success, else a failure that leaves the delivery pending
    until ``next_at`` (or failed for good without one)."""
    if ok:
        state = DeliveryState.SUCCEEDED
    else:
        state = DeliveryState.FAILED if next_at is None else DeliveryState.PENDING
    return AttemptOutcome(
        delivery_pk=d.pk,
        attempt_no=d.attempts + 1,
        started_at=started_at,
        duration_seconds=duration,
        result=AttemptResult.SUCCESS if ok else AttemptResult.HTTP_ERROR,
        status_code=200 if ok else 500,
        error=None if ok else error,
        response_excerpt=None,
        new_state=state,
        next_attempt_at=next_at,
    )


async def test_endpoint_rows_are_created_updated_and_removed(harness: Harness) -> None:
    store = harness.store
    v0 = await store.endpoints_version()
    assert await store.create_endpoint({**SHOP_ROW, "events": '["booking.*"]', "enabled": 0})
    # An existing id is refused and nothing is overwritten.
    assert not await store.create_endpoint({**SHOP_ROW, "url": "https://other.example/h"})
    [row] = await store.table_endpoints()
    assert row == {**ENDPOINT_DEFAULTS, **SHOP_ROW, "events": '["booking.*"]', "enabled": 0}
    v1 = await store.endpoints_version()
    assert v1 > v0  # a running daemon picks the new row up

    assert await store.update_endpoint({**row, "enabled": 1, "tenant": "org_1"})
    [row] = await store.table_endpoints()
    assert (row["enabled"], row["tenant"], row["url"]) == (1, "org_1", SHOP_ROW["url"])
    assert await store.endpoints_version() > v1
    assert not await store.update_endpoint({**SHOP_ROW, "id": "nope"})
    assert len(await store.table_endpoints()) == 1

    removal = await store.remove_endpoint("shop", force=False)
    assert (removal.found, removal.removed, removal.pending) == (True, True, 0)
    assert await store.table_endpoints() == []
    missing = await store.remove_endpoint("shop", force=True)
    assert (missing.found, missing.removed) == (False, False)


async def test_an_endpoint_with_pending_deliveries_is_removed_only_with_force(
    harness: Harness,
) -> None:
    store = harness.store
    await store.create_endpoint({**SHOP_ROW, "id": "a"})
    booking(harness.app, 2)
    await store.fan_out(planner([EP_A]), BATCH, NOW)

    refused = await store.remove_endpoint("a", force=False)
    assert (refused.found, refused.removed, refused.pending) == (True, False, 2)
    assert [r["id"] for r in await store.table_endpoints()] == ["a"]

    forced = await store.remove_endpoint("a", force=True)
    assert (forced.found, forced.removed, forced.pending) == (True, True, 2)
    assert await store.table_endpoints() == []
    assert await store.pending_counts() == {"a": 2}  # kept, not dropped


async def test_requeue_makes_a_dead_letter_due_with_a_fresh_schedule(harness: Harness) -> None:
    store = harness.store
    booking(harness.app, 2)
    await store.fan_out(planner([EP_A]), BATCH, NOW)
    dead, done = await store.claim_due("a", NOW, 10)
    await store.record(
        [failed_attempt(dead, next_at=None, state=DeliveryState.FAILED), succeeded_attempt(done)],
        {},
    )
    version = await store.requeued_version()
    later = NOW + 500

    changed = await store.requeue(
        [dead.delivery_id, done.delivery_id, "dlv_missing"], later, {"failed"}
    )

    assert changed == [dead.delivery_id]  # the succeeded one is not in the states asked for
    assert await store.requeued_version() != version
    rec = await store.get_delivery(dead.delivery_id)
    assert rec is not None
    assert (rec.state, rec.attempts, rec.next_attempt_at) == ("pending", 1, later)
    assert (rec.retried_at, rec.attempts_before_retry) == (later, 1)
    assert [a.attempt_no for a in rec.attempt_log] == [1]  # its history stays
    still_done = await store.get_delivery(done.delivery_id)
    assert still_done is not None
    assert still_done.state == "succeeded"
    assert await store.claim_due("a", later - 1, 10) == []

    [again] = await store.claim_due("a", later, 10)
    assert (again.pk, again.attempts, again.created_at) == (dead.pk, 1, NOW)
    assert (again.attempts_before_schedule, again.schedule_start) == (1, later)
    await store.record([failed_attempt(again, next_at=later + 5)], {})
    rec = await store.get_delivery(dead.delivery_id)
    assert rec is not None
    assert [a.attempt_no for a in rec.attempt_log] == [1, 2]  # attempt numbers go on

    version = await store.requeued_version()
    assert await store.requeue([done.delivery_id], later, {"failed"}) == []
    assert await store.requeued_version() == version  # nothing changed: no wake-up
    replay = await store.requeue([done.delivery_id], later, {"failed", "succeeded"})
    assert replay == [done.delivery_id]
    assert await store.pending_counts() == {"a": 2}


async def test_a_delivery_never_retried_keeps_its_original_schedule(harness: Harness) -> None:
    store = harness.store
    booking(harness.app, 1)
    await store.fan_out(planner([EP_A]), BATCH, NOW)
    [d] = await store.claim_due("a", NOW, 10)
    assert (d.attempts_before_schedule, d.schedule_started_at, d.schedule_start) == (0, None, NOW)
    [rec] = await store.list_deliveries(DeliveryFilter())
    assert (rec.retried_at, rec.attempts_before_retry) == (None, 0)


async def test_endpoint_health_over_a_window(harness: Harness) -> None:
    store = harness.store
    booking(harness.app, 20)
    await store.fan_out(planner([EP_A, EP_B]), BATCH, NOW)
    a_all = await store.claim_due("a", NOW, 100)
    b_all = await store.claim_due("b", NOW, 100)
    # a: durations 0.01 .. 0.20 s in the window; the last five fail for good.
    outcomes = [
        attempt_outcome(d, started_at=NOW + 100 + i, duration=(i + 1) / 100, ok=i < 15,
                        error=f"HTTP 500 #{i}")
        for i, d in enumerate(a_all)
    ]  # fmt: skip
    # b: one failure long before the window, then 18 fast and 2 slow successes in it.
    outcomes.append(
        attempt_outcome(b_all[0], started_at=NOW - 10_000, ok=False, error="refused", next_at=NOW)
    )
    outcomes += [
        attempt_outcome(d, started_at=NOW + 200 + i, duration=0.5 if i < 17 else 2.0)
        for i, d in enumerate(b_all[1:])
    ]
    await store.record(outcomes, {})
    [b_first] = await store.claim_due("b", NOW, 10)
    await store.record([attempt_outcome(b_first, started_at=NOW + 300, duration=0.5)], {})

    health = await store.endpoint_health(NOW)

    assert set(health) == {"a", "b"}
    a, b = health["a"], health["b"]
    assert (a.attempts, a.succeeded, a.success_rate) == (20, 15, 0.75)
    assert a.p95_seconds == 19 / 100  # nearest rank: the 19th of 20
    assert (a.last_error, a.last_error_status, a.last_error_at) == ("HTTP 500 #19", 500, NOW + 119)
    assert a.pending == 0
    assert (b.attempts, b.succeeded, b.p95_seconds) == (20, 20, 2.0)
    # The last error is reported even when it is older than the window.
    assert (b.last_error, b.last_error_at, b.pending) == ("refused", NOW - 10_000, 0)

    assert await store.endpoint_health(NOW + 1000) == {
        "a": replace(a, attempts=0, succeeded=0, p95_seconds=None),
        "b": replace(b, attempts=0, succeeded=0, p95_seconds=None),
    }


async def test_endpoint_health_counts_pending_deliveries_of_every_endpoint(
    harness: Harness,
) -> None:
    store = harness.store
    booking(harness.app, 3)
    await store.fan_out(planner([EP_A]), BATCH, NOW)
    [d, *_] = await store.claim_due("a", NOW, 10)
    await store.record([attempt_outcome(d, started_at=NOW, duration=0.25)], {})
    health = await store.endpoint_health(NOW)
    assert (health["a"].pending, health["a"].attempts, health["a"].p95_seconds) == (2, 1, 0.25)
    assert health["a"].last_error_at is None


async def test_list_deliveries_by_creation_time(harness: Harness) -> None:
    store = harness.store
    booking(harness.app, 1)
    await store.fan_out(planner([EP_A]), BATCH, NOW)
    booking(harness.app, 1)
    await store.fan_out(planner([EP_A]), BATCH, NOW + 100)

    def created(filters: DeliveryFilter) -> list[float]:
        return [d.created_at for d in listed[filters]]

    listed = {
        f: await store.list_deliveries(f)
        for f in (
            DeliveryFilter(since=NOW + 50),
            DeliveryFilter(until=NOW + 50),
            DeliveryFilter(since=NOW, until=NOW + 100),
            DeliveryFilter(since=NOW + 100, until=NOW + 100),
            DeliveryFilter(limit=-1),
        )
    }
    assert created(DeliveryFilter(since=NOW + 50)) == [NOW + 100]
    assert created(DeliveryFilter(until=NOW + 50)) == [NOW]
    assert created(DeliveryFilter(since=NOW, until=NOW + 100)) == [NOW]  # until is exclusive
    assert created(DeliveryFilter(since=NOW + 100, until=NOW + 100)) == []
    assert created(DeliveryFilter(limit=-1)) == [NOW + 100, NOW]


async def test_an_event_is_found_by_id_with_its_quarantined_and_waiting_rows(
    harness: Harness,
) -> None:
    app, store = harness.app, harness.store
    first = app.insert_outbox(
        "booking.created",
        '{"id":"b1"}',
        event_id="evt_1",
        tenant="org_1",
        occurred_at="2024-01-15T10:00:00Z",
    )
    bad = app.insert_outbox("booking.created", "{not json", event_id="evt_bad")
    await store.fan_out(planner(), BATCH, NOW)
    # The application pruned its outbox row, then wrote the same event id again.
    app.delete_outbox(first)
    again = app.insert_outbox("booking.created", '{"id":"b1"}', event_id="evt_1")
    waiting = app.insert_outbox("booking.created", '{"id":"b2"}', event_id="evt_later")

    event = await store.get_event("evt_1")
    assert event is not None
    assert (event.event_id, event.event_type, event.tenant) == ("evt_1", "booking.created", "org_1")
    assert (event.occurred_at, event.outbox_id, event.created_at) == (
        "2024-01-15T10:00:00Z",
        first,
        NOW,
    )
    assert await store.get_event("evt_bad") is None
    assert [(q.outbox_id, q.reason) for q in await store.quarantined_event("evt_bad")] == [
        (bad, "invalid_json")
    ]
    assert await store.unprocessed_outbox_id("evt_later") == waiting
    assert await store.unprocessed_outbox_id("evt_1") == again
    assert await store.unprocessed_outbox_id("evt_nope") is None

    await store.fan_out(planner(), BATCH, NOW + 1)
    assert await store.unprocessed_outbox_id("evt_later") is None
    assert await store.get_event("evt_later") is not None
    assert [(q.outbox_id, q.reason) for q in await store.quarantined_event("evt_1")] == [
        (again, "duplicate_event_id")
    ]
    assert await store.quarantined_event("evt_nope") == []


async def test_stats_backlog_rates_and_failures_by_endpoint(harness: Harness) -> None:
    app, store = harness.app, harness.store
    booking(app, 3)
    app.insert_outbox("Not A Type", "{}")
    await store.fan_out(planner([EP_A, EP_B]), BATCH, NOW)
    app.insert_outbox("booking.created", "{}", occurred_at="2024-01-15T10:00:00Z")
    app.insert_outbox("booking.created", "{}", occurred_at="2024-01-15T11:00:00Z")
    ok, dead, retrying = await store.claim_due("a", NOW, 10)
    [b_failed] = await store.claim_due("b", NOW, 1)
    await store.record(
        [
            attempt_outcome(ok, started_at=NOW + 10),
            attempt_outcome(dead, started_at=NOW + 11, ok=False),
            attempt_outcome(retrying, started_at=NOW + 12, ok=False, next_at=NOW + 100),
            attempt_outcome(b_failed, started_at=NOW - 5000, ok=False, next_at=NOW + 100),
        ],
        {},
    )

    stats = await store.stats(NOW + 50, NOW, 10)

    assert stats.since == NOW
    assert (stats.outbox_unprocessed, stats.oldest_unprocessed) == (2, "2024-01-15T10:00:00Z")
    assert (stats.pending, stats.due) == (4, 2)  # b's two untried ones are due
    assert (stats.attempts, stats.attempts_succeeded, stats.attempts_failed) == (3, 1, 2)
    assert (stats.deliveries_succeeded, stats.deliveries_failed) == (1, 1)
    assert stats.quarantined == 1
    assert stats.failures_by_endpoint == (("a", 2),)  # b's failure is older than the window

    wide = await store.stats(NOW + 50, NOW - 10_000, 10)
    assert wide.failures_by_endpoint == (("a", 2), ("b", 1))
    assert (await store.stats(NOW + 50, NOW - 10_000, 1)).failures_by_endpoint == (("a", 2),)
    later = await store.stats(NOW + 1000, NOW + 1000, 10)
    assert (later.due, later.attempts, later.quarantined) == (4, 0, 0)


async def test_an_endpoints_ca_bundle_is_read_from_its_column(harness: Harness) -> None:
    app, store = harness.app, harness.store
    app.upsert_endpoint({"id": "plain", "url": "https://a.example/h", "secret": "s"})
    app.upsert_endpoint(
        {
            "id": "internal",
            "url": "https://hooks.internal/h",
            "secret": "s",
            "ca_bundle": "/etc/webhookd/internal-ca.pem",
        }
    )
    rows = {r["id"]: r for r in await store.table_endpoints()}
    assert rows["internal"]["ca_bundle"] == "/etc/webhookd/internal-ca.pem"
    assert rows["plain"]["ca_bundle"] is None


# -- the circuit breaker's state (webhookd_endpoint_state) and error kinds ---------------------


def breaker_state(endpoint_id: str, status: EndpointStatus, **extra: object) -> EndpointState:
    values: dict[str, object] = {"since": NOW, "updated_at": NOW + 1, **extra}
    return EndpointState(endpoint_id, status, **values)  # type: ignore[arg-type]


async def test_endpoint_states_are_saved_replaced_and_kept_for_the_next_daemon(
    harness: Harness,
) -> None:
    store = harness.store
    assert await store.endpoint_states() == {}
    backing_off = breaker_state(
        "a",
        EndpointStatus.BACKING_OFF,
        reason="5 consecutive failures, the last: HTTP 500",
        consecutive_failures=5,
        failing_since=NOW - 60,
        paused_until=NOW + 30.5,
        cooldown_level=2,
    )
    gone = breaker_state(
        "b",
        EndpointStatus.DISABLED,
        reason="410 Gone",
        consecutive_failures=1,
        failing_since=NOW,
        disabled_reason="410 Gone",
    )
    version = await store.endpoints_version()
    await store.save_endpoint_state(backing_off)
    await store.save_endpoint_state(gone)
    assert await store.endpoint_states() == {"a": backing_off, "b": gone}

    recovered = breaker_state("a", EndpointStatus.OK, since=NOW + 40, updated_at=NOW + 40)
    await store.save_endpoint_state(recovered)
    restarted = await harness.another_store()
    assert await restarted.endpoint_states() == {"a": recovered, "b": gone}
    assert await store.endpoints_version() == version  # the daemon's own writes: no reload


async def test_a_disabled_state_can_disable_the_table_row_in_the_same_write(
    harness: Harness,
) -> None:
    app, store = harness.app, harness.store
    app.upsert_endpoint({"id": "a", "url": "https://a.example/h", "secret": "s"})
    app.upsert_endpoint({"id": "b", "url": "https://b.example/h", "secret": "s"})
    version = await store.endpoints_version()

    await store.save_endpoint_state(breaker_state("a", EndpointStatus.DISABLED), disable_row=True)
    await store.save_endpoint_state(breaker_state("b", EndpointStatus.DISABLED))

    enabled = {r["id"]: r["enabled"] for r in await store.table_endpoints()}
    assert enabled == {"a": 0, "b": 1}
    assert await store.endpoints_version() == version + 1  # the row's update trigger
    # Saving it again changes nothing more; a config endpoint (no row) is only a state row.
    await store.save_endpoint_state(breaker_state("a", EndpointStatus.DISABLED), disable_row=True)
    await store.save_endpoint_state(breaker_state("cfg", EndpointStatus.DISABLED), disable_row=True)
    assert await store.endpoints_version() == version + 1
    assert set(await store.endpoint_states()) == {"a", "b", "cfg"}


async def test_clearing_an_endpoint_state_wakes_a_running_daemon(harness: Harness) -> None:
    store = harness.store
    gone = breaker_state("a", EndpointStatus.DISABLED, disabled_reason="410 Gone")
    await store.save_endpoint_state(gone)
    version = await store.endpoints_version()
    daemon = await harness.another_store()

    assert await store.clear_endpoint_state("a") == gone
    assert await daemon.endpoints_version() == version + 1
    assert await daemon.endpoint_states() == {}
    assert await store.clear_endpoint_state("a") is None  # nothing to clear: nothing written
    assert await store.clear_endpoint_state("never-seen") is None
    assert await daemon.endpoints_version() == version + 1


async def test_attempts_keep_their_error_kind(harness: Harness) -> None:
    app, store = harness.app, harness.store
    booking(app, 1)
    await store.fan_out(planner(), BATCH, NOW)
    [d] = await store.claim_due("a", NOW, 10)
    outcome = replace(
        failed_attempt(d, next_at=NOW + 5),
        status_code=None,
        result=AttemptResult.NETWORK_ERROR,
        error="DNS lookup failed for hooks.example: Name or service not known",
        error_kind="dns",
    )
    await store.record([outcome], {d.pk: "a"})
    await store.record_test_send(
        sent_test_event(),
        "b",
        "dlv_test_kind",
        replace(
            sent_test_outcome(DeliveryState.FAILED, 302, AttemptResult.HTTP_ERROR),
            error_kind="redirect",
        ),
    )

    [listed] = await store.list_deliveries(DeliveryFilter(endpoint_id="a"))
    shown = await store.get_delivery(listed.delivery_id)
    assert shown is not None
    assert [(a.result, a.error_kind) for a in shown.attempt_log] == [("network_error", "dns")]
    test_send = await store.get_delivery("dlv_test_kind")
    assert test_send is not None
    assert [a.error_kind for a in test_send.attempt_log] == ["redirect"]
    [succeeded] = await store.claim_due("b", NOW, 10)
    await store.record([succeeded_attempt(succeeded)], {succeeded.pk: "b"})
    [done] = await store.list_deliveries(DeliveryFilter(endpoint_id="b", state="succeeded"))
    ok = await store.get_delivery(done.delivery_id)
    assert ok is not None
    assert [a.error_kind for a in ok.attempt_log] == [None]


async def test_before_planning_runs_after_the_rows_are_read_and_before_planning(
    harness: Harness,
) -> None:
    # The dispatcher reloads endpoints there, so that an endpoint committed before an event is
    # routed to even when both commits land between two polls.
    app, store = harness.app, harness.store
    booking(app, 2)
    calls: list[str] = []

    async def before() -> None:
        calls.append("before")

    def recording(rows: Sequence[OutboxRow]) -> FanoutPlan:
        calls.append(f"plan {len(rows)}")
        return planner()(rows)

    await store.fan_out(recording, BATCH, NOW, before_planning=before)
    await store.fan_out(recording, BATCH, NOW, before_planning=before)  # nothing new: no call
    assert calls == ["before", "plan 2"]
