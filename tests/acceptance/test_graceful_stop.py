"""SIGTERM while requests are in flight: what finishes within daemon.grace_seconds is recorded;
what is still running then is cancelled and left exactly as it was before the attempt began
(pending, same attempt count, same schedule), to be sent again, under the same delivery id,
after the restart.

tests/acceptance/test_lifecycle.py covers the single-request cases; these mix both outcomes in
one stop and check the schedule and the attempt history too.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import AioReceiver, Workspace

HANG_SECONDS = 60.0


def _deliveries(ws: Workspace) -> dict[str, dict[str, Any]]:
    rows = ws.sql("SELECT * FROM webhookd_deliveries ORDER BY id")
    return {row["endpoint_id"]: dict(row) for row in rows}


def _attempt_numbers(ws: Workspace, delivery_pk: int) -> list[int]:
    rows = ws.sql(
        "SELECT attempt_no FROM webhookd_attempts WHERE delivery_pk = ? ORDER BY attempt_no",
        (delivery_pk,),
    )
    return [row[0] for row in rows]


def _enqueue(ws: Workspace, event_id: str) -> None:
    ws.insert_outbox(
        [
            {
                "event_type": "booking.created",
                "event_id": event_id,
                "payload": json.dumps({"id": event_id}),
            }
        ]
    )


@pytest.mark.slow
def test_stop_records_what_finishes_in_time_and_leaves_the_rest_untouched(
    workspace: Workspace, aio_receiver: Callable[..., AioReceiver]
) -> None:
    quick = aio_receiver(delay=1.0)  # finishes inside the grace period
    hanging = aio_receiver(delay=HANG_SECONDS)  # does not
    workspace.write_config(
        endpoints=[
            {"id": "quick", "url": quick.url, "secret": "s-quick"},
            {"id": "hanging", "url": hanging.url, "secret": "s-hanging"},
        ],
        daemon={"grace_seconds": 3.0},
        delivery={"timeout_seconds": 120.0},
    )
    daemon = workspace.start()
    _enqueue(workspace, "evt-stop")
    workspace.wait_until(
        lambda: quick.started() and hanging.started(),
        what="both requests to be in flight",
        details=daemon.output,
    )
    assert quick.finished() == [], "the quick request ended before SIGTERM; the test is void"
    before = _deliveries(workspace)

    assert daemon.stop(signal.SIGTERM, timeout=30) == 0, daemon.output()

    after = _deliveries(workspace)
    assert len(quick.finished()) == 1
    assert (after["quick"]["state"], after["quick"]["attempts"]) == ("succeeded", 1)
    assert _attempt_numbers(workspace, after["quick"]["id"]) == [1]
    # The cancelled one: nothing about it changed, and no attempt was written.
    cancelled = after["hanging"]
    assert cancelled["state"] == "pending"
    assert cancelled["attempts"] == before["hanging"]["attempts"] == 0
    assert cancelled["next_attempt_at"] == before["hanging"]["next_attempt_at"]
    assert cancelled["last_error"] is None
    assert _attempt_numbers(workspace, cancelled["id"]) == []

    events = daemon.log_events()
    assert events.index("stopping") < events.index("inflight_cancelled") < events.index("stopped")
    [note] = [r for r in daemon.log_records() if r.get("event") == "inflight_cancelled"]
    assert note["count"] == 1

    # After a restart the cancelled request is sent again under the same delivery id, and its
    # first recorded attempt is attempt 1.
    hanging.delay = 0.0
    second = workspace.start()
    workspace.wait_until(
        lambda: _deliveries(workspace)["hanging"]["state"] == "succeeded",
        what="the cancelled delivery to be sent again",
        details=second.output,
    )
    assert second.stop(signal.SIGTERM) == 0, second.output()
    assert {r.delivery_id for r in hanging.started()} == {cancelled["delivery_id"]}
    assert _attempt_numbers(workspace, cancelled["id"]) == [1]
    assert len(quick.started()) == 1, "the recorded delivery must not be sent again"


@pytest.mark.slow
def test_a_retry_cancelled_at_stop_keeps_its_attempt_count_and_schedule(
    workspace: Workspace, aio_receiver: Callable[..., AioReceiver]
) -> None:
    receiver = aio_receiver(status=500)
    workspace.write_config(
        endpoints=[{"id": "flaky", "url": receiver.url, "secret": "s-flaky"}],
        retry={"initial_delay_seconds": 2.0, "multiplier": 2.0, "jitter": 0.0, "max_attempts": 5},
        daemon={"grace_seconds": 0.5},
        delivery={"timeout_seconds": 120.0},
    )
    daemon = workspace.start()
    _enqueue(workspace, "evt-retry")
    workspace.wait_until(
        lambda: _deliveries(workspace).get("flaky", {}).get("attempts") == 1,
        what="the first (failed) attempt to be recorded",
        details=daemon.output,
    )
    # The retry (due 2 s after the failure) will hang past the grace period.
    receiver.delay, receiver.status = HANG_SECONDS, 200
    assert len(receiver.started()) == 1, "the retry came before the receiver was switched"
    scheduled = _deliveries(workspace)["flaky"]
    assert scheduled["state"] == "pending"
    assert scheduled["next_attempt_at"] is not None
    workspace.wait_until(
        lambda: len(receiver.started()) == 2,
        what="the retry to be in flight",
        details=daemon.output,
    )

    assert daemon.stop(signal.SIGTERM, timeout=30) == 0, daemon.output()

    after = _deliveries(workspace)["flaky"]
    for column in ("state", "attempts", "next_attempt_at", "last_status", "last_error"):
        assert after[column] == scheduled[column], column
    assert _attempt_numbers(workspace, after["id"]) == [1]

    receiver.delay = 0.0
    second = workspace.start()
    workspace.wait_until(
        lambda: _deliveries(workspace)["flaky"]["state"] == "succeeded",
        what="the retry to be made after the restart",
        details=second.output,
    )
    assert second.stop(signal.SIGTERM) == 0, second.output()
    assert _attempt_numbers(workspace, after["id"]) == [1, 2]
    assert _deliveries(workspace)["flaky"]["attempts"] == 2
