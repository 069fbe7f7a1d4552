"""Endpoint commands: list, show, add, update, enable, disable, remove, rotate-secret.

Writes go to ``webhook_endpoints`` rows only (config-file endpoints are read-only here) and are
validated exactly as the daemon validates a row, so that nothing is written that the daemon
would refuse. A running daemon picks a change up without a restart (the table's triggers move
``endpoints_version``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from webhookd import endpoints as endpoints_mod
from webhookd.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    Parents,
    iso,
    parse_duration,
    print_json,
    run_async,
    settings_from_args,
    table,
    with_store,
)
from webhookd.cli.endpoint_health import (
    circuit_note,
    endpoint_dict,
    endpoint_state,
    endpoints_with_health,
    last_error_text,
    millis,
    percent,
    span_text,
)
from webhookd.errors import NotFoundError, PayloadError, WebhookdError
from webhookd.models import Endpoint, EndpointHealth, EndpointState, EndpointStatus
from webhookd.settings import Settings
from webhookd.signing import active_secrets, generate_secret
from webhookd.store.base import Store, endpoint_row

DEFAULT_HEALTH_WINDOW = "1h"
LAST_ERROR_COLUMN_CHARS = 48
PICKED_UP = "a running daemon picks the change up within a second, without a restart"


# -- list / show -------------------------------------------------------------------------------


_Listing = tuple[list[tuple[str, Endpoint | None, EndpointHealth]], dict[str, EndpointState]]


def _listing(settings: Settings, window: float) -> _Listing:
    """Every endpoint with its health, and the circuit breaker's states."""

    async def go(store: Store) -> _Listing:
        items = await endpoints_with_health(store, settings, window)
        return items, await store.endpoint_states()

    return run_async(with_store(settings, go))


def cmd_endpoints_list(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    window = args.window
    items, circuits = _listing(settings, window)
    if args.json:
        print_json(
            [endpoint_dict(ep, ep_id, h, window, circuits.get(ep_id)) for ep_id, ep, h in items]
        )
        return EXIT_OK
    if not items:
        print("no endpoints: add [[endpoints]] to the config file, or `webhookd endpoints add`")
        return EXIT_OK
    now = time.time()
    rows = [
        (
            ep_id,
            ep.source if ep else "-",
            endpoint_state(ep, circuits.get(ep_id)) if ep else "unknown",
            ",".join(ep.events) if ep else "",
            (ep.tenant or "*") if ep else "",
            h.pending,
            percent(h.success_rate),
            millis(h.p95_seconds),
            last_error_text(h, now, LAST_ERROR_COLUMN_CHARS),
            ep.url if ep else "",
        )
        for ep_id, ep, h in items
    ]
    headers = ["id", "source", "state", "events", "tenant", "pending"]
    headers += [f"ok {span_text(window)}", "p95", "last error", "url"]
    table(headers, rows)
    for ep_id, ep, _ in items:
        if ep is None:
            print(f"{ep_id}: has pending deliveries but no longer exists", file=sys.stderr)
        elif ep.problem:
            print(f"{ep.id}: {ep.problem}", file=sys.stderr)
        else:
            note = circuit_note(ep_id, circuits.get(ep_id))
            if note is not None:
                print(note, file=sys.stderr)
    return EXIT_OK


def cmd_endpoints_show(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    window = args.window
    items, circuits = _listing(settings, window)
    # The merged endpoint (the one the daemon uses) comes before a shadowed table row.
    found = next((item for item in items if item[0] == args.endpoint_id), None)
    if found is None:
        raise NotFoundError(
            f"no endpoint {args.endpoint_id!r}; `webhookd endpoints list` shows them"
        )
    ep_id, ep, health = found
    circuit = circuits.get(ep_id)
    if args.json:
        print_json(endpoint_dict(ep, ep_id, health, window, circuit))
        return EXIT_OK
    now = time.time()
    print(f"endpoint     {ep_id}")
    if ep is None:
        print("state        unknown (removed; its pending deliveries wait for it to come back)")
    else:
        print(f"source       {ep.source}")
        print(f"state        {endpoint_state(ep, circuit)}")
        if circuit is not None and circuit.state is not EndpointStatus.OK:
            print(f"since        {iso(circuit.since)}")
            print(f"reason       {circuit.disabled_reason or circuit.reason}")
            if circuit.paused_until is not None:
                print(f"next probe   {iso(circuit.paused_until)} (then one at a time)")
        if circuit is not None and circuit.consecutive_failures:
            print(
                f"failures     {circuit.consecutive_failures} in a row, since "
                f"{iso(circuit.failing_since)}"
            )
        print(f"url          {ep.url}")
        print(f"events       {', '.join(ep.events)}")
        print(f"tenant       {ep.tenant or '* (every tenant)'}")
        print(f"concurrency  {ep.max_concurrency}")
        print(f"schemes      {', '.join(ep.schemes)}")
        if ep.headers:
            print(f"headers      {', '.join(name for name, _ in ep.headers)}")
        if ep.ca_bundle:
            print(f"ca bundle    {ep.ca_bundle}")
        if ep.description:
            print(f"description  {ep.description}")
        if ep.problem:
            print(f"problem      {ep.problem}")
    print(f"pending      {health.pending}")
    print(f"last {span_text(window)}:".ljust(13) + f"{health.attempts} attempts", end="")
    if health.attempts:
        print(f", {percent(health.success_rate)} ok, p95 {millis(health.p95_seconds)}", end="")
    print()
    print(f"last error   {last_error_text(health, now)}", end="")
    print(f" ({iso(health.last_error_at)})" if health.last_error_at is not None else "")
    return EXIT_OK


# -- writes ------------------------------------------------------------------------------------


def _refuse_config_endpoint(settings: Settings, endpoint_id: str, what: str) -> None:
    if any(ep.id == endpoint_id for ep in settings.endpoints):
        raise WebhookdError(
            f"endpoint {endpoint_id!r} is defined in the config file: {what} it there "
            "(`webhookd endpoints` only changes webhook_endpoints rows)"
        )


def _read_secret(path: str) -> str:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PayloadError(
            "bad_secret", f"cannot read --secret-file {path}: {exc.strerror}"
        ) from None
    secret = text.strip()
    if not secret:
        raise PayloadError("bad_secret", f"--secret-file {path} is empty")
    if "\n" in secret:
        raise PayloadError("bad_secret", f"--secret-file {path} must hold one line: the secret")
    return secret


def _parse_headers(pairs: Sequence[str]) -> str:
    headers: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise PayloadError("bad_header", f"--header {pair!r} must be NAME=VALUE")
        headers[name.strip()] = value
    return json.dumps(headers, ensure_ascii=False)


def _apply_flags(row: dict[str, object], args: argparse.Namespace) -> None:
    """The columns the flags set (absent flags leave the row as it is)."""
    if args.url is not None:
        row["url"] = args.url
    if args.events:
        row["events"] = json.dumps(args.events, ensure_ascii=False)
    if args.tenant is not None:
        row["tenant"] = args.tenant or None  # --tenant '' : every tenant
    if args.max_concurrency is not None:
        row["max_concurrency"] = args.max_concurrency
    if args.schemes is not None:
        row["signature_schemes"] = args.schemes
    if args.header:
        row["headers"] = _parse_headers(args.header)
    if getattr(args, "no_headers", False):
        row["headers"] = None
    if args.ca_bundle is not None:
        row["ca_bundle"] = args.ca_bundle or None  # --ca-bundle '' : the default again
    if args.description is not None:
        row["description"] = args.description
    if args.disabled:
        row["enabled"] = 0
    if getattr(args, "enabled", False):
        row["enabled"] = 1


def _validated(row: Mapping[str, object], settings: Settings, verb: str) -> None:
    """Refuse (exit 2) a row the daemon would mark invalid, with the daemon's own reasons."""
    ep = endpoints_mod.from_table_row(endpoint_row(row), settings)
    if ep.problem:
        problems = "\n  ".join(ep.problem.split("; "))
        raise PayloadError("bad_endpoint", f"cannot {verb} endpoint {ep.id!r}:\n  {problems}")


def _new_secret(args: argparse.Namespace) -> tuple[str | None, bool]:
    """(secret, generated) from --secret-file / --generate-secret; (None, False) for neither."""
    if args.generate_secret:
        return generate_secret(), True
    if args.secret_file is not None:
        return _read_secret(args.secret_file), False
    return None, False


def _announce_secret(secret: str) -> None:
    print(secret)
    print(
        "the generated secret above is shown only this once: give it to the receiver",
        file=sys.stderr,
    )


def cmd_endpoints_add(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    _refuse_config_endpoint(settings, args.endpoint_id, "change")
    secret, generated = _new_secret(args)
    row: dict[str, object] = {"id": args.endpoint_id, "secret": secret}
    _apply_flags(row, args)
    _validated(row, settings, "add")

    created = run_async(with_store(settings, lambda store: store.create_endpoint(row)))
    if not created:
        raise WebhookdError(
            f"endpoint {args.endpoint_id!r} exists already: use `webhookd endpoints update`"
        )
    if generated:
        assert secret is not None
        _announce_secret(secret)
    state = "disabled" if args.disabled else "enabled"
    print(f"added endpoint {args.endpoint_id!r} ({state}); {PICKED_UP}", file=sys.stderr)
    return EXIT_OK


async def _table_row(store: Store, endpoint_id: str) -> dict[str, object]:
    for row in await store.table_endpoints():
        if str(row["id"]) == endpoint_id:
            return dict(row)
    raise NotFoundError(f"no endpoint {endpoint_id!r} in the webhook_endpoints table")


def cmd_endpoints_update(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    _refuse_config_endpoint(settings, args.endpoint_id, "change")
    if args.disabled and args.enabled:
        raise PayloadError("bad_flags", "--enabled and --disabled contradict each other")
    if args.header and args.no_headers:
        raise PayloadError("bad_flags", "--header and --no-headers contradict each other")
    secret, generated = _new_secret(args)

    async def go(store: Store) -> bool:
        row = await _table_row(store, args.endpoint_id)
        before = dict(row)
        _apply_flags(row, args)
        if secret is not None:
            # Replaced at once: `webhookd endpoints rotate-secret` keeps the old one signing.
            row.update(secret=secret, previous_secret=None, previous_secret_expires_at=None)
        if row == before:
            return False
        _validated(row, settings, "update")
        if not await store.update_endpoint(row):
            raise NotFoundError(f"no endpoint {args.endpoint_id!r} in the webhook_endpoints table")
        return True

    changed = run_async(with_store(settings, go))
    if generated:
        assert secret is not None
        _announce_secret(secret)
    if not changed:
        print(
            f"endpoint {args.endpoint_id!r} unchanged (no flag changes anything)", file=sys.stderr
        )
        return EXIT_OK
    if secret is not None:
        print(
            "the old secret no longer signs; `webhookd endpoints rotate-secret` keeps it "
            "signing for a grace period instead",
            file=sys.stderr,
        )
    print(f"updated endpoint {args.endpoint_id!r}; {PICKED_UP}", file=sys.stderr)
    return EXIT_OK


def _set_enabled(args: argparse.Namespace, enabled: bool) -> int:
    settings = settings_from_args(args)
    verb = "enable" if enabled else "disable"
    _refuse_config_endpoint(settings, args.endpoint_id, f"{verb} (enabled = ...)")

    async def go(store: Store) -> tuple[bool, int]:
        row = await _table_row(store, args.endpoint_id)
        pending = (await store.pending_counts()).get(args.endpoint_id, 0)
        if bool(row.get("enabled", 1)) == enabled and row.get("enabled") in (0, 1):
            return False, pending
        row["enabled"] = int(enabled)
        if enabled:
            _validated(row, settings, "enable")
        return await store.update_endpoint(row), pending

    changed, pending = run_async(with_store(settings, go))
    state = "enabled" if enabled else "disabled"
    if not changed:
        print(f"endpoint {args.endpoint_id!r} was already {state}", file=sys.stderr)
        return EXIT_OK
    print(f"endpoint {args.endpoint_id!r} {state}; {PICKED_UP}", file=sys.stderr)
    if not enabled:
        kept = f"; its {pending} pending deliveries are kept for when it is enabled again"
        print(f"requests already in flight finish{kept if pending else ''}", file=sys.stderr)
    elif pending:
        print(f"its {pending} pending deliveries are sent now", file=sys.stderr)
    return EXIT_OK


def cmd_endpoints_enable(args: argparse.Namespace) -> int:
    """Enable a table endpoint's row, and clear what the daemon decided about any endpoint:
    disabled (410 Gone, failing too long) or backing off. Its pending deliveries resume."""
    settings = settings_from_args(args)
    static = next((ep for ep in settings.endpoints if ep.id == args.endpoint_id), None)
    if static is not None and not static.enabled:
        _refuse_config_endpoint(settings, args.endpoint_id, "enable (enabled = true)")

    async def go(store: Store) -> tuple[bool, EndpointState | None, int]:
        row_changed = False
        if static is None:
            row = await _table_row(store, args.endpoint_id)
            if row.get("enabled") != 1:
                row["enabled"] = 1
                _validated(row, settings, "enable")
                row_changed = await store.update_endpoint(row)
        else:
            circuit = (await store.endpoint_states()).get(args.endpoint_id)
            if circuit is None or circuit.state is EndpointStatus.OK:
                raise WebhookdError(
                    f"endpoint {args.endpoint_id!r} is defined in the config file and the daemon "
                    "has neither disabled it nor backed off from it: there is nothing to enable "
                    "(its `enabled` setting lives in the config file)"
                )
        cleared = await store.clear_endpoint_state(args.endpoint_id)
        pending = (await store.pending_counts()).get(args.endpoint_id, 0)
        return row_changed, cleared, pending

    row_changed, cleared, pending = run_async(with_store(settings, go))
    was = cleared if cleared is not None and cleared.state is not EndpointStatus.OK else None
    if not row_changed and was is None:
        print(f"endpoint {args.endpoint_id!r} was already enabled", file=sys.stderr)
        return EXIT_OK
    print(f"endpoint {args.endpoint_id!r} enabled; {PICKED_UP}", file=sys.stderr)
    if was is not None:
        why = was.disabled_reason or was.reason
        print(f"it was {was.state.value} since {iso(was.since)}: {why}", file=sys.stderr)
    if pending:
        print(f"its {pending} pending deliveries are sent now", file=sys.stderr)
    return EXIT_OK


def cmd_endpoints_disable(args: argparse.Namespace) -> int:
    return _set_enabled(args, False)


def cmd_endpoints_remove(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    _refuse_config_endpoint(settings, args.endpoint_id, "remove")
    removal = run_async(
        with_store(settings, lambda s: s.remove_endpoint(args.endpoint_id, force=args.force))
    )
    if not removal.found:
        raise NotFoundError(f"no endpoint {args.endpoint_id!r} in the webhook_endpoints table")
    if not removal.removed:
        print(
            f"webhookd: error: endpoint {args.endpoint_id!r} has {removal.pending} pending "
            "deliveries; let them finish (`webhookd deliveries list --state pending --endpoint "
            f"{args.endpoint_id}`), or disable it instead, or add --force to remove it anyway "
            "(its pending deliveries are then kept, unsent, until an endpoint with this id "
            "exists again)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    print(f"removed endpoint {args.endpoint_id!r}; {PICKED_UP}", file=sys.stderr)
    if removal.pending:
        print(
            f"its {removal.pending} pending deliveries stay pending, unsent, until an endpoint "
            f"with id {args.endpoint_id!r} exists again",
            file=sys.stderr,
        )
    return EXIT_OK


# -- rotate-secret -----------------------------------------------------------------------------

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


# -- the parser --------------------------------------------------------------------------------


def _endpoint_flags(p: argparse.ArgumentParser, *, adding: bool) -> None:
    p.add_argument("endpoint_id", metavar="ID")
    p.add_argument("--url", required=adding, help="https:// URL the webhooks are POSTed to")
    secret = p.add_mutually_exclusive_group(required=adding)
    secret.add_argument(
        "--secret-file", metavar="FILE", help="read the signing secret from FILE ('-': stdin)"
    )
    secret.add_argument(
        "--generate-secret",
        action="store_true",
        help="generate a whsec_ secret (good for both schemes), printed once",
    )
    p.add_argument(
        "--events",
        nargs="+",
        action="extend",
        metavar="PATTERN",
        help="event types it receives: booking.created, booking.*, * (default *)",
    )
    p.add_argument("--tenant", help="receive only this tenant's events ('' : every tenant)")
    p.add_argument("--max-concurrency", type=int, metavar="N", help="requests in flight at most")
    p.add_argument(
        "--schemes", metavar="SCHEMES", help="signature schemes: seed, standard or seed,standard"
    )
    p.add_argument(
        "--header",
        action="append",
        metavar="NAME=VALUE",
        help="an extra request header (repeat for more)",
    )
    p.add_argument(
        "--ca-bundle",
        metavar="PEM",
        help="absolute path of a PEM file: the CAs trusted for this endpoint's TLS instead of "
        "the system's ('' : back to delivery.ca_bundle or the system's)",
    )
    p.add_argument("--description")
    p.add_argument("--disabled", action="store_true", help="create it disabled / disable it")


def register(sub: Any, parents: Parents) -> None:
    endpoints = sub.add_parser(
        "endpoints", help="list and manage endpoints", parents=[parents.common]
    )
    esub = endpoints.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    listing = [parents.common, parents.listing]

    def window_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--window",
            type=parse_duration,
            default=parse_duration(DEFAULT_HEALTH_WINDOW),
            help="health over this recent window (default 1h)",
        )

    p = esub.add_parser(
        "list",
        help="endpoints from the config file and the table, with their health",
        parents=listing,
    )
    window_flag(p)
    p.set_defaults(func=cmd_endpoints_list)
    p = esub.add_parser("show", help="one endpoint with its health", parents=listing)
    p.add_argument("endpoint_id", metavar="ID")
    window_flag(p)
    p.set_defaults(func=cmd_endpoints_show)

    p = esub.add_parser(
        "add",
        help="add a webhook_endpoints row",
        description="Add an endpoint to the webhook_endpoints table, validated as the daemon "
        f"validates it; {PICKED_UP}.",
        parents=[parents.common],
    )
    _endpoint_flags(p, adding=True)
    p.set_defaults(func=cmd_endpoints_add)
    p = esub.add_parser(
        "update",
        help="change a webhook_endpoints row (only what the flags say)",
        description="Change a table endpoint: each flag replaces that setting (--header "
        "replaces all extra headers). A new secret replaces the old one at once; "
        "`rotate-secret` keeps the old one signing for a while instead.",
        parents=[parents.common],
    )
    _endpoint_flags(p, adding=False)
    p.add_argument("--enabled", action="store_true", help="enable it")
    p.add_argument("--no-headers", action="store_true", help="remove every extra header")
    p.set_defaults(func=cmd_endpoints_update)
    for name, func, text in (
        (
            "enable",
            cmd_endpoints_enable,
            "send to an endpoint again: a disabled table endpoint, or one the daemon disabled "
            "(410 Gone, failing too long) or is backing off from",
        ),
        ("disable", cmd_endpoints_disable, "stop sending to a table endpoint (pending ones wait)"),
    ):
        p = esub.add_parser(name, help=text, parents=[parents.common])
        p.add_argument("endpoint_id", metavar="ID")
        p.set_defaults(func=func)
    p = esub.add_parser(
        "remove",
        help="delete a webhook_endpoints row",
        description="Delete a table endpoint. Refused while it has pending deliveries, unless "
        "--force: they are then kept, unsent, until an endpoint with this id exists again.",
        parents=[parents.common],
    )
    p.add_argument("endpoint_id", metavar="ID")
    p.add_argument("--force", action="store_true", help="remove it even with pending deliveries")
    p.set_defaults(func=cmd_endpoints_remove)

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
