"""Signing secrets (current and rotated-out), secrets read from files and credential-bearing
extra headers never appear in anything webhookd shows: the daemon's logs (JSON and logfmt, at
debug level, over runs with refused connections, 500s, retries, dead letters, a reload that
fails and garbage on the HTTP port), ``/metrics``, ``/readyz``, and the output of every command
(listings and their ``--json``, ``show`` of endpoints, deliveries and events, stats, send-test,
check-config of an invalid file that holds them, verify with a wrong secret file, ...).

The one deliberate exception: ``rotate-secret`` and ``--generate-secret`` print a new secret
once, on stdout; that output alone is not checked for that secret.

Each secret carries a distinctive token; the token must never be seen, so a secret cut short
or wrapped in quotes is caught too.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import signal
import socket
import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from webhookd.settings import DeliverySettings, Settings

if TYPE_CHECKING:
    from conftest import AioReceiver, HttpAnswer, WebhookdProcess, Workspace

StartReceiver = Callable[..., "AioReceiver"]

LOOPBACK_NETWORKS = ["127.0.0.0/8", "::1/128"]
EVENTS_PER_RUN = 4
MAX_ATTEMPTS = 3
PARALLEL_COMMANDS = 4

# name -> (secret, token that must never be seen)
STATIC = "static-Qz7Lm2Pw4Xc"
STATIC_PREVIOUS = "prev-Rk8Yj3Nn5Vb"
FROM_FILE = "file-Tp3Aa8Ss0Dd"
ERRORING = "err-Hb1Wv6Ty2Gu"
FAILING = "fail-Kx9Cc4Ee7Ff"
HEADER_TOKEN = "Bearer Hdr-Ml5Oo1Ii6Uu"
TABLE_HEADER_TOKEN = "Bearer Tbl-Zz2Qq8Ww3Ee"
TABLE_KEY = b"TABLE-hostile-key-Jj4Kk0Ll9Mm!!!"  # 32 bytes: a whsec_ key for the standard scheme
TABLE = "whsec_" + base64.b64encode(TABLE_KEY).decode("ascii")


def _token(secret: str) -> str:
    return secret.rsplit("-", 1)[-1]


SECRETS = {
    "static secret": STATIC,
    "static previous secret": STATIC_PREVIOUS,
    "secret from a file": FROM_FILE,
    "erroring endpoint secret": ERRORING,
    "failing endpoint secret": FAILING,
    "header credential": HEADER_TOKEN,
    "table header credential": TABLE_HEADER_TOKEN,
    "table secret (rotated out)": TABLE,
}
TOKENS = {name: _token(secret) for name, secret in SECRETS.items()}
TOKENS["table secret (rotated out)"] = base64.b64encode(TABLE_KEY).decode("ascii")[8:28]


def no_breaker() -> dict[str, Any]:
    """Keep failing endpoints trying (no circuit breaker pause), so dead letters come fast."""
    if "breaker" in Settings.model_fields:
        return {"breaker": {"failure_threshold": 10_000}}
    return {}


def loopback_delivery() -> dict[str, Any]:
    delivery: dict[str, Any] = {"allow_http": True, "timeout_seconds": 5.0}
    if "allowed_networks" in DeliverySettings.model_fields:
        delivery["allowed_networks"] = LOOPBACK_NETWORKS
    return delivery


@dataclass
class Seen:
    """Everything webhookd showed, by where it showed it."""

    outputs: list[tuple[str, str]] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=lambda: dict(TOKENS))

    def add(self, where: str, text: str | None) -> None:
        self.outputs.append((where, text or ""))

    def cli(self, ws: Workspace, *args: str, ok: bool | None = True, **kw: Any) -> str:
        """Run a command, record stdout and stderr, and return stdout."""
        result: subprocess.CompletedProcess[str] = ws.cli(*args, **kw)
        label = "webhookd " + " ".join(args)
        if ok is not None:
            assert (result.returncode == 0) == ok, (
                f"{label} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
            )
        self.add(f"{label} (stdout)", result.stdout)
        self.add(f"{label} (stderr)", result.stderr)
        return result.stdout

    def cli_many(
        self,
        ws: Workspace,
        commands: Sequence[Sequence[str]],
        *,
        ok: bool | None = True,
        **kw: Any,
    ) -> None:
        """:meth:`cli` for independent commands, a few at a time."""
        with ThreadPoolExecutor(max_workers=PARALLEL_COMMANDS) as pool:
            futures = [pool.submit(self.cli, ws, *args, ok=ok, **kw) for args in commands]
            for future in futures:
                future.result()

    def leaks(self) -> list[str]:
        found = []
        for where, text in self.outputs:
            for name, token in self.tokens.items():
                if token in text:
                    at = text.index(token)
                    found.append(f"{name} in {where}: ...{text[max(0, at - 80) : at + 40]!r}...")
        return found


@pytest.fixture
def seen() -> Seen:
    return Seen()


def write_config(ws: Workspace, urls: dict[str, str], *, fmt: str, **overrides: Any) -> None:
    (ws.dir / "fromfile.secret").write_text(FROM_FILE + "\n", encoding="utf-8")
    endpoints = overrides.pop("endpoints", None) or [
        {
            "id": "static",
            "url": urls["ok"],
            "secret": STATIC,
            "previous_secret": STATIC_PREVIOUS,
            "previous_secret_expires_at": "2099-01-01T00:00:00Z",
            "headers": {"Authorization": HEADER_TOKEN, "X-Tenant": "acme"},
        },
        {"id": "fromfile", "url": urls["ok"], "secret_file": "fromfile.secret"},
        {"id": "erroring", "url": urls["erroring"], "secret": ERRORING},
        {"id": "failing", "url": urls["failing"], "secret": FAILING},
    ]
    ws.write_config(
        endpoints=endpoints,
        delivery=loopback_delivery(),
        log={"level": "debug", "format": fmt},
        **no_breaker(),
        retry={"initial_delay_seconds": 0.2, "multiplier": 2.0, "jitter": 0.0,
               "max_attempts": MAX_ATTEMPTS},
        **overrides,
    )  # fmt: skip


def send_garbage(port: int) -> None:
    """A few malformed requests on the monitoring port (their logging must stay clean too)."""
    for data in (
        b"GET /healthz HTTP/1.1\r\nAuthorization: x\r\nNoColon\r\n\r\n",
        b"\x16\x03\x01garbage\r\n\r\n",
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(data)
            with contextlib.suppress(OSError):
                sock.recv(4096)


def run_daemon_with_failures(
    ws: Workspace, seen: Seen, receiver: AioReceiver, fmt: str
) -> WebhookdProcess:
    """Start the daemon, deliver events to good, erroring and refusing endpoints until the
    failing ones are dead letters, probe its HTTP port, and leave it running."""
    daemon = ws.start()
    before_ok = len(receiver.finished())
    before_failed = ws.delivery_states().get("failed", 0)
    ws.insert_outbox(
        [{"event_type": "booking.created", "payload": json.dumps({"id": f"b{i}", "run": fmt})}
         for i in range(EVENTS_PER_RUN)]
    )  # fmt: skip
    ws.wait_until(
        lambda: len(receiver.finished()) - before_ok >= 3 * EVENTS_PER_RUN,
        what="deliveries to static, fromfile and crm",
        details=daemon.output,
    )
    ws.wait_until(
        lambda: ws.delivery_states().get("failed", 0) - before_failed >= 2 * EVENTS_PER_RUN,
        what="the erroring and failing deliveries to become dead letters",
        details=daemon.output,
    )
    send_garbage(ws.port)
    for path in ("/metrics", "/readyz", "/healthz"):
        answer: HttpAnswer | None = daemon.get(path)
        assert answer is not None, path
        seen.add(f"GET {path} ({fmt} run)", answer.body)
    return daemon


def test_secrets_never_appear_in_logs_metrics_readyz_or_command_output(
    workspace: Workspace, aio_receiver: StartReceiver, dead_url: str, seen: Seen
) -> None:
    ws = workspace
    ok = aio_receiver()
    erroring = aio_receiver(status=500)
    urls = {"ok": ok.url, "erroring": erroring.url, "failing": dead_url}
    write_config(ws, urls, fmt="json")
    assert STATIC in ws.config_path.read_text()

    seen.cli(ws, "migrate")
    (ws.dir / "crm.secret").write_text(TABLE + "\n", encoding="utf-8")
    seen.cli(ws, "endpoints", "add", "crm", "--url", ok.url, "--secret-file", "crm.secret",
             "--schemes", "seed,standard",
             "--header", f"Authorization={TABLE_HEADER_TOKEN}")  # fmt: skip
    rotated = ws.cli_ok("endpoints", "rotate-secret", "crm", "--grace", "1h")
    new_secret = rotated.stdout.strip()
    assert new_secret.startswith("whsec_")
    seen.add("webhookd endpoints rotate-secret crm (stderr)", rotated.stderr)
    seen.add("webhookd endpoints rotate-secret crm (stdout, less the new secret)",
             rotated.stdout.replace(new_secret, ""))  # fmt: skip
    seen.tokens["table secret (current, shown once by rotate-secret)"] = new_secret[6:30]

    # -- a run in JSON, with a reload that fails on a file holding the secrets ------------------
    daemon = run_daemon_with_failures(ws, seen, ok, "json")
    good_config = ws.config_path.read_text()
    write_config(ws, {**urls, "failing": "ftp://nowhere.example/h"}, fmt="json")
    daemon.popen.send_signal(signal.SIGHUP)
    ws.wait_until(
        lambda: "reload_failed" in daemon.stdout(), what="reload_failed", details=daemon.output
    )
    ws.config_path.write_text(good_config)
    assert daemon.stop() == 0
    assert any(r.get("event") == "delivery_failed" for r in daemon.log_records())
    assert any(r.get("event") == "http_bad_request" for r in daemon.log_records())
    assert "Traceback" not in daemon.stderr()  # logs are structured, one event per line
    seen.add("daemon stdout (json, debug)", daemon.stdout())
    seen.add("daemon stderr (json run)", daemon.stderr())

    # -- every command -------------------------------------------------------------------------
    failed_id = ws.scalar(
        "SELECT delivery_id FROM webhookd_deliveries WHERE endpoint_id = 'failing' LIMIT 1"
    )
    erroring_id = ws.scalar(
        "SELECT delivery_id FROM webhookd_deliveries WHERE endpoint_id = 'erroring' LIMIT 1"
    )
    ok_id = ws.scalar(
        "SELECT delivery_id FROM webhookd_deliveries WHERE endpoint_id = 'static' LIMIT 1"
    )
    event_id = ws.scalar("SELECT event_id FROM webhookd_events ORDER BY id LIMIT 1")
    # Read-only commands run side by side (each start of the command costs most of a second).
    seen.cli_many(
        ws,
        [
            ("check-config",),
            ("endpoints", "list"),
            ("endpoints", "list", "--json"),
            ("endpoints", "show", "static"),
            ("endpoints", "show", "crm"),
            ("endpoints", "show", "failing", "--json"),
            ("deliveries", "list"),
            ("deliveries", "list", "--state", "failed", "--json"),
            ("deliveries", "show", failed_id),
            ("deliveries", "show", erroring_id, "--json"),
            ("deliveries", "show", ok_id),
            ("events", "show", event_id),
            ("events", "show", event_id, "--json"),
            ("quarantine", "list", "--json"),
            ("stats",),
            ("stats", "--json"),
            ("deliveries", "retry", failed_id, "--dry-run"),
        ],
    )
    seen.cli_many(
        ws,
        [("send-test", "failing"), ("send-test", "erroring", "--json"),
         ("endpoints", "show", "nope"), ("deliveries", "show", "dlv_nope"),
         ("endpoints", "rotate-secret", "static")],  # refused: defined in the config file
        ok=False,
    )  # fmt: skip
    seen.cli_many(ws, [("send-test", "static"), ("send-test", "crm", "--json")])
    seen.cli(ws, "enqueue", "booking.created", '{"id":"b-cli"}')
    seen.cli(ws, "endpoints", "update", "crm", "--header", f"Authorization={TABLE_HEADER_TOKEN}")
    seen.cli(ws, "endpoints", "update", "crm", "--header", "bad header", ok=False)  # no "="

    # -- a second run, in logfmt ---------------------------------------------------------------
    write_config(ws, urls, fmt="logfmt")
    daemon = run_daemon_with_failures(ws, seen, ok, "logfmt")
    assert daemon.stop() == 0
    assert "delivery_failed" in daemon.stdout()
    assert "Traceback" not in daemon.stderr()
    seen.add("daemon stdout (logfmt, debug)", daemon.stdout())
    seen.add("daemon stderr (logfmt run)", daemon.stderr())

    assert len(seen.outputs) > 50
    assert seen.leaks() == []


# -- errors about the secrets themselves ---------------------------------------------------------


def _seed_signature(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def test_refused_configs_and_failed_verifications_never_echo_the_secret(
    workspace: Workspace, seen: Seen
) -> None:
    ws = workspace
    urls = {"ok": "https://ok.example/h", "erroring": "https://e.example/h",
            "failing": "https://f.example/h"}  # fmt: skip
    broken = [
        # A bad URL beside the secrets, a header value that smuggles a line break, and a seed
        # secret where the standard scheme needs a whsec_ key.
        {"id": "static", "url": "ftp://x.example/h", "secret": STATIC,
         "previous_secret": STATIC_PREVIOUS, "previous_secret_expires_at": "2099-01-01T00:00:00Z",
         "headers": {"Authorization": HEADER_TOKEN + "\r\nX-Evil: 1"}},
        {"id": "std", "url": "https://s.example/h", "secret": ERRORING,
         "signature_schemes": ["standard"]},
        {"id": "std2", "url": "https://s.example/h", "secret": "whsec_" + FAILING},
        {"id": "static", "url": "https://dup.example/h", "secret": FROM_FILE},  # duplicate id
        {"id": "rot", "url": "https://r.example/h", "secret": STATIC,
         "previous_secret": STATIC_PREVIOUS},  # no expiry
    ]  # fmt: skip
    write_config(ws, urls, fmt="json", endpoints=broken)
    out = seen.cli(ws, "check-config", ok=False)
    assert out == ""
    stderr = seen.outputs[-1][1]
    assert "endpoints[0].url" in stderr
    assert "endpoints[1]" in stderr
    # Every command refuses the same file the same way.
    seen.cli_many(ws, [("endpoints", "list"), ("run",), ("stats", "--json")], ok=False)

    # A secret file for the standard scheme that is no whsec_ key, and a wrong secret.
    body = b'{"event":"booking.created","timestamp":"2024-01-15T10:00:00Z","data":{"id":"b1"}}'
    (ws.dir / "body.json").write_bytes(body)
    headers = {
        "X-BookingScheduler-Signature": _seed_signature("the-real-one", body),
        "X-BookingScheduler-Event": "booking.created",
        "X-BookingScheduler-Delivery": "dlv_1",
        "X-BookingScheduler-Timestamp": "1705312800",
    }
    (ws.dir / "headers.json").write_text(json.dumps(headers), encoding="utf-8")
    (ws.dir / "wrong.secret").write_text(f"{STATIC}\n{STATIC_PREVIOUS}\n", encoding="utf-8")
    (ws.dir / "bad-whsec.secret").write_text("whsec_" + FAILING + "\n", encoding="utf-8")
    std_headers = {"webhook-id": "msg_1", "webhook-timestamp": "1705312800",
                   "webhook-signature": "v1,AAAA"}  # fmt: skip
    (ws.dir / "std-headers.json").write_text(json.dumps(std_headers), encoding="utf-8")
    seed = ("--headers", "headers.json", "--body", "body.json")
    standard = ("--headers", "std-headers.json", "--body", "body.json", "--no-tolerance")
    seen.cli_many(
        ws,
        [
            ("verify", "--secret-file", "wrong.secret", *seed),
            ("verify", "--secret-file", "wrong.secret", "--canonical", *seed),
            ("verify", "--secret-file", "bad-whsec.secret", *standard),
            ("verify", "--secret-file", "wrong.secret", "--scheme", "standard", *standard),
        ],
        ok=False,
        config=False,
    )

    # `endpoints add` refusing a row that holds the secret.
    write_config(ws, urls, fmt="json")
    seen.cli(ws, "migrate")
    (ws.dir / "seed.secret").write_text(ERRORING + "\n", encoding="utf-8")
    add = ("endpoints", "add")
    seen.cli_many(
        ws,
        [
            (*add, "bad", "--url", "ftp://x.example/h", "--secret-file", "seed.secret"),
            (*add, "std", "--url", "https://s.example/h", "--secret-file", "seed.secret",
             "--schemes", "standard"),
            (*add, "hdr", "--url", "https://s.example/h", "--secret-file", "seed.secret",
             "--header", f"X-BookingScheduler-Signature={HEADER_TOKEN}"),
        ],
        ok=False,
    )  # fmt: skip
    assert ws.scalar("SELECT count(*) FROM webhook_endpoints") == 0

    assert seen.leaks() == []
