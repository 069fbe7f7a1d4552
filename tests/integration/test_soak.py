"""Soak: while events keep flowing, pruning keeps the database file from growing.

Two runs of the same length, each a running daemon that delivers to a fast local receiver
while the test INSERTs events at a steady rate, as an application would: one with retention
periods of a second, one that keeps everything (the control). The database file and its WAL
are measured after a warm-up and at the end of the flow, and again once the daemon has seen the
database idle and checkpointed it. The pruned run must stay flat where the control grows.
The figures are printed: ``pytest tests/integration/test_soak.py -s``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from daemon_fixtures import (
    DELIVERY_HEADER,
    OutboxRow,
    daemon_settings,
    eventually,
    insert_outbox,
    running_daemon,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SECRET = "soak-secret"
RUN_SECONDS = 6.0  # of flowing events, per run
WARM_UP_SECONDS = 2.0  # when the pruned run has reached its steady state
TICK_SECONDS = 0.05
ROWS_PER_TICK = 8  # up to 160 events a second
MAX_BACKLOG = 400  # the producer waits while this many are not delivered yet
NOTES = "n" * 600  # payload padding: each event stores its data twice (outbox row, event body)
SETTLE_SECONDS = 30.0

PRUNING: Mapping[str, Any] = {
    "succeeded_seconds": 1.0,
    "failed_seconds": 1.0,
    "outbox_seconds": 1.0,
    "interval_seconds": 0.25,
    "checkpoint_idle_seconds": 0.5,
}
KEEP_EVERYTHING: Mapping[str, Any] = {
    **PRUNING,
    "succeeded_seconds": 0,
    "failed_seconds": 0,
    "outbox_seconds": 0,
}


class FastReceiver:
    """Answers 200 at once and remembers the delivery ids (no per-request bookkeeping)."""

    def __init__(self) -> None:
        self.delivered: set[str] = set()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> FastReceiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.delivered.add(request.headers.get(DELIVERY_HEADER, ""))
        return web.Response(text="ok")


@dataclass(frozen=True)
class Sample:
    db_bytes: int
    wal_bytes: int
    page_count: int
    freelist_pages: int
    deliveries: int

    @property
    def total_bytes(self) -> int:
        return self.db_bytes + self.wal_bytes

    def __str__(self) -> str:
        return (
            f"db {self.db_bytes / 1024:7.0f} KiB + wal {self.wal_bytes / 1024:6.0f} KiB"
            f" = {self.total_bytes / 1024:7.0f} KiB; {self.page_count:5d} pages"
            f" ({self.freelist_pages:4d} free); {self.deliveries:5d} delivery rows"
        )


@dataclass(frozen=True)
class Run:
    name: str
    warm: Sample  # after WARM_UP_SECONDS of flow
    end: Sample  # after RUN_SECONDS of flow
    settled: Sample  # flow stopped, everything delivered, the WAL checkpointed when idle
    produced: int
    delivered: int

    def __str__(self) -> str:
        return (
            f"{self.name}: {self.produced} events inserted, {self.delivered} delivered\n"
            f"  warm-up {self.warm}\n  end     {self.end}\n  settled {self.settled}"
        )


def size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def sample(db: Path) -> Sample:
    with sqlite3.connect(db, timeout=10) as conn:
        page_count = conn.execute("PRAGMA page_count").fetchone()[0]
        freelist = conn.execute("PRAGMA freelist_count").fetchone()[0]
        deliveries = conn.execute("SELECT COUNT(*) FROM webhookd_deliveries").fetchone()[0]
    conn.close()
    return Sample(size(db), size(Path(f"{db}-wal")), page_count, freelist, deliveries)


def backlog(db: Path) -> int:
    """Events not fanned out yet plus deliveries not made yet."""
    with sqlite3.connect(db, timeout=10) as conn:
        (value,) = conn.execute(
            "SELECT (SELECT COUNT(*) FROM webhook_outbox WHERE id >"
            "        (SELECT value FROM webhookd_state WHERE key = 'outbox_cursor'))"
            "     + (SELECT COUNT(*) FROM webhookd_deliveries WHERE state = 'pending')"
        ).fetchone()
    conn.close()
    return int(value)


async def soak(tmp_path: Path, name: str, retention: Mapping[str, Any]) -> Run:
    await asyncio.to_thread(tmp_path.mkdir)
    db = tmp_path / "webhookd.db"
    async with FastReceiver() as receiver:
        settings = daemon_settings(
            tmp_path,
            endpoints=[{"id": "fast", "url": receiver.url, "secret": SECRET}],
            retention=retention,
        )
        async with running_daemon(settings):
            produced = 0
            warm: Sample | None = None
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < RUN_SECONDS:
                if warm is None and elapsed >= WARM_UP_SECONDS:
                    warm = await asyncio.to_thread(sample, db)
                if await asyncio.to_thread(backlog, db) < MAX_BACKLOG:
                    rows = [
                        OutboxRow("booking.created", {"id": f"book_{produced + i}", "notes": NOTES})
                        for i in range(ROWS_PER_TICK)
                    ]
                    await insert_outbox(db, rows)
                    produced += len(rows)
                await asyncio.sleep(TICK_SECONDS)
            end = await asyncio.to_thread(sample, db)
            assert warm is not None

            await eventually(
                lambda: len(receiver.delivered) >= produced,
                within=SETTLE_SECONDS,
                what=f"{produced} deliveries",
            )
            await eventually(
                lambda: backlog(db) == 0, within=SETTLE_SECONDS, what="every outcome recorded"
            )
            await eventually(
                lambda: size(Path(f"{db}-wal")) == 0,
                within=SETTLE_SECONDS,
                what="the WAL checkpointed once idle",
            )
            settled = await asyncio.to_thread(sample, db)
    return Run(name, warm, end, settled, produced, len(receiver.delivered))


async def test_the_database_stays_flat_while_events_keep_flowing(tmp_path: Path) -> None:
    pruned = await soak(tmp_path / "pruned", "pruned (retention 1 s)", PRUNING)
    control = await soak(tmp_path / "control", "control (keeps everything)", KEEP_EVERYTHING)
    report = f"\n{pruned}\n{control}"
    print(report)

    for run in (pruned, control):
        assert run.delivered == run.produced, report  # pruning never loses work in progress
    # The control shows what the flow costs: its file grows all along.
    assert control.end.page_count >= 1.5 * control.warm.page_count, report
    # The pruned database does not: free pages are reused, the WAL stays bounded...
    assert pruned.end.page_count <= 1.2 * pruned.warm.page_count + 32, report
    assert pruned.end.total_bytes <= 2 * pruned.warm.total_bytes, report
    assert pruned.end.page_count * 2 < control.end.page_count, report
    # ...and once idle the WAL is checkpointed away: what is left is the file, as small as
    # during the flow.
    assert pruned.settled.wal_bytes == 0, report
    assert pruned.settled.page_count <= 1.2 * pruned.warm.page_count + 32, report
    assert pruned.settled.total_bytes < pruned.warm.total_bytes, report
