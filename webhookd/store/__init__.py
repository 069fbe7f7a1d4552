"""Persistence. The dispatcher talks to :class:`~webhookd.store.base.Store` only."""

from __future__ import annotations

from webhookd.metrics import Metrics
from webhookd.settings import Settings
from webhookd.store.base import Store


def open_store(settings: Settings, metrics: Metrics | None = None) -> Store:
    """The store the settings name (the embedded SQLite file by default). Not yet connected."""
    from webhookd.store.sqlite import SQLiteBackend

    backend = SQLiteBackend(
        settings.database.path,
        busy_timeout_seconds=settings.database.busy_timeout_seconds,
    )
    return Store(backend, metrics)
