"""``webhookd run`` under real signals: clean stops, draining, crash recovery, one owner."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from helpers import free_port

if TYPE_CHECKING:
    from conftest import AioReceiver, WebhookdProcess, Workspace

KILL_EVENT_COUNT = 300
KILL_AFTER_DELIVERIES = 60


def _order_of(events: list[str], names: list[str]) -> list[int]:
    return [events.index(name) for name in names]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_with_exit_0(
    workspace: Workspace, dead_url: str, sig: signal.Signals
) -> None:
    workspace.write_config(
        endpoints=[{"id": "hook", "url": dead_url, "secret": "lifecycle-secret-value"}],
        daemon={"grace_seconds": 5.0},
    )
    daemon = workspace.start()
    ready = daemon.get("/readyz")
    assert ready is not None
    assert ready.status == 200
    assert ready.json()["status"] == "ready"

    assert daemon.stop(sig, timeout=20) == 0, daemon.output()

    events = daemon.log_events()
    for name in ("started", "stopping", "stopped"):
        assert name in events, f"no {name!r} log line in:\n{daemon.output()}"
    started, stopping, stopped = _order_of(events, ["started", "stopping", "stopped"])
    assert started < stopping < stopped
    stop_requested = [r for r in daemon.log_records() if r.get("event") == "stop_requested"]
    assert [r.get("signal") for r in stop_requested] == [sig.name]
    assert "Traceback" not in daemon.stderr()
    assert "lifecycle-secret-value" not in daemon.stdout() + daemon.stderr()
    assert daemon.get("/readyz") is None, "the HTTP port must be closed after exit"


@pytest.mark.slow
def test_request_in_flight_at_sigterm_finishes_and_is_recorded(
    workspace: Workspace, aio_receiver: Callable[..., AioReceiver]
) -> None:
    receiver = aio_receiver(delay=1.0)
    workspace.write_config(
        endpoints=[{"id": "slow", "url": receiver.url, "secret": "s"}],
        daemon={"grace_seconds": 5.0},
    )
    daemon = workspace.start()
    workspace.cli_ok("enqueue", "booking.created", '{"id": "book_inflight"}')
    workspace.wait_until(receiver.started, what="the request to arrive", details=daemon.output)
    assert receiver.finished() == [], "the receiver answered before SIGTERM; the test is void"

    assert daemon.stop(signal.SIGTERM, timeout=20) == 0, daemon.output()

    assert len(receiver.finished()) == 1
    rows = workspace.sql("SELECT state, attempts, last_status FROM webhookd_deliveries")
    assert [tuple(r) for r in rows] == [("succeeded", 1, 200)], daemon.output()
    assert "inflight_cancelled" not in daemon.log_events()


@pytest.mark.slow
def test_request_beyond_the_grace_period_is_left_pending(
    workspace: Workspace, aio_receiver: Callable[..., AioReceiver]
) -> None:
    receiver = aio_receiver(delay=30.0)
    workspace.write_config(
        endpoints=[{"id": "hanging", "url": receiver.url, "secret": "s"}],
        daemon={"grace_seconds": 0.5},
        delivery={"timeout_seconds": 60.0},
    )
    daemon = workspace.start()
    workspace.cli_ok("enqueue", "booking.created", '{"id": "book_hanging"}')
    workspace.wait_until(receiver.started, what="the request to arrive", details=daemon.output)

    assert daemon.stop(signal.SIGTERM, timeout=20) == 0, daemon.output()

    rows = workspace.sql("SELECT state, attempts FROM webhookd_deliveries")
    assert [tuple(r) for r in rows] == [("pending", 0)], daemon.output()
    assert "inflight_cancelled" in daemon.log_events()


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_delivers_every_event(
    workspace: Workspace, aio_receiver: Callable[..., AioReceiver]
) -> None:
    receiver = aio_receiver(delay=0.02)
    workspace.write_config(
        endpoints=[
            {"id": "sink", "url": receiver.url, "secret": "kill-secret", "max_concurrency": 4}
        ],
        retry={"initial_delay_seconds": 0.2, "max_attempts": 20},
    )
    workspace.cli_ok("migrate")
    first = workspace.start()
    inserted: set[str] = set()
    batch = 25
    for start in range(0, KILL_EVENT_COUNT, batch):
        rows = [
            {
                "event_type": "booking.created",
                "event_id": f"evt-kill-{n:04d}",
                "payload": json.dumps({"id": f"book_{n}", "n": n}),
            }
            for n in range(start, start + batch)
        ]
        workspace.insert_outbox(rows)
        inserted.update(str(r["event_id"]) for r in rows)

    workspace.wait_until(
        lambda: len(receiver.finished()) >= KILL_AFTER_DELIVERIES,
        what=f"{KILL_AFTER_DELIVERIES} deliveries before the kill",
        details=first.output,
    )
    first.popen.send_signal(signal.SIGKILL)
    assert first.wait_exit(timeout=10) == -signal.SIGKILL
    delivered_before_restart = {r.delivery_id for r in receiver.finished()}
    assert len(delivered_before_restart) < KILL_EVENT_COUNT, "everything went out before the kill"

    second = workspace.start()

    def all_done() -> bool:
        fanned_out = workspace.scalar("SELECT count(*) FROM webhookd_events")
        states = workspace.delivery_states()
        return fanned_out == KILL_EVENT_COUNT and states == {"succeeded": KILL_EVENT_COUNT}

    workspace.wait_until(
        all_done,
        timeout=90,
        what="every delivery to succeed after the restart",
        details=lambda: f"states: {workspace.delivery_states()}\n{second.output()}",
    )
    assert second.stop(signal.SIGTERM) == 0, second.output()

    assert workspace.scalar("SELECT count(*) FROM webhookd_deliveries WHERE state='pending'") == 0
    assert workspace.scalar("SELECT count(*) FROM webhookd_quarantine") == 0
    received_deliveries = {r.delivery_id for r in receiver.finished()}
    rows = workspace.sql(
        "SELECT d.delivery_id, e.event_id FROM webhookd_deliveries d"
        " JOIN webhookd_events e ON e.id = d.event_pk"
    )
    event_of = {row[0]: row[1] for row in rows}
    received_events = {event_of[d] for d in received_deliveries if d in event_of}
    assert received_deliveries <= set(event_of), "the receiver got unknown delivery ids"
    missing = sorted(inserted - received_events)
    assert not missing, f"{len(missing)} events never reached the receiver: {missing[:10]}"
    received_ns = {json.loads(r.body)["data"]["n"] for r in receiver.finished()}
    assert received_ns == set(range(KILL_EVENT_COUNT))


def test_second_daemon_on_the_same_database_refuses_to_start(workspace: Workspace) -> None:
    workspace.write_config()
    first = workspace.start()
    other_port = free_port()
    result = workspace.cli(
        "run", env={"WEBHOOKD_HTTP__LISTEN": f"127.0.0.1:{other_port}"}, timeout=30
    )
    assert result.returncode == 1, result
    message = result.stderr.strip()
    assert "already running" in message
    assert str(workspace.db) in message
    assert "Traceback" not in result.stderr
    assert len(message.splitlines()) == 1, message

    still = first.get("/readyz")
    assert still is not None
    assert still.status == 200, "the first daemon must keep running"
    assert first.stop(signal.SIGTERM) == 0, first.output()


def test_readyz_healthz_and_metrics_while_running(
    workspace: Workspace, aio_receiver: Callable[..., AioReceiver]
) -> None:
    receiver = aio_receiver()
    workspace.write_config(endpoints=[{"id": "ok", "url": receiver.url, "secret": "s"}])
    daemon: WebhookdProcess = workspace.start()
    workspace.cli_ok("enqueue", "booking.created", '{"id": "book_ready"}')
    workspace.wait_until(
        lambda: workspace.delivery_states() == {"succeeded": 1},
        what="the delivery to succeed",
        details=daemon.output,
    )
    for path in ("/readyz", "/healthz"):
        answer = daemon.get(path)
        assert answer is not None
        assert answer.status == 200, (path, answer)
    metrics = daemon.get("/metrics")
    assert metrics is not None
    assert metrics.status == 200
    assert "webhookd_events_dispatched_total 1.0" in metrics.body
    missing = daemon.get("/nothing-here")
    assert missing is not None
    assert missing.status == 404
    assert daemon.stop(signal.SIGTERM) == 0, daemon.output()
