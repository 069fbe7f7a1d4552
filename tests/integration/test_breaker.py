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
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from daemon_fixtures import (
    OutboxRow,
    ReceivedRequest,
    Receiver,
    deliveries,
    endpoint_state_row,
    eventually,
    http_base,
    insert_endpoint,
    insert_outbox,
    query,
    running_daemon,
    stored_endpoint_state,
)
from operator_fixtures import LogEvents, endpoint_state_gauge, webhookd, write_config_file

from webhookd.settings import Settings, load_settings

pytestmark = pytest.mark.timeout(120)

SECRET = "whsec_breaker_secret"
CLOCK_EPSILON_SECONDS = 1e-3
RECEIVER_DELAY_SECONDS = 0.05
# Fast retries, no jitter, and a budget that never runs out during a test.
FAST_RETRY = {
    "initial_delay_seconds": 0.05,
    "multiplier": 1.0,
    "jitter": 0.0,
    "max_attempts": 1000,
    "max_age_seconds": 3600.0,
}


# -- a receiver whose answer the test switches -----------------------------------------------


def failing_receiver() -> Receiver:
    """Answers 500 (``receiver.answer = 200`` switches it) after a short delay, so that requests
    overlap and the concurrency it sees means something."""
    return Receiver(answer=500, delay_seconds=RECEIVER_DELAY_SECONDS)


def arrived_after(receiver: Receiver, moment: float) -> list[ReceivedRequest]:
    return [r for r in receiver.requests if r.arrived_at > moment]


# -- configuration, CLI, logs ----------------------------------------------------------------


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
    path = write_config_file(tmp_path / "webhookd.toml", config, endpoints)
    return path, load_settings(path)


def endpoint(ep_id: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"id": ep_id, "url": url, "secret": SECRET, **extra}


def bookings(n: int, start: int = 0) -> list[OutboxRow]:
    return [OutboxRow("booking.created", {"id": f"book_{i}"}) for i in range(start, start + n)]


def attempts_made(db: Path) -> int:
    return int(query(db, "SELECT count(*) FROM webhookd_attempts")[0][0])


# -- backing off, probing, recovering --------------------------------------------------------


async def test_an_endpoint_that_keeps_failing_is_backed_off_then_probed_until_it_recovers(
    tmp_path: Path, log_events: LogEvents
) -> None:
    db = tmp_path / "webhookd.db"
    cooldowns = [0.5, 1.0, 1.0]  # cooldown_seconds 0.5, multiplier 2, capped at 1.0
    async with failing_receiver() as receiver:
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
            await eventually(
                lambda: endpoint_state_gauge(daemon, "ep", "backing_off") == 1.0, what="back-off"
            )
            opened = await stored_endpoint_state(db, "ep", "backing_off")
            # Three probes fail, each after its cool-down.
            await eventually(
                lambda: (
                    len([h for h in arrived_after(receiver, opened["since"]) if h.answered_at]) == 3
                ),
                what="three failed probes",
            )
            waiting = len(deliveries(db, attempts=0))
            spent = attempts_made(db)
            before = [h for h in receiver.requests if h.arrived_at <= opened["since"]]
            probes = arrived_after(receiver, opened["since"])
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

            receiver.answer = 200
            await eventually(
                lambda: len(deliveries(db, state="succeeded")) == 12, what="every delivery"
            )
            assert endpoint_state_gauge(daemon, "ep", "ok") == 1.0
            assert endpoint_state_gauge(daemon, "ep", "backing_off") == 0.0

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
        assert probe.answer == 500
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
    recovered_at = next(h.arrived_at for h in receiver.requests if h.answer == 200)
    after = [h for h in receiver.requests if h.arrived_at >= recovered_at]
    assert any(a.answered_at > b.arrived_at for a, b in pairwise(after))
    assert all(d["state"] == "succeeded" for d in deliveries(db))
    assert log_events.endpoint_state_moves() == [("ok", "backing_off"), ("backing_off", "ok")]
    assert log_events.named("endpoint_state_changed")[-1]["reason"] == "the probe succeeded"


async def test_the_breaker_state_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "webhookd.db"
    async with failing_receiver() as receiver:
        _, settings = write_config(
            tmp_path,
            [endpoint("ep", receiver.url(), max_concurrency=1)],
            breaker={"failure_threshold": 2, "cooldown_seconds": 2.0},
        )
        async with running_daemon(settings) as daemon:
            await insert_outbox(db, bookings(4))
            await eventually(
                lambda: endpoint_state_gauge(daemon, "ep", "backing_off") == 1.0, what="back-off"
            )
        stored = endpoint_state_row(db, "ep")
        before_restart = len(receiver.requests)
        receiver.answer = 200
        async with running_daemon(settings) as daemon:
            # Still backing off after the restart, until the stored cool-down ends.
            assert endpoint_state_gauge(daemon, "ep", "backing_off") == 1.0
            await eventually(lambda: len(deliveries(db, state="succeeded")) == 4, what="all")
            assert endpoint_state_gauge(daemon, "ep", "ok") == 1.0
    assert stored["state"] == "backing_off"
    assert stored["consecutive_failures"] == 2
    first_after = receiver.requests[before_restart]
    assert first_after.arrived_at >= stored["paused_until"]
    assert endpoint_state_row(db, "ep")["state"] == "ok"


# -- disabled after failing for too long -----------------------------------------------------


async def test_an_endpoint_failing_for_too_long_is_disabled_and_nothing_is_dropped(
    tmp_path: Path, log_events: LogEvents
) -> None:
    db = tmp_path / "webhookd.db"
    disable_after = 1.5
    async with failing_receiver() as receiver:
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
            await eventually(
                lambda: endpoint_state_gauge(daemon, "tbl", "disabled") == 1.0, what="disabled"
            )
            row = await stored_endpoint_state(db, "tbl", "disabled")
            hits_when_disabled = len(receiver.requests)
            code, out, err = await webhookd(config, "endpoints", "list", "--json")
            assert code == 0, err
            [listed] = json.loads(out)
            code, text, _ = await webhookd(config, "endpoints", "show", "tbl")
            assert code == 0
            await asyncio.sleep(0.5)  # more than two cool-downs: nothing more is sent
            assert len(receiver.requests) == hits_when_disabled
            assert [d["state"] for d in deliveries(db)] == ["pending"] * 5

            receiver.answer = 200
            code, _, err = await webhookd(config, "endpoints", "enable", "tbl")
            assert code == 0, err
            assert "failing continuously" in err
            await eventually(lambda: len(deliveries(db, state="succeeded")) == 5, what="all 5")
            assert endpoint_state_gauge(daemon, "tbl", "ok") == 1.0
    assert row["state"] == "disabled"
    assert row["disabled_reason"].startswith("failing continuously since")
    assert row["since"] - row["failing_since"] >= disable_after
    assert query(db, "SELECT enabled FROM webhook_endpoints WHERE id = 'tbl'")[0][0] == 1
    assert (listed["state"], listed["enabled"]) == ("disabled", False)
    assert listed["circuit"]["disabled_reason"] == row["disabled_reason"]
    assert "state        disabled" in text
    assert "failing continuously since" in text
    assert log_events.endpoint_state_moves() == [
        ("ok", "backing_off"),
        ("backing_off", "disabled"),
        ("disabled", "ok"),
    ]
    assert log_events.named("endpoint_state_changed")[-1]["reason"] == "enabled by an operator"


# -- reload and the operator -----------------------------------------------------------------


async def test_a_reload_keeps_the_breaker_state_and_the_operator_can_clear_it(
    tmp_path: Path, log_events: LogEvents
) -> None:
    db = tmp_path / "webhookd.db"
    long_cooldown = {"failure_threshold": 2, "cooldown_seconds": 60.0}
    async with failing_receiver() as receiver:
        eps = [endpoint("ep", receiver.url(), max_concurrency=1)]
        config, settings = write_config(tmp_path, eps, breaker=long_cooldown)
        async with running_daemon(settings) as daemon:
            daemon.config_path = config
            await insert_outbox(db, bookings(3))
            await eventually(
                lambda: endpoint_state_gauge(daemon, "ep", "backing_off") == 1.0, what="back-off"
            )
            hits = len(receiver.requests)

            write_config(tmp_path, eps, breaker={**long_cooldown, "failure_threshold": 10})
            assert await daemon.reload()
            await asyncio.sleep(0.3)
            assert endpoint_state_gauge(daemon, "ep", "backing_off") == 1.0
            assert len(receiver.requests) == hits
            assert endpoint_state_row(db, "ep")["state"] == "backing_off"

            receiver.answer = 200
            code, _, err = await webhookd(config, "endpoints", "enable", "ep")
            assert code == 0, err
            assert "backing_off" in err
            # Sent at once, not after the 60 s cool-down.
            await eventually(lambda: len(deliveries(db, state="succeeded")) == 3, what="all 3")
            assert endpoint_state_gauge(daemon, "ep", "ok") == 1.0
    assert log_events.endpoint_state_moves() == [("ok", "backing_off"), ("backing_off", "ok")]
    assert log_events.named("endpoint_state_changed")[-1]["reason"] == "enabled by an operator"


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
    tmp_path: Path, log_events: LogEvents
) -> None:
    db = tmp_path / "webhookd.db"
    async with failing_receiver() as receiver:
        config, settings = write_config(
            tmp_path,
            [endpoint("ep", receiver.url(), max_concurrency=1)],
            retry={**FAST_RETRY, "max_attempts": 1},  # each failure is a dead letter
            breaker={"failure_threshold": 2, "cooldown_seconds": 60.0},
        )
        async with running_daemon(settings) as daemon:
            await insert_outbox(db, bookings(3))
            await eventually(
                lambda: endpoint_state_gauge(daemon, "ep", "backing_off") == 1.0, what="back-off"
            )
            await eventually(lambda: len(deliveries(db, state="failed")) == 2, what="2 failed")
            # The third one waits, unattempted, for the end of the cool-down.
            assert [d["attempts"] for d in deliveries(db, state="pending")] == [0]

            receiver.answer = 200
            code, _, err = await webhookd(
                config, "deliveries", "retry", "--endpoint", "ep", "--all-matching"
            )
            assert code == 0, err
            # Probed at once, not after the 60 s cool-down; then full speed.
            await eventually(lambda: len(deliveries(db, state="succeeded")) == 3, what="all 3")
            assert endpoint_state_gauge(daemon, "ep", "ok") == 1.0
    assert log_events.endpoint_state_moves() == [("ok", "backing_off"), ("backing_off", "ok")]
    assert log_events.named("endpoint_state_changed")[-1]["reason"] == "the probe succeeded"
