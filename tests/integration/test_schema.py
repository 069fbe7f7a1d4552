"""The SQLite schema that ``webhookd migrate`` creates is the outbox contract of DESIGN.md, and
applications can write it exactly as documented (plain SQL, the ``sqlite3`` shell)."""

from __future__ import annotations

import asyncio
import re
import shutil
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from webhookd.dispatcher import plan_fanout
from webhookd.events import timestamp_to_unix
from webhookd.models import Endpoint, FanoutPlan, OutboxRow
from webhookd.store.base import Store
from webhookd.store.sqlite import SQLiteBackend

NOW = 1_700_000_000.0
SQLITE3_CLI = "/usr/bin/sqlite3"
CLI_TIMEOUT_SECONDS = 30.0

EXPECTED_TABLES = {
    "webhook_outbox",
    "webhook_endpoints",
    "webhookd_state",
    "webhookd_events",
    "webhookd_deliveries",
    "webhookd_attempts",
    "webhookd_quarantine",
    "webhookd_schema",
    "webhookd_endpoint_state",  # the circuit breaker's state, kept across restarts
}
# DESIGN.md, "Outbox contract": (name, declared type, NOT NULL, part of the primary key)
OUTBOX_COLUMNS = [
    ("id", "INTEGER", 0, 1),
    ("event_type", "TEXT", 1, 0),
    ("payload", "TEXT", 1, 0),
    ("event_id", "TEXT", 0, 0),
    ("tenant", "TEXT", 0, 0),
    ("occurred_at", "TEXT", 0, 0),
]
ENDPOINT_COLUMNS = {
    "id",
    "url",
    "secret",
    "events",
    "tenant",
    "enabled",
    "max_concurrency",
    "headers",
    "description",
}
SQLITE_DEFAULT_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z")

# DESIGN.md's example, verbatim.
DESIGN_EXAMPLE_SQL = """\
BEGIN;
UPDATE bookings SET status = 'CONFIRMED' WHERE id = 'book_123';
INSERT INTO webhook_outbox (event_type, tenant, payload)
VALUES ('booking.confirmed', 'org_42',
        '{"id":"book_123","status":"CONFIRMED","confirmedAt":"2024-01-15T10:05:00Z"}');
COMMIT;
"""

ENDPOINT = Endpoint(id="crm", url="https://crm.example/hook", secret="s", tenant="org_42")


def plan(rows: Sequence[OutboxRow]) -> FanoutPlan:
    return plan_fanout(rows, [ENDPOINT], max_payload_bytes=65536, now=NOW)


async def open_store(path: Path) -> Store:
    store = Store(SQLiteBackend(path))
    await store.open()
    return store


@pytest.fixture
async def migrated(tmp_path: Path) -> Path:
    """An empty file migrated by webhookd (the daemon's store is closed again)."""
    path = tmp_path / "app.db"
    store = await open_store(path)
    try:
        assert await store.migrate()
    finally:
        await store.close()
    return path


def connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, timeout=10, isolation_level=None)


def table_names(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    )
    return {r[0] for r in rows}


def outbox_columns(conn: sqlite3.Connection) -> list[tuple[str, str, int, int]]:
    rows = conn.execute("PRAGMA table_info(webhook_outbox)").fetchall()
    return [(name, type_.upper(), notnull, pk) for _cid, name, type_, notnull, _dflt, pk in rows]


def unique_columns(conn: sqlite3.Connection, table: str) -> set[str]:
    out = set()
    for _seq, index, unique, *_ in conn.execute(f"PRAGMA index_list({table})"):
        if unique:
            out |= {r[2] for r in conn.execute(f"PRAGMA index_info({index})")}
    return out


def test_migrating_an_empty_file_gives_the_documented_schema(migrated: Path) -> None:
    conn = connect(migrated)
    try:
        assert table_names(conn) == EXPECTED_TABLES
        assert outbox_columns(conn) == OUTBOX_COLUMNS
        assert unique_columns(conn, "webhook_outbox") == {"event_id"}
        endpoint_columns = {r[1] for r in conn.execute("PRAGMA table_info(webhook_endpoints)")}
        assert endpoint_columns >= ENDPOINT_COLUMNS
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()


def test_outbox_ids_are_never_reused(migrated: Path) -> None:
    """webhookd follows the outbox with a cursor: a reused id would be skipped silently."""
    conn = connect(migrated)
    try:
        insert = "INSERT INTO webhook_outbox (event_type, payload) VALUES ('a.b', '{}')"
        first = conn.execute(insert).lastrowid
        conn.execute("DELETE FROM webhook_outbox WHERE id = ?", (first,))
        second = conn.execute(insert).lastrowid
        assert first is not None
        assert second is not None
        assert second > first
    finally:
        conn.close()


def test_occurred_at_defaults_to_utc_iso8601_with_z(migrated: Path) -> None:
    conn = connect(migrated)
    try:
        conn.execute("INSERT INTO webhook_outbox (event_type, payload) VALUES ('a.b', '{}')")
        [(value,)] = conn.execute("SELECT occurred_at FROM webhook_outbox").fetchall()
    finally:
        conn.close()
    assert isinstance(value, str)
    assert SQLITE_DEFAULT_TIME.fullmatch(value), value
    # UTC, not local time: within an hour of the clock (any timezone offset is at least that)
    assert abs(timestamp_to_unix(value) - datetime.now(UTC).timestamp()) < 3000


@pytest.fixture
def sqlite3_cli() -> str:
    if Path(SQLITE3_CLI).exists():
        return SQLITE3_CLI
    found = shutil.which("sqlite3")
    if found is None:
        pytest.skip("the sqlite3 command-line shell is not installed")
    return found


async def run_cli(cli: str, database: Path, script: str) -> tuple[int | None, str]:
    """Feed ``script`` to the sqlite3 shell; its exit code and stderr."""
    process = await asyncio.create_subprocess_exec(
        cli,
        "-bail",
        str(database),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(
            process.communicate(script.encode()), CLI_TIMEOUT_SECONDS
        )
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode, stderr.decode()


async def test_the_design_example_works_from_the_sqlite3_shell(
    migrated: Path, sqlite3_cli: str
) -> None:
    conn = connect(migrated)
    try:
        conn.execute("CREATE TABLE bookings (id TEXT PRIMARY KEY, status TEXT NOT NULL)")
        conn.execute("INSERT INTO bookings VALUES ('book_123', 'PENDING')")
    finally:
        conn.close()
    store = await open_store(migrated)  # the daemon is running while the app writes
    try:
        assert await run_cli(sqlite3_cli, migrated, DESIGN_EXAMPLE_SQL) == (0, "")

        result = await store.fan_out(plan, 100, NOW)
        assert (result.rows, result.events, result.deliveries, result.quarantined) == (1, 1, 1, ())
        [delivery] = await store.claim_due("crm", NOW, 10)
    finally:
        await store.close()
    conn = connect(migrated)
    try:
        assert conn.execute("SELECT status FROM bookings").fetchall() == [("CONFIRMED",)]
        [(occurred_at, event_id)] = conn.execute(
            "SELECT occurred_at, event_id FROM webhook_outbox"
        ).fetchall()
    finally:
        conn.close()
    assert event_id is None  # generated by webhookd
    assert delivery.event_id.startswith("evt_")
    assert delivery.event_type == "booking.confirmed"
    assert SQLITE_DEFAULT_TIME.fullmatch(delivery.occurred_at)
    assert timestamp_to_unix(delivery.occurred_at) == pytest.approx(
        timestamp_to_unix(occurred_at), abs=0.001
    )
    data = '{"id":"book_123","status":"CONFIRMED","confirmedAt":"2024-01-15T10:05:00Z"}'
    envelope = f'{{"event":"booking.confirmed","timestamp":"{delivery.occurred_at}","data":{data}}}'
    assert delivery.body == envelope.encode()


async def test_an_outbox_table_the_app_created_itself_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    conn = connect(path)
    try:
        conn.execute(
            """
            create table webhook_outbox (
              id integer primary key autoincrement,
              event_type text not null,
              payload text not null,
              event_id text unique,
              tenant text,
              occurred_at text
            )
            """
        )
        conn.execute(
            "INSERT INTO webhook_outbox (event_type, payload, occurred_at) "
            "VALUES ('booking.created', '{\"id\":\"b1\"}', '2024-01-15T10:00:00Z')"
        )
        store = await open_store(path)
        try:
            assert await store.migrate()
            assert outbox_columns(conn) == OUTBOX_COLUMNS
            assert table_names(conn) == EXPECTED_TABLES
            conn.execute(
                "INSERT INTO webhook_outbox (event_type, payload, tenant) "
                "VALUES ('booking.cancelled', '{\"id\":\"b1\"}', 'org_42')"
            )
            result = await store.fan_out(plan, 100, NOW)
            assert (result.rows, result.events, result.quarantined) == (2, 2, ())
            delivered = await store.claim_due("crm", NOW, 10)
        finally:
            await store.close()
    finally:
        conn.close()
    assert [d.event_type for d in delivered] == ["booking.cancelled"]  # routed by tenant
