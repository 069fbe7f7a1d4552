"""The embedded SQLite backend (aiosqlite). I/O only: policy lives above the store interface.

Two connections: a writer for short ``BEGIN IMMEDIATE`` transactions (serialised by a lock) and
a reader for autocommit queries, so no read transaction is ever held across network I/O. WAL
lets the application's writers and our readers proceed together. Leases are kept in memory:
an exclusive lock file guarantees that one daemon owns the database (see :mod:`webhookd.daemon`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

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
    QuarantineRecord,
    StoreStats,
)
from webhookd.retention import CheckpointResult
from webhookd.store import rows as rows_mod
from webhookd.store.base import (
    ENDPOINT_ROW_COLUMNS,
    Planner,
    decode_outbox_value,
    load_migrations,
    load_queries,
    split_duplicates,
)

T = TypeVar("T")

BUSY_RETRY_ATTEMPTS = 8
BUSY_RETRY_MAX_SECONDS = 60.0
_Q = load_queries("sqlite")


def _is_busy(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _busy_retrying() -> AsyncRetrying:
    """Transient "database is locked" errors are waited out, never fatal on the first try."""
    return AsyncRetrying(
        retry=retry_if_exception(_is_busy),
        stop=stop_after_attempt(BUSY_RETRY_ATTEMPTS) | stop_after_delay(BUSY_RETRY_MAX_SECONDS),
        wait=wait_random_exponential(multiplier=0.05, max=2.0),
        reraise=True,
    )


async def on_connection_thread(
    conn: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]
) -> T:
    """Run ``fn`` with the sqlite3 connection on aiosqlite's thread for it, in one hand-over.

    A transaction of several statements then costs one thread wake-up and one event-loop turn
    instead of one per statement, and holds the file's write lock only as long as SQLite works
    (a delivery's concurrency slot waits for its outcome's commit). aiosqlite has no public
    name for this; ``_execute`` and ``_conn`` are what its own methods use, and
    tests/unit/test_sqlite_thread.py fails should a release rename them.
    """
    result = await conn._execute(lambda: fn(conn._conn))  # type: ignore[no-untyped-call]
    return cast(T, result)


def _in_transaction(conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = body(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    return result


class SQLiteBackend:
    def __init__(self, path: Path, *, busy_timeout_seconds: float = 5.0) -> None:
        self.path = Path(path)
        self.description = f"sqlite:{self.path}"
        self.recheck_seconds: float | None = None  # one daemon owns the file (lock file)
        self._busy_timeout = busy_timeout_seconds
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        # Counting every pending delivery reads the whole index (0.3 s with a million): on its
        # own connection, claims and polls do not wait behind it.
        self._counter: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._data_version: int | None = None
        self._leased: dict[str, set[int]] = {}
        self._lease_endpoint: dict[int, str] = {}
        self._lock_fd: int | None = None

    # -- connections -------------------------------------------------------------------------

    async def open(self) -> None:
        if not self.path.parent.is_dir():
            raise StorageError(
                f"cannot open database {str(self.path)!r}: directory "
                f"{str(self.path.parent)!r} does not exist; create it or fix database.path"
            )
        self._create_group_writable()
        try:
            self._writer = await self._connect()
            await self._writer.execute_fetchall("PRAGMA journal_mode = WAL")
            self._reader = await self._connect()
            self._counter = await self._connect()
        except sqlite3.Error as exc:
            await self.close()
            raise StorageError(f"cannot open database {str(self.path)!r}: {exc}") from exc

    def _create_group_writable(self) -> None:
        """Create a missing database file 0660 (less the umask): the application shares it
        through a group, and SQLite gives the -wal and -shm files the database file's mode.
        SQLite alone would create it 0644 less the umask, which the group cannot write."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o660)
        except FileExistsError:
            return
        except OSError as exc:
            raise StorageError(
                f"cannot create database {str(self.path)!r}: {exc.strerror or exc}"
            ) from exc
        os.close(fd)  # an empty file is a new, empty database to SQLite

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        try:
            # Row-returning statements are always fetched to the end: a half-read statement
            # would keep its read lock.
            await conn.execute_fetchall(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            await conn.execute_fetchall("PRAGMA synchronous = NORMAL")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def claim_ownership(self) -> None:
        """Take an exclusive lock file beside the database: leases live in this process's
        memory, so a second daemon on the same file would send everything twice."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o660)
        except OSError as exc:
            raise StorageError(
                f"cannot create lock file {str(lock_path)!r}: {exc.strerror}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreLockedError(
                f"another webhookd daemon is already running on {self.path} "
                f"(it holds {lock_path}); run one daemon per SQLite database"
            ) from None
        self._lock_fd = fd

    async def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        for conn in (self._counter, self._reader, self._writer):
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    await conn.close()
        self._counter = self._reader = self._writer = None

    @property
    def _r(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StorageError("the store is not open")
        return self._reader

    @property
    def _w(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise StorageError("the store is not open")
        return self._writer

    async def _read(self, op: str, sql: str, params: Any = (), *, slow: bool = False) -> list[Any]:
        """One autocommit query, fetched to the end; retried while the file is busy.
        ``slow``: on the connection for long counts, not the one claims use."""
        conn = self._r
        if slow and self._counter is not None:
            conn = self._counter
        try:
            try:  # the first try without the retry machinery: the file is rarely busy
                return list(await conn.execute_fetchall(sql, params))
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
            async for attempt in _busy_retrying():
                with attempt:
                    return list(await conn.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise StorageError(f"{op} failed on {self.path}: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _transaction(self, op: str, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body`` in ``BEGIN IMMEDIATE`` … ``COMMIT`` on the writer's thread, retrying
        while the file is locked."""
        try:
            try:  # the first try without the retry machinery: the file is rarely locked
                return await self._transaction_once(body)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
            async for attempt in _busy_retrying():
                with attempt:
                    return await self._transaction_once(body)
        except sqlite3.Error as exc:
            hint = " (the database stayed locked; is a writer holding a long transaction?)"
            raise StorageError(
                f"{op} failed on {self.path}: {exc}{hint if _is_busy(exc) else ''}"
            ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _transaction_once(self, body: Callable[[sqlite3.Connection], T]) -> T:
        async with self._write_lock:
            return await on_connection_thread(self._w, lambda conn: _in_transaction(conn, body))

    # -- schema ------------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        migrations = load_migrations("sqlite")

        def apply(conn: sqlite3.Connection) -> list[int]:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS webhookd_schema ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            done = {row[0] for row in conn.execute("SELECT version FROM webhookd_schema")}
            applied = []
            for version, name, sql in migrations:
                if version in done:
                    continue
                for statement in _split_statements(sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO webhookd_schema (version, name, applied_at) VALUES (?, ?, ?)",
                    (version, name, time.time()),
                )
                applied.append(version)
            return applied

        return await self._transaction("migrate", apply)

    async def schema_version(self) -> int:
        try:
            rows = await self._r.execute_fetchall("SELECT MAX(version) FROM webhookd_schema")
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return 0
            raise StorageError(f"reading the schema version failed: {exc}") from exc
        value = next(iter(rows))[0]
        return int(value or 0)

    async def ping(self) -> None:
        # Reads a page of the file: "SELECT 1" would succeed even with the file gone bad.
        await self._read("ping", _Q["get_cursor"])

    # -- outbox ------------------------------------------------------------------------------

    async def outbox_changed(self) -> bool:
        rows = await self._read("poll", "PRAGMA data_version")
        version = int(rows[0][0])
        changed = version != self._data_version
        self._data_version = version
        return changed

    async def _cursor(self) -> int:
        rows = await self._read("read cursor", _Q["get_cursor"])
        if not rows:
            raise StorageError("webhookd_state has no outbox cursor: run `webhookd migrate`")
        return int(rows[0][0])

    async def fan_out(
        self,
        planner: Planner,
        limit: int,
        now: float,
        *,
        max_payload_bytes: int | None = None,
        before_planning: Callable[[], Awaitable[None]] | None = None,
    ) -> FanoutResult:
        cursor = await self._cursor()
        raw = await self._read(
            "read outbox",
            _Q["read_outbox"],
            {"after": cursor, "limit": limit, "max_payload": max_payload_bytes},
        )
        if not raw:
            return FanoutResult()
        rows = [
            OutboxRow(
                int(r[0]),
                decode_outbox_value(r[1]),
                OversizedPayload(r[6])
                if r[2] is None and r[6] is not None
                else decode_outbox_value(r[2]),
                decode_outbox_value(r[3]),
                decode_outbox_value(r[4]),
                decode_outbox_value(r[5]),
            )
            for r in raw
        ]
        if before_planning is not None:
            await before_planning()
        plan = planner(rows)
        new_cursor = rows[-1].id

        def write(conn: sqlite3.Connection) -> FanoutResult:
            planned = list(plan.events)
            quarantined = list(plan.quarantined)
            ids = json.dumps([p.event.event_id for p in planned])
            existing = {r[0] for r in conn.execute(_Q["existing_event_ids"], {"ids": ids})}
            planned, duplicates = split_duplicates(planned, existing)
            quarantined += duplicates
            first_pk = next(iter(conn.execute(_Q["max_event_pk"])))[0] + 1
            event_rows = []
            delivery_rows = []
            for offset, p in enumerate(planned):
                e = p.event
                pk = first_pk + offset
                event_rows.append(
                    (
                        pk,
                        e.outbox_id,
                        e.event_id,
                        e.event_type,
                        e.tenant,
                        e.occurred_at,
                        e.body,
                        now,
                    )
                )
                delivery_rows += [
                    (d.delivery_id, pk, d.endpoint_id, now, now, now) for d in p.deliveries
                ]
            if event_rows:
                conn.executemany(_Q["insert_event"], event_rows)
            if delivery_rows:
                conn.executemany(_Q["insert_delivery"], delivery_rows)
            if quarantined:
                conn.executemany(
                    _Q["insert_quarantine"],
                    [
                        (q.outbox_id, q.reason, q.detail, q.event_type, q.event_id, now)
                        for q in quarantined
                    ],
                )
            moved = conn.execute(_Q["advance_cursor"], {"new": new_cursor, "old": cursor})
            if moved.rowcount != 1:
                raise StorageError(
                    "the outbox cursor moved under this daemon: is another webhookd running on "
                    f"{self.path}?"
                )
            return FanoutResult(
                rows=len(rows),
                events=len(event_rows),
                deliveries=len(delivery_rows),
                quarantined=tuple(quarantined),
                endpoints=frozenset(d.endpoint_id for p in planned for d in p.deliveries),
            )

        return await self._transaction("fan out", write)

    async def oldest_unprocessed(self) -> str | None:
        cursor = await self._cursor()
        rows = await self._read("read outbox", _Q["oldest_unprocessed"], {"after": cursor})
        if not rows:
            return None
        value = decode_outbox_value(rows[0][0])
        return value if isinstance(value, str) else ""

    # -- endpoints ---------------------------------------------------------------------------

    async def endpoints_version(self) -> int:
        rows = await self._read("read endpoints version", _Q["endpoints_version"])
        return int(rows[0][0]) if rows else 0

    async def table_endpoints(self) -> list[Mapping[str, object]]:
        rows = await self._read("read endpoints", _Q["table_endpoints"])
        # The query selects exactly these columns, in this order.
        return [dict(zip(ENDPOINT_ROW_COLUMNS, row, strict=True)) for row in rows]

    async def rotate_secret(self, endpoint_id: str, secret: str, expires_at: str) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                _Q["rotate_secret"], {"id": endpoint_id, "secret": secret, "expires_at": expires_at}
            )
            return bool(cursor.rowcount)

        return await self._transaction("rotate secret", write)

    # -- deliveries --------------------------------------------------------------------------

    def take_woken_endpoints(self) -> set[str]:
        return set()  # no other daemon shares this store

    async def claim_due(
        self, endpoint_id: str, now: float, limit: int, *, cap: int | None = None
    ) -> list[Delivery]:
        leased = self._leased.setdefault(endpoint_id, set())
        rows = await self._read(
            "claim deliveries",
            _Q["claim_due"],
            {
                "endpoint": endpoint_id,
                "now": now,
                "leased": json.dumps(sorted(leased)),
                "limit": limit,
            },
        )
        out = []
        for r in rows:
            delivery = rows_mod.claimed_delivery(r)
            leased.add(delivery.pk)
            self._lease_endpoint[delivery.pk] = endpoint_id
            out.append(delivery)
        return out

    async def next_due_at(self, endpoint_id: str) -> float | None:
        leased = self._leased.get(endpoint_id, set())
        rows = await self._read(
            "read schedule",
            _Q["next_due"],
            {"endpoint": endpoint_id, "leased": json.dumps(sorted(leased))},
        )
        return float(rows[0][0]) if rows else None

    async def record(self, outcomes: Sequence[AttemptOutcome]) -> None:
        if not outcomes:
            return
        now = time.time()

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(
                _Q["insert_attempt"],
                [
                    (
                        o.delivery_pk,
                        o.attempt_no,
                        o.started_at,
                        o.duration_seconds,
                        o.result.value,
                        o.status_code,
                        o.error,
                        o.response_excerpt,
                        o.error_kind,
                    )
                    for o in outcomes
                ],
            )
            conn.executemany(
                _Q["update_delivery"],
                [
                    (
                        o.new_state.value,
                        o.attempt_no,
                        o.next_attempt_at,
                        now,
                        o.status_code,
                        o.error,
                        o.delivery_pk,
                    )
                    for o in outcomes
                ],
            )

        await self._transaction("record attempts", write)
        self._end_leases(o.delivery_pk for o in outcomes)

    async def release(self, delivery_pks: Sequence[int]) -> None:
        self._end_leases(delivery_pks)

    async def record_test_send(
        self, event: Event, endpoint_id: str, delivery_id: str, outcome: AttemptOutcome
    ) -> None:
        now = time.time()

        def write(conn: sqlite3.Connection) -> None:
            event_row = conn.execute(
                _Q["insert_test_event"], rows_mod.send_test_event_params(event, now)
            )
            delivery_row = conn.execute(
                _Q["insert_test_delivery"],
                {
                    "delivery_id": delivery_id,
                    "event_pk": event_row.lastrowid,
                    "endpoint_id": endpoint_id,
                    "state": outcome.new_state.value,
                    "attempts": outcome.attempt_no,
                    "now": now,
                    "last_status": outcome.status_code,
                    "last_error": outcome.error,
                },
            )
            conn.execute(
                _Q["insert_attempt"],
                (
                    delivery_row.lastrowid,
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

        await self._transaction("record test send", write)

    def _end_leases(self, pks: Any) -> None:
        for pk in pks:
            endpoint_id = self._lease_endpoint.pop(pk, None)
            if endpoint_id is not None:
                self._leased[endpoint_id].discard(pk)

    async def pending_counts(self) -> dict[str, int]:
        rows = await self._read("count pending", _Q["pending_counts"], slow=True)
        return {str(r[0]): int(r[1]) for r in rows}

    # -- the circuit breaker -----------------------------------------------------------------

    async def endpoint_states(self) -> dict[str, EndpointState]:
        rows = await self._read("read endpoint states", _Q["endpoint_states"])
        return {str(r[0]): rows_mod.endpoint_state(r) for r in rows}

    async def save_endpoint_state(self, state: EndpointState, *, disable_row: bool) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(_Q["save_endpoint_state"], rows_mod.endpoint_state_params(state))
            if disable_row:
                conn.execute(_Q["disable_endpoint_row"], {"id": state.endpoint_id})

        await self._transaction("save endpoint state", write)

    async def clear_endpoint_state(self, endpoint_id: str) -> EndpointState | None:
        def write(conn: sqlite3.Connection) -> EndpointState | None:
            rows = list(conn.execute(_Q["clear_endpoint_state"], {"id": endpoint_id}))
            if not rows:
                return None
            conn.execute(_Q["bump_endpoints_version"])
            return rows_mod.endpoint_state(rows[0])

        return await self._transaction("clear endpoint state", write)

    async def list_deliveries(self, filters: DeliveryFilter) -> list[DeliveryRecord]:
        return await self._deliveries(filters, None)

    async def _deliveries(self, f: DeliveryFilter, delivery_id: str | None) -> list[DeliveryRecord]:
        params = rows_mod.delivery_filter_params(f, delivery_id)
        rows = await self._read("list deliveries", _Q["list_deliveries"], params)
        return [rows_mod.delivery_record(r) for r in rows]

    async def get_delivery(self, delivery_id: str) -> DeliveryRecord | None:
        found = await self._read(
            "find delivery",
            "SELECT id FROM webhookd_deliveries WHERE delivery_id = ?",
            (delivery_id,),
        )
        if not found:
            return None
        records = await self._deliveries(DeliveryFilter(limit=1), delivery_id)
        attempts = await self._read("list attempts", _Q["list_attempts"], {"pk": found[0][0]})
        return replace(records[0], attempt_log=tuple(AttemptRecord(*a) for a in attempts))

    async def list_quarantine(self, limit: int) -> list[QuarantineRecord]:
        rows = await self._read("list quarantine", _Q["list_quarantine"], {"limit": limit})
        return [QuarantineRecord(*r) for r in rows]

    # -- retention ---------------------------------------------------------------------------

    # The rows to delete are found on the reader, outside any transaction: a pass with nothing
    # to delete takes no lock, and reading past rows that must stay (events kept by their dead
    # letters) never holds the lock the application writes with. The delete checks again.

    async def prune_deliveries(
        self, state: DeliveryState, updated_before: float, limit: int
    ) -> tuple[int, int]:
        params: dict[str, object] = {"state": state.value, "before": updated_before}
        found = await self._read(
            f"prune {state.value} deliveries", _Q["prunable_deliveries"], {**params, "limit": limit}
        )
        if not found:
            return 0, 0
        params["pks"] = json.dumps([r[0] for r in found])

        def delete(conn: sqlite3.Connection) -> tuple[int, int]:
            attempts = conn.execute(_Q["delete_attempts_of"], params)
            deliveries = conn.execute(_Q["delete_deliveries"], params)
            return deliveries.rowcount, attempts.rowcount

        return await self._transaction(f"prune {state.value} deliveries", delete)

    async def prune_events(
        self, created_before: float, after_pk: int, limit: int
    ) -> tuple[int, int | None]:
        found = await self._read(
            "prune events",
            _Q["prunable_events"],
            {"before": created_before, "after": after_pk, "limit": limit},
        )
        if not found:
            return 0, None
        pks = [int(r[0]) for r in found]
        deleted = await self._delete_found("prune events", "delete_events", pks, created_before)
        return deleted, pks[-1] if len(pks) >= limit else None

    async def prune_outbox(self, processed_before: float, limit: int) -> int:
        return await self._prune("prune outbox", "outbox", processed_before, limit)

    async def prune_quarantine(self, quarantined_before: float, limit: int) -> int:
        return await self._prune("prune quarantine", "quarantine", quarantined_before, limit)

    async def _prune(self, op: str, table: str, before: float, limit: int) -> int:
        found = await self._read(op, _Q[f"prunable_{table}"], {"before": before, "limit": limit})
        if not found:
            return 0
        return await self._delete_found(op, f"delete_{table}", [r[0] for r in found], before)

    async def _delete_found(self, op: str, query: str, pks: list[Any], before: float) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(_Q[query], {"pks": json.dumps(pks), "before": before})
            return cursor.rowcount

        return await self._transaction(op, delete)

    async def changes(self) -> int:
        rows = await self._read("read data version", "PRAGMA data_version")
        return int(rows[0][0])

    async def checkpoint(self, *, truncate: bool) -> CheckpointResult:
        try:
            async with self._write_lock:
                conn = self._w
                rows = await conn.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")
                busy, frames, copied = (int(v) for v in next(iter(rows)))
                mode = "passive"
                # An empty -wal file needs no truncating (and TRUNCATE would count as a change).
                if truncate and frames >= 0 and copied == frames and self._wal_bytes():
                    mode = "truncate"
                    busy = await self._truncate_wal(conn)
        except sqlite3.Error as exc:
            raise StorageError(f"checkpoint failed on {self.path}: {exc}") from exc
        return CheckpointResult(mode, bool(busy), frames, copied, self._wal_bytes())

    async def _truncate_wal(self, conn: aiosqlite.Connection) -> int:
        """TRUNCATE waits for the application's readers while holding the write lock; with no
        busy timeout it never keeps the application's writers waiting: it reports busy."""
        await conn.execute_fetchall("PRAGMA busy_timeout = 0")
        try:
            rows = await conn.execute_fetchall("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            restore = f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}"
            await asyncio.shield(conn.execute_fetchall(restore))
        return int(next(iter(rows))[0])

    def _wal_bytes(self) -> int | None:
        try:
            return os.stat(f"{self.path}-wal").st_size
        except FileNotFoundError:
            return None

    # -- administration ----------------------------------------------------------------------

    async def create_endpoint(self, row: Mapping[str, object]) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(_Q["create_endpoint"], dict(row))
            return bool(cursor.rowcount)

        return await self._transaction("create endpoint", write)

    async def update_endpoint(self, row: Mapping[str, object]) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(_Q["update_endpoint"], dict(row))
            return bool(cursor.rowcount)

        return await self._transaction("update endpoint", write)

    async def remove_endpoint(self, endpoint_id: str, *, force: bool) -> EndpointRemoval:
        def write(conn: sqlite3.Connection) -> EndpointRemoval:
            params = {"id": endpoint_id}
            if not list(conn.execute(_Q["endpoint_exists"], params)):
                return EndpointRemoval(found=False, removed=False, pending=0)
            [(pending,)] = conn.execute(_Q["endpoint_pending"], params)
            if pending and not force:
                return EndpointRemoval(found=True, removed=False, pending=int(pending))
            conn.execute(_Q["delete_endpoint"], params)
            return EndpointRemoval(found=True, removed=True, pending=int(pending))

        return await self._transaction("remove endpoint", write)

    async def endpoint_health(self, since: float) -> dict[str, EndpointHealth]:
        window = await self._read(
            "read endpoint health", _Q["endpoint_health_window"], {"since": since}
        )
        errors = await self._read("read endpoint errors", _Q["endpoint_last_errors"])
        return rows_mod.endpoint_health(window, errors, await self.pending_counts())

    async def requeue(
        self, delivery_ids: Sequence[str], now: float, states: Collection[str]
    ) -> list[str]:
        def write(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                _Q["requeue_deliveries"],
                {
                    "ids": json.dumps(list(delivery_ids)),
                    "states": json.dumps(sorted(states)),
                    "now": now,
                },
            )
            changed = [str(r[0]) for r in rows]
            if changed:
                conn.execute(_Q["bump_requeued"])
            return changed

        return await self._transaction("retry deliveries", write)

    async def requeued_version(self) -> int:
        rows = await self._read("read requeue version", _Q["requeued_version"])
        return int(rows[0][0]) if rows else 0

    async def get_event(self, event_id: str) -> EventRecord | None:
        rows = await self._read("find event", _Q["get_event"], {"event_id": event_id})
        return EventRecord(*rows[0]) if rows else None

    async def quarantined_event(self, event_id: str) -> list[QuarantineRecord]:
        rows = await self._read(
            "find quarantined event", _Q["quarantined_event"], {"event_id": event_id}
        )
        return [QuarantineRecord(*r) for r in rows]

    async def unprocessed_outbox_id(self, event_id: str) -> int | None:
        rows = await self._read(
            "find outbox row",
            _Q["unprocessed_outbox_id"],
            {"event_id": event_id, "after": await self._cursor()},
        )
        return int(rows[0][0]) if rows else None

    async def stats(self, now: float, since: float, top: int) -> StoreStats:
        cursor = await self._cursor()
        [backlog] = await self._read(
            "read stats", _Q["stats_backlog"], {"after": cursor, "now": now, "since": since}
        )
        [attempts] = await self._read("read stats", _Q["stats_attempts"], {"since": since})
        failures = await self._read(
            "read stats", _Q["stats_failures_by_endpoint"], {"since": since, "top": top}
        )
        oldest = await self.oldest_unprocessed()
        return rows_mod.store_stats(since, backlog, attempts, failures, oldest)


def _split_statements(script: str) -> list[str]:
    """Split a migration script into statements (triggers' BEGIN … END kept whole)."""
    statements = []
    current = ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statement = current.strip()
            if statement and not all(
                ln.strip().startswith("--") or not ln.strip() for ln in statement.splitlines()
            ):
                statements.append(statement)
            current = ""
    if current.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in current.splitlines()
    ):
        raise StorageError("a migration ends with an incomplete SQL statement")
    return statements
