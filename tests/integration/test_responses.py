"""What the daemon makes of each kind of answer, against real receivers on loopback.

Any 2xx succeeds; a 3xx is a failure that is never followed (its Location is recorded); a 410
disables the endpoint (its deliveries are kept) until ``webhookd endpoints enable``; a 429/503
with Retry-After pauses the whole endpoint, never sooner than the retry schedule and never
beyond ``delivery.retry_after_max_seconds``. Network failures are each classified
(``error_kind``), recorded and retried. A huge or endless response costs no memory, and a
receiver that drips its answer is cut at the total timeout.

Receivers are real aiohttp servers, or raw asyncio servers for answers aiohttp would never give
(resets, garbage, silence). The daemon runs in-process on a SQLite file in ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from daemon_fixtures import (
    DELIVERY_HEADER,
    OutboxRow,
    attempts,
    daemon_settings,
    deliveries,
    endpoint_state_row,
    eventually,
    execute,
    insert_endpoint,
    insert_outbox,
    query,
    running_daemon,
    serve_on_loopback,
    stored_endpoint_state,
)
from helpers import free_port, rss_bytes
from operator_fixtures import LogEvents, endpoint_state_gauge, webhookd, write_config_file

from webhookd.retry import parse_retry_after
from webhookd.settings import Settings

pytestmark = pytest.mark.timeout(120)

SECRET = "whsec_responses_secret"
LOOPBACK = {"allow_http": True, "allowed_networks": ["127.0.0.0/8"]}
# Retries far away: a test sees one attempt, then the delivery waiting for its retry.
ONE_ATTEMPT_RETRY = {"initial_delay_seconds": 60.0, "multiplier": 2.0, "jitter": 0.0}
# time.time() in the receiver and in the daemon: one clock; floats that went through SQLite.
CLOCK_EPSILON_SECONDS = 1e-3
HUGE_BYTES = 100 * 1024 * 1024
CHUNK = b"x" * (1024 * 1024)
RSS_SAMPLE_SECONDS = 0.005
# The whole response would be 100 MB; what the daemon may keep is a small fraction of it.
MAX_RSS_GROWTH_BYTES = 24 * 1024 * 1024


# -- receivers -------------------------------------------------------------------------------


@dataclass
class Hit:
    path: str
    delivery_id: str
    arrived_at: float
    answered_at: float | None = None


Respond = Callable[[web.Request, Hit], Awaitable[web.StreamResponse]]


@dataclass
class Server:
    """An aiohttp receiver on 127.0.0.1 whose answer to each request is ``respond``."""

    respond: Respond
    hits: list[Hit] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def on(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path]

    async def __aenter__(self) -> Server:
        self._runner, self.port = await serve_on_loopback(self._handle)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        hit = Hit(request.path, request.headers.get(DELIVERY_HEADER, ""), time.time())
        self.hits.append(hit)
        await request.read()
        response = await self.respond(request, hit)
        hit.answered_at = time.time()
        return response


def status(code: int, **headers: str) -> Respond:
    async def respond(request: web.Request, hit: Hit) -> web.StreamResponse:
        return web.Response(status=code, text=f"answered {code}", headers=headers)

    return respond


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Event], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handler: RawHandler) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 that behaves as ``handler`` says; yields its port. On exit every
    connection is dropped and the handlers are told to stop."""
    stop = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            await handler(reader, writer, stop)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        stop.set()
        server.close()
        for writer in writers:
            writer.transport.abort()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


async def reset_after_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stop: asyncio.Event
) -> None:
    await read_request(reader)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    writer.transport.abort()


async def close_after_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stop: asyncio.Event
) -> None:
    await read_request(reader)
    writer.close()


async def garbage_answer(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stop: asyncio.Event
) -> None:
    await read_request(reader)
    writer.write(b"this is not HTTP at all\r\n\r\n")
    await writer.drain()
    writer.close()


async def truncated_body(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stop: asyncio.Event
) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
    await writer.drain()
    writer.close()


async def silence(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stop: asyncio.Event
) -> None:
    await read_request(reader)
    await stop.wait()


async def plain_http_to_tls(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stop: asyncio.Event
) -> None:
    await reader.read(1)  # the TLS ClientHello: answer it in plain HTTP
    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()
    writer.close()


@contextlib.contextmanager
def full_backlog() -> Iterator[int]:
    """A port whose listen queue is full: new connections are never accepted (SYNs dropped)."""
    listener = socket.socket()
    fillers = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()


# -- the daemon, its logs and its command line -----------------------------------------------


def settings_for(
    tmp_path: Path, endpoints: Sequence[Mapping[str, Any]], **sections: Mapping[str, Any]
) -> Settings:
    delivery = {**LOOPBACK, **sections.pop("delivery", {})}
    return daemon_settings(tmp_path, endpoints=endpoints, delivery=delivery, **sections)


def endpoint(ep_id: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"id": ep_id, "url": url, "secret": SECRET, **extra}


def booking(n: int | str) -> OutboxRow:
    return OutboxRow("booking.created", {"id": f"book_{n}"}, event_id=f"evt_{n}")


def write_config(path: Path, settings: Settings, endpoints: Sequence[Mapping[str, Any]]) -> Path:
    """The TOML file an operator's `webhookd` commands would read for this daemon."""
    sections = {"database": {"path": settings.database.path}, "delivery": LOOPBACK}
    return write_config_file(path, sections, endpoints)


# -- 2xx and 3xx -----------------------------------------------------------------------------

SUCCESS_CODES = (200, 201, 202, 204, 299)
REDIRECT_CODES = (301, 302, 303, 307, 308)


async def test_any_2xx_is_a_success(tmp_path: Path) -> None:
    db = tmp_path / "webhookd.db"

    async def respond(request: web.Request, hit: Hit) -> web.StreamResponse:
        code = int(request.path.rsplit("/", 1)[1])
        return web.Response(status=code, body=None if code == 204 else b"thanks")

    async with Server(respond) as server:
        eps = [endpoint(f"s{code}", server.url(f"/s/{code}")) for code in SUCCESS_CODES]
        async with running_daemon(settings_for(tmp_path, eps, retry=ONE_ATTEMPT_RETRY)):
            await insert_outbox(db, [booking(1)])
            done = await eventually(
                lambda: (
                    len(deliveries(db, state="succeeded")) == len(SUCCESS_CODES)
                    and deliveries(db, state="succeeded")
                ),
                what="a success at every 2xx endpoint",
            )
    assert {d["endpoint_id"]: (d["attempts"], d["last_status"]) for d in done} == {
        f"s{code}": (1, code) for code in SUCCESS_CODES
    }
    for d in done:
        [attempt] = attempts(db, d["id"])
        assert (attempt["result"], attempt["error"], attempt["error_kind"]) == (
            "success",
            None,
            None,
        )


async def test_a_redirect_is_a_failure_that_is_never_followed(tmp_path: Path) -> None:
    db = tmp_path / "webhookd.db"
    settings: Settings | None = None

    async def respond(request: web.Request, hit: Hit) -> web.StreamResponse:
        if request.path.startswith("/moved/"):
            code = int(request.path.rsplit("/", 1)[1])
            return web.Response(status=code, headers={"Location": f"/elsewhere/{code}?x=1"})
        return web.Response(status=200)  # the redirect's target: must never be asked

    async with Server(respond) as server:
        eps = [endpoint(f"r{code}", server.url(f"/moved/{code}")) for code in REDIRECT_CODES]
        settings = settings_for(tmp_path, eps, retry=ONE_ATTEMPT_RETRY)
        async with running_daemon(settings):
            await insert_outbox(db, [booking(1)])
            waiting = await eventually(
                lambda: (
                    [d for d in deliveries(db) if d["attempts"] == 1] == deliveries(db)
                    and len(deliveries(db)) == len(REDIRECT_CODES)
                    and deliveries(db)
                ),
                what="one attempt at every redirecting endpoint",
            )
            config = write_config(tmp_path / "webhookd.toml", settings, eps)
            code, out, err = await webhookd(
                config, "deliveries", "show", waiting[0]["delivery_id"], "--json"
            )
        assert not [h for h in server.hits if not h.path.startswith("/moved/")]
    assert code == 0, err
    shown = json.loads(out)
    assert shown["state"] == "pending"  # a failure: retried on the schedule
    [logged] = shown["attempt_log"]
    assert logged["error_kind"] == "redirect"
    assert "/elsewhere/" in logged["error"]
    for d in waiting:
        redirect_code = int(d["endpoint_id"][1:])
        [attempt] = attempts(db, d["id"])
        assert (d["state"], attempt["result"], attempt["status_code"], attempt["error_kind"]) == (
            "pending",
            "http_error",
            redirect_code,
            "redirect",
        )
        assert f"'/elsewhere/{redirect_code}?x=1'" in attempt["error"]
        assert "not followed" in attempt["error"]
        assert d["next_attempt_at"] > attempt["started_at"]


# -- 410 Gone --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "reenable"),
    [("config", "cli"), ("table", "cli"), ("table", "application")],
)
async def test_410_gone_disables_the_endpoint_keeping_its_deliveries_until_enabled(
    tmp_path: Path, source: str, reenable: str, log_events: LogEvents
) -> None:
    db = tmp_path / "webhookd.db"
    gone = True

    async def respond(request: web.Request, hit: Hit) -> web.StreamResponse:
        return web.Response(status=410 if gone else 200)

    async with Server(respond) as server:
        ep = endpoint("crm", server.url(), max_concurrency=1)
        static = [ep] if source == "config" else []
        settings = settings_for(
            tmp_path,
            static,
            retry={"initial_delay_seconds": 0.1, "multiplier": 1.0, "jitter": 0.0},
        )
        config = write_config(tmp_path / "webhookd.toml", settings, static)
        async with running_daemon(settings) as daemon:
            if source == "table":
                await insert_endpoint(
                    db, id="crm", url=server.url(), secret=SECRET, max_concurrency=1
                )
            await insert_outbox(db, [booking(n) for n in range(3)])
            await eventually(
                lambda: endpoint_state_gauge(daemon, "crm", "disabled") == 1.0,
                what="crm to be disabled",
            )
            row = await stored_endpoint_state(db, "crm", "disabled")
            assert "410 Gone" in row["disabled_reason"]
            assert row["since"] >= server.hits[0].arrived_at - CLOCK_EPSILON_SECONDS
            if source == "table":
                # The application sees it in its own table.
                assert query(db, "SELECT enabled FROM webhook_endpoints")[0][0] == 0
            code, out, err = await webhookd(config, "endpoints", "show", "crm", "--json")
            assert code == 0, err
            shown = json.loads(out)
            assert shown["state"] == "disabled"
            assert "410 Gone" in shown["circuit"]["disabled_reason"]
            code, _, err = await webhookd(config, "endpoints", "list")
            assert "crm: disabled since" in err
            assert "410 Gone" in err

            # Not retried while disabled: the deliveries were due again every 0.1 s.
            await asyncio.sleep(1.0)
            assert len(server.hits) == 1
            assert [d["state"] for d in deliveries(db)] == ["pending"] * 3

            gone = False
            if reenable == "cli":
                code, _, err = await webhookd(config, "endpoints", "enable", "crm")
                assert code == 0, err
                assert "410 Gone" in err  # says what it was disabled for
            else:
                await execute(db, "UPDATE webhook_endpoints SET enabled = 1 WHERE id = 'crm'")
            await eventually(
                lambda: len(deliveries(db, state="succeeded")) == 3, what="the kept deliveries"
            )
            assert endpoint_state_gauge(daemon, "crm", "ok") == 1.0
            assert endpoint_state_gauge(daemon, "crm", "disabled") == 0.0
    assert log_events.endpoint_state_moves() == [("ok", "disabled"), ("disabled", "ok")]
    [first] = attempts(db, deliveries(db)[0]["id"])[:1]
    assert (first["status_code"], first["error_kind"]) == (410, "gone")


async def test_a_disabled_endpoint_stays_disabled_across_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "webhookd.db"
    async with Server(status(410)) as server:
        eps = [endpoint("crm", server.url())]
        settings = settings_for(tmp_path, eps, retry={"initial_delay_seconds": 0.1})
        async with running_daemon(settings) as daemon:
            await insert_outbox(db, [booking(1)])
            await eventually(lambda: endpoint_state_gauge(daemon, "crm", "disabled") == 1.0)
        async with running_daemon(settings) as daemon:
            assert endpoint_state_gauge(daemon, "crm", "disabled") == 1.0
            await asyncio.sleep(0.5)  # its delivery was due again after 0.1 s
        assert len(server.hits) == 1
    assert [d["state"] for d in deliveries(db)] == ["pending"]


# -- Retry-After -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "retry_after", "schedule_seconds", "cap_seconds", "pause_seconds", "retry_seconds"),
    [
        pytest.param(429, "2", 0.2, 3600.0, 2.0, 2.0, id="429-seconds"),
        pytest.param(503, "2", 0.2, 3600.0, 2.0, 2.0, id="503-seconds"),
        pytest.param(429, "3600", 0.2, 1.0, 1.0, 1.0, id="capped"),
        pytest.param(503, "1", 2.0, 3600.0, 1.0, 2.0, id="never-sooner-than-the-schedule"),
    ],
)
async def test_retry_after_pauses_the_whole_endpoint_within_bounds(
    tmp_path: Path,
    code: int,
    retry_after: str,
    schedule_seconds: float,
    cap_seconds: float,
    pause_seconds: float,
    retry_seconds: float,
) -> None:
    db = tmp_path / "webhookd.db"

    async def respond(request: web.Request, hit: Hit) -> web.StreamResponse:
        if len(server.hits) == 1:
            return web.Response(status=code, headers={"Retry-After": retry_after})
        return web.Response(status=200)

    async with Server(respond) as server:
        settings = settings_for(
            tmp_path,
            [endpoint("crm", server.url())],
            retry={"initial_delay_seconds": schedule_seconds, "jitter": 0.0},
            delivery={"retry_after_max_seconds": cap_seconds},
        )
        async with running_daemon(settings) as daemon:
            await insert_outbox(db, [booking("a")])
            await eventually(lambda: endpoint_state_gauge(daemon, "crm", "backing_off") == 1.0)
            [first] = server.hits
            paused = await stored_endpoint_state(db, "crm", "backing_off")
            [a] = deliveries(db)
            # Another delivery, due at once: it waits for the end of the endpoint's pause.
            await insert_outbox(db, [booking("b")])
            done = await eventually(
                lambda: (
                    len(deliveries(db, state="succeeded")) == 2
                    and {d["event_id"]: d for d in deliveries(db)}
                ),
                what="both deliveries",
            )
            assert endpoint_state_gauge(daemon, "crm", "ok") == 1.0

    assert first.answered_at is not None
    # The pause: exactly what was asked (or the cap), from the moment the answer came in.
    assert paused["state"] == "backing_off"
    assert paused["paused_until"] == pytest.approx(paused["updated_at"] + pause_seconds)
    assert "Retry-After" in paused["reason"] or "asked to wait" in paused["reason"]
    # The delivery's own next attempt: never sooner than its schedule, nor than the pause.
    [a_attempt, _] = attempts(db, done["evt_a"]["id"])
    assert a_attempt["error_kind"] == "rate_limited"
    assert f"Retry-After: {retry_after}" in a_attempt["error"]
    decided_at = paused["updated_at"]
    assert a["next_attempt_at"] == pytest.approx(decided_at + retry_seconds)
    by_delivery = {h.delivery_id: h for h in server.hits[1:]}
    b_hit = by_delivery[done["evt_b"]["delivery_id"]]
    a_retry = by_delivery[done["evt_a"]["delivery_id"]]
    assert b_hit.arrived_at >= first.answered_at + pause_seconds
    assert a_retry.arrived_at >= first.answered_at + retry_seconds


async def test_retry_after_as_an_http_date(tmp_path: Path) -> None:
    db = tmp_path / "webhookd.db"
    asked: list[str] = []

    async def respond(request: web.Request, hit: Hit) -> web.StreamResponse:
        if len(server.hits) == 1:
            asked.append(email.utils.formatdate(time.time() + 3, usegmt=True))
            return web.Response(status=429, headers={"Retry-After": asked[0]})
        return web.Response(status=200)

    async with Server(respond) as server:
        settings = settings_for(tmp_path, [endpoint("crm", server.url())])
        async with running_daemon(settings):
            await insert_outbox(db, [booking(1)])
            await eventually(lambda: deliveries(db, state="succeeded"), what="the retry")
    until = email.utils.parsedate_to_datetime(asked[0]).timestamp()
    assert server.hits[1].arrived_at >= until


async def test_503_without_retry_after_is_a_plain_failure(tmp_path: Path) -> None:
    db = tmp_path / "webhookd.db"
    async with Server(status(503)) as server:
        settings = settings_for(tmp_path, [endpoint("crm", server.url())], retry=ONE_ATTEMPT_RETRY)
        async with running_daemon(settings) as daemon:
            await insert_outbox(db, [booking(1)])
            [d] = await eventually(lambda: deliveries(db, attempts=1), what="one attempt")
            assert endpoint_state_gauge(daemon, "crm", "ok") == 1.0
    [attempt] = attempts(db, d["id"])
    assert (attempt["status_code"], attempt["error_kind"]) == (503, "http_status")
    row = endpoint_state_row(db, "crm")
    assert (row["state"], row["consecutive_failures"], row["paused_until"]) == ("ok", 1, None)


def test_retry_after_values_are_read_as_the_rfc_says() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 7 ", now) == 7.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:50 GMT", now) == 30.0  # IMF-fixdate
    assert parse_retry_after("Tuesday, 14-Nov-23 22:13:50 GMT", now) == 30.0  # RFC 850
    assert parse_retry_after("Tue Nov 14 22:13:50 2023", now) == 30.0  # asctime
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    for unreadable in (None, "", "soon", "-5", "1.5", "٣"):
        assert parse_retry_after(unreadable, now) is None


# -- network failures: each classified, recorded and retried ---------------------------------


@dataclass(frozen=True)
class Case:
    handler: RawHandler | None  # a raw server; None: see `special`
    result: str
    kind: str
    words: str  # in the recorded error
    special: str = ""  # "refused", "backlog", "dns", "tls"


CASES = {
    "connection_refused": Case(None, "network_error", "connection_refused", "refused", "refused"),
    "connection_reset": Case(reset_after_request, "network_error", "connection_reset", "reset"),
    "connection_closed": Case(close_after_request, "network_error", "connection_closed", "closed"),
    "protocol_garbage": Case(garbage_answer, "network_error", "protocol", "invalid HTTP"),
    "protocol_truncated": Case(truncated_body, "network_error", "protocol", "body"),
    "read_timeout": Case(silence, "timeout", "read_timeout", "timed out"),
    "connect_timeout": Case(None, "timeout", "connect_timeout", "connecting", "backlog"),
    "dns": Case(None, "network_error", "dns", "DNS", "dns"),
    "tls": Case(plain_http_to_tls, "network_error", "tls", "TLS", "tls"),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_network_failures_are_classified_recorded_and_retried(
    tmp_path: Path, name: str
) -> None:
    case = CASES[name]
    db = tmp_path / "webhookd.db"
    async with contextlib.AsyncExitStack() as stack:
        if case.special == "refused":
            url = f"http://127.0.0.1:{free_port()}/hook"
        elif case.special == "backlog":
            url = f"http://127.0.0.1:{stack.enter_context(full_backlog())}/hook"
        elif case.special == "dns":
            url = "http://webhookd-test.invalid/hook"
        else:
            assert case.handler is not None
            port = await stack.enter_async_context(raw_server(case.handler))
            scheme = "https" if case.special == "tls" else "http"
            url = f"{scheme}://127.0.0.1:{port}/hook"
        settings = settings_for(
            tmp_path,
            [endpoint("ep", url)],
            retry=ONE_ATTEMPT_RETRY,
            delivery={"timeout_seconds": 1.0, "connect_timeout_seconds": 0.5},
        )
        async with running_daemon(settings):
            await insert_outbox(db, [booking(1)])
            [d] = await eventually(lambda: deliveries(db, attempts=1), what="one attempt")
    [attempt] = attempts(db, d["id"])
    assert (attempt["result"], attempt["error_kind"]) == (case.result, case.kind), attempt["error"]
    assert case.words.lower() in attempt["error"].lower()
    assert attempt["status_code"] is None or name == "protocol_truncated"
    # Retried: still pending, with its next attempt on the schedule.
    assert d["state"] == "pending"
    assert (
        d["next_attempt_at"] >= attempt["started_at"] + ONE_ATTEMPT_RETRY["initial_delay_seconds"]
    )


# -- huge, endless and dripping responses ----------------------------------------------------


@pytest.mark.parametrize("shape", ["content-length-100MB", "endless-chunked"])
async def test_a_huge_or_endless_response_costs_no_memory(tmp_path: Path, shape: str) -> None:
    db = tmp_path / "webhookd.db"
    sent = 0
    finished = asyncio.Event()

    async def respond(request: web.Request, hit: Hit) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse(status=200)
        if shape == "endless-chunked":
            response.enable_chunked_encoding()
        else:
            response.content_length = HUGE_BYTES
        await response.prepare(request)
        try:
            # Endless: it goes on until the daemon hangs up (bounded only to stop a runaway).
            while sent < 4 * HUGE_BYTES and (shape == "endless-chunked" or sent < HUGE_BYTES):
                await response.write(CHUNK)
                sent += len(CHUNK)
        except (ConnectionError, OSError):
            pass
        finally:
            finished.set()
        return response

    peak = 0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_bytes())
            await asyncio.sleep(RSS_SAMPLE_SECONDS)

    async with Server(respond) as server:
        settings = settings_for(tmp_path, [endpoint("big", server.url())])
        async with running_daemon(settings):
            baseline = rss_bytes()
            sampler = asyncio.create_task(sample())
            try:
                await insert_outbox(db, [booking(1)])
                [d] = await eventually(lambda: deliveries(db, state="succeeded"), what="success")
                await asyncio.wait_for(finished.wait(), 30)
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
    growth = peak - baseline
    print(f"{shape}: RSS baseline {baseline / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB, "
          f"growth {growth / 2**20:.1f} MiB; the receiver sent {sent / 2**20:.1f} MiB")  # fmt: skip
    [attempt] = attempts(db, d["id"])
    assert (attempt["result"], attempt["status_code"]) == ("success", 200)
    assert attempt["response_excerpt"] == "x" * settings.delivery.response_excerpt_bytes
    assert sent < HUGE_BYTES // 4  # the daemon hung up after its excerpt, long before the end
    assert growth < MAX_RSS_GROWTH_BYTES


@pytest.mark.parametrize("where", ["body", "headers"])
async def test_a_dripping_receiver_is_cut_at_the_total_timeout(tmp_path: Path, where: str) -> None:
    db = tmp_path / "webhookd.db"
    dripped = 0
    timeout_seconds = 2.0
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n"

    async def drip(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stop: asyncio.Event
    ) -> None:
        nonlocal dripped
        await read_request(reader)
        if where == "body":
            writer.write(head)
        # One byte a second: the whole answer would take minutes.
        for byte in b"x" * 100 if where == "body" else head:
            if stop.is_set() or writer.is_closing():
                return
            writer.write(bytes([byte]))
            await writer.drain()
            dripped += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    async with raw_server(drip) as port:
        settings = settings_for(
            tmp_path,
            [endpoint("slow", f"http://127.0.0.1:{port}/hook")],
            retry=ONE_ATTEMPT_RETRY,
            delivery={"timeout_seconds": timeout_seconds},
        )
        async with running_daemon(settings):
            await insert_outbox(db, [booking(1)])
            [d] = await eventually(lambda: deliveries(db, attempts=1), what="the attempt")
    [attempt] = attempts(db, d["id"])
    assert (attempt["result"], attempt["error_kind"]) == ("timeout", "read_timeout")
    assert attempt["duration_seconds"] >= timeout_seconds - 0.05  # cut no sooner than the timeout
    assert dripped < (100 if where == "body" else len(head)) // 2  # and long before the end
    assert d["state"] == "pending"
