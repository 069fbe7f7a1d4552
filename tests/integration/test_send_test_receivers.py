"""``webhookd send-test`` against real receivers on 127.0.0.1, through the command line.

Each test writes a config file and a migrated SQLite database in ``tmp_path``, runs the command
(in a thread: it owns its own uvloop loop, while the receivers run on the test's loop) and checks
what a person sees (exit code, the report), what the receiver got (body, signatures) and what
``webhookd deliveries`` shows afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from daemon_fixtures import HANG, Receiver, attempts, deliveries, execute, query
from helpers import free_port
from standardwebhooks import Webhook

from webhookd import canonical_json
from webhookd.catalogue import CATALOGUE, SEED_EVENTS
from webhookd.cli import main
from webhookd.events import build_body
from webhookd.signing import seed_signature

pytestmark = pytest.mark.timeout(120)

SECRET = "crm-signing-secret-never-printed"
PREFIX = "X-BookingScheduler"
WHSEC = "whsec_" + base64.b64encode(bytes(range(32))).decode()
OLD_WHSEC = "whsec_" + base64.b64encode(bytes(range(100, 132))).decode()


# -- set-up ----------------------------------------------------------------------------------


@dataclass
class Setup:
    tmp_path: Path
    capsys: pytest.CaptureFixture[str]
    config: Path = field(init=False)
    db: Path = field(init=False)

    def write_config(self, endpoints: Sequence[Mapping[str, Any]] = (), **delivery: object) -> None:
        """A TOML config: the database in tmp_path, http:// and loopback addresses allowed,
        these endpoints."""
        self.db = self.tmp_path / "webhookd.db"
        options = {
            "allow_http": True,
            "allowed_networks": ["127.0.0.0/8", "::1/128"],
            "timeout_seconds": 10.0,
            **delivery,
        }
        lines = ["[database]", f"path = {json.dumps(str(self.db))}", "", "[delivery]"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in options.items()]
        for ep in endpoints:
            lines += ["", "[[endpoints]]"]
            lines += [f"{key} = {json.dumps(value)}" for key, value in ep.items()]
        self.config = self.tmp_path / "webhookd.toml"
        self.config.write_text("\n".join(lines) + "\n")

    async def webhookd(self, *argv: str) -> tuple[int, str, str]:
        """Run ``webhookd ARGV --config FILE``; its exit code, stdout and stderr."""
        self.capsys.readouterr()
        code = await asyncio.to_thread(main, [*argv, "--config", str(self.config)])
        out, err = self.capsys.readouterr()
        return code, out, err

    async def send_test(self, *argv: str) -> tuple[int, str, str]:
        return await self.webhookd("send-test", *argv)


@pytest.fixture
async def setup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Setup:
    return Setup(tmp_path, capsys)


async def configured(
    setup: Setup, url: str, *, endpoint: Mapping[str, Any] | None = None, **delivery: float
) -> Setup:
    """One static endpoint ``crm`` at ``url`` and a migrated database."""
    ep = {"id": "crm", "url": url, "secret": SECRET, **(endpoint or {})}
    setup.write_config([ep], **delivery)
    code, _, err = await setup.webhookd("migrate")
    assert code == 0, err
    return setup


def report_lines(out: str) -> dict[str, str]:
    """``{"status": "...", "verdict": "...", ...}`` from the text report."""
    lines = out.splitlines()
    assert lines[0].startswith("send-test to "), out
    fields = {}
    for line in lines[1:]:
        key, _, value = line.strip().partition(":")
        fields[key] = value.strip()
    return fields


def printed_delivery_id(out: str) -> str:
    first = out.splitlines()[0]
    assert ", delivery dlv_" in first, first
    return first.rsplit(" ", 1)[1]


@dataclass
class Answer:
    status: int
    body: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Scripted:
    """A receiver that answers every request to any path with one fixed response."""

    answer: Answer
    paths: list[str] = field(default_factory=list)
    port: int = 0

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
async def scripted() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []

    async def start(answer: Answer) -> Scripted:
        server = Scripted(answer)

        async def handle(request: web.Request) -> web.Response:
            await request.read()
            server.paths.append(request.path)
            return web.Response(
                status=answer.status, text=answer.body, headers=dict(answer.headers)
            )

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        server.port = int(runner.addresses[0][1])
        return server

    yield start
    for runner in runners:
        await runner.cleanup()


# -- delivered -------------------------------------------------------------------------------


async def test_a_ping_to_a_working_receiver_is_delivered_signed_and_recorded(
    setup: Setup,
) -> None:
    async with Receiver(answer=200) as receiver:
        await configured(setup, receiver.url("/hooks"))
        before = time.time()
        code, out, err = await setup.send_test("crm")
        after = time.time()

    assert code == 0, err
    fields = report_lines(out)
    assert fields["status"].startswith("200 in ")
    assert fields["status"].endswith(" ms")
    assert fields["response"] == '"answered 200"'
    assert fields["verdict"] == "delivered"
    assert out.splitlines()[0].startswith(
        f"send-test to crm ({receiver.url('/hooks')}) — event webhook.test, delivery dlv_"
    )
    assert SECRET not in out + err

    [request] = receiver.requests
    assert request.path == "/hooks"
    assert request.headers[f"{PREFIX}-Signature"] == seed_signature(SECRET, request.body)
    assert request.headers[f"{PREFIX}-Event"] == "webhook.test"
    delivery_id = printed_delivery_id(out)
    assert request.headers[f"{PREFIX}-Delivery"] == delivery_id
    body = request.json()
    assert list(body) == ["event", "timestamp", "data"]
    assert body["event"] == "webhook.test"
    assert body["data"] == dict(CATALOGUE["webhook.test"].example_data)
    sent_at = datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00")).timestamp()
    assert int(before) <= sent_at <= after  # the current time, not the example's

    [row] = deliveries(setup.db)
    assert (row["delivery_id"], row["state"], row["attempts"]) == (delivery_id, "succeeded", 1)
    assert row["next_attempt_at"] is None
    assert row["event_id"].startswith("evt_test_")
    assert bytes(row["body"]) == request.body
    [event] = query(setup.db, "SELECT outbox_id FROM webhookd_events")
    assert event["outbox_id"] is None
    [attempt] = attempts(setup.db, row["id"])
    assert (attempt["result"], attempt["status_code"]) == ("success", 200)


@pytest.mark.parametrize("event_type", [t for t, _, _, _ in SEED_EVENTS])
async def test_each_seed_event_sends_the_seed_example_as_the_daemon_would(
    setup: Setup, event_type: str
) -> None:
    [data] = [d for t, _, _, d in SEED_EVENTS if t == event_type]
    async with Receiver(answer=204) as receiver:
        await configured(setup, receiver.url())
        code, out, err = await setup.send_test("crm", "--event", event_type)

    assert code == 0, err
    assert report_lines(out)["verdict"] == "delivered"
    [request] = receiver.requests
    timestamp = request.json()["timestamp"]
    # byte for byte the envelope the daemon builds, around the seed's example
    assert request.body == build_body(event_type, timestamp, canonical_json.dumps(data))
    assert request.headers[f"{PREFIX}-Signature"] == seed_signature(SECRET, request.body)
    assert request.headers[f"{PREFIX}-Event"] == event_type


@pytest.mark.node
async def test_the_seeds_own_receiver_code_accepts_the_test_event(
    setup: Setup, seed_receiver: Any
) -> None:
    receiver = seed_receiver(SECRET)
    await configured(setup, receiver.url)
    code, out, err = await setup.send_test("crm", "--event", "booking.created")
    assert code == 0, err
    assert report_lines(out)["verdict"] == "delivered"
    [record] = await receiver.wait_for(1)
    assert record["verified"] is True
    assert record["body"]["data"]["id"] == "book_123"


async def test_json_output_for_scripts(setup: Setup) -> None:
    async with Receiver(answer=200) as receiver:
        await configured(setup, receiver.url())
        code, out, err = await setup.send_test("crm", "--json", "--event", "payment.failed")
    assert code == 0, err
    report = json.loads(out)
    assert report["delivered"] is True
    assert (report["endpoint"], report["event_type"], report["status_code"]) == (
        "crm",
        "payment.failed",
        200,
    )
    assert report["verdict"] == "delivered"
    assert report["delivery_id"] == receiver.requests[0].delivery_id
    assert report["recorded"] is True
    assert SECRET not in out


# -- not delivered ---------------------------------------------------------------------------


async def test_a_401_says_check_the_secret_with_the_receivers_words(
    setup: Setup, scripted: Any
) -> None:
    server = await scripted(Answer(401, "Invalid signature"))
    await configured(setup, server.url())
    code, out, err = await setup.send_test("crm")

    assert code == 1, err
    lines = out.splitlines()
    assert lines[1].startswith("  status:   401 in ")
    assert lines[2] == '  response: "Invalid signature"'
    assert lines[-1] == "  verdict:  rejected by the receiver with 401: check the signing secret"
    [row] = deliveries(setup.db)
    assert (row["state"], row["attempts"], row["last_status"]) == ("failed", 1, 401)


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (404, "the receiver answered 404: check the URL path"),
        (500, "the receiver failed with 500 (its own error)"),
    ],
)
async def test_a_failed_test_is_exit_1_and_shows_up_in_deliveries_show(
    setup: Setup, status: int, verdict: str
) -> None:
    async with Receiver(answer=status) as receiver:
        await configured(setup, receiver.url())
        code, out, err = await setup.send_test("crm")
        assert len(receiver.requests) == 1  # a test is never retried

    assert code == 1, err
    assert report_lines(out)["verdict"].startswith(verdict)
    delivery_id = printed_delivery_id(out)

    code, shown, err = await setup.webhookd("deliveries", "show", delivery_id, "--json")
    assert code == 0, err
    record = json.loads(shown)
    assert (record["state"], record["attempts"], record["endpoint_id"]) == ("failed", 1, "crm")
    assert record["event_type"] == "webhook.test"
    assert record["next_attempt_at"] is None
    [attempt] = record["attempt_log"]
    assert (attempt["status_code"], attempt["response_excerpt"]) == (status, f"answered {status}")

    code, shown, err = await setup.webhookd("deliveries", "show", delivery_id)
    assert code == 0, err
    assert "state       failed" in shown
    assert f"HTTP {status}" in shown
    code, listed, err = await setup.webhookd("deliveries", "list", "--state", "failed")
    assert code == 0, err
    assert delivery_id in listed


async def test_a_redirect_is_not_followed_and_the_verdict_says_so(
    setup: Setup, scripted: Any
) -> None:
    server = await scripted(Answer(302, headers={"Location": "/final"}))
    await configured(setup, server.url("/old"))
    code, out, err = await setup.send_test("crm")

    assert code == 1, err
    assert report_lines(out)["verdict"] == (
        "the receiver redirected with 302; webhookd never follows redirects: use the final URL"
    )
    assert server.paths == ["/old"]


async def test_a_receiver_that_does_not_answer_in_time_is_a_timeout(setup: Setup) -> None:
    async with Receiver(answer=HANG) as receiver:
        await configured(setup, receiver.url(), timeout_seconds=0.5)
        code, out, err = await setup.send_test("crm")
        assert len(receiver.requests) == 1

    assert code == 1, err
    fields = report_lines(out)
    assert fields["status"].startswith("none after ")
    assert fields["response"] == "(none)"
    assert fields["verdict"].startswith("timed out after 0.5 s")
    [row] = deliveries(setup.db)
    [attempt] = attempts(setup.db, row["id"])
    assert (row["state"], attempt["result"], attempt["status_code"]) == ("failed", "timeout", None)


async def test_nothing_listening_is_connection_refused_with_host_and_port(setup: Setup) -> None:
    port = free_port()
    await configured(setup, f"http://127.0.0.1:{port}/hook")
    code, out, err = await setup.send_test("crm")

    assert code == 1, err
    assert report_lines(out)["verdict"] == (
        f"connection refused: nothing listens at 127.0.0.1:{port}"
    )
    [row] = deliveries(setup.db)
    assert (row["state"], row["attempts"]) == ("failed", 1)


# -- signing ---------------------------------------------------------------------------------


async def test_a_table_endpoint_in_a_rotation_grace_is_signed_by_both_secrets_and_schemes(
    setup: Setup,
) -> None:
    async with Receiver(answer=200) as receiver:
        setup.write_config([])
        assert (await setup.webhookd("migrate"))[0] == 0
        await execute(
            setup.db,
            "INSERT INTO webhook_endpoints (id, url, secret, signature_schemes, previous_secret,"
            " previous_secret_expires_at) VALUES (?, ?, ?, ?, ?, ?)",
            ("crm", receiver.url(), WHSEC, "seed,standard", OLD_WHSEC, "2999-01-01T00:00:00Z"),
        )
        code, out, err = await setup.send_test("crm", "--event", "booking.cancelled")

    assert code == 0, err
    assert report_lines(out)["signed"] == (
        "seed + standard, by the current and the previous secret "
        "(the previous one until 2999-01-01T00:00:00Z)"
    )
    assert WHSEC not in out + err
    assert OLD_WHSEC not in out + err
    [request] = receiver.requests
    headers = request.headers
    assert headers[f"{PREFIX}-Signature"] == seed_signature(WHSEC, request.body)
    assert headers[f"{PREFIX}-Signature-Previous"] == seed_signature(OLD_WHSEC, request.body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert headers["webhook-id"] == request.delivery_id
    for secret in (WHSEC, OLD_WHSEC):  # a receiver on either secret accepts it
        payload = Webhook(secret).verify(request.body, plain(headers))
        assert payload["event"] == "booking.cancelled"


def plain(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


async def test_after_the_grace_period_only_the_current_secret_signs(setup: Setup) -> None:
    async with Receiver(answer=200) as receiver:
        setup.write_config([])
        assert (await setup.webhookd("migrate"))[0] == 0
        await execute(
            setup.db,
            "INSERT INTO webhook_endpoints (id, url, secret, signature_schemes, previous_secret,"
            " previous_secret_expires_at) VALUES (?, ?, ?, ?, ?, ?)",
            ("crm", receiver.url(), WHSEC, "standard", OLD_WHSEC, "2000-01-01T00:00:00Z"),
        )
        code, out, err = await setup.send_test("crm")

    assert code == 0, err
    assert report_lines(out)["signed"] == "standard, by the current secret"
    [request] = receiver.requests
    assert len(request.headers["webhook-signature"].split(" ")) == 1
    assert f"{PREFIX}-Signature" not in request.headers
    Webhook(WHSEC).verify(request.body, plain(request.headers))


# -- usage errors ----------------------------------------------------------------------------


async def test_an_unknown_endpoint_is_exit_2_and_sends_nothing(setup: Setup) -> None:
    async with Receiver(answer=200) as receiver:
        await configured(setup, receiver.url())
        code, out, err = await setup.send_test("crn")
        assert receiver.requests == []
    assert code == 2
    assert out == ""
    assert "no endpoint 'crn'" in err
    assert "crm" in err  # the ones that exist
    assert deliveries(setup.db) == []


async def test_an_unknown_event_type_is_exit_2_listing_the_choices(setup: Setup) -> None:
    async with Receiver(answer=200) as receiver:
        await configured(setup, receiver.url())
        code, out, err = await setup.send_test("crm", "--event", "booking.exploded")
        assert receiver.requests == []
    assert code == 2
    assert out == ""
    assert "'booking.exploded'" in err
    assert "booking.created" in err
    assert "webhook.test" in err
    assert deliveries(setup.db) == []


async def test_a_table_endpoint_the_daemon_cannot_use_is_exit_2_with_the_reason(
    setup: Setup,
) -> None:
    setup.write_config([])
    assert (await setup.webhookd("migrate"))[0] == 0
    await execute(
        setup.db,
        "INSERT INTO webhook_endpoints (id, url, secret, signature_schemes) VALUES (?, ?, ?, ?)",
        ("crm", f"http://127.0.0.1:{free_port()}/h", "not-a-whsec-secret", "standard"),
    )
    code, out, err = await setup.send_test("crm")
    assert code == 2
    assert out == ""
    assert "cannot be used" in err
    assert "whsec_" in err
    assert "not-a-whsec-secret" not in err
    assert deliveries(setup.db) == []


async def test_a_disabled_endpoint_is_tested_with_a_note(setup: Setup) -> None:
    async with Receiver(answer=200) as receiver:
        await configured(setup, receiver.url(), endpoint={"enabled": False})
        code, out, err = await setup.send_test("crm")
    assert code == 0, err
    assert len(receiver.requests) == 1
    assert report_lines(out)["verdict"] == "delivered"
    assert "disabled" in err
