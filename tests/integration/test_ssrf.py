"""SSRF protection where connections are made: real receivers on loopback, real connections.

Loopback is what SSRF protection refuses by default, so a receiver on 127.0.0.1 stands for any
internal service: blocked unless ``delivery.allowed_networks`` lists it. Nothing here fakes
HTTP or SQLite. The DNS-rebinding test injects a resolver under the guard whose answers change
from one lookup to the next: that is a test double for DNS only (the guard, aiohttp and the
sockets are real), documented on :class:`ScriptedDNS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from daemon_fixtures import (
    OutboxRow,
    Receiver,
    attempts,
    daemon_settings,
    deliveries,
    eventually,
    insert_outbox,
    running_daemon,
)

from webhookd.cli import main
from webhookd.delivery import HttpResult, Sender
from webhookd.models import AttemptResult, Delivery, Endpoint, ErrorKind
from webhookd.settings import DeliverySettings

pytestmark = pytest.mark.timeout(120)

SECRET = "ssrf-test-secret"
BLOCKED = "blocked by SSRF protection"


# -- helpers ---------------------------------------------------------------------------------


async def deliver_one(
    tmp_path: Path, url: str, *, db_name: str = "webhookd.db", **delivery: Any
) -> tuple[Any, list[Any]]:
    """Run a daemon with one endpoint at ``url`` and one attempt per delivery; send one event;
    return the finished delivery row and its attempts."""
    settings = daemon_settings(
        tmp_path,
        database={"path": str(tmp_path / db_name)},
        endpoints=[{"id": "target", "url": url, "secret": SECRET}],
        delivery=delivery,
        retry={"max_attempts": 1},
    )
    db = settings.database.path
    async with running_daemon(settings):
        await insert_outbox(db, [OutboxRow("booking.created", {"id": "bk_1"})])
        [row] = await eventually(
            lambda: [d for d in deliveries(db) if d["state"] != "pending"],
            what="the delivery to finish",
        )
    return row, attempts(db, row["id"])


def assert_blocked(row: Any, attempt_rows: list[Any], *needles: str) -> str:
    assert row["state"] == "failed"
    [attempt] = attempt_rows
    assert attempt["result"] == "network_error"
    assert attempt["error_kind"] == "blocked"
    assert attempt["status_code"] is None
    error = str(attempt["error"])
    assert error.startswith(BLOCKED), error
    for needle in needles:
        assert needle in error, f"{needle!r} not in {error!r}"
    return error


@contextlib.asynccontextmanager
async def v6_receiver() -> AsyncIterator[tuple[str, list[str]]]:
    """A receiver on [::1]:<free port>: its URL and the paths it was sent."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        seen.append(request.path)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "::1", 0).start()
    port = runner.addresses[0][1]
    try:
        yield f"http://[::1]:{port}/hook", seen
    finally:
        await runner.cleanup()


def one_delivery(endpoint_id: str) -> Delivery:
    now = time.time()
    return Delivery(
        pk=1,
        delivery_id=f"dlv_ssrf_{int(now * 1e6)}",
        endpoint_id=endpoint_id,
        event_id="evt_ssrf",
        event_type="booking.created",
        occurred_at="2026-01-01T00:00:00.000Z",
        body=b'{"type":"booking.created","data":{}}',
        attempts=0,
        created_at=now,
    )


async def send(sender: Sender, url: str) -> HttpResult:
    return await sender.send(Endpoint(id="target", url=url, secret=SECRET), one_delivery("target"))


def delivery_settings(**values: Any) -> DeliverySettings:
    return DeliverySettings.model_validate(
        {"allow_http": True, "timeout_seconds": 5.0, "connect_timeout_seconds": 2.0, **values}
    )


# -- a name that resolves to loopback, and loopback literals, through the daemon -----------------


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_loopback_is_blocked_by_default(tmp_path: Path, host: str) -> None:
    async with Receiver() as receiver:
        url = f"http://{host}:{receiver.port}/hook"
        row, attempt_rows = await deliver_one(tmp_path, url, allowed_networks=[])
    assert receiver.requests == []  # nothing reached the receiver
    error = assert_blocked(
        row,
        attempt_rows,
        "(loopback, 127.0.0.0/8)",
        '"127.0.0.1/32"',
        "delivery.allowed_networks",
        "delivery.allow_private_networks = true",
    )
    if host == "localhost":
        assert "localhost resolves to 127.0.0.1" in error
    else:
        assert "the URL's host 127.0.0.1 is not a public address" in error


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_loopback_is_delivered_to_when_the_allow_list_names_it(
    tmp_path: Path, host: str
) -> None:
    async with Receiver() as receiver:
        url = f"http://{host}:{receiver.port}/hook"
        row, attempt_rows = await deliver_one(tmp_path, url, allowed_networks=["127.0.0.0/8"])
    assert row["state"] == "succeeded"
    assert [r.path for r in receiver.requests] == ["/hook"]
    assert [a["result"] for a in attempt_rows] == ["success"]


async def test_allow_private_networks_opens_loopback(tmp_path: Path) -> None:
    async with Receiver() as receiver:
        url = f"http://localhost:{receiver.port}/hook"
        row, _ = await deliver_one(tmp_path, url, allowed_networks=[], allow_private_networks=True)
    assert row["state"] == "succeeded"
    assert len(receiver.requests) == 1


async def test_ipv6_loopback_is_blocked_and_an_ipv4_allow_list_does_not_open_it(
    tmp_path: Path,
) -> None:
    async with v6_receiver() as (url, seen):
        row, attempt_rows = await deliver_one(
            tmp_path, url, db_name="v4-only.db", allowed_networks=["127.0.0.0/8"]
        )
        assert seen == []
        assert_blocked(row, attempt_rows, "the URL's host ::1", "loopback, ::1/128", '"::1/128"')

        row, attempt_rows = await deliver_one(
            tmp_path, url, db_name="v6.db", allowed_networks=["::1/128"]
        )
        assert row["state"] == "succeeded"
        assert seen == ["/hook"]


async def test_the_cloud_metadata_address_stays_blocked_with_allow_private_networks() -> None:
    sender = Sender(delivery_settings(allow_private_networks=True))
    await sender.start()
    try:
        result = await send(sender, "http://169.254.169.254/latest/meta-data/iam/")
    finally:
        await sender.close()
    assert result.result is AttemptResult.NETWORK_ERROR
    assert result.error_kind is ErrorKind.BLOCKED
    assert result.error is not None
    assert "cloud metadata service" in result.error
    assert '"169.254.169.254/32" to delivery.allowed_networks' in result.error
    assert "allow_private_networks" not in result.error


# -- DNS rebinding -----------------------------------------------------------------------------


class ScriptedDNS(AbstractResolver):
    """A test double for DNS only: lookup n answers ``script[n]`` (the last entry repeats).

    It plays a hostile name server whose answers change between lookups (DNS rebinding). It is
    injected *under* the guard (``Sender(..., resolver=...)``): every answer still passes through
    webhookd's GuardedResolver and then aiohttp's real connector and sockets.
    """

    def __init__(self, script: Sequence[Sequence[str]]) -> None:
        self.script = [list(answers) for answers in script]
        self.lookups = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = self.script[min(self.lookups, len(self.script) - 1)]
        self.lookups += 1
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in answers
        ]

    async def close(self) -> None:
        pass


class Trap:
    """A TCP server on 127.0.0.2 (a loopback address the tests block) that counts connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.2", port)
        return int(self.server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@contextlib.asynccontextmanager
async def good_and_trap() -> AsyncIterator[tuple[int, list[str], Trap]]:
    """A receiver on 127.0.0.1:P and a trap on 127.0.0.2:P (the same port, so that only the
    address a name resolves to decides where a request goes). The receiver closes every
    connection, so each attempt connects (and looks the name up) anew."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        seen.append(request.path)
        response = web.Response(text="ok")
        response.force_close()
        return response

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    trap = Trap()
    try:
        for _ in range(20):  # the trap's port may be taken on 127.0.0.1: try another
            port = await trap.start()
            try:
                await web.TCPSite(runner, "127.0.0.1", port).start()
                break
            except OSError:
                await trap.close()
        else:
            raise AssertionError("no port free on both 127.0.0.1 and 127.0.0.2")
        yield port, seen, trap
    finally:
        await trap.close()
        await runner.cleanup()


async def test_dns_rebinding_never_reaches_a_blocked_address() -> None:
    script = [
        ["127.0.0.2"],  # blocked
        ["127.0.0.1"],  # allowed
        ["127.0.0.2"],  # rebound to a blocked address
        ["127.0.0.2", "127.0.0.1"],  # mixed: only the allowed one is used
        ["::ffff:127.0.0.2"],  # the blocked address in IPv6 clothing
        ["127.0.0.1", "127.0.0.2"],
        ["0.0.0.0"],  # "this host" on Linux
    ]
    expected = [False, True, False, True, False, True, False]
    dns = ScriptedDNS(script)
    sender = Sender(
        delivery_settings(allowed_networks=["127.0.0.1/32"]), resolver=dns, dns_cache_seconds=0
    )
    async with good_and_trap() as (port, seen, trap):
        await sender.start()
        try:
            results = [await send(sender, f"http://rebind.test:{port}/hook") for _ in script]
        finally:
            await sender.close()
    assert dns.lookups == len(script)  # every attempt looked the name up and got a new answer
    assert [r.result is AttemptResult.SUCCESS for r in results] == expected
    assert trap.connections == 0
    assert len(seen) == expected.count(True)
    for result, ok in zip(results, expected, strict=True):
        if not ok:
            assert result.error_kind is ErrorKind.BLOCKED
            assert result.error is not None
            assert result.error.startswith(f"{BLOCKED}: rebind.test resolves to ")


async def test_the_trap_catches_what_an_open_policy_lets_through() -> None:
    # The control for the test above: with 127.0.0.2 allowed, the same set-up does connect to
    # the trap, so a trap count of zero there means the guard stopped it.
    dns = ScriptedDNS([["127.0.0.2"]])
    sender = Sender(
        delivery_settings(allowed_networks=["127.0.0.0/8"]), resolver=dns, dns_cache_seconds=0
    )
    async with good_and_trap() as (port, _, trap):
        await sender.start()
        try:
            result = await send(sender, f"http://rebind.test:{port}/hook")
        finally:
            await sender.close()
    assert result.result is not AttemptResult.SUCCESS  # the trap hangs up
    assert result.error_kind is not ErrorKind.BLOCKED
    assert trap.connections >= 1


# -- reloads -----------------------------------------------------------------------------------


async def test_a_narrower_policy_applies_to_kept_alive_connections_too() -> None:
    sender = Sender(delivery_settings(allowed_networks=[]))
    async with Receiver() as receiver:
        url = f"http://localhost:{receiver.port}/hook"
        await sender.start()
        try:
            assert (await send(sender, url)).error_kind is ErrorKind.BLOCKED
            sender.apply(delivery_settings(allowed_networks=["127.0.0.0/8"]))
            assert (await send(sender, url)).result is AttemptResult.SUCCESS
            assert (await send(sender, url)).result is AttemptResult.SUCCESS  # kept alive
            sender.apply(delivery_settings(allowed_networks=[]))
            after = await send(sender, url)
        finally:
            await sender.close()
    assert after.error_kind is ErrorKind.BLOCKED
    assert len(receiver.requests) == 2


# -- send-test ---------------------------------------------------------------------------------


async def test_send_test_shows_the_block_and_how_to_allow_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def webhookd(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = await asyncio.to_thread(main, [*argv, "--config", str(config)])
        out, err = capsys.readouterr()
        return code, out, err

    config = tmp_path / "webhookd.toml"
    async with Receiver() as receiver:
        endpoint = {"id": "crm", "url": f"http://localhost:{receiver.port}/hook", "secret": SECRET}
        lines = [
            "[database]",
            f"path = {json.dumps(str(tmp_path / 'webhookd.db'))}",
            "[delivery]",
            "allow_http = true",
            "[[endpoints]]",
            *(f"{k} = {json.dumps(v)}" for k, v in endpoint.items()),
        ]
        config.write_text("\n".join(lines) + "\n")
        assert (await webhookd("migrate"))[0] == 0

        code, out, _ = await webhookd("send-test", "crm")
        assert code == 1
        verdict = next(line for line in out.splitlines() if line.strip().startswith("verdict:"))
        assert BLOCKED in verdict
        assert "localhost resolves to 127.0.0.1 (loopback, 127.0.0.0/8)" in verdict
        assert "delivery.allowed_networks" in verdict
        assert receiver.requests == []

        code, out, _ = await webhookd("send-test", "crm", "--json")
        report = json.loads(out)
        assert (code, report["delivered"], report["result"]) == (1, False, "network_error")
        assert report["error"].startswith(BLOCKED)

        config.write_text(
            config.read_text().replace(
                "allow_http = true", 'allow_http = true\nallowed_networks = ["127.0.0.0/8"]'
            )
        )
        code, out, _ = await webhookd("send-test", "crm")
        assert code == 0, out
        assert len(receiver.requests) == 1
