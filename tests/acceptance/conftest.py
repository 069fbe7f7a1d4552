"""Fixtures for the acceptance tier: the installed ``webhookd`` command as a subprocess.

A :class:`Workspace` is one directory with a TOML config, an SQLite database path and a free
loopback port for ``http.listen``. It runs ``webhookd`` commands (``ws.cli(...)``), starts
``webhookd run`` (``ws.start()``, stdout and stderr captured to files, ready once ``/readyz``
answers 200), reads and writes the database with ``sqlite3`` the way an application would, and
kills whatever it started at teardown. Every subprocess gets an environment without
``WEBHOOKD_*`` variables, so the developer's own settings never leak in.

``aio_receiver`` starts aiohttp receivers inside the test process (each on its own thread and
event loop, so synchronous tests can drive subprocesses while the receiver answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers import ThreadedAioServer, deep_merge, free_port, toml_text

WEBHOOKD = Path(sys.executable).parent / "webhookd"

CLI_TIMEOUT_SECONDS = 60.0
READY_TIMEOUT_SECONDS = 30.0
EXIT_TIMEOUT_SECONDS = 30.0
KILL_WAIT_SECONDS = 10.0
WAIT_TIMEOUT_SECONDS = 30.0
POLL_SECONDS = 0.05
HTTP_PROBE_TIMEOUT_SECONDS = 2.0
RECEIVER_TIMEOUT_SECONDS = 10.0
HEADER_PREFIX = "X-BookingScheduler"


def clean_environ(**extra: str) -> dict[str, str]:
    """``os.environ`` without any ``WEBHOOKD_*`` variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("WEBHOOKD_")}
    env.update(extra)
    return env


# -- HTTP probes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


def http_get(url: str, timeout: float = HTTP_PROBE_TIMEOUT_SECONDS) -> HttpAnswer | None:
    """GET ``url``: its status and body, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return HttpAnswer(response.status, response.read().decode("utf-8", "replace"))
    except urllib.error.HTTPError as exc:
        with contextlib.closing(exc):
            return HttpAnswer(exc.code, exc.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError):
        return None


# -- processes -------------------------------------------------------------------------------


class WebhookdProcess:
    """A running ``webhookd run``; stdout and stderr go to files in the workspace."""

    def __init__(
        self, popen: subprocess.Popen[bytes], stdout: Path, stderr: Path, port: int | None
    ) -> None:
        self.popen = popen
        self.stdout_path = stdout
        self.stderr_path = stderr
        self.port = port

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def output(self) -> str:
        return f"--- stdout ---\n{self.stdout()}\n--- stderr ---\n{self.stderr()}"

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines on stdout (every line must be one JSON object)."""
        records = []
        for line in self.stdout().splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"log line is not JSON: {line!r}") from None
        return records

    def log_events(self) -> list[str]:
        return [str(r.get("event")) for r in self.log_records()]

    def url(self, path: str) -> str:
        assert self.port is not None, "this daemon has no HTTP port"
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str) -> HttpAnswer | None:
        return http_get(self.url(path))

    def wait_ready(self, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Poll ``/readyz`` until it answers 200; fail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        last: HttpAnswer | None = None
        while True:
            code = self.popen.poll()
            if code is not None:
                raise AssertionError(
                    f"webhookd run exited with {code} before it was ready\n{self.output()}"
                )
            last = self.get("/readyz")
            if last is not None and last.status == 200:
                return
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"webhookd run was not ready within {timeout}s (last /readyz: {last})\n"
                    f"{self.output()}"
                )
            time.sleep(POLL_SECONDS)

    def wait_exit(self, timeout: float = EXIT_TIMEOUT_SECONDS) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"webhookd run did not exit within {timeout}s\n{self.output()}"
            ) from None

    def stop(
        self, sig: signal.Signals = signal.SIGTERM, timeout: float = EXIT_TIMEOUT_SECONDS
    ) -> int:
        """Send ``sig`` and wait for the exit code."""
        self.popen.send_signal(sig)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        """SIGKILL if still running; safe to call more than once."""
        if self.popen.poll() is None:
            self.popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(KILL_WAIT_SECONDS)


def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float = WAIT_TIMEOUT_SECONDS,
    what: str = "condition",
    details: Callable[[], str] = lambda: "",
) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{details()}")
        time.sleep(POLL_SECONDS)


# -- workspace -------------------------------------------------------------------------------


@dataclass
class Workspace:
    """A directory with a config file, a database path and a free port for ``http.listen``."""

    dir: Path
    port: int = field(default_factory=free_port)
    processes: list[WebhookdProcess] = field(default_factory=list)
    _runs: int = 0

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def db(self) -> Path:
        return self.dir / "webhookd.db"

    @property
    def config_path(self) -> Path:
        return self.dir / "webhookd.toml"

    def base_config(self) -> dict[str, Any]:
        """Fast test defaults: plain http to loopback receivers (allowed past SSRF protection),
        short retries, JSON logs."""
        return {
            "database": {"path": str(self.db)},
            "http": {"listen": f"127.0.0.1:{self.port}"},
            "delivery": {
                "allow_http": True,
                "allowed_networks": ["127.0.0.0/8", "::1/128"],
                "timeout_seconds": 10.0,
            },
            "retry": {
                "initial_delay_seconds": 0.2,
                "multiplier": 2.0,
                "jitter": 0.0,
                "max_attempts": 5,
            },
            "daemon": {"grace_seconds": 5.0},
            "log": {"level": "info", "format": "json"},
        }

    def write_config(
        self,
        *,
        endpoints: Sequence[Mapping[str, Any]] = (),
        path: Path | None = None,
        **overrides: Mapping[str, Any],
    ) -> Path:
        """Write the base config with ``overrides`` (per section) and ``endpoints``."""
        config = deep_merge(self.base_config(), overrides)
        config["endpoints"] = list(endpoints)
        target = path or self.config_path
        target.write_text(toml_text(config), encoding="utf-8")
        return target

    def write_raw_config(self, text: str, name: str = "webhookd.toml") -> Path:
        target = self.dir / name
        target.write_text(text, encoding="utf-8")
        return target

    # The command line.

    def cli(
        self,
        *args: str,
        config: Path | bool | None = True,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = CLI_TIMEOUT_SECONDS,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``webhookd ARGS [--config F]`` to completion (config=True: this workspace's)."""
        command = [str(WEBHOOKD), *args]
        if config is True:
            command += ["--config", str(self.config_path)]
        elif isinstance(config, Path):
            command += ["--config", str(config)]
        return subprocess.run(
            command,
            env=clean_environ(**(env or {})),
            cwd=cwd or self.dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=timeout,
            check=False,
        )

    def cli_ok(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        result = self.cli(*args, **kwargs)
        assert result.returncode == 0, (
            f"webhookd {' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
        return result

    def cli_json(self, *args: str, **kwargs: Any) -> Any:
        return json.loads(self.cli_ok(*args, **kwargs).stdout)

    def start(
        self,
        *,
        config: Path | None = None,
        env: Mapping[str, str] | None = None,
        port: int | None = -1,
        wait_ready: bool = True,
    ) -> WebhookdProcess:
        """Start ``webhookd run --config F``; by default wait until ``/readyz`` is 200."""
        self._runs += 1
        stdout = self.dir / f"run{self._runs}.stdout"
        stderr = self.dir / f"run{self._runs}.stderr"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            popen = subprocess.Popen(
                [str(WEBHOOKD), "run", "--config", str(config or self.config_path)],
                env=clean_environ(**(env or {})),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        process = WebhookdProcess(popen, stdout, stderr, self.port if port == -1 else port)
        self.processes.append(process)
        if wait_ready:
            process.wait_ready()
        return process

    def close(self) -> None:
        for process in self.processes:
            process.kill()

    @staticmethod
    def wait_until(
        predicate: Callable[[], Any],
        *,
        timeout: float = WAIT_TIMEOUT_SECONDS,
        what: str = "condition",
        details: Callable[[], str] = lambda: "",
    ) -> Any:
        """:func:`wait_until`, for tests (which cannot import this conftest)."""
        return wait_until(predicate, timeout=timeout, what=what, details=details)

    # The database, as an application sees it.

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.db, timeout=10.0)
        try:
            conn.row_factory = sqlite3.Row
            yield conn
        finally:
            conn.close()

    def sql(self, query: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self.connect() as conn:
            return conn.execute(query, params).fetchall()

    def scalar(self, query: str, params: Sequence[Any] = ()) -> Any:
        rows = self.sql(query, params)
        return rows[0][0] if rows else None

    def insert_outbox(self, rows: Sequence[Mapping[str, Any]]) -> list[int]:
        """INSERT rows (event_type, payload as text, optional event_id/tenant/occurred_at)
        into webhook_outbox in one transaction, as an application does; returns their ids."""
        ids = []
        with self.connect() as conn, conn:
            for row in rows:
                columns = ["event_type", "payload"] + [
                    c for c in ("event_id", "tenant", "occurred_at") if c in row
                ]
                marks = ", ".join("?" for _ in columns)
                cursor = conn.execute(
                    f"INSERT INTO webhook_outbox ({', '.join(columns)}) VALUES ({marks})",
                    [row[c] for c in columns],
                )
                assert cursor.lastrowid is not None
                ids.append(cursor.lastrowid)
        return ids

    def delivery_states(self) -> dict[str, int]:
        rows = self.sql("SELECT state, count(*) FROM webhookd_deliveries GROUP BY state")
        return {row[0]: row[1] for row in rows}

    def outbox_count(self) -> int:
        return int(self.scalar("SELECT count(*) FROM webhook_outbox"))


@pytest.fixture(scope="session")
def webhookd_exe() -> Path:
    if not WEBHOOKD.exists():
        pytest.fail(f"{WEBHOOKD} does not exist: install the package (pip install -e .)")
    return WEBHOOKD


@pytest.fixture(scope="session")
def new_workspace(
    webhookd_exe: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Workspace]]:
    """A factory for workspaces in fresh temporary directories (for module-scoped fixtures).
    Processes still running at the end of the session are killed."""
    made: list[Workspace] = []

    def make(name: str = "ws") -> Workspace:
        workspace = Workspace(tmp_path_factory.mktemp(name))
        made.append(workspace)
        return workspace

    yield make
    for workspace in made:
        workspace.close()


@pytest.fixture
def workspace(webhookd_exe: Path, tmp_path: Path) -> Iterator[Workspace]:
    """A workspace in this test's ``tmp_path``; its processes are killed at teardown."""
    ws = Workspace(tmp_path)
    try:
        yield ws
    finally:
        ws.close()


# -- in-process aiohttp receivers ------------------------------------------------------------


@dataclass
class Received:
    delivery_id: str | None
    event_type: str | None
    body: bytes
    started_at: float
    finished_at: float | None = None
    signature: str | None = None  # the seed scheme's header

    def json(self) -> Any:
        return json.loads(self.body)


class AioReceiver:
    """An aiohttp receiver on 127.0.0.1 running on its own thread and event loop.

    Every POST is recorded in ``started`` when it arrives and in ``finished`` when its
    response is about to be sent, after ``delay`` seconds; it answers ``status``.
    """

    def __init__(self, *, delay: float = 0.0, status: int = 200) -> None:
        self.delay = delay
        self.status = status
        self._lock = threading.Lock()
        self._started: list[Received] = []
        self._finished: list[Received] = []
        self._server = ThreadedAioServer(
            lambda app: app.router.add_post("/hook", self._handle),
            timeout_seconds=RECEIVER_TIMEOUT_SECONDS,
        )
        self.port = self._server.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        record = Received(
            delivery_id=request.headers.get(f"{HEADER_PREFIX}-Delivery"),
            event_type=request.headers.get(f"{HEADER_PREFIX}-Event"),
            body=body,
            started_at=time.time(),
            signature=request.headers.get(f"{HEADER_PREFIX}-Signature"),
        )
        with self._lock:
            self._started.append(record)
        if self.delay:
            await asyncio.sleep(self.delay)
        record.finished_at = time.time()
        with self._lock:
            self._finished.append(record)
        return web.Response(status=self.status, text="OK")

    def started(self) -> list[Received]:
        with self._lock:
            return list(self._started)

    def finished(self) -> list[Received]:
        with self._lock:
            return list(self._finished)

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture(scope="session")
def new_aio_receiver() -> Iterator[Callable[..., AioReceiver]]:
    """A factory, for module-scoped fixtures: ``new_aio_receiver(delay=0.0, status=200)``;
    receivers still running at the end of the session are stopped."""
    started: list[AioReceiver] = []

    def start(*, delay: float = 0.0, status: int = 200) -> AioReceiver:
        receiver = AioReceiver(delay=delay, status=status)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


@pytest.fixture
def aio_receiver() -> Iterator[Callable[..., AioReceiver]]:
    """A factory: ``aio_receiver(delay=0.0, status=200) -> AioReceiver``; all stopped at
    teardown."""
    started: list[AioReceiver] = []

    def start(*, delay: float = 0.0, status: int = 200) -> AioReceiver:
        receiver = AioReceiver(delay=delay, status=status)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


@pytest.fixture
def dead_url() -> str:
    """An http URL on a loopback port where nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}/hook"
