"""The store operations behind the administration commands, on a real SQLite file, with a real
daemon running: a retry (``Store.requeue``, what ``webhookd deliveries retry`` calls) starts a
fresh retry schedule and wakes the daemon; endpoint rows written through the store are picked up;
the health query reads the attempts through its index.

The store is opened on the daemon's database file from the test, as the CLI process does.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from daemon_fixtures import (
    OutboxRow,
    Receiver,
    attempts,
    daemon_settings,
    deliveries,
    eventually,
    insert_outbox,
    per_attempt,
    running_daemon,
)

from webhookd.delivery import HttpResult
from webhookd.dispatcher import decide
from webhookd.models import AttemptResult, Delivery, DeliveryState
from webhookd.retry import RetryPolicy
from webhookd.store.base import Store, load_migrations, load_queries
from webhookd.store.sqlite import SQLiteBackend

NOW = 1_700_000_000.0
SECRET = "admin-store-secret"
POLICY = RetryPolicy(
    initial_delay_seconds=10.0,
    multiplier=2.0,
    max_delay_seconds=1000.0,
    jitter=0.0,
    max_attempts=3,
    max_age_seconds=3600.0,
)


@asynccontextmanager
async def cli_store(db: Path) -> AsyncIterator[Store]:
    """A store on the daemon's database, opened the way a CLI command opens it."""
    store = Store(SQLiteBackend(db))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def endpoint(ep_id: str, url: str) -> dict[str, object]:
    return {"id": ep_id, "url": url, "secret": SECRET}


# -- the retry budget (pure) -------------------------------------------------------------------


def failure(at: float) -> HttpResult:
    return HttpResult(at, 0.1, AttemptResult.HTTP_ERROR, 500, "HTTP 500", None)


def claimed(**fields: object) -> Delivery:
    base: dict[str, object] = {
        "pk": 1,
        "delivery_id": "dlv_1",
        "endpoint_id": "crm",
        "event_id": "evt_1",
        "event_type": "booking.created",
        "occurred_at": "2024-01-15T10:00:00Z",
        "body": b"{}",
        "attempts": 3,
        "created_at": NOW,
    }
    return Delivery(**{**base, **fields})  # type: ignore[arg-type]


def test_after_a_retry_the_attempt_budget_counts_from_the_retry() -> None:
    # Three attempts made: without a retry the next failure would be the end.
    spent = decide(failure(NOW + 60), claimed(), POLICY, NOW + 60, 0.5)
    assert (spent.attempt_no, spent.new_state) == (4, DeliveryState.FAILED)

    retried = claimed(attempts_before_schedule=3, schedule_started_at=NOW + 50)
    outcome = decide(failure(NOW + 60), retried, POLICY, NOW + 60, 0.5)
    assert (outcome.attempt_no, outcome.new_state) == (4, DeliveryState.PENDING)
    # The backoff starts over too: the first delay, not the fourth.
    assert outcome.next_attempt_at == NOW + 60 + POLICY.initial_delay_seconds

    third_since_retry = decide(
        failure(NOW + 90), claimed(attempts=5, attempts_before_schedule=3,
                                   schedule_started_at=NOW + 50), POLICY, NOW + 90, 0.5
    )  # fmt: skip
    assert (third_since_retry.attempt_no, third_since_retry.new_state) == (
        6,
        DeliveryState.FAILED,
    )


def test_after_a_retry_the_age_budget_counts_from_the_retry() -> None:
    old = NOW + 2 * POLICY.max_age_seconds  # long after the delivery's own deadline
    expired = decide(failure(old), claimed(attempts=1), POLICY, old, 0.5)
    assert expired.new_state is DeliveryState.FAILED

    retried = claimed(attempts=1, attempts_before_schedule=1, schedule_started_at=old - 5)
    outcome = decide(failure(old), retried, POLICY, old, 0.5)
    assert outcome.new_state is DeliveryState.PENDING
    assert outcome.next_attempt_at == old + POLICY.initial_delay_seconds
    # ... and the retry's own deadline bounds it: the last chance is moved onto it.
    late = claimed(attempts=2, attempts_before_schedule=1, schedule_started_at=old - 3595)
    assert decide(failure(old), late, POLICY, old, 0.5).next_attempt_at == old + 5


# -- a running daemon --------------------------------------------------------------------------


async def test_a_retried_dead_letter_is_sent_at_once_with_a_fresh_budget(tmp_path: Path) -> None:
    db = tmp_path / "webhookd.db"
    # Fails its first two attempts (the whole budget), then the next two, then succeeds.
    script = per_attempt(500, 500, 500, 500, 200)
    async with Receiver(answer=script) as receiver:
        settings = daemon_settings(
            tmp_path,
            endpoints=[endpoint("crm", receiver.url())],
            retry={"initial_delay_seconds": 0.2, "multiplier": 1.0, "max_attempts": 2},
        )
        async with running_daemon(settings):
            await insert_outbox(db, [OutboxRow("booking.created", {"id": "b1"}, event_id="e1")])
            [dead] = await eventually(
                lambda: deliveries(db, state="failed"), what="the delivery to be dead-lettered"
            )
            assert len(receiver.requests) == 2
            # Nothing is pending now: the endpoint's worker sleeps until something wakes it.
            await asyncio.sleep(0.3)
            assert len(receiver.requests) == 2

            async with cli_store(db) as store:
                requeued_at = time.time()
                assert await store.requeue([dead["delivery_id"]], requeued_at, {"failed"}) == [
                    dead["delivery_id"]
                ]
            await eventually(
                lambda: len(receiver.requests) >= 3, what="the retried delivery to be sent again"
            )
            third = receiver.requests[2]
            print(f"retry -> request: {(third.arrived_at - requeued_at) * 1000:.1f} ms")
            [dead_again] = await eventually(
                lambda: deliveries(db, state="failed"), what="the retried delivery to fail again"
            )

            # The fresh budget: two more attempts (not one), the second after the first delay.
            assert dead_again["attempts"] == 4
            assert len(receiver.requests) == 4
            fourth = receiver.requests[3]
            assert fourth.arrived_at - third.arrived_at >= 0.2 - 0.01
            assert {r.delivery_id for r in receiver.requests} == {dead["delivery_id"]}
            assert [a["attempt_no"] for a in attempts(db, dead["id"])] == [1, 2, 3, 4]

            # A second retry: the fifth attempt succeeds.
            async with cli_store(db) as store:
                await store.requeue([dead["delivery_id"]], time.time(), {"failed"})
            await eventually(
                lambda: deliveries(db, state="succeeded"), what="the second retry to succeed"
            )
    assert len(receiver.requests) == 5


async def test_a_retry_wakes_a_worker_that_waits_for_a_far_away_attempt(tmp_path: Path) -> None:
    """A worker with a pending delivery due in an hour sleeps until then; a retry of another of
    its deliveries must not wait for that hour."""
    db = tmp_path / "webhookd.db"
    script = per_attempt(500)
    async with Receiver(answer=script) as receiver:
        settings = daemon_settings(
            tmp_path,
            endpoints=[endpoint("crm", receiver.url())],
            retry={"initial_delay_seconds": 3600.0, "max_attempts": 2},
        )
        async with running_daemon(settings):
            await insert_outbox(
                db,
                [
                    OutboxRow("booking.created", {"id": "b1"}, event_id="e1"),
                    OutboxRow("booking.created", {"id": "b2"}, event_id="e2"),
                ],
            )
            await eventually(
                lambda: len(deliveries(db, attempts=1)) == 2, what="both first attempts"
            )
            # Both wait an hour. Retrying one of them makes it due now.
            target = deliveries(db)[0]
            async with cli_store(db) as store:
                assert await store.requeue([target["delivery_id"]], time.time(), {"pending"})
            await eventually(lambda: len(receiver.requests) == 3, what="the retried attempt")
            assert receiver.requests[2].delivery_id == target["delivery_id"]
            [row] = deliveries(db, delivery_id=target["delivery_id"])
            # Failed again: a new schedule from the retry, so an hour again, not the end.
            await eventually(
                lambda: deliveries(db, delivery_id=target["delivery_id"])[0]["attempts"] == 2,
                what="the retried attempt to be recorded",
            )
            [row] = deliveries(db, delivery_id=target["delivery_id"])
            assert row["state"] == "pending"
            assert row["next_attempt_at"] > time.time() + 3000


async def test_endpoint_rows_written_through_the_store_are_picked_up(tmp_path: Path) -> None:
    db = tmp_path / "webhookd.db"
    async with Receiver() as receiver:
        settings = daemon_settings(tmp_path)
        async with running_daemon(settings):
            async with cli_store(db) as store:
                assert await store.create_endpoint(
                    {"id": "late", "url": receiver.url("/late"), "secret": SECRET}
                )
            # Fan-out routes to it once the daemon has loaded it: give it time, then send.
            await asyncio.sleep(0.3)
            await insert_outbox(db, [OutboxRow("booking.created", {"id": "b1"})])
            await eventually(lambda: receiver.on_path("/late"), what="a request to /late")
            async with cli_store(db) as store:
                [row] = await store.table_endpoints()
                assert await store.update_endpoint({**row, "enabled": 0})
            await asyncio.sleep(0.3)
            await insert_outbox(db, [OutboxRow("booking.created", {"id": "b2"})])
            await eventually(
                lambda: len(deliveries(db)) == 1 and not deliveries(db, state="pending"),
                what="the second event to be fanned out (to no endpoint)",
            )
            await asyncio.sleep(0.3)
    assert len(receiver.on_path("/late")) == 1
    assert receiver.requests[0].signature_valid(SECRET)


# -- the health query --------------------------------------------------------------------------


def test_the_health_window_is_read_through_the_attempts_index(tmp_path: Path) -> None:
    """``webhookd endpoints list`` reads only the window's attempts, from an index that covers
    them, so it stays fast however many attempts the table holds."""
    conn = sqlite3.connect(tmp_path / "webhookd.db")
    try:
        for _version, _name, script in load_migrations("sqlite"):
            conn.executescript(script)
        query = load_queries("sqlite")["endpoint_health_window"]
        plan = " | ".join(
            str(row[3]) for row in conn.execute(f"EXPLAIN QUERY PLAN {query}", {"since": NOW})
        )
    finally:
        conn.close()
    assert "COVERING INDEX webhookd_attempts_started" in plan, plan
    assert "SCAN t" not in plan, plan


@pytest.mark.parametrize("count", [1, 2500])
async def test_requeue_of_many_deliveries_in_one_call(tmp_path: Path, count: int) -> None:
    db = tmp_path / "webhookd.db"
    async with cli_store(db) as store:
        await store.migrate()
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "INSERT INTO webhookd_events (id, event_id, event_type, occurred_at, body, created_at)"
            " VALUES (1, 'e1', 'booking.created', '2024-01-15T10:00:00Z', x'7b7d', ?)",
            (NOW,),
        )
        conn.executemany(
            "INSERT INTO webhookd_deliveries (delivery_id, event_pk, endpoint_id, state, attempts,"
            " created_at, updated_at) VALUES (?, 1, 'crm', 'failed', 3, ?, ?)",
            [(f"dlv_{i}", NOW, NOW) for i in range(count)],
        )
    conn.close()
    async with cli_store(db) as store:
        ids = [f"dlv_{i}" for i in range(count)]
        assert sorted(await store.requeue(ids, NOW + 1, {"failed"})) == sorted(ids)
        assert await store.pending_counts() == {"crm": count}
        [d, *_] = await store.claim_due("crm", NOW + 1, 1)
        assert (d.attempts, d.attempts_before_schedule, d.schedule_start) == (3, 3, NOW + 1)
