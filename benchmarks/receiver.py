"""The benchmark's receiver: a fast aiohttp server in its own process, on a loopback port.

    .venv/bin/python benchmarks/receiver.py [--header-prefix X-BookingScheduler]

Prints its port on the first line of standard output, then serves until SIGTERM:

- ``POST /hang...``: never answers (the hanging endpoint; the client's timeout ends it);
- ``POST`` anything else: 200 with an empty body at once. Per request it notes the receive
  time (``time.time()``), the path, the ``<prefix>-Delivery`` header, the body's envelope
  ``timestamp`` (sliced out of the bytes, not parsed: the receiver shares two cores with the
  daemon) and the ``X-Bench-Sent`` header the ceiling client sets;
- ``GET /_stats``: ``{"received": n, "hangs": n, "first": t, "last": t}``;
- ``GET /_dump``: every record so far, as JSON columns;
- ``POST /_reset``: forget every record.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
import time

from aiohttp import web

_TIMESTAMP_KEY = b'"timestamp":"'
HANG_SECONDS = 600.0


class Records:
    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.times: list[float] = []
        self.paths: list[str] = []
        self.deliveries: list[str | None] = []
        self.timestamps: list[str] = []
        self.sent: list[str | None] = []
        self.hangs = 0


def make_app(header_prefix: str) -> web.Application:
    records = Records()
    delivery_header = f"{header_prefix}-Delivery"

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        path = request.path
        if path.startswith("/hang"):
            records.hangs += 1
            await asyncio.sleep(HANG_SECONDS)
            return web.Response(status=504)
        start = body.find(_TIMESTAMP_KEY)
        if start >= 0:
            start += len(_TIMESTAMP_KEY)
            timestamp = body[start : body.find(b'"', start)].decode("ascii", "replace")
        else:
            timestamp = ""
        records.times.append(now)
        records.paths.append(path)
        records.deliveries.append(request.headers.get(delivery_header))
        records.timestamps.append(timestamp)
        records.sent.append(request.headers.get("X-Bench-Sent"))
        return web.Response()

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "received": len(records.times),
                "hangs": records.hangs,
                "first": records.times[0] if records.times else None,
                "last": records.times[-1] if records.times else None,
            }
        )

    async def dump(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "times": records.times,
                "paths": records.paths,
                "deliveries": records.deliveries,
                "timestamps": records.timestamps,
                "sent": records.sent,
                "hangs": records.hangs,
            }
        )

    async def reset(request: web.Request) -> web.Response:
        records.clear()
        return web.Response()

    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_get("/_stats", stats)
    app.router.add_get("/_dump", dump)
    app.router.add_post("/_reset", reset)
    app.router.add_post("/{tail:.*}", hook)
    return app


async def serve(header_prefix: str) -> None:
    runner = web.AppRunner(make_app(header_prefix), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await web.SockSite(runner, sock, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--header-prefix", default="X-BookingScheduler")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of webhookd
        asyncio.run(serve(args.header_prefix))
    else:
        uvloop.run(serve(args.header_prefix))


if __name__ == "__main__":
    main()
