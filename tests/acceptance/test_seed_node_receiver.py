"""The real daemon delivering to the seed documentation's own Express receiver, in Node.js.

The receiver re-serialises the parsed body with ``JSON.stringify`` before checking the HMAC,
so ``verified`` is true only when webhookd sent exactly JavaScript's canonical bytes, signed
with the endpoint's secret.
"""

from __future__ import annotations

import itertools
import json
import signal
from typing import TYPE_CHECKING, Any

import pytest
from helpers import SeedReceiver, StartSeedReceiver

from webhookd.catalogue import SEED_EVENTS

if TYPE_CHECKING:
    from conftest import WebhookdProcess, Workspace

pytestmark = pytest.mark.node

SECRET = "whsec-seed-receiver-acceptance-3b1d"
HEADER = "x-bookingscheduler"
NODE_WAIT_SECONDS = 30.0


def _configure(workspace: Workspace, receiver: SeedReceiver, secret: str, **overrides: Any) -> None:
    workspace.write_config(
        endpoints=[{"id": "seed-node", "url": receiver.url, "secret": secret}], **overrides
    )


def _check_headers(record: dict[str, Any], event_type: str) -> None:
    headers = record["headers"]
    assert headers["content-type"].startswith("application/json")
    assert headers[f"{HEADER}-event"] == event_type
    signature = headers[f"{HEADER}-signature"]
    assert len(signature) == 64
    assert signature == signature.lower()
    assert headers[f"{HEADER}-delivery"]
    assert headers[f"{HEADER}-timestamp"].isdigit()
    assert headers["user-agent"].startswith("webhookd/")


def _records(receiver: SeedReceiver) -> list[dict[str, Any]]:
    """The receiver's records, split on "\\n" only: ``SeedReceiver.records()`` uses
    ``str.splitlines``, which also splits inside bodies holding U+2028 or U+2029."""
    try:
        text = receiver.record_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1]]


def _wait_all_succeeded(workspace: Workspace, count: int, daemon: WebhookdProcess) -> None:
    workspace.wait_until(
        lambda: workspace.delivery_states() == {"succeeded": count},
        what=f"{count} succeeded deliveries",
        details=lambda: f"states: {workspace.delivery_states()}\n{daemon.output()}",
    )


@pytest.mark.slow
def test_seed_examples_are_verified_by_the_seed_receiver(
    workspace: Workspace, seed_receiver: StartSeedReceiver
) -> None:
    receiver = seed_receiver(SECRET)
    _configure(workspace, receiver, SECRET)
    workspace.cli_ok("migrate")
    by_cli, by_sql = SEED_EVENTS[:4], SEED_EVENTS[4:]
    # Some events wait in the outbox before the daemon starts, the others arrive while it runs.
    for event_type, _, occurred_at, data in by_cli:
        workspace.cli_ok(
            "enqueue",
            event_type,
            json.dumps(data, ensure_ascii=False),
            "--occurred-at",
            occurred_at,
            "--tenant",
            "org_42",
        )
    daemon = workspace.start()
    workspace.insert_outbox(
        [
            {
                "event_type": event_type,
                "tenant": "org_42",
                "occurred_at": occurred_at,
                "payload": json.dumps(data, ensure_ascii=False, indent=2),
            }
            for event_type, _, occurred_at, data in by_sql
        ]
    )

    records = receiver.wait_for_sync(len(SEED_EVENTS), timeout=NODE_WAIT_SECONDS)
    _wait_all_succeeded(workspace, len(SEED_EVENTS), daemon)
    assert len(receiver.records()) == len(SEED_EVENTS), "no event needs a second attempt"

    by_type = {r["body"]["event"]: r for r in records}
    assert set(by_type) == {event_type for event_type, *_ in SEED_EVENTS}
    for event_type, _, occurred_at, data in SEED_EVENTS:
        record = by_type[event_type]
        assert record["status"] == 200, record
        assert record["verified"] is True
        assert record["body"] == {"event": event_type, "timestamp": occurred_at, "data": data}
        _check_headers(record, event_type)
    assert len({r["headers"][f"{HEADER}-delivery"] for r in records}) == len(SEED_EVENTS)
    assert daemon.stop(signal.SIGTERM) == 0, daemon.output()


# Payloads typed as JSON text, the way an application writes them into the outbox, and the
# exact text JavaScript's JSON.stringify(JSON.parse(...)) gives for each.
CANONICAL_CASES: dict[str, tuple[str, str]] = {
    "floats": (
        '{"one": 1.0, "big": 1e21, "small": 1e-7, "tenth": 0.1, "negzero": -0.0,'
        ' "huge": 1.5E+300, "frac": 123456789.125, "neg": -2.50}',
        '{"one":1,"big":1e+21,"small":1e-7,"tenth":0.1,"negzero":0,"huge":1.5e+300,'
        '"frac":123456789.125,"neg":-2.5}',
    ),
    "keys": (
        '{"a": 1, "10": 2, "2": 3, "b": {"z": 1, "1": 2, "0": 3, "y": 4}, "-1": 5, "01": 6}',
        '{"2":3,"10":2,"a":1,"b":{"0":3,"1":2,"z":1,"y":4},"-1":5,"01":6}',
    ),
    "text": (
        '{"accents": "café déjà vu", "emoji": "\U0001f389🎉", "escaped_emoji": "\\ud83c\\udf89",'
        ' "line_sep": "a\u2028b\u2029c", "escaped_line_sep": "\\u2028", "nbsp": "\u00a0",'
        ' "controls": "tab\\tnl\\nnul\\u0000del\u007f", "quote": "\\"\\\\\\/",'
        ' "lone": "\\ud800x"}',
        '{"accents":"café déjà vu","emoji":"\U0001f389\U0001f389","escaped_emoji":"\U0001f389",'
        '"line_sep":"a\u2028b\u2029c","escaped_line_sep":"\u2028","nbsp":"\u00a0",'
        '"controls":"tab\\tnl\\nnul\\u0000del\u007f","quote":"\\"\\\\/","lone":"\\ud800x"}',
    ),
    "nested": (
        '{"deep": [[1, [2.0, [3e0, []]]], {}, [{}], null, true, false],'
        ' "matrix": [[1.10, 2.20], [3.30, 4.40]], "empty": {"": ""}}',
        '{"deep":[[1,[2,[3,[]]]],{},[{}],null,true,false],'
        '"matrix":[[1.1,2.2],[3.3,4.4]],"empty":{"":""}}',
    ),
}


def test_canonical_json_stress_payloads_verify_in_node(
    workspace: Workspace, seed_receiver: StartSeedReceiver
) -> None:
    receiver = seed_receiver(SECRET)
    _configure(workspace, receiver, SECRET)
    workspace.cli_ok("migrate")
    daemon = workspace.start()
    timestamp = "2024-01-15T10:00:00Z"
    names = list(CANONICAL_CASES)
    workspace.insert_outbox(
        [
            {
                "event_type": f"stress.{name}",
                "event_id": f"evt-stress-{name}",
                "occurred_at": timestamp,
                "payload": CANONICAL_CASES[name][0],
            }
            for name in names
        ]
    )

    def all_arrived() -> bool:
        quarantined = workspace.scalar("SELECT count(*) FROM webhookd_quarantine")
        return len(_records(receiver)) + quarantined >= len(names)

    workspace.wait_until(
        all_arrived,
        what=f"{len(names)} records at the receiver",
        details=lambda: f"{receiver.output()}\n{daemon.output()}",
    )
    quarantined = workspace.sql("SELECT event_type, detail FROM webhookd_quarantine")
    assert quarantined == [], [tuple(q) for q in quarantined]
    records = _records(receiver)
    rejected = [
        f"{r['headers'][f'{HEADER}-event']}: HTTP {r['status']}"
        for r in records
        if r["status"] != 200 or not r["verified"]
    ]
    assert not rejected, f"the seed receiver rejected: {rejected}"
    by_type = {r["headers"][f"{HEADER}-event"]: r for r in records}
    for name in names:
        assert by_type[f"stress.{name}"]["body"]["data"] == json.loads(CANONICAL_CASES[name][0])
    _wait_all_succeeded(workspace, len(names), daemon)

    bodies = {
        row[0]: bytes(row[1]).decode("utf-8", "surrogatepass")
        for row in workspace.sql("SELECT event_type, body FROM webhookd_events")
    }
    for name in names:
        expected = (
            f'{{"event":"stress.{name}","timestamp":"{timestamp}",'
            f'"data":{CANONICAL_CASES[name][1]}}}'
        )
        assert bodies[f"stress.{name}"] == expected, name
    assert daemon.stop(signal.SIGTERM) == 0, daemon.output()


@pytest.mark.slow
def test_wrong_secret_is_rejected_retried_and_recorded_as_failed(
    workspace: Workspace, seed_receiver: StartSeedReceiver
) -> None:
    receiver = seed_receiver("the-receivers-secret")
    _configure(
        workspace,
        receiver,
        "a-different-secret",
        retry={"initial_delay_seconds": 0.3, "multiplier": 1.0, "jitter": 0.0, "max_attempts": 3},
    )
    workspace.cli_ok("migrate")
    event_type, _, occurred_at, data = SEED_EVENTS[0]
    workspace.cli_ok(
        "enqueue", event_type, json.dumps(data), "--occurred-at", occurred_at, "--event-id", "e1"
    )
    daemon = workspace.start()

    records = receiver.wait_for_sync(3, timeout=NODE_WAIT_SECONDS)
    workspace.wait_until(
        lambda: workspace.delivery_states() == {"failed": 1},
        what="the delivery to be marked failed",
        details=lambda: f"states: {workspace.delivery_states()}\n{daemon.output()}",
    )
    assert [r["status"] for r in records] == [401, 401, 401]
    assert not any(r["verified"] for r in records)
    assert len({r["headers"][f"{HEADER}-delivery"] for r in records}) == 1
    gaps = [b["received_at"] - a["received_at"] for a, b in itertools.pairwise(records)]
    assert all(gap >= 0.25 for gap in gaps), f"retried before the configured delay: {gaps}"

    failed = workspace.cli_json("deliveries", "list", "--json", "--state", "failed")
    assert len(failed) == 1
    assert failed[0]["event_id"] == "e1"
    assert failed[0]["attempts"] == 3
    assert failed[0]["last_status"] == 401
    shown = workspace.cli_json("deliveries", "show", failed[0]["delivery_id"], "--json")
    assert [a["status_code"] for a in shown["attempt_log"]] == [401, 401, 401]
    assert "Invalid signature" in (shown["attempt_log"][0]["response_excerpt"] or "")
    assert daemon.stop(signal.SIGTERM) == 0, daemon.output()
    assert len(receiver.records()) == 3, "no attempt after the last one"
