"""The SQLite store runs each transaction on aiosqlite's thread in one hand-over, through the
internals aiosqlite's own methods use (it has no public name for it): this fails first should
a release rename them."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import aiosqlite
import pytest

from webhookd.store.sqlite import on_connection_thread


async def test_runs_on_the_connections_thread_with_the_sqlite3_connection(tmp_path: Path) -> None:
    async with aiosqlite.connect(tmp_path / "t.db", isolation_level=None) as conn:
        await conn.execute("CREATE TABLE t (x INTEGER)")

        def body(raw: sqlite3.Connection) -> tuple[int, str]:
            raw.execute("BEGIN IMMEDIATE")
            raw.executemany("INSERT INTO t VALUES (?)", [(1,), (2,), (3,)])
            raw.execute("COMMIT")
            return raw.execute("SELECT sum(x) FROM t").fetchone()[
                0
            ], threading.current_thread().name

        total, thread = await on_connection_thread(conn, body)
        assert total == 6
        assert thread != threading.current_thread().name  # not the event loop's thread
        assert list(await conn.execute_fetchall("SELECT count(*) FROM t")) == [(3,)]


async def test_an_error_reaches_the_caller(tmp_path: Path) -> None:
    async with aiosqlite.connect(tmp_path / "t.db") as conn:

        def body(raw: sqlite3.Connection) -> None:
            raw.execute("SELECT * FROM no_such_table")

        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            await on_connection_thread(conn, body)
