"""The producer side from the command line: enqueue, and the quarantine of refused rows."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sqlite3
from typing import Any

from webhookd.cli.common import (
    EXIT_OK,
    Parents,
    iso,
    print_json,
    run_async,
    settings_from_args,
    table,
    with_store,
)
from webhookd.errors import PayloadError, WebhookdError
from webhookd.settings import Settings


def cmd_enqueue(args: argparse.Namespace) -> int:
    from webhookd.outbox import enqueue

    settings = settings_from_args(args)
    try:
        data = json.loads(args.json)
    except ValueError as exc:
        raise PayloadError("invalid_json", f"JSON argument is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PayloadError("not_object", "the JSON argument must be an object, like '{\"id\": 1}'")
    if settings.database.is_postgres:
        print(run_async(_enqueue_postgres(settings, args, data)))
        return EXIT_OK
    if not settings.database.path.exists():
        raise WebhookdError(
            f"database {settings.database.path} does not exist: run `webhookd migrate`"
        )
    conn = sqlite3.connect(settings.database.path, timeout=settings.database.busy_timeout_seconds)
    try:
        with conn:
            event_id = enqueue(
                conn,
                args.event_type,
                data,
                tenant=args.tenant,
                event_id=args.event_id,
                occurred_at=args.occurred_at,
                max_payload_bytes=settings.outbox.max_payload_bytes,
            )
    except sqlite3.IntegrityError:
        raise WebhookdError(f"event id {args.event_id!r} is already in the outbox") from None
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            raise WebhookdError("the outbox table does not exist: run `webhookd migrate`") from None
        raise WebhookdError(f"cannot write to {settings.database.path}: {exc}") from None
    finally:
        conn.close()
    print(event_id)
    return EXIT_OK


async def _enqueue_postgres(settings: Settings, args: argparse.Namespace, data: Any) -> str:
    import asyncpg  # type: ignore[import-untyped]

    from webhookd.outbox import enqueue_async
    from webhookd.store.postgres import driver_message, safe_url

    db = settings.database
    where = safe_url(db.url)
    password = db.postgres_password()
    try:
        conn = await asyncpg.connect(db.url, password=password, timeout=db.connect_timeout_seconds)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        message = driver_message(exc, db.url, password)
        raise WebhookdError(f"cannot connect to PostgreSQL at {where}: {message}") from None
    try:
        return await enqueue_async(
            conn,
            args.event_type,
            data,
            tenant=args.tenant,
            event_id=args.event_id,
            occurred_at=args.occurred_at,
            max_payload_bytes=settings.outbox.max_payload_bytes,
        )
    except asyncpg.UniqueViolationError:
        raise WebhookdError(f"event id {args.event_id!r} is already in the outbox") from None
    except asyncpg.UndefinedTableError:
        raise WebhookdError("the outbox table does not exist: run `webhookd migrate`") from None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        message = driver_message(exc, db.url, password)
        raise WebhookdError(f"cannot write to {where}: {message}") from None
    finally:
        await conn.close()


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    records = run_async(with_store(settings, lambda s: s.list_quarantine(args.limit)))
    if args.json:
        print_json(
            [{**dataclasses.asdict(q), "quarantined_at": iso(q.quarantined_at)} for q in records]
        )
        return EXIT_OK
    if not records:
        print("no quarantined outbox rows")
        return EXIT_OK
    table(
        ["outbox id", "reason", "event type", "detail"],
        [(q.outbox_id, q.reason, q.event_type or "-", q.detail) for q in records],
    )
    return EXIT_OK


def register(sub: Any, parents: Parents) -> None:
    help_ = "insert one event into the outbox"
    p = sub.add_parser("enqueue", help=help_, description=help_, parents=[parents.common])
    p.set_defaults(func=cmd_enqueue)
    p.add_argument("event_type", metavar="TYPE", help="event type, e.g. booking.created")
    p.add_argument("json", metavar="JSON", help="the event's data: a JSON object")
    p.add_argument("--tenant", help="route to this tenant's endpoints")
    p.add_argument("--event-id", help="idempotency key (generated when omitted)")
    p.add_argument("--occurred-at", help="UTC ISO-8601 time (default: now)")

    quarantine = sub.add_parser("quarantine", help="outbox rows refused", parents=[parents.common])
    qsub = quarantine.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    p = qsub.add_parser(
        "list",
        help="quarantined outbox rows with their reasons",
        parents=[parents.common, parents.listing],
    )
    p.set_defaults(func=cmd_quarantine_list)
    p.add_argument("--limit", type=int, default=50)
