"""The CPU budget of one delivery: what its parts cost on this machine, measured in one run.

    .venv/bin/python benchmarks/budget.py [--requests 20000] [--deliveries 20000]

bench.py says how fast webhookd is next to a plain aiohttp client; this says why, by timing
the parts alone (CPU seconds of the process doing the work, divided by the count):

- ``client``: the ceiling's plain aiohttp client posting to the benchmark receiver (its own
  process), concurrency 40: the CPU of one bare aiohttp request, and of the receiver's answer;
- ``sender``: webhookd's :class:`~webhookd.delivery.Sender` (signing, address guard, response
  excerpt) doing the same requests in this process;
- ``pool``: the same through :class:`~webhookd.sender_pool.SenderPool` with 2 child processes:
  what is left in the daemon's process per request (the children's CPU is not counted);
- ``without HTTP``: the real dispatcher and SQLite store (fan-out, claims, records, metrics,
  signing) delivering 5,000 events x 4 endpoints to a stand-in sender that signs and answers
  200 at once: everything a delivery costs but its request;
- ``sql``: the statements one delivery needs on webhookd's own schema and queries (fan-out of
  5,000 events x 4 endpoints in 500-event transactions, claims of 64, attempts recorded 20 per
  transaction), with plain ``sqlite3`` and no Python around them: the floor of the durable
  record.

It then prints what reaching a throughput ratio of 0.80 of the ceiling would leave for
everything else a delivery needs, with the receiver on the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from webhookd.delivery import HttpResult, HttpSender, Sender  # noqa: E402
from webhookd.dispatcher import Dispatcher  # noqa: E402
from webhookd.metrics import Metrics  # noqa: E402
from webhookd.models import AttemptResult, Delivery, Endpoint  # noqa: E402
from webhookd.sender_pool import SenderPool  # noqa: E402
from webhookd.settings import DeliverySettings, load_settings  # noqa: E402
from webhookd.signing import active_secrets, request_headers  # noqa: E402
from webhookd.store import open_store  # noqa: E402
from webhookd.store.base import load_migrations, load_queries  # noqa: E402

CONCURRENCY = 40
WARM_UP = 500
BODY = json.dumps(
    {
        "event": "booking.created",
        "timestamp": "2026-11-27T10:00:00.000Z",
        "data": {"bookingId": "bk_123", "customerId": "c_456", "notes": "x" * 200},
    },
    separators=(",", ":"),
).encode()
CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


async def timed_requests(
    count: int, post: Callable[[int], Awaitable[None]], receiver_pid: int
) -> tuple[float, float, float]:
    """(requests a second, this process's CPU µs per request, the receiver's)."""
    warm = iter(range(WARM_UP))
    items = iter(range(count))

    async def worker(it: object) -> None:
        for i in it:  # type: ignore[attr-defined]
            await post(i)

    await asyncio.gather(*(worker(warm) for _ in range(CONCURRENCY)))
    receiver0 = process_cpu(receiver_pid)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(items) for _ in range(CONCURRENCY)))
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    receiver = process_cpu(receiver_pid) - receiver0
    return count / wall, 1e6 * cpu / count, 1e6 * receiver / count


async def http_parts(
    count: int, url: str, receiver_pid: int
) -> dict[str, tuple[float, float, float]]:
    out: dict[str, tuple[float, float, float]] = {}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding",),
    ) as session:
        timeout = aiohttp.ClientTimeout(total=15)

        async def plain(i: int) -> None:
            now = time.time()
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "webhookd-budget",
                "X-BookingScheduler-Event": "booking.created",
                "X-BookingScheduler-Delivery": f"dlv_{i}",
                "X-BookingScheduler-Timestamp": str(int(now)),
                "X-BookingScheduler-Signature": "0" * 64,
            }
            async with session.post(
                url, data=BODY, headers=headers, allow_redirects=False, timeout=timeout
            ) as response:
                await response.read()

        out["client"] = await timed_requests(count, plain, receiver_pid)
    settings = DeliverySettings(allow_http=True, allowed_networks=("127.0.0.0/8",))
    endpoint = Endpoint(id="budget", url=url, secret="budget-secret")
    senders: list[tuple[str, HttpSender]] = [
        ("sender", Sender(settings)),
        ("pool", SenderPool(settings, 2)),
    ]
    for name, sender in senders:
        await sender.start()
        try:

            async def via_webhookd(i: int, sender: HttpSender = sender) -> None:
                delivery = Delivery(
                    pk=i,
                    delivery_id=f"dlv_{i}",
                    endpoint_id="budget",
                    event_id=f"evt_{i}",
                    event_type="booking.created",
                    occurred_at="2026-11-27T10:00:00.000Z",
                    body=BODY,
                    attempts=0,
                    created_at=0.0,
                )
                result = await sender.send(endpoint, delivery)
                if result.status_code != 200:
                    raise RuntimeError(f"the receiver answered {result}")

            out[name] = await timed_requests(count, via_webhookd, receiver_pid)
        finally:
            await sender.close()
    return out


def sql_floor(deliveries: int) -> dict[str, float]:
    """CPU µs per delivery of fan-out, claim and record statements in plain sqlite3."""
    endpoints = 4
    events = deliveries // endpoints
    q = load_queries("sqlite")
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "budget.db", isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        for _, _, script in load_migrations("sqlite"):
            db.executescript(script)
        now = time.time()
        t0 = time.process_time()
        for start in range(0, events, 500):
            n = min(500, events - start)
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                q["insert_event"],
                [
                    (start + i + 1, start + i, f"evt_{start + i}", "booking.created", None,
                     "2026-11-27T10:00:00Z", BODY, now)
                    for i in range(n)
                ],
            )  # fmt: skip
            db.executemany(
                q["insert_delivery"],
                [
                    (f"dlv_{start + i}_{e}", start + i + 1, f"ep{e}", now, now, now)
                    for i in range(n)
                    for e in range(endpoints)
                ],
            )
            db.execute("COMMIT")
        fan_out = time.process_time() - t0
        claim = record = 0.0
        for e in range(endpoints):
            while True:
                t0 = time.process_time()
                rows = db.execute(
                    q["claim_due"],
                    {"endpoint": f"ep{e}", "now": now + 1, "leased": "[]", "limit": 64},
                ).fetchall()
                claim += time.process_time() - t0
                if not rows:
                    break
                pks = [r[0] for r in rows]
                t0 = time.process_time()
                for i in range(0, len(pks), 20):
                    chunk = pks[i : i + 20]
                    db.execute("BEGIN IMMEDIATE")
                    db.executemany(
                        q["insert_attempt"],
                        [(pk, 1, now, 0.001, "success", 200, None, "OK", None) for pk in chunk],
                    )
                    db.executemany(
                        q["update_delivery"],
                        [("succeeded", 1, None, now, 200, None, pk) for pk in chunk],
                    )
                    db.execute("COMMIT")
                record += time.process_time() - t0
        done = db.execute(
            "SELECT count(*) FROM webhookd_deliveries WHERE state = 'succeeded'"
        ).fetchone()[0]
        db.close()
    if done != events * endpoints:
        raise RuntimeError(f"{done} of {events * endpoints} deliveries recorded")
    per = 1e6 / (events * endpoints)
    return {"fan_out": fan_out * per, "claim": claim * per, "record": record * per}


class SignOnlySender:
    """Measurement only: signs each request as webhookd's Sender does, then answers "200" at
    once without a request, so that the rest of the daemon's work can be timed alone."""

    def __init__(self, settings: DeliverySettings) -> None:
        self._settings = settings

    async def start(self) -> None:
        pass

    def apply(self, settings: DeliverySettings) -> None:
        self._settings = settings

    async def close(self) -> None:
        pass

    async def send(self, endpoint: Endpoint, delivery: Delivery) -> HttpResult:
        started = time.time()
        request_headers(
            header_prefix=self._settings.header_prefix,
            secrets=active_secrets(endpoint, started),
            schemes=endpoint.schemes,
            body=delivery.body,
            event_type=delivery.event_type,
            delivery_id=delivery.delivery_id,
            timestamp=int(started),
            extra=endpoint.headers,
        )
        await asyncio.sleep(0)
        return HttpResult(started, 0.001, AttemptResult.SUCCESS, 200, None, "OK")


async def daemon_without_http(deliveries: int) -> tuple[float, float]:
    """(process CPU µs, event-loop thread CPU µs) per delivery of the real dispatcher and
    SQLite store (fan-out, claims, records, metrics, signing) with no HTTP request."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench import outbox_rows

    endpoints = 4
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "budget.toml"
        lines = [f'[database]\npath = "{tmp}/budget.db"\n[delivery]\nallow_http = true\n']
        lines += [
            f'[[endpoints]]\nid = "ep{e}"\nurl = "http://127.0.0.1:9/ep{e}"\nsecret = "s{e}"\n'
            for e in range(endpoints)
        ]
        config.write_text("".join(lines), encoding="utf-8")
        settings = load_settings(config)
        metrics = Metrics(settings.http.max_endpoint_labels)
        store = open_store(settings, metrics)
        await store.open()
        await store.migrate()
        app = sqlite3.connect(Path(tmp) / "budget.db", isolation_level=None)
        app.execute("BEGIN IMMEDIATE")
        app.executemany(
            "INSERT INTO webhook_outbox (event_type, payload) VALUES (?, ?)",
            outbox_rows(deliveries // endpoints),
        )
        app.execute("COMMIT")
        dispatcher = Dispatcher(settings, store, SignOnlySender(settings.delivery), metrics)
        cpu0, thread0 = time.process_time(), time.thread_time()
        await dispatcher.start()
        want = (deliveries // endpoints) * endpoints
        while True:
            await asyncio.sleep(0.02)
            done = app.execute(
                "SELECT count(*) FROM webhookd_deliveries WHERE state = 'succeeded'"
            ).fetchone()[0]
            if done >= want:
                break
        cpu, thread = time.process_time() - cpu0, time.thread_time() - thread0
        await dispatcher.drain(1.0)
        await store.close()
        app.close()
    return 1e6 * cpu / want, 1e6 * thread / want


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--deliveries", type=int, default=20_000)
    args = parser.parse_args()
    import uvloop

    receiver = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "receiver.py")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        url = f"http://127.0.0.1:{int(receiver.stdout.readline())}/ep/budget"
        http = uvloop.run(http_parts(args.requests, url, receiver.pid))
    finally:
        receiver.terminate()
        receiver.wait()
    sql = sql_floor(args.deliveries)
    daemon_cpu, loop_cpu = uvloop.run(daemon_without_http(args.deliveries))
    cores = os.cpu_count() or 1
    print(f"CPU per request or delivery, {cores} CPUs, one run (µs of CPU; rate in requests/s)")
    print(f"{'part':<44}{'µs':>8}{'rate':>10}{'receiver µs':>13}")
    names = {
        "client": "plain aiohttp client (the ceiling)",
        "sender": "webhookd Sender, in this process",
        "pool": "webhookd SenderPool(2): this process only",
    }
    for key, label in names.items():
        rate, cpu, receiver = http[key]
        print(f"{label:<44}{cpu:>8.1f}{rate:>10.0f}{receiver:>13.1f}")
    for key, value in sql.items():
        print(
            f"{'SQLite ' + key.replace('_', '-') + ' statements (sqlite3 alone)':<44}{value:>8.1f}"
        )
    label = "webhookd without HTTP (whole process)"
    print(f"{label:<44}{daemon_cpu:>8.1f}")
    label = "  of which its event-loop thread"
    print(f"{label:<44}{loop_cpu:>8.1f}")
    ceiling_rate, client_cpu, receiver_cpu = http["client"]
    sql_total = sum(sql.values())
    target = 0.8 * ceiling_rate
    budget = (min(cores, 2) - target * receiver_cpu / 1e6) / target * 1e6
    rest = budget - client_cpu - sql_total
    print(
        f"\nAt 0.80 of the ceiling ({target:.0f}/s) the receiver takes "
        f"{target * receiver_cpu / 1e6:.2f} cores, leaving {budget:.0f} µs of CPU per delivery "
        f"on {min(cores, 2)} cores for all of webhookd: the aiohttp request alone takes "
        f"{client_cpu:.0f}, the SQL {sql_total:.0f}, which leaves {rest:.0f} µs for parsing, "
        "validating, canonicalising, routing, signing, scheduling and handing over between "
        "threads or processes."
    )
    print(
        f"webhookd's work besides the request costs {daemon_cpu:.0f} µs per delivery "
        f"({daemon_cpu - sql_total:.0f} µs beyond the bare SQL); with the request, "
        f"{daemon_cpu + http['sender'][1]:.0f} µs in one process, against {budget:.0f}."
    )


if __name__ == "__main__":
    main()
