"""Retention: what may be deleted when (pure), and the daemon's task that prunes and checkpoints.

Rows that webhookd is done with are pruned after ``[retention]``'s periods: succeeded and failed
deliveries with their attempts, processed outbox rows, quarantine rows, and events that have no
deliveries left. Pending deliveries, their events and outbox rows not yet fanned out are never
touched. The store deletes in small batches, one short write transaction each, pausing in
between so that the application's writers are never kept waiting for long
(:meth:`webhookd.store.base.Store.prune`).

Deleted rows leave free pages inside the file that later writes reuse, so the file stops
growing once it holds a retention period's worth of rows. The WAL is checkpointed and truncated
when nothing has been written for ``checkpoint_idle_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from webhookd.errors import StorageError
from webhookd.metrics import PRUNE_KINDS
from webhookd.settings import RetentionSettings

if TYPE_CHECKING:
    from webhookd.store.base import Store

# How often the task looks at the database when the settings ask for nothing sooner.
HOUSEKEEPING_TICK_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class RetentionCutoffs:
    """Unix times: rows that became final (or were fanned out) before these may be deleted.
    ``None`` keeps that kind of row forever."""

    succeeded_before: float | None = None
    failed_before: float | None = None
    outbox_before: float | None = None  # outbox rows, quarantine rows, events

    @property
    def prunes_anything(self) -> bool:
        cutoffs = (self.succeeded_before, self.failed_before, self.outbox_before)
        return any(t is not None for t in cutoffs)


def retention_cutoffs(settings: RetentionSettings, now: float) -> RetentionCutoffs:
    """The cutoffs at ``now``; a period of 0 keeps rows forever. Pure."""

    def before(seconds: float) -> float | None:
        return None if seconds == 0 else now - seconds

    return RetentionCutoffs(
        succeeded_before=before(settings.succeeded_seconds),
        failed_before=before(settings.failed_seconds),
        outbox_before=before(settings.outbox_seconds),
    )


@dataclass(frozen=True, slots=True)
class PruneCounts:
    """What one pruning pass deleted, per kind (the metric's ``kind`` label values)."""

    deliveries_succeeded: int = 0
    deliveries_failed: int = 0
    attempts: int = 0
    events: int = 0
    outbox: int = 0
    quarantine: int = 0
    batches: int = 0  # write transactions that deleted something
    complete: bool = True  # False when the pass was stopped before it was done

    @property
    def total(self) -> int:
        return sum(self.by_kind().values())

    def by_kind(self) -> dict[str, int]:
        return {kind: getattr(self, kind) for kind in PRUNE_KINDS}


@dataclass(frozen=True, slots=True)
class CheckpointResult:
    """What a WAL checkpoint did. ``busy`` is not an error: a reader or writer of the
    application was in the way, and the next idle moment tries again."""

    mode: str  # "passive" or "truncate": the last mode run
    busy: bool
    wal_frames: int  # frames in the WAL before (-1: the database is not in WAL mode)
    checkpointed_frames: int  # of those, copied into the database file
    wal_bytes: int | None = None  # size of the -wal file afterwards, when there is one

    @property
    def done(self) -> bool:
        """Every frame is in the database file (and, for "truncate", the WAL is empty)."""
        return not self.busy and self.checkpointed_frames == self.wal_frames


class Housekeeper:
    """Prunes every ``interval_seconds`` and checkpoints the WAL once the database has been
    idle for ``checkpoint_idle_seconds``. Store errors are reported and retried next time."""

    def __init__(
        self,
        store: Store,
        settings: Callable[[], RetentionSettings],
        on_store_error: Callable[[str, StorageError], None],
        *,
        on_store_ok: Callable[[str], None] = lambda operation: None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.settings = settings  # read each round: a reloaded configuration applies at once
        self.on_store_error = on_store_error
        self.on_store_ok = on_store_ok
        self.clock = clock
        self.monotonic = monotonic
        self.next_prune_at: float | None = None  # monotonic; None: prune at the first round
        self._changes: int | None = None
        self._changed_at = 0.0  # monotonic time the change counter was last seen to move
        self._checkpointed = False  # since the last change
        self.last_prune: PruneCounts | None = None
        self.last_checkpoint: CheckpointResult | None = None

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            settings = self.settings()
            await self.round(settings, stopping)
            tick = min(
                HOUSEKEEPING_TICK_SECONDS,
                settings.interval_seconds,
                settings.checkpoint_idle_seconds or HOUSEKEEPING_TICK_SECONDS,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), tick)

    async def round(self, settings: RetentionSettings, stopping: asyncio.Event) -> None:
        """One look: prune if it is time, then checkpoint if the database is idle."""
        try:
            await self._maybe_prune(settings, stopping)
        except StorageError as exc:
            self.on_store_error("prune", exc)
        else:
            self.on_store_ok("prune")
        if settings.checkpoint_idle_seconds > 0 and not stopping.is_set():
            try:
                await self._maybe_checkpoint(settings)
            except StorageError as exc:
                self.on_store_error("checkpoint", exc)
            else:
                self.on_store_ok("checkpoint")

    async def _maybe_prune(self, settings: RetentionSettings, stopping: asyncio.Event) -> None:
        now = self.monotonic()
        if self.next_prune_at is not None and now < self.next_prune_at:
            return
        # Counted from the start of the pass: a failing pass is retried after an interval too.
        self.next_prune_at = now + settings.interval_seconds
        cutoffs = retention_cutoffs(settings, self.clock())
        if cutoffs.prunes_anything:
            self.last_prune = await self.store.prune(cutoffs, settings.batch_size, stop=stopping)

    async def _maybe_checkpoint(self, settings: RetentionSettings) -> None:
        changes = await self.store.changes()
        now = self.monotonic()
        if changes != self._changes:
            self._changes, self._changed_at, self._checkpointed = changes, now, False
            return
        if self._checkpointed or now - self._changed_at < settings.checkpoint_idle_seconds:
            return
        result = await self.store.checkpoint(truncate=True)
        self.last_checkpoint = result
        if result.done:
            self._checkpointed = True
            # Truncating the WAL moves SQLite's change counter itself: that is not a write.
            self._changes = await self.store.changes()
