"""The circuit breaker against real aiohttp receivers: an endpoint that keeps failing is backed off
as a whole (its deliveries wait, no attempt is spent), one probe at a time tests it after a
cool-down that grows with each failed probe up to a cap, and a success brings it back to full
speed. Failing for ``breaker.disable_after_seconds`` disables it, dropping nothing, until
``webhookd endpoints enable``. The state is logged (``endpoint_state_changed``), exported
(``webhookd_endpoint_state``), shown by ``webhookd endpoints list|show``, and kept across
restarts and reloads.

Settings are fast (thresholds of 2-3 failures, cool-downs under 2 s); every wait is bounded and
only lower bounds that follow from the configuration are asserted about time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from daemon_fixtures import (
    DELIVERY_HEADER,
    OutboxRow,
    deliveries,
    eventually,
    http_base,
    insert_endpoint,
    insert_outbox,
    query,
    running_daemon,
)

from webhookd.daemon import Daemon
from webhookd.settings import Settings, load_settings

pytestmark = pytest.mark.timeout(120)

SECRET = "whsec_breaker_secret"
CLI_TIMEOUT_SECONDS = 60.0
CLOCK_EPSILON_SECONDS = 1e-3
# Fast retries, no jitter, and a budget that never runs out during a test.
FAST_RETRY = {
    "initial_delay_seconds": 0.05,
    "multiplier": 1.0,
    "jitter": 0.0,
    "max_attempts": 1000,
    "max_age_seconds": 3600.0,
}


# -- a receiver whose answer the test switches -----------------------------------------------


@dataclass
class Hit:
    delivery_id: str
    arrived_at: float
    status: int
    answered_at: float = 0.0


@dataclass
class Receiver:
    """An aiohttp receiver on 127.0.0.1 answering ``status`` (changeable at any time) after
    ``delay_seconds``; it records each request and how many it handled at once."""

    status: int = 500
    delay_seconds: float = 0.05
    hits: list[Hit] = field(default_factory=list)
    inflight: int = 0
    max_inflight: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            await request.read()
            hit = Hit(request.headers.get(DELIVERY_HEADER, ""), time.time(), self.status)
            self.hits.append(hit)
            await asyncio.sleep(self.delay_seconds)
            hit.answered_at = time.time()
            return web.Response(status=hit.status)
        finally:
            self.inflight -= 1

    def since(self, moment: float) -> list[Hit]:
        return [h for h in self.hits if h.arrived_at > moment]


# -- configuration, CLI, logs ----------------------------------------------------------------


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(value)


def write_config(
    tmp_path: Path,
    endpoints: Sequence[Mapping[str, Any]] = (),
    **sections: Mapping[str, Any],
) -> tuple[Path, Settings]:
    """A config file for the daemon and the operator's commands alike, and its settings."""
    config: dict[str, dict[str, Any]] = {
        "database": {"path": str(tmp_path / "webhookd.db")},
        "http": {"listen": ""},
        "delivery": {"allow_http": True, "allowed_networks": ["127.0.0.0/8"]},
        "retry": dict(FAST_RETRY),
        "daemon": {"grace_seconds": 1.0},
        "log": {"level": "warning"},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    lines = []
    for name, values in config.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
    for ep in endpoints:
        lines.append("[[endpoints]]")
        lines += [f"{key} = {_toml(value)}" for key, value in ep.items()]
    path = tmp_path / "webhookd.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, load_settings(path)


def endpoint(ep_id: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"id": ep_id, "url": url, "secret": SECRET, **extra}


def bookings(n: int, start: int = 0) -> list[OutboxRow]:
    return [OutboxRow("booking.created", {"id": f"book_{i}"}) for i in range(start, start + n)]


async def webhookd(config: Path, *args: str) -> tuple[int, str, str]:
    """Run the installed ``webhookd`` command beside the running daemon."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOKD_")}
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "webhookd"),
        "--config",
        str(config),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def gauge(daemon: Daemon, endpoint_id: str, state: str) -> float | None:
    value: float | None = daemon.metrics.registry.get_sample_value(
        "webhookd_endpoint_state", {"endpoint": endpoint_id, "state": state}
    )
    return value


def state_row(db: Path, endpoint_id: str) -> Any:
    rows = query(db, "SELECT * FROM webhookd_endpoint_state WHERE endpoint_id = ?", (endpoint_id,))
    return rows[0] if rows else None


async def stored_state(db: Path, endpoint_id: str, state: str) -> Any:
    """The endpoint's stored state row, once it says ``state`` (it is written just after the
    state changes in memory)."""
    return await eventually(
        lambda: (row := state_row(db, endpoint_id)) is not None and row["state"] == state and row,
        what=f"{endpoint_id}'s stored state to be {state}",
    )


def attempts_made(db: Path) -> int:
    return int(query(db, "SELECT count(*) FROM webhookd_attempts")[0][0])


class StateChanges(logging.Handler):
    """``endpoint_state_changed`` events, as the daemon logged them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.changes: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "endpoint_state_changed":
            self.changes.append(dict(getattr(record, "webhookd_fields", {})))

    def moves(self) -> list[tuple[str, str]]:
        return [(c["from"], c["to"]) for c in self.changes]


@pytest.fixture
def state_changes() -> Iterator[StateChanges]:
    handler = StateChanges()
    logger = logging.getLogger("webhookd")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# -- backing off, probing, recovering --------------------------------------------------------


async def test_an_endpoint_that_keeps_failing_is_backed_off_then_probed_until_it_recovers(
    tmp_path: Path, state_changes: StateChanges
) -> None:
    db = tmp_path / "webhookd.db"
    cooldowns = [0.5, 1.0, 1.0]  # cooldown_seconds 0.5, multiplier 2, capped at 1.0
    async with Receiver(status=500) as receiver:
        config, settings = write_config(
            tmp_path,
            [endpoint("ep", receiver.url(), max_concurrency=4)],
            http={"listen": "127.0.0.1:0"},
            breaker={
                "failure_threshold": 3,
                "cooldown_seconds": 0.5,
                "cooldown_multiplier": 2.0,
                "max_cooldown_seconds": 1.0,
            },
        )
        async with running_daemon(settings) as daemon:
            await insert_outbox(db, bookings(12))
            await eventually(lambda: gauge(daemon, "ep", "backing_off") == 1.0, what="back-off")
            opened = await stored_state(db, "ep", "backing_off")
            # Three probes fail, each after its cool-down.
            await eventually(
                lambda: len([h for h in receiver.since(opened["since"]) if h.answered_at]) == 3,
                what="three failed probes",
            )
            waiting = len(deliveries(db, attempts=0))
            spent = attempts_made(db)
            before = [h for h in receiver.hits if h.arrived_at <= opened["since"]]
            probes = receiver.since(opened["since"])
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{http_base(daemon)}/metrics") as response,
            ):
                metrics_text = await response.text()
            code, out, err = await webhookd(config, "endpoints", "show", "ep", "--json")
            assert code == 0, err
            shown = json.loads(out)
            code, table, _ = await webhookd(config, "endpoints", "list")
            assert code == 0

            receiver.status = 200
            await eventually(
                lambda: len(deliveries(db, state="succeeded")) == 12, what="every delivery"
            )
            assert gauge(daemon, "ep", "ok") == 1.0
            assert gauge(daemon, "ep", "backing_off") == 0.0

    # Backed off as a whole: the first batch (at most max_concurrency requests) failed, then
    # only probes went out; the other deliveries waited without spending attempts.
    assert opened["state"] == "backing_off"
    assert opened["consecutive_failures"] >= 3
    assert "consecutive failures" in opened["reason"]
    assert opened["paused_until"] == pytest.approx(opened["since"] + cooldowns[0])
    # (max_concurrency at once, plus one more per failure until the threshold was reached)
    assert len(before) <= 4 + 3 - 1
    assert spent <= len(before) + len(probes)
    assert waiting >= 12 - spent
    # One probe at a time, each no sooner than its cool-down after the failure before it.
    previous_end = opened["since"]
    for probe, cooldown in zip(probes[:3], cooldowns, strict=True):
        assert probe.status == 500
        assert probe.arrived_at >= previous_end + cooldown - CLOCK_EPSILON_SECONDS
        previous_end = probe.answered_at
    assert all(a.answered_at <= b.arrived_at for a, b in pairwise(probes))
    # Exported and shown while it backed off.
    assert 'webhookd_endpoint_state{endpoint="ep",state="backing_off"} 1.0' in metrics_text
    assert shown["state"] == "backing_off"
    assert shown["circuit"]["consecutive_failures"] >= 3 + 2
    assert shown["circuit"]["paused_until"] is not None
    [line] = [ln for ln in table.splitlines() if ln.startswith("ep ")]
    assert "backing_off" in line
    # Then full speed: requests overlapped again once a probe succeeded.
    recovered_at = next(h.arrived_at for h in receiver.hits if h.status == 200)
    after = [h for h in receiver.hits if h.arrived_at >= recovered_at]
    assert any(a.answered_at > b.arrived_at for a, b in pairwise(after))
    assert all(d["state"] == "succeeded" for d in deliveries(db))
    assert state_changes.moves() == [("ok", "backing_off"), ("backing_off", "ok")]
    assert state_changes.changes[-1]["reason"] == "the probe succeeded"


async def test_the_breaker_state_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "webhookd.db"
    async with Receiver(status=500) as receiver:
        _, settings = write_config(
            tmp_path,
            [endpoint("ep", receiver.url(), max_concurrency=1)],
            breaker={"failure_threshold": 2, "cooldown_seconds": 2.0},
        )
        async with running_daemon(settings) as daemon:
            await insert_outbox(db, bookings(4))
            await eventually(lambda: gauge(daemon, "ep", "backing_off") == 1.0, what="back-off")
        stored = state_row(db, "ep")
        before_restart = len(receiver.hits)
        receiver.status = 200
        async with running_daemon(settings) as daemon:
            # Still backing off after the restart, until the stored cool-down ends.
            assert gauge(daemon, "ep", "backing_off") == 1.0
            await eventually(lambda: len(deliveries(db, state="succeeded")) == 4, what="all")
            assert gauge(daemon, "ep", "ok") == 1.0
    assert stored["state"] == "backing_off"
    assert stored["consecutive_failures"] == 2
    first_after = receiver.hits[before_restart]
    assert first_after.arrived_at >= stored["paused_until"]
    assert state_row(db, "ep")["state"] == "ok"


# -- disabled after failing for too long -----------------------------------------------------


async def test_an_endpoint_failing_for_too_long_is_disabled_and_nothing_is_dropped(
    tmp_path: Path, state_changes: StateChanges
) -> None:
    db = tmp_path / "webhookd.db"
    disable_after = 1.5
    async with Receiver(status=500) as receiver:
        config, settings = write_config(
            tmp_path,
            breaker={
                "failure_threshold": 2,
                "cooldown_seconds": 0.2,
                "max_cooldown_seconds": 0.2,
                "disable_after_seconds": disable_after,
            },
        )
        async with running_daemon(settings) as daemon:
            await insert_endpoint(db, id="tbl", url=receiver.url(), secret=SECRET)
            await insert_outbox(db, bookings(5))
            await eventually(lambda: gauge(daemon, "tbl", "disabled") == 1.0, what="disabled")
            row = await stored_state(db, "tbl", "disabled")
            hits_when_disabled = len(receiver.hits)
            code, out, err = await webhookd(config, "endpoints", "list", "--json")
            assert code == 0, err
            [listed] = json.loads(out)
            code, text, _ = await webhookd(config, "endpoints", "show", "tbl")
            assert code == 0
            await asyncio.sleep(0.5)  # more than two cool-downs: nothing more is sent
            assert len(receiver.hits) == hits_when_disabled
            assert [d["state"] for d in deliveries(db)] == ["pending"] * 5

            receiver.status = 200
            code, _, err = await webhookd(config, "endpoints", "enable", "tbl")
            assert code == 0, err
            assert "failing continuously" in err
            await eventually(lambda: len(deliveries(db, state="succeeded")) == 5, what="all 5")
            assert gauge(daemon, "tbl", "ok") == 1.0
    assert row["state"] == "disabled"
    assert row["disabled_reason"].startswith("failing continuously since")
    assert row["since"] - row["failing_since"] >= disable_after
    assert query(db, "SELECT enabled FROM webhook_endpoints WHERE id = 'tbl'")[0][0] == 1
    assert (listed["state"], listed["enabled"]) == ("disabled", False)
    assert listed["circuit"]["disabled_reason"] == row["disabled_reason"]
    assert "state        disabled" in text
    assert "failing continuously since" in text
    assert state_changes.moves() == [
        ("ok", "backing_off"),
        ("backing_off", "disabled"),
        ("disabled", "ok"),
    ]
    assert state_changes.changes[-1]["reason"] == "enabled by an operator"


# -- reload and the operator -----------------------------------------------------------------


async def test_a_reload_keeps_the_breaker_state_and_the_operator_can_clear_it(
    tmp_path: Path, state_changes: StateChanges
) -> None:
    db = tmp_path / "webhookd.db"
    long_cooldown = {"failure_threshold": 2, "cooldown_seconds": 60.0}
    async with Receiver(status=500) as receiver:
        eps = [endpoint("ep", receiver.url(), max_concurrency=1)]
        config, settings = write_config(tmp_path, eps, breaker=long_cooldown)
        async with running_daemon(settings) as daemon:
            daemon.config_path = config
            await insert_outbox(db, bookings(3))
            await eventually(lambda: gauge(daemon, "ep", "backing_off") == 1.0, what="back-off")
            hits = len(receiver.hits)

            write_config(tmp_path, eps, breaker={**long_cooldown, "failure_threshold": 10})
            assert await daemon.reload()
            await asyncio.sleep(0.3)
            assert gauge(daemon, "ep", "backing_off") == 1.0
            assert len(receiver.hits) == hits
            assert state_row(db, "ep")["state"] == "backing_off"

            receiver.status = 200
            code, _, err = await webhookd(config, "endpoints", "enable", "ep")
            assert code == 0, err
            assert "backing_off" in err
            # Sent at once, not after the 60 s cool-down.
            await eventually(lambda: len(deliveries(db, state="succeeded")) == 3, what="all 3")
            assert gauge(daemon, "ep", "ok") == 1.0
    assert state_changes.moves() == [("ok", "backing_off"), ("backing_off", "ok")]
    assert state_changes.changes[-1]["reason"] == "enabled by an operator"


async def test_enable_says_when_there_is_nothing_to_enable(tmp_path: Path) -> None:
    config, settings = write_config(tmp_path, [endpoint("cfg", "http://127.0.0.1:9/hook")])
    code, _, err = await webhookd(config, "migrate")
    assert code == 0, err
    await insert_endpoint(tmp_path / "webhookd.db", id="tbl", url="https://t.example/h", secret="s")

    code, _, err = await webhookd(config, "endpoints", "enable", "tbl")
    assert code == 0, err
    assert "already enabled" in err
    # A healthy config-file endpoint: its `enabled` lives in the file.
    code, _, err = await webhookd(config, "endpoints", "enable", "cfg")
    assert code == 1
    assert "nothing to enable" in err
    code, out, err = await webhookd(config, "endpoints", "show", "cfg", "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert (shown["state"], shown["circuit"]["state"]) == ("enabled", "ok")
    assert settings.breaker.failure_threshold == 5  # the defaults
    assert settings.breaker.disable_after_seconds == 5 * 24 * 3600
    assert settings.delivery.retry_after_max_seconds == 3600


async def test_retrying_deliveries_makes_a_backing_off_endpoint_probe_at_once(
    tmp_path: Path, state_changes: StateChanges
) -> None:
    db = tmp_path / "webhookd.db"
    async with Receiver(status=500) as receiver:
        config, settings = write_config(
            tmp_path,
            [endpoint("ep", receiver.url(), max_concurrency=1)],
            retry={**FAST_RETRY, "max_attempts": 1},  # each failure is a dead letter
            breaker={"failure_threshold": 2, "cooldown_seconds": 60.0},
        )
        async with running_daemon(settings) as daemon:
            await insert_outbox(db, bookings(3))
            await eventually(lambda: gauge(daemon, "ep", "backing_off") == 1.0, what="back-off")
            await eventually(lambda: len(deliveries(db, state="failed")) == 2, what="2 failed")
            # The third one waits, unattempted, for the end of the cool-down.
            assert [d["attempts"] for d in deliveries(db, state="pending")] == [0]

            receiver.status = 200
            code, _, err = await webhookd(
                config, "deliveries", "retry", "--endpoint", "ep", "--all-matching"
            )
            assert code == 0, err
            # Probed at once, not after the 60 s cool-down; then full speed.
            await eventually(lambda: len(deliveries(db, state="succeeded")) == 3, what="all 3")
            assert gauge(daemon, "ep", "ok") == 1.0
    assert state_changes.moves() == [("ok", "backing_off"), ("backing_off", "ok")]
    assert state_changes.changes[-1]["reason"] == "the probe succeeded"
