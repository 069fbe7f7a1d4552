"""`webhookd endpoints rotate-secret`: a new secret printed once, the old one kept for a grace."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from webhookd.signing import standard_key

if TYPE_CHECKING:
    from conftest import Workspace

OLD = "whsec_MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIz"


def _with_table_endpoint(ws: Workspace) -> None:
    ws.write_config(
        endpoints=[{"id": "static", "url": "https://static.example/h", "secret": "s3cret-static"}]
    )
    ws.cli_ok("migrate")
    with ws.connect() as conn, conn:  # the second `with` commits
        conn.execute(
            "INSERT INTO webhook_endpoints (id, url, secret, signature_schemes) "
            "VALUES ('crm', 'https://crm.example/h', ?, 'seed,standard')",
            (OLD,),
        )


def test_rotation_prints_the_new_secret_once_and_keeps_the_old_one_for_the_grace(
    workspace: Workspace,
) -> None:
    _with_table_endpoint(workspace)
    before = datetime.now(UTC).timestamp()

    result = workspace.cli_ok("endpoints", "rotate-secret", "crm", "--grace", "2h")

    new_secret = result.stdout.strip()
    assert re.fullmatch(r"whsec_[A-Za-z0-9+/]+=*", new_secret)
    assert len(standard_key(new_secret)) == 32
    assert OLD not in result.stdout + result.stderr
    [row] = workspace.sql(
        "SELECT secret, previous_secret, previous_secret_expires_at FROM webhook_endpoints"
    )
    assert (row[0], row[1]) == (new_secret, OLD)
    expires = datetime.fromisoformat(row[2].replace("Z", "+00:00")).timestamp()
    assert before + 7200 - 5 < expires < datetime.now(UTC).timestamp() + 7200 + 5
    assert row[2] in result.stderr  # says until when both secrets sign

    # Never shown again: not by the listings, not by a second rotation.
    listing = workspace.cli_ok("endpoints", "list", "--json")
    assert new_secret not in listing.stdout + listing.stderr
    again = workspace.cli_ok("endpoints", "rotate-secret", "crm")
    assert new_secret not in again.stdout
    assert "still in an earlier rotation's grace" in again.stderr


def test_rotation_refuses_what_it_cannot_do(workspace: Workspace) -> None:
    _with_table_endpoint(workspace)
    static = workspace.cli("endpoints", "rotate-secret", "static")
    assert static.returncode == 1
    assert "defined in the config file" in static.stderr
    assert "s3cret-static" not in static.stdout + static.stderr
    missing = workspace.cli("endpoints", "rotate-secret", "nope")
    assert (missing.returncode, missing.stdout) == (1, "")
    assert "no endpoint 'nope'" in missing.stderr
    for grace in ("8d", "0", "soon"):
        bad = workspace.cli("endpoints", "rotate-secret", "crm", "--grace", grace)
        assert (bad.returncode, bad.stdout) == (2, ""), grace
    [row] = workspace.sql("SELECT secret, previous_secret FROM webhook_endpoints")
    assert (row[0], row[1]) == (OLD, None)  # nothing changed
