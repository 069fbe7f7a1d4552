"""Persistence. The dispatcher talks to :class:`~webhookd.store.base.Store` only."""

from __future__ import annotations

from webhookd.metrics import Metrics
from webhookd.settings import Settings
from webhookd.store.base import Store, StoreBackend


def open_store(settings: Settings, metrics: Metrics | None = None) -> Store:
    """The store the settings name: PostgreSQL when ``database.url`` is set, else the embedded
    SQLite file at ``database.path``. Not yet connected."""
    db = settings.database
    backend: StoreBackend
    if db.is_postgres:
        from webhookd.store.postgres import PostgresBackend

        backend = PostgresBackend(
            db.url,
            password=db.postgres_password(),
            pool_size=db.pool_size,
            connect_timeout_seconds=db.connect_timeout_seconds,
            # Longer than one attempt can take, plus a margin; renewed while it is held.
            lease_seconds=settings.delivery.timeout_seconds + db.lease_margin_seconds,
        )
    else:
        from webhookd.store.sqlite import SQLiteBackend

        backend = SQLiteBackend(db.path, busy_timeout_seconds=db.busy_timeout_seconds)
    return Store(backend, metrics)
