"""The ``[events]`` settings in a running daemon: what a receiver gets, what is quarantined and
why, and the log line and metric of ``schema_mismatch = "warn"``, for rows an application
INSERTs that match the event catalogue, break it, or use a type outside it."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from daemon_fixtures import (
    OutboxRow,
    Receiver,
    daemon_settings,
    eventually,
    execute,
    http_base,
    insert_outbox,
    query,
    running_daemon,
)
from operator_fixtures import json_log_lines, logged, samples_by_label

from webhookd.catalogue import SEED_EVENTS
from webhookd.daemon import Daemon

SECRET = "catalogue-policy-secret"
PAYMENT = next(data for event_type, _, _, data in SEED_EVENTS if event_type == "payment.succeeded")
GOOD = OutboxRow("payment.succeeded", PAYMENT, event_id="evt_good")
BAD = OutboxRow(
    "payment.succeeded", {**PAYMENT, "id": "pay_790", "amount": "9000"}, event_id="evt_bad"
)
UNKNOWN = OutboxRow("invoice.paid", {"id": "inv_1", "amount": 100}, event_id="evt_unknown")
ROWS = [GOOD, BAD, UNKNOWN]
BY_DATA_ID = {row.payload["id"]: row for row in ROWS}  # type: ignore[index]
PROBLEM = "data.amount: expected an integer, got a string"


@dataclass(frozen=True)
class Expected:
    delivered: frozenset[str]  # event ids the receiver gets
    quarantined: Mapping[str, str]  # event id -> reason
    warned: bool  # BAD is logged and counted as a schema mismatch


CASES: dict[str, tuple[dict[str, Any], Expected]] = {
    "deliver": (
        {"schema_mismatch": "deliver"},
        Expected(frozenset({"evt_good", "evt_bad", "evt_unknown"}), {}, warned=False),
    ),
    "warn": (
        {"schema_mismatch": "warn"},
        Expected(frozenset({"evt_good", "evt_bad", "evt_unknown"}), {}, warned=True),
    ),
    "quarantine": (
        {"schema_mismatch": "quarantine"},
        Expected(frozenset({"evt_good", "evt_unknown"}), {"evt_bad": "schema_mismatch"}, False),
    ),
    "no unknown types": (
        {"allow_unknown_types": False},  # and the default, "warn"
        Expected(
            frozenset({"evt_good", "evt_bad"}), {"evt_unknown": "unknown_event_type"}, warned=True
        ),
    ),
}


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """The daemon's log lines at warning level and above, formatted as it writes them (JSON)."""
    with json_log_lines(logging.WARNING) as stream:
        yield stream


def processed(db: Path) -> int:
    """Outbox rows the daemon has dealt with: fanned out as events or quarantined."""
    events = query(db, "SELECT COUNT(*) FROM webhookd_events")[0][0]
    quarantined = query(db, "SELECT COUNT(*) FROM webhookd_quarantine")[0][0]
    return int(events) + int(quarantined)


async def scrape(daemon: Daemon, name: str, label: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(http_base(daemon) + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return samples_by_label(text, name, label)


@pytest.mark.parametrize(("events", "expected"), CASES.values(), ids=list(CASES))
async def test_the_events_policy_decides_what_receivers_get(
    tmp_path: Path, log_lines: io.StringIO, events: dict[str, Any], expected: Expected
) -> None:
    db = tmp_path / "webhookd.db"
    async with Receiver() as receiver:
        endpoint = {"id": "ep", "url": receiver.url(), "secret": SECRET}
        settings = daemon_settings(tmp_path, endpoints=[endpoint], http=True, events=events)
        async with running_daemon(settings) as daemon:
            ids = dict(zip([r.event_id for r in ROWS], await insert_outbox(db, ROWS), strict=True))
            await eventually(lambda: processed(db) == len(ROWS), what="all rows processed")
            await eventually(
                lambda: len(receiver.requests) == len(expected.delivered), what="the deliveries"
            )
            mismatches = await scrape(daemon, "webhookd_events_schema_mismatch_total", "event_type")
            rejected = await scrape(daemon, "webhookd_events_rejected_total", "reason")

    assert {BY_DATA_ID[r.json()["data"]["id"]].event_id for r in receiver.requests} == (
        expected.delivered
    )
    for request in receiver.requests:
        row = BY_DATA_ID[request.json()["data"]["id"]]
        # Delivered as the application wrote it (a mismatch is never "fixed"), and signed.
        assert request.json()["event"] == request.event_type == row.event_type
        assert request.json()["data"] == row.payload
        assert request.signature_valid(SECRET)

    quarantined = query(db, "SELECT * FROM webhookd_quarantine ORDER BY outbox_id")
    assert {q["event_id"]: q["reason"] for q in quarantined} == dict(expected.quarantined)
    assert {q["outbox_id"] for q in quarantined} == {
        ids[event_id] for event_id in expected.quarantined
    }
    for q in quarantined:
        if q["reason"] == "schema_mismatch":
            assert PROBLEM in q["detail"]
        else:
            assert "invoice.paid" in q["detail"]
    assert rejected == {reason: 1.0 for reason in expected.quarantined.values()}

    warnings = logged(log_lines, "event_schema_mismatch")
    if expected.warned:
        assert mismatches == {"payment.succeeded": 1.0}
        [line] = warnings
        assert line["level"] == "warning"
        assert (line["event_type"], line["outbox_id"], line["event_id"], line["problem"]) == (
            "payment.succeeded",
            ids["evt_bad"],
            "evt_bad",
            PROBLEM,
        )
        assert "9000" not in line["problem"]  # values are not echoed into logs
    else:
        assert mismatches.get("payment.succeeded", 0.0) == 0.0
        assert warnings == []


async def test_no_warning_for_a_mismatched_row_refused_as_a_duplicate(
    tmp_path: Path, log_lines: io.StringIO
) -> None:
    """A row whose event id was already delivered is never sent, so it is not a mismatch that
    reached receivers: only its quarantine (duplicate_event_id) is reported."""
    db = tmp_path / "webhookd.db"
    async with Receiver() as receiver:
        endpoint = {"id": "ep", "url": receiver.url(), "secret": SECRET}
        settings = daemon_settings(tmp_path, endpoints=[endpoint], http=True)
        async with running_daemon(settings) as daemon:
            await insert_outbox(db, [GOOD])
            await eventually(lambda: processed(db) == 1, what="the first row processed")
            # The application prunes its outbox, then writes the same event id again.
            await execute(db, "DELETE FROM webhook_outbox WHERE event_id = ?", (GOOD.event_id,))
            again = OutboxRow(
                "payment.succeeded", {**PAYMENT, "amount": "9000"}, event_id="evt_good"
            )
            [outbox_id] = await insert_outbox(db, [again])
            await eventually(lambda: processed(db) == 2, what="the second row processed")
            await eventually(lambda: len(receiver.requests) == 1, what="the first delivery")
            mismatches = await scrape(daemon, "webhookd_events_schema_mismatch_total", "event_type")
    [q] = query(db, "SELECT * FROM webhookd_quarantine")
    assert (q["outbox_id"], q["reason"]) == (outbox_id, "duplicate_event_id")
    assert len(receiver.requests) == 1
    assert logged(log_lines, "event_schema_mismatch") == []
    assert mismatches.get("payment.succeeded", 0.0) == 0.0
