"""The administration commands as a sysadmin runs them, against a running daemon: endpoints
add/update/enable/disable/remove/list/show, deliveries list/retry, events show EVENT_ID, stats.
Every listing's ``--json`` must parse."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trustme
from helpers import free_port

if TYPE_CHECKING:
    from conftest import AioReceiver, WebhookdProcess, Workspace

WEBHOOKD = Path(sys.executable).parent / "webhookd"
EXIT_FAILURE = 1
EXIT_USAGE = 2
CLI_TIMEOUT_SECONDS = 60.0
SETTLE_SECONDS = 0.5  # after the daemon has processed a change: time a wrong request would need

StartReceiver = Callable[..., "AioReceiver"]


# -- helpers -----------------------------------------------------------------------------------


def fanned_out(ws: Workspace, outbox_id: int) -> bool:
    """The daemon has fanned the outbox out up to ``outbox_id``."""
    cursor = ws.scalar("SELECT value FROM webhookd_state WHERE key = 'outbox_cursor'")
    return int(cursor) >= outbox_id


def enqueue(ws: Workspace, event_type: str, data: dict[str, Any], *args: str) -> str:
    """`webhookd enqueue`; returns the event id it prints."""
    return str(ws.cli_ok("enqueue", event_type, json.dumps(data), *args).stdout).strip()


def last_outbox_id(ws: Workspace) -> int:
    return int(ws.scalar("SELECT max(id) FROM webhook_outbox"))


def wait_fanned_out(ws: Workspace, daemon: WebhookdProcess) -> None:
    last = last_outbox_id(ws)
    ws.wait_until(lambda: fanned_out(ws, last), what="the outbox fanned out", details=daemon.output)


def delivery_states(ws: Workspace, endpoint_id: str) -> list[str]:
    rows = ws.sql(
        "SELECT state FROM webhookd_deliveries WHERE endpoint_id = ? ORDER BY id", (endpoint_id,)
    )
    return [r[0] for r in rows]


def dead_letters(ws: Workspace, endpoint_id: str, count: int, daemon: WebhookdProcess) -> None:
    ws.wait_until(
        lambda: delivery_states(ws, endpoint_id) == ["failed"] * count,
        what=f"{count} dead letters for {endpoint_id}",
        details=daemon.output,
    )


# -- endpoints -----------------------------------------------------------------------------------


def test_an_endpoint_added_disabled_and_enabled_while_the_daemon_runs(
    workspace: Workspace, aio_receiver: StartReceiver
) -> None:
    receiver = aio_receiver()
    workspace.write_config()
    workspace.cli_ok("migrate")
    daemon = workspace.start()

    added = workspace.cli_ok(
        "endpoints", "add", "crm", "--url", receiver.url, "--generate-secret",
        "--events", "booking.*", "--description", "CRM", "--header", "X-Team=crm",
    )  # fmt: skip
    secret = added.stdout.strip()
    assert secret.startswith("whsec_")
    assert "shown only this once" in added.stderr
    [row] = workspace.sql("SELECT secret, events, headers, enabled FROM webhook_endpoints")
    assert (row[0], json.loads(row[1]), json.loads(row[2]), row[3]) == (
        secret,
        ["booking.*"],
        {"X-Team": "crm"},
        1,
    )

    # Added: the next event goes there, without a restart.
    time.sleep(SETTLE_SECONDS)  # the daemon reloads endpoints before its next fan-out
    first = enqueue(workspace, "booking.created", {"id": "b1"})
    workspace.wait_until(lambda: len(receiver.finished()) == 1, what="the first delivery")
    assert receiver.finished()[0].json()["data"] == {"id": "b1"}
    enqueue(workspace, "payment.succeeded", {"id": "p1"})  # not a booking.* event
    wait_fanned_out(workspace, daemon)

    # Disabled: nothing more is sent to it.
    disabled = workspace.cli_ok("endpoints", "disable", "crm")
    assert "disabled" in disabled.stderr
    time.sleep(SETTLE_SECONDS)
    enqueue(workspace, "booking.updated", {"id": "b1"})
    wait_fanned_out(workspace, daemon)
    time.sleep(SETTLE_SECONDS)
    assert len(receiver.started()) == 1
    shown = workspace.cli_json("endpoints", "show", "crm", "--json")
    assert (shown["state"], shown["enabled"]) == ("disabled", False)
    again = workspace.cli_ok("endpoints", "disable", "crm")
    assert "already disabled" in again.stderr

    # Enabled again: sent to again.
    workspace.cli_ok("endpoints", "enable", "crm")
    time.sleep(SETTLE_SECONDS)
    enqueue(workspace, "booking.cancelled", {"id": "b1"})
    workspace.wait_until(lambda: len(receiver.finished()) == 2, what="the second delivery")
    assert [r.event_type for r in receiver.finished()] == ["booking.created", "booking.cancelled"]

    listed = workspace.cli_json("endpoints", "list", "--json")
    [crm] = [e for e in listed if e["id"] == "crm"]
    assert (crm["source"], crm["state"], crm["pending"], crm["events"]) == (
        "table",
        "enabled",
        0,
        ["booking.*"],
    )
    health = crm["health"]
    assert (health["attempts"], health["succeeded"], health["success_rate"]) == (2, 2, 1.0)
    assert health["p95_latency_seconds"] > 0
    assert health["last_error"] is None
    assert health["window_seconds"] == 3600
    assert crm["headers"] == ["X-Team"]  # names only
    table = workspace.cli_ok("endpoints", "list")
    assert "100.0%" in table.stdout
    assert secret not in table.stdout + json.dumps(listed)
    events = workspace.cli_json("events", "show", first, "--json")
    assert [d["endpoint_id"] for d in events["deliveries"]] == ["crm"]
    assert daemon.stop() == 0, daemon.output()


def test_update_changes_only_what_its_flags_say(workspace: Workspace) -> None:
    workspace.write_config()
    workspace.cli_ok("migrate")
    secret_file = workspace.dir / "secret.txt"
    secret_file.write_text("first-secret-value\n", encoding="utf-8")
    workspace.cli_ok(
        "endpoints", "add", "crm", "--url", "https://crm.example/hook", "--secret-file",
        str(secret_file), "--tenant", "org_1", "--max-concurrency", "4", "--disabled",
    )  # fmt: skip
    before = workspace.cli_json("endpoints", "show", "crm", "--json")
    assert (before["tenant"], before["max_concurrency"], before["state"]) == (
        "org_1",
        4,
        "disabled",
    )
    assert workspace.scalar("SELECT secret FROM webhook_endpoints") == "first-secret-value"

    workspace.cli_ok("endpoints", "update", "crm", "--url", "https://crm2.example/hook")
    after = workspace.cli_json("endpoints", "show", "crm", "--json")
    assert after == {**before, "url": "https://crm2.example/hook"}

    changed = workspace.cli_ok(
        "endpoints", "update", "crm", "--tenant", "", "--enabled", "--schemes", "seed,standard",
        "--generate-secret",
    )  # fmt: skip
    new_secret = changed.stdout.strip()
    assert new_secret.startswith("whsec_")
    assert "no longer signs" in changed.stderr
    after = workspace.cli_json("endpoints", "show", "crm", "--json")
    assert (after["tenant"], after["state"], after["schemes"]) == (
        None,
        "enabled",
        ["seed", "standard"],
    )
    assert workspace.scalar("SELECT secret FROM webhook_endpoints") == new_secret

    # A change the daemon would refuse is not written.
    refused = workspace.cli("endpoints", "update", "crm", "--url", "https://u:p@crm.example/h")
    assert refused.returncode == EXIT_USAGE
    assert "must not contain credentials" in refused.stderr
    assert workspace.scalar("SELECT url FROM webhook_endpoints") == "https://crm2.example/hook"
    # --ca-bundle: an absolute path to a PEM file the daemon can load, '' for the default.
    pem = workspace.dir / "private-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(pem))
    workspace.cli_ok("endpoints", "update", "crm", "--ca-bundle", str(pem))
    assert workspace.scalar("SELECT ca_bundle FROM webhook_endpoints") == str(pem)
    assert f"ca bundle    {pem}" in workspace.cli_ok("endpoints", "show", "crm").stdout
    not_pem = workspace.cli("endpoints", "update", "crm", "--ca-bundle", str(secret_file))
    assert not_pem.returncode == EXIT_USAGE
    assert "no PEM certificate could be read" in not_pem.stderr
    relative = workspace.cli("endpoints", "update", "crm", "--ca-bundle", "private-ca.pem")
    assert relative.returncode == EXIT_USAGE
    assert "absolute path" in relative.stderr
    assert workspace.scalar("SELECT ca_bundle FROM webhook_endpoints") == str(pem)
    workspace.cli_ok("endpoints", "update", "crm", "--ca-bundle", "")
    assert workspace.scalar("SELECT ca_bundle FROM webhook_endpoints") is None

    missing = workspace.cli("endpoints", "update", "nope", "--description", "x")
    assert missing.returncode == EXIT_FAILURE
    assert "no endpoint 'nope'" in missing.stderr


def test_add_validates_like_the_daemon_and_writes_nothing_it_refuses(
    workspace: Workspace,
) -> None:
    workspace.write_config(
        endpoints=[{"id": "static", "url": "https://static.example/h", "secret": "s3cret-static"}],
        delivery={"allow_http": False},
    )
    workspace.cli_ok("migrate")

    bad = workspace.cli(
        "endpoints", "add", "crm", "--url", "http://crm.example/hook", "--generate-secret",
        "--events", "Booking Created", "--header", "Content-Type=text/plain",
        "--max-concurrency", "0",
    )  # fmt: skip
    assert bad.returncode == EXIT_USAGE
    for problem in ("plain http://", "'Booking Created'", "max_concurrency", "Content-Type"):
        assert problem in bad.stderr
    assert bad.stdout == ""  # no secret printed for an endpoint that was not added
    assert "Traceback" not in bad.stderr

    standard = workspace.cli(
        "endpoints", "add", "std", "--url", "https://std.example/h", "--secret-file",
        "/dev/null", "--schemes", "standard",
    )  # fmt: skip
    assert standard.returncode == EXIT_USAGE
    assert "empty" in standard.stderr
    static = workspace.cli("endpoints", "add", "static", "--url", "https://x.example/h",
                           "--generate-secret")  # fmt: skip
    assert static.returncode == EXIT_FAILURE
    assert "defined in the config file" in static.stderr
    for command in ("disable", "enable", "remove"):
        result = workspace.cli("endpoints", command, "static")
        assert result.returncode == EXIT_FAILURE
        assert "defined in the config file" in result.stderr
    usage = workspace.cli("endpoints", "add", "crm", "--url", "https://crm.example/h")
    assert usage.returncode == EXIT_USAGE  # a secret is required
    assert workspace.scalar("SELECT count(*) FROM webhook_endpoints") == 0

    workspace.cli_ok("endpoints", "add", "crm", "--url", "https://crm.example/h",
                     "--generate-secret")  # fmt: skip
    twice = workspace.cli("endpoints", "add", "crm", "--url", "https://crm.example/h",
                          "--generate-secret")  # fmt: skip
    assert twice.returncode == EXIT_FAILURE
    assert "exists already" in twice.stderr
    assert twice.stdout == ""


def test_remove_refuses_an_endpoint_with_pending_deliveries_unless_forced(
    workspace: Workspace,
) -> None:
    workspace.write_config(retry={"initial_delay_seconds": 3600.0})
    workspace.cli_ok("migrate")
    workspace.cli_ok(
        "endpoints", "add", "down", "--url", f"http://127.0.0.1:{free_port()}/hook",
        "--generate-secret",
    )  # fmt: skip
    daemon = workspace.start()
    enqueue(workspace, "booking.created", {"id": "b1"})
    enqueue(workspace, "booking.created", {"id": "b2"})
    workspace.wait_until(
        lambda: workspace.scalar("SELECT count(*) FROM webhookd_attempts") == 2,
        what="a failed first attempt each",
        details=daemon.output,
    )

    refused = workspace.cli("endpoints", "remove", "down")
    assert refused.returncode == EXIT_USAGE
    assert "2 pending deliveries" in refused.stderr
    assert "--force" in refused.stderr
    assert workspace.scalar("SELECT count(*) FROM webhook_endpoints") == 1

    shown = workspace.cli_json("endpoints", "show", "down", "--json")
    assert (shown["pending"], shown["health"]["attempts"], shown["health"]["success_rate"]) == (
        2,
        2,
        0.0,
    )
    assert shown["health"]["last_error"]["error"]
    text = workspace.cli_ok("endpoints", "show", "down").stdout
    assert "pending      2" in text
    assert "0.0% ok" in text

    forced = workspace.cli_ok("endpoints", "remove", "down", "--force")
    assert "2 pending deliveries stay pending" in forced.stderr
    assert workspace.scalar("SELECT count(*) FROM webhook_endpoints") == 0
    assert delivery_states(workspace, "down") == ["pending", "pending"]
    listed = workspace.cli_json("endpoints", "list", "--json")
    assert [(e["id"], e["state"], e["pending"]) for e in listed] == [("down", "unknown", 2)]
    assert daemon.stop() == 0, daemon.output()
    assert workspace.cli("endpoints", "remove", "down").returncode == EXIT_FAILURE


# -- retry ---------------------------------------------------------------------------------------


def test_retry_a_dead_letter_and_replay_a_success_while_the_daemon_runs(
    workspace: Workspace, aio_receiver: StartReceiver
) -> None:
    receiver = aio_receiver(status=500)
    workspace.write_config(
        endpoints=[{"id": "crm", "url": receiver.url, "secret": "crm-secret-value"}],
        retry={"max_attempts": 2},
    )
    workspace.cli_ok("migrate")
    daemon = workspace.start()
    event_id = enqueue(workspace, "booking.created", {"id": "b1"})
    dead_letters(workspace, "crm", 1, daemon)
    [dead] = workspace.cli_json("deliveries", "list", "--state", "failed", "--json")
    assert dead["attempts"] == 2

    receiver.status = 200  # the receiver is fixed
    retried = workspace.cli_ok("deliveries", "retry", dead["delivery_id"])
    assert f"retried {dead['delivery_id']}" in retried.stdout
    workspace.wait_until(
        lambda: delivery_states(workspace, "crm") == ["succeeded"],
        what="the retried delivery to succeed",
        details=daemon.output,
    )
    shown = workspace.cli_json("deliveries", "show", dead["delivery_id"], "--json")
    assert (shown["state"], shown["attempts"], shown["attempts_before_retry"]) == (
        "succeeded",
        3,
        2,
    )
    assert shown["retried_at"] is not None
    assert [(a["attempt_no"], a["status_code"]) for a in shown["attempt_log"]] == [
        (1, 500),
        (2, 500),
        (3, 200),
    ]
    text = workspace.cli_ok("deliveries", "show", dead["delivery_id"]).stdout
    assert "retried" in text
    # Each failed attempt says what failed, as --json's error_kind does.
    assert [a["error_kind"] for a in shown["attempt_log"]] == ["http_status", "http_status", None]
    assert text.count("HTTP 500  [http_status]") == 2, text

    # A succeeded delivery is replayed only when asked to.
    refused = workspace.cli("deliveries", "retry", dead["delivery_id"])
    assert refused.returncode == EXIT_USAGE
    assert "--include-succeeded" in refused.stderr
    workspace.cli_ok("deliveries", "retry", dead["delivery_id"], "--include-succeeded")
    workspace.wait_until(lambda: len(receiver.finished()) == 4, what="the replay")
    bodies = {r.body for r in receiver.finished()}
    assert len(bodies) == 1  # the same body every time
    assert {r.delivery_id for r in receiver.finished()} == {dead["delivery_id"]}

    missing = workspace.cli("deliveries", "retry", "dlv_nope")
    assert missing.returncode == EXIT_FAILURE
    assert "no delivery 'dlv_nope'" in missing.stderr
    both = workspace.cli("deliveries", "retry", dead["delivery_id"], "--state", "failed")
    assert both.returncode == EXIT_USAGE

    trace = workspace.cli_ok("events", "show", event_id).stdout
    assert "#4" in trace
    assert daemon.stop() == 0, daemon.output()


def _run_with_tty_stderr(ws: Workspace, *args: str) -> tuple[int, str, str]:
    """Run ``webhookd ARGS`` with stderr on a pseudo-terminal; (exit code, stdout, stderr)."""
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        result = subprocess.run(
            [str(WEBHOOKD), *args, "--config", str(ws.config_path)],
            env={k: v for k, v in os.environ.items() if not k.startswith("WEBHOOKD_")},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            timeout=CLI_TIMEOUT_SECONDS,
            check=False,
        )
    finally:
        os.close(slave)
        reader.join(5.0)
        os.close(master)
    return result.returncode, result.stdout.decode(), b"".join(chunks).decode(errors="replace")


def test_bulk_retry_by_filter_with_a_rate_cap(
    workspace: Workspace, aio_receiver: StartReceiver
) -> None:
    failing = aio_receiver(status=500)
    healthy = aio_receiver()
    workspace.write_config(
        endpoints=[
            {"id": "crm", "url": failing.url, "secret": "crm-secret-value"},
            {"id": "ok", "url": healthy.url, "secret": "ok-secret-value"},
        ],
        retry={"max_attempts": 1},
        # Twelve dead letters in a row: the circuit breaker (test_breaker.py) must not hold
        # the last ones back.
        breaker={"failure_threshold": 100},
    )
    workspace.cli_ok("migrate")
    daemon = workspace.start()
    workspace.insert_outbox(
        [{"event_type": "booking.created", "payload": f'{{"id":"b{i}"}}'} for i in range(12)]
    )
    dead_letters(workspace, "crm", 12, daemon)
    workspace.wait_until(lambda: delivery_states(workspace, "ok") == ["succeeded"] * 12)

    # By filter, a retry needs --all-matching.
    unsure = workspace.cli("deliveries", "retry", "--endpoint", "crm")
    assert unsure.returncode == EXIT_USAGE
    assert "12 failed deliveries match" in unsure.stderr
    assert "--all-matching" in unsure.stderr
    dry = workspace.cli_json("deliveries", "retry", "--endpoint", "crm", "--dry-run", "--json")
    assert (dry["dry_run"], len(dry["matched"]), dry["retried"]) == (True, 12, [])
    assert delivery_states(workspace, "crm") == ["failed"] * 12
    nothing = workspace.cli_ok("deliveries", "retry", "--endpoint", "ok", "--all-matching")
    assert "no failed deliveries match" in nothing.stderr

    stats = workspace.cli_json("stats", "--json")
    assert stats["failures_by_endpoint"] == [{"endpoint": "crm", "failed_attempts": 12}]
    assert stats["window"]["deliveries_failed"] == 12

    failing.status = 200
    rate = 5.0
    code, out, err = _run_with_tty_stderr(
        workspace, "deliveries", "retry", "--endpoint", "crm", "--since", "1h",
        "--all-matching", "--rate", str(rate),
    )  # fmt: skip
    assert code == 0, err
    assert "retried 12 of 12 failed deliveries" in out
    assert "\r[" in err  # a progress bar, redrawn in place on the terminal
    assert "12/12" in err
    workspace.wait_until(
        lambda: delivery_states(workspace, "crm") == ["succeeded"] * 12,
        what="every retried delivery to succeed",
        details=daemon.output,
    )
    assert len(failing.started()) == 24
    # The rate cap: 12 deliveries at 5 a second were made due over at least 11 / 5 seconds.
    spread = workspace.scalar(
        "SELECT max(schedule_started_at) - min(schedule_started_at) FROM webhookd_deliveries"
        " WHERE endpoint_id = 'crm'"
    )
    assert spread >= (12 - 1) / rate - 0.05
    assert len(healthy.started()) == 12  # the other endpoint's deliveries were not touched
    assert daemon.stop() == 0, daemon.output()


def test_a_long_bulk_retry_without_a_terminal_prints_plain_progress_lines(
    workspace: Workspace,
) -> None:
    workspace.write_config(retry={"max_attempts": 1})
    workspace.cli_ok("migrate")
    workspace.cli_ok("endpoints", "add", "down", "--url", f"http://127.0.0.1:{free_port()}/h",
                     "--generate-secret")  # fmt: skip
    daemon = workspace.start()
    workspace.insert_outbox(
        [{"event_type": "booking.created", "payload": f'{{"id":"b{i}"}}'} for i in range(6)]
    )
    dead_letters(workspace, "down", 6, daemon)
    assert daemon.stop() == 0, daemon.output()

    result = workspace.cli_ok("deliveries", "retry", "--all-matching", "--rate", "4")
    assert "retried 6 of 6 failed deliveries" in result.stdout
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("retried: ")]
    assert lines, result.stderr
    assert lines[-1].startswith("retried: 6/6 (100%)")
    assert "\r" not in result.stderr
    assert delivery_states(workspace, "down") == ["pending"] * 6
    stats = workspace.cli_json("stats", "--json")
    assert (stats["backlog"]["pending"], stats["backlog"]["due"]) == (6, 6)


# -- deliveries list by time -----------------------------------------------------------------


def test_deliveries_list_by_time_range(workspace: Workspace, aio_receiver: StartReceiver) -> None:
    receiver = aio_receiver()
    workspace.write_config(endpoints=[{"id": "crm", "url": receiver.url, "secret": "crm-secret"}])
    workspace.cli_ok("migrate")
    daemon = workspace.start()
    enqueue(workspace, "booking.created", {"id": "b1"})
    workspace.wait_until(lambda: delivery_states(workspace, "crm") == ["succeeded"])
    assert daemon.stop() == 0, daemon.output()

    def listed(*args: str) -> int:
        return len(workspace.cli_json("deliveries", "list", "--json", *args))

    assert listed("--since", "1h") == 1
    assert listed("--since", "10m ago") == 1
    assert listed("--since", "2000-01-01T00:00:00Z", "--until", "2999-01-01T00:00:00Z") == 1
    assert listed("--until", "2000-01-01T00:00:00Z") == 0
    assert listed("--since", "2999-01-01T00:00:00+02:00") == 0
    bad = workspace.cli("deliveries", "list", "--since", "yesterday")
    assert bad.returncode == EXIT_USAGE
    assert "ISO-8601" in bad.stderr


# -- events show, stats --------------------------------------------------------------------------


def test_events_show_says_where_an_event_went(
    workspace: Workspace, aio_receiver: StartReceiver
) -> None:
    receiver = aio_receiver()
    workspace.write_config(
        endpoints=[
            {"id": "crm", "url": receiver.url, "secret": "crm-secret-value"},
            {"id": "down", "url": f"http://127.0.0.1:{free_port()}/h", "secret": "down-secret"},
            {"id": "other", "url": receiver.url, "secret": "other-secret", "tenant": "org_9"},
        ],
        retry={"initial_delay_seconds": 3600.0},
    )
    workspace.cli_ok("migrate")
    daemon = workspace.start()
    enqueue(
        workspace, "booking.created", {"id": "b1"}, "--event-id", "evt_b1", "--tenant", "org_1",
        "--occurred-at", "2024-01-15T10:00:00Z",
    )  # fmt: skip
    workspace.insert_outbox([{"event_type": "booking.created", "payload": "{oops",
                              "event_id": "evt_bad"}])  # fmt: skip
    workspace.wait_until(
        lambda: (
            sorted(
                tuple(r)
                for r in workspace.sql(
                    "SELECT endpoint_id, state, attempts FROM webhookd_deliveries"
                )
            )
            == [("crm", "succeeded", 1), ("down", "pending", 1)]
        ),
        what="one success and one failed attempt",
        details=daemon.output,
    )
    wait_fanned_out(workspace, daemon)
    assert daemon.stop() == 0, daemon.output()

    trace = workspace.cli_json("events", "show", "evt_b1", "--json")
    event = trace["event"]
    assert (event["event_type"], event["tenant"], event["occurred_at"]) == (
        "booking.created",
        "org_1",
        "2024-01-15T10:00:00Z",
    )
    assert event["outbox_id"] == 1
    assert trace["quarantined"] == []
    by_endpoint = {d["endpoint_id"]: d for d in trace["deliveries"]}
    assert set(by_endpoint) == {"crm", "down"}  # "other" is another tenant's
    assert by_endpoint["crm"]["state"] == "succeeded"
    assert [a["status_code"] for a in by_endpoint["crm"]["attempt_log"]] == [200]
    assert by_endpoint["down"]["state"] == "pending"
    [failed] = by_endpoint["down"]["attempt_log"]
    assert failed["result"] == "network_error"

    text = workspace.cli_ok("events", "show", "evt_b1").stdout
    assert "booking.created" in text
    assert "deliveries  2: 1 pending, 1 succeeded" in text
    assert "HTTP 200" in text
    assert "network_error" in text

    bad = workspace.cli_json("events", "show", "evt_bad", "--json")
    assert bad["event"] is None
    assert [q["reason"] for q in bad["quarantined"]] == ["invalid_json"]
    assert "invalid_json" in workspace.cli_ok("events", "show", "evt_bad").stdout

    # The catalogue still answers for a type; a near-miss of a type is called one.
    example = workspace.cli_json("events", "show", "booking.created")
    assert list(example) == ["event", "timestamp", "data"]
    typo = workspace.cli("events", "show", "booking.create")
    assert typo.returncode == EXIT_USAGE
    assert "did you mean booking.created" in typo.stderr
    nothing = workspace.cli("events", "show", "evt_nope")
    assert nothing.returncode == EXIT_FAILURE
    assert "evt_nope" in nothing.stderr

    # Written while no daemon runs: it waits in the outbox.
    waiting = enqueue(workspace, "booking.created", {"id": "b2"})
    shown = workspace.cli_json("events", "show", waiting, "--json")
    assert (shown["event"], shown["waiting_in_outbox"]) == (None, last_outbox_id(workspace))
    assert "not fanned out yet" in workspace.cli_ok("events", "show", waiting).stdout

    stats = workspace.cli_json("stats", "--json")
    assert stats["backlog"] == {
        "outbox_unprocessed": 1,
        "oldest_unprocessed_occurred_at": stats["backlog"]["oldest_unprocessed_occurred_at"],
        "pending": 1,
        "due": 0,
    }
    assert stats["lag_seconds"] >= 0
    assert stats["window"]["quarantined"] == 1
    assert stats["window"]["attempts"] == 2
    assert stats["rates_per_minute"]["attempts"] == round(2 / 60, 3)
    assert stats["failures_by_endpoint"] == [{"endpoint": "down", "failed_attempts": 1}]
    text = workspace.cli_ok("stats", "--window", "30m").stdout
    for words in ("backlog", "1 outbox rows not fanned out", "1 deliveries pending", "down"):
        assert words in text


def test_every_listing_prints_json_that_parses(
    workspace: Workspace, aio_receiver: StartReceiver
) -> None:
    receiver = aio_receiver()
    workspace.write_config(endpoints=[{"id": "crm", "url": receiver.url, "secret": "crm-secret"}])
    workspace.cli_ok("migrate")
    workspace.cli_ok("endpoints", "add", "tbl", "--url", "https://tbl.example/h",
                     "--generate-secret", "--disabled")  # fmt: skip
    daemon = workspace.start()
    event_id = enqueue(workspace, "booking.created", {"id": "b1"})
    workspace.wait_until(lambda: delivery_states(workspace, "crm") == ["succeeded"])
    [delivery_id] = [r[0] for r in workspace.sql("SELECT delivery_id FROM webhookd_deliveries")]
    commands = [
        ("endpoints", "list", "--window", "5m"),
        ("endpoints", "show", "tbl"),
        ("deliveries", "list", "--since", "1h"),
        ("deliveries", "show", delivery_id),
        ("deliveries", "retry", "--dry-run"),
        ("deliveries", "retry", delivery_id, "--dry-run", "--include-succeeded"),
        ("events", "show", event_id),
        ("events", "list"),
        ("quarantine", "list"),
        ("stats", "--window", "1d", "--top", "3"),
    ]
    for command in commands:
        result = workspace.cli_ok(*command, "--json")
        try:
            json.loads(result.stdout)
        except ValueError:
            raise AssertionError(f"{command}: not JSON:\n{result.stdout}") from None
    assert daemon.stop() == 0, daemon.output()
    assert delivery_states(workspace, "crm") == ["succeeded"]  # the dry runs changed nothing
