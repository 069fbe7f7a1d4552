"""The store interface: a Protocol that backends implement (I/O only) and the shared layer on
top of it that does the counting and logging (as saq's ``finish()`` → ``_finish()``)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Protocol

from webhookd.log import log_event
from webhookd.metrics import Metrics
from webhookd.models import (
    AttemptOutcome,
    Delivery,
    DeliveryFilter,
    DeliveryRecord,
    DeliveryState,
    Event,
    FanoutPlan,
    FanoutResult,
    OutboxRow,
    PlannedEvent,
    Quarantined,
    QuarantineRecord,
)

logger = logging.getLogger("webhookd.store")

Planner = Callable[[Sequence[OutboxRow]], FanoutPlan]


class StoreBackend(Protocol):
    """What a backend does. Backends translate driver errors into StorageError."""

    description: str

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def migrate(self) -> list[int]: ...
    async def claim_ownership(self) -> None:
        """Called by the daemon before it dispatches; raises StoreLockedError if another
        daemon must not share this database with it."""
        ...

    async def schema_version(self) -> int: ...
    async def ping(self) -> None: ...

    async def outbox_changed(self) -> bool:
        """Cheap: whether anything was committed since the last call (may say yes spuriously)."""
        ...

    async def fan_out(
        self, planner: Planner, limit: int, now: float, *, max_payload_bytes: int | None = None
    ) -> FanoutResult:
        """Read up to ``limit`` new outbox rows, plan them, and write events, deliveries and
        quarantine rows and mark the outbox rows done, atomically. A payload over
        ``max_payload_bytes`` is not read: the planner gets an OversizedPayload instead."""
        ...

    async def oldest_unprocessed(self) -> str | None: ...
    async def endpoints_version(self) -> int: ...
    async def table_endpoints(self) -> list[Mapping[str, object]]: ...
    async def rotate_secret(self, endpoint_id: str, secret: str, expires_at: str) -> bool:
        """Make ``secret`` the table endpoint's secret; the old one signs until ``expires_at``
        (UTC ISO-8601). False when there is no such table endpoint."""
        ...

    async def claim_due(self, endpoint_id: str, now: float, limit: int) -> list[Delivery]:
        """Up to ``limit`` due pending deliveries of the endpoint, leased to this daemon."""
        ...

    async def next_due_at(self, endpoint_id: str) -> float | None: ...
    async def record(self, outcomes: Sequence[AttemptOutcome]) -> None:
        """Persist attempts and the deliveries' new states, and end their leases."""
        ...

    async def release(self, delivery_pks: Sequence[int]) -> None:
        """End leases without recording an attempt (the delivery stays as it was)."""
        ...

    async def record_test_send(
        self, event: Event, endpoint_id: str, delivery_id: str, outcome: AttemptOutcome
    ) -> None:
        """Write, atomically, a test event (no outbox row: ``event.outbox_id`` is ignored), its
        one delivery to ``endpoint_id`` in the final state ``outcome.new_state`` with
        ``outcome.attempt_no`` attempts, and the attempt (``outcome.delivery_pk`` is ignored)."""
        ...

    async def pending_counts(self) -> dict[str, int]: ...
    async def list_deliveries(self, filters: DeliveryFilter) -> list[DeliveryRecord]: ...
    async def get_delivery(self, delivery_id: str) -> DeliveryRecord | None: ...
    async def list_quarantine(self, limit: int) -> list[QuarantineRecord]: ...


class Store:
    """The store the rest of webhookd uses: a backend plus counting and logging."""

    def __init__(self, backend: StoreBackend, metrics: Metrics | None = None) -> None:
        self.backend = backend
        self.metrics = metrics

    @property
    def description(self) -> str:
        return self.backend.description

    async def open(self) -> None:
        await self.backend.open()

    async def close(self) -> None:
        await self.backend.close()

    async def migrate(self) -> list[int]:
        applied = await self.backend.migrate()
        for version in applied:
            log_event(logger, logging.INFO, "migration_applied", version=version)
        return applied

    async def schema_version(self) -> int:
        return await self.backend.schema_version()

    async def ping(self) -> None:
        await self.backend.ping()

    async def outbox_changed(self) -> bool:
        return await self.backend.outbox_changed()

    async def fan_out(
        self, planner: Planner, limit: int, now: float, *, max_payload_bytes: int | None = None
    ) -> FanoutResult:
        result = await self.backend.fan_out(
            planner, limit, now, max_payload_bytes=max_payload_bytes
        )
        if self.metrics is not None and result.events:
            self.metrics.events_dispatched.inc(result.events)
        for q in result.quarantined:
            if self.metrics is not None:
                self.metrics.events_rejected.labels(reason=q.reason).inc()
            log_event(
                logger,
                logging.WARNING,
                "row_quarantined",
                outbox_id=q.outbox_id,
                reason=q.reason,
                detail=q.detail,
                event_type=q.event_type,
            )
        return result

    async def oldest_unprocessed(self) -> str | None:
        return await self.backend.oldest_unprocessed()

    async def endpoints_version(self) -> int:
        return await self.backend.endpoints_version()

    async def table_endpoints(self) -> list[Mapping[str, object]]:
        return await self.backend.table_endpoints()

    async def rotate_secret(self, endpoint_id: str, secret: str, expires_at: str) -> bool:
        rotated = await self.backend.rotate_secret(endpoint_id, secret, expires_at)
        if rotated:
            log_event(
                logger,
                logging.INFO,
                "secret_rotated",
                endpoint=endpoint_id,
                previous_until=expires_at,
            )
        return rotated

    async def claim_due(self, endpoint_id: str, now: float, limit: int) -> list[Delivery]:
        return await self.backend.claim_due(endpoint_id, now, limit)

    async def next_due_at(self, endpoint_id: str) -> float | None:
        return await self.backend.next_due_at(endpoint_id)

    async def record(
        self, outcomes: Sequence[AttemptOutcome], endpoints: Mapping[int, str]
    ) -> None:
        """Persist outcomes; ``endpoints`` maps delivery pk → endpoint id for the counters."""
        await self.backend.record(outcomes)
        if self.metrics is None:
            return
        for outcome in outcomes:
            if outcome.new_state is not DeliveryState.PENDING:
                label = self.metrics.endpoint_label(endpoints.get(outcome.delivery_pk, "?"))
                self.metrics.deliveries.labels(endpoint=label, outcome=outcome.new_state).inc()

    async def release(self, delivery_pks: Sequence[int]) -> None:
        await self.backend.release(delivery_pks)

    async def record_test_send(
        self, event: Event, endpoint_id: str, delivery_id: str, outcome: AttemptOutcome
    ) -> None:
        """Record a ``webhookd send-test`` attempt, so that ``deliveries list/show`` show it.

        The delivery is created final (succeeded or failed): a test is never retried.
        """
        if outcome.new_state is DeliveryState.PENDING:
            raise ValueError("a test send is never retried: its outcome must be final")
        await self.backend.record_test_send(event, endpoint_id, delivery_id, outcome)
        log_event(
            logger,
            logging.INFO,
            "test_send_recorded",
            endpoint=endpoint_id,
            delivery=delivery_id,
            event_type=event.event_type,
            outcome=outcome.new_state.value,
        )

    async def pending_counts(self) -> dict[str, int]:
        return await self.backend.pending_counts()

    async def list_deliveries(self, filters: DeliveryFilter) -> list[DeliveryRecord]:
        return await self.backend.list_deliveries(filters)

    async def get_delivery(self, delivery_id: str) -> DeliveryRecord | None:
        return await self.backend.get_delivery(delivery_id)

    async def list_quarantine(self, limit: int) -> list[QuarantineRecord]:
        return await self.backend.list_quarantine(limit)


def decode_outbox_value(value: object) -> object:
    """Outbox columns are read as bytes, so that text that is not valid UTF-8 cannot fail the
    read: valid UTF-8 becomes text, the rest stays bytes (and its row is quarantined)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def split_duplicates(
    planned: Sequence[PlannedEvent], existing: set[str]
) -> tuple[list[PlannedEvent], list[Quarantined]]:
    """Events whose id was already fanned out (``existing``) or appears earlier in the same
    batch are quarantined as ``duplicate_event_id``; the rest are kept, in order."""
    seen = set(existing)
    kept: list[PlannedEvent] = []
    duplicates: list[Quarantined] = []
    for p in planned:
        if p.event.event_id in seen:
            duplicates.append(
                Quarantined(
                    outbox_id=p.event.outbox_id,
                    reason="duplicate_event_id",
                    detail=f"event_id {p.event.event_id!r} was already delivered",
                    event_type=p.event.event_type,
                    event_id=p.event.event_id,
                )
            )
        else:
            seen.add(p.event.event_id)
            kept.append(p)
    return kept, duplicates


_NAME_RE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def load_queries(dialect: str) -> dict[str, str]:
    """The named queries of ``store/sql/<dialect>/queries.sql``."""
    text = resources.files("webhookd.store").joinpath("sql", dialect, "queries.sql").read_text()
    parts = _NAME_RE.split(text)
    return {name: sql.strip() for name, sql in zip(parts[1::2], parts[2::2], strict=True)}


def load_migrations(dialect: str) -> list[tuple[int, str, str]]:
    """(version, name, sql) of ``store/sql/<dialect>/migrations/NNNN_name.sql``, in order."""
    folder = resources.files("webhookd.store").joinpath("sql", dialect, "migrations")
    out = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            out.append((int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(out)
