"""``delivery.sender_processes``: the HTTP requests made by child processes of the daemon.

The real ``webhookd run`` with real signals, a real aiohttp receiver on loopback, the store's
SQLite file: the children send signed requests and stop with the daemon; one SIGKILLed child
is replaced and its requests are sent again; a SIGKILLed daemon leaves no child behind; a
reload reaches the children.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import AioReceiver, Workspace

pytestmark = pytest.mark.timeout(120)

SECRET = "sender-processes-secret"
SENDERS = 2
CHILD_EXIT_SECONDS = 10.0


def children(pid: int) -> list[int]:
    """The live sender processes of daemon ``pid`` (from /proc: their parent and command)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        state = stat.rsplit(")", 1)[1].split()[0]
        if ppid == pid and state != "Z" and b"webhookd.sender_pool" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def configure(workspace: Workspace, receiver: AioReceiver, **delivery: object) -> None:
    workspace.write_config(
        endpoints=[{"id": "shop", "url": receiver.url, "secret": SECRET, "max_concurrency": 8}],
        delivery={"sender_processes": SENDERS, **delivery},
    )
    workspace.cli_ok("migrate")


def insert(workspace: Workspace, n: int, start: int = 0) -> None:
    workspace.insert_outbox(
        [
            {"event_type": "booking.created", "payload": f'{{"n":{i}}}', "event_id": f"evt_{i}"}
            for i in range(start, start + n)
        ]
    )


def test_children_send_signed_requests_and_stop_with_the_daemon(
    workspace: Workspace, aio_receiver: Callable[..., AioReceiver]
) -> None:
    receiver = aio_receiver()
    configure(workspace, receiver)
    daemon = workspace.start()
    kids = children(daemon.pid)
    assert len(kids) == SENDERS, daemon.output()
    insert(workspace, 300)
    workspace.wait_until(lambda: workspace.delivery_states() == {"succeeded": 300})
    got = receiver.finished()
    assert sorted(r.json()["data"]["n"] for r in got) == list(range(300))
    for r in got:  # the seed's scheme, verified here independently of webhookd's code
        expected = hmac.new(SECRET.encode(), r.body, hashlib.sha256).hexdigest()
        assert r.signature is not None
        assert hmac.compare_digest(r.signature, expected)
    assert workspace.scalar("SELECT count(*) FROM webhookd_attempts") == 300
    started = [r for r in daemon.log_records() if r.get("event") == "sender_process_started"]
    assert sorted(r["pid"] for r in started) == kids

    assert daemon.stop(signal.SIGTERM) == 0, daemon.output()
    wait_for(lambda: not any(alive(k) for k in kids), CHILD_EXIT_SECONDS, "the children to exit")


def test_a_killed_child_is_replaced_and_its_requests_are_sent_again(
    workspace: Workspace, aio_receiver: Callable[..., AioReceiver]
) -> None:
    receiver = aio_receiver(delay=0.3)
    configure(workspace, receiver)
    daemon = workspace.start()
    first = children(daemon.pid)
    insert(workspace, 60)
    wait_for(lambda: len(receiver.started()) >= 8, 30, "requests in flight")
    victim = first[0]
    os.kill(victim, signal.SIGKILL)
    workspace.wait_until(lambda: workspace.delivery_states() == {"succeeded": 60}, timeout=60)
    received = {r.delivery_id for r in receiver.finished()}
    assert len(received) == 60  # every delivery arrived; some of the victim's maybe twice
    # A lost request is no attempt: one attempt per delivery, the one that succeeded.
    assert workspace.scalar("SELECT count(*) FROM webhookd_attempts") == 60
    assert workspace.scalar("SELECT max(attempts) FROM webhookd_deliveries") == 1
    records = daemon.log_records()
    exited = [r for r in records if r.get("event") == "sender_process_exited"]
    assert [r["pid"] for r in exited] == [victim], daemon.output()
    assert exited[0]["status"] == -signal.SIGKILL
    assert exited[0]["requests_lost"] >= 1  # it was killed with requests in flight
    wait_for(lambda: len(children(daemon.pid)) == SENDERS, 30, "a replacement child")
    assert victim not in children(daemon.pid)
    assert daemon.get("/readyz") is not None
    assert daemon.stop() == 0, daemon.output()


def test_children_do_not_outlive_a_killed_daemon(
    workspace: Workspace, aio_receiver: Callable[..., AioReceiver]
) -> None:
    receiver = aio_receiver(delay=5.0)  # requests still in flight at the kill
    configure(workspace, receiver)
    daemon = workspace.start()
    kids = children(daemon.pid)
    insert(workspace, 20)
    wait_for(lambda: len(receiver.started()) >= 1, 30, "a request in flight")
    daemon.kill()
    wait_for(lambda: not any(alive(k) for k in kids), CHILD_EXIT_SECONDS, "orphans to exit")
    # Nothing was recorded for the cut requests: the next run sends them.
    assert workspace.scalar("SELECT count(*) FROM webhookd_attempts") == 0


def test_a_reload_reaches_the_children(
    workspace: Workspace, aio_receiver: Callable[..., AioReceiver]
) -> None:
    receiver = aio_receiver()
    configure(workspace, receiver)
    daemon = workspace.start()
    insert(workspace, 20)
    workspace.wait_until(lambda: workspace.delivery_states() == {"succeeded": 20})
    # A shorter response excerpt: what the children store from now on (the receiver says OK).
    configure(workspace, receiver, response_excerpt_bytes=1)
    daemon.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in daemon.log_events(), 30, "the reload")
    insert(workspace, 20, start=20)
    workspace.wait_until(lambda: workspace.delivery_states() == {"succeeded": 40})
    excerpts = [
        row[0]
        for row in workspace.sql(
            "SELECT a.response_excerpt FROM webhookd_attempts AS a"
            " JOIN webhookd_deliveries AS d ON d.id = a.delivery_pk ORDER BY a.id"
        )
    ]
    assert excerpts[:20] == ["OK"] * 20
    assert excerpts[20:] == ["O"] * 20
    assert daemon.stop() == 0, daemon.output()
