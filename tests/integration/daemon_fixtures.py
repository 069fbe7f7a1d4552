"""Helpers for integration tests of the running daemon: import with ``from daemon_fixtures import``.

- :class:`Receiver`: a real aiohttp server on 127.0.0.1 that records every request (arrival time,
  headers, body) and answers each one as the test scripts it: a status, or "hang" (never answer
  until the receiver is released or closed). It tracks how many requests it was handling at once.
- :func:`running_daemon`: ``Daemon(settings).run()`` as a task, for the duration of a block.
- :func:`daemon_settings`: test settings (database in ``tmp_path``, fast retries, http and
  loopback addresses allowed).
- :func:`serve_on_loopback`: an aiohttp handler served on 127.0.0.1 and a free port, for
  receivers that answer in their own way.
- :func:`insert_outbox`, :func:`insert_endpoint`, :func:`query`, :func:`execute`: plain
  ``sqlite3`` on the daemon's database file, as an application would use it.
- :func:`deliveries`, :func:`attempts`, :func:`endpoint_state_row`,
  :func:`stored_endpoint_state`: what the daemon wrote there.
- :func:`eventually`: poll a condition with a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from aiohttp import web
from helpers import deep_merge
from multidict import CIMultiDict

from webhookd.daemon import Daemon
from webhookd.settings import Settings

T = TypeVar("T")

HEADER_PREFIX = "X-BookingScheduler"
DELIVERY_HEADER = f"{HEADER_PREFIX}-Delivery"
SIGNATURE_HEADER = f"{HEADER_PREFIX}-Signature"
EVENT_HEADER = f"{HEADER_PREFIX}-Event"

DAEMON_START_TIMEOUT_SECONDS = 15.0
DAEMON_STOP_TIMEOUT_SECONDS = 20.0
WAIT_TIMEOUT_SECONDS = 15.0
POLL_INTERVAL_SECONDS = 0.01
RECEIVER_SHUTDOWN_TIMEOUT_SECONDS = 2.0
SQLITE_TIMEOUT_SECONDS = 10.0

# SSRF protection refuses loopback by default: test daemons that post to receivers on
# 127.0.0.1 (or ::1) allow it explicitly.
LOOPBACK_NETWORKS = ["127.0.0.0/8", "::1/128"]

HANG: Literal["hang"] = "hang"
Answer = int | Literal["hang"]


# -- receiver --------------------------------------------------------------------------------


@dataclass
class ReceivedRequest:
    """One request as the receiver saw it."""

    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes
    arrived_at: float  # time.time() when the handler started: the daemon's clock too
    attempt_index: int  # how many earlier requests carried the same delivery id
    answer: Answer | None = None
    answered_at: float | None = None  # None while hanging (or if never answered)

    @property
    def delivery_id(self) -> str:
        return self.headers.get(DELIVERY_HEADER, "")

    @property
    def event_type(self) -> str:
        return self.headers.get(EVENT_HEADER, "")

    def json(self) -> Any:
        return json.loads(self.body)

    def signature_valid(self, secret: str) -> bool:
        """The seed scheme: lowercase hex HMAC-SHA256 of the raw body with the secret."""
        expected = hmac.new(secret.encode("utf-8"), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get(SIGNATURE_HEADER, ""), expected)


Script = Callable[[ReceivedRequest], Answer]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve_on_loopback(handler: Handler) -> tuple[web.AppRunner, int]:
    """Serve ``handler`` for every method and path on 127.0.0.1 and a free port.

    Returns the runner (``await runner.cleanup()`` stops it) and the port.
    """
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=RECEIVER_SHUTDOWN_TIMEOUT_SECONDS,
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


def per_attempt(*answers: Answer) -> Script:
    """Answer the n-th request of each delivery id with ``answers[n]`` (the last one repeats)."""

    def script(request: ReceivedRequest) -> Answer:
        return answers[min(request.attempt_index, len(answers) - 1)]

    return script


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1:<free port>; use as ``async with Receiver(...) as r``.

    ``answer`` is a fixed status or a script called with each request (after it is recorded)
    returning a status or :data:`HANG`. ``delay_seconds`` is slept before answering, so that
    requests overlap and the concurrency seen here means something.
    """

    answer: Answer | Script = 200
    delay_seconds: float = 0.0
    requests: list[ReceivedRequest] = field(default_factory=list)
    inflight: int = 0
    max_inflight: int = 0
    port: int = 0
    _release: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _runner: web.AppRunner | None = field(default=None, init=False)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def __aenter__(self) -> Receiver:
        self._runner, self.port = await serve_on_loopback(self._handle)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()

    def release(self) -> None:
        """Let every hanging request (and every later one) answer 200."""
        self._release.set()

    async def _handle(self, request: web.Request) -> web.Response:
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            body = await request.read()
            headers = CIMultiDict(request.headers)
            delivery_id = headers.get(DELIVERY_HEADER, "")
            earlier = sum(1 for r in self.requests if r.delivery_id == delivery_id)
            record = ReceivedRequest(
                method=request.method,
                path=request.path,
                headers=headers,
                body=body,
                arrived_at=time.time(),
                attempt_index=earlier,
            )
            self.requests.append(record)
            answer = self.answer(record) if callable(self.answer) else self.answer
            record.answer = answer
            if self.delay_seconds:
                await asyncio.sleep(self.delay_seconds)
            status = 200
            if answer == HANG:
                await self._release.wait()
            else:
                status = answer
            record.answered_at = time.time()
            return web.Response(status=status, text=f"answered {status}")
        finally:
            self.inflight -= 1

    # -- queries -----------------------------------------------------------------------------

    def on_path(self, path: str) -> list[ReceivedRequest]:
        return [r for r in self.requests if r.path == path]

    def answered(self) -> list[ReceivedRequest]:
        return [r for r in self.requests if r.answered_at is not None]


# -- daemon ----------------------------------------------------------------------------------


def daemon_settings(
    tmp_path: Path,
    *,
    endpoints: Sequence[Mapping[str, Any]] = (),
    http: bool = False,
    **sections: Mapping[str, Any],
) -> Settings:
    """Settings for a test daemon; ``sections`` (e.g. ``retry={"max_attempts": 3}``) override.

    The database is ``tmp_path / "webhookd.db"``; ``http=True`` listens on 127.0.0.1:0 (read
    the port from ``daemon.http.bound_port``). Retries are fast and without jitter.
    """
    base: dict[str, Any] = {
        "database": {"path": str(tmp_path / "webhookd.db")},
        "http": {"listen": "127.0.0.1:0" if http else ""},
        "delivery": {
            "allow_http": True,
            # SSRF protection refuses loopback by default; the receivers here live on it.
            "allowed_networks": LOOPBACK_NETWORKS,
            "timeout_seconds": 10.0,
            "connect_timeout_seconds": 5.0,
        },
        "retry": {
            "initial_delay_seconds": 0.2,
            "multiplier": 2.0,
            "jitter": 0.0,
            "max_attempts": 5,
        },
        "daemon": {"grace_seconds": 1.0},
        "log": {"level": "warning"},
        "endpoints": [dict(ep) for ep in endpoints],
    }
    return Settings.model_validate(deep_merge(base, sections))


@contextlib.asynccontextmanager
async def running_daemon(settings: Settings) -> AsyncIterator[Daemon]:
    """Run ``Daemon(settings).run()`` as a task; yield once it has started; stop it on exit.

    A daemon that fails to start raises its own error here. On exit the daemon is asked to
    stop and awaited (bounded), and an error it ended with is raised.
    """
    daemon = Daemon(settings)
    task = asyncio.create_task(daemon.run(), name="daemon under test")
    started = asyncio.create_task(daemon.started.wait())
    await asyncio.wait(
        {task, started}, timeout=DAEMON_START_TIMEOUT_SECONDS, return_when=asyncio.FIRST_COMPLETED
    )
    if not started.done():
        started.cancel()
        if task.done():
            task.result()  # raises the daemon's start-up error
            raise AssertionError("the daemon returned before it started")
        daemon.request_stop("test")
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, DAEMON_STOP_TIMEOUT_SECONDS)
        raise AssertionError(f"the daemon did not start within {DAEMON_START_TIMEOUT_SECONDS} s")
    try:
        yield daemon
    finally:
        daemon.request_stop("test")
        await asyncio.wait_for(task, DAEMON_STOP_TIMEOUT_SECONDS)


def http_base(daemon: Daemon) -> str:
    assert daemon.http is not None, "the daemon's HTTP port is disabled (http=True?)"
    return f"http://127.0.0.1:{daemon.http.bound_port}"


# -- waiting ---------------------------------------------------------------------------------


async def eventually(
    condition: Callable[[], T | Awaitable[T]],
    *,
    within: float = WAIT_TIMEOUT_SECONDS,
    what: str = "the condition",
) -> T:
    """Poll ``condition`` until it returns something truthy; return it. Bounded by ``within``."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if asyncio.iscoroutine(value) or isinstance(value, Awaitable):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(POLL_INTERVAL_SECONDS)


# -- the database, as an application sees it --------------------------------------------------


@contextlib.contextmanager
def connect(db_path: Path) -> Any:
    conn = sqlite3.connect(db_path, timeout=SQLITE_TIMEOUT_SECONDS)
    conn.row_factory = sqlite3.Row
    try:
        yield conn
    finally:
        conn.close()


def query(db_path: Path, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[Any]:
    with connect(db_path) as conn:
        return list(conn.execute(sql, params).fetchall())


def _execute(db_path: Path, sql: str, params: Sequence[Any] | Mapping[str, Any]) -> None:
    with connect(db_path) as conn, conn:
        conn.execute(sql, params)


async def execute(db_path: Path, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> None:
    """One statement in its own committed transaction, in a thread (see :func:`insert_outbox`)."""
    await asyncio.to_thread(_execute, db_path, sql, params)


@dataclass(frozen=True)
class OutboxRow:
    """A row to INSERT into webhook_outbox; ``payload`` is sent as given when it is text."""

    event_type: str
    payload: str | Mapping[str, Any]
    tenant: str | None = None
    event_id: str | None = None
    occurred_at: str | None = None


async def insert_outbox(db_path: Path, rows: Sequence[OutboxRow]) -> list[int]:
    """INSERT the rows in one transaction, as an application would; return their ids.

    Runs in a thread, as another process would: the daemon shares this event loop, and a write
    waiting for the daemon's lock must not stop the loop that lets the daemon release it.
    """
    return await asyncio.to_thread(_insert_outbox, db_path, rows)


def _insert_outbox(db_path: Path, rows: Sequence[OutboxRow]) -> list[int]:
    ids = []
    with connect(db_path) as conn, conn:
        for row in rows:
            payload = row.payload
            if not isinstance(payload, str):
                payload = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
            cursor = conn.execute(
                "INSERT INTO webhook_outbox (event_type, payload, tenant, event_id, occurred_at)"
                " VALUES (?, ?, ?, ?, COALESCE(?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))",
                (row.event_type, payload, row.tenant, row.event_id, row.occurred_at),
            )
            assert cursor.lastrowid is not None
            ids.append(cursor.lastrowid)
    return ids


async def insert_endpoint(
    db_path: Path,
    *,
    id: str,
    url: str,
    secret: str,
    events: str = "*",
    tenant: str | None = None,
    enabled: bool = True,
    max_concurrency: int | None = None,
) -> None:
    """INSERT a row into webhook_endpoints, as the application's settings page would."""
    await execute(
        db_path,
        "INSERT INTO webhook_endpoints (id, url, secret, events, tenant, enabled, max_concurrency)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (id, url, secret, events, tenant, int(enabled), max_concurrency),
    )


def deliveries(db_path: Path, **where: Any) -> list[Any]:
    """Rows of webhookd_deliveries (``where``: equalities on its columns) with their event's
    ``event_id``, ``event_type``, ``tenant`` and ``body``, in creation order."""
    sql = (
        "SELECT d.*, e.event_id, e.event_type, e.tenant, e.body FROM webhookd_deliveries AS d"
        " JOIN webhookd_events AS e ON e.id = d.event_pk"
    )
    if where:
        sql += " WHERE " + " AND ".join(f"d.{column} = :{column}" for column in where)
    return query(db_path, sql + " ORDER BY d.id", where)


def attempts(db_path: Path, delivery_pk: int) -> list[Any]:
    return query(
        db_path,
        "SELECT * FROM webhookd_attempts WHERE delivery_pk = ? ORDER BY attempt_no",
        (delivery_pk,),
    )


def endpoint_state_row(db_path: Path, endpoint_id: str) -> Any:
    """The endpoint's row of webhookd_endpoint_state (its circuit), or None."""
    rows = query(
        db_path, "SELECT * FROM webhookd_endpoint_state WHERE endpoint_id = ?", (endpoint_id,)
    )
    return rows[0] if rows else None


async def stored_endpoint_state(db_path: Path, endpoint_id: str, state: str) -> Any:
    """The endpoint's stored state row, once it says ``state`` (it is written just after the
    state changes in memory)."""
    return await eventually(
        lambda: (
            (row := endpoint_state_row(db_path, endpoint_id)) is not None
            and row["state"] == state
            and row
        ),
        what=f"{endpoint_id}'s stored state to be {state}",
    )
