"""The running daemon against real aiohttp receivers on loopback: retries on the persisted
schedule, dead letters (and the CLI showing them), concurrency caps measured at the receiver,
no head-of-line blocking, routing, endpoints changed while running, malformed rows, same bytes.

Every test runs ``Daemon(settings).run()`` in-process on a real SQLite file in ``tmp_path`` and
talks to it only as an application (INSERTs), a receiver (HTTP) and an operator (store, CLI,
HTTP port) would.
"""

from __future__ import annotations

import asyncio
import json
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from daemon_fixtures import (
    HANG,
    Answer,
    OutboxRow,
    ReceivedRequest,
    Receiver,
    attempts,
    daemon_settings,
    deliveries,
    eventually,
    execute,
    http_base,
    insert_endpoint,
    insert_outbox,
    per_attempt,
    query,
    running_daemon,
)
from operator_fixtures import endpoint_state_gauge, run_webhookd, samples_by_label

from webhookd.catalogue import SEED_EVENTS

pytestmark = pytest.mark.timeout(120)

SECRET = "whsec_integration_secret"
OTHER_SECRET = "another secret, with spaces and ünïcode"
# The store's times come from time.time() and perf_counter(); they agree to far better than this.
CLOCK_EPSILON_SECONDS = 1e-3


def endpoint(ep_id: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"id": ep_id, "url": url, "secret": SECRET, **extra}


def data_n(request: ReceivedRequest) -> Any:
    return request.json()["data"]["n"]


# -- retries ---------------------------------------------------------------------------------


async def test_retries_until_success_with_same_delivery_id_body_and_persisted_schedule(
    tmp_path: Path,
) -> None:
    db = tmp_path / "webhookd.db"
    delays = [0.2, 0.4]  # initial 0.2 s, multiplier 2, jitter 0
    # The delivery's row as the store held it when each request arrived: at the arrival of
    # attempt k+1 it holds what was decided after attempt k.
    row_at_arrival: list[Any] = []
    answers = per_attempt(500, 500, 200)

    def script(request: ReceivedRequest) -> Answer:
        row_at_arrival.append(deliveries(db)[0])
        return answers(request)

    async with Receiver(answer=script) as receiver:
        settings = daemon_settings(
            tmp_path,
            endpoints=[endpoint("flaky", receiver.url())],
            retry={"initial_delay_seconds": 0.2, "multiplier": 2.0, "jitter": 0.0},
        )
        async with running_daemon(settings):
            await insert_outbox(db, [OutboxRow("booking.created", {"id": "book_123", "n": 1})])
            done = await eventually(
                lambda: deliveries(db, state="succeeded"), what="the delivery to succeed"
            )
    delivery = done[0]
    requests = receiver.requests

    assert [r.answer for r in requests] == [500, 500, 200]
    assert {r.delivery_id for r in requests} == {delivery["delivery_id"]}
    assert all(r.body == bytes(delivery["body"]) for r in requests)
    assert all(r.signature_valid(SECRET) for r in requests)
    for (before, after), delay in zip(pairwise(requests), delays, strict=True):
        assert after.arrived_at - before.arrived_at >= delay

    tries = attempts(db, delivery["id"])
    assert [(a["attempt_no"], a["result"], a["status_code"]) for a in tries] == [
        (1, "http_error", 500),
        (2, "http_error", 500),
        (3, "success", 200),
    ]
    assert (delivery["attempts"], delivery["last_status"]) == (3, 200)

    assert (row_at_arrival[0]["state"], row_at_arrival[0]["attempts"]) == ("pending", 0)
    for k, delay in enumerate(delays, start=1):
        seen, attempt = row_at_arrival[k], tries[k - 1]
        assert (seen["state"], seen["attempts"]) == ("pending", k)
        # With jitter 0, next_attempt_at = (the daemon's clock when attempt k's result came in)
        # + delay. That moment lies after the attempt ended and before its outcome was written
        # (updated_at), so the persisted delay is pinned exactly, whatever the machine's load.
        decided_at = seen["next_attempt_at"] - delay
        attempt_ended = attempt["started_at"] + attempt["duration_seconds"]
        assert attempt_ended - CLOCK_EPSILON_SECONDS <= decided_at
        assert decided_at <= seen["updated_at"] + CLOCK_EPSILON_SECONDS
        # ... and the next attempt came no earlier than the persisted time.
        assert requests[k].arrived_at >= seen["next_attempt_at"]


# -- dead letter and the CLI -----------------------------------------------------------------


async def test_dead_letter_after_max_attempts_and_cli_shows_it(tmp_path: Path) -> None:
    db = tmp_path / "webhookd.db"
    async with Receiver(answer=500) as receiver:
        settings = daemon_settings(
            tmp_path,
            endpoints=[endpoint("down", receiver.url())],
            retry={"initial_delay_seconds": 0.1, "multiplier": 1.0, "max_attempts": 3},
        )
        async with running_daemon(settings):
            await insert_outbox(
                db, [OutboxRow("payment.failed", {"id": "pay_1"}, event_id="evt_dead_1")]
            )
            failed = await eventually(
                lambda: deliveries(db, state="failed"), what="the delivery to be dead-lettered"
            )
    # The daemon has stopped: no attempt beyond the third was made.
    assert len(receiver.requests) == 3
    delivery = failed[0]
    assert delivery["attempts"] == 3
    assert [(a["attempt_no"], a["status_code"]) for a in attempts(db, delivery["id"])] == [
        (1, 500),
        (2, 500),
        (3, 500),
    ]

    config = tmp_path / "webhookd.toml"
    config.write_text(f"[database]\npath = {json.dumps(str(db))}\n")
    code, out, err = await run_webhookd(
        "deliveries", "list", "--state", "failed", "--json", "--config", str(config)
    )
    assert code == 0, err
    listed = json.loads(out)
    assert len(listed) == 1
    assert listed[0]["delivery_id"] == delivery["delivery_id"]
    assert listed[0]["state"] == "failed"
    assert listed[0]["attempts"] == 3
    assert listed[0]["endpoint_id"] == "down"
    assert listed[0]["event_id"] == "evt_dead_1"
    assert listed[0]["last_status"] == 500

    code, out, err = await run_webhookd(
        "deliveries", "list", "--state", "succeeded", "--json", "--config", str(config)
    )
    assert (code, json.loads(out)) == (0, []), err

    code, out, err = await run_webhookd(
        "deliveries", "show", delivery["delivery_id"], "--json", "--config", str(config)
    )
    assert code == 0, err
    shown = json.loads(out)
    assert shown["state"] == "failed"
    assert [(a["attempt_no"], a["result"], a["status_code"]) for a in shown["attempt_log"]] == [
        (1, "http_error", 500),
        (2, "http_error", 500),
        (3, "http_error", 500),
    ]

    code, out, err = await run_webhookd(
        "deliveries", "show", delivery["delivery_id"], "-c", str(config)
    )
    assert code == 0, err
    assert "failed" in out
    assert out.count("HTTP 500") == 3
    assert all(f"#{n}" in out for n in (1, 2, 3))


# -- limits ----------------------------------------------------------------------------------


async def test_per_endpoint_cap_is_never_exceeded_at_the_receiver(tmp_path: Path) -> None:
    db = tmp_path / "webhookd.db"
    async with Receiver(delay_seconds=0.05) as receiver:
        settings = daemon_settings(
            tmp_path, endpoints=[endpoint("capped", receiver.url(), max_concurrency=3)]
        )
        async with running_daemon(settings):
            await insert_outbox(db, [OutboxRow("booking.created", {"n": n}) for n in range(40)])
            await eventually(
                lambda: len(deliveries(db, state="succeeded")) == 40,
                what="40 deliveries to succeed",
            )
    assert sorted(data_n(r) for r in receiver.requests) == list(range(40))
    assert receiver.max_inflight <= 3
    assert receiver.max_inflight > 1  # requests did overlap: the cap was what held them back


async def test_global_inflight_cap_holds_across_endpoints(tmp_path: Path) -> None:
    db = tmp_path / "webhookd.db"
    # One receiver behind both endpoints, so it sees their requests together.
    async with Receiver(delay_seconds=0.05) as receiver:
        settings = daemon_settings(
            tmp_path,
            endpoints=[
                endpoint("a", receiver.url("/a"), max_concurrency=5),
                endpoint("b", receiver.url("/b"), max_concurrency=5),
            ],
            delivery={"max_inflight": 3},
        )
        async with running_daemon(settings):
            await insert_outbox(db, [OutboxRow("booking.created", {"n": n}) for n in range(15)])
            await eventually(
                lambda: len(deliveries(db, state="succeeded")) == 30,
                what="30 deliveries to succeed",
            )
    assert sorted(data_n(r) for r in receiver.on_path("/a")) == list(range(15))
    assert sorted(data_n(r) for r in receiver.on_path("/b")) == list(range(15))
    assert receiver.max_inflight <= 3  # the endpoints' own caps would allow 10
    assert receiver.max_inflight > 1


async def test_hanging_endpoint_leaves_healthy_endpoint_unaffected(tmp_path: Path) -> None:
    db = tmp_path / "webhookd.db"
    async with Receiver(answer=HANG) as stuck, Receiver() as healthy:
        settings = daemon_settings(
            tmp_path,
            endpoints=[
                endpoint("stuck", stuck.url(), max_concurrency=2),
                endpoint("healthy", healthy.url()),
            ],
            # Longer than the test: the stuck requests stay stuck until the daemon stops.
            delivery={"timeout_seconds": 120.0},
            daemon={"grace_seconds": 0.1},
        )
        async with running_daemon(settings):
            await insert_outbox(db, [OutboxRow("booking.created", {"n": n}) for n in range(2)])
            await eventually(lambda: stuck.inflight == 2, what="the stuck endpoint's cap to fill")
            hung_since = max(r.arrived_at for r in stuck.requests)
            await insert_outbox(db, [OutboxRow("booking.created", {"n": n}) for n in range(2, 12)])
            await eventually(
                lambda: len(deliveries(db, endpoint_id="healthy", state="succeeded")) == 12,
                what="every healthy delivery to succeed",
            )
            # All of that happened while both stuck requests were still hanging.
            assert stuck.answered() == []
            assert stuck.inflight == 2
            assert len(stuck.requests) == 2
            stuck_rows = deliveries(db, endpoint_id="stuck")
            assert len(stuck_rows) == 12
            assert all((r["state"], r["attempts"]) == ("pending", 0) for r in stuck_rows)
    late = [r for r in healthy.requests if data_n(r) >= 2]
    assert sorted(data_n(r) for r in late) == list(range(2, 12))
    assert all(r.arrived_at > hung_since for r in late)


async def test_attempt_past_the_timeout_is_recorded_as_timeout(tmp_path: Path) -> None:
    db = tmp_path / "webhookd.db"
    async with Receiver(answer=HANG) as receiver:
        settings = daemon_settings(
            tmp_path,
            endpoints=[endpoint("slow", receiver.url())],
            delivery={"timeout_seconds": 0.3},
            retry={"initial_delay_seconds": 0.1, "max_attempts": 2},
        )
        async with running_daemon(settings):
            await insert_outbox(db, [OutboxRow("booking.created", {"n": 1})])
            failed = await eventually(
                lambda: deliveries(db, state="failed"), what="the delivery to fail"
            )
    tries = attempts(db, failed[0]["id"])
    assert [(a["result"], a["status_code"]) for a in tries] == [("timeout", None)] * 2
    assert all("timed out" in a["error"] for a in tries)
    assert all(a["duration_seconds"] >= 0.3 for a in tries)
    assert len(receiver.requests) == 2


# -- routing ---------------------------------------------------------------------------------


async def test_tenant_routing_and_event_patterns(tmp_path: Path) -> None:
    db = tmp_path / "webhookd.db"
    events = {
        "e1": ("booking.created", "org_a"),
        "e2": ("booking.created", "org_b"),
        "e3": ("booking.cancelled", "org_b"),
        "e4": ("payment.succeeded", None),
        "e5": ("payment.succeeded", "org_b"),
        "e6": ("payment.refunded", "org_a"),
        "e7": ("bookingx.created", "org_a"),  # not under "booking."
        "e8": ("payment.succeeded_v2", None),  # an exact pattern is not a prefix
    }
    # Worked out by hand from DESIGN.md's rule, not by the code under test.
    expected = {
        "/everything": {"e1", "e2", "e3", "e4", "e5", "e6", "e7", "e8"},
        "/org-a-bookings": {"e1"},
        "/payments-exact": {"e4", "e5"},
        "/org-b-mixed": {"e3", "e5"},
    }
    async with Receiver() as receiver:
        settings = daemon_settings(
            tmp_path,
            endpoints=[
                endpoint("everything", receiver.url("/everything")),
                endpoint(
                    "org-a-bookings",
                    receiver.url("/org-a-bookings"),
                    tenant="org_a",
                    events=["booking.*"],
                ),
                endpoint(
                    "payments-exact", receiver.url("/payments-exact"), events=["payment.succeeded"]
                ),
                endpoint(
                    "org-b-mixed",
                    receiver.url("/org-b-mixed"),
                    tenant="org_b",
                    events=["payment.*", "booking.cancelled"],
                ),
            ],
        )
        total = sum(len(v) for v in expected.values())
        async with running_daemon(settings):
            await insert_outbox(
                db,
                [
                    OutboxRow(event_type, {"n": label}, tenant=tenant)
                    for label, (event_type, tenant) in events.items()
                ],
            )
            await eventually(
                lambda: len(deliveries(db, state="succeeded")) == total,
                what=f"{total} deliveries to succeed",
            )
    assert len(deliveries(db)) == total  # nothing else was fanned out
    for path, labels in expected.items():
        got = receiver.on_path(path)
        assert sorted(data_n(r) for r in got) == sorted(labels), path
        for r in got:
            assert r.event_type == events[data_n(r)][0]
            assert r.json()["event"] == events[data_n(r)][0]


async def test_table_endpoint_added_and_disabled_while_running(tmp_path: Path) -> None:
    db = tmp_path / "webhookd.db"
    # The dynamic endpoint fails the first attempt of event e3, so that it holds a pending
    # delivery (next attempt 1 s later) when it is disabled.
    fail_first = per_attempt(500, 200)

    def script(request: ReceivedRequest) -> Answer:
        if request.path == "/dyn" and data_n(request) == "e3":
            return fail_first(request)
        return 200

    def delivery_of(event_id: str, endpoint_id: str) -> Any:
        rows = [r for r in deliveries(db, endpoint_id=endpoint_id) if r["event_id"] == event_id]
        return rows[0] if rows else None

    def row(label: str, event_type: str = "booking.created") -> OutboxRow:
        return OutboxRow(event_type, {"n": label}, event_id=f"evt_{label}")

    async with Receiver(answer=script) as receiver:
        settings = daemon_settings(
            tmp_path,
            endpoints=[endpoint("static", receiver.url("/static"))],
            retry={"initial_delay_seconds": 1.0, "multiplier": 1.0},
        )
        async with running_daemon(settings) as daemon:
            await insert_outbox(db, [row("e1")])
            await eventually(lambda: receiver.on_path("/static"), what="e1 at /static")

            await insert_endpoint(
                db, id="dyn", url=receiver.url("/dyn"), secret=OTHER_SECRET, events="booking.*"
            )
            await insert_outbox(db, [row("e2"), row("e2p", "payment.succeeded")])
            await eventually(lambda: receiver.on_path("/dyn"), what="e2 at /dyn")

            await insert_outbox(db, [row("e3", "booking.updated")])
            await eventually(
                lambda: (d := delivery_of("evt_e3", "dyn")) is not None and d["attempts"] == 1,
                what="e3's first attempt at /dyn to be recorded",
            )
            pending = delivery_of("evt_e3", "dyn")
            assert pending["state"] == "pending"

            await execute(db, "UPDATE webhook_endpoints SET enabled = 0 WHERE id = 'dyn'")
            await eventually(
                lambda: endpoint_state_gauge(daemon, "dyn", "disabled") == 1.0,
                what="dyn to be disabled",
            )
            await insert_outbox(db, [row("e4")])
            await eventually(
                lambda: (
                    delivery_of("evt_e4", "static") is not None
                    and delivery_of("evt_e4", "static")["state"] == "succeeded"
                ),
                what="e4 at /static",
            )
            # Wait past the time e3's retry was due: a disabled endpoint gets no attempt.
            await asyncio.sleep(max(0.0, pending["next_attempt_at"] + 0.3 - time.time()))
            assert sorted(data_n(r) for r in receiver.on_path("/dyn")) == ["e2", "e3"]
            kept = delivery_of("evt_e3", "dyn")
            assert (kept["state"], kept["attempts"]) == ("pending", 1)
            assert delivery_of("evt_e4", "dyn") is None

            # Re-enabled, it picks up the delivery it kept.
            await execute(db, "UPDATE webhook_endpoints SET enabled = 1 WHERE id = 'dyn'")
            await eventually(
                lambda: delivery_of("evt_e3", "dyn")["state"] == "succeeded",
                what="e3 to reach /dyn after re-enabling",
            )
    dyn = receiver.on_path("/dyn")
    assert sorted(data_n(r) for r in dyn) == ["e2", "e3", "e3"]
    assert all(r.signature_valid(OTHER_SECRET) for r in dyn)
    # Fan-out happens once: events older than the endpoint never reach it.
    assert delivery_of("evt_e1", "dyn") is None
    assert delivery_of("evt_e2p", "dyn") is None  # not matched by booking.*
    assert sorted(data_n(r) for r in receiver.on_path("/static")) == ["e1", "e2", "e2p", "e3", "e4"]


# -- malformed rows --------------------------------------------------------------------------


async def test_malformed_rows_are_quarantined_while_good_rows_flow(tmp_path: Path) -> None:
    db = tmp_path / "webhookd.db"
    rows = [
        OutboxRow("booking.created", {"n": 0}),
        OutboxRow("booking.created", '{"id": "book_1", '),
        OutboxRow("booking.created", {"n": 1}),
        OutboxRow("booking.created", "[1, 2, 3]"),
        OutboxRow("booking.created", {"n": 2}),
        OutboxRow("Booking Created", '{"id": "book_2"}'),
        OutboxRow("booking.created", {"n": 3}),
        OutboxRow("payment.succeeded", '{"amount": 1152921504606846976}'),  # 2**60
        OutboxRow("booking.created", {"n": 4}),
        OutboxRow("booking.created", '{"amount": NaN}'),
        OutboxRow("booking.created", {"n": 5}),
    ]
    bad_reasons = {
        1: "invalid_json",
        3: "not_object",
        5: "bad_event_type",
        7: "unsafe_integer",
        9: "non_finite_number",
    }
    async with Receiver() as receiver:
        settings = daemon_settings(tmp_path, endpoints=[endpoint("ep", receiver.url())], http=True)
        async with running_daemon(settings) as daemon, aiohttp.ClientSession() as http:
            ids = await insert_outbox(db, rows)
            await eventually(
                lambda: len(deliveries(db, state="succeeded")) == 6, what="the good rows"
            )
            # The daemon keeps flowing after quarantining.
            await insert_outbox(db, [OutboxRow("booking.created", {"n": 6})])
            await eventually(lambda: len(deliveries(db, state="succeeded")) == 7, what="row 6")

            async with http.get(http_base(daemon) + "/readyz") as response:
                assert response.status == 200, await response.text()
            async with http.get(http_base(daemon) + "/metrics") as response:
                assert response.status == 200
                text = await response.text()
    assert sorted(data_n(r) for r in receiver.requests) == list(range(7))
    quarantined = query(db, "SELECT * FROM webhookd_quarantine ORDER BY outbox_id")
    assert [(q["outbox_id"], q["reason"]) for q in quarantined] == [
        (ids[i], reason) for i, reason in bad_reasons.items()
    ]
    assert all(q["detail"] for q in quarantined)

    rejected = samples_by_label(text, "webhookd_events_rejected_total", "reason")
    assert rejected == {reason: 1.0 for reason in bad_reasons.values()}


# -- the bytes on the wire -------------------------------------------------------------------


async def test_one_event_sends_the_same_seed_envelope_bytes_to_every_endpoint(
    tmp_path: Path,
) -> None:
    db = tmp_path / "webhookd.db"
    event_type, _, timestamp, data = SEED_EVENTS[0]
    # The application wrote the payload pretty-printed with ASCII escapes; receivers get the
    # seed's compact envelope, keys in the seed's order, UTF-8 unescaped (JSON.stringify's form).
    payload_as_written = json.dumps(data, indent=2, ensure_ascii=True)
    envelope = {"event": event_type, "timestamp": timestamp, "data": data}
    expected_body = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()
    async with Receiver() as receiver:
        settings = daemon_settings(
            tmp_path,
            endpoints=[
                endpoint("one", receiver.url("/one")),
                {"id": "two", "url": receiver.url("/two"), "secret": OTHER_SECRET},
            ],
        )
        async with running_daemon(settings):
            sent_after = int(time.time())
            await insert_outbox(
                db, [OutboxRow(event_type, payload_as_written, occurred_at=timestamp)]
            )
            await eventually(lambda: len(receiver.requests) == 2, what="both deliveries")
    [one] = receiver.on_path("/one")
    [two] = receiver.on_path("/two")
    assert one.body == two.body == expected_body
    assert one.signature_valid(SECRET)
    assert two.signature_valid(OTHER_SECRET)
    assert one.delivery_id != two.delivery_id
    for r in (one, two):
        assert r.method == "POST"
        assert r.headers["Content-Type"] == "application/json"
        assert r.headers["User-Agent"].startswith("webhookd/")
        assert r.event_type == event_type
        # The attempt's Unix time, not the event's occurred_at.
        assert sent_after <= int(r.headers["X-BookingScheduler-Timestamp"]) <= r.arrived_at
