"""sd_notify against a real AF_UNIX datagram socket, as systemd would listen on it.

The sequence tests run the installed ``webhookd run`` with ``NOTIFY_SOCKET`` (a filesystem path
or an abstract ``@name``) and ``WATCHDOG_USEC`` set, read every datagram it sends, and drive it
with real signals: READY=1 once it serves /readyz, WATCHDOG=1 again and again, RELOADING=1 with
a CLOCK_MONOTONIC time then READY=1 on SIGHUP, STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import free_port

from webhookd.systemd import Notifier, socket_address, watchdog_interval_seconds

WEBHOOKD = Path(sys.executable).parent / "webhookd"
MESSAGE_TIMEOUT_SECONDS = 30.0
EXIT_TIMEOUT_SECONDS = 30.0
READ_POLL_SECONDS = 0.2
WATCHDOG_USEC = 300_000  # pings every 0.15 s
WATCHDOG_PINGS_WANTED = 3
MAX_SUN_PATH = 107  # sockaddr_un.sun_path, minus the terminating NUL


# -- a systemd stand-in: the listening end of NOTIFY_SOCKET ------------------------------------


@dataclass(frozen=True)
class Message:
    fields: dict[str, str]
    raw: str

    def has(self, key: str, value: str | None = None) -> bool:
        return key in self.fields and (value is None or self.fields[key] == value)


class NotifyListener:
    """Reads datagrams on a bound AF_UNIX socket in a thread; tests wait for them in order."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value  # what NOTIFY_SOCKET is set to
        self.received: list[Message] = []
        self._queue: queue.Queue[Message] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self.sock.settimeout(READ_POLL_SECONDS)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            raw = data.decode("utf-8", "replace")
            fields = dict(line.split("=", 1) for line in raw.split("\n") if "=" in line)
            message = Message(fields, raw)
            self.received.append(message)
            self._queue.put(message)

    def next_matching(
        self,
        predicate: Callable[[Message], bool],
        *,
        what: str,
        skipped: list[Message] | None = None,
        timeout: float = MESSAGE_TIMEOUT_SECONDS,
    ) -> Message:
        """The next message for which ``predicate`` holds; earlier ones go to ``skipped``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no {what} within {timeout} s; received: {[m.raw for m in self.received]}"
                )
            try:
                message = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if predicate(message):
                return message
            if skipped is not None:
                skipped.append(message)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(READ_POLL_SECONDS * 10)
        self.sock.close()


def _bind(kind: str) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "abstract":
        name = f"webhookd-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        return sock, "@" + name
    # A short directory: sun_path holds at most 107 bytes, less than some tmp_path values.
    directory = tempfile.mkdtemp(prefix="wh-notify-")
    path = os.path.join(directory, "notify.sock")
    assert len(path.encode()) <= MAX_SUN_PATH
    sock.bind(path)
    return sock, path


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest) -> Iterator[NotifyListener]:
    sock, env_value = _bind(request.param)
    notify = NotifyListener(sock, env_value)
    try:
        yield notify
    finally:
        notify.close()
        if not env_value.startswith("@"):
            with contextlib.suppress(OSError):
                os.unlink(env_value)
                os.rmdir(os.path.dirname(env_value))


# -- the daemon as a subprocess ------------------------------------------------------------------


def _environ(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith("WEBHOOKD_")
        and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    }
    env.update(extra)
    return env


def _write_config(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "webhookd.toml"
    dead = f"http://127.0.0.1:{free_port()}/hook"
    config.write_text(
        f"""
[database]
path = "{tmp_path / "webhookd.db"}"
[http]
listen = "127.0.0.1:{port}"
[delivery]
allow_http = true
allowed_networks = ["127.0.0.0/8", "::1/128"]
[daemon]
grace_seconds = 2.0
[log]
format = "json"

[[endpoints]]
id = "first"
url = "{dead}"
secret = "notify-test-secret"
""",
        encoding="utf-8",
    )
    return config


class Daemon:
    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.config = _write_config(tmp_path, self.port)
        self.stdout_path = tmp_path / "stdout.log"
        self.stderr_path = tmp_path / "stderr.log"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.popen = subprocess.Popen(
                [str(WEBHOOKD), "run", "--config", str(self.config)],
                env=_environ(**env),
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

    def output(self) -> str:
        return (
            f"--- stdout ---\n{self.stdout_path.read_text(errors='replace')}\n"
            f"--- stderr ---\n{self.stderr_path.read_text(errors='replace')}"
        )

    def log_events(self) -> list[dict[str, object]]:
        lines = self.stdout_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def readyz(self) -> int | None:
        url = f"http://127.0.0.1:{self.port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=2.0) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            exc.close()
            return exc.code
        except (urllib.error.URLError, OSError):
            return None

    def wait_exit(self) -> int:
        try:
            return self.popen.wait(EXIT_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(f"webhookd did not exit\n{self.output()}") from None

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Daemon]]:
    started: list[Daemon] = []

    def start(env: dict[str, str]) -> Daemon:
        daemon = Daemon(tmp_path, env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


def _is_ready(m: Message) -> bool:
    return m.has("READY", "1")


# -- the whole conversation, on a path socket and an abstract one -------------------------------


def test_daemon_tells_systemd_ready_watchdog_reloading_and_stopping(
    listener: NotifyListener, start_daemon: Callable[[dict[str, str]], Daemon], tmp_path: Path
) -> None:
    daemon = start_daemon(
        {"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    )
    before_ready: list[Message] = []
    ready = listener.next_matching(_is_ready, what="READY=1", skipped=before_ready)
    # READY=1 comes only once everything is up: the port answers and the tables exist.
    assert daemon.readyz() == 200, daemon.output()
    with contextlib.closing(sqlite3.connect(tmp_path / "webhookd.db")) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"webhookd_deliveries", "webhook_outbox"} <= tables
    assert not any(m.has("READY") for m in before_ready)
    status = ready.fields.get("STATUS", "")
    for part in ("1 of 1 endpoints active", "pending", "in flight", "outbox lag"):
        assert part in status, status

    # The watchdog is fed again and again while the daemon runs.
    for _ in range(WATCHDOG_PINGS_WANTED):
        listener.next_matching(lambda m: m.has("WATCHDOG", "1"), what="WATCHDOG=1")

    # SIGHUP: RELOADING=1 stamped with CLOCK_MONOTONIC (system-wide, so comparable), then READY.
    sent_at_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    daemon.popen.send_signal(signal.SIGHUP)
    reloading = listener.next_matching(lambda m: m.has("RELOADING", "1"), what="RELOADING=1")
    assert int(reloading.fields["MONOTONIC_USEC"]) >= sent_at_usec
    skipped: list[Message] = []
    listener.next_matching(_is_ready, what="READY=1 after the reload", skipped=skipped)
    assert not any(m.has("STOPPING") for m in skipped)
    assert daemon.readyz() == 200

    daemon.popen.send_signal(signal.SIGTERM)
    listener.next_matching(lambda m: m.has("STOPPING", "1"), what="STOPPING=1")
    assert daemon.wait_exit() == 0, daemon.output()

    lifecycle = [
        key
        for m in listener.received
        for key in ("READY", "RELOADING", "STOPPING")
        if m.has(key, "1")
    ]
    assert lifecycle == ["READY", "RELOADING", "READY", "STOPPING"], listener.received
    assert all("\n" not in m.fields.get("STATUS", "") for m in listener.received)
    assert "notify_failed" not in [r.get("event") for r in daemon.log_events()]


def test_a_refused_reload_still_ends_with_ready(
    listener: NotifyListener, start_daemon: Callable[[dict[str, str]], Daemon]
) -> None:
    """systemd holds the unit in "reloading" until READY=1: a refused reload must send it too."""
    daemon = start_daemon({"NOTIFY_SOCKET": listener.env_value})
    listener.next_matching(_is_ready, what="READY=1")
    daemon.config.write_text("[retry]\nmax_attempts = 0\n", encoding="utf-8")
    daemon.popen.send_signal(signal.SIGHUP)
    listener.next_matching(lambda m: m.has("RELOADING", "1"), what="RELOADING=1")
    listener.next_matching(_is_ready, what="READY=1 after the refused reload")
    assert "reload_failed" in [r.get("event") for r in daemon.log_events()]
    assert daemon.readyz() == 200
    daemon.popen.send_signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0, daemon.output()


def test_status_line_follows_the_backlog(
    listener: NotifyListener, start_daemon: Callable[[dict[str, str]], Daemon], tmp_path: Path
) -> None:
    daemon = start_daemon({"NOTIFY_SOCKET": listener.env_value})
    ready = listener.next_matching(_is_ready, what="READY=1")
    assert "0 deliveries pending" in ready.fields["STATUS"], ready.raw
    db = sqlite3.connect(tmp_path / "webhookd.db", timeout=10)
    with contextlib.closing(db) as conn, conn:
        conn.execute(
            "INSERT INTO webhook_outbox (event_type, payload) VALUES (?, ?)",
            ("booking.created", '{"id": "book_status"}'),
        )
    # The endpoint refuses connections: the delivery waits for its retry and is counted.
    listener.next_matching(
        lambda m: "1 deliveries pending" in m.fields.get("STATUS", ""),
        what="a STATUS= line counting the pending delivery",
    )
    daemon.popen.send_signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0, daemon.output()


def test_unreachable_notify_socket_does_not_stop_the_daemon(
    start_daemon: Callable[[dict[str, str]], Daemon], tmp_path: Path
) -> None:
    missing = str(tmp_path / "no-such-dir" / "notify.sock")
    daemon = start_daemon({"NOTIFY_SOCKET": missing, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    deadline = time.monotonic() + MESSAGE_TIMEOUT_SECONDS
    while daemon.readyz() != 200:
        assert daemon.popen.poll() is None, daemon.output()
        assert time.monotonic() < deadline, daemon.output()
        time.sleep(0.05)
    # Several watchdog periods pass, each a failed send; the log says so once, not each time.
    time.sleep(WATCHDOG_USEC / 1_000_000 * 3)
    daemon.popen.send_signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0, daemon.output()
    failures = [r for r in daemon.log_events() if r.get("event") == "notify_failed"]
    assert len(failures) == 1, daemon.output()


# -- the notifier on its own ---------------------------------------------------------------------


def test_notify_socket_names() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@sd-notify") == b"\0sd-notify"
    assert socket_address("vsock:2:1234") is None
    assert socket_address("@") is None


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.watchdog_seconds is None
    assert notifier.ready("status") is False
    assert notifier.watchdog() is False


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_this_process_only(
    environ: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval_seconds(environ, pid=4242) == expected


def test_messages_reach_a_path_and_an_abstract_socket(listener: NotifyListener) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": listener.env_value})
    assert notifier.ready("two\nlines  of status")
    message = listener.next_matching(_is_ready, what="READY=1")
    assert message.fields["STATUS"] == "two lines of status"
    notifier.close()


async def test_watchdog_pings_stop_while_the_event_loop_is_blocked() -> None:
    """A stuck loop must starve the watchdog: the pings come from the loop, not a thread."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"webhookd-test-{uuid.uuid4().hex}"
    sock.bind("\0" + name)
    sock.setblocking(False)
    interval_usec = 40_000  # pings every 0.02 s
    notifier = Notifier.from_environ(
        {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": str(interval_usec * 2)}
    )
    pinger = asyncio.create_task(notifier.watchdog_loop())
    blocked = threading.Event()
    release = threading.Event()
    queued_while_blocked: list[bytes] = []

    def observe() -> None:
        blocked.wait(MESSAGE_TIMEOUT_SECONDS)
        time.sleep(interval_usec / 1_000_000 * 10)  # ten ping periods with the loop stuck
        with contextlib.suppress(BlockingIOError):
            while True:
                queued_while_blocked.append(sock.recv(4096))
        release.set()

    try:
        first = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), 10)
        assert first == b"WATCHDOG=1"
        observer = threading.Thread(target=observe)
        observer.start()
        with contextlib.suppress(BlockingIOError):
            while True:  # what was sent before the loop gets stuck
                sock.recv(4096)
        blocked.set()
        release.wait(MESSAGE_TIMEOUT_SECONDS)  # blocks the event loop, as a stuck coroutine would
        observer.join()
        assert queued_while_blocked == []
        again = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), 10)
        assert again == b"WATCHDOG=1", "pings must resume once the loop runs again"
    finally:
        pinger.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pinger
        notifier.close()
        sock.close()
