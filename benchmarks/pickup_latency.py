"""Commit-to-receipt latency on an idle daemon: how promptly a new outbox row is delivered.

Starts the real ``webhookd run`` in a subprocess against a temporary SQLite database, with an
aiohttp receiver on a loopback port in this process. Events are committed one at a time, with a
pause between them so that the daemon is idle each time; the receiver notes when each arrives.

    .venv/bin/python benchmarks/pickup_latency.py [--events 200] [--interval 0.05]

Prints p50/p95/p99/max of (arrival - commit) and the share under the 100 ms target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web

TARGET_SECONDS = 0.100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def main(events: int, interval: float) -> int:
    arrivals: dict[str, float] = {}
    arrived = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        arrivals[request.headers["X-BookingScheduler-Event"]] = time.perf_counter()
        arrived.set()
        return web.Response(text="OK")

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    receiver_port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", receiver_port).start()

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        http_port = _free_port()
        config = Path(tmp) / "config.toml"
        config.write_text(
            f'[database]\npath = "{db}"\n[http]\nlisten = "127.0.0.1:{http_port}"\n'
            '[delivery]\nallow_http = true\nallowed_networks = ["127.0.0.0/8"]\n'
            '[log]\nlevel = "warning"\n'
            f'[[endpoints]]\nid = "bench"\nurl = "http://127.0.0.1:{receiver_port}/hook"\n'
            'secret = "bench-secret"\n'
        )
        exe = Path(sys.executable).parent / "webhookd"
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOKD_")}
        daemon = await asyncio.create_subprocess_exec(
            str(exe), "run", "--config", str(config), env=env
        )
        try:
            await _wait_ready(http_port)
            conn = sqlite3.connect(db, timeout=5)
            committed: dict[str, float] = {}
            for i in range(events):
                event_type = f"bench.e{i}"
                with conn:
                    conn.execute(
                        "INSERT INTO webhook_outbox (event_type, payload) VALUES (?, ?)",
                        (event_type, f'{{"i":{i}}}'),
                    )
                committed[event_type] = time.perf_counter()
                deadline = time.perf_counter() + 10
                while event_type not in arrivals and time.perf_counter() < deadline:
                    arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(arrived.wait(), 1)
                await asyncio.sleep(interval)
            conn.close()
        finally:
            daemon.send_signal(signal.SIGTERM)
            await asyncio.wait_for(daemon.wait(), 30)
            await runner.cleanup()

    latencies = sorted(arrivals[k] - committed[k] for k in committed if k in arrivals)
    if len(latencies) < events:
        print(f"only {len(latencies)} of {events} events arrived")
        return 1
    q = statistics.quantiles(latencies, n=100)
    under = sum(lat < TARGET_SECONDS for lat in latencies) / len(latencies)
    print(f"pickup latency: {events} events committed {interval * 1000:.0f} ms apart, idle daemon")
    print(
        f"  p50 {q[49] * 1000:6.1f} ms   p95 {q[94] * 1000:6.1f} ms   p99 {q[98] * 1000:6.1f} ms"
        f"   max {latencies[-1] * 1000:6.1f} ms"
    )
    print(f"  under the {TARGET_SECONDS * 1000:.0f} ms target: {under:.1%}")
    return 0


async def _wait_ready(port: int) -> None:
    from aiohttp import ClientSession

    deadline = time.monotonic() + 30
    async with ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("the daemon did not become ready within 30 s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.05)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.events, args.interval)))
