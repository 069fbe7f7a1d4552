"""Fixtures for the unit tier: pure functions, the in-memory store, tmp files at most."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from webhookd.store.base import load_migrations
from webhookd.store.memory import MemoryBackend


@pytest.fixture(autouse=True)
def _no_webhookd_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own WEBHOOKD_* variables must not change what a test sees."""
    for name in list(os.environ):
        if name.upper().startswith("WEBHOOKD_"):
            monkeypatch.delenv(name)


@pytest.fixture
async def memory_backend() -> AsyncIterator[MemoryBackend]:
    """An open, migrated in-memory store backend; play the application with its
    ``insert_outbox`` / ``upsert_endpoint`` / ``delete_endpoint`` helpers."""
    backend = MemoryBackend()
    await backend.open()
    await backend.migrate()
    yield backend
    await backend.close()


@pytest.fixture
def outbox_db(tmp_path: Path) -> Path:
    """An SQLite file with webhookd's schema (applied with the standard library, synchronously)
    and an application table ``bookings`` holding one row, ('book_123', 'PENDING')."""
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for _version, _name, sql in load_migrations("sqlite"):
            conn.executescript(sql)
        conn.execute("CREATE TABLE bookings (id TEXT PRIMARY KEY, status TEXT NOT NULL)")
        conn.execute("INSERT INTO bookings VALUES ('book_123', 'PENDING')")
    finally:
        conn.close()
    return path
