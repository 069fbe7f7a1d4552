"""An in-memory store backend for unit tests (as procrastinate ships ``InMemoryConnector``).

It behaves like :class:`~webhookd.store.sqlite.SQLiteBackend`: the outbox is followed with a
cursor, fan-out is all-or-nothing, leases live in the backend object, a terminal delivery state is
final, and ``endpoints_version`` moves on every change to the endpoints table. The shared
integration suite ``tests/integration/test_store_contract.py`` runs against both.

The "database file" is a :class:`MemoryDatabase`; several backends may share one (a restart, or a
second daemon). Tests play the application's part with :meth:`MemoryBackend.insert_outbox`,
:meth:`MemoryBackend.upsert_endpoint` and :meth:`MemoryBackend.delete_endpoint`::

    backend = MemoryBackend()
    await backend.open()
    await backend.migrate()
    backend.insert_outbox("booking.created", '{"id":"book_1"}', tenant="org_1")
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from webhookd.errors import StorageError, StoreLockedError
from webhookd.models import (
    AttemptOutcome,
    AttemptRecord,
    Delivery,
    DeliveryFilter,
    DeliveryRecord,
    DeliveryState,
    EndpointHealth,
    EndpointRemoval,
    EndpointState,
    Event,
    EventRecord,
    FanoutResult,
    OutboxRow,
    OversizedPayload,
    PlannedEvent,
    QuarantineRecord,
    StoreStats,
)
from webhookd.retention import CheckpointResult
from webhookd.store.base import (
    ENDPOINT_ROW_COLUMNS,
    ENDPOINT_ROW_DEFAULTS,
    Planner,
    decode_outbox_value,
    load_migrations,
    split_duplicates,
)

if TYPE_CHECKING:
    from webhookd.store.base import StoreBackend

T = TypeVar("T")

# The columns of webhook_endpoints that table_endpoints() returns, with the schema's defaults
# (one definition, shared with the admin commands).
ENDPOINT_COLUMNS = ENDPOINT_ROW_COLUMNS
ENDPOINT_DEFAULTS = ENDPOINT_ROW_DEFAULTS
_ENDPOINT_REQUIRED = ("id", "url", "secret")
_INTEGER_COLUMNS = frozenset({"enabled", "max_concurrency"})

# An outbox value as SQLite stores it in a TEXT column: text, a BLOB, or NULL.
OutboxValue = str | bytes | None


@dataclass(slots=True)
class _OutboxEntry:
    id: int
    event_type: OutboxValue
    payload: OutboxValue
    event_id: OutboxValue
    tenant: OutboxValue
    occurred_at: OutboxValue


@dataclass(slots=True)
class _EventEntry:
    pk: int
    outbox_id: int | None  # None for a test event (`webhookd send-test`)
    event_id: str
    event_type: str
    tenant: str | None
    occurred_at: str
    body: bytes
    created_at: float


@dataclass(slots=True)
class _DeliveryEntry:
    pk: int
    delivery_id: str
    event_pk: int
    endpoint_id: str
    state: str
    attempts: int
    next_attempt_at: float | None
    created_at: float
    updated_at: float
    last_status: int | None = None
    last_error: str | None = None
    schedule_started_at: float | None = None  # set by requeue (`webhookd deliveries retry`)
    attempts_before_schedule: int = 0


@dataclass(slots=True)
class _AttemptEntry:
    id: int
    delivery_pk: int
    record: AttemptRecord


@dataclass
class MemoryDatabase:
    """The tables of one database. Share it between backends to simulate a restart."""

    schema: dict[int, str] = field(default_factory=dict)
    outbox: dict[int, _OutboxEntry] = field(default_factory=dict)
    outbox_seq: int = 0  # AUTOINCREMENT: ids are never reused, even after a delete
    endpoints: dict[str, dict[str, object]] = field(default_factory=dict)
    cursor: int = 0
    endpoints_version: int = 0
    requeued_version: int = 0
    events: dict[int, _EventEntry] = field(default_factory=dict)
    deliveries: dict[int, _DeliveryEntry] = field(default_factory=dict)
    attempts: list[_AttemptEntry] = field(default_factory=list)
    quarantine: dict[int, QuarantineRecord] = field(default_factory=dict)
    endpoint_states: dict[str, EndpointState] = field(default_factory=dict)
    data_version: int = 0  # bumped by every commit, like PRAGMA data_version
    owner: object | None = None  # the backend that claimed ownership

    @property
    def migrated(self) -> bool:
        return bool(self.schema)

    def commit(self) -> None:
        self.data_version += 1

    def require_table(self, table: str) -> None:
        if not self.migrated:
            raise sqlite3.OperationalError(f"no such table: {table}")


class MemoryBackend:
    """A :class:`~webhookd.store.base.StoreBackend` kept in memory. Open and migrate it as you
    would the SQLite backend; until then its operations raise StorageError the same way."""

    def __init__(self, database: MemoryDatabase | None = None) -> None:
        self.database = MemoryDatabase() if database is None else database
        self.description = "memory"
        self.recheck_seconds: float | None = None
        self._open = False
        self._data_version: int | None = None
        self._leased: dict[str, set[int]] = {}
        self._lease_endpoint: dict[int, str] = {}

    # -- the application's side (test helpers) ----------------------------------------------

    def insert_outbox(
        self,
        event_type: str | bytes,
        payload: str | bytes,
        *,
        event_id: str | bytes | int | None = None,
        tenant: str | bytes | int | None = None,
        occurred_at: str | bytes | None = None,
    ) -> int:
        """INSERT a row into webhook_outbox as an application would (committed at once); its id.

        ``occurred_at=None`` leaves the column out, so the schema's default (now, UTC) applies.
        bytes are stored as a BLOB, as sqlite3 does. Raises ``sqlite3.IntegrityError`` for a
        repeated ``event_id``, as the UNIQUE column does.
        """
        db = self.database
        db.require_table("webhook_outbox")
        if event_type is None or payload is None:
            column = "event_type" if event_type is None else "payload"
            raise sqlite3.IntegrityError(f"NOT NULL constraint failed: webhook_outbox.{column}")
        stored_event_id = _text_affinity(event_id)
        if stored_event_id is not None and any(
            row.event_id == stored_event_id for row in db.outbox.values()
        ):
            raise sqlite3.IntegrityError("UNIQUE constraint failed: webhook_outbox.event_id")
        db.outbox_seq += 1
        db.outbox[db.outbox_seq] = _OutboxEntry(
            id=db.outbox_seq,
            event_type=event_type,
            payload=payload,
            event_id=stored_event_id,
            tenant=_text_affinity(tenant),
            occurred_at=_sqlite_now() if occurred_at is None else occurred_at,
        )
        db.commit()
        return db.outbox_seq

    def delete_outbox(self, outbox_id: int) -> None:
        """DELETE an outbox row (an application pruning rows webhookd has processed)."""
        self.database.require_table("webhook_outbox")
        if self.database.outbox.pop(outbox_id, None) is not None:
            self.database.commit()

    def upsert_endpoint(self, row: Mapping[str, object]) -> None:
        """INSERT or UPDATE a webhook_endpoints row; absent columns take the schema's defaults."""
        db = self.database
        db.require_table("webhook_endpoints")
        unknown = set(row) - set(ENDPOINT_COLUMNS)
        if unknown:
            raise ValueError(f"webhook_endpoints has no column(s) {sorted(unknown)}")
        values = {**ENDPOINT_DEFAULTS, **row}
        for column in _ENDPOINT_REQUIRED:
            if values.get(column) is None:
                raise sqlite3.IntegrityError(
                    f"NOT NULL constraint failed: webhook_endpoints.{column}"
                )
        for column in _INTEGER_COLUMNS:
            values[column] = _integer_affinity(values[column])
        db.endpoints[str(values["id"])] = {c: values[c] for c in ENDPOINT_COLUMNS}
        db.endpoints_version += 1  # the insert or the update trigger
        db.commit()

    def delete_endpoint(self, endpoint_id: str) -> None:
        """DELETE a webhook_endpoints row (nothing happens when there is none)."""
        db = self.database
        db.require_table("webhook_endpoints")
        if db.endpoints.pop(endpoint_id, None) is not None:
            db.endpoints_version += 1  # the delete trigger
            db.commit()

    # -- connections -------------------------------------------------------------------------

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        if self.database.owner is self:
            self.database.owner = None
        self._open = False

    async def claim_ownership(self) -> None:
        if self.database.owner is not None:
            raise StoreLockedError(
                "another webhookd daemon is already running on this in-memory database"
            )
        self.database.owner = self

    def _db(self, op: str) -> MemoryDatabase:
        """The database, for an operation that needs the store open and migrated."""
        if not self._open:
            raise StorageError("the store is not open")
        if not self.database.migrated:
            raise StorageError(f"{op} failed on memory: no such table (run `webhookd migrate`)")
        return self.database

    # -- schema ------------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        if not self._open:
            raise StorageError("the store is not open")
        db = self.database
        applied = []
        for version, name, _sql in load_migrations("sqlite"):
            if version not in db.schema:
                db.schema[version] = name
                applied.append(version)
        if applied:
            db.commit()
        return applied

    async def schema_version(self) -> int:
        if not self._open:
            raise StorageError("the store is not open")
        return max(self.database.schema, default=0)

    async def ping(self) -> None:
        self._db("ping")  # like SQLite's, it reads a webhookd table: fails before migrate

    # -- outbox ------------------------------------------------------------------------------

    async def outbox_changed(self) -> bool:
        if not self._open:
            raise StorageError("the store is not open")
        version = self.database.data_version
        changed = version != self._data_version
        self._data_version = version
        return changed

    def _unprocessed(self, db: MemoryDatabase, limit: int) -> list[_OutboxEntry]:
        rows = sorted((r for r in db.outbox.values() if r.id > db.cursor), key=lambda r: r.id)
        return _limited(rows, limit)

    async def fan_out(
        self,
        planner: Planner,
        limit: int,
        now: float,
        *,
        max_payload_bytes: int | None = None,
        before_planning: Callable[[], Awaitable[None]] | None = None,
    ) -> FanoutResult:
        db = self._db("read outbox")
        cursor = db.cursor
        rows = [
            OutboxRow(
                r.id,
                decode_outbox_value(r.event_type),
                _payload(r.payload, max_payload_bytes),
                decode_outbox_value(r.event_id),
                decode_outbox_value(r.tenant),
                decode_outbox_value(r.occurred_at),
            )
            for r in self._unprocessed(db, limit)
        ]
        if not rows:
            return FanoutResult()
        if before_planning is not None:
            await before_planning()
        plan = planner(rows)
        if db.cursor != cursor:
            raise StorageError("the outbox cursor moved under this daemon: is another running?")
        planned, duplicates = split_duplicates(
            plan.events, {e.event_id for e in db.events.values()}
        )
        quarantined = (*plan.quarantined, *duplicates)
        _check_unique(db, planned)  # before changing anything: the write is all-or-nothing
        deliveries = _insert_events(db, planned, now)
        for q in quarantined:
            db.quarantine[q.outbox_id] = QuarantineRecord(
                q.outbox_id, q.reason, q.detail, q.event_type, q.event_id, now
            )
        db.cursor = rows[-1].id
        db.commit()
        return FanoutResult(
            rows=len(rows),
            events=len(planned),
            deliveries=deliveries,
            quarantined=quarantined,
            endpoints=frozenset(d.endpoint_id for p in planned for d in p.deliveries),
        )

    async def oldest_unprocessed(self) -> str | None:
        db = self._db("read outbox")
        rows = self._unprocessed(db, 1)
        if not rows:
            return None
        value = decode_outbox_value(rows[0].occurred_at)
        return value if isinstance(value, str) else ""

    # -- endpoints ---------------------------------------------------------------------------

    async def endpoints_version(self) -> int:
        return self._db("read endpoints version").endpoints_version

    async def table_endpoints(self) -> list[Mapping[str, object]]:
        db = self._db("read endpoints")
        return [dict(db.endpoints[key]) for key in sorted(db.endpoints)]

    async def rotate_secret(self, endpoint_id: str, secret: str, expires_at: str) -> bool:
        db = self._db("rotate secret")
        row = db.endpoints.get(endpoint_id)
        if row is None:
            return False
        row["previous_secret"], row["secret"] = row["secret"], secret
        row["previous_secret_expires_at"] = expires_at
        db.endpoints_version += 1  # the update trigger
        db.commit()
        return True

    # -- deliveries --------------------------------------------------------------------------

    def _pending_unleased(self, db: MemoryDatabase, endpoint_id: str) -> list[_DeliveryEntry]:
        leased = self._leased.get(endpoint_id, set())
        return sorted(
            (
                d
                for d in db.deliveries.values()
                if d.endpoint_id == endpoint_id
                and d.state == DeliveryState.PENDING
                and d.pk not in leased
                and d.next_attempt_at is not None
            ),
            key=lambda d: (d.next_attempt_at, d.pk),
        )

    def take_woken_endpoints(self) -> set[str]:
        return set()  # no other daemon shares this store

    async def claim_due(
        self, endpoint_id: str, now: float, limit: int, *, cap: int | None = None
    ) -> list[Delivery]:
        db = self._db("claim deliveries")
        due = [
            d
            for d in self._pending_unleased(db, endpoint_id)
            if d.next_attempt_at is not None and d.next_attempt_at <= now
        ]
        leased = self._leased.setdefault(endpoint_id, set())
        out = []
        for d in _limited(due, limit):
            e = db.events[d.event_pk]
            out.append(
                Delivery(
                    pk=d.pk,
                    delivery_id=d.delivery_id,
                    endpoint_id=d.endpoint_id,
                    event_id=e.event_id,
                    event_type=e.event_type,
                    occurred_at=e.occurred_at,
                    body=e.body,
                    attempts=d.attempts,
                    created_at=d.created_at,
                    attempts_before_schedule=d.attempts_before_schedule,
                    schedule_started_at=d.schedule_started_at,
                )
            )
            leased.add(d.pk)
            self._lease_endpoint[d.pk] = endpoint_id
        return out

    async def next_due_at(self, endpoint_id: str) -> float | None:
        pending = self._pending_unleased(self._db("read schedule"), endpoint_id)
        return pending[0].next_attempt_at if pending else None

    async def record(self, outcomes: Sequence[AttemptOutcome]) -> None:
        if not outcomes:
            return
        db = self._db("record attempts")
        now = time.time()
        next_id = max((a.id for a in db.attempts), default=0)
        for o in outcomes:
            next_id += 1
            db.attempts.append(
                _AttemptEntry(
                    next_id,
                    o.delivery_pk,
                    AttemptRecord(
                        o.attempt_no,
                        o.started_at,
                        o.duration_seconds,
                        o.result.value,
                        o.status_code,
                        o.error,
                        o.response_excerpt,
                        o.error_kind,
                    ),
                )
            )
        for o in outcomes:
            d = db.deliveries.get(o.delivery_pk)
            if d is None or d.state != DeliveryState.PENDING:
                continue  # a terminal state is final
            d.state = o.new_state.value
            d.attempts = o.attempt_no
            d.next_attempt_at = o.next_attempt_at
            d.updated_at = now
            d.last_status = o.status_code
            d.last_error = o.error
        db.commit()
        self._end_leases(o.delivery_pk for o in outcomes)

    async def release(self, delivery_pks: Sequence[int]) -> None:
        self._end_leases(delivery_pks)

    async def record_test_send(
        self, event: Event, endpoint_id: str, delivery_id: str, outcome: AttemptOutcome
    ) -> None:
        db = self._db("record test send")
        # The UNIQUE constraints, checked before anything changes: the write is all-or-nothing.
        if any(e.event_id == event.event_id for e in db.events.values()):
            raise StorageError(
                "record test send failed on memory: UNIQUE constraint failed: "
                "webhookd_events.event_id"
            )
        if any(d.delivery_id == delivery_id for d in db.deliveries.values()):
            raise StorageError(
                "record test send failed on memory: UNIQUE constraint failed: "
                "webhookd_deliveries.delivery_id"
            )
        now = time.time()
        event_pk = max(db.events, default=0) + 1
        db.events[event_pk] = _EventEntry(
            pk=event_pk,
            outbox_id=None,
            event_id=event.event_id,
            event_type=event.event_type,
            tenant=event.tenant,
            occurred_at=event.occurred_at,
            body=event.body,
            created_at=now,
        )
        delivery_pk = max(db.deliveries, default=0) + 1
        db.deliveries[delivery_pk] = _DeliveryEntry(
            pk=delivery_pk,
            delivery_id=delivery_id,
            event_pk=event_pk,
            endpoint_id=endpoint_id,
            state=outcome.new_state.value,
            attempts=outcome.attempt_no,
            next_attempt_at=None,
            created_at=now,
            updated_at=now,
            last_status=outcome.status_code,
            last_error=outcome.error,
        )
        db.attempts.append(
            _AttemptEntry(
                max((a.id for a in db.attempts), default=0) + 1,
                delivery_pk,
                AttemptRecord(
                    outcome.attempt_no,
                    outcome.started_at,
                    outcome.duration_seconds,
                    outcome.result.value,
                    outcome.status_code,
                    outcome.error,
                    outcome.response_excerpt,
                    outcome.error_kind,
                ),
            )
        )
        db.commit()

    def _end_leases(self, pks: Iterable[int]) -> None:
        for pk in pks:
            endpoint_id = self._lease_endpoint.pop(pk, None)
            if endpoint_id is not None:
                self._leased[endpoint_id].discard(pk)

    async def pending_counts(self) -> dict[str, int]:
        db = self._db("count pending")
        counts: dict[str, int] = {}
        for d in db.deliveries.values():
            if d.state == DeliveryState.PENDING:
                counts[d.endpoint_id] = counts.get(d.endpoint_id, 0) + 1
        return dict(sorted(counts.items()))

    # -- the circuit breaker -----------------------------------------------------------------

    async def endpoint_states(self) -> dict[str, EndpointState]:
        db = self._db("read endpoint states")
        return dict(sorted(db.endpoint_states.items()))

    async def save_endpoint_state(self, state: EndpointState, *, disable_row: bool) -> None:
        db = self._db("save endpoint state")
        db.endpoint_states[state.endpoint_id] = state
        row = db.endpoints.get(state.endpoint_id)
        if disable_row and row is not None and row["enabled"] != 0:
            row["enabled"] = 0
            db.endpoints_version += 1  # the update trigger
        db.commit()

    async def clear_endpoint_state(self, endpoint_id: str) -> EndpointState | None:
        db = self._db("clear endpoint state")
        cleared = db.endpoint_states.pop(endpoint_id, None)
        if cleared is not None:
            db.endpoints_version += 1
            db.commit()
        return cleared

    async def list_deliveries(self, filters: DeliveryFilter) -> list[DeliveryRecord]:
        return self._deliveries(self._db("list deliveries"), filters, None)

    def _deliveries(
        self, db: MemoryDatabase, f: DeliveryFilter, delivery_id: str | None
    ) -> list[DeliveryRecord]:
        out = []
        for d in sorted(db.deliveries.values(), key=lambda d: d.pk, reverse=True):
            e = db.events[d.event_pk]
            if (
                (f.state is None or d.state == f.state)
                and (f.endpoint_id is None or d.endpoint_id == f.endpoint_id)
                and (f.event_type is None or e.event_type == f.event_type)
                and (f.event_id is None or e.event_id == f.event_id)
                and (f.tenant is None or e.tenant == f.tenant)
                and (delivery_id is None or d.delivery_id == delivery_id)
                and (f.since is None or d.created_at >= f.since)
                and (f.until is None or d.created_at < f.until)
            ):
                out.append(
                    DeliveryRecord(
                        delivery_id=d.delivery_id,
                        endpoint_id=d.endpoint_id,
                        event_id=e.event_id,
                        event_type=e.event_type,
                        tenant=e.tenant,
                        state=d.state,
                        attempts=d.attempts,
                        created_at=d.created_at,
                        updated_at=d.updated_at,
                        next_attempt_at=(
                            d.next_attempt_at if d.state == DeliveryState.PENDING else None
                        ),
                        last_status=d.last_status,
                        last_error=d.last_error,
                        retried_at=d.schedule_started_at,
                        attempts_before_retry=d.attempts_before_schedule,
                    )
                )
        return _limited(out, f.limit)

    async def get_delivery(self, delivery_id: str) -> DeliveryRecord | None:
        db = self._db("find delivery")
        found = [d for d in db.deliveries.values() if d.delivery_id == delivery_id]
        if not found:
            return None
        record = self._deliveries(db, DeliveryFilter(limit=1), delivery_id)[0]
        attempts = sorted(
            (a for a in db.attempts if a.delivery_pk == found[0].pk),
            key=lambda a: (a.record.attempt_no, a.id),
        )
        return replace(record, attempt_log=tuple(a.record for a in attempts))

    async def list_quarantine(self, limit: int) -> list[QuarantineRecord]:
        db = self._db("list quarantine")
        return _limited([db.quarantine[k] for k in sorted(db.quarantine, reverse=True)], limit)

    # -- retention ---------------------------------------------------------------------------

    async def prune_deliveries(
        self, state: DeliveryState, updated_before: float, limit: int
    ) -> tuple[int, int]:
        db = self._db(f"prune {state.value} deliveries")
        old = sorted(
            (
                d
                for d in db.deliveries.values()
                if d.state == state and d.updated_at < updated_before
            ),
            key=lambda d: (d.updated_at, d.pk),
        )
        pks = {d.pk for d in _limited(old, limit)}
        if not pks:
            return 0, 0
        kept = [a for a in db.attempts if a.delivery_pk not in pks]
        attempts = len(db.attempts) - len(kept)
        db.attempts = kept
        for pk in pks:
            del db.deliveries[pk]
        db.commit()
        return len(pks), attempts

    async def prune_events(
        self, created_before: float, after_pk: int, limit: int
    ) -> tuple[int, int | None]:
        db = self._db("find prunable events")
        # As in SQLite: the scan stops at the first event fanned out since created_before.
        recent = [
            (e.created_at, e.pk) for e in db.events.values() if e.created_at >= created_before
        ]
        bound = min(recent)[1] if recent else math.inf
        with_deliveries = {d.event_pk for d in db.deliveries.values()}
        found = _limited(
            sorted(
                pk
                for pk, e in db.events.items()
                if after_pk < pk < bound
                and e.created_at < created_before
                and pk not in with_deliveries
            ),
            limit,
        )
        if not found:
            return 0, None
        for pk in found:
            del db.events[pk]
        db.commit()
        return len(found), found[-1] if len(found) >= limit else None

    async def prune_outbox(self, processed_before: float, limit: int) -> int:
        db = self._db("prune outbox")
        # As in SQLite: below the first row fanned out since processed_before, up to the cursor.
        events = [
            (e.created_at, e.pk, e.outbox_id)
            for e in db.events.values()
            if e.created_at >= processed_before and e.outbox_id is not None
        ]
        quarantined = [
            (q.quarantined_at, q.outbox_id)
            for q in db.quarantine.values()
            if q.quarantined_at >= processed_before
        ]
        firsts = [min(events)[2]] if events else []
        firsts += [min(quarantined)[1]] if quarantined else []
        horizon = min(firsts, default=math.inf)
        ids = _limited(sorted(i for i in db.outbox if i <= db.cursor and i < horizon), limit)
        for outbox_id in ids:
            del db.outbox[outbox_id]
        if ids:
            db.commit()
        return len(ids)

    async def prune_quarantine(self, quarantined_before: float, limit: int) -> int:
        db = self._db("prune quarantine")
        old = _limited(
            sorted(
                (q.quarantined_at, q.outbox_id)
                for q in db.quarantine.values()
                if q.quarantined_at < quarantined_before
            ),
            limit,
        )
        for _, outbox_id in old:
            del db.quarantine[outbox_id]
        if old:
            db.commit()
        return len(old)

    async def changes(self) -> int:
        if not self._open:
            raise StorageError("the store is not open")
        return self.database.data_version

    async def checkpoint(self, *, truncate: bool) -> CheckpointResult:
        if not self._open:
            raise StorageError("the store is not open")
        return CheckpointResult("passive", busy=False, wal_frames=0, checkpointed_frames=0)

    # -- administration ----------------------------------------------------------------------

    async def create_endpoint(self, row: Mapping[str, object]) -> bool:
        db = self._db("create endpoint")
        if str(row["id"]) in db.endpoints:
            return False
        self.upsert_endpoint(row)
        return True

    async def update_endpoint(self, row: Mapping[str, object]) -> bool:
        db = self._db("update endpoint")
        if str(row["id"]) not in db.endpoints:
            return False
        self.upsert_endpoint(row)
        return True

    async def remove_endpoint(self, endpoint_id: str, *, force: bool) -> EndpointRemoval:
        db = self._db("remove endpoint")
        if endpoint_id not in db.endpoints:
            return EndpointRemoval(found=False, removed=False, pending=0)
        pending = (await self.pending_counts()).get(endpoint_id, 0)
        if pending and not force:
            return EndpointRemoval(found=True, removed=False, pending=pending)
        self.delete_endpoint(endpoint_id)
        return EndpointRemoval(found=True, removed=True, pending=pending)

    async def endpoint_health(self, since: float) -> dict[str, EndpointHealth]:
        db = self._db("read endpoint health")
        durations: dict[str, list[float]] = {}
        succeeded: dict[str, int] = {}
        last_error: dict[str, AttemptRecord] = {}
        for a in db.attempts:
            ep_id = db.deliveries[a.delivery_pk].endpoint_id
            r = a.record
            if r.started_at >= since:
                durations.setdefault(ep_id, []).append(r.duration_seconds)
                succeeded[ep_id] = succeeded.get(ep_id, 0) + (r.result == "success")
            if r.result != "success":
                latest = last_error.get(ep_id)
                if latest is None or r.started_at > latest.started_at:
                    last_error[ep_id] = r
        pending = await self.pending_counts()
        out: dict[str, EndpointHealth] = {}
        for ep_id in set(durations) | set(last_error) | set(pending):
            times = sorted(durations.get(ep_id, []))
            err = last_error.get(ep_id)
            out[ep_id] = EndpointHealth(
                endpoint_id=ep_id,
                attempts=len(times),
                succeeded=succeeded.get(ep_id, 0),
                p95_seconds=_nearest_rank_p95(times),
                last_error=err.error if err else None,
                last_error_status=err.status_code if err else None,
                last_error_at=err.started_at if err else None,
                pending=pending.get(ep_id, 0),
            )
        return dict(sorted(out.items()))

    async def requeue(
        self, delivery_ids: Sequence[str], now: float, states: Collection[str]
    ) -> list[str]:
        db = self._db("retry deliveries")
        wanted = set(delivery_ids)
        changed = []
        for d in db.deliveries.values():
            if d.delivery_id in wanted and d.state in states:
                d.state = DeliveryState.PENDING.value
                d.next_attempt_at = now
                d.schedule_started_at = now
                d.attempts_before_schedule = d.attempts
                d.updated_at = now
                changed.append(d.delivery_id)
        if changed:
            db.requeued_version += 1
            db.commit()
        return changed

    async def requeued_version(self) -> int:
        return self._db("read requeue version").requeued_version

    async def get_event(self, event_id: str) -> EventRecord | None:
        db = self._db("find event")
        for e in db.events.values():
            if e.event_id == event_id:
                return EventRecord(
                    e.event_id, e.event_type, e.tenant, e.occurred_at, e.outbox_id, e.created_at
                )
        return None

    async def quarantined_event(self, event_id: str) -> list[QuarantineRecord]:
        db = self._db("find quarantined event")
        return [q for _, q in sorted(db.quarantine.items()) if q.event_id == event_id]

    async def unprocessed_outbox_id(self, event_id: str) -> int | None:
        db = self._db("find outbox row")
        for row in self._unprocessed(db, -1):
            if row.event_id == event_id:
                return row.id
        return None

    async def stats(self, now: float, since: float, top: int) -> StoreStats:
        db = self._db("read stats")
        pending = [d for d in db.deliveries.values() if d.state == DeliveryState.PENDING]
        recent = [a for a in db.attempts if a.record.started_at >= since]
        ok = sum(1 for a in recent if a.record.result == "success")
        failures: dict[str, int] = {}
        for a in recent:
            if a.record.result != "success":
                ep_id = db.deliveries[a.delivery_pk].endpoint_id
                failures[ep_id] = failures.get(ep_id, 0) + 1

        def settled(state: DeliveryState) -> int:
            return sum(
                1 for d in db.deliveries.values() if d.state == state and d.updated_at >= since
            )

        return StoreStats(
            since=since,
            outbox_unprocessed=len(self._unprocessed(db, -1)),
            oldest_unprocessed=await self.oldest_unprocessed(),
            pending=len(pending),
            due=sum(
                1 for d in pending if d.next_attempt_at is not None and d.next_attempt_at <= now
            ),
            attempts=len(recent),
            attempts_succeeded=ok,
            attempts_failed=len(recent) - ok,
            deliveries_succeeded=settled(DeliveryState.SUCCEEDED),
            deliveries_failed=settled(DeliveryState.FAILED),
            quarantined=sum(1 for q in db.quarantine.values() if q.quarantined_at >= since),
            failures_by_endpoint=tuple(
                _limited(sorted(failures.items(), key=lambda kv: (-kv[1], kv[0])), top)
            ),
        )


def _check_unique(db: MemoryDatabase, planned: Iterable[PlannedEvent]) -> None:
    """The UNIQUE constraints the SQLite schema enforces on what fan-out writes."""
    outbox_ids = {e.outbox_id for e in db.events.values()}
    delivery_ids = {d.delivery_id for d in db.deliveries.values()}
    for p in planned:
        if p.event.outbox_id in outbox_ids:
            raise StorageError(
                "fan out failed on memory: UNIQUE constraint failed: webhookd_events.outbox_id"
            )
        outbox_ids.add(p.event.outbox_id)
        for d in p.deliveries:
            if d.delivery_id in delivery_ids:
                raise StorageError(
                    "fan out failed on memory: UNIQUE constraint failed: "
                    "webhookd_deliveries.delivery_id"
                )
            delivery_ids.add(d.delivery_id)


def _insert_events(db: MemoryDatabase, planned: Iterable[PlannedEvent], now: float) -> int:
    """Insert the events and their pending deliveries; return how many deliveries."""
    event_pk = max(db.events, default=0)
    delivery_pk = max(db.deliveries, default=0)
    count = 0
    for p in planned:
        e = p.event
        event_pk += 1
        db.events[event_pk] = _EventEntry(
            pk=event_pk,
            outbox_id=e.outbox_id,
            event_id=e.event_id,
            event_type=e.event_type,
            tenant=e.tenant,
            occurred_at=e.occurred_at,
            body=e.body,
            created_at=now,
        )
        for d in p.deliveries:
            delivery_pk += 1
            count += 1
            db.deliveries[delivery_pk] = _DeliveryEntry(
                pk=delivery_pk,
                delivery_id=d.delivery_id,
                event_pk=event_pk,
                endpoint_id=d.endpoint_id,
                state=DeliveryState.PENDING.value,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
            )
    return count


def _payload(value: OutboxValue, max_bytes: int | None) -> object:
    """As SQLite reads it: a payload over the limit is replaced by its size."""
    if max_bytes is not None and isinstance(value, str | bytes):
        size = len(value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value)
        if size > max_bytes:
            return OversizedPayload(size)
    return decode_outbox_value(value)


def _nearest_rank_p95(ordered: Sequence[float]) -> float | None:
    """The value at 1-based position ceil(0.95 n) of ``ordered`` (as the SQLite query does)."""
    if not ordered:
        return None
    position = -(-len(ordered) * 95 // 100)
    return ordered[position - 1]


def _limited(items: list[T], limit: int) -> list[T]:
    """SQL ``LIMIT``: a negative limit means no limit."""
    return items if limit < 0 else items[:limit]


def _text_affinity(value: str | bytes | int | None) -> OutboxValue:
    """What a TEXT column stores: numbers become their text, BLOBs and NULL stay as they are."""
    if isinstance(value, int):
        return str(int(value))
    return value


def _integer_affinity(value: object) -> object:
    """What an INTEGER column stores: booleans and integer-looking text become integers."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return value
    return value


def _sqlite_now() -> str:
    """``strftime('%Y-%m-%dT%H:%M:%fZ', 'now')``: UTC with milliseconds."""
    moment = datetime.now(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


if TYPE_CHECKING:
    _backend: StoreBackend = MemoryBackend()
