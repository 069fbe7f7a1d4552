"""SIGKILL at random moments, many times, while thousands of events flow (issue 5, item 5).

tests/acceptance/test_lifecycle.py kills the daemon once, with one endpoint, and checks that
every event still arrives. This test is the stress version: ``webhookd run`` is SIGKILLed again
and again (during start-up, fan-out and delivery alike) and restarted each time while an
application keeps inserting events routed to three endpoints with different subscriptions.
From the receivers' log it then proves:

- every event reached every endpoint subscribed to it at least once, and nothing reached an
  endpoint not subscribed to it;
- every duplicate (a delivery id received more than once) comes from a request in flight at a
  kill: the first kill after the earlier receipt found that delivery not recorded as succeeded
  in the store, the later receipt came after that kill, and no kill has more such duplicates
  for an endpoint than that endpoint's in-flight cap;

and from the store that nothing is left pending and every delivery has exactly the one
recorded attempt its receiver answered 200 to.

The kill times come from a seeded generator; the seed is in every failure message (set
WEBHOOKD_CRASH_SEED to replay one).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import AioReceiver, Workspace

EVENT_COUNT = 5000
INSERT_BATCH = 50
INSERT_PAUSE_SECONDS = 0.07  # 5000 events in about 8 s: faster than the killed runs drain them
# Kills of two kinds, in a shuffled order: "startup" kills land a random moment after the spawn
# (importing, opening the database, the first fan-out); "delivering" kills a random moment
# after the run's first request reached a receiver, so that requests are in flight.
STARTUP_KILLS = 3
DELIVERING_KILLS = 8
STARTUP_KILL_SECONDS = (0.05, 0.8)
DELIVERING_KILL_SECONDS = (0.0, 0.5)
FIRST_REQUEST_TIMEOUT_SECONDS = 30.0
MAX_CONCURRENCY = 8
# The receiver may run a request's handler a moment after the kill when the whole request was
# already in its socket buffer: a receipt this soon after a kill still belongs to the killed run.
RECEIPT_LAG_SECONDS = 0.25
FINISH_TIMEOUT_SECONDS = 90.0
INSERTER_JOIN_SECONDS = 60.0

EVENT_TYPES = ("booking.created", "booking.cancelled", "payment.succeeded", "customer.updated")
# endpoint id -> (its subscription patterns, the event types those match, worked out by hand)
ENDPOINTS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "everything": (("*",), frozenset(EVENT_TYPES)),
    "bookings": (("booking.*",), frozenset({"booking.created", "booking.cancelled"})),
    "money": (
        ("payment.succeeded", "booking.cancelled"),
        frozenset({"payment.succeeded", "booking.cancelled"}),
    ),
}


@dataclass(frozen=True)
class Kill:
    at: float  # time.time() just before SIGKILL
    mode: str  # "startup" or "delivering"
    succeeded: frozenset[str]  # delivery ids recorded as succeeded when the process died
    pending: int  # deliveries pending then
    before_ready: bool  # the run had not answered /readyz 200 yet


@dataclass(frozen=True)
class Receipt:
    endpoint: str
    delivery_id: str
    event_type: str
    event_id: str
    at: float


class Inserter(threading.Thread):
    """The application: inserts EVENT_COUNT events in small transactions, a batch at a time."""

    def __init__(self, ws: Workspace, rng: random.Random) -> None:
        super().__init__(daemon=True, name="inserter")
        self.ws = ws
        self.types = [rng.choice(EVENT_TYPES) for _ in range(EVENT_COUNT)]
        self.inserted: dict[str, str] = {}  # event id -> type
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for start in range(0, EVENT_COUNT, INSERT_BATCH):
                rows = []
                for n in range(start, min(start + INSERT_BATCH, EVENT_COUNT)):
                    event_id = f"evt-crash-{n:05d}"
                    rows.append(
                        {
                            "event_type": self.types[n],
                            "event_id": event_id,
                            "payload": json.dumps({"eid": event_id, "n": n}),
                        }
                    )
                self.ws.insert_outbox(rows)
                self.inserted.update((r["event_id"], r["event_type"]) for r in rows)
                time.sleep(INSERT_PAUSE_SECONDS)
        except BaseException as exc:
            self.error = exc


def _receipts(receivers: dict[str, AioReceiver]) -> list[Receipt]:
    out = []
    for endpoint, receiver in receivers.items():
        for r in receiver.started():
            assert r.delivery_id is not None, r
            assert r.event_type is not None, r
            out.append(
                Receipt(
                    endpoint, r.delivery_id, r.event_type, r.json()["data"]["eid"], r.started_at
                )
            )
    return out


def _kill_and_snapshot(
    ws: Workspace, receivers: dict[str, AioReceiver], mode: str, rng: random.Random
) -> Kill:
    def received() -> int:
        return sum(len(r.started()) for r in receivers.values())

    before = received()
    process = ws.start(wait_ready=False)
    ready = False

    def alive() -> bool:
        nonlocal ready
        assert process.popen.poll() is None, f"webhookd run exited by itself\n{process.output()}"
        if not ready:
            answer = process.get("/readyz")
            ready = answer is not None and answer.status == 200
        return True

    if mode == "delivering":
        ws.wait_until(
            lambda: alive() and received() > before,
            timeout=FIRST_REQUEST_TIMEOUT_SECONDS,
            what="the restarted daemon's first request",
            details=process.output,
        )
        delay = rng.uniform(*DELIVERING_KILL_SECONDS)
    else:
        delay = rng.uniform(*STARTUP_KILL_SECONDS)
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and alive():
        time.sleep(0.02)
    at = time.time()
    process.popen.send_signal(signal.SIGKILL)
    code = process.wait_exit(timeout=10)
    assert code == -signal.SIGKILL, f"exit {code}, not SIGKILL\n{process.output()}"
    # Nothing writes the file between the kill and the next start: this is the state at the kill.
    rows = ws.sql("SELECT delivery_id, state FROM webhookd_deliveries")
    succeeded = frozenset(r[0] for r in rows if r[1] == "succeeded")
    pending = sum(1 for r in rows if r[1] == "pending")
    return Kill(at, mode, succeeded, pending, not ready)


def _duplicates_explained(
    receipts: list[Receipt], kills: list[Kill]
) -> tuple[dict[str, int], list[str]]:
    """Per kill and endpoint, the duplicates it caused; and the duplicates no kill explains."""
    by_delivery: dict[str, list[Receipt]] = defaultdict(list)
    for r in receipts:
        by_delivery[r.delivery_id].append(r)
    caused: Counter[tuple[int, str]] = Counter()
    unexplained = []
    for delivery_id, seen in by_delivery.items():
        seen.sort(key=lambda r: r.at)
        for earlier, later in itertools.pairwise(seen):
            # The run that sent `earlier` ended at the first kill after it.
            k = next(
                (i for i, kill in enumerate(kills) if kill.at >= earlier.at - RECEIPT_LAG_SECONDS),
                None,
            )
            if k is None:
                unexplained.append(f"{delivery_id}: received again after the last kill")
            elif delivery_id in kills[k].succeeded:
                unexplained.append(
                    f"{delivery_id}: recorded as succeeded at kill {k}, yet received again"
                )
            elif later.at <= kills[k].at:
                unexplained.append(f"{delivery_id}: received twice by the same run")
            else:
                caused[(k, earlier.endpoint)] += 1
    per_kill = {f"kill {k} -> {ep}": n for (k, ep), n in sorted(caused.items())}
    over_cap = [f"{key}: {n} duplicates" for key, n in per_kill.items() if n > MAX_CONCURRENCY]
    return per_kill, unexplained + over_cap


@pytest.mark.slow
@pytest.mark.timeout(240)
# 2: the requests are made by child processes (delivery.sender_processes), which outlive the
# SIGKILLed daemon for a moment: the same bounds must hold.
@pytest.mark.parametrize("sender_processes", [0, 2])
def test_random_sigkills_lose_nothing_and_duplicate_only_what_was_in_flight(
    workspace: Workspace, aio_receiver: Callable[..., AioReceiver], sender_processes: int
) -> None:
    seed = int(os.environ.get("WEBHOOKD_CRASH_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    about = f"(seed {seed}; WEBHOOKD_CRASH_SEED={seed} replays these kill times)"
    receivers = {endpoint: aio_receiver() for endpoint in ENDPOINTS}
    workspace.write_config(
        endpoints=[
            {
                "id": endpoint,
                "url": receivers[endpoint].url,
                "secret": f"crash-secret-{endpoint}",
                "events": list(patterns),
                "max_concurrency": MAX_CONCURRENCY,
            }
            for endpoint, (patterns, _) in ENDPOINTS.items()
        ],
        retry={"initial_delay_seconds": 0.2, "max_attempts": 50},
        delivery={"sender_processes": sender_processes},
    )
    workspace.cli_ok("migrate")

    inserter = Inserter(workspace, rng)
    inserter.start()
    modes = ["startup"] * STARTUP_KILLS + ["delivering"] * DELIVERING_KILLS
    rng.shuffle(modes)
    kills = [_kill_and_snapshot(workspace, receivers, mode, rng) for mode in modes]
    inserter.join(INSERTER_JOIN_SECONDS)
    assert not inserter.is_alive(), "the application's inserts did not finish"
    assert inserter.error is None, f"an application insert failed: {inserter.error!r}"

    final = workspace.start()
    expected = {
        (event_id, endpoint)
        for event_id, event_type in inserter.inserted.items()
        for endpoint, (_, types) in ENDPOINTS.items()
        if event_type in types
    }

    def all_done() -> bool:
        states = workspace.delivery_states()
        return states == {"succeeded": len(expected)}

    workspace.wait_until(
        all_done,
        timeout=FINISH_TIMEOUT_SECONDS,
        what=f"all {len(expected)} deliveries to succeed after the last restart {about}",
        details=lambda: f"states: {workspace.delivery_states()}\n{final.output()}",
    )
    assert final.stop(signal.SIGTERM) == 0, final.output()

    # The receivers: every subscribed (event, endpoint) at least once, nothing else.
    receipts = _receipts(receivers)
    stray = [r for r in receipts if r.event_type not in ENDPOINTS[r.endpoint][1]]
    assert not stray, f"{len(stray)} requests to unsubscribed endpoints: {stray[:5]} {about}"
    received = {(r.event_id, r.endpoint) for r in receipts}
    missing = sorted(expected - received)
    assert not missing, f"{len(missing)} never arrived, e.g. {missing[:10]} {about}"
    assert received == expected, f"unexpected receipts: {sorted(received - expected)[:10]}"

    # The store: every event fanned out once, every delivery succeeded with one attempt.
    assert workspace.scalar("SELECT count(*) FROM webhookd_events") == EVENT_COUNT
    assert workspace.scalar("SELECT count(*) FROM webhookd_quarantine") == 0
    rows = workspace.sql(
        "SELECT d.delivery_id, d.endpoint_id, e.event_id, d.state, d.attempts, d.last_status,"
        " (SELECT count(*) FROM webhookd_attempts a WHERE a.delivery_pk = d.id),"
        " (SELECT count(*) FROM webhookd_attempts a"
        "   WHERE a.delivery_pk = d.id AND a.result = 'success' AND a.status_code = 200)"
        " FROM webhookd_deliveries d JOIN webhookd_events e ON e.id = d.event_pk"
    )
    stored = {r[0]: (r[2], r[1]) for r in rows}
    assert set(stored.values()) == expected
    assert len(stored) == len(expected), "an (event, endpoint) pair has two delivery ids"
    inconsistent = [tuple(r) for r in rows if tuple(r[3:]) != ("succeeded", 1, 200, 1, 1)]
    assert not inconsistent, f"deliveries whose attempts do not add up: {inconsistent[:5]}"
    wrong = [r for r in receipts if stored.get(r.delivery_id) != (r.event_id, r.endpoint)]
    assert not wrong, f"delivery ids that do not belong to their event/endpoint: {wrong[:5]}"

    # Duplicates: only requests in flight at a kill.
    per_kill, unexplained = _duplicates_explained(receipts, kills)
    assert not unexplained, f"duplicates no kill explains: {unexplained[:10]} {about}"
    counts = Counter(r.delivery_id for r in receipts)
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    mid_flow = sum(1 for kill in kills if kill.mode == "delivering" and kill.pending)
    print(
        f"\ncrash test {about}: {len(kills)} kills ({mid_flow} while delivering with deliveries "
        f"pending, {sum(k.before_ready for k in kills)} before /readyz answered 200), "
        f"{EVENT_COUNT} events, {len(expected)} deliveries, {len(receipts)} requests received, "
        f"{duplicates} duplicates of {sum(1 for n in counts.values() if n > 1)} deliveries; "
        f"per kill: {per_kill}"
    )
    # Not a property of webhookd: a check that this run of the test killed mid-flow at all.
    assert mid_flow >= DELIVERING_KILLS // 2, (
        f"only {mid_flow} kills hit a daemon with deliveries pending: the backlog ran dry, "
        f"raise EVENT_COUNT {about}"
    )
