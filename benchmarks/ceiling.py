"""The ceiling: a plain aiohttp client posting the same bodies to the same receiver, no store.

    .venv/bin/python benchmarks/ceiling.py --base-url http://127.0.0.1:PORT --input FILE
        [--concurrency 40] [--rate 200] [--timeout 15]

``FILE`` holds one request per line: ``path<TAB>delivery id<TAB>event type<TAB>body`` (the
bodies exactly as webhookd stored them; canonical JSON has no raw tab or newline). The client
sends them in order with at most ``--concurrency`` requests in flight (one keep-alive pool, no
per-host limit, like webhookd's sender), or paced at ``--rate`` requests a second. Each request
carries the same headers as webhookd's (the signature is a fixed 64-character value: no
signing) plus ``X-Bench-Sent`` (its send time), and its response body is read.

Prints one JSON object: ``sent``, ``ok``, ``errors``, ``first_start``, ``last_end``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp

_FAKE_SIGNATURE = "0" * 64


def read_requests(path: Path) -> list[tuple[str, str, str, bytes]]:
    out = []
    with path.open("rb") as f:
        for line in f:
            p, delivery_id, event_type, body = line.rstrip(b"\n").split(b"\t", 3)
            out.append((p.decode(), delivery_id.decode(), event_type.decode(), body))
    return out


async def run(
    base_url: str,
    requests: list[tuple[str, str, str, bytes]],
    concurrency: int,
    rate: float | None,
    timeout_seconds: float,
    header_prefix: str,
    user_agent: str,
) -> dict[str, object]:
    ok = 0
    errors = 0
    first_start: float | None = None
    last_end = 0.0
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    client_timeout = aiohttp.ClientTimeout(total=timeout_seconds)

    async with aiohttp.ClientSession(
        connector=connector, auto_decompress=False, skip_auto_headers=("Accept-Encoding",)
    ) as session:

        async def post(item: tuple[str, str, str, bytes]) -> None:
            nonlocal ok, errors, first_start, last_end
            path, delivery_id, event_type, body = item
            started = time.time()
            if first_start is None:
                first_start = started
            headers = {
                "Content-Type": "application/json",
                "User-Agent": user_agent,
                f"{header_prefix}-Event": event_type,
                f"{header_prefix}-Delivery": delivery_id,
                f"{header_prefix}-Timestamp": str(int(started)),
                f"{header_prefix}-Signature": _FAKE_SIGNATURE,
                "X-Bench-Sent": repr(started),
            }
            try:
                async with session.post(
                    base_url + path,
                    data=body,
                    headers=headers,
                    allow_redirects=False,
                    timeout=client_timeout,
                ) as response:
                    await response.read()
                    if 200 <= response.status < 300:
                        ok += 1
                    else:
                        errors += 1
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
            last_end = max(last_end, time.time())

        if rate is None:
            items: Iterator[tuple[str, str, str, bytes]] = iter(requests)

            async def worker() -> None:
                for item in items:  # the iterator is shared: each item is taken once
                    await post(item)

            await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
        else:
            limit = asyncio.Semaphore(max(1, concurrency))
            t0 = time.perf_counter()
            tasks = []

            async def paced(item: tuple[str, str, str, bytes]) -> None:
                async with limit:
                    await post(item)

            for i, item in enumerate(requests):
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(paced(item)))
            await asyncio.gather(*tasks)
    return {
        "sent": len(requests),
        "ok": ok,
        "errors": errors,
        "first_start": first_start,
        "last_end": last_end,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--timeout", type=float, default=15.0)
    parser.add_argument("--header-prefix", default="X-BookingScheduler")
    parser.add_argument("--user-agent", default="webhookd-bench-ceiling")
    args = parser.parse_args()
    requests = read_requests(args.input)
    coro = run(
        args.base_url,
        requests,
        args.concurrency,
        args.rate,
        args.timeout,
        args.header_prefix,
        args.user_agent,
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of webhookd
        result = asyncio.run(coro)
    else:
        result = uvloop.run(coro)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
