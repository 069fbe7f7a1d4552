"""Scheduling: fan new outbox rows out to endpoints, run due deliveries within the limits, and
decide from each attempt's result what the delivery becomes. Knows no SQL and no HTTP details.

One worker task per enabled endpoint claims that endpoint's due deliveries (up to its in-flight
cap), so a slow or hanging endpoint only ever occupies its own slots: no head-of-line blocking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from webhookd import breaker
from webhookd import endpoints as endpoints_mod
from webhookd.breaker import BreakerPolicy
from webhookd.catalogue import DEFAULT_POLICY, CataloguePolicy
from webhookd.circuits import Circuits
from webhookd.delivery import HttpResult, HttpSender
from webhookd.errors import StorageError
from webhookd.events import classify_row, timestamp_to_unix
from webhookd.ids import new_ids
from webhookd.limits import Limiter
from webhookd.log import iso_time, log_event
from webhookd.metrics import EndpointSeries, Metrics
from webhookd.models import (
    AttemptOutcome,
    AttemptResult,
    Delivery,
    DeliveryState,
    Endpoint,
    EndpointState,
    EndpointStatus,
    Event,
    FanoutPlan,
    FanoutResult,
    NewDelivery,
    OutboxRow,
    PlannedEvent,
)
from webhookd.recorder import Recorder
from webhookd.retention import Housekeeper
from webhookd.retry import RetryPolicy, next_attempt_at, retry_after_until
from webhookd.routing import route
from webhookd.sender_pool import SenderLost
from webhookd.settings import DEFAULT_RETRY_AFTER_MAX_SECONDS, Settings
from webhookd.store.base import Store

logger = logging.getLogger("webhookd.dispatcher")

STORE_RETRY_INITIAL_SECONDS = 0.2
STORE_RETRY_MAX_SECONDS = 10.0
# A store shared with other daemons: due deliveries this worker could not claim (their cap is
# taken elsewhere) are looked at again after this pause.
SHARED_CLAIM_PAUSE_SECONDS = 0.05
# Pending deliveries are counted (for the gauges) this often, or this many times as long as
# the count took, whichever is longer.
PENDING_COUNT_SECONDS = 5.0
PENDING_COUNT_COST_FACTOR = 50.0
# Deliveries an endpoint worker claims beyond its free slots, to send as slots free up.
PREFETCH = 64
RECORDER_FLUSH_SECONDS = 10.0


def decide(
    result: HttpResult,
    delivery: Delivery,
    policy: RetryPolicy,
    now: float,
    rand: float,
    *,
    retry_after_max_seconds: float = DEFAULT_RETRY_AFTER_MAX_SECONDS,
) -> AttemptOutcome:
    """What the delivery becomes after this attempt. Pure.

    Attempt numbers go on across ``webhookd deliveries retry``; the retry budget (attempts and
    age) and the backoff count from the retry, which started a fresh schedule. A 429/503 with
    ``Retry-After`` moves the next attempt later (never sooner than the schedule), by at most
    ``retry_after_max_seconds``."""
    attempt_no = delivery.attempts + 1
    next_at: float | None = None
    if result.result is AttemptResult.SUCCESS:
        state = DeliveryState.SUCCEEDED
    else:
        next_at = next_attempt_at(
            policy,
            attempts_made=attempt_no - delivery.attempts_before_schedule,
            created_at=delivery.schedule_start,
            now=now,
            rand=rand,
        )
        asked = retry_after_until(
            result.status_code, result.retry_after, now, retry_after_max_seconds
        )
        if next_at is not None and asked is not None:
            next_at = max(next_at, asked)
        state = DeliveryState.FAILED if next_at is None else DeliveryState.PENDING
    return AttemptOutcome(
        delivery_pk=delivery.pk,
        attempt_no=attempt_no,
        started_at=result.started_at,
        duration_seconds=result.duration_seconds,
        result=result.result,
        status_code=result.status_code,
        error=result.error,
        response_excerpt=result.response_excerpt,
        new_state=state,
        next_attempt_at=next_at,
        error_kind=None if result.error_kind is None else result.error_kind.value,
    )


@dataclass(frozen=True, slots=True)
class SchemaWarning:
    """An event delivered although its data does not match the catalogue (policy "warn")."""

    outbox_id: int
    event_id: str
    event_type: str
    problem: str


@dataclass(frozen=True, slots=True)
class CheckedFanoutPlan(FanoutPlan):
    """A fan-out plan with the catalogue warnings the dispatcher logs once it is committed."""

    schema_warnings: tuple[SchemaWarning, ...] = ()


def plan_fanout(
    rows: Sequence[OutboxRow],
    endpoints: Sequence[Endpoint],
    *,
    max_payload_bytes: int,
    now: float,
    policy: CataloguePolicy = DEFAULT_POLICY,
) -> CheckedFanoutPlan:
    """Validate each row (against the event catalogue as ``policy`` says) and route each valid
    event. Pure (apart from fresh random ids)."""
    planned = []
    quarantined = []
    warnings = []
    for row in rows:
        outcome = classify_row(row, max_payload_bytes=max_payload_bytes, now=now, policy=policy)
        item = outcome.item
        if isinstance(item, Event):
            targets = route(item.event_type, item.tenant, endpoints)
            ids = new_ids("dlv", len(targets), now)
            deliveries = tuple(map(NewDelivery, ids, [ep.id for ep in targets]))
            planned.append(PlannedEvent(item, deliveries))
            if outcome.schema_problem is not None:
                warnings.append(
                    SchemaWarning(
                        item.outbox_id, item.event_id, item.event_type, outcome.schema_problem
                    )
                )
        else:
            quarantined.append(item)
    return CheckedFanoutPlan(tuple(planned), tuple(quarantined), tuple(warnings))


class EndpointWorker:
    """Claims and sends one endpoint's due deliveries, at most ``max_concurrency`` at once."""

    def __init__(self, dispatcher: Dispatcher, endpoint: Endpoint) -> None:
        self.d = dispatcher
        self.endpoint = endpoint
        # Owned by the dispatcher, so requests still running when a worker is replaced (endpoint
        # disabled and enabled again) keep counting against the endpoint's cap.
        self.inflight = dispatcher.inflight.setdefault(endpoint.id, set())
        self.wake = asyncio.Event()
        # Claimed ahead, leased, not sent yet (a store this daemon owns only).
        self.ready: deque[Delivery] = deque()
        self.stopping = False
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"endpoint:{self.endpoint.id}")
        self.task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or (self.stopping and task.exception() is None):
            return
        self.d.task_crashed(task)  # a worker must only end when told to

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()

    def _room(self, now: float) -> tuple[int, bool, float | None]:
        """(deliveries it may claim now, whether that is the backing-off endpoint's probe,
        seconds until its pause ends if it is paused)."""
        circuit = self.d.circuits.get(self.endpoint.id)
        if circuit is None or circuit.state is EndpointStatus.OK:
            return self.endpoint.max_concurrency - len(self.inflight), False, None
        if circuit.state is EndpointStatus.DISABLED:
            return 0, False, None  # about to be stopped
        if not breaker.probe_allowed(circuit, now):
            assert circuit.paused_until is not None
            return 0, False, circuit.paused_until - now
        # One probe at a time, and only once the requests that were in flight have finished.
        return (0 if self.inflight else 1), True, None

    async def _run(self) -> None:
        delay = STORE_RETRY_INITIAL_SECONDS
        while not self.stopping:
            self.wake.clear()
            timeout: float | None = None
            now = self.d.clock()
            room, probe, pause = self._room(now)
            if pause is not None:
                timeout = pause  # backing off: its deliveries wait, no attempt is spent
            elif room > 0 and self.ready and not probe:
                for _ in range(min(room, len(self.ready))):
                    self._spawn(self.ready.popleft())
                continue
            elif room > 0:
                try:
                    # A store this daemon owns: claim ahead (one query per PREFETCH deliveries
                    # rather than one per delivery). A shared store: the leases count against
                    # the endpoint's cap across daemons, so only what can be sent now.
                    ahead = 0 if probe or self.d.store.recheck_seconds is not None else PREFETCH
                    batch = await self.d.store.claim_due(
                        self.endpoint.id, now, room + ahead, cap=self.endpoint.max_concurrency
                    )
                    for delivery in batch[:room]:
                        self._spawn(delivery, probe)
                    self.ready.extend(batch[room:])
                    if len(batch) < room + ahead:
                        due = await self.d.store.next_due_at(self.endpoint.id)
                        timeout = None if due is None else max(0.0, due - self.d.clock())
                        timeout = self._shared_timeout(timeout)
                    delay = STORE_RETRY_INITIAL_SECONDS
                    self.d.store_ok("claim")
                except StorageError as exc:
                    self.d.store_failed("claim", exc)
                    timeout, delay = delay, min(delay * 2, STORE_RETRY_MAX_SECONDS)
                if self.stopping:
                    break
                if self._room(self.d.clock())[0] <= 0:
                    timeout = None  # a finishing request (or a state change) sets wake
                elif timeout is not None and timeout <= 0:
                    continue
            circuit = self.d.circuits.get(self.endpoint.id)
            if self.ready and circuit is not None and circuit.state is not EndpointStatus.OK:
                await self._release_ready()  # backing off or disabled: they go back
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for makes a task per call.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.wake.wait()
        await self._release_ready()

    async def _release_ready(self) -> None:
        """End the leases of the deliveries claimed ahead and not sent."""
        if not self.ready:
            return
        pks = [d.pk for d in self.ready]
        self.ready.clear()
        try:
            await self.d.store.release(pks)
        except StorageError as exc:
            self.d.store_failed("release", exc)
        worker = self.d.workers.get(self.endpoint.id)
        if worker is not None and worker is not self:
            worker.wake.set()  # this worker was replaced: the new one may send them now

    def _shared_timeout(self, timeout: float | None) -> float | None:
        """Where other daemons share the store, what this worker cannot see may change: look
        again after ``recheck_seconds`` at the latest, and when deliveries are due that it
        could not claim (the endpoint's cap is taken by other daemons) after a short pause
        rather than at once."""
        recheck = self.d.store.recheck_seconds
        if recheck is None:
            return timeout
        if timeout is None:
            return recheck
        if timeout <= 0:
            return min(recheck, SHARED_CLAIM_PAUSE_SECONDS)
        return min(timeout, recheck)

    def _spawn(self, delivery: Delivery, probe: bool = False) -> None:
        task = asyncio.create_task(self.d.deliver(self.endpoint, delivery, probe=probe))
        self.inflight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        current = self.d.workers.get(self.endpoint.id)
        if self.ready and not self.stopping and current is self:
            # The freed slot goes to a delivery claimed ahead at once, not a loop turn later.
            room, probe, pause = self._room(self.d.clock())
            if room > 0 and not probe and pause is None:
                self._spawn(self.ready.popleft())
        self.wake.set()
        if current is not None and current is not self:
            current.wake.set()  # this worker was replaced; the new one has a free slot now
        if not task.cancelled() and task.exception() is not None:
            self.d.task_crashed(task)


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        sender: HttpSender,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.store = store
        self.sender = sender
        self.metrics = metrics
        self.clock = clock
        self.rand = rand
        self.policy = RetryPolicy.from_settings(settings.retry)
        self.breaker_policy = BreakerPolicy.from_settings(settings)
        self.catalogue_policy = settings.events.policy()
        self._schema_warnings: tuple[SchemaWarning, ...] = ()  # of the plan being committed
        self.circuits = Circuits(store, self.store_failed)  # the breaker's states and writes
        self.recorder = Recorder(store)
        # Its own task: a long first pruning pass must not hold up the lag and pending gauges.
        self.housekeeper = Housekeeper(
            store,
            lambda: self.settings.retention,
            self.store_failed,
            on_store_ok=self.store_ok,
            clock=clock,
        )
        self.endpoints: dict[str, Endpoint] = {}
        self.workers: dict[str, EndpointWorker] = {}
        self.inflight: dict[str, set[asyncio.Task[None]]] = {}
        self._static = endpoints_mod.from_settings(settings)
        self._endpoints_version: int | None = None
        self._requeued_version: int | None = None
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._global = Limiter(settings.delivery.max_inflight)
        self.crashed: BaseException | None = None
        self.crash_event = asyncio.Event()
        # The latest error of each store operation, until that operation next succeeds: a
        # failing checkpoint must stay visible while fan-out keeps succeeding.
        self.store_errors: dict[str, str] = {}
        self.outbox_lag_seconds = 0.0
        self.pending_total: int | None = None  # as last counted by the housekeeping loop
        self.running = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load endpoints and start fan-out, workers and the recorder."""
        await self.reload_endpoints(force=True)
        self._tasks = [
            asyncio.create_task(self.recorder.run(), name="recorder"),
            asyncio.create_task(self._fanout_loop(), name="fanout"),
            asyncio.create_task(self._housekeeping_loop(), name="housekeeping"),
            asyncio.create_task(self.housekeeper.run(self._stopping), name="retention"),
        ]
        for task in self._tasks:
            task.add_done_callback(self.side_task_done)
        self.running = True

    def stop_claiming(self) -> None:
        self._stopping.set()
        for worker in self.workers.values():
            worker.stop()

    async def drain(self, grace_seconds: float) -> int:
        """Wait up to ``grace_seconds`` for in-flight requests; cancel the rest (their leases are
        released, no attempt is counted). Returns how many were cancelled."""
        self.stop_claiming()
        inflight = [t for tasks in self.inflight.values() for t in tasks]
        cancelled = 0
        if inflight:
            _, pending = await asyncio.wait(inflight, timeout=grace_seconds)
            for task in pending:
                task.cancel()
            cancelled = len(pending)
            if pending:
                await asyncio.wait(pending)
        workers = [w.task for w in self.workers.values() if w.task is not None]
        if workers:
            await asyncio.wait(workers)
        await self.circuits.settle(RECORDER_FLUSH_SECONDS)
        # Breaker states whose write failed: one more try.
        await self.circuits.persist_unsaved(self.endpoints)
        # Outcomes already obtained are written now; if the store is failing, give up after a
        # bound: those deliveries stay pending and are sent again after the restart.
        self.recorder.close()
        recorder = [t for t in self._tasks if t.get_name() == "recorder"]
        if recorder:
            await asyncio.wait(recorder, timeout=RECORDER_FLUSH_SECONDS)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.running = False
        return cancelled

    def side_task_done(self, task: asyncio.Task[None]) -> None:
        """Supervision: a side task or worker that ends while running stops the daemon."""
        if task.cancelled() or self._stopping.is_set():
            return
        self.task_crashed(task)

    def task_crashed(self, task: asyncio.Task[None]) -> None:
        exc = task.exception() if not task.cancelled() else None
        log_event(
            logger,
            logging.CRITICAL,
            "task_crashed",
            task=task.get_name(),
            error=repr(exc),
            exc_info=exc,
        )
        if self.crashed is None:
            self.crashed = exc or RuntimeError(f"task {task.get_name()} stopped")
        self.crash_event.set()

    @property
    def last_store_error(self) -> str | None:
        """The store operations failing now, with their errors ("" → None when none fails)."""
        return "; ".join(f"{op}: {msg}" for op, msg in sorted(self.store_errors.items())) or None

    def store_ok(self, operation: str) -> None:
        self.store_errors.pop(operation, None)

    def store_failed(self, operation: str, exc: StorageError) -> None:
        self.store_errors[operation] = str(exc)
        self.metrics.store_errors.labels(operation=operation).inc()
        log_event(logger, logging.ERROR, "store_error", operation=operation, error=str(exc))

    # -- endpoints ---------------------------------------------------------------------------

    async def reload_endpoints(self, *, force: bool = False) -> None:
        version = await self.store.endpoints_version()
        if not force and version == self._endpoints_version:
            return
        rows = await self.store.table_endpoints()
        table = [endpoints_mod.from_table_row(r, self.settings) for r in rows]
        merged = endpoints_mod.merge(self._static, table)
        for ep in endpoints_mod.shadowed(self._static, table):
            log_event(logger, logging.WARNING, "endpoint_shadowed", endpoint=ep.id)
        for ep in merged.values():
            if ep.problem and (self.endpoints.get(ep.id) != ep):
                log_event(
                    logger, logging.ERROR, "endpoint_invalid", endpoint=ep.id, problem=ep.problem
                )
        stored = await self.store.endpoint_states()
        self._endpoints_version = version
        self._reconcile_circuits(merged, stored)
        self._apply_endpoints(merged)

    def _reconcile_circuits(
        self, merged: dict[str, Endpoint], stored: dict[str, EndpointState]
    ) -> None:
        """Take up the stored breaker states: all of them at start, then what others changed.
        ``webhookd endpoints enable`` deletes an endpoint's row; an application enables a table
        endpoint the daemon disabled by setting its ``enabled`` back to 1."""
        now = self.clock()
        for ep_id, ep in merged.items():
            mine = self.circuits.get(ep_id)
            theirs = stored.get(ep_id)
            if mine is None:
                if theirs is not None:
                    self.circuits.adopt(theirs)
                    mine = theirs
            elif (
                ep_id not in self.circuits.unsaved
                and theirs is None
                and (mine.state is not EndpointStatus.OK or mine.consecutive_failures)
            ):
                self._set_circuit(ep, breaker.reenabled(ep_id, now), "enabled by an operator")
                continue
            if (
                mine is not None
                and mine.state is EndpointStatus.DISABLED
                and ep.source == "table"
                and ep.enabled
                and ep_id not in self.circuits.unsaved
            ):
                self._set_circuit(
                    ep, breaker.reenabled(ep_id, now), "its webhook_endpoints row was enabled"
                )
                self.circuits.persist_later(ep)

    def _active(self, ep: Endpoint | None) -> bool:
        if ep is None or not ep.enabled or ep.problem is not None:
            return False
        circuit = self.circuits.get(ep.id)
        return circuit is None or circuit.state is not EndpointStatus.DISABLED

    def _apply_endpoints(self, merged: dict[str, Endpoint]) -> None:
        old = self.endpoints
        self.endpoints = merged
        for ep_id in set(old) | set(merged):
            ep = merged.get(ep_id)
            active = self._active(ep)
            worker = self.workers.get(ep_id)
            if ep is not None:
                circuit = self.circuits.get(ep_id)
                state = EndpointStatus.OK if circuit is None else circuit.state
                self.metrics.set_endpoint_state(ep_id, state if active else "disabled")
            else:
                self.metrics.forget_endpoint(ep_id)
            if old.get(ep_id) != ep:
                log_event(
                    logger,
                    logging.INFO,
                    "endpoint_loaded" if ep is not None else "endpoint_removed",
                    endpoint=ep_id,
                    source=ep.source if ep else None,
                    active=active,
                )
            if active and ep is not None:
                if worker is None:
                    worker = EndpointWorker(self, ep)
                    self.workers[ep_id] = worker
                    if not self._stopping.is_set():
                        worker.start()
                else:
                    worker.endpoint = ep
                    worker.wake.set()
            elif worker is not None:
                worker.stop()
                del self.workers[ep_id]

    # -- configuration reload ----------------------------------------------------------------

    @property
    def static_endpoints(self) -> list[Endpoint]:
        """The endpoints of the configuration file in force."""
        return list(self._static)

    async def apply_settings(self, settings: Settings, static: list[Endpoint]) -> None:
        """Switch to a reloaded configuration (``static``: its endpoints, already built).

        Requests in flight finish as they started; the next fan-out, claim and attempt use the
        new values. Limits shrink as slots free up rather than cutting anything short.
        """
        self.settings = settings
        self.policy = RetryPolicy.from_settings(settings.retry)
        self.breaker_policy = BreakerPolicy.from_settings(settings)
        self.catalogue_policy = settings.events.policy()
        self._global.resize(settings.delivery.max_inflight)
        self._static = static
        # Forget the version: should this reload fail on the store, the fan-out loop's next
        # turn loads the endpoints again.
        self._endpoints_version = None
        try:
            await self.reload_endpoints(force=True)
        except StorageError as exc:
            self.store_failed("reload_endpoints", exc)

    # -- fan-out -----------------------------------------------------------------------------

    def _plan(self, rows: Sequence[OutboxRow]) -> FanoutPlan:
        plan = plan_fanout(
            rows,
            list(self.endpoints.values()),
            max_payload_bytes=self.settings.outbox.max_payload_bytes,
            now=self.clock(),
            policy=self.catalogue_policy,
        )
        self._schema_warnings = plan.schema_warnings
        return plan

    def _report_schema_warnings(self, result: FanoutResult) -> None:
        """Log and count the committed plan's catalogue warnings (once: a plan whose commit
        failed is planned again). Rows refused at commit (duplicate event ids) are skipped."""
        warnings, self._schema_warnings = self._schema_warnings, ()
        refused = {q.outbox_id for q in result.quarantined}
        for w in warnings:
            if w.outbox_id in refused:
                continue
            # Only catalogued types can mismatch, so the label's values are bounded.
            self.metrics.events_schema_mismatch.labels(event_type=w.event_type).inc()
            log_event(
                logger,
                logging.WARNING,
                "event_schema_mismatch",
                event_type=w.event_type,
                outbox_id=w.outbox_id,
                event_id=w.event_id,
                problem=w.problem,
            )

    async def _fanout_loop(self) -> None:
        more = True
        delay = STORE_RETRY_INITIAL_SECONDS
        while not self._stopping.is_set():
            # Read on every turn: a configuration reload may change them.
            batch_size = self.settings.outbox.batch_size
            poll = self.settings.outbox.poll_interval_seconds
            try:
                for ep_id in self.store.take_woken_endpoints():
                    worker = self.workers.get(ep_id)
                    if worker is not None:
                        worker.wake.set()
                if await self.store.outbox_changed() or more:
                    await self.reload_endpoints()
                    await self._wake_for_requeued()
                    self._schema_warnings = ()
                    result = await self.store.fan_out(
                        self._plan,
                        batch_size,
                        self.clock(),
                        max_payload_bytes=self.settings.outbox.max_payload_bytes,
                        # Routing must see every endpoint committed before the rows it routes.
                        before_planning=self.reload_endpoints,
                    )
                    self._report_schema_warnings(result)
                    more = result.rows >= batch_size
                    for ep_id in result.endpoints:
                        worker = self.workers.get(ep_id)
                        if worker is not None:
                            worker.wake.set()
                delay = STORE_RETRY_INITIAL_SECONDS
                self.store_ok("fan_out")
            except StorageError as exc:
                self.store_failed("fan_out", exc)
                more = True
                await self._sleep(delay)
                delay = min(delay * 2, STORE_RETRY_MAX_SECONDS)
                continue
            if not more:
                await self._sleep(poll)

    async def _wake_for_requeued(self) -> None:
        """Wake every worker when `webhookd deliveries retry` made deliveries due: a worker
        that saw nothing pending sleeps until woken, and one backing off until its next due
        time, which may be hours away. An endpoint the breaker backs off probes at once: the
        operator's retry says it may work again (if not, it backs off again)."""
        version = await self.store.requeued_version()
        if version != self._requeued_version:
            if self._requeued_version is not None:
                self._probe_now("deliveries were retried (`webhookd deliveries retry`)")
                for worker in self.workers.values():
                    worker.wake.set()
            self._requeued_version = version

    def _probe_now(self, reason: str) -> None:
        now = self.clock()
        for ep_id, circuit in list(self.circuits.states.items()):
            ep = self.endpoints.get(ep_id)
            if (
                ep is not None
                and circuit.state is EndpointStatus.BACKING_OFF
                and circuit.paused_until is not None
                and circuit.paused_until > now
            ):
                self._set_circuit(ep, replace(circuit, paused_until=now, updated_at=now), reason)
                self.circuits.persist_later(ep)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    async def _housekeeping_loop(self) -> None:
        """Gauges that come from the store: outbox lag (every second) and pending deliveries
        (every PENDING_COUNT_SECONDS, or PENDING_COUNT_COST_FACTOR times as long as counting
        took: with a million pending the count reads the whole index)."""
        next_count = 0.0
        while not self._stopping.is_set():
            try:
                oldest = await self.store.oldest_unprocessed()
                self.outbox_lag_seconds = self._lag(oldest)
                self.metrics.outbox_lag.set(self.outbox_lag_seconds)
                started = time.monotonic()
                if started >= next_count:
                    counts = await self.store.pending_counts()
                    took = time.monotonic() - started
                    next_count = started + max(
                        PENDING_COUNT_SECONDS, PENDING_COUNT_COST_FACTOR * took
                    )
                    self.pending_total = sum(counts.values())
                    self.metrics.set_pending(counts, list(self.endpoints))
                    await self.circuits.persist_unsaved(self.endpoints)
            except StorageError as exc:
                self.store_failed("housekeeping", exc)
            else:
                self.store_ok("housekeeping")
            await self._sleep(1.0)

    def _lag(self, oldest: str | None) -> float:
        if oldest is None:
            return 0.0
        try:
            return max(0.0, self.clock() - timestamp_to_unix(oldest))
        except ValueError:
            return 0.0  # a malformed timestamp: that row will be quarantined

    # -- one delivery ------------------------------------------------------------------------

    async def deliver(self, endpoint: Endpoint, delivery: Delivery, *, probe: bool = False) -> None:
        """Send one attempt and persist its outcome. Cancelled before the response: the lease is
        released and no attempt is counted. Once the outcome exists it is always persisted.
        ``probe``: the one attempt a backing-off endpoint makes to test its recovery."""
        series = self.metrics.series(endpoint.id)
        try:
            async with self._global:
                gauge = series.inflight
                gauge.inc()
                try:
                    result = await self.sender.send(endpoint, delivery)
                finally:
                    gauge.dec()
        except asyncio.CancelledError:
            await asyncio.shield(self.store.release([delivery.pk]))
            raise
        except SenderLost:
            # The child process making the request died: the outcome is unknown, so no attempt
            # is counted and the delivery is sent again (the pool logged it, once per process).
            await asyncio.shield(self.store.release([delivery.pk]))
            return
        now = self.clock()
        ra_max = self.settings.delivery.retry_after_max_seconds
        outcome = decide(
            result, delivery, self.policy, now, self.rand(), retry_after_max_seconds=ra_max
        )
        self._observe(endpoint, delivery, result, outcome, series, now)
        committed = self.recorder.enqueue(outcome, endpoint.id)
        changed = self._after_attempt(endpoint, result, probe, now)
        # A drain that cancels this task still has the outcome written: the recorder's queue
        # holds it, whatever becomes of this future (and a breaker state left unwritten is
        # written by the drain). Not shield(): that costs every delivery an event-loop turn.
        await committed
        if changed is not None:
            await asyncio.shield(self.circuits.persist(changed))

    # -- the circuit breaker -----------------------------------------------------------------

    def _after_attempt(
        self, endpoint: Endpoint, result: HttpResult, probe: bool, now: float
    ) -> Endpoint | None:
        """Feed an attempt's result to the endpoint's breaker. If its state changed, apply it
        and return the endpoint, whose state the caller then writes."""
        old = self.circuits.get(endpoint.id) or EndpointState(endpoint.id, since=now)
        if result.result is AttemptResult.SUCCESS:
            new = breaker.after_success(old, now)
        else:
            failure = breaker.Failure(
                reason=result.error or result.result.value,
                probe=probe,
                gone=result.status_code == 410,
                retry_after_until=retry_after_until(
                    result.status_code,
                    result.retry_after,
                    now,
                    self.settings.delivery.retry_after_max_seconds,
                ),
            )
            new = breaker.after_failure(old, failure, self.breaker_policy, now)
        if new == old:
            return None
        current = self.endpoints.get(endpoint.id, endpoint)
        why = new.reason or ("the probe succeeded" if probe else "an attempt succeeded")
        self._set_circuit(current, new, why)
        return current

    def _set_circuit(self, ep: Endpoint, new: EndpointState, reason: str | None) -> None:
        """Make ``new`` the endpoint's state (logged, to be written), update the gauge, stop or
        start its worker, wake it."""
        before = self.circuits.set(ep, new, reason)
        if before is not new.state and EndpointStatus.DISABLED in (before, new.state):
            self._apply_endpoints(dict(self.endpoints))  # stops or starts its worker
        elif ep.id in self.endpoints and self._active(ep):
            self.metrics.set_endpoint_state(ep.id, new.state)
        worker = self.workers.get(ep.id)
        if worker is not None:
            worker.wake.set()

    def _observe(
        self,
        endpoint: Endpoint,
        delivery: Delivery,
        result: HttpResult,
        outcome: AttemptOutcome,
        series: EndpointSeries,
        now: float,
    ) -> None:
        series.attempts[result.result.value].inc()
        series.duration.observe(result.duration_seconds)
        success = result.result is AttemptResult.SUCCESS
        if success:
            with contextlib.suppress(ValueError):
                self.metrics.event_to_delivery.observe(
                    max(0.0, now - timestamp_to_unix(delivery.occurred_at))
                )
            if not logger.isEnabledFor(logging.DEBUG):
                return  # the usual case: no log line, so no fields to build
        fields: dict[str, Any] = {
            "endpoint": endpoint.id,
            "delivery_id": delivery.delivery_id,
            "event_id": delivery.event_id,
            "event_type": delivery.event_type,
            "attempt": outcome.attempt_no,
            "status": result.status_code,
            "duration_ms": round(result.duration_seconds * 1000, 1),
        }
        if success:
            log_event(logger, logging.DEBUG, "delivery_succeeded", **fields)
        elif outcome.new_state is DeliveryState.FAILED:
            log_event(logger, logging.ERROR, "delivery_failed", error=result.error, **fields)
        else:
            assert outcome.next_attempt_at is not None
            log_event(
                logger,
                logging.WARNING,
                "delivery_attempt_failed",
                error=result.error,
                next_attempt_at=iso_time(outcome.next_attempt_at),
                **fields,
            )
