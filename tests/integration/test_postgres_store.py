"""What only the PostgreSQL store does: several replicas sharing one database.

The shared suite (test_store_contract.py) runs on PostgreSQL too; these tests cover what one
SQLite daemon never meets: outbox rows committed out of id order, several backends fanning out
and claiming at once, leases that expire, renewals, LISTEN/NOTIFY, connection failures.
Every wait is bounded; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import free_port
from postgres_fixtures import PasswordUser
from test_store_contract import (
    EP_A,
    NOW,
    SqlApp,
    booking,
    planner,
    postgres_app,
    succeeded_attempt,
)

from webhookd.errors import ConfigError, StorageError
from webhookd.models import Delivery, DeliveryFilter, FanoutPlan, OutboxRow
from webhookd.settings import load_settings
from webhookd.store import open_store
from webhookd.store.base import Store
from webhookd.store.postgres import PostgresBackend

WAIT_SECONDS = 30.0
BATCH = 100


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {WAIT_SECONDS} s: {what}")
        await asyncio.sleep(0.05)


class Replicas:
    """Backends on one database, each a replica; closed at the end of the test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stores: list[Store] = []

    async def open(self, **kwargs: Any) -> Store:
        store = Store(PostgresBackend(self.url, poll_fallback_seconds=60.0, **kwargs))
        await store.open()
        self.stores.append(store)
        return store

    async def close(self) -> None:
        for store in self.stores:
            await store.close()


@pytest.fixture
async def replicas(postgres_url: str) -> AsyncIterator[Replicas]:
    r = Replicas(postgres_url)
    first = await r.open()
    await first.migrate()
    yield r
    await r.close()


@pytest.fixture
def app(postgres_url: str, replicas: Replicas) -> Iterator[SqlApp]:
    application = postgres_app(postgres_url)
    yield application
    application.close()


def sql(url: str, query: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)  # type: ignore[arg-type]
        return list(cur.fetchall()) if cur.description else []


def backend(store: Store) -> PostgresBackend:
    b = store.backend
    assert isinstance(b, PostgresBackend)
    return b


# -- issue 7 item 2: no lost events from commit order ------------------------------------------


def recording(seen: list[int]) -> Callable[[Sequence[OutboxRow]], FanoutPlan]:
    plan = planner([EP_A])

    def record_and_plan(rows: Sequence[OutboxRow]) -> FanoutPlan:
        seen.extend(r.id for r in rows)
        return plan(rows)

    return record_and_plan


async def test_rows_committed_out_of_id_order_are_each_fanned_out_once(
    postgres_url: str, replicas: Replicas
) -> None:
    """Writers hold their transactions open so that later ids commit first; a fan-out between
    the commits must not skip the earlier ids committed later."""
    store = replicas.stores[0]
    writers = [psycopg.connect(postgres_url) for _ in range(12)]
    try:
        ids = []
        for i, conn in enumerate(writers):  # each takes its id, in order, and does not commit
            row = conn.execute(
                "INSERT INTO webhook_outbox (event_type, payload) VALUES (%s, %s) RETURNING id",
                ("booking.created", f'{{"n":{i}}}'),
            ).fetchone()
            assert row is not None
            ids.append(int(row[0]))
        seen: list[int] = []
        assert (await store.fan_out(recording(seen), BATCH, NOW)).rows == 0
        for conn in reversed(writers):  # the highest id commits first
            conn.commit()
            await store.fan_out(recording(seen), BATCH, NOW)
        assert (await store.fan_out(recording(seen), BATCH, NOW)).rows == 0
    finally:
        for conn in writers:
            conn.close()
    assert sorted(seen) == sorted(ids)
    assert len(seen) == len(set(seen))
    assert seen[0] == ids[-1]  # the first fan-out saw only the last id: it committed first
    outbox_ids = {r[0] for r in sql(postgres_url, "SELECT outbox_id FROM webhookd_events")}
    assert outbox_ids == set(ids)


async def test_two_replicas_fanning_out_while_writers_commit_at_random_take_each_row_once(
    postgres_url: str, replicas: Replicas
) -> None:
    stores = [replicas.stores[0], await replicas.open()]
    seen: list[list[int]] = [[], []]
    rows_by_store = [0, 0]
    writers_done = asyncio.Event()

    async def fan_out_loop(i: int) -> None:
        while True:
            finished = writers_done.is_set()
            result = await stores[i].fan_out(recording(seen[i]), 7, NOW)
            rows_by_store[i] += result.rows
            if finished and result.rows == 0:
                return
            await asyncio.sleep(0)

    loops = [asyncio.create_task(fan_out_loop(i)) for i in range(2)]
    rng = random.Random(7)
    ids: list[int] = []
    writers = [psycopg.connect(postgres_url) for _ in range(20)]
    try:
        for _round in range(10):
            open_ = []
            for conn in writers:
                for _ in range(3):
                    row = conn.execute(
                        "INSERT INTO webhook_outbox (event_type, payload) VALUES (%s, %s) "
                        "RETURNING id",
                        ("booking.created", "{}"),
                    ).fetchone()
                    assert row is not None
                    ids.append(int(row[0]))
                open_.append(conn)
            rng.shuffle(open_)
            for conn in open_:
                conn.commit()
                await asyncio.sleep(0.001)  # let the fan-outs run between commits
    finally:
        writers_done.set()
        for conn in writers:
            conn.close()
    await asyncio.wait_for(asyncio.gather(*loops), WAIT_SECONDS * 4)

    assert len(ids) == 600
    assert sorted(seen[0] + seen[1]) == sorted(ids)  # every row, and none twice
    assert not set(seen[0]) & set(seen[1])
    assert rows_by_store[0] + rows_by_store[1] == len(ids)
    [(events, distinct)] = sql(
        postgres_url, "SELECT COUNT(*), COUNT(DISTINCT outbox_id) FROM webhookd_events"
    )
    assert events == distinct == len(ids)
    [(unprocessed,)] = sql(
        postgres_url, "SELECT COUNT(*) FROM webhook_outbox WHERE processed_at IS NULL"
    )
    assert unprocessed == 0


async def test_an_event_id_fanned_out_by_two_replicas_at_once_is_delivered_once(
    postgres_url: str, replicas: Replicas, app: SqlApp
) -> None:
    """An application that created its outbox without UNIQUE (event_id) can hold two unfanned
    rows with one event id; two replicas fanning them out at once both insert the event, the
    later commit is refused, its batch is read again and the row quarantined as a duplicate."""
    stores = [replicas.stores[0], await replicas.open()]
    app.conn.execute("ALTER TABLE webhook_outbox DROP CONSTRAINT webhook_outbox_event_id_key")
    for _copy in range(2):
        for i in range(30):
            app.insert_outbox("booking.created", "{}", event_id=f"evt_{i}")
    quarantined = 0
    rows = 0
    while True:
        results = await asyncio.gather(
            *(s.fan_out(planner([EP_A]), 2, NOW) for s in stores for _ in range(3))
        )
        rows += sum(r.rows for r in results)
        quarantined += sum(len(r.quarantined) for r in results)
        if not any(r.rows for r in results):
            break
    [(events, deliveries)] = sql(
        postgres_url,
        "SELECT (SELECT COUNT(*) FROM webhookd_events), (SELECT COUNT(*) FROM webhookd_deliveries)",
    )
    assert (rows, events, deliveries, quarantined) == (60, 30, 30, 30)


# -- issue 7 item 3: leases across replicas --------------------------------------------------


async def test_the_endpoint_cap_holds_across_replicas_claiming_at_once(
    postgres_url: str, replicas: Replicas, app: SqlApp
) -> None:
    cap = 3
    stores = [replicas.stores[0], await replicas.open(), await replicas.open()]
    booking(app, 60)
    await stores[0].fan_out(planner([EP_A]), BATCH, NOW)
    in_flight = 0
    most = 0
    delivered: list[str] = []
    most_leased = 0

    async def worker(store: Store) -> None:
        nonlocal in_flight, most, most_leased
        idle = 0
        while idle < 50:
            batch = await store.claim_due("a", NOW, cap, cap=cap)
            if not batch:
                idle += 1
                await asyncio.sleep(0.005)
                continue
            idle = 0
            in_flight += len(batch)
            most = max(most, in_flight)
            [(leased,)] = sql(
                postgres_url,
                "SELECT COUNT(*) FROM webhookd_deliveries WHERE endpoint_id = 'a' "
                "AND state = 'pending' AND lease_until > extract(epoch FROM clock_timestamp())",
            )
            most_leased = max(most_leased, int(leased))  # type: ignore[call-overload]
            await asyncio.sleep(0.01)  # "sending"
            in_flight -= len(batch)
            await store.record([succeeded_attempt(d) for d in batch], {})
            delivered.extend(d.delivery_id for d in batch)

    await asyncio.wait_for(asyncio.gather(*(worker(s) for s in stores)), WAIT_SECONDS * 4)
    assert most <= cap
    assert most_leased <= cap
    assert most >= 2  # they did run at once (not a test that cannot fail)
    assert sorted(delivered) == sorted(set(delivered))
    assert len(delivered) == 60
    assert await stores[0].pending_counts() == {}


KILLED_REPLICA = textwrap.dedent(
    """
    import asyncio, sys, time
    from webhookd.store.base import Store
    from webhookd.store.postgres import PostgresBackend

    async def main() -> None:
        store = Store(PostgresBackend(sys.argv[1], lease_seconds=float(sys.argv[2])))
        await store.open()
        batch = await store.claim_due("a", float(sys.argv[3]), 10)
        print(" ".join(d.delivery_id for d in batch), flush=True)
        await asyncio.sleep(3600)  # "sending" until SIGKILLed

    asyncio.run(main())
    """
)


async def test_a_killed_replicas_lease_expires_and_another_replica_claims_it(
    postgres_url: str, replicas: Replicas, app: SqlApp, tmp_path: Path
) -> None:
    store = replicas.stores[0]
    booking(app, 2)
    await store.fan_out(planner([EP_A]), BATCH, NOW)
    script = tmp_path / "replica.py"
    script.write_text(KILLED_REPLICA)
    lease_seconds = 2.0
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        postgres_url,
        str(lease_seconds),
        str(NOW),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), WAIT_SECONDS)
        claimed = sorted(line.decode().split())
        assert len(claimed) == 2
        assert await store.claim_due("a", NOW, 10, cap=10) == []  # leased by the other one
        due = await store.next_due_at("a")
        assert due is not None
        assert due <= time.time() + lease_seconds + 1  # when its lease ends, not never
    finally:
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.communicate(), WAIT_SECONDS)
    again: list[Delivery] = []

    async def reclaimed() -> bool:
        again.extend(await store.claim_due("a", NOW, 10, cap=10))
        return len(again) == 2

    await eventually(reclaimed, "the killed replica's leases were claimed again")
    assert sorted(d.delivery_id for d in again) == claimed


async def test_record_from_a_replica_that_lost_its_lease_changes_nothing(
    postgres_url: str, replicas: Replicas, app: SqlApp
) -> None:
    slow, fast = replicas.stores[0], await replicas.open()
    booking(app, 1)
    await slow.fan_out(planner([EP_A]), BATCH, NOW)
    [d] = await slow.claim_due("a", NOW, 10)
    # `slow` stalled past its lease (its renewals could not reach the database): expire it.
    sql(postgres_url, "UPDATE webhookd_deliveries SET lease_until = 0 WHERE id = %s", d.pk)
    [taken] = await fast.claim_due("a", NOW, 10)
    assert taken.delivery_id == d.delivery_id

    await slow.record([succeeded_attempt(d)], {})

    rec = await fast.get_delivery(d.delivery_id)
    assert rec is not None
    assert (rec.state, rec.attempts, rec.attempt_log) == ("pending", 0, ())
    [(owner,)] = sql(postgres_url, "SELECT lease_owner FROM webhookd_deliveries")
    assert owner == backend(fast).owner  # the new holder keeps its lease
    await fast.record([succeeded_attempt(taken)], {})
    rec = await fast.get_delivery(d.delivery_id)
    assert rec is not None
    assert (rec.state, len(rec.attempt_log)) == ("succeeded", 1)


async def test_a_held_lease_is_renewed_past_its_lease_seconds(
    postgres_url: str, replicas: Replicas, app: SqlApp
) -> None:
    holder = await replicas.open(lease_seconds=3.0)
    other = replicas.stores[0]
    booking(app, 1)
    await other.fan_out(planner([EP_A]), BATCH, NOW)
    [d] = await holder.claim_due("a", NOW, 10)
    [(first_until,)] = sql(postgres_url, "SELECT lease_until FROM webhookd_deliveries")

    async def past_first_lease() -> bool:
        [(now,)] = sql(postgres_url, "SELECT extract(epoch FROM clock_timestamp())::float8")
        return float(now) > float(first_until)  # type: ignore[arg-type]

    await eventually(past_first_lease, "the database's clock passed the first lease's end")
    assert await other.claim_due("a", NOW, 10) == []  # still held: renewed
    [(until,)] = sql(postgres_url, "SELECT lease_until FROM webhookd_deliveries")
    assert float(until) > float(first_until)  # type: ignore[arg-type]
    await holder.record([succeeded_attempt(d)], {})
    [rec] = await other.list_deliveries(DeliveryFilter())
    assert rec.state == "succeeded"


async def test_close_frees_the_leases_it_holds_for_the_other_replicas(
    replicas: Replicas, app: SqlApp
) -> None:
    leaving, staying = await replicas.open(), replicas.stores[0]
    booking(app, 3)
    await staying.fan_out(planner([EP_A]), BATCH, NOW)
    claimed = await leaving.claim_due("a", NOW, 2)
    await leaving.close()
    replicas.stores.remove(leaving)
    got = await staying.claim_due("a", NOW, 10)
    assert {d.delivery_id for d in claimed} < {d.delivery_id for d in got}
    assert len(got) == 3


# -- LISTEN/NOTIFY -------------------------------------------------------------------------------


async def test_a_commit_to_the_outbox_wakes_every_replica(replicas: Replicas, app: SqlApp) -> None:
    stores = [replicas.stores[0], await replicas.open()]
    for store in stores:
        assert await store.outbox_changed()  # the first answer is always yes
        assert not await store.outbox_changed()  # fallback after 60 s: only a notification
    booking(app, 1)
    for store in stores:
        await eventually(store.outbox_changed, "outbox_changed() said yes after an INSERT")
    assert not await stores[0].outbox_changed()


async def test_fan_out_and_requeue_by_one_replica_wake_the_endpoint_on_the_others(
    replicas: Replicas, app: SqlApp
) -> None:
    other = await replicas.open()
    fanning = replicas.stores[0]
    assert other.take_woken_endpoints() == set()
    booking(app, 1)
    await fanning.fan_out(planner([EP_A]), BATCH, NOW)
    woken: set[str] = set()

    async def woke() -> bool:
        woken.update(other.take_woken_endpoints())
        return "a" in woken

    await eventually(woke, "the fan-out's endpoints reached the other replica")
    assert woken == {"a"}
    [d] = await fanning.claim_due("a", NOW, 10)
    await fanning.record([succeeded_attempt(d)], {})
    woken.clear()
    assert await fanning.requeue([d.delivery_id], NOW + 10, {"succeeded"}) == [d.delivery_id]
    await eventually(woke, "the requeue's endpoint reached the other replica")


async def test_polling_stands_in_while_the_listening_connection_is_lost(
    postgres_url: str, replicas: Replicas
) -> None:
    store = replicas.stores[0]
    b = backend(store)
    await store.outbox_changed()
    assert not await store.outbox_changed()
    sql(
        postgres_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND (query LIKE 'LISTEN%%' OR query = 'SELECT 1')",
    )

    async def lost() -> bool:
        return not b.listening

    await eventually(lost, "the listening connection was seen lost")
    assert await store.outbox_changed()
    # Back again: notifications work as before (a missed one is answered with yes once).

    async def restored() -> bool:
        return b.listening

    await eventually(restored, "the listening connection was restored")
    await store.outbox_changed()
    assert not await store.outbox_changed()
    sql(postgres_url, "INSERT INTO webhook_outbox (event_type, payload) VALUES ('x.y', '{}')")
    await eventually(store.outbox_changed, "a notification after the reconnect")


# -- connecting ------------------------------------------------------------------------------


async def test_a_wrong_password_is_a_storage_error_without_the_password(
    postgres_password_user: PasswordUser,
) -> None:
    user = postgres_password_user
    wrong = "wrong-Pa55word-" + user.password[:4]
    store = Store(PostgresBackend(user.url(wrong)))
    with pytest.raises(StorageError) as caught:
        await store.open()
    text = str(caught.value)
    assert wrong not in text
    assert f"postgresql://{user.name}@" in text
    assert "password" in text.lower()  # the server's reason: authentication failed
    assert store.description == (
        f"postgresql://{user.name}@{user.server.host}:{user.server.port}/{user.dbname}"
    )
    good = Store(PostgresBackend(user.url()))  # the right one works, from the URL
    await good.open()
    assert await good.migrate() == [1]
    await good.close()
    from_file = Store(
        PostgresBackend(user.url().replace(":" + user.password, ""), password=user.password)
    )
    await from_file.open()  # or given apart from the URL (password_file)
    await from_file.ping()
    await from_file.close()


async def test_an_unreachable_server_is_a_storage_error_without_the_password() -> None:
    port = free_port()
    store = Store(
        PostgresBackend(
            f"postgresql://app:s3cret-Passw0rd@127.0.0.1:{port}/app",
            connect_timeout_seconds=5,
        )
    )
    with pytest.raises(StorageError) as caught:
        await store.open()
    text = str(caught.value)
    assert "s3cret-Passw0rd" not in text
    assert f"postgresql://app@127.0.0.1:{port}/app" in text
    with pytest.raises(StorageError, match="not open"):
        await store.ping()


def write_config(tmp_path: Path, database: str) -> Path:
    path = tmp_path / "webhookd.toml"
    path.write_text(f"[database]\n{database}\n")
    return path


@pytest.mark.parametrize(
    "url", ["mysql://u:pw@h/db", "sqlite:///x.db", "/var/lib/webhookd.db", "postgresql://h:x/db"]
)
def test_a_database_url_that_is_not_postgresql_is_refused_without_echoing_it(
    tmp_path: Path, url: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write_config(tmp_path, f'url = "{url}"'))
    text = str(caught.value)
    assert "database.url" in text
    assert url not in text


async def test_the_settings_pick_postgresql_with_a_password_from_a_credential_file(
    tmp_path: Path, postgres_password_user: PasswordUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = postgres_password_user
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "pg-password").write_text(user.password + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    url = user.url().replace(":" + user.password, "")
    settings = load_settings(
        write_config(tmp_path, f'url = "{url}"\npassword_file = "%d/pg-password"')
    )
    store = open_store(settings)
    assert isinstance(store.backend, PostgresBackend)
    assert user.password not in store.description
    await store.open()
    try:
        assert await store.migrate() == [1]
    finally:
        await store.close()
    # The lease outlasts an attempt: delivery.timeout_seconds plus the margin.
    assert store.backend.lease_seconds == (
        settings.delivery.timeout_seconds + settings.database.lease_margin_seconds
    )
