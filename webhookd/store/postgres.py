"""The PostgreSQL backend (asyncpg): several webhookd replicas share one database.

What differs from SQLite, where one daemon owns the file:

- The outbox is not followed with an id cursor (sequence values do not commit in id order):
  fan-out takes the rows whose ``processed_at`` is NULL with ``FOR UPDATE SKIP LOCKED`` and
  sets it, in the fan-out transaction, so replicas fan out different rows and a row that
  commits late is still seen.
- Deliveries are leased in the database (``lease_owner``, ``lease_until`` by the database's
  clock): a claim takes due deliveries nobody holds a live lease on, at most the endpoint's cap
  less its live leases across every replica (claims of one endpoint are serialised by an
  advisory lock). The backend renews the leases it holds every ``lease_seconds / 3``; a killed
  replica's leases expire after ``lease_seconds`` and are claimed again. An attempt is recorded
  only while this backend still holds the delivery's lease.
- Replicas wake each other with NOTIFY: ``webhookd_outbox`` (a trigger on the outbox, endpoint
  changes, requeues) and ``webhookd_due`` (the endpoints another replica made deliveries due
  for). A dedicated connection LISTENs; polling after ``poll_fallback_seconds`` is the fallback,
  and the only way while that connection is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import asyncpg  # type: ignore[import-untyped]  # no stubs, no py.typed

from webhookd.errors import StorageError
from webhookd.log import log_event
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
    load_migrations,
    load_queries,
    split_duplicates,
)

T = TypeVar("T")
logger = logging.getLogger("webhookd.store")

DEFAULT_LEASE_SECONDS = 30.0
DEFAULT_POOL_SIZE = 10
DEFAULT_CONNECT_TIMEOUT_SECONDS = 10.0
# outbox_changed() says yes at least this often, in case a notification was missed.
DEFAULT_POLL_FALLBACK_SECONDS = 1.0
# An idle endpoint worker looks again after this long (other replicas change the store).
DEFAULT_RECHECK_SECONDS = 1.0
# The listening connection is checked this often; a lost one is reconnected with backoff.
LISTENER_CHECK_SECONDS = 10.0
LISTENER_RETRY_MAX_SECONDS = 5.0
# Transactions that fail on a deadlock or a serialization failure are run again.
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})
TRANSACTION_ATTEMPTS = 3
# Two replicas fanning out two outbox rows with the same event id at once: the later commit
# fails on webhookd_events' unique index and the batch is read again (it is then a duplicate).
EVENT_ID_CONSTRAINT = "webhookd_events_event_id_key"
FANOUT_ATTEMPTS = 3
# pg_advisory_lock key of `migrate` (the claim lock uses the two-key form, another space).
MIGRATE_LOCK_KEY = 7_504_726_865_313_001
NOTIFY_PAYLOAD_MAX = 7000  # bytes; PostgreSQL's limit is 8000
OUTBOX_CHANNEL = "webhookd_outbox"
DUE_CHANNEL = "webhookd_due"

# Driver errors: every one becomes a StorageError.
_DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)

_OPEN_ERRORS: tuple[type[BaseException], ...] = (*_DRIVER_ERRORS, ValueError)
_RENEW_ERRORS: tuple[type[BaseException], ...] = (*_DRIVER_ERRORS, StorageError)

_PARAM_RE = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def _compile(sql: str) -> tuple[str, tuple[str, ...]]:
    """``:name`` parameters → ``$n`` (each name once), comment lines dropped."""
    lines = [ln for ln in sql.splitlines() if not ln.lstrip().startswith("--")]
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _PARAM_RE.sub(number, "\n".join(lines)), tuple(names)


_Q = {name: _compile(sql) for name, sql in load_queries("postgres").items()}


def _args(query: str, params: Mapping[str, object]) -> tuple[str, list[object]]:
    sql, names = _Q[query]
    return sql, [params[n] for n in names]


def safe_url(url: str) -> str:
    """``postgresql://user@host:port/db``: the URL without its password (nor query string),
    with libpq's defaults filled in."""
    parts = urlsplit(url)
    user = unquote(parts.username) if parts.username else os.environ.get("PGUSER") or _os_user()
    try:
        host = parts.hostname or os.environ.get("PGHOST") or "localhost"
        port = parts.port or int(os.environ.get("PGPORT") or 5432)
    except ValueError:
        host, port = parts.hostname or "?", 0
    if ":" in host:
        host = f"[{host}]"
    dbname = unquote(parts.path.lstrip("/")) or os.environ.get("PGDATABASE") or user
    return f"postgresql://{user}@{host}:{port}/{dbname}"


def driver_message(exc: BaseException, url: str, password: str | None) -> str:
    """The driver's message with every password that may have been used for ``url`` (the
    given one, PGPASSWORD's, the URL's) blanked out."""
    secrets_used = [password, os.environ.get("PGPASSWORD")]
    with contextlib.suppress(ValueError):
        secrets_used.append(urlsplit(url).password)
    text = str(exc) or type(exc).__name__
    for secret in secrets_used:
        if secret:
            text = text.replace(secret, "***")
    return text


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "postgres"


def _sqlstate(exc: BaseException) -> str | None:
    value = getattr(exc, "sqlstate", None)
    return value if isinstance(value, str) else None


class PostgresBackend:
    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
        poll_fallback_seconds: float = DEFAULT_POLL_FALLBACK_SECONDS,
        recheck_seconds: float = DEFAULT_RECHECK_SECONDS,
        owner: str | None = None,
    ) -> None:
        if pool_size < 2:
            raise ValueError("pool_size must be at least 2 (fan-out reads endpoints meanwhile)")
        self._url = url
        self._password = password
        self.description = safe_url(url)
        self.recheck_seconds: float | None = recheck_seconds
        self.lease_seconds = lease_seconds
        self.poll_fallback_seconds = poll_fallback_seconds
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout_seconds
        # Unique per backend instance: a restarted replica does not inherit its old leases.
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._pool: asyncpg.Pool | None = None
        self._held: dict[int, str] = {}  # delivery pk → endpoint id, leased by this backend
        self._renewer: asyncio.Task[None] | None = None
        self._listener_task: asyncio.Task[None] | None = None
        self._listener: asyncpg.Connection | None = None
        self._listener_lost = asyncio.Event()
        self._outbox_notified = False
        self._last_changed_answer = -float("inf")  # monotonic time outbox_changed said yes
        self._woken: set[str] = set()

    # -- connections -------------------------------------------------------------------------

    def _message(self, exc: BaseException) -> str:
        return driver_message(exc, self._url, self._password)

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(
            self._url, password=self._password, timeout=self._connect_timeout
        )

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._url,
                password=self._password,
                min_size=1,
                max_size=self._pool_size,
                timeout=self._connect_timeout,
                # A pooled connection idle this long is closed (replicas x pool_size adds up).
                max_inactive_connection_lifetime=60.0,
            )
            await self._listen_on(await self._connect())
        except _OPEN_ERRORS as exc:
            await self.close()
            raise StorageError(
                f"cannot connect to PostgreSQL at {self.description}: {self._message(exc)}"
            ) from None
        self._listener_task = asyncio.create_task(self._keep_listening(), name="pg-listener")
        self._renewer = asyncio.create_task(self._renew_leases(), name="pg-lease-renewer")

    async def claim_ownership(self) -> None:
        """Nothing to own: replicas share one PostgreSQL (leases keep them apart)."""

    async def close(self) -> None:
        for task in (self._renewer, self._listener_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._renewer = self._listener_task = None
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(*_DRIVER_ERRORS):
                await asyncio.wait_for(listener.close(), self._connect_timeout)
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if self._held:
            # What this replica did not finish is free for the others at once, not at expiry.
            with contextlib.suppress(*_DRIVER_ERRORS):
                sql, args = _args("release_all_leases", {"owner": self.owner})
                await asyncio.wait_for(pool.execute(sql, *args), self._connect_timeout)
            self._held.clear()
        try:
            await asyncio.wait_for(pool.close(), self._connect_timeout)
        except _DRIVER_ERRORS:
            pool.terminate()

    @property
    def _p(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageError("the store is not open")
        return self._pool

    async def _read(
        self, op: str, query: str, params: Mapping[str, object] | None = None
    ) -> list[Any]:
        sql, args = _args(query, params or {})
        return await self._run(op, lambda conn: conn.fetch(sql, *args))

    async def _run(self, op: str, body: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``body`` on a pooled connection, outside any transaction."""
        pool = self._p
        try:
            async with pool.acquire() as conn:
                return await body(conn)
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"{op} failed on {self.description}: {self._message(exc)}") from exc

    async def _transaction(self, op: str, body: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``body`` in one transaction; run again on a deadlock or serialization failure."""
        pool = self._p
        for attempt in range(TRANSACTION_ATTEMPTS):
            try:
                async with pool.acquire() as conn, conn.transaction():
                    return await body(conn)
            except _DRIVER_ERRORS as exc:
                transient = _sqlstate(exc) in TRANSIENT_SQLSTATES
                if transient and attempt + 1 < TRANSACTION_ATTEMPTS:
                    await asyncio.sleep(0.01 * (attempt + 1))
                    continue
                raise StorageError(
                    f"{op} failed on {self.description}: {self._message(exc)}"
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # -- LISTEN/NOTIFY -----------------------------------------------------------------------

    async def _listen_on(self, conn: asyncpg.Connection) -> None:
        """Make ``conn`` the listening connection (it is closed if that fails)."""
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(OUTBOX_CHANNEL, self._on_outbox)
            await conn.add_listener(DUE_CHANNEL, self._on_due)
        except BaseException:
            with contextlib.suppress(*_DRIVER_ERRORS):
                conn.terminate()
            raise
        self._listener, self._listener_lost = conn, lost

    def _on_outbox(self, conn: object, pid: int, channel: str, payload: str) -> None:
        self._outbox_notified = True

    def _on_due(self, conn: object, pid: int, channel: str, payload: str) -> None:
        self._woken.update(e for e in payload.split(",") if e)

    async def _keep_listening(self) -> None:
        """Watch the listening connection (its loss is noticed at once, a silent one within
        LISTENER_CHECK_SECONDS); reconnect with backoff. Meanwhile polling stands in:
        outbox_changed() says yes on every call."""
        delay = 0.1
        while True:
            conn = self._listener
            if conn is not None:
                try:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._listener_lost.wait(), LISTENER_CHECK_SECONDS)
                    if conn.is_closed() or self._listener_lost.is_set():
                        raise ConnectionError("the listening connection was closed")
                    await conn.fetchval("SELECT 1", timeout=self._connect_timeout)
                    continue
                except _DRIVER_ERRORS as exc:
                    log_event(
                        logger, logging.WARNING, "listen_lost", store=self.description,
                        error=self._message(exc),
                    )  # fmt: skip
                    self._listener = None
                    with contextlib.suppress(*_DRIVER_ERRORS):
                        conn.terminate()
            await asyncio.sleep(delay)
            try:
                await self._listen_on(await self._connect())
            except _DRIVER_ERRORS:
                delay = min(delay * 2, LISTENER_RETRY_MAX_SECONDS)
                continue
            delay = 0.1
            self._outbox_notified = True  # what was committed while it was away
            log_event(logger, logging.INFO, "listen_restored", store=self.description)

    @property
    def listening(self) -> bool:
        """Whether notifications are being received (False: polling stands in)."""
        conn = self._listener
        return conn is not None and not conn.is_closed() and not self._listener_lost.is_set()

    async def outbox_changed(self) -> bool:
        """No query: a notification arrived, or the fallback interval passed, or the listening
        connection is lost (then every call says yes: polling)."""
        self._p  # noqa: B018 -- raises when not open
        now = time.monotonic()
        if (
            self._outbox_notified
            or not self.listening
            or now - self._last_changed_answer >= self.poll_fallback_seconds
        ):
            self._outbox_notified = False
            self._last_changed_answer = now
            return True
        return False

    def take_woken_endpoints(self) -> set[str]:
        woken, self._woken = self._woken, set()
        return woken

    @staticmethod
    async def _notify_due(conn: asyncpg.Connection, endpoints: Iterable[str]) -> None:
        """NOTIFY webhookd_due with the endpoint ids, comma-separated, in payloads that fit."""
        chunk: list[str] = []
        size = 0
        sql, _ = _Q["notify_due"]
        for ep in sorted(set(endpoints)):
            if chunk and size + len(ep.encode()) + 1 > NOTIFY_PAYLOAD_MAX:
                await conn.execute(sql, ",".join(chunk))
                chunk, size = [], 0
            chunk.append(ep)
            size += len(ep.encode()) + 1
        if chunk:
            await conn.execute(sql, ",".join(chunk))

    # -- schema ------------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        migrations = load_migrations("postgres")

        async def apply(conn: asyncpg.Connection) -> list[int]:
            # Replicas starting together: one migrates, the others wait and find it done.
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATE_LOCK_KEY)
            try:
                async with conn.transaction():
                    await conn.execute(
                        "CREATE TABLE IF NOT EXISTS webhookd_schema ("
                        " version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
                        " applied_at DOUBLE PRECISION NOT NULL)"
                    )
                    done = {r[0] for r in await conn.fetch("SELECT version FROM webhookd_schema")}
                    applied = []
                    for version, name, sql in migrations:
                        if version in done:
                            continue
                        await conn.execute(sql)
                        await conn.execute(
                            "INSERT INTO webhookd_schema (version, name, applied_at)"
                            " VALUES ($1, $2, $3)",
                            version,
                            name,
                            time.time(),
                        )
                        applied.append(version)
                    return applied
            finally:
                await asyncio.shield(
                    conn.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK_KEY)
                )

        return await self._run("migrate", apply)

    async def schema_version(self) -> int:
        async def read(conn: asyncpg.Connection) -> int:
            if await conn.fetchval("SELECT to_regclass('webhookd_schema')") is None:
                return 0
            return int(await conn.fetchval("SELECT MAX(version) FROM webhookd_schema") or 0)

        return await self._run("read the schema version", read)

    async def ping(self) -> None:
        await self._read("ping", "endpoints_version")

    # -- outbox ------------------------------------------------------------------------------

    async def fan_out(
        self,
        planner: Planner,
        limit: int,
        now: float,
        *,
        max_payload_bytes: int | None = None,
        before_planning: Callable[[], Awaitable[None]] | None = None,
    ) -> FanoutResult:
        for attempt in range(FANOUT_ATTEMPTS):
            try:
                return await self._fan_out_once(
                    planner, limit, now, max_payload_bytes, before_planning
                )
            except StorageError as exc:
                cause = exc.__cause__
                raced = isinstance(cause, asyncpg.UniqueViolationError) and (
                    cause.constraint_name == EVENT_ID_CONSTRAINT
                )
                if not raced or attempt + 1 == FANOUT_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fan_out_once(
        self,
        planner: Planner,
        limit: int,
        now: float,
        max_payload_bytes: int | None,
        before_planning: Callable[[], Awaitable[None]] | None,
    ) -> FanoutResult:
        async def fan_out(conn: asyncpg.Connection) -> FanoutResult:
            sql, args = _args("claim_outbox", {"limit": limit, "max_payload": max_payload_bytes})
            raw = await conn.fetch(sql, *args)
            if not raw:
                return FanoutResult()
            rows = [
                OutboxRow(
                    int(r[0]),
                    r[1],
                    OversizedPayload(int(r[6])) if r[2] is None else r[2],
                    r[3],
                    r[4],
                    r[5],
                )
                for r in raw
            ]
            if before_planning is not None:
                await before_planning()
            plan = planner(rows)
            planned = list(plan.events)
            quarantined = list(plan.quarantined)
            sql, args = _args("existing_event_ids", {"ids": [p.event.event_id for p in planned]})
            existing = {r[0] for r in await conn.fetch(sql, *args)}
            planned, duplicates = split_duplicates(planned, existing)
            quarantined += duplicates
            deliveries = 0
            if planned:
                events = [p.event for p in planned]
                sql, args = _args(
                    "insert_events",
                    {
                        "outbox_ids": [e.outbox_id for e in events],
                        "event_ids": [e.event_id for e in events],
                        "event_types": [e.event_type for e in events],
                        "tenants": [e.tenant for e in events],
                        "occurred": [e.occurred_at for e in events],
                        "bodies": [e.body for e in events],
                        "now": now,
                    },
                )
                pks = {r[1]: int(r[0]) for r in await conn.fetch(sql, *args)}
                new = [(d, pks[p.event.event_id]) for p in planned for d in p.deliveries]
                deliveries = len(new)
                if new:
                    sql, args = _args(
                        "insert_deliveries",
                        {
                            "delivery_ids": [d.delivery_id for d, _ in new],
                            "event_pks": [pk for _, pk in new],
                            "endpoint_ids": [d.endpoint_id for d, _ in new],
                            "now": now,
                        },
                    )
                    await conn.execute(sql, *args)
            if quarantined:
                sql, args = _args(
                    "insert_quarantine",
                    {
                        "outbox_ids": [q.outbox_id for q in quarantined],
                        "reasons": [q.reason for q in quarantined],
                        "details": [q.detail for q in quarantined],
                        "event_types": [q.event_type for q in quarantined],
                        "event_ids": [q.event_id for q in quarantined],
                        "now": now,
                    },
                )
                await conn.execute(sql, *args)
            sql, args = _args("mark_processed", {"ids": [r.id for r in rows], "now": now})
            await conn.execute(sql, *args)
            endpoints = frozenset(d.endpoint_id for p in planned for d in p.deliveries)
            await self._notify_due(conn, endpoints)
            return FanoutResult(
                rows=len(rows),
                events=len(planned),
                deliveries=deliveries,
                quarantined=tuple(quarantined),
                endpoints=endpoints,
            )

        return await self._transaction("fan out", fan_out)

    async def oldest_unprocessed(self) -> str | None:
        rows = await self._read("read outbox", "oldest_unprocessed")
        if not rows:
            return None
        value = rows[0][0]
        return value if isinstance(value, str) else ""

    # -- endpoints ---------------------------------------------------------------------------

    async def endpoints_version(self) -> int:
        rows = await self._read("read endpoints version", "endpoints_version")
        return int(rows[0][0]) if rows else 0

    async def table_endpoints(self) -> list[Mapping[str, object]]:
        rows = await self._read("read endpoints", "table_endpoints")
        return [dict(zip(ENDPOINT_ROW_COLUMNS, tuple(row), strict=True)) for row in rows]

    async def rotate_secret(self, endpoint_id: str, secret: str, expires_at: str) -> bool:
        params = {"id": endpoint_id, "secret": secret, "expires_at": expires_at}
        return await self._changed("rotate secret", "rotate_secret", params)

    async def _changed(self, op: str, query: str, params: Mapping[str, object]) -> bool:
        """Run a write; whether it changed a row."""
        sql, args = _args(query, params)
        status = await self._transaction(op, lambda conn: conn.execute(sql, *args))
        return _rowcount(status) > 0

    # -- deliveries --------------------------------------------------------------------------

    def _held_of(self, endpoint_id: str) -> list[int]:
        return [pk for pk, ep in self._held.items() if ep == endpoint_id]

    async def claim_due(
        self, endpoint_id: str, now: float, limit: int, *, cap: int | None = None
    ) -> list[Delivery]:
        if limit <= 0:
            self._p  # noqa: B018 -- raises when not open
            return []
        lock_sql, lock_args = _args("claim_lock", {"endpoint": endpoint_id})
        sql, args = _args(
            "claim_due",
            {
                "endpoint": endpoint_id,
                "now": now,
                "limit": limit,
                "cap": cap,
                "held": self._held_of(endpoint_id),
                "owner": self.owner,
                "lease": self.lease_seconds,
            },
        )

        async def claim(conn: asyncpg.Connection) -> list[Any]:
            await conn.execute(lock_sql, *lock_args)
            return list(await conn.fetch(sql, *args))

        rows = await self._transaction("claim deliveries", claim)
        out = [rows_mod.claimed_delivery(r) for r in rows]
        for delivery in out:
            self._held[delivery.pk] = endpoint_id
        return out

    async def next_due_at(self, endpoint_id: str) -> float | None:
        rows = await self._read(
            "read schedule",
            "next_due",
            {"endpoint": endpoint_id, "held": self._held_of(endpoint_id), "owner": self.owner},
        )
        due, lease_until, db_now = rows[0]
        candidates = [] if due is None else [float(due)]
        if lease_until is not None and db_now is not None:
            # In the caller's clock: as far from now as the lease end is from the database's.
            candidates.append(time.time() + float(lease_until) - float(db_now))
        return min(candidates) if candidates else None

    async def _renew_leases(self) -> None:
        """Every lease_seconds / 3, push back the end of every lease this backend holds, so
        that waiting (for the global limit, for the recorder) never loses one."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            if not self._held or self._pool is None:
                continue
            pks = list(self._held)
            sql, args = _args(
                "renew_leases", {"pks": pks, "owner": self.owner, "lease": self.lease_seconds}
            )
            try:
                rows = await self._p.fetch(sql, *args)
            except _RENEW_ERRORS as exc:
                log_event(
                    logger, logging.WARNING, "lease_renewal_failed", store=self.description,
                    leases=len(pks), error=self._message(exc),
                )  # fmt: skip
                continue
            renewed = {int(r[0]) for r in rows}
            lost = [pk for pk in pks if pk not in renewed and pk in self._held]
            if lost:
                log_event(
                    logger, logging.WARNING, "leases_lost", store=self.description,
                    count=len(lost), delivery_pks=",".join(map(str, lost[:20])),
                )  # fmt: skip

    async def record(self, outcomes: Sequence[AttemptOutcome]) -> None:
        if not outcomes:
            return
        sql, args = _args(
            "record",
            {
                "pks": [o.delivery_pk for o in outcomes],
                "attempt_nos": [o.attempt_no for o in outcomes],
                "started": [o.started_at for o in outcomes],
                "durations": [o.duration_seconds for o in outcomes],
                "results": [o.result.value for o in outcomes],
                "statuses": [o.status_code for o in outcomes],
                "errors": [o.error for o in outcomes],
                "excerpts": [o.response_excerpt for o in outcomes],
                "kinds": [o.error_kind for o in outcomes],
                "states": [o.new_state.value for o in outcomes],
                "next_at": [o.next_attempt_at for o in outcomes],
                "now": time.time(),
                "owner": self.owner,
            },
        )
        rows = await self._transaction("record attempts", lambda conn: conn.fetch(sql, *args))
        accepted = {int(r[0]) for r in rows}
        for o in outcomes:
            self._held.pop(o.delivery_pk, None)
            if o.delivery_pk not in accepted:
                # Its lease expired and another replica took it (or it is final already):
                # that replica's outcome counts, not this one.
                log_event(
                    logger,
                    logging.WARNING,
                    "lease_lost",
                    delivery_pk=o.delivery_pk,
                    attempt_no=o.attempt_no,
                    outcome=o.new_state.value,
                )

    async def release(self, delivery_pks: Sequence[int]) -> None:
        pks = [pk for pk in delivery_pks if pk in self._held]
        for pk in pks:
            self._held.pop(pk, None)
        if not pks:
            return
        params = {"pks": pks, "owner": self.owner}
        await self._changed("release leases", "release_leases", params)

    async def record_test_send(
        self, event: Event, endpoint_id: str, delivery_id: str, outcome: AttemptOutcome
    ) -> None:
        now = time.time()

        async def write(conn: asyncpg.Connection) -> None:
            sql, args = _args("insert_test_event", rows_mod.send_test_event_params(event, now))
            event_pk = await conn.fetchval(sql, *args)
            sql, args = _args(
                "insert_test_delivery",
                {
                    "delivery_id": delivery_id,
                    "event_pk": event_pk,
                    "endpoint_id": endpoint_id,
                    "state": outcome.new_state.value,
                    "attempts": outcome.attempt_no,
                    "now": now,
                    "last_status": outcome.status_code,
                    "last_error": outcome.error,
                },
            )
            delivery_pk = await conn.fetchval(sql, *args)
            sql, args = _args(
                "insert_attempt",
                {
                    "pk": delivery_pk,
                    "attempt_no": outcome.attempt_no,
                    "started_at": outcome.started_at,
                    "duration": outcome.duration_seconds,
                    "result": outcome.result.value,
                    "status": outcome.status_code,
                    "error": outcome.error,
                    "excerpt": outcome.response_excerpt,
                    "kind": outcome.error_kind,
                },
            )
            await conn.execute(sql, *args)

        await self._transaction("record test send", write)

    async def pending_counts(self) -> dict[str, int]:
        rows = await self._read("count pending", "pending_counts")
        return {str(r[0]): int(r[1]) for r in rows}

    # -- the circuit breaker -----------------------------------------------------------------

    async def endpoint_states(self) -> dict[str, EndpointState]:
        rows = await self._read("read endpoint states", "endpoint_states")
        return {str(r[0]): rows_mod.endpoint_state(r) for r in rows}

    async def save_endpoint_state(self, state: EndpointState, *, disable_row: bool) -> None:
        sql, args = _args("save_endpoint_state", rows_mod.endpoint_state_params(state))
        disable_sql, disable_args = _args("disable_endpoint_row", {"id": state.endpoint_id})

        async def write(conn: asyncpg.Connection) -> None:
            await conn.execute(sql, *args)
            if disable_row:
                await conn.execute(disable_sql, *disable_args)

        await self._transaction("save endpoint state", write)

    async def clear_endpoint_state(self, endpoint_id: str) -> EndpointState | None:
        sql, args = _args("clear_endpoint_state", {"id": endpoint_id})
        bump_sql, _ = _Q["bump_endpoints_version"]
        notify_sql, _ = _Q["notify_outbox"]

        async def write(conn: asyncpg.Connection) -> EndpointState | None:
            rows = await conn.fetch(sql, *args)
            if not rows:
                return None
            await conn.execute(bump_sql)
            await conn.execute(notify_sql)
            return rows_mod.endpoint_state(rows[0])

        return await self._transaction("clear endpoint state", write)

    async def list_deliveries(self, filters: DeliveryFilter) -> list[DeliveryRecord]:
        return await self._deliveries(filters, None)

    async def _deliveries(self, f: DeliveryFilter, delivery_id: str | None) -> list[DeliveryRecord]:
        params = rows_mod.delivery_filter_params(f, delivery_id)
        rows = await self._read("list deliveries", "list_deliveries", params)
        return [rows_mod.delivery_record(r) for r in rows]

    async def get_delivery(self, delivery_id: str) -> DeliveryRecord | None:
        found = await self._read("find delivery", "find_delivery", {"delivery_id": delivery_id})
        if not found:
            return None
        records = await self._deliveries(DeliveryFilter(limit=1), delivery_id)
        attempts = await self._read("list attempts", "list_attempts", {"pk": found[0][0]})
        return replace(records[0], attempt_log=tuple(AttemptRecord(*a) for a in attempts))

    async def list_quarantine(self, limit: int) -> list[QuarantineRecord]:
        rows = await self._read("list quarantine", "list_quarantine", {"limit": limit})
        return [QuarantineRecord(*r) for r in rows]

    # -- retention ---------------------------------------------------------------------------

    # Each batch is one short statement in its own transaction; rows another replica is
    # pruning at the same moment are skipped (SKIP LOCKED), not waited for.

    async def prune_deliveries(
        self, state: DeliveryState, updated_before: float, limit: int
    ) -> tuple[int, int]:
        sql, args = _args(
            "prune_deliveries", {"state": state.value, "before": updated_before, "limit": limit}
        )
        row = await self._transaction(
            f"prune {state.value} deliveries", lambda conn: conn.fetchrow(sql, *args)
        )
        assert row is not None
        return int(row[0]), int(row[1])

    async def prune_events(
        self, created_before: float, after_pk: int, limit: int
    ) -> tuple[int, int | None]:
        sql, args = _args(
            "prune_events", {"before": created_before, "after": after_pk, "limit": limit}
        )
        row = await self._transaction("prune events", lambda conn: conn.fetchrow(sql, *args))
        assert row is not None
        deleted, found, last = int(row[0]), int(row[1]), row[2]
        if not found:
            return 0, None
        return deleted, int(last) if found >= limit else None

    async def prune_outbox(self, processed_before: float, limit: int) -> int:
        params = {"before": processed_before, "limit": limit}
        return await self._delete("prune outbox", "prune_outbox", params)

    async def prune_quarantine(self, quarantined_before: float, limit: int) -> int:
        params = {"before": quarantined_before, "limit": limit}
        return await self._delete("prune quarantine", "prune_quarantine", params)

    async def _delete(self, op: str, query: str, params: Mapping[str, object]) -> int:
        sql, args = _args(query, params)
        status = await self._transaction(op, lambda conn: conn.execute(sql, *args))
        return _rowcount(status)

    async def changes(self) -> int:
        rows = await self._read("read the change counter", "changes")
        return int(rows[0][0])

    async def checkpoint(self, *, truncate: bool) -> CheckpointResult:
        """Nothing to do: PostgreSQL checkpoints its WAL itself. Reported as done."""
        self._p  # noqa: B018 -- raises when not open
        return CheckpointResult("none", busy=False, wal_frames=0, checkpointed_frames=0)

    # -- administration ----------------------------------------------------------------------

    async def create_endpoint(self, row: Mapping[str, object]) -> bool:
        return await self._changed("create endpoint", "create_endpoint", row)

    async def update_endpoint(self, row: Mapping[str, object]) -> bool:
        return await self._changed("update endpoint", "update_endpoint", row)

    async def remove_endpoint(self, endpoint_id: str, *, force: bool) -> EndpointRemoval:
        params = {"id": endpoint_id}
        exists_sql, exists_args = _args("endpoint_exists", params)
        pending_sql, pending_args = _args("endpoint_pending", params)
        delete_sql, delete_args = _args("delete_endpoint", params)

        async def write(conn: asyncpg.Connection) -> EndpointRemoval:
            if await conn.fetchrow(exists_sql, *exists_args) is None:
                return EndpointRemoval(found=False, removed=False, pending=0)
            pending = int(await conn.fetchval(pending_sql, *pending_args))
            if pending and not force:
                return EndpointRemoval(found=True, removed=False, pending=pending)
            await conn.execute(delete_sql, *delete_args)
            return EndpointRemoval(found=True, removed=True, pending=pending)

        return await self._transaction("remove endpoint", write)

    async def endpoint_health(self, since: float) -> dict[str, EndpointHealth]:
        window = await self._read(
            "read endpoint health", "endpoint_health_window", {"since": since}
        )
        errors = await self._read("read endpoint errors", "endpoint_last_errors")
        return rows_mod.endpoint_health(window, errors, await self.pending_counts())

    async def requeue(
        self, delivery_ids: Sequence[str], now: float, states: Collection[str]
    ) -> list[str]:
        sql, args = _args(
            "requeue_deliveries",
            {"ids": list(delivery_ids), "states": sorted(states), "now": now},
        )
        bump_sql, _ = _Q["bump_requeued"]
        notify_sql, _ = _Q["notify_outbox"]

        async def write(conn: asyncpg.Connection) -> list[str]:
            rows = await conn.fetch(sql, *args)
            if rows:
                await conn.execute(bump_sql)
                await conn.execute(notify_sql)
                await self._notify_due(conn, (str(r[1]) for r in rows))
            return [str(r[0]) for r in rows]

        return await self._transaction("retry deliveries", write)

    async def requeued_version(self) -> int:
        rows = await self._read("read requeue version", "requeued_version")
        return int(rows[0][0]) if rows else 0

    async def get_event(self, event_id: str) -> EventRecord | None:
        rows = await self._read("find event", "get_event", {"event_id": event_id})
        return EventRecord(*rows[0]) if rows else None

    async def quarantined_event(self, event_id: str) -> list[QuarantineRecord]:
        rows = await self._read(
            "find quarantined event", "quarantined_event", {"event_id": event_id}
        )
        return [QuarantineRecord(*r) for r in rows]

    async def unprocessed_outbox_id(self, event_id: str) -> int | None:
        rows = await self._read("find outbox row", "unprocessed_outbox_id", {"event_id": event_id})
        return int(rows[0][0]) if rows else None

    async def stats(self, now: float, since: float, top: int) -> StoreStats:
        [backlog] = await self._read("read stats", "stats_backlog", {"now": now, "since": since})
        [attempts] = await self._read("read stats", "stats_attempts", {"since": since})
        failures = await self._read(
            "read stats", "stats_failures_by_endpoint", {"since": since, "top": top}
        )
        oldest = await self.oldest_unprocessed()
        return rows_mod.store_stats(since, backlog, attempts, failures, oldest)


def _rowcount(status: str) -> int:
    """The row count of a command status ("UPDATE 3", "INSERT 0 1", "DELETE 0")."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0
