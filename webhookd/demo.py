"""``webhookd demo``: a newcomer's first command. Everything is local and temporary: a database
in a temporary folder, a receiver on a loopback port that verifies every POST with the
documentation's algorithm, the seven example events, and the daemon delivering them."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import sqlite3
import tempfile
import time
from pathlib import Path

from aiohttp import web

from webhookd import canonical_json, log
from webhookd.catalogue import SEED_EVENTS
from webhookd.daemon import Daemon
from webhookd.outbox import enqueue
from webhookd.settings import DEFAULT_HEADER_PREFIX, Settings

DEMO_TIMEOUT_SECONDS = 30.0
RECEIVER_PATH = "/webhooks/bookingscheduler"


def seed_verify(secret: str, signature: str | None, raw_body: bytes) -> bool:
    """The documentation's ``verifySignature``, in Python: HMAC-SHA256 over
    ``JSON.stringify(JSON.parse(body))``, compared in constant time (lengths must match)."""
    if signature is None:
        return False
    digest = hmac.new(
        secret.encode(), canonical_json.dumps(json.loads(raw_body)).encode(), hashlib.sha256
    ).hexdigest()
    return len(signature) == len(digest) and hmac.compare_digest(signature, digest)


class _Receiver:
    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.received: dict[str, tuple[str, bool, float]] = {}  # event type → (delivery, ok, t)
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        signature = request.headers.get(f"{DEFAULT_HEADER_PREFIX}-Signature")
        ok = seed_verify(self.secret, signature, raw)
        event = json.loads(raw).get("event", "?")
        delivery = request.headers.get(f"{DEFAULT_HEADER_PREFIX}-Delivery", "?")
        self.received[event] = (delivery, ok, time.monotonic())
        self.arrived.set()
        return web.Response(status=200 if ok else 401, text="OK" if ok else "Invalid signature")


async def run_demo() -> int:
    log.configure("warning", "logfmt")
    secret = secrets.token_hex(32)
    receiver = _Receiver(secret)
    app = web.Application()
    app.router.add_post(RECEIVER_PATH, receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}{RECEIVER_PATH}"
    try:
        with tempfile.TemporaryDirectory(prefix="webhookd-demo-") as tmp:
            return await _deliver_examples(Path(tmp) / "demo.db", url, receiver)
    finally:
        await runner.cleanup()


async def _deliver_examples(db_path: Path, url: str, receiver: _Receiver) -> int:
    # model_validate: built from these values alone, so no WEBHOOKD_* variable can redirect it.
    settings = Settings.model_validate(
        {
            "database": {"path": db_path},
            "http": {"listen": ""},
            # The demo's own receiver is on loopback, which SSRF protection refuses by default.
            "delivery": {"allow_http": True, "allowed_networks": ["127.0.0.0/8"]},
            "retry": {"initial_delay_seconds": 0.5, "max_attempts": 3},
            "endpoints": [{"id": "demo-receiver", "url": url, "secret": receiver.secret}],
        }
    )
    print("webhookd demo")
    print(f"  database: {db_path} (temporary)")
    print(f"  receiver: {url}")
    print("            verifies each POST as the documentation does:")
    print("            HMAC-SHA256(secret, JSON.stringify(body)) == X-BookingScheduler-Signature")
    print()
    daemon = Daemon(settings)
    task = asyncio.create_task(daemon.run())
    try:
        await _wait_started(daemon, task)
        # In a thread, as the application's own process would be: a blocking sqlite3 call on
        # this loop would stall the daemon, which shares it, and could wait on its lock.
        await asyncio.to_thread(_enqueue_examples, db_path)
        enqueued_at = time.monotonic()
        print(f"enqueued {len(SEED_EVENTS)} events in one transaction; delivering...")
        deadline = enqueued_at + DEMO_TIMEOUT_SECONDS
        while len(receiver.received) < len(SEED_EVENTS) and time.monotonic() < deadline:
            receiver.arrived.clear()
            try:
                await asyncio.wait_for(receiver.arrived.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
    finally:
        daemon.request_stop()
        await task
    print()
    verified = 0
    for event_type, _description, _, _ in SEED_EVENTS:
        got = receiver.received.get(event_type)
        if got is None:
            print(f"  ✗ {event_type:<18} not delivered within {DEMO_TIMEOUT_SECONDS:g} s")
            continue
        delivery, ok, at = got
        verified += ok
        mark, verdict = ("✓", "delivered, signature verified") if ok else ("✗", "BAD SIGNATURE")
        took = (at - enqueued_at) * 1000
        print(f"  {mark} {event_type:<18} {verdict}  {delivery}  {took:5.0f} ms")
    print()
    print(f"{verified} of {len(SEED_EVENTS)} events delivered and verified.")
    if verified == len(SEED_EVENTS):
        print("Next: copy config.example.toml, point an endpoint at your receiver, `webhookd run`.")
        return 0
    return 1


def _enqueue_examples(db_path: Path) -> None:
    conn = sqlite3.connect(db_path, timeout=10.0)
    try:
        with conn:  # one transaction, as an application would do it
            for event_type, _, occurred_at, data in SEED_EVENTS:
                enqueue(conn, event_type, data, tenant="org_demo", occurred_at=occurred_at)
    finally:
        conn.close()


async def _wait_started(daemon: Daemon, task: asyncio.Task[None]) -> None:
    started = asyncio.create_task(daemon.started.wait())
    await asyncio.wait([started, task], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        await task  # raises the reason it could not start
        raise RuntimeError("the daemon stopped before it started")
