"""Group commit: outcomes of attempts that finish close together are written in one transaction.

A submitter waits until its outcome is durable. While the store is failing, outcomes are kept
and retried (never dropped); the waiting submitters hold their concurrency slots, which is the
backpressure that stops new attempts until the store recovers.
"""

from __future__ import annotations

import asyncio
import logging

from webhookd.errors import StorageError
from webhookd.log import log_event
from webhookd.models import AttemptOutcome
from webhookd.store.base import Store

logger = logging.getLogger("webhookd.recorder")

MAX_BATCH = 1000
RETRY_INITIAL_SECONDS = 0.1
RETRY_MAX_SECONDS = 5.0


class Recorder:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._queue: list[tuple[AttemptOutcome, str, asyncio.Future[None]]] = []
        self._kick = asyncio.Event()
        self._closing = False
        self.failing_since: float | None = None  # loop time of the first failure in a row
        self.last_error: str | None = None

    def enqueue(self, outcome: AttemptOutcome, endpoint_id: str) -> asyncio.Future[None]:
        """Queue ``outcome``; the future is done once it is committed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((outcome, endpoint_id, future))
        self._kick.set()
        return future

    async def submit(self, outcome: AttemptOutcome, endpoint_id: str) -> None:
        """Return once ``outcome`` is committed."""
        await self.enqueue(outcome, endpoint_id)

    async def run(self) -> None:
        """Write batches until :meth:`close` is called and the queue is empty."""
        delay = RETRY_INITIAL_SECONDS
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._kick.clear()
                await self._kick.wait()
                continue
            batch = self._queue[:MAX_BATCH]
            try:
                await self._store.record(
                    [o for o, _, _ in batch], {o.delivery_pk: ep for o, ep, _ in batch}
                )
            except StorageError as exc:
                if self.failing_since is None:
                    self.failing_since = asyncio.get_running_loop().time()
                self.last_error = str(exc)
                log_event(
                    logger, logging.ERROR, "store_write_failed", error=str(exc), retry_in=delay
                )
                if self._store.metrics is not None:
                    self._store.metrics.store_errors.labels(operation="record").inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            delay = RETRY_INITIAL_SECONDS
            self.failing_since = None
            self.last_error = None
            del self._queue[: len(batch)]
            for _, _, future in batch:
                if not future.done():
                    future.set_result(None)

    def close(self) -> None:
        """Finish writing what is queued, then let :meth:`run` return."""
        self._closing = True
        self._kick.set()
