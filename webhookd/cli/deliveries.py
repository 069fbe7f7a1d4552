"""Delivery commands: list, show."""

from __future__ import annotations

import argparse
import dataclasses
import sys
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
from webhookd.errors import NotFoundError
from webhookd.models import DeliveryFilter, DeliveryRecord
from webhookd.store.base import Store


def _delivery_dict(d: DeliveryRecord) -> dict[str, Any]:
    out = dataclasses.asdict(d)
    for key in ("created_at", "updated_at", "next_attempt_at"):
        out[key] = iso(out[key])
    out["attempt_log"] = [{**a, "started_at": iso(a["started_at"])} for a in out.pop("attempt_log")]
    return out


def cmd_deliveries_list(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
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

    records, waiting_since = run_async(with_store(settings, go))
    if args.json:
        print_json([_delivery_dict(d) for d in records])
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
    table(
        ["delivery", "state", "attempts", "endpoint", "event", "event id", "next attempt", "last"],
        [
            (
                d.delivery_id,
                d.state,
                d.attempts,
                d.endpoint_id,
                d.event_type,
                d.event_id,
                iso(d.next_attempt_at) or "-",
                d.last_error or (d.last_status if d.last_status else "-"),
            )
            for d in records
        ],
    )
    return EXIT_OK


def cmd_deliveries_show(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    record = run_async(with_store(settings, lambda s: s.get_delivery(args.delivery_id)))
    if record is None:
        raise NotFoundError(f"no delivery {args.delivery_id!r}")
    if args.json:
        print_json(_delivery_dict(record))
        return EXIT_OK
    print(f"delivery    {record.delivery_id}")
    print(f"state       {record.state}")
    print(f"endpoint    {record.endpoint_id}")
    print(f"event       {record.event_type} {record.event_id}")
    if record.tenant:
        print(f"tenant      {record.tenant}")
    print(f"created     {iso(record.created_at)}")
    if record.next_attempt_at is not None:
        print(f"next try    {iso(record.next_attempt_at)}")
    print(f"attempts    {record.attempts}")
    for a in record.attempt_log:
        outcome = f"HTTP {a.status_code}" if a.status_code is not None else a.result
        took = f"{a.duration_seconds * 1000:.0f} ms"
        line = f"  #{a.attempt_no}  {iso(a.started_at)}  {took}  {outcome}"
        if a.error and a.status_code is None:
            line += f"  {a.error}"
        print(line)
        if a.response_excerpt:
            print(f"       response: {a.response_excerpt[:200]!r}")
    return EXIT_OK


def register(sub: Any, parents: Parents) -> None:
    deliveries = sub.add_parser("deliveries", help="inspect deliveries", parents=[parents.common])
    dsub = deliveries.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    listing = [parents.common, parents.listing]
    p = dsub.add_parser("list", help="recent deliveries, newest first", parents=listing)
    p.set_defaults(func=cmd_deliveries_list)
    p.add_argument("--state", choices=["pending", "succeeded", "failed"])
    p.add_argument("--endpoint", help="endpoint id")
    p.add_argument("--event-type")
    p.add_argument("--event-id")
    p.add_argument("--tenant")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p = dsub.add_parser("show", help="one delivery with every attempt", parents=listing)
    p.set_defaults(func=cmd_deliveries_show)
    p.add_argument("delivery_id", metavar="DELIVERY_ID")
