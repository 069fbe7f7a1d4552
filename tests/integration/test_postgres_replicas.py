"""Several ``webhookd run`` replicas sharing one PostgreSQL database (issue 7, items 2-4).

Real processes (the installed ``webhookd`` command, one config file each, differing only in
``http.listen``), real aiohttp receivers on loopback, and application writers inserting into
``webhook_outbox`` with psycopg on their own connections while the replicas run.

- :func:`test_three_replicas_one_killed_every_event_reaches_every_endpoint`: 5,000 events to two
  endpoints (max_concurrency 4 each) through three replicas; one is SIGKILLed once about a third
  of the deliveries arrived. Every event reaches every endpoint; a delivery arrives twice only
  if the killed replica held its lease when it died (and its first copy came before the kill),
  so at most max_concurrency x endpoints of them; no endpoint ever sees more than its
  max_concurrency requests at once, across all replicas; every attempt in the store belongs to
  a delivery the receiver got.
- :func:`test_replicas_killed_and_restarted_under_writers_lose_nothing`: two replicas, each
  SIGKILLed and started again three times while writers insert: nothing lost, duplicates
  bounded by what the killed processes had in flight, the cap held.
- :func:`test_out_of_order_commits_are_fanned_out_exactly_once`: many writers whose
  transactions commit out of id order (some on purpose only after webhookd has fanned out a
  row with a higher id), replicas started while they write: every outbox row becomes exactly
  one event and one delivery per endpoint, each received exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp import web
from helpers import ThreadedAioServer, free_port

pytestmark = pytest.mark.slow

WEBHOOKD = Path(sys.executable).parent / "webhookd"
DELIVERY_HEADER = "X-BookingScheduler-Delivery"
SECRET = "replica-test-secret"

READY_TIMEOUT_SECONDS = 60.0
GATE_TIMEOUT_SECONDS = 240.0
DRAIN_TIMEOUT_SECONDS = 240.0
STOP_TIMEOUT_SECONDS = 30.0
KILL_WAIT_SECONDS = 10.0
CLI_TIMEOUT_SECONDS = 60.0
POLL_SECONDS = 0.05
HTTP_PROBE_TIMEOUT_SECONDS = 2.0
RECEIVER_TIMEOUT_SECONDS = 10.0

# The delivery timeout bounds how long a killed replica's leases block its deliveries (lease =
# timeout + margin), and must be long enough that no request times out on a busy machine (a
# timed-out request that did arrive would be sent again: a duplicate not caused by the kill).
DELIVERY_TIMEOUT_SECONDS = 5.0
LEASE_MARGIN_SECONDS = 2.0


# -- the receiver ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    endpoint: str
    delivery_id: str
    n: int  # the payload's "n": which application event this is
    at: float  # time.time() when the request arrived


@dataclass
class EndpointStats:
    inflight: int = 0
    max_inflight: int = 0


class CountingReceiver:
    """An aiohttp server on 127.0.0.1 (own thread and event loop) serving ``/hook/<endpoint>``.

    Records every request's delivery id, payload number and arrival time, holds it
    ``hold_seconds`` so that requests overlap, and counts how many were in flight at once per
    endpoint. Always answers 200.
    """

    def __init__(self, hold_seconds: float) -> None:
        self.hold_seconds = hold_seconds
        self._lock = threading.Lock()
        self._arrivals: list[Arrival] = []
        self._stats: dict[str, EndpointStats] = {}
        self._server = ThreadedAioServer(
            lambda app: app.router.add_post("/hook/{endpoint}", self._handle),
            backlog=1024,
            timeout_seconds=RECEIVER_TIMEOUT_SECONDS,
        )
        self.port = self._server.port

    def url(self, endpoint: str) -> str:
        return f"http://127.0.0.1:{self.port}/hook/{endpoint}"

    async def _handle(self, request: web.Request) -> web.Response:
        endpoint = request.match_info["endpoint"]
        stats = self._stats.setdefault(endpoint, EndpointStats())
        stats.inflight += 1
        stats.max_inflight = max(stats.max_inflight, stats.inflight)
        try:
            arrived = time.time()
            body = await request.read()
            arrival = Arrival(
                endpoint=endpoint,
                delivery_id=request.headers.get(DELIVERY_HEADER, ""),
                n=int(json.loads(body)["data"]["n"]),
                at=arrived,
            )
            with self._lock:
                self._arrivals.append(arrival)
            if self.hold_seconds:
                await asyncio.sleep(self.hold_seconds)
            return web.Response(text="OK")
        finally:
            stats.inflight -= 1

    def arrivals(self) -> list[Arrival]:
        with self._lock:
            return list(self._arrivals)

    def count(self) -> int:
        with self._lock:
            return len(self._arrivals)

    def max_inflight(self) -> dict[str, int]:
        with self._lock:
            return {name: s.max_inflight for name, s in self._stats.items()}

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture
def receiver_factory() -> Iterator[Callable[[float], CountingReceiver]]:
    started: list[CountingReceiver] = []

    def start(hold_seconds: float) -> CountingReceiver:
        receiver = CountingReceiver(hold_seconds)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


# -- the replicas ----------------------------------------------------------------------------


def _clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("WEBHOOKD_")}


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(value)


def write_config(
    path: Path, *, database_url: str, port: int, endpoints: dict[str, str], cap: int | None
) -> Path:
    """The replicas' shared configuration; only ``http.listen`` differs between them."""
    sections: dict[str, dict[str, object]] = {
        "database": {"url": database_url, "lease_margin_seconds": LEASE_MARGIN_SECONDS},
        "http": {"listen": f"127.0.0.1:{port}"},
        "delivery": {
            "allow_http": True,
            "allowed_networks": ["127.0.0.0/8"],
            "timeout_seconds": DELIVERY_TIMEOUT_SECONDS,
            "connect_timeout_seconds": DELIVERY_TIMEOUT_SECONDS,
        },
        "retry": {"initial_delay_seconds": 0.2, "multiplier": 2.0, "jitter": 0.0},
        "daemon": {"grace_seconds": 2.0},
        "log": {"level": "info", "format": "json"},
    }
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
        lines.append("")
    for endpoint_id, url in endpoints.items():
        lines += ["[[endpoints]]", f"id = {_toml(endpoint_id)}", f"url = {_toml(url)}"]
        lines.append(f"secret = {_toml(SECRET)}")
        if cap is not None:
            lines.append(f"max_concurrency = {cap}")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def http_get(url: str) -> tuple[int, str] | None:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_PROBE_TIMEOUT_SECONDS) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        with contextlib.closing(exc):
            return exc.code, exc.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError):
        return None


@dataclass
class Replica:
    """One ``webhookd run`` process with its own config file and HTTP port."""

    name: str
    directory: Path
    config: Path
    port: int
    popen: subprocess.Popen[bytes] | None = None

    @property
    def stdout_path(self) -> Path:
        return self.directory / f"{self.name}.stdout"

    @property
    def stderr_path(self) -> Path:
        return self.directory / f"{self.name}.stderr"

    def start(self) -> None:
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.popen = subprocess.Popen(
                [str(WEBHOOKD), "run", "--config", str(self.config)],
                env=_clean_environ(),
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def output(self, tail: int = 6000) -> str:
        out = self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""
        err = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return (
            f"--- {self.name} stdout ---\n{out[-tail:]}\n--- {self.name} stderr ---\n{err[-tail:]}"
        )

    def log_events(self) -> Counter[str]:
        events: Counter[str] = Counter()
        if self.stdout_path.exists():
            for line in self.stdout_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError, AttributeError):
                    events[str(json.loads(line).get("event"))] += 1
        return events

    def get(self, path: str) -> tuple[int, str] | None:
        return http_get(f"http://127.0.0.1:{self.port}{path}")

    def wait_ready(self) -> None:
        assert self.popen is not None
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while True:
            code = self.popen.poll()
            if code is not None:
                raise AssertionError(f"{self.name} exited {code} before ready\n{self.output()}")
            answer = self.get("/readyz")
            if answer is not None and answer[0] == 200:
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.name} not ready: {answer}\n{self.output()}")
            time.sleep(POLL_SECONDS)

    def attempts_sent(self) -> float:
        """The sum of this replica's webhookd_delivery_attempts_total counters."""
        answer = self.get("/metrics")
        assert answer is not None, f"{self.name} /metrics did not answer"
        assert answer[0] == 200, f"{self.name} /metrics: {answer}"
        total = 0.0
        for line in answer[1].splitlines():
            if line.startswith("webhookd_delivery_attempts_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(KILL_WAIT_SECONDS)

    def stop(self) -> int:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not stop on SIGTERM\n{self.output()}") from None


@pytest.fixture
def replica_factory(tmp_path: Path) -> Iterator[Callable[..., list[Replica]]]:
    """``make(count, database_url=..., endpoints={id: url}, cap=N)``: replicas, not started."""
    made: list[Replica] = []

    def make(
        count: int, *, database_url: str, endpoints: dict[str, str], cap: int | None
    ) -> list[Replica]:
        replicas = []
        for _ in range(count):
            name = f"replica{len(made) + 1}"
            port = free_port()
            config = write_config(
                tmp_path / f"{name}.toml",
                database_url=database_url,
                port=port,
                endpoints=endpoints,
                cap=cap,
            )
            replica = Replica(name, tmp_path, config, port)
            made.append(replica)
            replicas.append(replica)
        return replicas

    yield make
    for replica in made:
        replica.kill()


def migrate(config: Path) -> None:
    result = subprocess.run(
        [str(WEBHOOKD), "migrate", "--config", str(config)],
        env=_clean_environ(),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, f"webhookd migrate: {result.stdout}{result.stderr}"


def details(replicas: Sequence[Replica]) -> Callable[[], str]:
    return lambda: "\n".join(r.output() for r in replicas)


def wait_until(
    predicate: Callable[[], Any], *, timeout: float, what: str, details: Callable[[], str]
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{details()}")
        time.sleep(POLL_SECONDS * 4)


# -- the application's writers ---------------------------------------------------------------


@dataclass
class Writers:
    """Threads inserting events ``{"n": i}`` into the outbox on their own connections.

    Each writes its share in transactions of 1-20 rows, holding each transaction open a
    random few milliseconds so that transactions commit out of id order, paced so that all of
    them finish after about ``seconds``. With a ``gate``, each writes the first ``before_gate``
    of its share, then waits (bounded) for the gate to open before writing the rest.
    """

    database_url: str
    numbers: Sequence[int]
    threads: int
    seconds: float
    gate: threading.Event | None = None
    before_gate: float = 0.8
    errors: list[BaseException] = field(default_factory=list)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        shares = [self.numbers[i :: self.threads] for i in range(self.threads)]
        for index, share in enumerate(shares):
            worker = threading.Thread(
                target=self._write, args=(share, random.Random(index)), daemon=True
            )
            self._workers.append(worker)
            worker.start()

    def _write(self, share: Sequence[int], rng: random.Random) -> None:
        try:
            rate = len(share) / self.seconds
            gate_at = len(share) if self.gate is None else int(len(share) * self.before_gate)
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                self._write_part(conn, share[:gate_at], rate, rng)
                if self.gate is not None:
                    if not self.gate.wait(GATE_TIMEOUT_SECONDS):
                        raise AssertionError("the writers' gate never opened")
                    self._write_part(conn, share[gate_at:], rate, rng)
        except BaseException as exc:  # reported by join()
            self.errors.append(exc)

    @staticmethod
    def _write_part(
        conn: psycopg.Connection[Any], numbers: Sequence[int], rate: float, rng: random.Random
    ) -> None:
        started = time.monotonic()
        done = 0
        while done < len(numbers):
            chunk = numbers[done : done + rng.randint(1, 20)]
            with conn.transaction():
                for n in chunk:
                    insert_event(conn, n)
                time.sleep(rng.uniform(0, 0.01))
            done += len(chunk)
            ahead = started + done / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        assert not any(w.is_alive() for w in self._workers), "writers did not finish"
        assert not self.errors, f"a writer failed: {self.errors[0]!r}"


def insert_event(conn: psycopg.Connection[Any], n: int) -> int:
    """INSERT one event the way an application does; returns its outbox id."""
    row = conn.execute(
        "INSERT INTO webhook_outbox (event_type, event_id, payload) VALUES (%s, %s, %s)"
        " RETURNING id",
        ("booking.created", f"evt-{n}", json.dumps({"n": n})),
    ).fetchone()
    assert row is not None
    return int(row[0])


def scalar(conn: psycopg.Connection[Any], query: str, params: Sequence[Any] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def all_delivered(conn: psycopg.Connection[Any], events: int, endpoints: int) -> bool:
    outbox_done = scalar(
        conn,
        "SELECT count(*) FILTER (WHERE processed_at IS NOT NULL) = %s AND count(*) = %s"
        " FROM webhook_outbox",
        (events, events),
    )
    succeeded = scalar(conn, "SELECT count(*) FROM webhookd_deliveries WHERE state = 'succeeded'")
    return bool(outbox_done) and succeeded == events * endpoints


def progress(conn: psycopg.Connection[Any]) -> str:
    rows = conn.execute(
        "SELECT state, count(*), count(lease_owner) FROM webhookd_deliveries GROUP BY state"
    ).fetchall()
    unprocessed = scalar(conn, "SELECT count(*) FROM webhook_outbox WHERE processed_at IS NULL")
    return f"deliveries (state, count, leased): {rows}; outbox rows not fanned out: {unprocessed}"


def check_fan_out_exactly_once(
    conn: psycopg.Connection[Any], events: int, endpoint_ids: Sequence[str]
) -> dict[str, str]:
    """Every outbox row became one event and one delivery per endpoint; returns the delivery
    ids' endpoints."""
    outbox = scalar(conn, "SELECT count(*) FROM webhook_outbox")
    assert outbox == events
    rows = conn.execute(
        "SELECT o.id, count(e.id) FROM webhook_outbox o"
        " LEFT JOIN webhookd_events e ON e.outbox_id = o.id GROUP BY o.id HAVING count(e.id) <> 1"
    ).fetchall()
    assert rows == [], f"outbox rows without exactly one event: {rows[:20]}"
    by_event_id = conn.execute(
        "SELECT event_id, count(*) FROM webhookd_events GROUP BY event_id HAVING count(*) <> 1"
    ).fetchall()
    assert by_event_id == []
    per_pair = conn.execute(
        "SELECT e.event_id, d.endpoint_id, count(*) FROM webhookd_events e"
        " JOIN webhookd_deliveries d ON d.event_pk = e.id"
        " GROUP BY e.event_id, d.endpoint_id HAVING count(*) <> 1"
    ).fetchall()
    assert per_pair == [], f"events with more than one delivery to an endpoint: {per_pair[:20]}"
    endpoints_per_event = conn.execute(
        "SELECT e.event_id, count(d.id) FROM webhookd_events e"
        " LEFT JOIN webhookd_deliveries d ON d.event_pk = e.id"
        " GROUP BY e.event_id HAVING count(d.id) <> %s",
        (len(endpoint_ids),),
    ).fetchall()
    assert endpoints_per_event == [], f"events missing an endpoint: {endpoints_per_event[:20]}"
    return {
        str(r[0]): str(r[1])
        for r in conn.execute("SELECT delivery_id, endpoint_id FROM webhookd_deliveries")
    }


# -- the tests -------------------------------------------------------------------------------

EVENTS = 5000
ENDPOINT_IDS = ("alpha", "beta")
CAP = 4
HOLD_SECONDS = 0.005
WRITER_THREADS = 4
WRITE_SECONDS = 8.0


@pytest.mark.timeout(600)
def test_three_replicas_one_killed_every_event_reaches_every_endpoint(
    postgres_url: str,
    receiver_factory: Callable[[float], CountingReceiver],
    replica_factory: Callable[..., list[Replica]],
) -> None:
    receiver = receiver_factory(HOLD_SECONDS)
    endpoints = {e: receiver.url(e) for e in ENDPOINT_IDS}
    replicas = replica_factory(3, database_url=postgres_url, endpoints=endpoints, cap=CAP)
    migrate(replicas[0].config)
    for replica in replicas:
        replica.start()
    for replica in replicas:
        replica.wait_ready()

    total = EVENTS * len(ENDPOINT_IDS)
    # The writers write 80% of the events, wait for the kill, then write the rest.
    killed = threading.Event()
    writers = Writers(postgres_url, range(EVENTS), WRITER_THREADS, WRITE_SECONDS, gate=killed)
    started = time.monotonic()
    writers.start()
    victim, survivors = replicas[1], [replicas[0], replicas[2]]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        wait_until(
            lambda: receiver.count() >= total // 3,
            timeout=DRAIN_TIMEOUT_SECONDS,
            what="a third of the deliveries",
            details=lambda: progress(conn) + "\n" + details(replicas)(),
        )
        victim_sent = victim.attempts_sent()
        victim.kill()
        killed_at = time.time()
        killed.set()
        # The dead replica's leases stay until they expire: who held what when it died.
        leases = conn.execute(
            "SELECT delivery_id, lease_owner FROM webhookd_deliveries"
            " WHERE state = 'pending' AND lease_owner IS NOT NULL"
        ).fetchall()
        delivered_at_kill = receiver.count()

        writers.join(DRAIN_TIMEOUT_SECONDS)
        wait_until(
            lambda: all_delivered(conn, EVENTS, len(ENDPOINT_IDS)),
            timeout=DRAIN_TIMEOUT_SECONDS,
            what="every delivery succeeded",
            details=lambda: progress(conn) + "\n" + details(survivors)(),
        )
        elapsed = time.monotonic() - started
        survivor_sent = [r.attempts_sent() for r in survivors]
        for replica in survivors:
            assert replica.stop() == 0, replica.output()

        endpoint_of = check_fan_out_exactly_once(conn, EVENTS, ENDPOINT_IDS)
        attempts = conn.execute(
            "SELECT d.delivery_id, a.result FROM webhookd_attempts a"
            " JOIN webhookd_deliveries d ON d.id = a.delivery_pk"
        ).fetchall()

    arrivals = receiver.arrivals()
    received = Counter(a.delivery_id for a in arrivals)

    # Every event reached every endpoint, and under the delivery ids the store has.
    for endpoint_id in ENDPOINT_IDS:
        numbers = {a.n for a in arrivals if a.endpoint == endpoint_id}
        assert numbers == set(range(EVENTS)), (
            f"{endpoint_id} missed {len(set(range(EVENTS)) - numbers)} events"
        )
    assert set(received) == set(endpoint_of)
    assert all(endpoint_of[a.delivery_id] == a.endpoint for a in arrivals)

    # Duplicates come only from the killed replica's leases.
    duplicates = {d: c for d, c in received.items() if c > 1}
    survivor_owners = _owners_of(survivors, leases)
    victim_leased = {d for d, owner in leases if owner not in survivor_owners}
    assert set(duplicates) <= victim_leased, (
        f"delivered twice without the killed replica holding the lease: "
        f"{sorted(set(duplicates) - victim_leased)[:20]}"
    )
    assert all(c == 2 for c in duplicates.values()), duplicates
    assert len(duplicates) <= CAP * len(ENDPOINT_IDS)
    first_arrival = {}
    for a in arrivals:
        first_arrival.setdefault(a.delivery_id, a.at)
    assert all(first_arrival[d] < killed_at for d in duplicates)

    # The per-endpoint cap held across all replicas, and there was concurrency to cap.
    peaks = receiver.max_inflight()
    assert all(peaks[e] <= CAP for e in ENDPOINT_IDS), f"peaks {peaks} > cap {CAP}"
    assert max(peaks.values()) > 1, f"no concurrency built up: {peaks}"

    # Every attempt in the store belongs to a delivery the receiver got.
    assert {d for d, _ in attempts} <= set(received)
    assert len({d for d, _ in attempts}) == total
    # Every replica did some of the work.
    assert victim_sent > 0, victim_sent
    assert all(s > 0 for s in survivor_sent), survivor_sent

    print(
        f"\n{total} deliveries via 3 replicas in {elapsed:.1f}s; killed {victim.name} after"
        f" {delivered_at_kill} arrivals holding {len(victim_leased)} leases;"
        f" {len(duplicates)} delivered twice; peaks {peaks}; attempts by replica:"
        f" {victim.name}={victim_sent:.0f} (before kill),"
        f" {', '.join(f'{r.name}={s:.0f}' for r, s in zip(survivors, survivor_sent, strict=True))};"
        f" attempt rows {len(attempts)}; lease_lost logs:"
        f" {sum(r.log_events()['lease_lost'] for r in survivors)}"
    )


def _owners_of(survivors: Sequence[Replica], leases: Sequence[tuple[Any, ...]]) -> set[str]:
    """The lease owner ids of the surviving replicas: those that contain their pids."""
    owners = {str(owner) for _, owner in leases}
    return {o for o in owners if any(str(r.pid) in o.split(":") for r in survivors)}


OUT_OF_ORDER_EVENTS = 3000
OUT_OF_ORDER_WRITERS = 12
STRAGGLERS = 4
STRAGGLER_WAIT_SECONDS = 120.0


def _straggle(database_url: str, n: int, outcome: list[str], errors: list[BaseException]) -> None:
    """Insert one row, then commit only after webhookd fanned out a row with a higher id."""
    try:
        with (
            psycopg.connect(database_url, autocommit=True) as conn,
            psycopg.connect(database_url, autocommit=True) as watcher,
            conn.transaction(),
        ):
            own_id = insert_event(conn, n)
            deadline = time.monotonic() + STRAGGLER_WAIT_SECONDS
            while not scalar(
                watcher,
                "SELECT count(*) FROM webhook_outbox WHERE id > %s AND processed_at IS NOT NULL",
                (own_id,),
            ):
                if time.monotonic() > deadline:
                    outcome.append(f"{own_id}: no higher id fanned out")
                    break
                time.sleep(POLL_SECONDS)
            else:
                outcome.append(f"{own_id}: committed after a higher id was fanned out")
    except BaseException as exc:
        errors.append(exc)


@pytest.mark.timeout(600)
def test_out_of_order_commits_are_fanned_out_exactly_once(
    postgres_url: str,
    receiver_factory: Callable[[float], CountingReceiver],
    replica_factory: Callable[..., list[Replica]],
) -> None:
    receiver = receiver_factory(0.0)
    endpoints = {e: receiver.url(e) for e in ENDPOINT_IDS}
    replicas = replica_factory(3, database_url=postgres_url, endpoints=endpoints, cap=None)
    migrate(replicas[0].config)
    events = OUT_OF_ORDER_EVENTS + STRAGGLERS

    # Stragglers take the lowest ids and hold them; writers race ahead; then the replicas
    # start, while the writers are still writing.
    outcomes: list[str] = []
    errors: list[BaseException] = []
    stragglers = [
        threading.Thread(
            target=_straggle, args=(postgres_url, OUT_OF_ORDER_EVENTS + i, outcomes, errors)
        )
        for i in range(STRAGGLERS)
    ]
    for thread in stragglers:
        thread.start()
    writers = Writers(postgres_url, range(OUT_OF_ORDER_EVENTS), OUT_OF_ORDER_WRITERS, 6.0)
    writers.start()
    for replica in replicas:
        replica.start()
    for replica in replicas:
        replica.wait_ready()

    writers.join(DRAIN_TIMEOUT_SECONDS)
    for thread in stragglers:
        thread.join(STRAGGLER_WAIT_SECONDS + 10)
    assert not errors, f"a straggler failed: {errors[0]!r}"
    assert len(outcomes) == STRAGGLERS
    assert all("committed after a higher id" in o for o in outcomes), outcomes

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        wait_until(
            lambda: all_delivered(conn, events, len(ENDPOINT_IDS)),
            timeout=DRAIN_TIMEOUT_SECONDS,
            what="every delivery succeeded",
            details=lambda: progress(conn) + "\n" + details(replicas)(),
        )
        dispatched = [_metric(r, "webhookd_events_dispatched_total") for r in replicas]
        for replica in replicas:
            assert replica.stop() == 0, replica.output()
        endpoint_of = check_fan_out_exactly_once(conn, events, ENDPOINT_IDS)

    # The replicas' own count agrees: summed over them, each event was dispatched once.
    assert sum(dispatched) == events, dispatched
    arrivals = receiver.arrivals()
    received = Counter(a.delivery_id for a in arrivals)
    assert set(received) == set(endpoint_of)
    assert [d for d, c in received.items() if c > 1] == []
    for endpoint_id in ENDPOINT_IDS:
        numbers = sorted(a.n for a in arrivals if a.endpoint == endpoint_id)
        assert numbers == list(range(events))
    print(
        f"\n{events} events from {OUT_OF_ORDER_WRITERS} writers + {STRAGGLERS} stragglers,"
        f" fanned out by 3 replicas: events dispatched per replica {dispatched}"
    )


def _metric(replica: Replica, name: str) -> float:
    answer = replica.get("/metrics")
    assert answer is not None
    assert answer[0] == 200
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in answer[1].splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


RESTART_EVENTS = 2_000
RESTART_ROUNDS = 3


def test_replicas_killed_and_restarted_under_writers_lose_nothing(
    postgres_url: str,
    receiver_factory: Callable[[float], CountingReceiver],
    replica_factory: Callable[..., list[Replica]],
) -> None:
    """Two replicas, each SIGKILLed and started again in turn while the application writes:
    every event reaches every endpoint, a delivery arrives at most twice, the duplicates are
    bounded by what the killed processes could have had in flight, and the cap holds."""
    receiver = receiver_factory(HOLD_SECONDS)
    endpoints = {e: receiver.url(e) for e in ENDPOINT_IDS}
    replicas = replica_factory(2, database_url=postgres_url, endpoints=endpoints, cap=CAP)
    migrate(replicas[0].config)
    for replica in replicas:
        replica.start()
    for replica in replicas:
        replica.wait_ready()

    total = RESTART_EVENTS * len(ENDPOINT_IDS)
    writers = Writers(postgres_url, range(RESTART_EVENTS), WRITER_THREADS, WRITE_SECONDS)
    writers.start()
    kills = 0
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for round_ in range(RESTART_ROUNDS):
            for replica in replicas:
                goal = total * (round_ * len(replicas) + replicas.index(replica) + 1)
                goal //= RESTART_ROUNDS * len(replicas) + 1
                wait_until(
                    lambda goal=goal: receiver.count() >= goal,
                    timeout=DRAIN_TIMEOUT_SECONDS,
                    what=f"{goal} deliveries before killing {replica.name}",
                    details=lambda: progress(conn) + "\n" + details(replicas)(),
                )
                replica.kill()
                kills += 1
                replica.start()  # the same config: a new process, a new lease owner
                replica.wait_ready()
        writers.join(DRAIN_TIMEOUT_SECONDS)
        wait_until(
            lambda: all_delivered(conn, RESTART_EVENTS, len(ENDPOINT_IDS)),
            timeout=DRAIN_TIMEOUT_SECONDS,
            what="every delivery succeeded",
            details=lambda: progress(conn) + "\n" + details(replicas)(),
        )
        for replica in replicas:
            assert replica.stop() == 0, replica.output()
        endpoint_of = check_fan_out_exactly_once(conn, RESTART_EVENTS, ENDPOINT_IDS)

    arrivals = receiver.arrivals()
    received = Counter(a.delivery_id for a in arrivals)
    for endpoint_id in ENDPOINT_IDS:
        numbers = {a.n for a in arrivals if a.endpoint == endpoint_id}
        assert numbers == set(range(RESTART_EVENTS)), (
            f"{endpoint_id} missed {len(set(range(RESTART_EVENTS)) - numbers)} events"
        )
    assert set(received) == set(endpoint_of)
    duplicates = {d: c for d, c in received.items() if c > 1}
    # A killed process had at most CAP requests in flight per endpoint.
    assert len(duplicates) <= kills * CAP * len(ENDPOINT_IDS), duplicates
    assert all(c == 2 for c in duplicates.values()), duplicates
    peaks = receiver.max_inflight()
    assert all(peaks[e] <= CAP for e in ENDPOINT_IDS), f"peaks {peaks} > cap {CAP}"
    print(
        f"\n{total} deliveries, {kills} kills and restarts of 2 replicas under "
        f"{WRITER_THREADS} writers: {len(duplicates)} delivered twice; peaks {peaks}"
    )
