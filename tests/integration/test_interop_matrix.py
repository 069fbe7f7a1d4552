"""Interop matrix (issue 3, item 7): every kind of receiver verifies the deliveries of a running
daemon, before, during and after a secret rotation.

Each receiver sits behind its own ``webhook_endpoints`` row:

- ``seed-node``: the seed documentation's Express code, verbatim (tests/node/seed_receiver.js);
- ``npm``: the official ``standardwebhooks`` npm package (tests/node/standard_receiver.js);
- ``pypi``: the official ``standardwebhooks`` PyPI package, in an aiohttp handler;
- ``webhookd``: ``webhookd.verify``, in an aiohttp handler (every scheme present is checked).

Every request any receiver saw is judged by an oracle built here, independently of webhookd's
signing code: which secrets had to sign it (from the phase of its event and from its own attempt
timestamp against the end of the grace period, a whole second so that the comparison is exact),
what its signature headers must then hold, and whether that receiver, with the secrets it held at
that moment, had to accept it. The bodies are compared with JavaScript-canonical texts written out
by hand.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import math
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import pytest
from aiohttp import web
from daemon_fixtures import (
    OutboxRow,
    daemon_settings,
    deliveries,
    eventually,
    execute,
    insert_outbox,
    query,
    running_daemon,
)
from helpers import SeedReceiver, StartSeedReceiver
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from webhookd.catalogue import SEED_EVENTS
from webhookd.daemon import Daemon
from webhookd.settings import Settings
from webhookd.signing import generate_secret
from webhookd.store import open_store
from webhookd.verify import VerificationError, verify, verify_seed, verify_standard

pytestmark = pytest.mark.timeout(120)

STANDARD_RECEIVER_SCRIPT = Path(__file__).parent.parent / "node" / "standard_receiver.js"
RECEIVER_START_TIMEOUT_SECONDS = 15.0
GRACE_SECONDS = 3  # the rotation's grace period: short, so that the test can wait it out
SETTLE_TIMEOUT_SECONDS = 20.0

SIGNATURE = "x-bookingscheduler-signature"
SIGNATURE_PREVIOUS = "x-bookingscheduler-signature-previous"
DELIVERY = "x-bookingscheduler-delivery"
TIMESTAMP = "x-bookingscheduler-timestamp"
STANDARD_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
HEX64 = re.compile(r"[0-9a-f]{64}")

Kind = Literal["seed-node", "npm", "pypi", "webhookd"]
Record = dict[str, Any]
SEED = ("seed",)
STANDARD = ("standard",)
BOTH = ("seed", "standard")


# -- payloads -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """An outbox row as the application writes it, and the body every receiver must get."""

    event_type: str
    occurred_at: str
    payload: str  # JSON text, as INSERTed
    data: str  # the JavaScript-canonical text of the payload, written out by hand

    @property
    def body(self) -> str:
        return (
            f'{{"event":{json.dumps(self.event_type)},'
            f'"timestamp":{json.dumps(self.occurred_at)},"data":{self.data}}}'
        )


def _seed_sample(event_type: str, occurred_at: str, data: Mapping[str, Any]) -> Sample:
    # Inserted pretty-printed with ASCII escapes (the no-break space of "[email protected]"
    # becomes \u00a0): the body must still be the compact, unescaped form JavaScript writes.
    # These examples hold only strings, small integers and non-numeric keys, for which that
    # form is exactly Python's compact json.dumps without ensure_ascii.
    return Sample(
        event_type,
        occurred_at,
        json.dumps(data, indent=2),
        json.dumps(data, separators=(",", ":"), ensure_ascii=False),
    )


SEED_SAMPLES = [_seed_sample(t, ts, data) for t, _, ts, data in SEED_EVENTS]
STRESS_SAMPLES = [
    Sample(
        "stress.numbers",
        "2024-01-15T10:30:00.250Z",
        '{"one":1.0,"big":1e21,"small":1e-7,"negzero":-0.0,"half":0.5,"tiny":-1.5e-10,'
        '"e20":1e20,"safe":-9007199254740991}',
        '{"one":1,"big":1e+21,"small":1e-7,"negzero":0,"half":0.5,"tiny":-1.5e-10,'
        '"e20":100000000000000000000,"safe":-9007199254740991}',
    ),
    Sample(
        "stress.keys",
        "2024-01-15T10:31:00Z",
        '{"a":1,"10":2,"2":3,"b":{"z":0,"1":1,"01":2,"-1":3}}',
        '{"2":3,"10":2,"a":1,"b":{"1":1,"z":0,"01":2,"-1":3}}',
    ),
    Sample(
        "stress.text",
        "2024-01-15T10:32:00Z",
        '{"emoji":"\\ud83d\\ude00 \U0001f389","ls":"a\u2028b\\u2029c","ctrl":"\\u0001\\n\\t",'
        '"slash":"\\/"}',
        '{"emoji":"\U0001f600 \U0001f389","ls":"a\u2028b\u2029c","ctrl":"\\u0001\\n\\t",'
        '"slash":"/"}',
    ),
]


def outbox_rows(phase: str, samples: Sequence[Sample]) -> list[OutboxRow]:
    """Rows whose event ids say their phase (``p1-0``, ...) and their sample."""
    return [
        OutboxRow(s.event_type, s.payload, event_id=f"{phase}-{i}", occurred_at=s.occurred_at)
        for i, s in enumerate(samples)
    ]


# -- the oracle -----------------------------------------------------------------------------


def seed_hex(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def standard_entry(secret: str, message_id: str, timestamp: str, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def accepts(kind: Kind, knows: Sequence[str], signers: Sequence[str]) -> bool:
    """Whether a receiver holding ``knows`` must accept a request signed by ``signers``
    (current first). The seed's code checks the one seed header, by the current secret."""
    if kind == "seed-node":
        return knows[0] == signers[0]
    return any(label in signers for label in knows)


# -- receivers ------------------------------------------------------------------------------


@dataclass(eq=False)
class Target:
    """One endpoint and the receiver behind it. ``secrets``: label ("old", "new", ...) → secret;
    ``knows``: the labels the receiver holds now. Records carry the labels held when they came."""

    endpoint_id: str
    kind: Kind
    schemes: tuple[str, ...]
    secrets: dict[str, str]
    knows: tuple[str, ...]

    @property
    def url(self) -> str:
        raise NotImplementedError

    def records(self) -> list[Record]:
        raise NotImplementedError

    async def learn(self, knows: tuple[str, ...]) -> None:
        """Give the receiver these secrets, as its operator would."""
        raise NotImplementedError

    def verified_ids(self) -> set[str]:
        return {r["headers"].get(DELIVERY, "") for r in self.records() if r["verified"]}

    def __repr__(self) -> str:
        return f"{self.endpoint_id} ({self.kind}, {'+'.join(self.schemes)})"


StartNode = Callable[[list[str], int], SeedReceiver]


@dataclass(eq=False, repr=False)
class NodeTarget(Target):
    """A Node.js receiver; it learns new secrets by a restart on the same port."""

    start: StartNode
    runs: list[tuple[SeedReceiver, tuple[str, ...]]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.runs.append((self.start([self.secrets[k] for k in self.knows], 0), self.knows))

    @property
    def url(self) -> str:
        return self.runs[0][0].url

    def records(self) -> list[Record]:
        out = []
        for receiver, knows in self.runs:
            for raw in receiver.records():
                record = {**raw, "knows": knows}
                if self.kind == "seed-node":  # express.json() parsed the body; no raw text
                    record["envelope"], record["body"] = raw["body"], None
                    record["error"] = None if raw["verified"] else f"HTTP {raw['status']}"
                else:
                    record["envelope"] = _parse(raw["body"])
                out.append(record)
        return out

    async def learn(self, knows: tuple[str, ...]) -> None:
        current = self.runs[-1][0]
        await asyncio.to_thread(current.stop)
        values = [self.secrets[k] for k in knows]
        started = await asyncio.to_thread(self.start, values, current.port)
        self.runs.append((started, knows))
        self.knows = knows


class Refused(Exception):
    """The receiver's verifier refused the request."""


Verifier = Callable[[bytes, Mapping[str, str], list[str]], dict[str, Any]]


def pypi_verifier(body: bytes, headers: Mapping[str, str], secrets: list[str]) -> dict[str, Any]:
    """The PyPI package's documented use, trying each secret the receiver holds."""
    failures = []
    for index, secret in enumerate(secrets):
        try:
            Webhook(secret).verify(body, dict(headers))
        except WebhookVerificationError as exc:
            failures.append(f"secret #{index + 1}: {exc}")
        else:
            return {"secret_index": index}
    raise Refused("; ".join(failures))


def webhookd_verifier(
    body: bytes, headers: Mapping[str, str], secrets: list[str]
) -> dict[str, Any]:
    """``webhookd.verify`` as the README shows it, plus each scheme whose headers are present
    checked on its own, so that an endpoint with both schemes has both verified."""
    try:
        envelope = verify(body, headers, secrets)
        results = []
        if "X-BookingScheduler-Signature" in headers:
            results.append(verify_seed(body, headers, secrets))
        if "webhook-signature" in headers:
            results.append(verify_standard(body, headers, secrets))
    except VerificationError as exc:
        raise Refused(f"{exc.reason}: {exc}") from None
    return {
        "event": envelope.get("event"),
        "verifications": [
            {"scheme": r.scheme, "header": r.header, "signature_index": r.signature_index}
            for r in results
        ],
    }


@dataclass(eq=False, repr=False)
class PythonTarget(Target):
    """An aiohttp receiver on 127.0.0.1 in this process, verifying with ``verifier``."""

    verifier: Verifier
    _records: list[Record] = field(default_factory=list, init=False)
    _runner: web.AppRunner | None = field(default=None, init=False)
    _port: int = field(default=0, init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}/webhooks/{self.endpoint_id}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self._port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        knows = self.knows
        verified, error, detail = False, None, None
        try:
            detail = self.verifier(body, request.headers, [self.secrets[k] for k in knows])
            verified = True
        except Refused as exc:
            error = str(exc)
        except Exception as exc:  # a crash of the verifier is a finding too: record it
            error = f"verifier raised {exc!r}"
        text = body.decode("utf-8", "replace")
        self._records.append(
            {
                "status": 200 if verified else 401,
                "path": request.path,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": text,
                "envelope": _parse(text),
                "verified": verified,
                "error": error,
                "detail": detail,
                "knows": knows,
            }
        )
        return web.Response(status=200 if verified else 401, text="OK" if verified else "no")

    def records(self) -> list[Record]:
        return list(self._records)

    async def learn(self, knows: tuple[str, ...]) -> None:
        self.knows = knows


def _parse(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


# -- fixtures -------------------------------------------------------------------------------


class StandardReceiver(SeedReceiver):
    """A running ``node tests/node/standard_receiver.js`` (the standardwebhooks npm package).

    Same protocol as the seed receiver (LISTENING line, RECORD_FILE); its records also hold
    ``body`` as the raw text, ``error`` (the library's messages) and ``secret_index``.
    """


class StartStandardReceiver(Protocol):
    def __call__(self, secrets: Sequence[str], *, port: int = 0) -> StandardReceiver: ...


class _Toolchain(Protocol):
    node: str
    project_dir: Path


@pytest.fixture
def standard_receiver(
    node_modules: _Toolchain, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StartStandardReceiver]:
    """A factory: ``standard_receiver(secrets, *, port=0)`` starts the npm-verifying receiver
    holding ``secrets`` (tried in turn) and waits for it to listen; all stop at teardown."""
    started: list[StandardReceiver] = []

    def start(secrets: Sequence[str], *, port: int = 0) -> StandardReceiver:
        record_file = tmp_path_factory.mktemp("standard-receiver") / "records.jsonl"
        env = {
            **os.environ,
            "WEBHOOK_SECRETS": ",".join(secrets),
            "PORT": str(port),
            "RECORD_FILE": str(record_file),
        }
        process = subprocess.Popen(
            [node_modules.node, str(STANDARD_RECEIVER_SCRIPT)],
            cwd=node_modules.project_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        receiver = StandardReceiver(process, record_file, ",".join(secrets))
        started.append(receiver)
        if not receiver.wait_until_listening(RECEIVER_START_TIMEOUT_SECONDS):
            receiver.stop()
            pytest.fail(
                f"standard_receiver.js did not start listening. Its output:\n{receiver.output()}",
                pytrace=False,
            )
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


@dataclass
class Receivers:
    """Makes targets of every kind; Python receivers are closed at teardown."""

    seed_receiver: StartSeedReceiver
    standard_receiver: StartStandardReceiver
    python: list[PythonTarget] = field(default_factory=list)

    async def make(
        self,
        endpoint_id: str,
        kind: Kind,
        schemes: tuple[str, ...],
        secrets: dict[str, str],
        knows: tuple[str, ...],
    ) -> Target:
        if kind == "seed-node":

            def start_seed(values: list[str], port: int) -> SeedReceiver:
                [secret] = values  # the seed's code holds exactly one secret
                return self.seed_receiver(secret, port=port)

            return NodeTarget(endpoint_id, kind, schemes, secrets, knows, start_seed)
        if kind == "npm":

            def start_npm(values: list[str], port: int) -> SeedReceiver:
                return self.standard_receiver(values, port=port)

            return NodeTarget(endpoint_id, kind, schemes, secrets, knows, start_npm)
        verifier = pypi_verifier if kind == "pypi" else webhookd_verifier
        target = PythonTarget(endpoint_id, kind, schemes, secrets, knows, verifier)
        self.python.append(target)
        await target.start()
        return target


@pytest.fixture
async def receivers(
    seed_receiver: StartSeedReceiver, standard_receiver: StartStandardReceiver
) -> AsyncIterator[Receivers]:
    made = Receivers(seed_receiver, standard_receiver)
    yield made
    for target in made.python:
        await target.close()


# -- the scenario ---------------------------------------------------------------------------


def interop_settings(tmp_path: Path) -> Settings:
    # Quick retries that never run out, so that refused deliveries stay pending for the test;
    # receivers refuse on purpose here, so the circuit breaker (test_breaker.py) stays closed.
    return daemon_settings(
        tmp_path,
        retry={"max_attempts": 1000, "max_delay_seconds": 0.5},
        breaker={"failure_threshold": 10_000},
        log={"level": "error"},
    )


async def prepare_database(settings: Settings, targets: Sequence[Target]) -> None:
    """Create the tables and the endpoint rows before the daemon starts, so that it routes the
    first events to every endpoint. Schemes are written in both notations the column takes."""
    store = open_store(settings)
    await store.open()
    try:
        await store.migrate()
    finally:
        await store.close()
    for n, target in enumerate(targets):
        schemes = json.dumps(target.schemes) if n % 2 else ",".join(target.schemes)
        await execute(
            settings.database.path,
            "INSERT INTO webhook_endpoints (id, url, secret, signature_schemes)"
            " VALUES (?, ?, ?, ?)",
            (target.endpoint_id, target.url, target.secrets[target.knows[0]], schemes),
        )


def body_of(row: Any) -> bytes:
    body = row["body"]
    return body if isinstance(body, bytes) else str(body).encode("utf-8")


@dataclass
class Oracle:
    """Judges every record against what the daemon had to send and the receiver had to do."""

    db: Path
    samples: dict[str, Sample]  # event id → sample
    signers: Callable[[str, int], tuple[str, ...]]  # (event id, attempt time) → labels

    def problems(self, targets: Sequence[Target]) -> list[str]:
        rows = {row["delivery_id"]: row for row in deliveries(self.db)}
        problems = []
        for target in targets:
            for record in target.records():
                problems += self._judge(target, record, rows)
        return problems

    def _judge(self, target: Target, record: Record, rows: Mapping[str, Any]) -> list[str]:
        headers = record["headers"]
        delivery_id = headers.get(DELIVERY, "")
        where = f"{target!r} {delivery_id} at {headers.get(TIMESTAMP)} knowing {record['knows']}"
        row = rows.get(delivery_id)
        if row is None or row["endpoint_id"] != target.endpoint_id:
            return [f"{where}: not a delivery of this endpoint"]
        sample = self.samples[row["event_id"]]
        body = body_of(row)
        problems = []
        if body != sample.body.encode("utf-8"):
            problems.append(f"{where}: the event's body is {body!r}, expected {sample.body!r}")
        if record["body"] is not None and record["body"] != sample.body:
            problems.append(f"{where}: the receiver got {record['body']!r}")
        if record["envelope"] != json.loads(sample.body):
            problems.append(f"{where}: the receiver parsed {record['envelope']!r}")
        signers = self.signers(row["event_id"], int(headers[TIMESTAMP]))
        values = [target.secrets[label] for label in signers]
        problems += [f"{where}: {p}" for p in self._headers(target, headers, values, body)]
        must = accepts(target.kind, record["knows"], signers)
        if record["verified"] != must:
            problems.append(
                f"{where}: signed by {signers}, must be {'accepted' if must else 'refused'},"
                f" was not (status {record['status']}, error {record['error']!r})"
            )
        if record["verified"] and must and target.kind == "webhookd":
            problems += [f"{where}: {p}" for p in _which_signature(record, signers, target)]
        return problems

    @staticmethod
    def _headers(
        target: Target, headers: Mapping[str, str], values: list[str], body: bytes
    ) -> list[str]:
        problems = []
        delivery_id, timestamp = headers[DELIVERY], headers[TIMESTAMP]
        if "seed" in target.schemes:
            signature = headers.get(SIGNATURE, "")
            if not HEX64.fullmatch(signature):
                problems.append(f"{SIGNATURE} is not exactly one 64-hex signature: {signature!r}")
            elif signature != seed_hex(values[0], body):
                problems.append(f"{SIGNATURE} is not by the current secret")
            previous = seed_hex(values[1], body) if len(values) > 1 else None
            if headers.get(SIGNATURE_PREVIOUS) != previous:
                problems.append(
                    f"{SIGNATURE_PREVIOUS} is {headers.get(SIGNATURE_PREVIOUS)!r}, expected "
                    + ("the previous secret's signature" if previous else "no such header")
                )
        elif SIGNATURE in headers or SIGNATURE_PREVIOUS in headers:
            problems.append("seed signature headers on an endpoint without the seed scheme")
        if "standard" in target.schemes:
            if (headers.get("webhook-id"), headers.get("webhook-timestamp")) != (
                delivery_id,
                timestamp,
            ):
                problems.append("webhook-id/webhook-timestamp differ from the delivery's")
            expected = " ".join(standard_entry(v, delivery_id, timestamp, body) for v in values)
            if headers.get("webhook-signature") != expected:
                problems.append(
                    f"webhook-signature is {headers.get('webhook-signature')!r}, expected one v1"
                    f" entry per signing secret ({len(values)}), current first"
                )
        elif any(name in headers for name in STANDARD_HEADERS):
            problems.append("webhook-* headers on an endpoint without the standard scheme")
        return problems


def _which_signature(record: Record, signers: Sequence[str], target: Target) -> list[str]:
    """webhookd.verify must report the signature that matched: the first secret the receiver
    holds that signed, and the header (seed) or the entry (standard) that holds it."""
    first = next(label for label in record["knows"] if label in signers)
    index = signers.index(first)
    found = {v["scheme"]: v for v in record["detail"]["verifications"]}
    problems = []
    if set(found) != set(target.schemes):
        problems.append(f"verified schemes {sorted(found)}, expected {sorted(target.schemes)}")
    for scheme, verification in found.items():
        header = "webhook-signature"
        if scheme == "seed":
            header = SIGNATURE_PREVIOUS if index else SIGNATURE
        if (verification["header"].lower(), verification["signature_index"]) != (header, index):
            problems.append(f"webhookd.verify reported {verification}, expected {header}/{index}")
    return problems


def delivery_ids(db: Path, endpoint_id: str, phase: str) -> set[str]:
    return {
        row["delivery_id"]
        for row in deliveries(db, endpoint_id=endpoint_id)
        if row["event_id"].startswith(f"{phase}-")
    }


async def settle(oracle: Oracle, targets: Sequence[Target], expected_deliveries: int) -> None:
    """Wait until every delivery succeeded and every receiver recorded its verified request
    (a Node receiver writes its record as its response finishes, which may be a moment later)."""

    def done() -> bool:
        rows = deliveries(oracle.db)
        if len(rows) != expected_deliveries or any(r["state"] != "succeeded" for r in rows):
            return False
        return all(
            {r["delivery_id"] for r in rows if r["endpoint_id"] == t.endpoint_id}
            <= t.verified_ids()
            for t in targets
        )

    await wait_explained(done, oracle, targets, "every delivery to be verified")


async def wait_explained(
    condition: Callable[[], bool], oracle: Oracle, targets: Sequence[Target], what: str
) -> None:
    """``eventually``, and on a timeout say what the oracle found wrong and what is pending."""
    try:
        await eventually(condition, within=SETTLE_TIMEOUT_SECONDS, what=what)
    except AssertionError as exc:
        pending = [
            (r["endpoint_id"], r["event_id"], r["state"], r["attempts"])
            for r in deliveries(oracle.db)
            if r["state"] != "succeeded"
        ]
        problems = oracle.problems(targets)
        raise AssertionError(
            f"{exc}\nnot succeeded: {pending}\n{len(problems)} problem(s):\n"
            + "\n".join(problems[:20])
        ) from None


def assert_no_problems(oracle: Oracle, targets: Sequence[Target]) -> None:
    problems = oracle.problems(targets)
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:40])


async def rotate(settings: Settings, targets: Sequence[Target], expires_at: str) -> None:
    """What ``webhookd endpoints rotate-secret`` does, through the store on the same file."""
    store = open_store(settings)
    await store.open()
    try:
        for target in targets:
            assert await store.rotate_secret(target.endpoint_id, target.secrets["new"], expires_at)
    finally:
        await store.close()


async def daemon_noticed(daemon: Daemon, targets: Sequence[Target]) -> None:
    """Wait until the daemon holds the rotated endpoints. It reloads them at its next outbox
    poll; events inserted before that might go out signed by the old secret alone, which the
    oracle (it knows only when the rotation was committed) would misjudge."""
    await eventually(
        lambda: all(
            (ep := daemon.dispatcher.endpoints.get(t.endpoint_id)) is not None
            and ep.secret == t.secrets["new"]
            for t in targets
        ),
        what="the daemon to load the rotated secrets",
    )


def refused_twice(db: Path, target: Target) -> bool:
    """Every phase-3 delivery of the target was refused, and at least one was retried."""
    wanted = delivery_ids(db, target.endpoint_id, "p3")
    refused: dict[str, int] = {}
    for record in target.records():
        if not record["verified"]:
            delivery_id = record["headers"][DELIVERY]
            refused[delivery_id] = refused.get(delivery_id, 0) + 1
    return bool(wanted) and set(refused) >= wanted and max(refused.values()) >= 2


# -- tests ----------------------------------------------------------------------------------


@pytest.mark.node
async def test_every_receiver_kind_verifies_every_delivery_under_every_scheme(
    tmp_path: Path, receivers: Receivers
) -> None:
    db = tmp_path / "webhookd.db"
    settings = interop_settings(tmp_path)
    # A seed-only endpoint may keep a secret that is no whsec_ (any text, used as UTF-8).
    legacy = "s3cret, with spaces and ünïcode ✓"
    matrix: list[tuple[str, Kind, tuple[str, ...], str]] = [
        ("seed-node.seed", "seed-node", SEED, legacy),
        ("seed-node.both", "seed-node", BOTH, generate_secret()),
        ("npm.standard", "npm", STANDARD, generate_secret()),
        ("npm.both", "npm", BOTH, generate_secret()),
        ("pypi.standard", "pypi", STANDARD, generate_secret()),
        ("pypi.both", "pypi", BOTH, generate_secret()),
        ("verify.seed", "webhookd", SEED, legacy + " (verify)"),
        ("verify.standard", "webhookd", STANDARD, generate_secret()),
        ("verify.both", "webhookd", BOTH, generate_secret()),
    ]
    targets = [
        await receivers.make(ep_id, kind, schemes, {"current": secret}, ("current",))
        for ep_id, kind, schemes, secret in matrix
    ]
    samples = SEED_SAMPLES + STRESS_SAMPLES
    oracle = Oracle(
        db,
        {f"m-{i}": s for i, s in enumerate(samples)},
        signers=lambda event_id, timestamp: ("current",),
    )
    await prepare_database(settings, targets)

    async with running_daemon(settings):
        await insert_outbox(db, outbox_rows("m", samples))
        await settle(oracle, targets, len(samples) * len(targets))

    assert_no_problems(oracle, targets)
    for target in targets:
        refused = [r for r in target.records() if not r["verified"]]
        assert refused == [], f"{target!r} refused {refused}"
        assert len(target.verified_ids()) == len(samples)


@pytest.mark.node
async def test_rotation_keeps_every_receiver_verifying_through_the_grace_period(
    tmp_path: Path, receivers: Receivers
) -> None:
    db = tmp_path / "webhookd.db"
    settings = interop_settings(tmp_path)
    # Which secrets each receiver holds during the grace period: only the new one (it switched
    # at once), both, or only the old one (it has not switched yet).
    plan: list[tuple[str, Kind, tuple[str, ...], tuple[str, ...]]] = [
        ("seed-node.new", "seed-node", SEED, ("new",)),
        ("npm.new", "npm", STANDARD, ("new",)),
        ("npm.old", "npm", STANDARD, ("old",)),
        ("npm.both", "npm", BOTH, ("new", "old")),
        ("pypi.new", "pypi", STANDARD, ("new",)),
        ("pypi.old", "pypi", BOTH, ("old",)),
        ("verify.seed.new", "webhookd", SEED, ("new",)),
        ("verify.seed.old", "webhookd", SEED, ("old",)),
        ("verify.standard.old", "webhookd", STANDARD, ("old",)),
        ("verify.both.old", "webhookd", BOTH, ("old",)),
        ("verify.both.both", "webhookd", BOTH, ("new", "old")),
    ]
    targets = [
        await receivers.make(ep_id, kind, schemes, {"old": generate_secret()}, ("old",))
        for ep_id, kind, schemes, _ in plan
    ]
    in_grace = {t.endpoint_id: knows for t, (_, _, _, knows) in zip(targets, plan, strict=True)}
    old_only = [t for t in targets if in_grace[t.endpoint_id] == ("old",)]
    phases = {
        "p1": SEED_SAMPLES[:3] + STRESS_SAMPLES[:1],  # before the rotation
        "p2": SEED_SAMPLES[3:5] + STRESS_SAMPLES[1:2],  # during the grace period
        "p3": SEED_SAMPLES[5:] + STRESS_SAMPLES[2:],  # after it
    }
    grace_end = 0  # set at the rotation: a whole second, as attempt timestamps are

    def signers(event_id: str, timestamp: int) -> tuple[str, ...]:
        if event_id.startswith("p1-"):
            return ("old",)
        return ("new", "old") if timestamp < grace_end else ("new",)

    oracle = Oracle(
        db,
        {f"{p}-{i}": s for p, samples in phases.items() for i, s in enumerate(samples)},
        signers,
    )
    await prepare_database(settings, targets)
    expected = 0

    async with running_daemon(settings) as daemon:
        # Phase 1: one secret.
        await insert_outbox(db, outbox_rows("p1", phases["p1"]))
        expected += len(phases["p1"]) * len(targets)
        await settle(oracle, targets, expected)

        # The rotation. Nothing is in flight, so the receivers may switch first; the grace
        # period is measured from the rotation itself.
        for target in targets:
            target.secrets["new"] = generate_secret()
            if in_grace[target.endpoint_id] != ("old",):
                await target.learn(in_grace[target.endpoint_id])
        grace_end = math.ceil(time.time()) + GRACE_SECONDS
        expires_at = datetime.fromtimestamp(grace_end, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        await rotate(settings, targets, expires_at)
        await daemon_noticed(daemon, targets)

        # Phase 2: during the grace period every receiver verifies, old-only ones included.
        await insert_outbox(db, outbox_rows("p2", phases["p2"]))
        expected += len(phases["p2"]) * len(targets)
        await settle(oracle, targets, expected)
        # (This needs each phase-2 delivery attempted within the grace period, GRACE_SECONDS.)
        for target in old_only:
            p2 = delivery_ids(db, target.endpoint_id, "p2")
            in_grace_verified = {
                r["headers"][DELIVERY]
                for r in target.records()
                if r["verified"] and int(r["headers"][TIMESTAMP]) < grace_end
            }
            assert p2 <= in_grace_verified, f"{target!r} verified {in_grace_verified}, not {p2}"

        # Phase 3: after the grace period the old secret no longer signs.
        await asyncio.sleep(max(0.0, grace_end - time.time()) + 0.05)
        await insert_outbox(db, outbox_rows("p3", phases["p3"]))
        expected += len(phases["p3"]) * len(targets)
        await wait_explained(
            lambda: all(refused_twice(db, t) for t in old_only),
            oracle,
            targets,
            "each old-only receiver to refuse every phase-3 delivery, one of them twice",
        )
        for target in old_only:
            for row in deliveries(db, endpoint_id=target.endpoint_id):
                if row["event_id"].startswith("p3-"):
                    assert (row["state"], row["attempts"] >= 1) == ("pending", True), dict(row)
        # Their operators catch up: the refused deliveries, retried, now verify.
        for target in old_only:
            await target.learn(("new",))
        await settle(oracle, targets, expected)

    assert_no_problems(oracle, targets)
    for target in old_only:
        p3 = delivery_ids(db, target.endpoint_id, "p3")
        late = {
            r["headers"][DELIVERY]
            for r in target.records()
            if r["verified"] and r["knows"] == ("new",)
        }
        assert p3 <= late, f"{target!r}: not every refused delivery verified after the switch"


async def test_endpoint_rotated_off_a_legacy_secret_can_add_standard_webhooks(
    tmp_path: Path,
) -> None:
    # The way from a seed-only endpoint with a free-text secret to Standard Webhooks: rotate to
    # a generated whsec_ secret, wait out the grace period, add "standard". The rotated-out
    # free-text secret signs nothing any more, so it must not stand in the way.
    db = tmp_path / "webhookd.db"
    settings = interop_settings(tmp_path)
    secrets = {"old": "a free-text secret from before whsec_", "new": generate_secret()}
    target = PythonTarget("legacy", "webhookd", BOTH, secrets, ("old",), webhookd_verifier)
    await target.start()
    try:
        await prepare_database(settings, [target])
        await execute(db, "UPDATE webhook_endpoints SET signature_schemes = 'seed'")
        await rotate(settings, [target], "2024-01-01T00:00:00Z")  # a grace period long over
        await execute(db, "UPDATE webhook_endpoints SET signature_schemes = 'seed,standard'")
        await target.learn(("new",))
        sample = SEED_SAMPLES[0]
        oracle = Oracle(db, {"l-0": sample}, signers=lambda event_id, timestamp: ("new",))

        async with running_daemon(settings) as daemon:
            await insert_outbox(db, outbox_rows("l", [sample]))
            await eventually(
                lambda: query(db, "SELECT COUNT(*) FROM webhookd_events")[0][0] == 1,
                what="the event to be picked up",
            )
            endpoint = daemon.dispatcher.endpoints["legacy"]
            assert len(deliveries(db)) == 1, f"not routed: the endpoint has {endpoint.problem!r}"
            await settle(oracle, [target], 1)
    finally:
        await target.close()

    assert_no_problems(oracle, [target])
