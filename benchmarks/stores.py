"""Where a benchmark run keeps its data: one fresh database per daemon run.

A target knows the ``[database]`` section that points webhookd at it, how an application
writes outbox rows into it (in bulk before the daemon starts, or one commit at a time), and how
the harness checks what the daemon recorded (it asks the store, not the receiver). Tables are
created by webhookd itself (``Store.migrate``), so a target only needs the outbox contract and
the ``webhookd_deliveries``/``webhookd_events`` columns the harness reads.

- ``sqlite``: a file in the run's temporary directory (the default store).
- ``postgres``: a database created for the run on the server of ``--postgres-url`` and dropped
  afterwards (``[database] url``, the PostgreSQL store of issue 7).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

# (endpoint id, delivery id, event type, body) of succeeded deliveries, in delivery order.
Sent = tuple[str, str, str, bytes]

_COUNT_SUCCEEDED = "SELECT count(*) FROM webhookd_deliveries WHERE state = 'succeeded'"
_STATE_COUNTS = (
    "SELECT endpoint_id, state, count(*) FROM webhookd_deliveries GROUP BY endpoint_id, state"
)
_SUCCEEDED_IDS = "SELECT delivery_id FROM webhookd_deliveries WHERE state = 'succeeded'"
_SENT_BODIES = (
    "SELECT d.endpoint_id, d.delivery_id, e.event_type, e.body"
    " FROM webhookd_deliveries d JOIN webhookd_events e ON e.id = d.event_pk"
    " WHERE d.state = 'succeeded' ORDER BY d.id LIMIT {limit}"
)


class StoreTarget(Protocol):
    name: str
    max_replicas: int

    def database_section(self) -> dict[str, object]:
        """The ``[database]`` section of the daemon's configuration."""
        ...

    async def create(self) -> None:
        """A fresh, empty database (webhookd's tables are made by ``Store.migrate``)."""
        ...

    async def drop(self) -> None: ...
    async def insert_outbox(self, rows: Sequence[tuple[str, str]]) -> None:
        """Commit (event_type, payload) rows as an application would, in big transactions."""
        ...

    async def insert_one(self, event_type: str, payload: str) -> None:
        """Commit one row in its own transaction (``occurred_at``: the database's now)."""
        ...

    async def succeeded_count(self) -> int: ...
    async def state_counts(self) -> dict[tuple[str, str], int]:
        """(endpoint id, state) → deliveries."""
        ...

    async def succeeded_ids(self) -> set[str]: ...
    async def sent_bodies(self, limit: int) -> list[Sent]: ...


class SQLiteTarget:
    name = "sqlite"
    max_replicas = 1  # the SQLite store refuses a second daemon on one file

    def __init__(self, directory: Path) -> None:
        self.path = directory / "bench.db"
        self._conn: sqlite3.Connection | None = None

    def database_section(self) -> dict[str, object]:
        return {"path": str(self.path)}

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._conn.execute("PRAGMA busy_timeout = 30000")
        return self._conn

    def _remove_files(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    async def create(self) -> None:
        self._remove_files()

    async def drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._remove_files()  # a 1M-delivery backlog is a few hundred MB

    async def insert_outbox(self, rows: Sequence[tuple[str, str]]) -> None:
        db = self._db()
        it = iter(rows)
        while chunk := list(itertools.islice(it, 50_000)):
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT INTO webhook_outbox (event_type, payload) VALUES (?, ?)", chunk)
            db.execute("COMMIT")

    async def insert_one(self, event_type: str, payload: str) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "INSERT INTO webhook_outbox (event_type, payload) VALUES (?, ?)", (event_type, payload)
        )
        db.execute("COMMIT")

    async def succeeded_count(self) -> int:
        return int(self._db().execute(_COUNT_SUCCEEDED).fetchone()[0])

    async def state_counts(self) -> dict[tuple[str, str], int]:
        return {(ep, st): int(n) for ep, st, n in self._db().execute(_STATE_COUNTS)}

    async def succeeded_ids(self) -> set[str]:
        return {r[0] for r in self._db().execute(_SUCCEEDED_IDS)}

    async def sent_bodies(self, limit: int) -> list[Sent]:
        rows = self._db().execute(_SENT_BODIES.format(limit=int(limit))).fetchall()
        return [(ep, dlv, et, bytes(body)) for ep, dlv, et, body in rows]


def postgres_available() -> str | None:
    """Why ``--store postgres`` cannot run here, or None when it can."""
    if importlib.util.find_spec("webhookd.store.postgres") is None:
        return "the PostgreSQL store (webhookd/store/postgres.py, issue 7) is not in this checkout"
    if importlib.util.find_spec("asyncpg") is None:
        return "asyncpg is not installed"
    return None


class PostgresTarget:
    """One database per run, ``bench_<pid>_<n>`` on the server of ``--postgres-url``, created by
    the harness and dropped after the run.

    Written against the outbox contract of issue 7 (same tables and columns as SQLite, with
    PostgreSQL types); ``database_section`` assumes the ``[database] url`` key it asks for.
    """

    name = "postgres"
    max_replicas = 16
    _serial = itertools.count(1)

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        parts = urlsplit(admin_url)
        self.dbname = f"bench_{os.getpid()}_{next(self._serial)}"
        self.url = urlunsplit(parts._replace(path="/" + self.dbname))
        self._conn: Any = None

    def database_section(self) -> dict[str, object]:
        return {"url": self.url}

    async def _db(self) -> Any:
        if self._conn is None:
            import asyncpg

            self._conn = await asyncpg.connect(self.url)
        return self._conn

    async def create(self) -> None:
        import asyncpg

        admin = await asyncpg.connect(self.admin_url)
        try:
            await admin.execute(f'CREATE DATABASE "{self.dbname}"')
        finally:
            await admin.close()

    async def drop(self) -> None:
        import asyncpg

        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        admin = await asyncpg.connect(self.admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
        finally:
            await admin.close()

    async def insert_outbox(self, rows: Sequence[tuple[str, str]]) -> None:
        db = await self._db()
        it = iter(rows)
        while chunk := list(itertools.islice(it, 50_000)):
            await db.copy_records_to_table(
                "webhook_outbox", records=chunk, columns=["event_type", "payload"]
            )

    async def insert_one(self, event_type: str, payload: str) -> None:
        db = await self._db()
        await db.execute(
            "INSERT INTO webhook_outbox (event_type, payload) VALUES ($1, $2)", event_type, payload
        )

    async def succeeded_count(self) -> int:
        db = await self._db()
        return int(await db.fetchval(_COUNT_SUCCEEDED))

    async def state_counts(self) -> dict[tuple[str, str], int]:
        db = await self._db()
        return {(r[0], r[1]): int(r[2]) for r in await db.fetch(_STATE_COUNTS)}

    async def succeeded_ids(self) -> set[str]:
        db = await self._db()
        return {r[0] for r in await db.fetch(_SUCCEEDED_IDS)}

    async def sent_bodies(self, limit: int) -> list[Sent]:
        db = await self._db()
        rows = await db.fetch(_SENT_BODIES.format(limit=int(limit)))
        return [(r[0], r[1], r[2], bytes(r[3])) for r in rows]
