"""The database's storage fails under a running daemon, then comes back (issue 5, item 8).

Faults made while deliveries are in flight, so that their outcomes must be written while the
storage refuses writes:

- **disk full**: the filesystem holding the database fills up (ENOSPC);
- **file unwritable**: the database file and its WAL become immutable (EPERM on every write);
- **only the database file unwritable**: commits still land in the WAL, so deliveries go on,
  but every checkpoint fails and the WAL can only grow.

Either way ``/readyz`` answers 503 with a reason, the cause ("database or disk is full", "disk
I/O error") is logged, the daemon keeps running and retries (no exit, no crash loop, no hot
loop), and once the fault is removed it recovers by itself: the held outcomes are recorded
without sending anything again, new events flow, ``/readyz`` is 200, and ``PRAGMA
integrity_check`` finds the file intact.

How the faults are made, as root (the tests run as root here and in CI): the database lives on
a small ext4 filesystem on a loop device made for the test, never on the machine's own disk.

- chmod cannot make a file unwritable for root, nor for an unprivileged daemon that already
  has it open (permissions are checked at open, and SQLite keeps the database and its WAL open
  for the daemon's lifetime); ``mount -o remount,ro`` is refused while a file is open for
  writing ("mount point is busy"). The immutable attribute (``chattr +i``) does stop writes
  through descriptors that are already open, for root too, on ext4 (not on tmpfs: there the
  write still succeeds, which is why the test makes its own ext4). The shared-memory file
  (``-shm``) is left alone: SQLite writes it through mmap, and a refused page fault would be a
  SIGBUS, not an error SQLite can report.
- Disk full: a filler file takes every free block. While requests are held at the receiver the
  daemon is idle, and its idle checkpoint truncates the WAL to zero bytes; writing their
  outcomes must then allocate blocks, so it fails (overwriting blocks the WAL already had would
  not need free space). Deleting the filler ends the fault.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web
from helpers import ThreadedAioServer

if TYPE_CHECKING:
    from conftest import WebhookdProcess, Workspace

FS_SIZE_BYTES = 32 * 1024 * 1024
IN_FLIGHT = 12
AFTER_RECOVERY = 8
FAULT_HOLD_SECONDS = 3.0  # the fault stays on this long after /readyz first reports it
WAIT_SECONDS = 30.0
COMMAND_TIMEOUT_SECONDS = 30.0
RECEIVER_TIMEOUT_SECONDS = 10.0
HEADER_DELIVERY = "X-BookingScheduler-Delivery"
# A retrying daemon logs a failed write a few times a second at most (backoff to 5 s); a daemon
# spinning on the error would log thousands of lines in FAULT_HOLD_SECONDS.
MAX_FAILED_WRITE_LOGS = 100
READYZ_PROBES = 10
READYZ_PROBE_SECONDS = 0.2


def _run(*command: str) -> None:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)}: {result.stdout}{result.stderr}"


# -- a receiver that holds every request until the test opens its gate ----------------------


class GatedReceiver:
    """aiohttp on 127.0.0.1 in its own thread; answers 200 to a POST once the gate is open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting = 0
        self._answered: list[str] = []
        self._gate = asyncio.Event()  # bound to the server's loop when first awaited there
        self._server = ThreadedAioServer(
            lambda app: app.router.add_post("/hook", self._handle),
            timeout_seconds=RECEIVER_TIMEOUT_SECONDS,
        )
        self.port = self._server.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        with self._lock:
            self._waiting += 1
        try:
            await self._gate.wait()
        finally:
            with self._lock:
                self._waiting -= 1
        with self._lock:
            self._answered.append(request.headers.get(HEADER_DELIVERY, ""))
        return web.Response(text="OK")

    def waiting(self) -> int:
        with self._lock:
            return self._waiting

    def answered(self) -> list[str]:
        with self._lock:
            return list(self._answered)

    def open(self) -> None:
        self._server.loop.call_soon_threadsafe(self._gate.set)

    def stop(self) -> None:
        if not self._server.loop.is_closed():
            self.open()
        self._server.stop()


@pytest.fixture
def gated_receiver() -> Iterator[GatedReceiver]:
    receiver = GatedReceiver()
    try:
        yield receiver
    finally:
        receiver.stop()


# -- a small ext4 filesystem for the database -----------------------------------------------


@pytest.fixture
def data_dir(workspace: Workspace, tmp_path: Path) -> Iterator[Path]:
    """A directory on a fresh 32 MiB ext4 filesystem (loop device), unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("making storage fail needs root (mount, chattr); CI runs as root")
    for tool in ("mount", "umount", "mkfs.ext4", "chattr"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    image = tmp_path / "fs.img"
    mountpoint = tmp_path / "data"
    mountpoint.mkdir()
    with image.open("wb") as f:
        f.truncate(FS_SIZE_BYTES)
    # -m 0: no blocks reserved for root (the daemon runs as root, it would use them).
    _run("mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096", str(image))
    _run("mount", "-o", "loop", str(image), str(mountpoint))
    try:
        yield mountpoint
    finally:
        workspace.close()  # nothing may keep a file open on it
        for path in mountpoint.iterdir():
            subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False)
        subprocess.run(["chattr", "-i", str(mountpoint)], capture_output=True, check=False)
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)


def _fill(directory: Path) -> Path:
    """Take every free block of the filesystem; returns the filler file to delete."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (b"\0" * (1024 * 1024), b"\0" * 4096, b"\0" * 512):
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        os.fsync(fd)
    finally:
        os.close(fd)
    return filler


# -- the scenario ---------------------------------------------------------------------------


def _sql(db: Path, query: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db, timeout=10.0)
    try:
        return list(conn.execute(query).fetchall())
    finally:
        conn.close()


def _insert(db: Path, prefix: str, count: int) -> set[str]:
    ids = {f"{prefix}-{n:03d}" for n in range(count)}
    conn = sqlite3.connect(db, timeout=10.0)
    try:
        with conn:
            conn.executemany(
                "INSERT INTO webhook_outbox (event_type, payload, event_id) VALUES (?, ?, ?)",
                [("booking.created", json.dumps({"ref": i}), i) for i in sorted(ids)],
            )
    finally:
        conn.close()
    return ids


def _states(db: Path) -> dict[str, int]:
    rows = _sql(db, "SELECT state, count(*) FROM webhookd_deliveries GROUP BY state")
    return {str(r[0]): int(r[1]) for r in rows}


def _not_ready(daemon: WebhookdProcess) -> list[str] | None:
    answer = daemon.get("/readyz")
    if answer is None or answer.status == 200:
        return None
    reasons: list[str] = answer.json()["reasons"]
    return reasons


def _ready(daemon: WebhookdProcess) -> bool:
    answer = daemon.get("/readyz")
    return answer is not None and answer.status == 200


def _start_with_requests_held(
    ws: Workspace, db: Path, receiver: GatedReceiver
) -> tuple[WebhookdProcess, set[str]]:
    """A running daemon with IN_FLIGHT requests waiting at the receiver; their event ids."""
    ws.write_config(
        endpoints=[
            {
                "id": "held",
                "url": receiver.url,
                "secret": "storage-secret",
                "max_concurrency": IN_FLIGHT,
            }
        ],
        database={"path": str(db)},
        # Checkpoint (and truncate the WAL) as soon as the daemon has written nothing for 0.3 s.
        retention={"checkpoint_idle_seconds": 0.3},
    )
    ws.cli_ok("migrate")
    daemon = ws.start()
    event_ids = _insert(db, "before", IN_FLIGHT)
    ws.wait_until(
        lambda: receiver.waiting() == IN_FLIGHT,
        what=f"{IN_FLIGHT} requests held at the receiver",
        details=daemon.output,
    )
    return daemon, event_ids


def _run_fault(
    ws: Workspace,
    data: Path,
    receiver: GatedReceiver,
    *,
    apply: Callable[[], None],
    remove: Callable[[], None],
    cause: str,
    wait_for_empty_wal: bool,
) -> None:
    db = data / "webhookd.db"
    daemon, first = _start_with_requests_held(ws, db, receiver)
    wal = Path(f"{db}-wal")
    if wait_for_empty_wal:
        ws.wait_until(
            lambda: wal.exists() and wal.stat().st_size == 0,
            what="the idle checkpoint to truncate the WAL",
            details=daemon.output,
        )

    apply()
    receiver.open()  # the outcomes of the requests in flight must now be written
    reasons = ws.wait_until(
        lambda: _not_ready(daemon),
        timeout=WAIT_SECONDS,
        what="/readyz to report the storage fault",
        details=daemon.output,
    )
    assert any("store" in r for r in reasons), reasons
    _hold(daemon)
    assert _not_ready(daemon), "/readyz went back to 200 while the storage was still failing"
    failed_writes = [
        r for r in daemon.log_records() if r.get("event") in ("store_write_failed", "store_error")
    ]
    assert len(failed_writes) >= 2, f"the daemon did not retry the write\n{daemon.output()}"
    assert len(failed_writes) <= MAX_FAILED_WRITE_LOGS, f"{len(failed_writes)} failures logged"
    assert any(cause in str(r.get("error")) for r in failed_writes), (
        f"no log line names the cause {cause!r}: {failed_writes[:3]}"
    )

    remove()
    _check_recovery(ws, daemon, db, receiver, first)


def _check_recovery(
    ws: Workspace, daemon: WebhookdProcess, db: Path, receiver: GatedReceiver, first: set[str]
) -> None:
    """Ready again by itself, the held outcomes recorded, new events delivered, nothing sent
    twice, the file intact."""
    ws.wait_until(
        lambda: _ready(daemon),
        timeout=WAIT_SECONDS,
        what="/readyz 200 once the fault is gone",
        details=daemon.output,
    )
    ws.wait_until(
        lambda: _states(db) == {"succeeded": IN_FLIGHT},
        timeout=WAIT_SECONDS,
        what="the held outcomes to be recorded",
        details=lambda: f"{_states(db)}\n{daemon.output()}",
    )
    second = _insert(db, "after", AFTER_RECOVERY)
    ws.wait_until(
        lambda: _states(db) == {"succeeded": IN_FLIGHT + AFTER_RECOVERY},
        timeout=WAIT_SECONDS,
        what="events inserted after the recovery to be delivered",
        details=lambda: f"{_states(db)}\n{daemon.output()}",
    )
    assert daemon.popen.poll() is None, daemon.output()
    assert "task_crashed" not in daemon.log_events(), daemon.output()
    assert daemon.stop(signal.SIGTERM) == 0, daemon.output()

    assert _sql(db, "PRAGMA integrity_check") == [("ok",)]
    rows = _sql(
        db,
        "SELECT e.event_id, d.delivery_id, d.state, d.attempts,"
        " (SELECT count(*) FROM webhookd_attempts a WHERE a.delivery_pk = d.id)"
        " FROM webhookd_deliveries d JOIN webhookd_events e ON e.id = d.event_pk",
    )
    assert {r[0] for r in rows} == first | second
    assert all(r[2:] == ("succeeded", 1, 1) for r in rows), rows
    # The outcomes were kept while the store failed: nothing was sent a second time.
    assert sorted(receiver.answered()) == sorted(r[1] for r in rows)


def _hold(daemon: WebhookdProcess) -> None:
    """Keep the fault on for FAULT_HOLD_SECONDS; the daemon must stay up throughout."""
    deadline = time.monotonic() + FAULT_HOLD_SECONDS
    while time.monotonic() < deadline:
        assert daemon.popen.poll() is None, f"the daemon exited during the fault\n{daemon.output()}"
        time.sleep(0.1)


@pytest.mark.slow
def test_disk_full_makes_readyz_fail_and_the_daemon_recovers_by_itself(
    workspace: Workspace, data_dir: Path, gated_receiver: GatedReceiver
) -> None:
    filler: list[Path] = []
    _run_fault(
        workspace,
        data_dir,
        gated_receiver,
        apply=lambda: filler.append(_fill(data_dir)),
        remove=lambda: filler.pop().unlink(),
        cause="disk is full",
        wait_for_empty_wal=True,
    )


@pytest.mark.slow
def test_unwritable_database_makes_readyz_fail_and_the_daemon_recovers_by_itself(
    workspace: Workspace, data_dir: Path, gated_receiver: GatedReceiver
) -> None:
    db = data_dir / "webhookd.db"
    # The file, its WAL, and the directory (no new file either); not -shm (see the docstring).
    targets = [str(db), f"{db}-wal", str(data_dir)]
    _run_fault(
        workspace,
        data_dir,
        gated_receiver,
        apply=lambda: _run("chattr", "+i", *targets),
        remove=lambda: _run("chattr", "-i", *targets),
        cause="disk I/O error",
        wait_for_empty_wal=False,
    )


@pytest.mark.slow
def test_database_file_unwritable_behind_a_writable_wal_is_reported_on_readyz(
    workspace: Workspace, data_dir: Path, gated_receiver: GatedReceiver
) -> None:
    """Only the database file refuses writes: commits still land in the WAL, so deliveries go
    on, but no checkpoint can copy them into the file and the WAL grows without bound until the
    disk is full. The daemon must keep delivering and say so on /readyz, not only in its log."""
    db = data_dir / "webhookd.db"
    daemon, first = _start_with_requests_held(workspace, db, gated_receiver)
    # (Not the application's inserts: a new connection cannot open an immutable file for
    # writing. The outcomes of the held requests are what is written during the fault.)
    _run("chattr", "+i", str(db))
    gated_receiver.open()
    workspace.wait_until(
        lambda: _states(db) == {"succeeded": IN_FLIGHT},
        timeout=WAIT_SECONDS,
        what="outcomes to be recorded (in the WAL) while only the database file is unwritable",
        details=lambda: f"{_states(db)}\n{daemon.output()}",
    )

    def checkpoint_failed() -> bool:
        return any(
            r.get("event") == "store_error" and r.get("operation") == "checkpoint"
            for r in daemon.log_records()
        )

    workspace.wait_until(
        checkpoint_failed,
        timeout=WAIT_SECONDS,
        what="a failed checkpoint in the log",
        details=daemon.output,
    )
    # Probed for a while: the fault lasts, so must the answer.
    answers: list[int | None] = []
    for _ in range(READYZ_PROBES):
        answer = daemon.get("/readyz")
        answers.append(answer.status if answer else None)
        time.sleep(READYZ_PROBE_SECONDS)
    assert daemon.popen.poll() is None, daemon.output()
    assert answers == [503] * READYZ_PROBES, (
        "/readyz must say not ready while every WAL checkpoint fails (the database file is "
        f"unwritable; the WAL can only grow): answers {answers}"
    )

    _run("chattr", "-i", str(db))
    _check_recovery(workspace, daemon, db, gated_receiver, first)


def test_a_daemon_started_on_failing_storage_waits_for_it_instead_of_exiting(
    workspace: Workspace, data_dir: Path, gated_receiver: GatedReceiver
) -> None:
    # A restart while the disk is full (or the file unwritable) must not turn into a restart
    # loop: the daemon stays up, answers /healthz, says why on /readyz, and starts by itself
    # once the fault is gone.
    db = data_dir / "webhookd.db"
    workspace.write_config(
        database={"path": str(db)},
        endpoints=[{"id": "hooks", "url": gated_receiver.url, "secret": "s3cret-storage"}],
    )
    workspace.cli_ok("migrate")
    _insert(db, "before", 3)
    _run("chattr", "+i", str(data_dir))  # no -wal, -shm or lock file can be created
    try:
        daemon = workspace.start(wait_ready=False)
        reasons = workspace.wait_until(lambda: _not_ready(daemon), timeout=20, what="a 503")
        assert any("cannot open the store, retrying" in r for r in reasons), reasons
        healthz = daemon.get("/healthz")
        assert healthz is not None
        assert healthz.status == 200
        time.sleep(2.5)  # longer than the first retry delays: still up, not exited
        assert daemon.popen.poll() is None, daemon.output()
        assert "store_unavailable" in daemon.log_events()
    finally:
        _run("chattr", "-i", str(data_dir))
    workspace.wait_until(lambda: _ready(daemon), timeout=60, what="/readyz 200 after the fault")
    gated_receiver.open()
    workspace.wait_until(lambda: _states(db).get("succeeded") == 3, timeout=30, what="3 sent")
    assert daemon.stop() == 0
