"""The store interface: a Protocol that backends implement (I/O only) and the shared layer on
top of it that does the counting and logging (as saq's ``finish()`` → ``_finish()``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from importlib import resources
from typing import Any, Protocol

from webhookd.log import log_event
from webhookd.metrics import PRUNE_KINDS, Metrics
from webhookd.models import (
    AttemptOutcome,
    Delivery,
    DeliveryFilter,
    DeliveryRecord,
    DeliveryState,
    EndpointHealth,
    EndpointRemoval,
    EndpointState,
    Event,
    EventRecord,
    FanoutPlan,
    FanoutResult,
    OutboxRow,
    PlannedEvent,
    Quarantined,
    QuarantineRecord,
    StoreStats,
)
from webhookd.retention import CheckpointResult, PruneCounts, RetentionCutoffs

logger = logging.getLogger("webhookd.store")

# Between two pruning transactions the store pauses this long, or PRUNE_PAUSE_FACTOR times as
# long as the transaction took: the application's writers wait for the lock in a busy handler
# that polls (every 1 ms at first, every 100 ms after a while), so a pass that took the lock
# again at once could keep them waiting until their busy timeout.
PRUNE_PAUSE_SECONDS = 0.05
PRUNE_PAUSE_FACTOR = 4.0

Planner = Callable[[Sequence[OutboxRow]], FanoutPlan]
# One batch of one kind of pruning: ({kind: rows deleted}, whether there may be more).
_PruneStep = Callable[[], Awaitable[tuple[dict[str, int], bool]]]


class StoreBackend(Protocol):
    """What a backend does. Backends translate driver errors into StorageError."""

    description: str
    # None: one daemon owns the store and knows every change it makes. Otherwise other daemons
    # share it (PostgreSQL replicas): an idle endpoint worker looks again after this long.
    recheck_seconds: float | None

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
        self,
        planner: Planner,
        limit: int,
        now: float,
        *,
        max_payload_bytes: int | None = None,
        before_planning: Callable[[], Awaitable[None]] | None = None,
    ) -> FanoutResult:
        """Read up to ``limit`` new outbox rows, plan them, and write events, deliveries and
        quarantine rows and mark the outbox rows done, atomically. A payload over
        ``max_payload_bytes`` is not read: the planner gets an OversizedPayload instead.
        ``before_planning`` runs after the rows are read and before they are planned: whatever
        committed before those rows (an endpoint the application added just before its event)
        is visible to it."""
        ...

    async def oldest_unprocessed(self) -> str | None: ...
    async def endpoints_version(self) -> int: ...
    async def table_endpoints(self) -> list[Mapping[str, object]]: ...
    async def rotate_secret(self, endpoint_id: str, secret: str, expires_at: str) -> bool:
        """Make ``secret`` the table endpoint's secret; the old one signs until ``expires_at``
        (UTC ISO-8601). False when there is no such table endpoint."""
        ...

    async def claim_due(
        self, endpoint_id: str, now: float, limit: int, *, cap: int | None = None
    ) -> list[Delivery]:
        """Up to ``limit`` due pending deliveries of the endpoint, leased to this daemon.
        ``cap``: the endpoint's in-flight cap across every daemon sharing the store (a store
        that one daemon owns ignores it: ``limit`` already respects it)."""
        ...

    def take_woken_endpoints(self) -> set[str]:
        """Endpoints whose deliveries another daemon made due since the last call (a store
        that one daemon owns: always empty)."""
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

    # -- the circuit breaker (webhookd_endpoint_state) ----------------------------------------

    async def endpoint_states(self) -> dict[str, EndpointState]:
        """Every endpoint's stored state, by id (an endpoint without one is ok)."""
        ...

    async def save_endpoint_state(self, state: EndpointState, *, disable_row: bool) -> None:
        """Write the endpoint's state. With ``disable_row`` (a table endpoint the daemon
        disabled) also set its webhook_endpoints row's ``enabled`` to 0, atomically."""
        ...

    async def clear_endpoint_state(self, endpoint_id: str) -> EndpointState | None:
        """Delete the endpoint's state (it starts afresh, ok) and move ``endpoints_version``
        so that a running daemon notices; the state deleted, or None (nothing written)."""
        ...

    async def list_deliveries(self, filters: DeliveryFilter) -> list[DeliveryRecord]: ...
    async def get_delivery(self, delivery_id: str) -> DeliveryRecord | None: ...
    async def list_quarantine(self, limit: int) -> list[QuarantineRecord]: ...

    # -- retention (see webhookd.retention) --------------------------------------------------

    async def prune_deliveries(
        self, state: DeliveryState, updated_before: float, limit: int
    ) -> tuple[int, int]:
        """In one write transaction, delete up to ``limit`` deliveries in the final ``state``
        last updated before ``updated_before``, oldest first, with their attempts. Returns
        (deliveries, attempts) deleted."""
        ...

    async def prune_events(
        self, created_before: float, after_pk: int, limit: int
    ) -> tuple[int, int | None]:
        """In one write transaction, delete up to ``limit`` events fanned out before
        ``created_before`` that have no deliveries left, looking at events after ``after_pk``
        in pk order. Returns how many were deleted and the pk to go on after, or None when
        there is nothing more to look at."""
        ...

    async def prune_outbox(self, processed_before: float, limit: int) -> int:
        """In one write transaction, delete up to ``limit`` of the oldest outbox rows fanned out
        before ``processed_before``; never a row past the cursor (not fanned out yet)."""
        ...

    async def prune_quarantine(self, quarantined_before: float, limit: int) -> int:
        """In one write transaction, delete up to ``limit`` of the oldest quarantine rows
        quarantined before ``quarantined_before``."""
        ...

    async def changes(self) -> int:
        """A number that moves whenever anything is committed to the database, by anyone.
        Unlike outbox_changed() it keeps no memory, so any number of callers may watch it."""
        ...

    async def checkpoint(self, *, truncate: bool) -> CheckpointResult:
        """Copy the WAL into the database file without waiting for anyone (PASSIVE); then, with
        ``truncate`` and when that copied everything, empty the WAL file (TRUNCATE), giving up
        at once (busy) rather than keep the application waiting."""
        ...

    # -- administration (`webhookd endpoints|deliveries|events|stats`) ------------------------

    async def create_endpoint(self, row: Mapping[str, object]) -> bool:
        """INSERT a webhook_endpoints row with every column of ENDPOINT_ROW_COLUMNS; False
        (and nothing written) when a row with that id exists."""
        ...

    async def update_endpoint(self, row: Mapping[str, object]) -> bool:
        """Overwrite the row with ``row["id"]`` (every column of ENDPOINT_ROW_COLUMNS); False
        when there is none."""
        ...

    async def remove_endpoint(self, endpoint_id: str, *, force: bool) -> EndpointRemoval:
        """DELETE the row, unless the endpoint has pending deliveries and not ``force``.
        The check and the delete are one transaction. Deliveries are never touched."""
        ...

    async def endpoint_health(self, since: float) -> dict[str, EndpointHealth]:
        """Per endpoint id with attempts, pending deliveries or a failed attempt: attempts and
        successes since ``since``, their p95 duration, the latest failed attempt (any time),
        pending deliveries."""
        ...

    async def requeue(
        self, delivery_ids: Sequence[str], now: float, states: Collection[str]
    ) -> list[str]:
        """Make the deliveries among ``delivery_ids`` whose state is in ``states`` pending and
        due at ``now`` with a fresh retry schedule (attempt numbers go on). Moves
        ``requeued_version`` when any changed. Returns the ids changed."""
        ...

    async def requeued_version(self) -> int:
        """A counter that ``requeue`` moves: the daemon wakes its workers when it changes."""
        ...

    async def get_event(self, event_id: str) -> EventRecord | None: ...
    async def quarantined_event(self, event_id: str) -> list[QuarantineRecord]:
        """Quarantined outbox rows that carried ``event_id``, oldest first."""
        ...

    async def unprocessed_outbox_id(self, event_id: str) -> int | None:
        """The id of the outbox row with ``event_id`` if it is not fanned out yet."""
        ...

    async def stats(self, now: float, since: float, top: int) -> StoreStats: ...


# Every column that the admin commands write in webhook_endpoints, with the schema's defaults.
ENDPOINT_ROW_COLUMNS: tuple[str, ...] = (
    "id",
    "url",
    "secret",
    "events",
    "tenant",
    "enabled",
    "max_concurrency",
    "headers",
    "description",
    "signature_schemes",
    "previous_secret",
    "previous_secret_expires_at",
    "ca_bundle",
)
ENDPOINT_ROW_DEFAULTS: Mapping[str, object] = {
    "events": "*",
    "tenant": None,
    "enabled": 1,
    "max_concurrency": None,
    "headers": None,
    "description": "",
    "signature_schemes": "seed",
    "previous_secret": None,
    "previous_secret_expires_at": None,
    "ca_bundle": None,
}


def endpoint_row(row: Mapping[str, object]) -> dict[str, object]:
    """``row`` with the schema's defaults for absent columns; unknown columns are refused."""
    unknown = set(row) - set(ENDPOINT_ROW_COLUMNS)
    if unknown:
        raise ValueError(f"webhook_endpoints has no column(s) {sorted(unknown)}")
    for column in ("id", "url", "secret"):
        if row.get(column) is None:
            raise ValueError(f"an endpoint row needs {column}")
    values = {**ENDPOINT_ROW_DEFAULTS, **row}
    return {c: values[c] for c in ENDPOINT_ROW_COLUMNS}


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
        self,
        planner: Planner,
        limit: int,
        now: float,
        *,
        max_payload_bytes: int | None = None,
        before_planning: Callable[[], Awaitable[None]] | None = None,
    ) -> FanoutResult:
        result = await self.backend.fan_out(
            planner,
            limit,
            now,
            max_payload_bytes=max_payload_bytes,
            before_planning=before_planning,
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

    @property
    def recheck_seconds(self) -> float | None:
        return self.backend.recheck_seconds

    async def claim_due(
        self, endpoint_id: str, now: float, limit: int, *, cap: int | None = None
    ) -> list[Delivery]:
        return await self.backend.claim_due(endpoint_id, now, limit, cap=cap)

    def take_woken_endpoints(self) -> set[str]:
        return self.backend.take_woken_endpoints()

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
                series = self.metrics.series(endpoints.get(outcome.delivery_pk, "?"))
                series.deliveries[outcome.new_state.value].inc()

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
            delivery_id=delivery_id,
            event_type=event.event_type,
            outcome=outcome.new_state.value,
        )

    async def pending_counts(self) -> dict[str, int]:
        return await self.backend.pending_counts()

    async def endpoint_states(self) -> dict[str, EndpointState]:
        return await self.backend.endpoint_states()

    async def save_endpoint_state(self, state: EndpointState, *, disable_row: bool = False) -> None:
        await self.backend.save_endpoint_state(state, disable_row=disable_row)

    async def clear_endpoint_state(self, endpoint_id: str) -> EndpointState | None:
        cleared = await self.backend.clear_endpoint_state(endpoint_id)
        if cleared is not None:
            log_event(
                logger,
                logging.INFO,
                "endpoint_state_cleared",
                endpoint=endpoint_id,
                was=cleared.state.value,
            )
        return cleared

    async def list_deliveries(self, filters: DeliveryFilter) -> list[DeliveryRecord]:
        return await self.backend.list_deliveries(filters)

    async def get_delivery(self, delivery_id: str) -> DeliveryRecord | None:
        return await self.backend.get_delivery(delivery_id)

    async def list_quarantine(self, limit: int) -> list[QuarantineRecord]:
        return await self.backend.list_quarantine(limit)

    # -- retention ---------------------------------------------------------------------------

    async def prune(
        self,
        cutoffs: RetentionCutoffs,
        batch_size: int,
        *,
        pause_seconds: float = PRUNE_PAUSE_SECONDS,
        stop: asyncio.Event | None = None,
    ) -> PruneCounts:
        """Delete what ``cutoffs`` allow, at most ``batch_size`` rows (deliveries with their
        attempts) per write transaction, pausing between transactions (PRUNE_PAUSE_SECONDS)
        so that the application's writers get the lock. ``stop`` ends the pass early."""
        started = time.monotonic()
        counts = dict.fromkeys(PRUNE_KINDS, 0)
        batches = 0
        complete = True
        for step in self._prune_steps(cutoffs, batch_size):
            more = True
            while more:
                if stop is not None and stop.is_set():
                    complete = False
                    break
                t0 = time.monotonic()
                deleted, more = await step()
                if any(deleted.values()):
                    batches += 1
                for kind, n in deleted.items():
                    counts[kind] += n
                    if self.metrics is not None and n:
                        self.metrics.pruned_rows.labels(kind=kind).inc(n)
                if more:
                    pause = max(pause_seconds, PRUNE_PAUSE_FACTOR * (time.monotonic() - t0))
                    await _pause(pause, stop)
            if not complete:
                break
        result = PruneCounts(**counts, batches=batches, complete=complete)
        if result.total:
            fields: dict[str, Any] = {
                **result.by_kind(),
                "batches": batches,
                "complete": complete,
                "seconds": round(time.monotonic() - started, 3),
            }
            log_event(logger, logging.INFO, "pruned", **fields)
        return result

    def _prune_steps(self, cutoffs: RetentionCutoffs, limit: int) -> list[_PruneStep]:
        """One step per kind, each deleting one batch: ({kind: rows deleted}, more to do).
        Events go last, so that the deliveries deleted before them free their events."""
        b = self.backend
        steps: list[_PruneStep] = []

        def deliveries(state: DeliveryState, before: float) -> _PruneStep:
            async def step() -> tuple[dict[str, int], bool]:
                n, attempts = await b.prune_deliveries(state, before, limit)
                return {f"deliveries_{state.value}": n, "attempts": attempts}, n >= limit

            return step

        def rows(
            kind: str, prune: Callable[[float, int], Awaitable[int]], before: float
        ) -> _PruneStep:
            async def step() -> tuple[dict[str, int], bool]:
                n = await prune(before, limit)
                return {kind: n}, n >= limit

            return step

        def events(before: float) -> _PruneStep:
            after = 0

            async def step() -> tuple[dict[str, int], bool]:
                nonlocal after
                n, next_after = await b.prune_events(before, after, limit)
                after = next_after if next_after is not None else after
                return {"events": n}, next_after is not None

            return step

        if cutoffs.outbox_before is not None:
            steps.append(rows("outbox", b.prune_outbox, cutoffs.outbox_before))
            steps.append(rows("quarantine", b.prune_quarantine, cutoffs.outbox_before))
        if cutoffs.succeeded_before is not None:
            steps.append(deliveries(DeliveryState.SUCCEEDED, cutoffs.succeeded_before))
        if cutoffs.failed_before is not None:
            steps.append(deliveries(DeliveryState.FAILED, cutoffs.failed_before))
        if cutoffs.outbox_before is not None:
            steps.append(events(cutoffs.outbox_before))
        return steps

    async def changes(self) -> int:
        return await self.backend.changes()

    async def checkpoint(self, *, truncate: bool) -> CheckpointResult:
        result = await self.backend.checkpoint(truncate=truncate)
        log_event(
            logger,
            logging.DEBUG,
            "wal_checkpoint",
            mode=result.mode,
            busy=result.busy,
            wal_frames=result.wal_frames,
            checkpointed_frames=result.checkpointed_frames,
            wal_bytes=result.wal_bytes,
        )
        return result

    # -- administration ----------------------------------------------------------------------

    async def create_endpoint(self, row: Mapping[str, object]) -> bool:
        full = endpoint_row(row)
        created = await self.backend.create_endpoint(full)
        if created:
            log_event(logger, logging.INFO, "endpoint_created", endpoint=full["id"])
        return created

    async def update_endpoint(self, row: Mapping[str, object]) -> bool:
        full = endpoint_row(row)
        updated = await self.backend.update_endpoint(full)
        if updated:
            log_event(logger, logging.INFO, "endpoint_updated", endpoint=full["id"])
        return updated

    async def remove_endpoint(self, endpoint_id: str, *, force: bool) -> EndpointRemoval:
        removal = await self.backend.remove_endpoint(endpoint_id, force=force)
        if removal.removed:
            log_event(
                logger,
                logging.INFO,
                "endpoint_removed",
                endpoint=endpoint_id,
                pending_left=removal.pending,
            )
        return removal

    async def endpoint_health(self, since: float) -> dict[str, EndpointHealth]:
        return await self.backend.endpoint_health(since)

    async def requeue(
        self, delivery_ids: Sequence[str], now: float, states: Collection[str]
    ) -> list[str]:
        if not delivery_ids:
            return []
        changed = await self.backend.requeue(delivery_ids, now, states)
        if changed:
            log_event(logger, logging.INFO, "deliveries_requeued", count=len(changed))
        return changed

    async def requeued_version(self) -> int:
        return await self.backend.requeued_version()

    async def get_event(self, event_id: str) -> EventRecord | None:
        return await self.backend.get_event(event_id)

    async def quarantined_event(self, event_id: str) -> list[QuarantineRecord]:
        return await self.backend.quarantined_event(event_id)

    async def unprocessed_outbox_id(self, event_id: str) -> int | None:
        return await self.backend.unprocessed_outbox_id(event_id)

    async def stats(self, now: float, since: float, top: int) -> StoreStats:
        return await self.backend.stats(now, since, top)


async def _pause(seconds: float, stop: asyncio.Event | None) -> None:
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


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
