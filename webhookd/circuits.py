"""The circuit breaker's bookkeeping: each endpoint's state as this daemon holds it, the log line
of each change, and the writes to the store.

What a state becomes after an attempt is :mod:`webhookd.breaker` (pure). What the daemon does
about a change (stop or start the endpoint's worker, its gauge) is the dispatcher's. Writes of
one endpoint's state go one at a time, a write that a newer change overtook is skipped (the
newer one writes the latest state), and a failed write is tried again later
(:meth:`Circuits.persist_unsaved`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from webhookd.errors import StorageError
from webhookd.log import iso_time, log_event
from webhookd.models import Endpoint, EndpointState, EndpointStatus
from webhookd.store.base import Store

logger = logging.getLogger("webhookd.dispatcher")  # the events operators know it by

_LEVELS = {
    EndpointStatus.OK: logging.INFO,
    EndpointStatus.BACKING_OFF: logging.WARNING,
    EndpointStatus.DISABLED: logging.ERROR,
}


class Circuits:
    """Each endpoint's breaker state (absent: ok), as the store keeps it, and which of them
    changed since they were last written (``unsaved``, by generation)."""

    def __init__(self, store: Store, on_store_error: Callable[[str, StorageError], None]) -> None:
        self._store = store
        self._on_store_error = on_store_error
        self.states: dict[str, EndpointState] = {}
        self.unsaved: set[str] = set()
        self._generation: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._writing: set[asyncio.Task[None]] = set()

    def get(self, endpoint_id: str) -> EndpointState | None:
        return self.states.get(endpoint_id)

    def adopt(self, state: EndpointState) -> None:
        """Take up a state read from the store (nothing to write)."""
        self.states[state.endpoint_id] = state

    def set(self, ep: Endpoint, new: EndpointState, reason: str | None) -> EndpointStatus:
        """Make ``new`` the endpoint's state, to be written, and log the change. Returns the
        status it had before."""
        old = self.states.get(ep.id)
        self.states[ep.id] = new
        self._generation[ep.id] = self._generation.get(ep.id, 0) + 1
        self.unsaved.add(ep.id)
        before = EndpointStatus.OK if old is None else old.state
        paused_until = None if new.paused_until is None else iso_time(new.paused_until)
        if before is not new.state:
            fields: dict[str, Any] = {
                "endpoint": ep.id,
                "from": before.value,
                "to": new.state.value,
                "reason": reason,
                "consecutive_failures": new.consecutive_failures,
                "paused_until": paused_until,
            }
            log_event(logger, _LEVELS[new.state], "endpoint_state_changed", **fields)
        elif (
            new.state is EndpointStatus.BACKING_OFF
            and old is not None
            and new.paused_until != old.paused_until
        ):
            log_event(
                logger,
                logging.INFO,
                "endpoint_backoff_changed",
                endpoint=ep.id,
                reason=reason,
                consecutive_failures=new.consecutive_failures,
                paused_until=paused_until,
            )
        return before

    def persist_later(self, ep: Endpoint) -> None:
        """:meth:`persist` in a task of its own (:meth:`settle` waits for them)."""
        task = asyncio.create_task(self.persist(ep), name=f"persist:{ep.id}")
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)

    async def persist(self, ep: Endpoint) -> None:
        """Write the endpoint's current state, unless a newer change overtook this one."""
        generation = self._generation.get(ep.id, 0)
        lock = self._locks.setdefault(ep.id, asyncio.Lock())
        async with lock:
            if self._generation.get(ep.id, 0) != generation or ep.id not in self.unsaved:
                return
            state = self.states[ep.id]
            disable_row = state.state is EndpointStatus.DISABLED and ep.source == "table"
            try:
                await self._store.save_endpoint_state(state, disable_row=disable_row)
            except StorageError as exc:
                self._on_store_error("save_endpoint_state", exc)
                return
            if self._generation.get(ep.id, 0) == generation:
                self.unsaved.discard(ep.id)

    async def persist_unsaved(self, endpoints: Mapping[str, Endpoint]) -> None:
        """Write the states whose write failed (or has not happened yet)."""
        for ep_id in sorted(self.unsaved):
            ep = endpoints.get(ep_id)
            if ep is not None:
                await self.persist(ep)

    async def settle(self, within_seconds: float) -> None:
        """Wait up to ``within_seconds`` for the writes :meth:`persist_later` started."""
        if self._writing:
            await asyncio.wait(self._writing, timeout=within_seconds)
