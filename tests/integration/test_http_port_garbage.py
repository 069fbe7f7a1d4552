"""The monitoring port under hostile clients: raw TCP sockets against a running daemon.

Random bytes, malformed requests, a huge request line, huge or countless headers, huge bodies,
unknown methods, HTTP/0.9 and HTTP/2 prefaces, slowloris clients and hundreds of idle
connections. Garbage gets a 4xx or a closed connection (never a 5xx), only /healthz, /readyz
and /metrics answer (any other path 404, any other method 405), and afterwards the three still
answer. Fending off garbage writes no unstructured log lines (tracebacks on stderr): the
daemon's logs stay one structured event per line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from daemon_fixtures import daemon_settings, running_daemon
from helpers import rss_bytes

from webhookd.daemon import Daemon

READ_TIMEOUT_SECONDS = 2.0
DRAIN_TIMEOUT_SECONDS = 2.0
SEED = 20240115
PATHS = ("/healthz", "/readyz", "/metrics")
STATUS_RE = re.compile(rb"HTTP/\d(?:\.\d)? (\d{3}) ")
STATUS_LINE_RE = re.compile(rb"HTTP/1\.\d (\d{3}) ")
MEGABYTE = 1024 * 1024


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: the connection closed (or went quiet) without a response
    raw: bytes

    def header(self, name: str) -> str | None:
        head = self.raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        for line in head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


def _complete(buffer: bytes) -> bool:
    head, sep, body = buffer.partition(b"\r\n\r\n")
    if not sep:
        return False
    length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    return length is None or len(body) >= int(length.group(1))


async def exchange(
    port: int, data: bytes | Iterable[bytes], *, read_timeout: float = READ_TIMEOUT_SECONDS
) -> Answer:
    """Send ``data`` (bytes, or chunks written one after another while the server reads) on a
    new connection and read one response, bounded. The write may be cut short by the server."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    buffer = b""
    try:
        try:
            for chunk in [data] if isinstance(data, bytes) else data:
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), DRAIN_TIMEOUT_SECONDS)
        except (ConnectionError, TimeoutError):
            pass  # refused mid-way: what did it answer?
        with contextlib.suppress(ConnectionError, TimeoutError):
            while not _complete(buffer):
                chunk = await asyncio.wait_for(reader.read(65536), read_timeout)
                if not chunk:
                    break
                buffer += chunk
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    match = STATUS_RE.match(buffer)
    return Answer(int(match.group(1)) if match else None, buffer)


def request(method: str, target: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def gather_bounded(coros: Iterable[Awaitable[Answer]], limit: int) -> list[Answer]:
    """Await them all, at most ``limit`` at a time (each is one connection)."""
    semaphore = asyncio.Semaphore(limit)

    async def one(coro: Awaitable[Answer]) -> Answer:
        async with semaphore:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


async def assert_healthy(daemon: Daemon) -> None:
    """The three paths answer a real client, and the daemon is still running."""
    assert daemon.http is not None
    base = f"http://127.0.0.1:{daemon.http.bound_port}"
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for path in PATHS:
            async with session.get(base + path) as response:
                text = await response.text()
                assert response.status == 200, (path, response.status, text)
        async with session.get(base + "/metrics") as response:
            assert "webhookd_build_info" in await response.text()
    assert daemon.dispatcher.crashed is None
    assert not daemon.stop_event.is_set()


def unstructured(records: Iterable[logging.LogRecord]) -> list[str]:
    """Records a real daemon would write outside its structured log (only the ``webhookd``
    loggers are formatted as one event per line), or with a traceback, at warning or above."""
    return [
        f"{r.name} {r.levelname} {r.getMessage()}"
        for r in records
        if r.levelno >= logging.WARNING and (not r.name.startswith("webhookd") or r.exc_info)
    ]


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    async with running_daemon(daemon_settings(tmp_path, http=True)) as running:
        yield running


def port_of(daemon: Daemon) -> int:
    assert daemon.http is not None
    assert daemon.http.bound_port is not None
    return daemon.http.bound_port


# -- paths and methods -----------------------------------------------------------------------------


def _random_paths(rng: random.Random, count: int) -> list[str]:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_~.!$&'()*+,;=:@/"
    return ["/x" + "".join(rng.choices(alphabet, k=rng.randint(0, 40))) for _ in range(count)]


UNKNOWN_PATHS = [
    "/", "/index.html", "/healthz/", "/HEALTHZ", "/Metrics", "//healthz", "/healthz%00",
    "/healthz%2f", "/metrics.txt", "/readyz/x", "/readyzz", "/admin", "/debug/pprof",
    "/api/v1/deliveries", "/.env", "/favicon.ico", "/server-status", "/%2e%2e/%2e%2e/etc/passwd",
]  # fmt: skip
OTHER_METHODS = ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"]


async def test_only_the_three_paths_answer_and_only_to_get(daemon: Daemon) -> None:
    port = port_of(daemon)
    rng = random.Random(SEED)
    found = await gather_bounded(
        [exchange(port, request("GET", path)) for path in PATHS]
        + [exchange(port, request("GET", path + "?verbose=1&x=%00")) for path in PATHS]
        + [exchange(port, request("HEAD", path)) for path in PATHS],
        limit=20,
    )
    assert [a.status for a in found] == [200] * len(found), [a.raw[:80] for a in found]
    assert b'"status": "ok"' in found[0].raw
    assert b'"status": "ready"' in found[1].raw

    unknown = UNKNOWN_PATHS + _random_paths(rng, 40)
    missing = await gather_bounded(
        [exchange(port, request(m, path)) for path in unknown for m in ("GET", "POST")], limit=20
    )
    for (path, method), answer in zip(
        [(p, m) for p in unknown for m in ("GET", "POST")], missing, strict=True
    ):
        assert answer.status == 404, (method, path, answer.raw[:120])

    wrong = await gather_bounded(
        [
            exchange(port, request(m, path, "Content-Length: 4", body=b"ping"))
            for path in PATHS
            for m in OTHER_METHODS
        ],
        limit=20,
    )
    for answer in wrong:
        assert answer.status == 405, answer.raw[:120]
        assert answer.header("Allow") == "GET,HEAD"
    await assert_healthy(daemon)


# -- garbage ---------------------------------------------------------------------------------------

MALFORMED = [
    b"\x00" * 64,
    b"\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(32)),  # a TLS ClientHello
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # the HTTP/2 preface
    b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    b"G@T /healthz HTTP/1.1\r\n\r\n",
    b"FOO /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/3.7\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nNoColon\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\n leading: space\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n"
    b"\r\n0\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET /healthz\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /heal\rthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nX-Bad\x01Name: a\r\n\r\n",
    b"GET /healthz HTTP/1.1\nHost: x\n\n\x7f\x80\xff",
]  # fmt: skip
# Old or odd protocol versions on a real path: answered or refused, but never a 5xx.
ODD_VERSIONS = [
    b"GET /healthz\r\n\r\n",  # HTTP/0.9
    b"GET /metrics HTTP/1.0\r\n\r\n",
    b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n",
    b"GET /readyz HTTP/0.9\r\n\r\n",
]


def _random_garbage(rng: random.Random, count: int) -> list[bytes]:
    out = []
    for i in range(count):
        if i % 3 == 0:
            out.append(rng.randbytes(rng.randint(1, 2048)) + b"\r\n\r\n")
        elif i % 3 == 1:
            token = "".join(rng.choices("GETPOSTXYZ@ /\t\x00", k=rng.randint(1, 12)))
            target = "".join(rng.choices("/abc%?#\\\x7f ", k=rng.randint(0, 30)))
            version = rng.choice(["HTTP/1.1", "HTTP/9.9", "HTTP/1", "HTTPS/1.1", "", "http/1.1"])
            out.append(f"{token} {target} {version}\r\n\r\n".encode("latin-1"))
        else:
            head = b"GET /healthz HTTP/1.1\r\n"
            junk = bytes(rng.choice(b"\x00\x01\r\n:\t abcXYZ\x7f\xff") for _ in range(200))
            out.append(head + junk + b"\r\n\r\n")
    return out


async def test_garbage_gets_a_4xx_or_nothing_and_the_port_survives(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    port = port_of(daemon)
    garbage = MALFORMED + _random_garbage(random.Random(SEED), 150)
    answers = await gather_bounded([exchange(port, g) for g in garbage], limit=40)
    for data, answer in zip(garbage, answers, strict=True):
        assert answer.status is None or 400 <= answer.status < 500, (data[:80], answer.raw[:200])
    odd = await gather_bounded([exchange(port, g) for g in ODD_VERSIONS], limit=10)
    for data, answer in zip(ODD_VERSIONS, odd, strict=True):
        assert answer.status is None or answer.status < 500, (data, answer.raw[:200])
    assert unstructured(caplog.records) == []
    await assert_healthy(daemon)


async def test_huge_request_lines_headers_and_bodies_are_refused_or_drained(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    port = port_of(daemon)
    huge = [
        b"GET /" + b"a" * 64 * 1024 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz?" + b"q" * MEGABYTE + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 64 * 1024 + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nX-" + b"n" * MEGABYTE + b": a\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n"
        + b"".join(b"X-%d: a\r\n" % i for i in range(20_000))
        + b"\r\n",
        b"GET /healthz HTTP/1.1\r\nCookie: " + b"c=1; " * 20_000 + b"\r\n\r\n",
    ]
    answers = await gather_bounded([exchange(port, h) for h in huge], limit=6)
    for data, answer in zip(huge, answers, strict=True):
        assert answer.status is None or 400 <= answer.status < 500, (data[:60], answer.raw[:200])

    rss_before = rss_bytes()
    chunk = b"a" * 65536
    body_total = 64 * MEGABYTE
    bodies = {
        # The handlers never read a body: it is drained or the connection dropped, not stored.
        "metrics": (b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n",
                    chunk, {200, None}),
        "post": (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n",
                 chunk, {405, 413, None}),
        "chunked": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                    b"10000\r\n" + chunk + b"\r\n", {200, None}),
    }  # fmt: skip
    for name, (head, piece, allowed) in bodies.items():
        pieces = [head] + [piece] * (body_total // len(piece))
        answer = await exchange(port, pieces)
        assert answer.status in allowed, (name, answer.raw[:200])
    # A body of many megabytes leaves no trace in memory (a loose bound: the allocator keeps
    # some, and the test process shares it).
    assert rss_bytes() - rss_before < 32 * MEGABYTE
    assert unstructured(caplog.records) == []
    await assert_healthy(daemon)


# -- slow and many clients -------------------------------------------------------------------------

SLOW_CLIENTS = 50
IDLE_CLIENTS = 300
SLOW_SECONDS = 2.0
SLOW_STEP_SECONDS = 0.05


async def _slowloris(port: int, stop: asyncio.Event) -> None:
    """A request whose headers trickle in a byte at a time and never end (until ``stop``)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        trickle = b"X-a: b\r\n"
        sent = 0
        while not stop.is_set():
            writer.write(trickle[sent % len(trickle) :][:1])
            sent += 1
            await asyncio.wait_for(writer.drain(), DRAIN_TIMEOUT_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SLOW_STEP_SECONDS)
    except (ConnectionError, TimeoutError):
        pass  # the server may give up on a slow client: that is fine too
    finally:
        writer.close()


async def test_slow_and_idle_clients_do_not_starve_the_port(daemon: Daemon) -> None:
    port = port_of(daemon)
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(IDLE_CLIENTS)]
    stop = asyncio.Event()
    slow = [asyncio.create_task(_slowloris(port, stop)) for _ in range(SLOW_CLIENTS)]
    try:
        await asyncio.sleep(SLOW_STEP_SECONDS * 4)  # the slow clients are mid-request
        answers = await gather_bounded(
            [exchange(port, request("GET", PATHS[i % 3])) for i in range(150)], limit=50
        )
        assert [a.status for a in answers] == [200] * len(answers)
        await asyncio.sleep(SLOW_SECONDS)
        await assert_healthy(daemon)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*slow), SLOW_SECONDS + DRAIN_TIMEOUT_SECONDS * 2)
        for _, writer in idle:
            writer.close()
    await assert_healthy(daemon)


async def test_garbage_after_pipelined_requests_ends_only_that_connection(daemon: Daemon) -> None:
    """Requests pipelined on one keep-alive connection are answered in order; garbage sent
    after them gets a 400 and ends that connection, and takes nothing else down."""
    port = port_of(daemon)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def read_until(count: int) -> bytes:
        received = b""
        with contextlib.suppress(TimeoutError):
            while len(STATUS_LINE_RE.findall(received)) < count:
                chunk = await asyncio.wait_for(reader.read(65536), READ_TIMEOUT_SECONDS)
                if not chunk:
                    break
                received += chunk
        return received

    try:
        writer.write(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        await writer.drain()
        first = await read_until(3)
        writer.write(b"\x00\x01garbage\r\n\r\n")
        await writer.drain()
        second = await read_until(1)
        eof = await asyncio.wait_for(reader.read(), READ_TIMEOUT_SECONDS)
    finally:
        writer.close()
    assert [int(s) for s in STATUS_LINE_RE.findall(first)] == [200, 200, 404], first[:400]
    assert [int(s) for s in STATUS_LINE_RE.findall(second)] == [400], second[:400]
    assert eof == b""  # the server closed the connection
    await assert_healthy(daemon)
