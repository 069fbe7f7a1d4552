"""The ``webhookd`` command. The only place that owns an event loop (uvloop) and reads argv.

Exit codes: 0 success, 1 failure at run time, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from webhookd import __version__
from webhookd import endpoints as endpoints_mod
from webhookd.errors import ConfigError, NotFoundError, PayloadError, WebhookdError
from webhookd.models import DeliveryFilter, DeliveryRecord
from webhookd.retry import RetryPolicy, schedule
from webhookd.settings import CONFIG_ENV_VAR, Settings, load_settings
from webhookd.signing import active_secrets, generate_secret
from webhookd.store import open_store
from webhookd.store.base import Store

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a uvloop event loop (asyncio's own where uvloop is unavailable)."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported OS
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


# -- helpers ---------------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> Settings:
    path = getattr(args, "config", None) or os.environ.get(CONFIG_ENV_VAR) or None
    return load_settings(path)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    print("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


async def _with_store(settings: Settings, body: Callable[[Store], Coroutine[Any, Any, T]]) -> T:
    """Run ``body`` on an open, migrated store. Never creates a database as a side effect."""
    if not settings.database.path.exists():
        raise WebhookdError(
            f"database {settings.database.path} does not exist: check database.path, "
            "or run `webhookd migrate` to create it"
        )
    store = open_store(settings)
    await store.open()
    try:
        if await store.schema_version() == 0:
            raise WebhookdError(
                f"{store.description} has no webhookd tables yet: run `webhookd migrate` first"
            )
        return await body(store)
    finally:
        await store.close()


# -- commands --------------------------------------------------------------------------------


def cmd_version(args: argparse.Namespace) -> int:
    print(f"webhookd {__version__}")
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    static = endpoints_mod.from_settings(settings)
    delays = ", ".join(
        _human_seconds(d) for d in schedule(RetryPolicy.from_settings(settings.retry))
    )
    print("configuration OK")
    print(f"  database:  {settings.database.path}")
    print(f"  http:      {settings.http.listen or '(disabled)'}")
    print(f"  endpoints: {len(static)} in the config file (the webhook_endpoints table adds more)")
    print(f"  retries:   {settings.retry.max_attempts} attempts, waits {delays}")
    unknown = "allowed" if settings.events.allow_unknown_types else "quarantined"
    print(
        f"  events:    data not matching the catalogue: {settings.events.schema_mismatch}; "
        f"types outside it: {unknown}"
    )
    return EXIT_OK


def _human_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:g}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def go() -> tuple[list[int], int]:
        store = open_store(settings)
        await store.open()
        try:
            applied = await store.migrate()
            return applied, await store.schema_version()
        finally:
            await store.close()

    applied, version = run_async(go())
    if applied:
        print(f"applied migrations {', '.join(map(str, applied))}; schema is at version {version}")
    else:
        print(f"schema is up to date (version {version})")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from webhookd import log
    from webhookd.daemon import Daemon

    settings = _settings(args)
    log.configure(settings.log.level, settings.log.format)

    async def go() -> None:
        await Daemon(settings).run(install_signal_handlers=True)

    run_async(go())
    return EXIT_OK


def cmd_enqueue(args: argparse.Namespace) -> int:
    from webhookd.outbox import enqueue

    settings = _settings(args)
    try:
        data = json.loads(args.json)
    except ValueError as exc:
        raise PayloadError("invalid_json", f"JSON argument is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PayloadError("not_object", "the JSON argument must be an object, like '{\"id\": 1}'")
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


def cmd_endpoints_list(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def go(store: Store) -> list[Any]:
        table = [endpoints_mod.from_table_row(r, settings) for r in await store.table_endpoints()]
        pending = await store.pending_counts()
        static = endpoints_mod.from_settings(settings)
        merged = endpoints_mod.merge(static, table)
        shadowed = endpoints_mod.shadowed(static, table)
        return [(ep, pending.get(ep.id, 0)) for ep in [*merged.values(), *shadowed]]

    items = run_async(_with_store(settings, go))
    if args.json:
        _print_json(
            [
                {
                    "id": ep.id,
                    "url": ep.url,
                    "source": ep.source,
                    "events": list(ep.events),
                    "tenant": ep.tenant,
                    "enabled": ep.enabled,
                    "max_concurrency": ep.max_concurrency,
                    "description": ep.description,
                    "problem": ep.problem,
                    "pending": pending,
                }
                for ep, pending in items
            ]
        )
        return EXIT_OK
    if not items:
        print("no endpoints: add [[endpoints]] to the config file or rows to webhook_endpoints")
        return EXIT_OK
    rows = [
        (
            ep.id,
            ep.source,
            "problem" if ep.problem else ("enabled" if ep.enabled else "disabled"),
            ",".join(ep.events),
            ep.tenant or "*",
            pending,
            ep.url,
        )
        for ep, pending in items
    ]
    _table(["id", "source", "state", "events", "tenant", "pending", "url"], rows)
    for ep, _ in items:
        if ep.problem:
            print(f"{ep.id}: {ep.problem}", file=sys.stderr)
    return EXIT_OK


DEFAULT_ROTATION_GRACE = "24h"
MAX_ROTATION_GRACE_SECONDS = 7 * 86400
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``24h``, ``7d`` → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; use e.g. 90s, 30m, 24h or 7d"
        )
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def cmd_endpoints_rotate_secret(args: argparse.Namespace) -> int:
    settings = _settings(args)
    grace = args.grace
    if not 0 < grace <= MAX_ROTATION_GRACE_SECONDS:
        raise PayloadError("bad_grace", "--grace must be more than 0 and at most 7d")
    if any(ep.id == args.endpoint_id for ep in settings.endpoints):
        raise WebhookdError(
            f"endpoint {args.endpoint_id!r} is defined in the config file: rotate its secret "
            "there (README, 'Rotating a signing secret')"
        )
    new_secret = generate_secret()
    expires_at = _iso(time.time() + grace)
    assert expires_at is not None

    async def go(store: Store) -> tuple[bool, bool]:
        rows = {str(r["id"]): r for r in await store.table_endpoints()}
        row = rows.get(args.endpoint_id)
        if row is None:
            return False, False
        replaced = endpoints_mod.from_table_row(row, settings)
        still_in_grace = len(active_secrets(replaced, time.time())) > 1
        return await store.rotate_secret(args.endpoint_id, new_secret, expires_at), still_in_grace

    rotated, dropped_older = run_async(_with_store(settings, go))
    if not rotated:
        raise NotFoundError(f"no endpoint {args.endpoint_id!r} in the webhook_endpoints table")
    print(new_secret)
    if dropped_older:
        print(
            "warning: the endpoint was still in an earlier rotation's grace period; the secret "
            "before the last one no longer signs",
            file=sys.stderr,
        )
    print(
        f"rotated: the new secret above is shown only this once. Until {expires_at} requests "
        "are signed with both the new and the previous secret; give the new one to the receiver.",
        file=sys.stderr,
    )
    return EXIT_OK


def _delivery_dict(d: DeliveryRecord) -> dict[str, Any]:
    out = dataclasses.asdict(d)
    for key in ("created_at", "updated_at", "next_attempt_at"):
        out[key] = _iso(out[key])
    out["attempt_log"] = [
        {**a, "started_at": _iso(a["started_at"])} for a in out.pop("attempt_log")
    ]
    return out


def cmd_deliveries_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    filters = DeliveryFilter(
        state=args.state,
        endpoint_id=args.endpoint,
        event_type=args.event_type,
        event_id=args.event_id,
        tenant=args.tenant,
        limit=args.limit,
    )

    async def go(store: Store) -> tuple[list[DeliveryRecord], str | None]:
        return await store.list_deliveries(filters), await store.oldest_unprocessed()

    records, waiting_since = run_async(_with_store(settings, go))
    if args.json:
        _print_json([_delivery_dict(d) for d in records])
        return EXIT_OK
    if waiting_since is not None:
        print(
            f"note: outbox rows since {waiting_since} are not fanned out yet "
            "(is `webhookd run` running on this database?)",
            file=sys.stderr,
        )
    if not records:
        print("no deliveries match")
        return EXIT_OK
    _table(
        ["delivery", "state", "attempts", "endpoint", "event", "event id", "next attempt", "last"],
        [
            (
                d.delivery_id,
                d.state,
                d.attempts,
                d.endpoint_id,
                d.event_type,
                d.event_id,
                _iso(d.next_attempt_at) or "-",
                d.last_error or (d.last_status if d.last_status else "-"),
            )
            for d in records
        ],
    )
    return EXIT_OK


def cmd_deliveries_show(args: argparse.Namespace) -> int:
    settings = _settings(args)
    record = run_async(_with_store(settings, lambda s: s.get_delivery(args.delivery_id)))
    if record is None:
        raise NotFoundError(f"no delivery {args.delivery_id!r}")
    if args.json:
        _print_json(_delivery_dict(record))
        return EXIT_OK
    print(f"delivery    {record.delivery_id}")
    print(f"state       {record.state}")
    print(f"endpoint    {record.endpoint_id}")
    print(f"event       {record.event_type} {record.event_id}")
    if record.tenant:
        print(f"tenant      {record.tenant}")
    print(f"created     {_iso(record.created_at)}")
    if record.next_attempt_at is not None:
        print(f"next try    {_iso(record.next_attempt_at)}")
    print(f"attempts    {record.attempts}")
    for a in record.attempt_log:
        outcome = f"HTTP {a.status_code}" if a.status_code is not None else a.result
        took = f"{a.duration_seconds * 1000:.0f} ms"
        line = f"  #{a.attempt_no}  {_iso(a.started_at)}  {took}  {outcome}"
        if a.error and a.status_code is None:
            line += f"  {a.error}"
        print(line)
        if a.response_excerpt:
            print(f"       response: {a.response_excerpt[:200]!r}")
    return EXIT_OK


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    records = run_async(_with_store(settings, lambda s: s.list_quarantine(args.limit)))
    if args.json:
        _print_json(
            [{**dataclasses.asdict(q), "quarantined_at": _iso(q.quarantined_at)} for q in records]
        )
        return EXIT_OK
    if not records:
        print("no quarantined outbox rows")
        return EXIT_OK
    _table(
        ["outbox id", "reason", "event type", "detail"],
        [(q.outbox_id, q.reason, q.event_type or "-", q.detail) for q in records],
    )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from webhookd.demo import run_demo

    return run_async(run_demo())


# -- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        "-c",
        default=argparse.SUPPRESS,
        help=f"TOML configuration file (default: ${CONFIG_ENV_VAR}, else built-in defaults)",
    )
    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")

    parser = argparse.ArgumentParser(
        prog="webhookd",
        parents=[common],
        description="Delivers the rows of an outbox table as signed webhooks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str, *parents: Any) -> Any:
        p = sub.add_parser(name, help=help_, description=help_, parents=[common, *parents])
        p.set_defaults(func=func)
        return p

    add("run", cmd_run, "run the daemon (migrates the database first)")
    add("migrate", cmd_migrate, "create or upgrade the database tables")
    add("check-config", cmd_check_config, "validate the configuration and exit")
    add("version", cmd_version, "print the version")
    add("demo", cmd_demo, "deliver the seven example events to a local verifying receiver")

    p = add("enqueue", cmd_enqueue, "insert one event into the outbox")
    p.add_argument("event_type", metavar="TYPE", help="event type, e.g. booking.created")
    p.add_argument("json", metavar="JSON", help="the event's data: a JSON object")
    p.add_argument("--tenant", help="route to this tenant's endpoints")
    p.add_argument("--event-id", help="idempotency key (generated when omitted)")
    p.add_argument("--occurred-at", help="UTC ISO-8601 time (default: now)")

    endpoints = sub.add_parser("endpoints", help="list endpoints", parents=[common])
    esub = endpoints.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    p = esub.add_parser("list", help="endpoints from the config file and the table",
                        parents=[common, listing])  # fmt: skip
    p.set_defaults(func=cmd_endpoints_list)
    p = esub.add_parser(
        "rotate-secret",
        help="give a table endpoint a new signing secret (printed once)",
        description="Generate a new whsec_ secret for a webhook_endpoints row. The old secret "
        "keeps signing (in a second signature) until the grace period ends.",
        parents=[common],
    )
    p.set_defaults(func=cmd_endpoints_rotate_secret)
    p.add_argument("endpoint_id", metavar="ID")
    p.add_argument(
        "--grace",
        type=parse_duration,
        default=parse_duration(DEFAULT_ROTATION_GRACE),
        help="how long the previous secret keeps signing (default 24h, at most 7d)",
    )

    deliveries = sub.add_parser("deliveries", help="inspect deliveries", parents=[common])
    dsub = deliveries.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    p = dsub.add_parser("list", help="recent deliveries, newest first", parents=[common, listing])
    p.set_defaults(func=cmd_deliveries_list)
    p.add_argument("--state", choices=["pending", "succeeded", "failed"])
    p.add_argument("--endpoint", help="endpoint id")
    p.add_argument("--event-type")
    p.add_argument("--event-id")
    p.add_argument("--tenant")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p = dsub.add_parser("show", help="one delivery with every attempt", parents=[common, listing])
    p.set_defaults(func=cmd_deliveries_show)
    p.add_argument("delivery_id", metavar="DELIVERY_ID")

    from webhookd.events_cli import add_events_parser
    from webhookd.send_test import add_send_test_parser
    from webhookd.verify_cli import add_verify_parser

    add_verify_parser(sub, [common])
    add_events_parser(sub, [common], listing)
    add_send_test_parser(sub, [common])

    quarantine = sub.add_parser("quarantine", help="outbox rows refused", parents=[common])
    qsub = quarantine.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    p = qsub.add_parser("list", help="quarantined outbox rows with their reasons",
                        parents=[common, listing])  # fmt: skip
    p.set_defaults(func=cmd_quarantine_list)
    p.add_argument("--limit", type=int, default=50)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        where = f" ({exc.source})" if exc.source else ""
        print(f"webhookd: invalid configuration{where}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    except PayloadError as exc:
        print(f"webhookd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except WebhookdError as exc:
        print(f"webhookd: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `webhookd ... | head`: the reader left; say nothing more (as other Unix tools do).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
