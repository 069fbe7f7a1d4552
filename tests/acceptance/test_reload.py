"""SIGHUP reloads the configuration file of a running ``webhookd run``.

What an operator relies on: the new endpoints, limits, retry policy, timeouts and log level take
effect without a restart and the log says what changed; a broken file is refused, with its
problems logged, while the daemon keeps running the old configuration and stays ready; settings
that need a restart are named and left alone; requests in flight are not disturbed.
"""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pytest
from helpers import free_port

if TYPE_CHECKING:
    from conftest import AioReceiver, Received, WebhookdProcess, Workspace

SECRET_A = "reload-secret-alpha"
SECRET_B = "reload-secret-bravo"


def _records(daemon: WebhookdProcess, event: str) -> list[dict[str, Any]]:
    return [r for r in daemon.log_records() if r.get("event") == event]


def _reload(ws: Workspace, daemon: WebhookdProcess, *, expect: str = "reloaded") -> dict[str, Any]:
    """SIGHUP, then wait for the next ``expect`` log line (reloaded or reload_failed)."""
    done_before = len(_records(daemon, "reloaded")) + len(_records(daemon, "reload_failed"))
    daemon.popen.send_signal(signal.SIGHUP)

    def finished() -> bool:
        done = len(_records(daemon, "reloaded")) + len(_records(daemon, "reload_failed"))
        return done > done_before

    ws.wait_until(finished, what="the reload to finish", details=daemon.output)
    last = [r for r in daemon.log_records() if r.get("event") in ("reloaded", "reload_failed")]
    assert last[-1]["event"] == expect, daemon.output()
    return last[-1]


def _enqueue(ws: Workspace, *event_ids: str, event_type: str = "booking.created") -> None:
    ws.insert_outbox(
        [
            {"event_type": event_type, "event_id": e, "payload": json.dumps({"id": e})}
            for e in event_ids
        ]
    )


def _delivery(ws: Workspace, event_id: str) -> Mapping[str, Any] | None:
    rows = ws.sql(
        "SELECT d.* FROM webhookd_deliveries d JOIN webhookd_events e ON e.id = d.event_pk"
        " WHERE e.event_id = ?",
        (event_id,),
    )
    return dict(rows[0]) if rows else None


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0):
            return True
    except urllib.error.HTTPError as exc:
        exc.close()
        return True
    except (urllib.error.URLError, OSError):
        return False


def _ready(daemon: WebhookdProcess) -> bool:
    answer = daemon.get("/readyz")
    return answer is not None and answer.status == 200


def test_reload_applies_endpoints_retry_events_and_log_level_and_logs_what_changed(
    workspace: Workspace, aio_receiver: Callable[..., AioReceiver]
) -> None:
    first, second = aio_receiver(), aio_receiver()
    workspace.write_config(endpoints=[{"id": "alpha", "url": first.url, "secret": SECRET_A}])
    daemon = workspace.start()
    _enqueue(workspace, "evt-before")
    workspace.wait_until(lambda: len(first.finished()) == 1, what="the first delivery")

    workspace.write_config(
        endpoints=[{"id": "bravo", "url": second.url, "secret": SECRET_B}],
        retry={"max_attempts": 7},
        events={"allow_unknown_types": False},
        log={"level": "debug"},
    )
    record = _reload(workspace, daemon)

    assert record["changed"] == {
        "retry.max_attempts": [5, 7],
        "events.allow_unknown_types": [True, False],
        "log.level": ["info", "debug"],
    }
    assert record["endpoints"] == {"added": ["bravo"], "removed": ["alpha"]}
    assert record["active_endpoints"] == 1
    requested = _records(daemon, "reload_requested")
    assert [r.get("signal") for r in requested] == ["SIGHUP"]
    assert _ready(daemon)

    _enqueue(workspace, "evt-after")
    _enqueue(workspace, "evt-unknown", event_type="booking.teleported")
    workspace.wait_until(lambda: len(second.finished()) == 1, what="a delivery to the new endpoint")
    assert [r.json()["data"]["id"] for r in second.finished()] == ["evt-after"]
    assert len(first.finished()) == 1, "the removed endpoint must get nothing more"
    workspace.wait_until(
        lambda: workspace.scalar("SELECT count(*) FROM webhookd_quarantine") == 1,
        what="the unknown event type to be quarantined under the new events policy",
        details=daemon.output,
    )
    # The new log level: successes are logged at debug level, only after the reload.
    workspace.wait_until(
        lambda: _records(daemon, "delivery_succeeded"), what="a debug line", details=daemon.output
    )
    assert [r["event_id"] for r in _records(daemon, "delivery_succeeded")] == ["evt-after"]

    assert daemon.stop(signal.SIGTERM) == 0, daemon.output()
    output = daemon.stdout() + daemon.stderr()
    assert SECRET_A not in output
    assert SECRET_B not in output


def _invalid_values(ws: Workspace, url: str) -> None:
    ws.write_config(
        endpoints=[{"id": "alpha", "url": url, "secret": SECRET_A}],
        retry={"max_attempts": 0},
        delivery={"max_inflite": 3},
    )


def _broken_toml(ws: Workspace, url: str) -> None:
    ws.config_path.write_text("[retry\nmax_attempts = 3\n", encoding="utf-8")


def _missing_secret_file(ws: Workspace, url: str) -> None:
    ws.write_config(
        endpoints=[{"id": "alpha", "url": url, "secret_file": str(ws.dir / "gone.secret")}]
    )


@pytest.mark.parametrize(
    ("break_config", "problem"),
    [
        (_invalid_values, "retry.max_attempts:"),
        (_broken_toml, "not valid TOML"),
        (_missing_secret_file, "cannot read secret file"),
    ],
    ids=["invalid-values", "broken-toml", "missing-secret-file"],
)
def test_invalid_config_is_refused_and_the_running_one_kept(
    workspace: Workspace,
    aio_receiver: Callable[..., AioReceiver],
    break_config: Callable[[Workspace, str], None],
    problem: str,
) -> None:
    receiver = aio_receiver()
    workspace.write_config(endpoints=[{"id": "alpha", "url": receiver.url, "secret": SECRET_A}])
    daemon = workspace.start()

    break_config(workspace, receiver.url)
    record = _reload(workspace, daemon, expect="reload_failed")

    assert any(p.startswith(problem) or problem in p for p in record["problems"]), record
    if break_config is _invalid_values:
        assert any(p.startswith("delivery.max_inflite: unknown key") for p in record["problems"])
    assert record["level"] == "error"
    assert "reloaded" not in daemon.log_events()
    assert daemon.popen.poll() is None, daemon.output()
    assert _ready(daemon), "a refused reload must leave the daemon ready"
    _enqueue(workspace, "evt-old-config")
    workspace.wait_until(
        lambda: len(receiver.finished()) == 1, what="a delivery under the old configuration"
    )
    assert daemon.stop(signal.SIGTERM) == 0, daemon.output()
    assert SECRET_A not in daemon.stdout() + daemon.stderr()


def test_settings_that_need_a_restart_are_named_and_kept(
    workspace: Workspace, aio_receiver: Callable[..., AioReceiver]
) -> None:
    receiver = aio_receiver(status=500)
    workspace.write_config(
        endpoints=[{"id": "alpha", "url": receiver.url, "secret": SECRET_A}],
        retry={"initial_delay_seconds": 60.0},
    )
    daemon = workspace.start()
    new_port = free_port()
    other_db = workspace.dir / "other.db"
    workspace.write_config(
        endpoints=[{"id": "alpha", "url": receiver.url, "secret": SECRET_A}],
        retry={"initial_delay_seconds": 60.0, "max_attempts": 1},
        http={"listen": f"127.0.0.1:{new_port}"},
        database={"path": str(other_db)},
    )
    record = _reload(workspace, daemon)

    [restart] = _records(daemon, "reload_needs_restart")
    assert restart["keys"] == {
        "database.path": [str(workspace.db), str(other_db)],
        "http.listen": [f"127.0.0.1:{workspace.port}", f"127.0.0.1:{new_port}"],
    }
    assert record["changed"] == {"retry.max_attempts": [5, 1]}
    assert _ready(daemon), "the old port keeps answering"
    assert not _answers(f"http://127.0.0.1:{new_port}/readyz"), "nothing may listen there"
    # The rest of the file did apply: one attempt is now the last one.
    _enqueue(workspace, "evt-one-attempt")
    workspace.wait_until(
        lambda: (_delivery(workspace, "evt-one-attempt") or {}).get("state") == "failed",
        what="the delivery to fail after its single attempt",
        details=daemon.output,
    )
    assert not other_db.exists(), "the daemon must keep using the database it opened"
    assert daemon.stop(signal.SIGTERM) == 0, daemon.output()


def _max_overlap(requests: Sequence[Received]) -> int:
    """The most requests the receiver was handling at one moment."""
    best = 0
    for r in requests:
        at = r.started_at
        best = max(
            best,
            sum(
                1
                for o in requests
                if o.started_at <= at and (o.finished_at is None or o.finished_at > at)
            ),
        )
    return best


@pytest.mark.slow
@pytest.mark.parametrize(
    "cap", ["endpoint max_concurrency", "delivery.max_inflight"], ids=["endpoint", "global"]
)
def test_concurrency_caps_grow_without_a_restart(
    workspace: Workspace, aio_receiver: Callable[..., AioReceiver], cap: str
) -> None:
    receiver = aio_receiver(delay=0.4)

    def write(limit: int) -> None:
        if cap == "endpoint max_concurrency":
            endpoint = {"id": "alpha", "url": receiver.url, "secret": SECRET_A}
            workspace.write_config(endpoints=[{**endpoint, "max_concurrency": limit}])
        else:
            endpoint = {"id": "alpha", "url": receiver.url, "secret": SECRET_A}
            workspace.write_config(endpoints=[endpoint], delivery={"max_inflight": limit})

    write(1)
    daemon = workspace.start()
    _enqueue(workspace, *(f"evt-cap-{n}" for n in range(8)))
    workspace.wait_until(lambda: len(receiver.finished()) >= 2, what="two deliveries")
    assert _max_overlap(receiver.started()) == 1, "the cap of 1 was not respected"

    write(4)
    _reload(workspace, daemon)
    workspace.wait_until(
        lambda: _max_overlap(receiver.started()) >= 2,
        what="requests to overlap under the raised cap",
        details=daemon.output,
    )
    assert _max_overlap(receiver.started()) <= 4
    workspace.wait_until(
        lambda: workspace.delivery_states() == {"succeeded": 8}, what="every delivery"
    )
    assert daemon.stop(signal.SIGTERM) == 0, daemon.output()


@pytest.mark.slow
def test_request_in_flight_during_a_reload_completes_and_is_recorded(
    workspace: Workspace, aio_receiver: Callable[..., AioReceiver]
) -> None:
    receiver = aio_receiver(delay=2.0)
    endpoint = {"id": "alpha", "url": receiver.url, "secret": SECRET_A}
    workspace.write_config(endpoints=[endpoint], delivery={"timeout_seconds": 10.0})
    daemon = workspace.start()
    _enqueue(workspace, "evt-slow")
    workspace.wait_until(receiver.started, what="the slow request to arrive")

    # The new timeout is shorter than what the running request still needs, and the endpoint
    # itself changes: neither may touch the request already on the wire.
    workspace.write_config(
        endpoints=[{**endpoint, "max_concurrency": 3, "description": "changed"}],
        delivery={"timeout_seconds": 0.5},
    )
    record = _reload(workspace, daemon)
    assert receiver.finished() == [], "the request finished before the reload; the test is void"
    assert record["changed"] == {"delivery.timeout_seconds": [10.0, 0.5]}
    assert record["endpoints"] == {"changed": ["alpha"]}

    workspace.wait_until(
        lambda: (_delivery(workspace, "evt-slow") or {}).get("state") == "succeeded",
        what="the in-flight request to be recorded",
        details=daemon.output,
    )
    slow = _delivery(workspace, "evt-slow")
    assert slow is not None
    assert (slow["attempts"], slow["last_status"]) == (1, 200)

    # Requests that start after the reload get the new timeout.
    _enqueue(workspace, "evt-after")
    workspace.wait_until(
        lambda: (_delivery(workspace, "evt-after") or {}).get("attempts") == 1,
        what="the first attempt under the new timeout",
        details=daemon.output,
    )
    after = _delivery(workspace, "evt-after")
    assert after is not None
    assert after["state"] == "pending"
    assert "timed out after 0.5 s" in after["last_error"]
    assert daemon.stop(signal.SIGTERM) == 0, daemon.output()


def test_repeated_sighups_while_reloading_leave_the_daemon_running(
    workspace: Workspace, aio_receiver: Callable[..., AioReceiver]
) -> None:
    receiver = aio_receiver()
    workspace.write_config(endpoints=[{"id": "alpha", "url": receiver.url, "secret": SECRET_A}])
    daemon = workspace.start()
    for _ in range(5):
        daemon.popen.send_signal(signal.SIGHUP)
    # The kernel folds signals that arrive while one is pending, so count what was seen.
    workspace.wait_until(
        lambda: (
            _records(daemon, "reloaded")
            and len(_records(daemon, "reloaded")) <= len(_records(daemon, "reload_requested"))
        ),
        what="the reloads to be handled",
        details=daemon.output,
    )
    assert daemon.popen.poll() is None, daemon.output()
    assert _ready(daemon)
    _enqueue(workspace, "evt-after-storm")
    workspace.wait_until(lambda: len(receiver.finished()) == 1, what="a delivery")
    assert daemon.stop(signal.SIGTERM) == 0, daemon.output()
    assert "Traceback" not in daemon.stderr()
