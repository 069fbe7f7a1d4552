"""The ``webhookd`` command line as a user runs it: exit codes, messages, listings."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from helpers import free_port

import webhookd
from webhookd.catalogue import SEED_EVENTS

if TYPE_CHECKING:
    from conftest import AioReceiver, Workspace

EXIT_FAILURE = 1
EXIT_USAGE = 2

STATIC_SECRET = "static-secret-do-not-print-1f9a"
TABLE_SECRET = "table-secret-do-not-print-7c2e"


def test_version_prints_the_package_version(workspace: Workspace) -> None:
    result = workspace.cli_ok("version", config=None)
    assert result.stdout.strip() == f"webhookd {webhookd.__version__}"


def test_migrate_is_idempotent(workspace: Workspace) -> None:
    workspace.write_config()
    first = workspace.cli_ok("migrate")
    assert "applied migrations" in first.stdout
    tables = {
        row[0] for row in workspace.sql("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    assert {"webhook_outbox", "webhook_endpoints", "webhookd_deliveries"} <= tables

    second = workspace.cli_ok("migrate")
    assert "up to date" in second.stdout
    assert "applied" not in second.stdout


def test_check_config_accepts_a_good_file(workspace: Workspace) -> None:
    config = workspace.write_config(
        endpoints=[{"id": "orders", "url": "https://hooks.example.com/x", "secret": "s3cret"}],
        delivery={"allow_http": False},
    )
    result = workspace.cli_ok("check-config", config=config)
    assert "configuration OK" in result.stdout
    assert str(workspace.db) in result.stdout
    assert "s3cret" not in result.stdout + result.stderr
    assert not workspace.db.exists(), "check-config must not create the database"


def test_check_config_accepts_the_shipped_example(workspace: Workspace) -> None:
    example = Path(webhookd.__file__).resolve().parent.parent / "config.example.toml"
    result = workspace.cli_ok("check-config", config=example)
    assert "configuration OK" in result.stdout


BAD_CONFIG = """\
[database]
path = "bad.db"
pathh = "typo.db"

[delivery]
max_inflight = "lots"

[[endpoints]]
id = "plain-http"
url = "http://hooks.example.com/x"
secret = "plain-http-secret-value"

[[endpoints]]
id = "no-secret"
url = "https://hooks.example.com/y"
"""

# Each problem of BAD_CONFIG: the key path, and a word of the message on the same line.
BAD_CONFIG_PROBLEMS = {
    "database.pathh": "unknown key",
    "delivery.max_inflight": "integer",
    "endpoints[0].url": "allow_http",
    "endpoints[1]": "secret",
}


def _problem_lines(stderr: str) -> dict[str, str]:
    lines = {}
    for key_path in BAD_CONFIG_PROBLEMS:
        matching = [line for line in stderr.splitlines() if line.strip().startswith(key_path)]
        if matching:
            lines[key_path] = matching[0]
    return lines


def test_check_config_reports_every_problem_with_its_key_path(workspace: Workspace) -> None:
    config = workspace.write_raw_config(BAD_CONFIG, "bad.toml")
    result = workspace.cli("check-config", config=config)
    assert result.returncode == EXIT_USAGE, result
    found = _problem_lines(result.stderr)
    missing = sorted(set(BAD_CONFIG_PROBLEMS) - set(found))
    assert not missing, f"problems not reported: {missing}\nstderr:\n{result.stderr}"
    for key_path, word in BAD_CONFIG_PROBLEMS.items():
        assert word in found[key_path], found[key_path]
    assert "plain-http-secret-value" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("text", "key_path", "word"),
    [
        ('[database]\npathh = "x.db"\n', "database.pathh", "unknown key"),
        ('[delivery]\nmax_inflight = "lots"\n', "delivery.max_inflight", "integer"),
        (
            '[[endpoints]]\nid = "a"\nurl = "http://h.example.com/x"\nsecret = "sec-value-1"\n',
            "endpoints[0].url",
            "allow_http",
        ),
        ('[[endpoints]]\nid = "a"\nurl = "https://h.example.com/x"\n', "endpoints[0]", "secret"),
    ],
    ids=["unknown-key", "wrong-type", "http-without-allow_http", "missing-secret"],
)
def test_check_config_reports_each_kind_of_problem(
    workspace: Workspace, text: str, key_path: str, word: str
) -> None:
    config = workspace.write_raw_config(text, "one-problem.toml")
    result = workspace.cli("check-config", config=config)
    assert result.returncode == EXIT_USAGE, result
    lines = [line.strip() for line in result.stderr.splitlines()]
    assert any(line.startswith(key_path) and word in line for line in lines), result.stderr
    assert "sec-value-1" not in result.stdout + result.stderr


def test_webhookd_config_environment_variable_is_honoured(workspace: Workspace) -> None:
    config = workspace.write_config()
    elsewhere = workspace.dir / "elsewhere"
    elsewhere.mkdir()
    env = {"WEBHOOKD_CONFIG": str(config)}

    checked = workspace.cli_ok("check-config", config=None, env=env, cwd=elsewhere)
    assert str(workspace.db) in checked.stdout

    workspace.cli_ok("migrate", config=None, env=env, cwd=elsewhere)
    assert workspace.db.exists()
    assert not (elsewhere / "webhookd.db").exists()


def test_run_with_a_bad_config_exits_2_without_creating_the_database(
    workspace: Workspace,
) -> None:
    config = workspace.write_raw_config(
        '[database]\npath = "never.db"\n\n[delivery]\nmax_inflight = 0\n', "bad-run.toml"
    )
    result = workspace.cli("run", config=config, timeout=30)
    assert result.returncode == EXIT_USAGE, result
    assert "delivery.max_inflight" in result.stderr
    assert not (workspace.dir / "never.db").exists()
    assert not list(workspace.dir.glob("never.db*"))


@pytest.fixture
def migrated(workspace: Workspace) -> Workspace:
    workspace.write_config()
    workspace.cli_ok("migrate")
    return workspace


@pytest.mark.parametrize(
    ("event_type", "data", "mentions"),
    [
        ("booking.created", '{"id": "book_1",', "not valid JSON"),
        ("booking.created", '["book_1"]', "object"),
        ("booking.created", '"book_1"', "object"),
        ("Booking Created", '{"id": "book_1"}', "Booking Created"),
        ("booking.created", '{"id": 1152921504606846976}', "1152921504606846976"),
    ],
    ids=["bad-json", "array", "string", "bad-type", "2**60"],
)
def test_enqueue_refuses_bad_input_with_one_clear_line(
    migrated: Workspace, event_type: str, data: str, mentions: str
) -> None:
    result = migrated.cli("enqueue", event_type, data)
    assert result.returncode == EXIT_USAGE, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("webhookd: error:"), lines[0]
    assert mentions in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert migrated.outbox_count() == 0


def test_enqueue_inserts_a_row_and_prints_its_event_id(migrated: Workspace) -> None:
    result = migrated.cli_ok(
        "enqueue", "booking.confirmed", '{"id": "book_123"}', "--tenant", "org_42"
    )
    event_id = result.stdout.strip()
    rows = migrated.sql("SELECT event_type, payload, tenant, event_id FROM webhook_outbox")
    assert [tuple(r) for r in rows] == [
        ("booking.confirmed", '{"id":"book_123"}', "org_42", event_id)
    ]


def test_enqueue_before_migrate_says_to_migrate(workspace: Workspace) -> None:
    workspace.write_config()
    result = workspace.cli("enqueue", "booking.created", '{"id": "book_1"}')
    assert result.returncode != 0
    assert "webhookd migrate" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not workspace.db.exists(), "enqueue must not create an empty database"

    # The application created the file, but nobody ran migrate yet.
    workspace.sql("CREATE TABLE app_things (id INTEGER)")
    result = workspace.cli("enqueue", "booking.created", '{"id": "book_1"}')
    assert result.returncode != 0
    assert "webhookd migrate" in result.stderr
    assert "Traceback" not in result.stderr


def test_endpoints_list_shows_static_and_table_endpoints_without_secrets(
    workspace: Workspace,
) -> None:
    workspace.write_config(
        endpoints=[
            {
                "id": "static-orders",
                "url": "https://orders.example.com/hook",
                "secret": STATIC_SECRET,
                "events": ["booking.*"],
            }
        ]
    )
    workspace.cli_ok("migrate")
    with workspace.connect() as conn, conn:
        conn.execute(
            "INSERT INTO webhook_endpoints (id, url, secret, events, tenant, description)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                "table-payments",
                "https://payments.example.com/hook",
                TABLE_SECRET,
                '["payment.*"]',
                "org_42",
                "Payments team",
            ),
        )

    table = workspace.cli_ok("endpoints", "list")
    lines = table.stdout.splitlines()
    assert lines[0].split()[:2] == ["ID", "SOURCE"]
    by_id = {line.split()[0]: line for line in lines[1:]}
    assert set(by_id) == {"static-orders", "table-payments"}
    assert "config" in by_id["static-orders"]
    assert "booking.*" in by_id["static-orders"]
    assert "table" in by_id["table-payments"]
    assert "org_42" in by_id["table-payments"]

    listed = workspace.cli_json("endpoints", "list", "--json")
    assert {e["id"]: e["source"] for e in listed} == {
        "static-orders": "config",
        "table-payments": "table",
    }
    payments = next(e for e in listed if e["id"] == "table-payments")
    assert payments["events"] == ["payment.*"]
    assert payments["tenant"] == "org_42"
    assert payments["url"] == "https://payments.example.com/hook"

    json_text = workspace.cli_ok("endpoints", "list", "--json")
    for result in (table, json_text):
        for secret in (STATIC_SECRET, TABLE_SECRET):
            assert secret not in result.stdout + result.stderr


# -- listings of a database the daemon worked on ---------------------------------------------

MALFORMED_ROWS = [
    {"event_type": "booking.created", "payload": '{"id": "book_1",'},
    {"event_type": "booking.created", "payload": '["not", "an", "object"]'},
    {"event_type": "Booking Created", "payload": '{"id": "book_2"}'},
    {"event_type": "booking.created", "payload": '{"id": 1152921504606846976}'},
]


@pytest.fixture(scope="module")
def worked_on(
    new_workspace: Callable[[str], Workspace],
    new_aio_receiver: Callable[..., AioReceiver],
) -> Iterator[Workspace]:
    """A database the daemon has worked on: two events to a healthy endpoint ("up",
    succeeded) and to one where nothing listens ("down", pending with one failed attempt),
    and the four kinds of malformed rows, quarantined."""
    ws = new_workspace("worked-on")
    receiver = new_aio_receiver()
    try:
        ws.write_config(
            endpoints=[
                {"id": "up", "url": receiver.url, "secret": "up-secret-value"},
                {
                    "id": "down",
                    "url": f"http://127.0.0.1:{free_port()}/hook",
                    "secret": "down-secret-value",
                },
            ],
            retry={"initial_delay_seconds": 3600.0},
        )
        ws.cli_ok("migrate")
        for event_type, _, occurred_at, data in SEED_EVENTS[:2]:
            ws.cli_ok("enqueue", event_type, json.dumps(data), "--occurred-at", occurred_at)
        ws.insert_outbox(MALFORMED_ROWS)
        daemon = ws.start()

        def settled() -> bool:
            rows = ws.sql("SELECT endpoint_id, state, attempts FROM webhookd_deliveries")
            quarantined = ws.scalar("SELECT count(*) FROM webhookd_quarantine")
            return sorted(tuple(r) for r in rows) == [("down", "pending", 1)] * 2 + [
                ("up", "succeeded", 1)
            ] * 2 and quarantined == len(MALFORMED_ROWS)

        ws.wait_until(settled, what="2 succeeded + 2 pending deliveries", details=daemon.output)
        assert daemon.stop(signal.SIGTERM) == 0, daemon.output()
        yield ws
    finally:
        ws.close()
        receiver.stop()


def test_deliveries_list_json_shows_every_delivery(worked_on: Workspace) -> None:
    listed = worked_on.cli_json("deliveries", "list", "--json")
    assert len(listed) == 4
    assert {(d["endpoint_id"], d["state"]) for d in listed} == {
        ("up", "succeeded"),
        ("down", "pending"),
    }
    assert {d["event_type"] for d in listed} == {SEED_EVENTS[0][0], SEED_EVENTS[1][0]}
    for d in listed:
        assert d["delivery_id"]
        assert d["attempts"] == 1


def test_deliveries_list_filters_by_state_and_endpoint(worked_on: Workspace) -> None:
    def ids(*args: str) -> set[tuple[str, str]]:
        listed = worked_on.cli_json("deliveries", "list", "--json", *args)
        return {(d["endpoint_id"], d["state"]) for d in listed} if listed else set()

    succeeded = worked_on.cli_json("deliveries", "list", "--json", "--state", "succeeded")
    assert len(succeeded) == 2
    assert {d["endpoint_id"] for d in succeeded} == {"up"}
    assert {d["last_status"] for d in succeeded} == {200}

    pending = worked_on.cli_json("deliveries", "list", "--json", "--state", "pending")
    assert len(pending) == 2
    assert {d["endpoint_id"] for d in pending} == {"down"}
    assert all(d["last_error"] for d in pending)

    by_endpoint = worked_on.cli_json("deliveries", "list", "--json", "--endpoint", "down")
    assert len(by_endpoint) == 2
    assert ids("--endpoint", "down") == {("down", "pending")}
    assert ids("--state", "failed") == set()
    assert ids("--state", "succeeded", "--endpoint", "down") == set()


def test_deliveries_list_table(worked_on: Workspace) -> None:
    result = worked_on.cli_ok("deliveries", "list", "--state", "succeeded")
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["DELIVERY", "STATE"]
    assert len(lines) == 3
    assert all(" succeeded " in line and " up " in line for line in lines[1:])

    nothing = worked_on.cli_ok("deliveries", "list", "--state", "failed")
    assert "no deliveries match" in nothing.stdout

    bad_state = worked_on.cli("deliveries", "list", "--state", "lost")
    assert bad_state.returncode == EXIT_USAGE


def test_deliveries_show_has_the_attempts(worked_on: Workspace) -> None:
    pending = worked_on.cli_json("deliveries", "list", "--json", "--endpoint", "down")
    shown: dict[str, Any] = worked_on.cli_json(
        "deliveries", "show", pending[0]["delivery_id"], "--json"
    )
    assert shown["delivery_id"] == pending[0]["delivery_id"]
    assert len(shown["attempt_log"]) == 1
    assert shown["attempt_log"][0]["status_code"] is None

    missing = worked_on.cli("deliveries", "show", "dlv_does_not_exist")
    assert missing.returncode != 0
    assert "dlv_does_not_exist" in missing.stderr


def test_quarantine_list_shows_the_malformed_rows(worked_on: Workspace) -> None:
    listed = worked_on.cli_json("quarantine", "list", "--json")
    assert len(listed) == len(MALFORMED_ROWS)
    outbox_ids = [r[0] for r in worked_on.sql("SELECT id FROM webhook_outbox ORDER BY id")][2:]
    assert sorted(q["outbox_id"] for q in listed) == outbox_ids
    assert all(q["reason"] and q["detail"] for q in listed)
    details = " ".join(q["detail"] for q in listed)
    assert "1152921504606846976" in details
    assert "Booking Created" in details

    table = worked_on.cli_ok("quarantine", "list")
    assert table.stdout.splitlines()[0].split()[:2] == ["OUTBOX", "ID"]
    assert len(table.stdout.splitlines()) == 1 + len(MALFORMED_ROWS)


def test_quarantine_list_when_empty(migrated: Workspace) -> None:
    result = migrated.cli_ok("quarantine", "list")
    assert "no quarantined" in result.stdout
    assert migrated.cli_json("quarantine", "list", "--json") == []


def test_demo_delivers_all_seven_in_a_clean_environment(workspace: Workspace) -> None:
    # Workspace.cli runs without WEBHOOKD_* variables, here in an empty directory, no config.
    result = workspace.cli("demo", config=None, timeout=120)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "7 of 7" in result.stdout
    for event_type, *_ in SEED_EVENTS:
        assert event_type in result.stdout
    assert list(workspace.dir.iterdir()) == [], "the demo must leave nothing in the cwd"
