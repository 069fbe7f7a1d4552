"""The command line on PostgreSQL (issue 7): the same commands as on SQLite, with a config whose
``[database] url`` is a PostgreSQL database, and clear one-line errors that never show the
password when the server is unreachable or refuses the login."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

import psycopg
from helpers import free_port

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import AioReceiver, Workspace
    from postgres_fixtures import PasswordUser, PostgresServer

EXIT_FAILURE = 1
# Commands that open the store; each must fail the same clear way when it cannot.
STORE_COMMANDS: tuple[tuple[str, ...], ...] = (
    ("migrate",),
    ("endpoints", "list"),
    ("deliveries", "list"),
    ("stats",),
    ("enqueue", "booking.created", '{"id":"b1"}'),
)


def pg_rows(url: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def test_the_admin_commands_work_on_postgresql(
    workspace: Workspace, postgres_url: str, aio_receiver: Callable[..., AioReceiver]
) -> None:
    receiver = aio_receiver()
    workspace.write_config(database={"url": postgres_url})

    checked = workspace.cli_ok("check-config")
    assert "configuration OK" in checked.stdout
    assert postgres_url.rsplit("/", 1)[1] in checked.stdout  # names the database

    migrated = workspace.cli_ok("migrate")
    assert "schema is at version" in migrated.stdout
    workspace.cli_ok("migrate")  # again: nothing to do, still fine
    tables = {
        r[0]
        for r in pg_rows(
            postgres_url,
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
        )
    }
    assert {"webhook_outbox", "webhook_endpoints", "webhookd_deliveries"} <= tables

    added = workspace.cli_ok(
        "endpoints", "add", "crm", "--url", receiver.url, "--generate-secret",
        "--events", "booking.*", "--max-concurrency", "3",
    )  # fmt: skip
    secret = added.stdout.strip()
    assert secret.startswith("whsec_")
    assert pg_rows(postgres_url, "SELECT id, secret, max_concurrency FROM webhook_endpoints") == [
        ("crm", secret, 3)
    ]
    [listed] = workspace.cli_json("endpoints", "list", "--json")
    assert (listed["id"], listed["source"], listed["state"]) == ("crm", "table", "enabled")
    assert secret not in workspace.cli_ok("endpoints", "list").stdout

    event_id = workspace.cli_ok("enqueue", "booking.created", '{"id":"b1"}').stdout.strip()
    outbox = "SELECT event_type, payload FROM webhook_outbox WHERE event_id = %s"
    assert pg_rows(postgres_url, outbox, (event_id,)) == [("booking.created", '{"id":"b1"}')]

    daemon = workspace.start()
    workspace.wait_until(
        lambda: len(receiver.finished()) == 1, what="the delivery", details=daemon.output
    )
    assert receiver.finished()[0].json()["data"] == {"id": "b1"}
    workspace.wait_until(
        lambda: workspace.cli_json("deliveries", "list", "--json", "--state", "succeeded"),
        what="the delivery recorded as succeeded",
        details=daemon.output,
    )
    assert daemon.stop() == 0, daemon.output()

    [delivery] = workspace.cli_json("deliveries", "list", "--json")
    assert (delivery["endpoint_id"], delivery["state"], delivery["event_id"]) == (
        "crm",
        "succeeded",
        event_id,
    )
    assert delivery["delivery_id"] == receiver.finished()[0].delivery_id
    stats = workspace.cli_json("stats", "--json")
    assert stats["backlog"] == {
        "outbox_unprocessed": 0,
        "oldest_unprocessed_occurred_at": None,
        "pending": 0,
        "due": 0,
    }
    assert (stats["window"]["attempts_succeeded"], stats["window"]["deliveries_succeeded"]) == (
        1,
        1,
    )
    assert "BACKLOG" in workspace.cli_ok("stats").stdout.upper()
    assert not workspace.db.exists(), "a PostgreSQL config must not create an SQLite file"


def test_the_password_comes_from_pgpassword_or_a_credential_and_is_never_printed(
    workspace: Workspace, postgres_password_user: PasswordUser
) -> None:
    user = postgres_password_user
    without_password = user.server.url(user.dbname, user=user.name)
    workspace.write_config(database={"url": without_password})
    workspace.cli_ok("migrate", env={"PGPASSWORD": user.password})
    workspace.cli_ok("enqueue", "booking.created", '{"id":"b1"}', env={"PGPASSWORD": user.password})
    assert pg_rows(user.url(), "SELECT count(*) FROM webhook_outbox") == [(1,)]

    # systemd: LoadCredential=pg-password:... puts the file in $CREDENTIALS_DIRECTORY.
    credentials = workspace.dir / "credentials"
    credentials.mkdir()
    (credentials / "pg-password").write_text(user.password + "\n", encoding="utf-8")
    workspace.write_config(database={"url": without_password, "password_file": "%d/pg-password"})
    env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    assert workspace.cli_json("deliveries", "list", "--json", env=env) == []  # none yet
    stats = workspace.cli_json("stats", "--json", env=env)
    assert stats["backlog"]["outbox_unprocessed"] == 1

    workspace.write_config(database={"url": user.url()})
    for args in (("check-config",), ("stats",), ("deliveries", "list", "--json")):
        result = workspace.cli_ok(*args)
        assert user.password not in result.stdout + result.stderr, args


def _one_clear_line(result: Any, secret: str) -> str:
    assert result.returncode == EXIT_FAILURE, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert secret not in result.stdout + result.stderr
    return str(lines[0])


def test_a_wrong_password_fails_with_one_line_without_the_password(
    workspace: Workspace, postgres_password_user: PasswordUser
) -> None:
    user = postgres_password_user
    wrong = "wrong-Pa55word-xyz"
    workspace.write_config(database={"url": user.url(wrong)})
    for args in STORE_COMMANDS:
        line = _one_clear_line(workspace.cli(*args), wrong)
        assert line.startswith("webhookd: error:"), (args, line)
        assert user.name in line, (args, line)  # which login failed
        assert user.dbname in line, (args, line)
        assert "password" in line.lower() or "authentication" in line.lower(), (args, line)
    # Nothing was created with the refused login.
    tables = "SELECT count(*) FROM pg_tables WHERE tablename = 'webhook_outbox'"
    assert pg_rows(user.url(), tables) == [(0,)]


def test_an_unreachable_server_fails_with_one_line_without_the_password(
    workspace: Workspace,
) -> None:
    secret = "s3cret-never-shown"
    port = free_port()  # nothing listens there
    workspace.write_config(database={"url": f"postgresql://app:{secret}@127.0.0.1:{port}/appdb"})
    for args in STORE_COMMANDS:
        line = _one_clear_line(workspace.cli(*args, timeout=120.0), secret)
        assert line.startswith("webhookd: error:"), (args, line)
        assert f"127.0.0.1:{port}" in line, (args, line)
        assert "appdb" in line, (args, line)
    checked = workspace.cli_ok("check-config")  # validates the file; does not connect
    assert secret not in checked.stdout + checked.stderr


def test_an_application_role_with_only_insert_on_the_outbox_can_write_events(
    workspace: Workspace, postgres_server: PostgresServer, postgres_url: str
) -> None:
    """The least privilege an application needs: INSERT on webhook_outbox (the identity column
    needs no grant of its own). webhookd's triggers on the table must not need more."""
    workspace.write_config(database={"url": postgres_url})
    workspace.cli_ok("migrate")
    role = f"app_{secrets.token_hex(5)}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"GRANT INSERT ON webhook_outbox TO {role}")
    try:
        app_url = postgres_server.url(postgres_url.rsplit("/", 1)[1], user=role)
        with psycopg.connect(app_url, autocommit=True) as app:
            app.execute(
                "INSERT INTO webhook_outbox (event_type, event_id, payload)"
                " VALUES ('booking.created', 'evt-least-privilege', '{\"id\":\"b1\"}')"
            )
        stats = workspace.cli_json("stats", "--json")
        assert stats["backlog"]["outbox_unprocessed"] == 1
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")
