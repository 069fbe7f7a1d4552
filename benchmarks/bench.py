"""webhookd's benchmark harness: the real daemon against a fast receiver, beside its ceiling.

    .venv/bin/python benchmarks/bench.py [--scenario NAME ...] [--smoke] [--json FILE]
        [--store sqlite|postgres [--postgres-url URL] [--replicas N ...]] [--py-spy FILE]

Scenarios (all by default): burst, steady, backlog, hanging, many. Each starts a receiver in its
own process (benchmarks/receiver.py), and for each of its runs prepares a fresh database, fills
the outbox (or pre-creates pending deliveries), starts ``webhookd run --config FILE`` in a
subprocess, waits until the STORE says the deliveries succeeded, reads the daemon's CPU time and
peak RSS from /proc, stops it with SIGTERM, and checks every recorded delivery against what the
receiver got. In the same run a plain aiohttp client (benchmarks/ceiling.py) posts the same
bodies to the same receiver with the same concurrency and no store: the ceiling.

Prints each target of issue 6 with the measured value and PASS or MISS. Exit status: 0 when every
delivery was received and recorded and (without --smoke) every target was met; 1 otherwise.
``--smoke`` scales every scenario down to a few hundred events and enforces no timing target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from stores import PostgresTarget, SQLiteTarget, StoreTarget, postgres_available  # noqa: E402

PYTHON = Path(sys.executable)
WEBHOOKD = PYTHON.parent / "webhookd"
HEADER_PREFIX = "X-BookingScheduler"
SCENARIOS = ("burst", "steady", "backlog", "hanging", "many")
PER_ENDPOINT_CAP = 10  # delivery.max_concurrency_per_endpoint (the default)
GLOBAL_CAP = 256  # delivery.max_inflight (the default)
POLL_SECONDS = 0.02
READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- sizes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    burst_events: int = 5_000
    burst_endpoints: int = 4
    steady_rate: float = 200.0
    steady_seconds: float = 15.0  # timed, after the warm-up
    steady_warmup: float = 2.0
    backlog_small: int = 10_000  # pending deliveries
    backlog_large: int = 1_000_000
    backlog_window: int = 10_000  # deliveries timed in both
    backlog_endpoints: int = 4
    backlog_drain_all: bool = False
    hanging_events: int = 10_000
    hang_timeout: float = 2.0
    many_single_events: int = 10_000
    many_endpoints: int = 1_000
    many_events: int = 10


FULL = Sizes()
SMOKE = Sizes(
    burst_events=100,
    burst_endpoints=2,
    steady_seconds=1.0,
    steady_warmup=0.5,
    backlog_small=200,
    backlog_large=2_000,
    backlog_window=200,
    backlog_endpoints=2,
    backlog_drain_all=True,
    hanging_events=200,
    many_single_events=200,
    many_endpoints=100,
    many_events=2,
)


# -- events --------------------------------------------------------------------------------------


def _payload_source() -> list[tuple[str, dict[str, Any]]]:
    from webhookd.catalogue import CATALOGUE, TEST_EVENT_TYPE

    return [(t, dict(e.example_data)) for t, e in CATALOGUE.items() if t != TEST_EVENT_TYPE]


_SOURCE = _payload_source()


def outbox_row(i: int) -> tuple[str, str]:
    """The i-th event: the documentation's examples in turn (valid against the catalogue)."""
    event_type, data = _SOURCE[i % len(_SOURCE)]
    return event_type, json.dumps({**data, "benchSeq": i}, separators=(",", ":"))


def outbox_rows(n: int) -> list[tuple[str, str]]:
    return [outbox_row(i) for i in range(n)]


# -- configuration ---------------------------------------------------------------------------


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_text(config: dict[str, Any]) -> str:
    lines: list[str] = []
    for section, body in config.items():
        if section == "endpoints":
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
        lines.append("")
    for endpoint in config.get("endpoints", ()):
        lines.append("[[endpoints]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in endpoint.items()]
        lines.append("")
    return "\n".join(lines)


@dataclass(frozen=True)
class EndpointSpec:
    id: str
    path: str  # on the receiver; "/hang/..." never answers

    @property
    def hangs(self) -> bool:
        return self.path.startswith("/hang")


def endpoints_named(prefix: str, n: int) -> list[EndpointSpec]:
    width = len(str(n - 1))
    return [EndpointSpec(f"{prefix}{i:0{width}d}", f"/ep/{prefix}{i:0{width}d}") for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- processes -----------------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("WEBHOOKD_")}


def proc_cpu_seconds(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15)


def proc_peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def with_children(pid: int) -> list[int]:
    """``pid`` and its child processes (a daemon's sender processes, delivery.sender_processes)."""
    found = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def cpu_of(pids: Sequence[int | None]) -> float:
    return sum(proc_cpu_seconds(p) or 0.0 for p in pids if p is not None)


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


class Receiver:
    """benchmarks/receiver.py in its own process."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            str(PYTHON),
            str(BENCH_DIR / "receiver.py"),
            "--header-prefix",
            HEADER_PREFIX,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        if not line.strip():
            raise RuntimeError("the receiver did not start")
        self.port = int(line)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    async def _call(self, method: str, path: str) -> Any:
        timeout = aiohttp.ClientTimeout(total=60)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(method, self.base_url + path) as response,
        ):
            response.raise_for_status()
            return await response.json() if method == "GET" else None

    async def reset(self) -> None:
        await self._call("POST", "/_reset")

    async def stats(self) -> dict[str, Any]:
        return dict(await self._call("GET", "/_stats"))

    async def dump(self) -> dict[str, Any]:
        return dict(await self._call("GET", "/_dump"))


class Daemons:
    """``webhookd run`` in subprocesses (N replicas share one database)."""

    def __init__(self, workdir: Path, configs: list[Path]) -> None:
        self.workdir = workdir
        self.configs = configs
        self.procs: list[asyncio.subprocess.Process] = []
        self.started_at = 0.0

    async def start(self) -> None:
        self.started_at = time.time()
        for i, config in enumerate(self.configs):
            out = (self.workdir / f"daemon{i}.log").open("ab")
            try:
                proc = await asyncio.create_subprocess_exec(
                    str(WEBHOOKD),
                    "run",
                    "--config",
                    str(config),
                    env=clean_env(),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                )
            finally:
                out.close()
            self.procs.append(proc)

    def exited(self) -> str | None:
        for i, p in enumerate(self.procs):
            if p.returncode is not None:
                return f"daemon {i} exited with {p.returncode}; see {self.workdir}/daemon{i}.log"
        return None

    def cpu_seconds(self) -> float:
        """Of the daemons and their sender processes."""
        return sum(proc_cpu_seconds(pid) or 0.0 for p in self.procs for pid in with_children(p.pid))

    def peak_rss_mb(self) -> float:
        """The largest of the daemons', each with its sender processes' peaks added."""
        return max(
            (sum(proc_peak_rss_mb(pid) or 0.0 for pid in with_children(p.pid)) for p in self.procs),
            default=0.0,
        )

    async def wait_ready(self, ports: list[int]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            for port in ports:
                while True:
                    if (problem := self.exited()) is not None:
                        raise RuntimeError(problem)
                    if time.monotonic() > deadline:
                        raise RuntimeError("the daemon did not become ready")
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with session.get(f"http://127.0.0.1:{port}/readyz") as r:
                            if r.status == 200:
                                break
                    await asyncio.sleep(0.05)

    async def stop(self) -> list[int | None]:
        for p in self.procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for p in self.procs:
            try:
                codes.append(await asyncio.wait_for(p.wait(), STOP_TIMEOUT_SECONDS))
            except TimeoutError:
                p.kill()
                await p.wait()
                codes.append(None)
        return codes


# -- one daemon run ------------------------------------------------------------------------------


@dataclass
class RunSpec:
    label: str
    endpoints: list[EndpointSpec]
    events: int  # committed to the outbox before the daemon starts
    precreate: bool = False  # fan them out (pending deliveries) before the daemon starts
    steady_rate: float | None = None  # else: commit this many events a second after ready
    steady_events: int = 0
    warmup_seconds: float = 0.0  # steady: events of the first seconds are not judged
    window: int | None = None  # stop once this many succeeded (None: every delivery)
    delivery_timeout: float = 15.0
    ceiling: bool = True

    @property
    def healthy(self) -> list[EndpointSpec]:
        return [e for e in self.endpoints if not e.hangs]

    @property
    def expected(self) -> int:
        return (self.events + self.steady_events) * len(self.healthy)

    @property
    def target(self) -> int:
        return self.window if self.window is not None else self.expected


@dataclass
class RunResult:
    label: str
    repetition: int = 1
    command: str = ""
    store: str = "sqlite"
    replicas: int = 1
    endpoints: int = 0
    events: int = 0
    expected: int = 0  # deliveries to healthy endpoints
    timed: int = 0  # deliveries in the timed window
    fill_seconds: float = 0.0  # outbox rows written (and fanned out, for a backlog)
    precreate_seconds: float = 0.0
    first_delivery_seconds: float | None = None  # daemon start → first receipt
    drain_seconds: float | None = None  # first receipt → window recorded in the store
    deliveries_per_second: float | None = None
    receiver_rate: float | None = None  # window / (first → window-th receipt)
    latency_ms: dict[str, float] = field(default_factory=dict)  # occurred → received
    latency_steady_ms: dict[str, float] = field(default_factory=dict)  # after the warm-up
    cpu_seconds: float | None = None  # the whole daemon process, start to end of the window
    cpu_seconds_window: float | None = None
    cpu_ms_per_delivery: float | None = None
    peak_rss_mb: float | None = None
    # Cores kept busy during the window by processes other than the daemon, the receiver and
    # the harness (other people's work on a shared machine): the noise behind the figures.
    other_load_cores: float | None = None
    recorded: int = 0  # succeeded in the store (healthy endpoints)
    received: int = 0  # distinct delivery ids at the receiver
    duplicates: int = 0  # receipts beyond the first of a delivery id
    not_received: int = 0  # succeeded in the store but never at the receiver
    unknown: int = 0  # received ids that the store does not know as succeeded
    states: dict[str, int] = field(default_factory=dict)
    all_recorded: bool = False
    exit_codes: list[int | None] = field(default_factory=list)
    error: str | None = None
    ceiling_rate: float | None = None  # the best of the ceiling runs (before, after)
    ceiling_rates: list[float] = field(default_factory=list)
    ceiling_concurrency: int | None = None
    ceiling_latency_ms: dict[str, float] = field(default_factory=dict)
    ceiling_errors: int = 0
    ratio_to_ceiling: float | None = None


def quantiles_ms(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    if len(ordered) == 1:
        v = ordered[0] * 1000
        return {"p50": v, "p95": v, "p99": v, "max": v}
    q = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "p50": q[49] * 1000,
        "p95": q[94] * 1000,
        "p99": q[98] * 1000,
        "max": ordered[-1] * 1000,
    }


_TS_CACHE: dict[str, float] = {}


def timestamp_seconds(text: str) -> float:
    value = _TS_CACHE.get(text)
    if value is None:
        value = _TS_CACHE[text] = datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    return value


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.store_name: str = args.store
        self.py_spy: Path | None = args.py_spy
        self._serial = 0
        self._done_at = 0.0

    def profiling(self, scenario: str) -> bool:
        """Whether to run py-spy on the daemon of this scenario's profiled run (once)."""
        return self.py_spy is not None and scenario == self.args.profile_scenario

    def _target(self, directory: Path) -> StoreTarget:
        if self.store_name == "postgres":
            return PostgresTarget(self.args.postgres_url)
        return SQLiteTarget(directory)

    async def run(
        self,
        spec: RunSpec,
        receiver: Receiver,
        replicas: int = 1,
        profile: bool = False,
    ) -> RunResult:
        self._serial += 1
        rundir = self.workdir / f"{self._serial:02d}-{spec.label}"
        rundir.mkdir()
        target = self._target(rundir)
        if replicas > target.max_replicas:
            raise SystemExit(f"the {target.name} store runs at most {target.max_replicas} daemon")
        result = RunResult(
            label=spec.label,
            store=target.name,
            replicas=replicas,
            endpoints=len(spec.endpoints),
            events=spec.events + spec.steady_events,
            expected=spec.expected,
            timed=spec.target,
        )
        ports = [free_port() for _ in range(replicas)]
        configs = []
        for i, port in enumerate(ports):
            config: dict[str, Any] = {
                "database": target.database_section(),
                "http": {"listen": f"127.0.0.1:{port}"},
                "delivery": {
                    "allow_http": True,
                    "allowed_networks": ["127.0.0.0/8"],
                    "timeout_seconds": spec.delivery_timeout,
                    "max_concurrency_per_endpoint": PER_ENDPOINT_CAP,
                    "max_inflight": GLOBAL_CAP,
                    "header_prefix": HEADER_PREFIX,
                    "sender_processes": self.args.sender_processes,
                },
                "endpoints": [
                    {"id": e.id, "url": receiver.base_url + e.path, "secret": f"bench-{e.id}"}
                    for e in spec.endpoints
                ],
            }
            path = rundir / f"webhookd{i}.toml"
            path.write_text(toml_text(config), encoding="utf-8")
            configs.append(path)
        result.command = f"webhookd run --config {configs[0].name}" + (
            f" (x{replicas})" if replicas > 1 else ""
        )
        await target.create()
        daemons = Daemons(rundir, configs)
        spy: asyncio.subprocess.Process | None = None
        try:
            await self._prepare(spec, target, configs[0], result)
            if spec.ceiling and spec.steady_rate is None:  # the ceiling before, and after
                await self._ceiling(
                    spec, receiver, generated_requests(spec), rundir / "ceiling0.tsv", result
                )
            await receiver.reset()
            await daemons.start()
            if profile and self.py_spy is not None:
                spy = await _start_py_spy(daemons.procs[0].pid, self.py_spy)
            if spec.steady_rate is not None:
                await daemons.wait_ready(ports)
                writer = asyncio.create_task(self._steady_writer(spec, target))
            else:
                writer = None
            await self._wait_recorded(spec, target, daemons, receiver, result)
            if writer is not None:
                await writer
        except Exception as exc:  # reported, and the run counts as not recorded
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            if spy is not None:
                await _stop_py_spy(spy)
            result.exit_codes = await daemons.stop()
        try:
            await self._check(spec, target, receiver, daemons, result)
            if spec.ceiling and result.error is None:
                # The bodies exactly as the daemon stored and sent them.
                paths = {e.id: e.path for e in spec.endpoints}
                sent = [
                    (paths[ep], dlv, et, body)
                    for ep, dlv, et, body in await target.sent_bodies(spec.target)
                ]
                await self._ceiling(spec, receiver, sent, rundir / "ceiling1.tsv", result)
            result.ratio_to_ceiling = _ratio(result.deliveries_per_second, result.ceiling_rate)
        finally:
            await target.drop()
        return result

    async def _prepare(
        self, spec: RunSpec, target: StoreTarget, config: Path, result: RunResult
    ) -> None:
        from webhookd.settings import load_settings
        from webhookd.store import open_store

        settings = load_settings(config)
        store = open_store(settings)
        await store.open()
        try:
            await store.migrate()
            t0 = time.perf_counter()
            rows = outbox_rows(spec.events)
            await target.insert_outbox(rows)
            del rows
            result.fill_seconds = time.perf_counter() - t0
            if spec.precreate:
                t0 = time.perf_counter()
                await precreate(store, settings)
                result.precreate_seconds = time.perf_counter() - t0
        finally:
            await store.close()

    async def _steady_writer(self, spec: RunSpec, target: StoreTarget) -> None:
        assert spec.steady_rate is not None
        t0 = time.perf_counter()
        for i in range(spec.steady_events):
            delay = t0 + i / spec.steady_rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await target.insert_one(*outbox_row(spec.events + i))

    async def _wait_recorded(
        self,
        spec: RunSpec,
        target: StoreTarget,
        daemons: Daemons,
        receiver: Receiver,
        result: RunResult,
    ) -> None:
        want = spec.target
        # Bounded: a daemon that stalls fails the run instead of hanging the harness.
        base = 20.0 if self.args.smoke else 60.0
        budget = base + want / 50.0 + (spec.steady_events / (spec.steady_rate or 1))
        deadline = time.monotonic() + budget
        cpu_at_first: float | None = None
        ours = [os.getpid(), receiver.pid]
        load_at_first = (0.0, 0.0, 0.0)
        while True:
            await asyncio.sleep(POLL_SECONDS)
            now = time.time()
            done = await target.succeeded_count()
            if done and cpu_at_first is None:
                cpu_at_first = daemons.cpu_seconds()
                load_at_first = (time.monotonic(), machine_busy_seconds(), cpu_of(ours))
            if done >= want:
                result.cpu_seconds = daemons.cpu_seconds()
                result.peak_rss_mb = daemons.peak_rss_mb()
                if cpu_at_first is not None:
                    result.cpu_seconds_window = result.cpu_seconds - cpu_at_first
                    wall = time.monotonic() - load_at_first[0]
                    others = (
                        machine_busy_seconds()
                        - load_at_first[1]
                        - (cpu_of(ours) - load_at_first[2])
                        - result.cpu_seconds_window
                    )
                    if wall > 0.2:
                        result.other_load_cores = max(0.0, others / wall)
                self._done_at = now
                return
            if (problem := daemons.exited()) is not None:
                raise RuntimeError(problem)
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {done} of {want} recorded after {budget:.0f} s")

    async def _check(
        self,
        spec: RunSpec,
        target: StoreTarget,
        receiver: Receiver,
        daemons: Daemons,
        result: RunResult,
    ) -> None:
        dump = await receiver.dump()
        if self.args.keep:
            (self.workdir / f"{self._serial:02d}-{spec.label}" / "received.json").write_text(
                json.dumps(dump)
            )
        healthy = {e.id for e in spec.healthy}
        counts = await target.state_counts()
        states: dict[str, int] = {}
        for (ep, state), n in counts.items():
            key = state if ep in healthy else f"{state} (hanging)"
            states[key] = states.get(key, 0) + n
        result.states = states
        result.recorded = sum(n for (ep, st), n in counts.items() if st == "succeeded")
        succeeded = await target.succeeded_ids()
        ids = [d for d in dump["deliveries"] if d is not None]
        distinct = set(ids)
        result.received = len(distinct)
        result.duplicates = len(ids) - len(distinct)
        result.not_received = len(succeeded - distinct)
        # Received after the store was read (the daemon went on past the window) is fine.
        result.unknown = len(distinct - succeeded) if spec.window is None else 0
        if spec.window is None:
            complete = result.recorded == spec.expected and states.get("succeeded") == spec.expected
        else:
            complete = result.recorded >= spec.window
        result.all_recorded = (
            result.error is None and complete and result.not_received == 0 and result.unknown == 0
        )
        times: list[float] = dump["times"]
        if not times:
            return
        first = min(times)
        result.first_delivery_seconds = first - daemons.started_at
        if result.error is None:
            result.drain_seconds = self._done_at - first
            result.deliveries_per_second = spec.target / max(result.drain_seconds, 1e-9)
            ordered = sorted(times)
            if len(ordered) >= spec.target > 1:
                span = ordered[spec.target - 1] - first
                result.receiver_rate = (spec.target - 1) / max(span, 1e-9)
            if result.cpu_seconds_window is not None and spec.target:
                result.cpu_ms_per_delivery = result.cpu_seconds_window * 1000 / spec.target
        latencies = [
            t - timestamp_seconds(ts)
            for t, ts, d in zip(times, dump["timestamps"], dump["deliveries"], strict=True)
            if ts and d is not None
        ]
        result.latency_ms = quantiles_ms(latencies)
        if spec.warmup_seconds:
            occurred = [timestamp_seconds(ts) for ts in dump["timestamps"] if ts]
            start = min(occurred, default=0.0) + spec.warmup_seconds
            result.latency_steady_ms = quantiles_ms(
                [
                    t - timestamp_seconds(ts)
                    for t, ts, d in zip(times, dump["timestamps"], dump["deliveries"], strict=True)
                    if ts and d is not None and timestamp_seconds(ts) >= start
                ]
            )

    async def _ceiling(
        self,
        spec: RunSpec,
        receiver: Receiver,
        requests: list[tuple[str, str, str, bytes]],
        path: Path,
        result: RunResult,
    ) -> None:
        """Post ``requests`` (path, delivery id, event type, body) with the plain client."""
        if not requests:
            return
        write_requests(path, requests)
        endpoints_used = len({p for p, _, _, _ in requests})
        concurrency = min(PER_ENDPOINT_CAP * endpoints_used, GLOBAL_CAP)
        result.ceiling_concurrency = concurrency
        from webhookd.signing import USER_AGENT

        command = [
            str(PYTHON),
            str(BENCH_DIR / "ceiling.py"),
            "--base-url",
            receiver.base_url,
            "--input",
            str(path),
            "--concurrency",
            str(concurrency),
            "--timeout",
            str(spec.delivery_timeout),
            "--header-prefix",
            HEADER_PREFIX,
            "--user-agent",
            USER_AGENT,
        ]
        if spec.steady_rate is not None:
            command += ["--rate", str(spec.steady_rate)]
        await receiver.reset()
        proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 60 + len(requests) / 50)
        if proc.returncode != 0:
            raise RuntimeError(f"the ceiling client failed with {proc.returncode}")
        report = json.loads(out)
        result.ceiling_errors += int(report["errors"])
        if report["ok"] and report["first_start"] is not None:
            span = float(report["last_end"]) - float(report["first_start"])
            result.ceiling_rates.append(int(report["ok"]) / max(span, 1e-9))
            result.ceiling_rate = max(result.ceiling_rates)
        dump = await receiver.dump()
        latencies = [t - float(s) for t, s in zip(dump["times"], dump["sent"], strict=True) if s]
        if latencies:
            result.ceiling_latency_ms = quantiles_ms(latencies)


def write_requests(path: Path, requests: list[tuple[str, str, str, bytes]]) -> None:
    path.write_bytes(
        b"".join(
            p.encode() + b"\t" + dlv.encode() + b"\t" + et.encode() + b"\t" + body + b"\n"
            for p, dlv, et, body in requests
        )
    )


def generated_requests(spec: RunSpec) -> list[tuple[str, str, str, bytes]]:
    """The run's first ``spec.target`` requests, built as webhookd builds them (same rows, same
    envelope, the time of now), in the order the daemon creates the deliveries."""
    from webhookd.events import build_body, format_timestamp, parse_payload

    timestamp = format_timestamp(datetime.now(UTC))
    out: list[tuple[str, str, str, bytes]] = []
    for i in range(spec.events + spec.steady_events):
        event_type, payload = outbox_row(i)
        body = build_body(event_type, timestamp, parse_payload(payload, max_bytes=1 << 20).text)
        for e in spec.healthy:
            out.append((e.path, f"dlv_ceiling_{i}_{e.id}", event_type, body))
            if len(out) >= spec.target:
                return out
    return out


async def precreate(store: Any, settings: Any, batch: int = 20_000) -> None:
    """Fan out every outbox row before the daemon starts, with the daemon's own planner and
    store (big batches): the pending deliveries of a large backlog."""
    from webhookd import endpoints as endpoints_mod
    from webhookd.dispatcher import plan_fanout

    endpoints = endpoints_mod.from_settings(settings)
    max_payload = settings.outbox.max_payload_bytes
    policy = settings.events.policy()
    while True:
        now = time.time()

        def planner(rows: Any, now: float = now) -> Any:
            return plan_fanout(
                rows, endpoints, max_payload_bytes=max_payload, now=now, policy=policy
            )

        result = await store.fan_out(planner, batch, now, max_payload_bytes=max_payload)
        if result.rows < batch:
            return


async def _start_py_spy(pid: int, out: Path) -> asyncio.subprocess.Process:
    py_spy = PYTHON.parent / "py-spy"
    fmt = {".json": "speedscope", ".txt": "raw"}.get(out.suffix, "flamegraph")
    return await asyncio.create_subprocess_exec(
        str(py_spy),
        "record",
        "--pid",
        str(pid),
        "--rate",
        "200",
        *os.environ.get("BENCH_PY_SPY_FLAGS", "").split(),
        "--format",
        fmt,
        "-o",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def _stop_py_spy(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGINT)
    try:
        await asyncio.wait_for(proc.wait(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()


# -- scenarios -----------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    value: str
    limit: str
    passed: bool | None  # None: could not be measured


@dataclass
class ScenarioReport:
    name: str
    runs: list[RunResult] = field(default_factory=list)  # every run, every repetition
    best: list[RunResult] = field(default_factory=list)  # the runs the targets are judged on
    targets: list[Target] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def all_recorded(self) -> bool:
        return bool(self.runs) and all(r.all_recorded for r in self.runs)


def _fmt(value: float | None, spec: str = ".0f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}/s"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _share_ceiling(to: RunResult, source: RunResult) -> None:
    """``to`` had no ceiling of its own: it is judged against ``source``'s (same requests)."""
    to.ceiling_rate, to.ceiling_rates = source.ceiling_rate, source.ceiling_rates
    to.ceiling_concurrency = source.ceiling_concurrency
    to.ratio_to_ceiling = _ratio(to.deliveries_per_second, to.ceiling_rate)


# Each scenario: the runs it makes (spec, replicas, whether --py-spy profiles it), and its
# targets judged on one result per run (the best of --repeat repetitions).
RunPlan = tuple[RunSpec, int, bool]


def plan_burst(sizes: Sizes, replicas: Sequence[int]) -> list[RunPlan]:
    return [
        (
            RunSpec(
                f"burst-{sizes.burst_events}x{sizes.burst_endpoints}" + (f"-r{n}" if n > 1 else ""),
                endpoints_named("b", sizes.burst_endpoints),
                sizes.burst_events,
            ),
            n,
            True,
        )
        for n in replicas
    ]


def targets_burst(sizes: Sizes, runs: list[RunResult]) -> list[Target]:
    out = []
    for r in runs:
        ratio = r.ratio_to_ceiling
        out.append(
            Target(
                f"burst throughput ({r.replicas} replica(s))",
                f"{_rate(r.deliveries_per_second)} = {_fmt(ratio, '.2f')} x ceiling "
                f"{_rate(r.ceiling_rate)}, all recorded: {r.all_recorded}",
                ">= 0.80 x ceiling, all recorded",
                None if ratio is None else (ratio >= 0.80 and r.all_recorded),
            )
        )
    if len(runs) > 1:
        base = runs[0]
        for r in runs[1:]:
            scale = _ratio(r.deliveries_per_second, base.deliveries_per_second)
            out.append(
                Target(
                    f"{r.replicas} replicas vs {base.replicas}",
                    f"{_rate(r.deliveries_per_second)} vs {_rate(base.deliveries_per_second)}"
                    f" = {_fmt(scale, '.2f')}",
                    "(reported)",
                    None,
                )
            )
    return out


def plan_steady(sizes: Sizes, replicas: Sequence[int]) -> list[RunPlan]:
    n = max(1, round(sizes.steady_rate * (sizes.steady_warmup + sizes.steady_seconds)))
    spec = RunSpec(
        f"steady-{sizes.steady_rate:.0f}per-s-{n}",
        endpoints_named("s", 1),
        0,
        steady_rate=sizes.steady_rate,
        steady_events=n,
        warmup_seconds=sizes.steady_warmup,
    )
    return [(spec, 1, True)]


def targets_steady(sizes: Sizes, runs: list[RunResult]) -> list[Target]:
    (r,) = runs
    lat = r.latency_steady_ms
    p50, p99 = lat.get("p50"), lat.get("p99")
    c50, c99 = r.ceiling_latency_ms.get("p50"), r.ceiling_latency_ms.get("p99")
    after = f"after the first {sizes.steady_warmup:g} s"
    return [
        Target(
            "steady latency p50",
            f"{_fmt(p50, '.1f')} ms {after} (ceiling client {_fmt(c50, '.1f')})",
            "<= 15 ms",
            None if p50 is None else p50 <= 15,
        ),
        Target(
            "steady latency p99",
            f"{_fmt(p99, '.1f')} ms {after}; {_fmt(r.latency_ms.get('p99'), '.1f')} ms with"
            f" them (ceiling client {_fmt(c99, '.1f')})",
            "<= 60 ms",
            None if p99 is None else p99 <= 60,
        ),
    ]


def plan_backlog(sizes: Sizes, replicas: Sequence[int]) -> list[RunPlan]:
    m = sizes.backlog_endpoints
    out = []
    for pending, large in ((sizes.backlog_small, False), (sizes.backlog_large, True)):
        spec = RunSpec(
            f"backlog-{pending}",
            endpoints_named("k", m),
            math.ceil(pending / m),
            precreate=True,
            window=None if sizes.backlog_drain_all else min(sizes.backlog_window, pending),
            ceiling=not large,
        )
        out.append((spec, 1, large))
    return out


def targets_backlog(sizes: Sizes, runs: list[RunResult]) -> list[Target]:
    small, large = runs
    _share_ceiling(large, small)
    ratio = _ratio(large.deliveries_per_second, small.deliveries_per_second)
    if sizes.backlog_drain_all:  # smoke: whole backlogs, not one window: no like-for-like rate
        ratio = _ratio(large.receiver_rate, small.receiver_rate)
    cpu = _ratio(large.cpu_ms_per_delivery, small.cpu_ms_per_delivery)
    return [
        Target(
            f"throughput {large.expected} vs {small.expected} pending",
            f"{_rate(large.deliveries_per_second)} vs {_rate(small.deliveries_per_second)}"
            f" = {_fmt(ratio, '.2f')} (CPU per delivery {_fmt(cpu, '.2f')} x)",
            ">= 0.90",
            None if ratio is None else ratio >= 0.90,
        ),
        Target(
            f"peak RSS with {large.expected} pending",
            f"{_fmt(large.peak_rss_mb, '.0f')} MB",
            "<= 150 MB",
            None if large.peak_rss_mb is None else large.peak_rss_mb <= 150,
        ),
        Target(
            f"first delivery with {large.expected} pending",
            f"{_fmt(large.first_delivery_seconds, '.2f')} s after start",
            "<= 3 s",
            None if large.first_delivery_seconds is None else large.first_delivery_seconds <= 3,
        ),
    ]


def plan_hanging(sizes: Sizes, replicas: Sequence[int]) -> list[RunPlan]:
    healthy = EndpointSpec("healthy", "/ep/healthy")
    hanging = EndpointSpec("hanging", "/hang/hanging")
    alone = RunSpec(
        f"healthy-alone-{sizes.hanging_events}",
        [healthy],
        sizes.hanging_events,
        delivery_timeout=sizes.hang_timeout,
    )
    beside = RunSpec(
        f"healthy+hanging-{sizes.hanging_events}",
        [healthy, hanging],
        sizes.hanging_events,
        delivery_timeout=sizes.hang_timeout,
        ceiling=False,
    )
    return [(alone, 1, False), (beside, 1, True)]


def targets_hanging(sizes: Sizes, runs: list[RunResult]) -> list[Target]:
    a, b = runs
    _share_ceiling(b, a)
    ratio = _ratio(b.deliveries_per_second, a.deliveries_per_second)
    cost = None if ratio is None else 1 - ratio
    cpu = _ratio(b.cpu_ms_per_delivery, a.cpu_ms_per_delivery)
    return [
        Target(
            "hanging endpoint's cost to a healthy one",
            f"{_rate(b.deliveries_per_second)} beside vs {_rate(a.deliveries_per_second)} alone"
            f" = {_fmt(None if cost is None else cost * 100, '.1f')} % slower"
            f" (CPU per healthy delivery {_fmt(cpu, '.2f')} x)",
            "< 5 %",
            None if cost is None else cost < 0.05,
        )
    ]


def plan_many(sizes: Sizes, replicas: Sequence[int]) -> list[RunPlan]:
    single = RunSpec(
        f"single-endpoint-{sizes.many_single_events}",
        endpoints_named("one", 1),
        sizes.many_single_events,
    )
    many = RunSpec(
        f"{sizes.many_endpoints}-endpoints-x{sizes.many_events}",
        endpoints_named("m", sizes.many_endpoints),
        sizes.many_events,
    )
    return [(single, 1, False), (many, 1, True)]


def targets_many(sizes: Sizes, runs: list[RunResult]) -> list[Target]:
    a, b = runs
    ratio = _ratio(b.deliveries_per_second, a.deliveries_per_second)
    cpu = _ratio(b.cpu_ms_per_delivery, a.cpu_ms_per_delivery)
    return [
        Target(
            f"{sizes.many_endpoints} endpoints vs one",
            f"{_rate(b.deliveries_per_second)} vs {_rate(a.deliveries_per_second)}"
            f" = {_fmt(ratio, '.2f')} (CPU per delivery {_fmt(cpu, '.2f')} x)",
            ">= 0.70",
            None if ratio is None else ratio >= 0.70,
        )
    ]


@dataclass(frozen=True)
class Scenario:
    plan: Callable[[Sizes, Sequence[int]], list[RunPlan]]
    targets: Callable[[Sizes, list[RunResult]], list[Target]]
    better: Callable[[RunResult], float]  # the best repetition has the highest


def _throughput(r: RunResult) -> float:
    return r.deliveries_per_second or 0.0


def _steady_p99(r: RunResult) -> float:
    return -r.latency_steady_ms.get("p99", math.inf)


SCENARIO_DEFS: dict[str, Scenario] = {
    "burst": Scenario(plan_burst, targets_burst, lambda r: r.ratio_to_ceiling or 0.0),
    "steady": Scenario(plan_steady, targets_steady, _steady_p99),
    "backlog": Scenario(plan_backlog, targets_backlog, _throughput),
    "hanging": Scenario(plan_hanging, targets_hanging, _throughput),
    "many": Scenario(plan_many, targets_many, _throughput),
}


async def run_scenario(
    bench: Bench, name: str, sizes: Sizes, receiver: Receiver, repeat: int
) -> ScenarioReport:
    """Every run of the scenario, ``repeat`` times, interleaved (A B A B ...) so that a noisy
    neighbour hits both sides of a comparison alike; each run's best repetition is judged."""
    scenario = SCENARIO_DEFS[name]
    plans = scenario.plan(sizes, bench.args.replicas)
    report = ScenarioReport(name)
    results: list[list[RunResult]] = [[] for _ in plans]
    for rep in range(repeat):
        for i, (spec, replicas, profiled) in enumerate(plans):
            profile = profiled and rep == 0 and bench.profiling(name)
            r = await bench.run(spec, receiver, replicas, profile=profile)
            r.repetition = rep + 1
            results[i].append(r)
            report.runs.append(r)
    report.best = [max(rs, key=scenario.better) for rs in results]
    report.targets = scenario.targets(sizes, report.best)
    return report


# -- output --------------------------------------------------------------------------------------


def print_run(r: RunResult, best: bool = False) -> None:
    lat = r.latency_ms
    print(
        f"  {r.label}"
        + (f" #{r.repetition}" if r.repetition > 1 or best else "")
        + (" (judged)" if best else "")
        + f": {r.timed} deliveries ({r.endpoints} endpoint(s), {r.store},"
        f" {r.replicas} replica(s)); other load {_fmt(r.other_load_cores, '.2f')} cores"
    )
    if r.error:
        print(f"    ERROR: {r.error}")
    print(
        f"    throughput {_rate(r.deliveries_per_second)} (store) "
        f"{_rate(r.receiver_rate)} (receiver); ceiling {_rate(r.ceiling_rate)} "
        f"(best of {', '.join(f'{c:.0f}' for c in r.ceiling_rates) or 'none'}) "
        f"at concurrency {r.ceiling_concurrency or 'n/a'}; ratio {_fmt(r.ratio_to_ceiling, '.2f')}"
    )
    print(
        f"    latency occurred->received p50 {_fmt(lat.get('p50'), '.1f')} "
        f"p95 {_fmt(lat.get('p95'), '.1f')} p99 {_fmt(lat.get('p99'), '.1f')} "
        f"max {_fmt(lat.get('max'), '.1f')} ms"
        + (
            f"; after warm-up p50 {_fmt(r.latency_steady_ms.get('p50'), '.1f')}"
            f" p99 {_fmt(r.latency_steady_ms.get('p99'), '.1f')}"
            f" max {_fmt(r.latency_steady_ms.get('max'), '.1f')} ms"
            if r.latency_steady_ms
            else ""
        )
        + (
            f"; ceiling client sent->received p50 {_fmt(r.ceiling_latency_ms.get('p50'), '.1f')}"
            f" p99 {_fmt(r.ceiling_latency_ms.get('p99'), '.1f')} ms"
            if r.ceiling_latency_ms
            else ""
        )
    )
    print(
        f"    first delivery {_fmt(r.first_delivery_seconds, '.2f')} s after start; drain "
        f"{_fmt(r.drain_seconds, '.2f')} s; daemon CPU {_fmt(r.cpu_seconds, '.1f')} s "
        f"({_fmt(r.cpu_seconds_window, '.1f')} s in the window, "
        f"{_fmt(r.cpu_ms_per_delivery, '.2f')} ms/delivery); peak RSS "
        f"{_fmt(r.peak_rss_mb, '.0f')} MB"
    )
    prep = f"fill {r.fill_seconds:.1f} s" + (
        f", pre-created deliveries in {r.precreate_seconds:.1f} s" if r.precreate_seconds else ""
    )
    print(
        f"    recorded {r.recorded}/{r.expected} succeeded, received {r.received} "
        f"(dup {r.duplicates}, not received {r.not_received}, unknown {r.unknown}); "
        f"states {r.states}; {prep}; all recorded: {r.all_recorded}"
    )


def print_targets(report: ScenarioReport) -> None:
    for t in report.targets:
        verdict = "n/a " if t.passed is None else ("PASS" if t.passed else "MISS")
        print(f"  [{verdict}] {t.name}: {t.value} (target {t.limit})")


def markdown(reports: list[ScenarioReport], command: str) -> str:
    """The report as Markdown tables, for benchmarks/RESULTS.md."""
    out = []
    for rep in reports:
        out += [
            f"### {rep.name}",
            "",
            f"`{command} --scenario {rep.name}`",
            "",
            "| run | deliveries | throughput (store) | ceiling | ratio | latency p50 / p95 / p99"
            " | first delivery | daemon CPU (window) | CPU/delivery | peak RSS | other load"
            " | recorded |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rep.runs:
            judged = any(r is b for b in rep.best) and len(rep.runs) > len(rep.best)
            lat = r.latency_steady_ms or r.latency_ms
            name = r.label + (f" #{r.repetition}" if len(rep.runs) > len(rep.best) else "")
            out.append(
                f"| {'**' + name + '**' if judged else name} | {r.timed} "
                f"| {_rate(r.deliveries_per_second)} | {_rate(r.ceiling_rate)} "
                f"| {_fmt(r.ratio_to_ceiling, '.2f')} "
                f"| {_fmt(lat.get('p50'), '.1f')} / {_fmt(lat.get('p95'), '.1f')} / "
                f"{_fmt(lat.get('p99'), '.1f')} ms "
                f"| {_fmt(r.first_delivery_seconds, '.2f')} s "
                f"| {_fmt(r.cpu_seconds_window, '.1f')} s "
                f"| {_fmt(r.cpu_ms_per_delivery, '.2f')} ms | {_fmt(r.peak_rss_mb, '.0f')} MB "
                f"| {_fmt(r.other_load_cores, '.2f')} "
                f"| {r.recorded}/{r.expected}"
                + (f" (window {r.timed})" if r.timed != r.expected else "")
                + f"{'' if r.all_recorded else ' (NOT ALL)'} |"
            )
        out.append("")
        for t in rep.targets:
            verdict = "n/a" if t.passed is None else ("PASS" if t.passed else "MISS")
            out.append(f"- **{verdict}** {t.name}: {t.value} (target {t.limit})")
        out.append("")
    return "\n".join(out)


def source_state() -> str:
    """The commit measured, and whether webhookd/ had uncommitted changes (read-only git)."""
    import subprocess

    root = BENCH_DIR.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "webhookd"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (f" + uncommitted changes in {len(dirty.splitlines())} file(s)" if dirty else "")


# -- main ----------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    sizes = SMOKE if args.smoke else FULL
    names = args.scenario or list(SCENARIOS)
    if args.store == "postgres":
        problem = postgres_available()
        if problem is not None:
            print(f"--store postgres: {problem}", file=sys.stderr)
            return 2
    elif any(n > 1 for n in args.replicas):
        print("--replicas above 1 needs --store postgres", file=sys.stderr)
        return 2
    started = time.perf_counter()
    source = source_state()
    reports: list[ScenarioReport] = []
    with tempfile.TemporaryDirectory(prefix="webhookd-bench-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        bench = Bench(args, workdir)
        print(
            f"webhookd benchmark: {', '.join(names)}; {'smoke' if args.smoke else 'full'} sizes;"
            f" {args.store} store; sender processes {args.sender_processes};"
            f" {os.cpu_count()} CPUs; source {source};"
            f" load average {os.getloadavg()[0]:.2f}; work dir {workdir}"
        )
        for name in names:
            receiver = Receiver()
            await receiver.start()
            t0 = time.perf_counter()
            try:
                print(f"\n== {name}")
                report = await run_scenario(bench, name, sizes, receiver, args.repeat)
            finally:
                await receiver.stop()
            report.seconds = time.perf_counter() - t0
            reports.append(report)
            for r in report.runs:
                print_run(r, best=args.repeat > 1 and any(r is b for b in report.best))
            print_targets(report)
    all_recorded = all(r.all_recorded for r in reports)
    targets_met = all(t.passed for r in reports for t in r.targets)
    total = time.perf_counter() - started
    print(
        f"\nevery delivery received and recorded: {all_recorded}; every target met: "
        f"{targets_met}{' (not enforced: --smoke)' if args.smoke else ''}; {total:.0f} s"
    )
    if args.markdown is not None:
        command = (
            ".venv/bin/python benchmarks/bench.py"
            + (" --smoke" if args.smoke else "")
            + (f" --repeat {args.repeat}" if args.repeat > 1 else "")
            + (f" --store {args.store}" if args.store != "sqlite" else "")
            + "".join(f" --replicas {n}" for n in args.replicas if args.replicas != [1])
            + (f" --sender-processes {args.sender_processes}" if args.sender_processes else "")
        )
        args.markdown.write_text(markdown(reports, command), encoding="utf-8")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "smoke": args.smoke,
                    "store": args.store,
                    "sender_processes": args.sender_processes,
                    "cpus": os.cpu_count(),
                    "source": source,
                    "seconds": total,
                    "all_recorded": all_recorded,
                    "all_targets_met": targets_met,
                    "scenarios": {
                        r.name: {
                            "all_recorded": r.all_recorded,
                            "seconds": r.seconds,
                            "runs": [asdict(x) for x in r.runs],
                            "judged": [r.runs.index(x) for x in r.best],
                            "targets": [asdict(t) for t in r.targets],
                        }
                        for r in reports
                    },
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
    if args.smoke:
        return 0 if all_recorded else 1
    return 0 if all_recorded and targets_met else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="repeatable")
    parser.add_argument("--smoke", action="store_true", help="a few hundred events each")
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument(
        "--postgres-url",
        help="a server where the harness may create and drop databases (default: a throw-away "
        "cluster it starts itself with PostgreSQL's initdb and pg_ctl, and removes after)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        action="append",
        help="daemons per burst run, repeatable: --replicas 1 --replicas 2 (postgres)",
    )
    parser.add_argument(
        "--profile-scenario",
        choices=SCENARIOS,
        default="burst",
        help="the scenario --py-spy profiles (backlog: the large run; hanging and many: the "
        "second run)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each scenario's runs N times, interleaved; targets judge each run's best",
    )
    parser.add_argument(
        "--sender-processes",
        type=int,
        default=0,
        metavar="N",
        help="delivery.sender_processes of every daemon (default 0: requests made in the "
        "daemon's own process)",
    )
    parser.add_argument("--json", type=Path, help="write the report as JSON")
    parser.add_argument("--markdown", type=Path, help="write the tables for RESULTS.md")
    parser.add_argument("--keep", help="work in this directory and keep it (logs, configs)")
    parser.add_argument(
        "--py-spy",
        type=Path,
        help="profile a daemon with py-spy record into this file: .svg (flame graph), "
        ".json (speedscope) or .txt (collapsed stacks)",
    )
    args = parser.parse_args(argv)
    args.replicas = args.replicas or [1]
    return args


def run(arguments: argparse.Namespace) -> int:
    import uvloop

    if arguments.store != "postgres" or arguments.postgres_url is not None:
        return int(uvloop.run(main(arguments)))
    # No server named: a throw-away cluster, as the tests make (tests/pgcluster.py).
    sys.path.insert(0, str(BENCH_DIR.parent / "tests"))
    from pgcluster import ClusterError, ThrowAwayCluster, find_server_bindir

    bindir = find_server_bindir()
    if bindir is None:
        print("--store postgres: PostgreSQL's server is not installed; or pass --postgres-url")
        return 2
    try:
        cluster = ThrowAwayCluster(bindir)
        cluster.init()
        cluster.start()
    except ClusterError as exc:
        print(f"--store postgres: cannot start a throw-away cluster: {exc}", file=sys.stderr)
        return 2
    try:
        print(f"PostgreSQL: a throw-away cluster in {cluster.base} ({bindir})")
        arguments.postgres_url = cluster.url()
        return int(uvloop.run(main(arguments)))
    finally:
        cluster.stop()
        cluster.remove()


if __name__ == "__main__":
    sys.exit(run(parse_args()))
