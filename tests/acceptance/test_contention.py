"""The application and the daemon share one SQLite file under load (issue 5, item 6).

Several application processes insert into the outbox as fast as they can, each event in its own
transaction together with a row of the application's own table (the transactional outbox), with
the busy timeout an application would use (5 s). "As fast as they can" leaves a millisecond
between two transactions of one process: SQLite's busy handler is not fair (a waiting writer
polls every 100 ms), so writers that start their next transaction the instant the previous one
commits starve the others past any busy timeout, webhookd or not. Measured here without any
daemon: three such writers plus the long transactions below lose an insert to "database is
locked" after 5.0 s in nearly every run; with a 1 ms pause, none in any run, the slowest insert
waiting about 2.7 s (the long transaction plus a moment). Another process repeatedly holds a write
transaction open for seconds, as a slow request or a migration in the application would. All the
while ``webhookd run`` fans out and delivers. Then:

- no application insert failed (webhookd's write transactions are short and never make an
  application writer wait out its busy timeout);
- the daemon never exited, its HTTP port kept answering, ``/readyz`` is 200 at the end and any
  "not ready" answers on the way carried a reason;
- every event committed by the application was delivered, once per delivery id in the store,
  and nothing is left pending.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import AioReceiver, Workspace

INSERTERS = 3
MAX_EVENTS_PER_INSERTER = 2000
APP_PAUSE_SECONDS = 0.001  # between two transactions of one application process
HOLD_SECONDS = 2.5
HOLD_PAUSE_SECONDS = 1.0
HOLDS = 3
APP_BUSY_TIMEOUT_SECONDS = 5.0
START_DELAY_SECONDS = 1.5  # lets every process import and connect before the common start
PROBE_INTERVAL_SECONDS = 0.2
PROCESS_TIMEOUT_SECONDS = 60.0
FINISH_TIMEOUT_SECONDS = 90.0

# An application process. argv: database, name, start_at (Unix time), seconds, max events,
# report path, busy timeout, pause. Inserts until the time or the count runs out and writes a
# JSON report.
INSERTER = """
import json, sqlite3, sys, time
from webhookd.outbox import enqueue

db, name, start_at, seconds, limit, report = sys.argv[1:7]
conn = sqlite3.connect(db, timeout=float(sys.argv[7]))
time.sleep(max(0.0, float(start_at) - time.time()))
end = time.time() + float(seconds)
ids, failures, slowest = [], [], 0.0
n = 0
while time.time() < end and n < int(limit):
    event_id = f"{name}-{n:05d}"
    t0 = time.monotonic()
    try:
        with conn:
            conn.execute("INSERT INTO app_bookings (ref) VALUES (?)", (event_id,))
            enqueue(conn, "booking.created", {"ref": event_id, "n": n}, event_id=event_id)
        ids.append(event_id)
    except sqlite3.Error as exc:
        failures.append(f"{event_id}: {type(exc).__name__}: {exc}")
    slowest = max(slowest, time.monotonic() - t0)
    n += 1
    time.sleep(float(sys.argv[8]))
with open(report, "w") as f:
    json.dump({"ids": ids, "failures": failures, "slowest_seconds": slowest}, f)
"""

# The process that holds a write transaction open. argv: database, start_at, holds, hold
# seconds, pause seconds, report path, busy timeout.
HOLDER = """
import json, sqlite3, sys, time
from webhookd.outbox import enqueue

db, start_at, holds, hold, pause, report = sys.argv[1:7]
conn = sqlite3.connect(db, timeout=float(sys.argv[7]), isolation_level=None)
time.sleep(max(0.0, float(start_at) - time.time()))
ids, failures, spans = [], [], []
for n in range(int(holds)):
    event_id = f"holder-{n:02d}"
    try:
        conn.execute("BEGIN IMMEDIATE")
        began = time.time()
        conn.execute("INSERT INTO app_bookings (ref) VALUES (?)", (event_id,))
        enqueue(conn, "booking.created", {"ref": event_id, "n": n}, event_id=event_id)
        time.sleep(float(hold))
        conn.execute("COMMIT")
        spans.append([began, time.time()])
        ids.append(event_id)
    except sqlite3.Error as exc:
        failures.append(f"{event_id}: {type(exc).__name__}: {exc}")
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    time.sleep(float(pause))
with open(report, "w") as f:
    json.dump({"ids": ids, "failures": failures, "spans": spans}, f)
"""


def _spawn(script: str, args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _report(process: subprocess.Popen[str], path: Path) -> dict[str, Any]:
    try:
        output, _ = process.communicate(timeout=PROCESS_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"an application process did not finish:\n{output}") from None
    assert process.returncode == 0, f"an application process failed:\n{output}"
    report: dict[str, Any] = json.loads(path.read_text())
    return report


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_application_writers_and_a_long_transaction_lose_nothing(
    workspace: Workspace, aio_receiver: Callable[..., AioReceiver]
) -> None:
    receiver = aio_receiver()
    workspace.write_config(
        endpoints=[{"id": "sink", "url": receiver.url, "secret": "contention-secret"}],
        database={"busy_timeout_seconds": APP_BUSY_TIMEOUT_SECONDS},
    )
    workspace.cli_ok("migrate")
    with workspace.connect() as conn:
        conn.execute("CREATE TABLE app_bookings (id INTEGER PRIMARY KEY, ref TEXT NOT NULL)")
        conn.commit()
    daemon = workspace.start()

    start_at = time.time() + START_DELAY_SECONDS
    run_seconds = HOLDS * (HOLD_SECONDS + HOLD_PAUSE_SECONDS)
    db, timeout = str(workspace.db), str(APP_BUSY_TIMEOUT_SECONDS)
    reports = {f"app{i}": workspace.dir / f"app{i}.json" for i in range(INSERTERS)}
    apps = {
        name: _spawn(
            INSERTER,
            [
                db,
                name,
                str(start_at),
                str(run_seconds),
                str(MAX_EVENTS_PER_INSERTER),
                str(path),
                timeout,
                str(APP_PAUSE_SECONDS),
            ],
            workspace.dir,
        )
        for name, path in reports.items()
    }
    holder_report = workspace.dir / "holder.json"
    holder = _spawn(
        HOLDER,
        [
            db,
            str(start_at),
            str(HOLDS),
            str(HOLD_SECONDS),
            str(HOLD_PAUSE_SECONDS),
            str(holder_report),
            timeout,
        ],
        workspace.dir,
    )

    # While the application writes: the daemon stays up and its port keeps answering.
    answers: Counter[int | None] = Counter()
    reasons: Counter[str] = Counter()
    processes = [*apps.values(), holder]
    while any(p.poll() is None for p in processes):
        assert daemon.popen.poll() is None, f"webhookd run exited\n{daemon.output()}"
        answer = daemon.get("/readyz")
        answers[answer.status if answer else None] += 1
        if answer is not None and answer.status != 200:
            got = answer.json().get("reasons")
            assert got, f"/readyz {answer.status} without a reason: {answer.body}"
            reasons.update(str(r) for r in got)
        time.sleep(PROBE_INTERVAL_SECONDS)

    inserted: list[str] = []
    failures: list[str] = []
    slowest = 0.0
    for name, process in apps.items():
        report = _report(process, reports[name])
        inserted += report["ids"]
        failures += report["failures"]
        slowest = max(slowest, report["slowest_seconds"])
    held = _report(holder, holder_report)
    inserted += held["ids"]
    failures += held["failures"]
    assert not failures, f"{len(failures)} application inserts failed: {failures[:5]}"
    assert len(held["spans"]) == HOLDS
    # The test is void unless the long transactions really made the other writers wait.
    assert slowest >= HOLD_SECONDS / 2, f"no insert waited for the long transaction ({slowest})"

    def all_delivered() -> bool:
        fanned_out = workspace.scalar("SELECT count(*) FROM webhookd_events")
        return fanned_out == len(inserted) and workspace.delivery_states() == {
            "succeeded": len(inserted)
        }

    workspace.wait_until(
        all_delivered,
        timeout=FINISH_TIMEOUT_SECONDS,
        what=f"all {len(inserted)} events to be delivered",
        details=lambda: f"states: {workspace.delivery_states()}\n{daemon.output()}",
    )
    final = daemon.get("/readyz")
    assert final is not None
    assert final.status == 200, final
    assert daemon.stop(signal.SIGTERM) == 0, daemon.output()

    assert workspace.outbox_count() == len(inserted)
    assert workspace.scalar("SELECT count(*) FROM app_bookings") == len(inserted)
    assert workspace.scalar("SELECT count(*) FROM webhookd_quarantine") == 0
    received = [r.json()["data"]["ref"] for r in receiver.finished()]
    missing = set(inserted) - set(received)
    assert not missing, f"{len(missing)} events never arrived, e.g. {sorted(missing)[:5]}"
    assert len(received) == len(inserted), "a request was sent twice without any crash"
    events = daemon.log_events()
    assert "task_crashed" not in events, daemon.output()
    print(
        f"\ncontention test: {len(inserted)} events from {INSERTERS} writers and a holder "
        f"({HOLDS} x {HOLD_SECONDS} s), slowest application insert {slowest:.2f} s, "
        f"/readyz answers {dict(answers)}, not-ready reasons {dict(reasons)}, "
        f"daemon store errors logged: {events.count('store_error')} "
        f"+ {events.count('store_write_failed')} (recorder)"
    )
    assert None not in answers, f"the HTTP port stopped answering: {dict(answers)}"
