"""Helpers for tests: import as ``from helpers import free_port`` (tests/ is on sys.path).

pytest puts tests/ on sys.path because tests/conftest.py sits in a directory without an
``__init__.py`` (the default "prepend" import mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

from aiohttp import web

SEED_RECEIVER_PATH = "/webhooks/bookingscheduler"
RECEIVER_STOP_TIMEOUT_SECONDS = 5.0
WAIT_FOR_TIMEOUT_SECONDS = 10.0
POLL_INTERVAL_SECONDS = 0.02

_LISTENING_LINE = re.compile(r"^LISTENING (\d+)$")

Record = dict[str, Any]
# A record count to reach, or a predicate over all records so far.
Until = int | Callable[[list[Record]], object]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (another process may take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_bytes() -> int:
    """This process's resident set size (VmRSS), in bytes: Linux only."""
    with open("/proc/self/status", encoding="ascii") as status_file:
        for line in status_file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# -- TOML config files -----------------------------------------------------------------------------


def _toml_key(key: str) -> str:
    if key and all(c.isalnum() or c in "_-" for c in key) and key.isascii():
        return key
    return json.dumps(key, ensure_ascii=False)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        # A JSON string without \uXXXX surrogate escapes is a valid TOML basic string.
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + inner + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_text(config: Mapping[str, Any]) -> str:
    """``{"section": {...}, "endpoints": [{...}, ...]}`` as TOML text."""
    lines: list[str] = []
    for section, body in config.items():
        if section == "endpoints":
            continue
        lines.append(f"[{_toml_key(section)}]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in body.items()]
        lines.append("")
    for endpoint in config.get("endpoints", ()):
        lines.append("[[endpoints]]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in endpoint.items()]
        lines.append("")
    return "\n".join(lines)


def deep_merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides``: a mapping merges into a dict of the same key, anything else
    replaces it."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class ThreadedAioServer:
    """An aiohttp application on 127.0.0.1 and a free port, served by its own thread and event
    loop, so that a test that blocks (subprocesses, sqlite3, psycopg) can run beside it.
    ``routes`` adds the handlers; they run on ``loop``."""

    def __init__(
        self,
        routes: Callable[[web.Application], None],
        *,
        backlog: int = 128,
        timeout_seconds: float = 10.0,
    ) -> None:
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._routes = routes
        self._backlog = backlog
        self._timeout = timeout_seconds
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="aiohttp-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_seconds) or self._error or not self.port:
            raise AssertionError(f"the aiohttp server did not start: {self._error!r}")

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._setup())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    async def _setup(self) -> None:
        app = web.Application()
        self._routes(app)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=self._backlog)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        if self._runner is not None and self.loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop)
            with contextlib.suppress(Exception):
                future.result(self._timeout)
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(self._timeout)
        if not self._thread.is_alive():
            self.loop.close()


class SeedReceiver:
    """A running ``node tests/node/seed_receiver.js``: the documentation's own receiver code.

    ``records()`` are the JSON lines the receiver wrote, one per response it sent, with
    ``status``, ``path``, ``headers`` (lower-case names), ``body`` (as express.json parsed it;
    None when the seed's route did not run), ``received_at`` (epoch seconds, float) and
    ``verified`` (status == 200). A record is written on the response's 'finish' event, which
    may come just after the client saw the response: use ``wait_for``, not ``records()`` alone.
    """

    def __init__(self, process: subprocess.Popen[str], record_file: Path, secret: str) -> None:
        self.process = process
        self.record_file = record_file
        self.secret = secret
        self.port = 0  # set from the LISTENING line
        self._output: list[str] = []
        self._done_starting = threading.Event()
        assert process.stdout is not None
        self._reader = threading.Thread(
            target=self._read_output, args=(process.stdout,), daemon=True
        )
        self._reader.start()

    @property
    def url(self) -> str:
        """The seed route's URL, ``http://127.0.0.1:PORT/webhooks/bookingscheduler``."""
        return f"http://127.0.0.1:{self.port}{SEED_RECEIVER_PATH}"

    def _read_output(self, stream: IO[str]) -> None:
        for line in stream:
            self._output.append(line)
            match = _LISTENING_LINE.match(line.strip())
            if match and not self.port:
                self.port = int(match.group(1))
                self._done_starting.set()
        self._done_starting.set()  # EOF: the process is gone; wake whoever waits to start

    def wait_until_listening(self, timeout: float) -> bool:
        """Block until the LISTENING line (True) or exit/timeout (False)."""
        self._done_starting.wait(timeout)
        return bool(self.port) and self.process.poll() is None

    def output(self) -> str:
        """Everything the receiver printed so far (stdout and stderr)."""
        return "".join(self._output)

    def records(self) -> list[Record]:
        """The records written so far, oldest first (complete lines only)."""
        try:
            text = self.record_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        # Split on "\n" only: str.splitlines also splits at U+2028/U+2029, which JSON.stringify
        # leaves raw inside strings. The piece after the last "\n" is an unfinished line.
        return [json.loads(line) for line in text.split("\n")[:-1] if line]

    def _check(self, until: Until) -> list[Record] | None:
        records = self.records()
        done = len(records) >= until if isinstance(until, int) else until(records)
        return records if done else None

    def _waiting_failed(self, until: Until, timeout: float, why: str) -> AssertionError:
        wanted = f"{until} records" if isinstance(until, int) else getattr(until, "__name__", until)
        return AssertionError(
            f"seed receiver: {why} while waiting up to {timeout}s for {wanted}; records so far:"
            f" {json.dumps(self.records(), indent=1)}\nreceiver output:\n{self.output()}"
        )

    # A polling helper's own timeout reads better in tests than an asyncio.timeout block.
    async def wait_for(
        self,
        until: Until,
        timeout: float = WAIT_FOR_TIMEOUT_SECONDS,  # noqa: ASYNC109
    ) -> list[Record]:
        """Poll until there are ``until`` records (int) or ``until(records)`` is true.

        Returns all records; raises AssertionError on timeout or if the receiver exited.
        Sleeps with asyncio between polls, so senders on the same event loop keep running.
        """
        deadline = time.monotonic() + timeout
        while (records := self._check(until)) is None:
            if self.process.poll() is not None:
                raise self._waiting_failed(until, timeout, "the receiver exited")
            if time.monotonic() >= deadline:
                raise self._waiting_failed(until, timeout, "timed out")
            await asyncio.sleep(POLL_INTERVAL_SECONDS)
        return records

    def wait_for_sync(
        self, until: Until, timeout: float = WAIT_FOR_TIMEOUT_SECONDS
    ) -> list[Record]:
        """``wait_for`` for synchronous tests (e.g. webhookd running as a subprocess)."""
        deadline = time.monotonic() + timeout
        while (records := self._check(until)) is None:
            if self.process.poll() is not None:
                raise self._waiting_failed(until, timeout, "the receiver exited")
            if time.monotonic() >= deadline:
                raise self._waiting_failed(until, timeout, "timed out")
            time.sleep(POLL_INTERVAL_SECONDS)
        return records

    def stop(self) -> None:
        """Terminate the receiver (kill it if it lingers); safe to call more than once."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(RECEIVER_STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(RECEIVER_STOP_TIMEOUT_SECONDS)
        if self.process.stdout is not None:
            with contextlib.suppress(OSError):
                self.process.stdout.close()


class StartSeedReceiver(Protocol):
    """The type of the ``seed_receiver`` fixture (a factory)."""

    def __call__(
        self, secret: str, *, response_plan: Mapping[str, Any] | None = None, port: int = 0
    ) -> SeedReceiver: ...
