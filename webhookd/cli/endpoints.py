"""Endpoint commands: list, rotate-secret."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from webhookd import endpoints as endpoints_mod
from webhookd.cli.common import (
    EXIT_OK,
    Parents,
    iso,
    parse_duration,
    print_json,
    run_async,
    settings_from_args,
    table,
    with_store,
)
from webhookd.errors import NotFoundError, PayloadError, WebhookdError
from webhookd.signing import active_secrets, generate_secret
from webhookd.store.base import Store


def cmd_endpoints_list(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)

    async def go(store: Store) -> list[Any]:
        table = [endpoints_mod.from_table_row(r, settings) for r in await store.table_endpoints()]
        pending = await store.pending_counts()
        static = endpoints_mod.from_settings(settings)
        merged = endpoints_mod.merge(static, table)
        shadowed = endpoints_mod.shadowed(static, table)
        return [(ep, pending.get(ep.id, 0)) for ep in [*merged.values(), *shadowed]]

    items = run_async(with_store(settings, go))
    if args.json:
        print_json(
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
    table(["id", "source", "state", "events", "tenant", "pending", "url"], rows)
    for ep, _ in items:
        if ep.problem:
            print(f"{ep.id}: {ep.problem}", file=sys.stderr)
    return EXIT_OK


DEFAULT_ROTATION_GRACE = "24h"


MAX_ROTATION_GRACE_SECONDS = 7 * 86400


def cmd_endpoints_rotate_secret(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    grace = args.grace
    if not 0 < grace <= MAX_ROTATION_GRACE_SECONDS:
        raise PayloadError("bad_grace", "--grace must be more than 0 and at most 7d")
    if any(ep.id == args.endpoint_id for ep in settings.endpoints):
        raise WebhookdError(
            f"endpoint {args.endpoint_id!r} is defined in the config file: rotate its secret "
            "there (README, 'Rotating a signing secret')"
        )
    new_secret = generate_secret()
    expires_at = iso(time.time() + grace)
    assert expires_at is not None

    async def go(store: Store) -> tuple[bool, bool]:
        rows = {str(r["id"]): r for r in await store.table_endpoints()}
        row = rows.get(args.endpoint_id)
        if row is None:
            return False, False
        replaced = endpoints_mod.from_table_row(row, settings)
        still_in_grace = len(active_secrets(replaced, time.time())) > 1
        return await store.rotate_secret(args.endpoint_id, new_secret, expires_at), still_in_grace

    rotated, dropped_older = run_async(with_store(settings, go))
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


def register(sub: Any, parents: Parents) -> None:
    endpoints = sub.add_parser(
        "endpoints", help="list and manage endpoints", parents=[parents.common]
    )
    esub = endpoints.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    p = esub.add_parser(
        "list",
        help="endpoints from the config file and the table",
        parents=[parents.common, parents.listing],
    )
    p.set_defaults(func=cmd_endpoints_list)
    p = esub.add_parser(
        "rotate-secret",
        help="give a table endpoint a new signing secret (printed once)",
        description="Generate a new whsec_ secret for a webhook_endpoints row. The old secret "
        "keeps signing (in a second signature) until the grace period ends.",
        parents=[parents.common],
    )
    p.set_defaults(func=cmd_endpoints_rotate_secret)
    p.add_argument("endpoint_id", metavar="ID")
    p.add_argument(
        "--grace",
        type=parse_duration,
        default=parse_duration(DEFAULT_ROTATION_GRACE),
        help="how long the previous secret keeps signing (default 24h, at most 7d)",
    )
