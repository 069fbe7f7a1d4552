"""The monitoring port of a running daemon: /healthz, /readyz and /metrics, as a load balancer,
a probe and a Prometheus server see them. Nothing else answers."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from daemon_fixtures import (
    HANG,
    OutboxRow,
    Receiver,
    daemon_settings,
    deliveries,
    eventually,
    http_base,
    insert_outbox,
    per_attempt,
    running_daemon,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from webhookd import __version__

pytestmark = pytest.mark.timeout(120)

SECRET = "whsec_http_api_secret"

# DESIGN.md, "Metrics": name → (type, label names).
CONTRACT_METRICS: dict[str, tuple[str, set[str]]] = {
    "webhookd_events_dispatched_total": ("counter", set()),
    "webhookd_events_rejected_total": ("counter", {"reason"}),
    "webhookd_delivery_attempts_total": ("counter", {"endpoint", "result"}),
    "webhookd_deliveries_total": ("counter", {"endpoint", "outcome"}),
    "webhookd_delivery_duration_seconds": ("histogram", {"endpoint"}),
    "webhookd_event_to_delivery_seconds": ("histogram", set()),
    "webhookd_deliveries_pending": ("gauge", {"endpoint"}),
    "webhookd_inflight_requests": ("gauge", {"endpoint"}),
    "webhookd_outbox_lag_seconds": ("gauge", set()),
    "webhookd_endpoint_state": ("gauge", {"endpoint", "state"}),
    "webhookd_build_info": ("gauge", {"version"}),
}


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as response:
        return response.status, await response.text()


async def readyz(http: aiohttp.ClientSession, base: str) -> tuple[int, Any]:
    status, text = await get(http, base + "/readyz")
    return status, json.loads(text)


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, **labels: str) -> float | None:
    found = [s.value for s in samples(text) if s.name == name and s.labels == labels]
    return found[0] if found else None


async def test_healthz_and_readyz_answer_200_while_running(tmp_path: Path) -> None:
    settings = daemon_settings(tmp_path, http=True)
    async with running_daemon(settings) as daemon, aiohttp.ClientSession() as http:
        base = http_base(daemon)
        status, text = await get(http, base + "/healthz")
        assert status == 200
        assert json.loads(text) == {"status": "ok"}
        assert await readyz(http, base) == (200, {"status": "ready"})


async def test_unknown_paths_are_404_and_metrics_refuses_post(tmp_path: Path) -> None:
    settings = daemon_settings(tmp_path, http=True)
    async with running_daemon(settings) as daemon, aiohttp.ClientSession() as http:
        base = http_base(daemon)
        for path in ("/", "/nope", "/metrics/extra", "/healthz/x"):
            status, _ = await get(http, base + path)
            assert status == 404, path
        async with http.post(base + "/metrics", data=b"x") as response:
            assert response.status == 405
        async with http.post(base + "/readyz") as response:
            assert response.status == 405


async def test_metrics_parse_and_have_every_contract_metric_with_its_labels(
    tmp_path: Path,
) -> None:
    db = tmp_path / "webhookd.db"
    # Each delivery fails once and then succeeds: attempts of two results, one outcome.
    async with Receiver(answer=per_attempt(500, 200)) as receiver:
        settings = daemon_settings(
            tmp_path,
            http=True,
            endpoints=[{"id": "ep", "url": receiver.url(), "secret": SECRET}],
            retry={"initial_delay_seconds": 0.05},
        )
        async with running_daemon(settings) as daemon, aiohttp.ClientSession() as http:
            base = http_base(daemon)
            await insert_outbox(
                db,
                [
                    OutboxRow("booking.created", {"n": 1}),
                    OutboxRow("booking.created", "[1]"),  # rejected: not an object
                    OutboxRow("booking.cancelled", {"n": 2}),
                ],
            )

            async def scrape_after_both_succeeded() -> str | None:
                status, text = await get(http, base + "/metrics")
                assert status == 200
                done = value(text, "webhookd_deliveries_total", endpoint="ep", outcome="succeeded")
                return text if done == 2.0 else None

            text = await eventually(scrape_after_both_succeeded, what="two successes in /metrics")
            async with http.get(base + "/metrics") as response:
                assert response.headers["Content-Type"].startswith("text/plain")

    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name, (kind, labels) in CONTRACT_METRICS.items():
        family = families.get(name) or families.get(name.removesuffix("_total"))
        assert family is not None, f"{name} is missing from /metrics"
        assert family.type == kind, name
        assert family.samples, f"{name} has no samples"
        sample_names = {s.name for s in family.samples}
        assert (name if kind != "histogram" else f"{name}_count") in sample_names
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)

    assert value(text, "webhookd_events_dispatched_total") == 2.0
    assert value(text, "webhookd_events_rejected_total", reason="not_object") == 1.0
    attempts_total = "webhookd_delivery_attempts_total"
    assert value(text, attempts_total, endpoint="ep", result="http_error") == 2.0
    assert value(text, attempts_total, endpoint="ep", result="success") == 2.0
    assert value(text, "webhookd_delivery_duration_seconds_count", endpoint="ep") == 4.0
    assert value(text, "webhookd_event_to_delivery_seconds_count") == 2.0
    assert value(text, "webhookd_inflight_requests", endpoint="ep") == 0.0
    assert value(text, "webhookd_endpoint_state", endpoint="ep", state="ok") == 1.0
    assert value(text, "webhookd_endpoint_state", endpoint="ep", state="disabled") == 0.0
    assert value(text, "webhookd_build_info", version=__version__) == 1.0
    assert len(receiver.requests) == 4


async def test_readyz_is_503_with_reasons_while_the_store_refuses_writes(tmp_path: Path) -> None:
    """How the store becomes unreachable here: the application holds a write transaction open
    on the database (``BEGIN IMMEDIATE`` without a commit), the failure the SQLite store's own
    error hint names. Deleting the file or changing permissions would not do: the daemon keeps
    its open descriptors, and its ping (``SELECT 1``) never touches the file.

    The request is held at the receiver until the lock is taken, so that the daemon then cannot
    write the attempt's outcome. Once the lock goes, /readyz is 200 again and the outcome is
    written without sending the request a second time.
    """
    db = tmp_path / "webhookd.db"
    holder: list[sqlite3.Connection] = []

    def take_write_lock() -> None:
        conn = sqlite3.connect(db, isolation_level=None, timeout=10.0, check_same_thread=False)
        conn.execute("BEGIN IMMEDIATE")
        holder.append(conn)

    def release_write_lock() -> None:
        for conn in holder:
            conn.execute("ROLLBACK")
            conn.close()
        holder.clear()

    async with Receiver(answer=HANG) as receiver:
        settings = daemon_settings(
            tmp_path,
            http=True,
            endpoints=[{"id": "ep", "url": receiver.url(), "secret": SECRET}],
            database={"busy_timeout_seconds": 0.05},
        )
        async with running_daemon(settings) as daemon, aiohttp.ClientSession() as http:
            base = http_base(daemon)
            assert (await readyz(http, base))[0] == 200
            await insert_outbox(db, [OutboxRow("booking.created", {"n": 1})])
            await eventually(lambda: receiver.inflight == 1, what="the request to arrive")
            await asyncio.to_thread(take_write_lock)
            try:
                receiver.release()  # the receiver answers 200; the daemon cannot record it

                async def not_ready() -> Any:
                    status, body = await readyz(http, base)
                    return body if status == 503 else None

                body = await eventually(not_ready, within=60.0, what="/readyz to turn 503")
                assert body["status"] == "not ready"
                assert body["reasons"]
                assert all(isinstance(r, str) and r for r in body["reasons"])
                assert any("store" in r for r in body["reasons"]), body
            finally:
                await asyncio.to_thread(release_write_lock)

            async def ready() -> bool:
                return (await readyz(http, base))[0] == 200

            await eventually(ready, within=30.0, what="/readyz to recover")
            await eventually(
                lambda: deliveries(db, state="succeeded"), what="the outcome to be recorded"
            )
    assert len(receiver.requests) == 1


async def test_readyz_is_503_while_stopping_and_inflight_request_finishes(tmp_path: Path) -> None:
    db = tmp_path / "webhookd.db"
    async with Receiver(answer=HANG) as receiver:
        settings = daemon_settings(
            tmp_path,
            http=True,
            endpoints=[{"id": "ep", "url": receiver.url(), "secret": SECRET}],
            daemon={"grace_seconds": 30.0},
        )
        async with running_daemon(settings) as daemon, aiohttp.ClientSession() as http:
            base = http_base(daemon)
            await insert_outbox(db, [OutboxRow("booking.created", {"n": 1})])
            await eventually(lambda: receiver.inflight == 1, what="the request to arrive")
            daemon.request_stop("test")
            # The port stays open while the in-flight request has its grace period.
            status, body = await readyz(http, base)
            assert status == 503
            assert body["status"] == "not ready"
            assert any("stop" in r for r in body["reasons"]), body
            receiver.release()
    # Stopping waited for the request and persisted its outcome.
    [delivery] = deliveries(db)
    assert (delivery["state"], delivery["attempts"]) == ("succeeded", 1)
    assert len(receiver.requests) == 1
