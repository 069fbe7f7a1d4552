"""Retention ([retention]): finished work is pruned in short batches without keeping the
application's writers waiting, work in progress is never touched, and the WAL is checkpointed
and truncated once the database is idle.

What is pruned and what is kept, per backend, is in test_store_contract.py; here: the settings,
SQLite itself (query plans, a concurrent application writer, checkpoints against real readers),
the daemon's retention task, and its errors.
"""

from __future__ import annotations

import asyncio
import io
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_fixtures import (
    OutboxRow,
    Receiver,
    daemon_settings,
    eventually,
    execute,
    insert_outbox,
    query,
    running_daemon,
)
from operator_fixtures import json_log_lines, logged, samples_by_label

from webhookd.daemon import Daemon
from webhookd.errors import ConfigError, StorageError
from webhookd.metrics import PRUNE_KINDS
from webhookd.retention import Housekeeper, RetentionCutoffs, retention_cutoffs
from webhookd.settings import RetentionSettings, Settings, load_settings
from webhookd.store.base import Store, load_queries
from webhookd.store.sqlite import SQLiteBackend

REPO_ROOT = Path(__file__).resolve().parents[2]
DAY_SECONDS = 24 * 3600.0
FAR_FUTURE = 4_000_000_000.0
SECRET = "retention-secret"
APP_BUSY_TIMEOUT_SECONDS = 1.0
WAIT_SECONDS = 15.0

# Tiny periods, so that a running daemon prunes within a test.
FAST_RETENTION: dict[str, Any] = {
    "succeeded_seconds": 0.3,
    "failed_seconds": 0.3,
    "outbox_seconds": 0.3,
    "interval_seconds": 0.1,
    "checkpoint_idle_seconds": 0.3,
}


# -- settings ---------------------------------------------------------------------------------


def test_defaults_keep_a_week_of_work_and_a_month_of_dead_letters() -> None:
    retention = Settings.model_validate({}).retention
    assert (retention.succeeded_seconds, retention.failed_seconds, retention.outbox_seconds) == (
        7 * DAY_SECONDS,
        30 * DAY_SECONDS,
        7 * DAY_SECONDS,
    )
    assert (retention.batch_size, retention.interval_seconds) == (500, 60.0)
    assert retention.checkpoint_idle_seconds == 5.0


def test_the_example_config_documents_the_defaults() -> None:
    example = load_settings(REPO_ROOT / "config.example.toml").retention
    assert example == RetentionSettings()


def test_a_period_of_zero_keeps_those_rows_forever() -> None:
    settings = RetentionSettings(succeeded_seconds=10, failed_seconds=0, outbox_seconds=0)
    assert retention_cutoffs(settings, 1000.0) == RetentionCutoffs(990.0, None, None)
    nothing = RetentionSettings(succeeded_seconds=0, failed_seconds=0, outbox_seconds=0)
    assert not retention_cutoffs(nothing, 1000.0).prunes_anything


def test_impossible_values_are_refused_with_their_keys(tmp_path: Path) -> None:
    config = tmp_path / "webhookd.toml"
    config.write_text(
        "[retention]\n"
        "succeeded_seconds = -1\n"
        "batch_size = 0\n"
        "interval_seconds = 0\n"
        "checkpoint_idle_seconds = -5\n"
        "keep_forever = true\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    text = str(caught.value)
    for key in (
        "retention.succeeded_seconds",
        "retention.batch_size",
        "retention.interval_seconds",
        "retention.checkpoint_idle_seconds",
        "retention.keep_forever",
    ):
        assert key in text


# -- SQLite -----------------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(SQLiteBackend(tmp_path / "app.db"))
    await s.open()
    await s.migrate()
    try:
        yield s
    finally:
        await s.close()


def fill(db: Path, n: int, *, final_at: float = 1000.0) -> None:
    """``n`` outbox rows fanned out long ago, each with one succeeded delivery of two attempts:
    written with plain SQL, so that a test starts with much to prune in no time."""
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO webhook_outbox (id, event_type, payload, event_id) VALUES (?, ?, ?, ?)",
            [(i, "booking.created", '{"id":"b"}', f"evt_{i}") for i in range(1, n + 1)],
        )
        conn.execute("UPDATE webhookd_state SET value = ? WHERE key = 'outbox_cursor'", (n,))
        conn.executemany(
            "INSERT INTO webhookd_events (id, outbox_id, event_id, event_type, occurred_at, body,"
            " created_at) VALUES (?, ?, ?, 'booking.created', '2024-01-15T10:00:00Z', ?, ?)",
            [(i, i, f"evt_{i}", b"x" * 200, final_at) for i in range(1, n + 1)],
        )
        conn.executemany(
            "INSERT INTO webhookd_deliveries (id, delivery_id, event_pk, endpoint_id, state,"
            " attempts, created_at, updated_at) VALUES (?, ?, ?, 'a', 'succeeded', 2, ?, ?)",
            [(i, f"dlv_{i}", i, final_at, final_at) for i in range(1, n + 1)],
        )
        conn.executemany(
            "INSERT INTO webhookd_attempts (delivery_pk, attempt_no, started_at,"
            " duration_seconds, result) VALUES (?, ?, ?, 0.01, 'success')",
            [(i, k, final_at) for i in range(1, n + 1) for k in (1, 2)],
        )


TABLE_SCANS = [
    ["SCAN", table]
    for table in (
        "webhook_outbox",
        "webhookd_events",
        "webhookd_deliveries",
        "webhookd_attempts",
        "webhookd_quarantine",
    )
]


def count(db: Path, table: str) -> int:
    return int(query(db, f"SELECT COUNT(*) FROM {table}")[0][0])


async def test_the_prune_queries_search_indexes_instead_of_scanning_tables(
    store: Store, tmp_path: Path
) -> None:
    fill(tmp_path / "app.db", 2000)  # with its statistics, as after PRAGMA optimize
    queries = load_queries("sqlite")
    params = {"state": "succeeded", "before": 1.0, "limit": 10, "after": 0, "pks": "[]"}
    with sqlite3.connect(tmp_path / "app.db") as conn:
        conn.execute("ANALYZE")
        for name in (
            "prunable_deliveries",
            "delete_attempts_of",
            "delete_deliveries",
            "prunable_events",
            "delete_events",
            "prunable_outbox",
            "delete_outbox",
            "prunable_quarantine",
            "delete_quarantine",
        ):
            sql = queries[name]
            used = {k: v for k, v in params.items() if f":{k}" in sql}
            plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", used)]
            scans = [step for step in plan if step.split()[:2] in TABLE_SCANS]
            assert scans == [], f"{name} reads a whole table: {plan}"


async def test_an_application_writer_is_never_kept_waiting_while_pruning(
    store: Store, tmp_path: Path
) -> None:
    db = tmp_path / "app.db"
    n = 3000
    fill(db, n)
    seen: list[int] = []  # deliveries left, as the application saw them after each write
    errors: list[str] = []
    done = threading.Event()

    def application() -> None:
        conn = sqlite3.connect(db, timeout=APP_BUSY_TIMEOUT_SECONDS, isolation_level=None)
        try:
            while not done.is_set():
                try:
                    conn.execute(
                        "INSERT INTO webhook_outbox (event_type, payload) VALUES (?, ?)",
                        ("booking.created", '{"id":"new"}'),
                    )
                    seen.append(
                        conn.execute("SELECT COUNT(*) FROM webhookd_deliveries").fetchone()[0]
                    )
                except sqlite3.OperationalError as exc:
                    errors.append(str(exc))
                time.sleep(0.005)
        finally:
            conn.close()

    writer = threading.Thread(target=application)
    writer.start()
    try:
        everything = RetentionCutoffs(FAR_FUTURE, FAR_FUTURE, FAR_FUTURE)
        counts = await store.prune(everything, 200)
    finally:
        done.set()
        await asyncio.to_thread(writer.join, WAIT_SECONDS)

    assert errors == []  # no write waited out its busy timeout
    assert (counts.deliveries_succeeded, counts.attempts, counts.events) == (n, 2 * n, n)
    assert counts.outbox == n  # the application's new rows are not fanned out: kept
    assert count(db, "webhook_outbox") == len(seen) + len(errors)
    # Its writes went in between the batches, not only before or after the whole pass.
    assert len({c for c in seen if 0 < c < n}) >= 3, sorted(set(seen))


async def test_a_pass_with_nothing_to_prune_takes_no_write_lock(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    quick = Store(SQLiteBackend(db, busy_timeout_seconds=0.05))
    await quick.open()
    await quick.migrate()
    await write_something(db)  # processed by nobody: nothing is prunable
    app = sqlite3.connect(db, isolation_level=None)
    try:
        app.execute("BEGIN IMMEDIATE")  # the application is in the middle of a write
        everything = RetentionCutoffs(FAR_FUTURE, FAR_FUTURE, FAR_FUTURE)
        counts = await asyncio.wait_for(quick.prune(everything, 100), WAIT_SECONDS)
        assert (counts.total, counts.batches, counts.complete) == (0, 0, True)
        app.execute("ROLLBACK")
    finally:
        app.close()
        await quick.close()


def wal_bytes(db: Path) -> int:
    wal = Path(f"{db}-wal")
    return wal.stat().st_size if wal.exists() else 0


async def write_something(app_db: Path, n: int = 20) -> None:
    await insert_outbox(app_db, [OutboxRow("booking.created", {"id": f"b{i}"}) for i in range(n)])


async def test_a_checkpoint_truncates_the_wal_when_nobody_reads(
    store: Store, tmp_path: Path
) -> None:
    db = tmp_path / "app.db"
    await write_something(db)
    assert wal_bytes(db) > 0

    result = await store.checkpoint(truncate=True)

    assert (result.mode, result.busy, result.done, result.wal_bytes) == ("truncate", False, True, 0)
    assert result.wal_frames > 0
    assert wal_bytes(db) == 0
    assert (await store.checkpoint(truncate=True)).wal_frames == 0  # nothing left to do


async def test_a_checkpoint_that_a_reader_is_in_the_way_of_is_reported_not_raised(
    store: Store, tmp_path: Path
) -> None:
    db = tmp_path / "app.db"
    await write_something(db)
    reader = sqlite3.connect(db, isolation_level=None)
    try:
        # A read transaction that started before the last write keeps that write in the WAL.
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM webhook_outbox").fetchall()
        await write_something(db)
        behind = await store.checkpoint(truncate=True)
        assert (behind.mode, behind.busy, behind.done) == ("passive", False, False)
        assert behind.checkpointed_frames < behind.wal_frames
        reader.execute("COMMIT")

        # One that has seen every write still reads the WAL: it cannot be truncated under it.
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM webhook_outbox").fetchall()
        blocked = await store.checkpoint(truncate=True)
        assert (blocked.mode, blocked.busy, blocked.done) == ("truncate", True, False)
        assert wal_bytes(db) > 0
        await write_something(db, 1)  # the application still writes
    finally:
        reader.close()

    after = await store.checkpoint(truncate=True)
    assert (after.busy, after.done, wal_bytes(db)) == (False, True, 0)


async def test_the_housekeeper_checkpoints_once_per_idle_period(
    store: Store, tmp_path: Path
) -> None:
    db = tmp_path / "app.db"
    settings = RetentionSettings(checkpoint_idle_seconds=5.0, interval_seconds=60.0)
    clock = [100.0]
    errors: list[StorageError] = []
    keeper = Housekeeper(
        store, lambda: settings, lambda _op, exc: errors.append(exc), monotonic=lambda: clock[0]
    )
    stop = asyncio.Event()

    async def round_at(t: float) -> None:
        clock[0] = t
        await keeper.round(settings, stop)

    await round_at(100.0)
    await write_something(db)
    await round_at(101.0)  # the write is seen: idle from here
    await round_at(105.9)
    assert keeper.last_checkpoint is None
    assert wal_bytes(db) > 0
    await round_at(106.0)
    first = keeper.last_checkpoint
    assert first is not None
    assert first.done
    assert wal_bytes(db) == 0
    await round_at(112.0)
    await round_at(130.0)
    assert keeper.last_checkpoint is first  # truncating the WAL is not a write to wait out
    await write_something(db)
    await round_at(131.0)
    await round_at(136.0)
    assert keeper.last_checkpoint is not first
    assert errors == []


async def test_the_housekeeper_prunes_at_the_start_and_then_every_interval(
    store: Store, tmp_path: Path
) -> None:
    db = tmp_path / "app.db"
    fill(db, 10)
    settings = RetentionSettings(interval_seconds=60.0, checkpoint_idle_seconds=0)
    clock = [0.0]
    keeper = Housekeeper(
        store, lambda: settings, lambda _op, _exc: None, monotonic=lambda: clock[0]
    )
    stop = asyncio.Event()

    await keeper.round(settings, stop)
    assert keeper.last_prune is not None
    assert keeper.last_prune.deliveries_succeeded == 10
    # One more processed outbox row (without its event: enough for the outbox's retention).
    await execute(db, "INSERT INTO webhook_outbox (event_type, payload) VALUES ('a.b', '{}')")
    await execute(db, "UPDATE webhookd_state SET value = value + 1 WHERE key = 'outbox_cursor'")
    first = keeper.last_prune
    clock[0] = 59.0
    await keeper.round(settings, stop)
    assert keeper.last_prune is first
    clock[0] = 60.0
    await keeper.round(settings, stop)
    assert keeper.last_prune is not first
    assert keeper.last_prune.outbox == 1


# -- the daemon -------------------------------------------------------------------------------


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """The daemon's log lines at info level and above, as it writes them (JSON)."""
    with json_log_lines(logging.INFO) as stream:
        yield stream


def metric(daemon: Daemon, name: str, label: str) -> dict[str, float]:
    return samples_by_label(daemon.metrics.render().decode(), name, label)


def endpoints(receiver: Receiver) -> list[dict[str, Any]]:
    return [
        {"id": "ok", "url": receiver.url("/ok"), "secret": SECRET, "events": ["booking.*"]},
        {"id": "down", "url": receiver.url("/down"), "secret": SECRET, "events": ["payment.*"]},
    ]


def answer(request: Any) -> int:
    return 500 if request.path == "/down" else 200


async def test_the_daemon_prunes_finished_work_and_keeps_work_in_progress(
    tmp_path: Path, log_lines: io.StringIO
) -> None:
    db = tmp_path / "webhookd.db"
    async with Receiver(answer=answer) as receiver:
        settings = daemon_settings(
            tmp_path,
            endpoints=endpoints(receiver),
            retry={"initial_delay_seconds": 3600.0},  # "down" stays pending all along
            retention=FAST_RETENTION,
        )
        async with running_daemon(settings) as daemon:
            await insert_outbox(
                db,
                [OutboxRow("booking.created", {"id": f"book_{i}"}) for i in range(5)]
                + [OutboxRow("payment.succeeded", {"id": "pay_1"}, event_id="evt_pending")],
            )
            await eventually(lambda: len(receiver.answered()) == 6, what="six first attempts")

            def only_the_pending_work_is_left() -> bool:
                left = query(
                    db,
                    "SELECT d.endpoint_id, d.state, e.event_id FROM webhookd_deliveries AS d"
                    " JOIN webhookd_events AS e ON e.id = d.event_pk",
                )
                return [tuple(row) for row in left] == [("down", "pending", "evt_pending")] and (
                    count(db, "webhookd_events"),
                    count(db, "webhookd_attempts"),
                    count(db, "webhook_outbox"),
                ) == (1, 1, 0)

            await eventually(only_the_pending_work_is_left, what="the finished work pruned")
            await eventually(lambda: wal_bytes(db) == 0, what="the WAL truncated once idle")
            pruned = metric(daemon, "webhookd_pruned_rows_total", "kind")

    assert set(pruned) == set(PRUNE_KINDS)
    assert pruned["deliveries_succeeded"] == 5
    assert (pruned["attempts"], pruned["events"], pruned["outbox"]) == (5, 5, 6)
    lines = logged(log_lines, "pruned")
    assert lines
    assert all(line["level"] == "info" for line in lines)
    assert sum(line["deliveries_succeeded"] for line in lines) == 5
    assert sum(line["outbox"] for line in lines) == 6
    assert all(sum(line[k] for k in PRUNE_KINDS) > 0 for line in lines)  # never "0 pruned"
    assert len(receiver.on_path("/down")) == 1  # its retry is an hour away: nothing lost


async def test_a_failing_prune_is_reported_and_retried_while_deliveries_go_on(
    tmp_path: Path, log_lines: io.StringIO
) -> None:
    db = tmp_path / "webhookd.db"
    async with Receiver() as receiver:
        settings = daemon_settings(
            tmp_path,
            endpoints=[{"id": "ok", "url": receiver.url("/ok"), "secret": SECRET}],
            retention=FAST_RETENTION,
        )
        async with running_daemon(settings) as daemon:
            # Pruning reads webhookd_quarantine; fan-out of valid rows does not.
            await execute(db, "ALTER TABLE webhookd_quarantine RENAME TO hidden_quarantine")
            await eventually(
                lambda: metric(daemon, "webhookd_store_errors_total", "operation").get("prune"),
                what="a failed prune",
            )
            await insert_outbox(db, [OutboxRow("booking.created", {"id": "book_1"})])
            await eventually(lambda: len(receiver.answered()) == 1, what="the delivery")
            assert daemon.dispatcher.crashed is None
            assert count(db, "webhookd_deliveries") == 1

            await execute(db, "ALTER TABLE hidden_quarantine RENAME TO webhookd_quarantine")
            await eventually(lambda: count(db, "webhookd_deliveries") == 0, what="pruning again")

    errors = [line for line in logged(log_lines, "store_error") if line["operation"] == "prune"]
    assert errors
    assert "webhookd_quarantine" in errors[0]["error"]
