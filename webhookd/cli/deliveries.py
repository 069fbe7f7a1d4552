"""Delivery commands: list, show, retry."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import IO, Any

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
from webhookd.errors import NotFoundError, PayloadError
from webhookd.models import DeliveryFilter, DeliveryRecord, DeliveryState
from webhookd.settings import Settings
from webhookd.store.base import Store

RETRY_BATCH = 200  # deliveries requeued per transaction when no --rate is given
RATE_TICKS_PER_SECOND = 4  # with --rate, requeue in bursts this often
PROGRESS_REDRAW_SECONDS = 0.1
PROGRESS_LINE_SECONDS = 5.0  # without a terminal: one plain line this often
PROGRESS_AFTER_SECONDS = 1.0  # a shorter run shows no progress at all
DRY_RUN_SHOWN = 20


# -- times -------------------------------------------------------------------------------------


def parse_moment(text: str, *, now: float | None = None) -> float:
    """``2024-01-15T10:00:00Z`` (ISO-8601, UTC when no offset is given), or a duration meaning
    that long ago: ``1h``, ``90m``, ``1h ago``, ``7d``. Unix seconds."""
    duration = re.fullmatch(r"\s*(.+?)(?:\s+ago)?\s*", text)
    if duration is not None:
        try:
            seconds = parse_duration(duration.group(1))
        except argparse.ArgumentTypeError:
            pass
        else:
            return (time.time() if now is None else now) - seconds
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO-8601 time (2024-01-15T10:00:00Z) nor a duration "
            "ago (1h, 30m, 7d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def delivery_dict(d: DeliveryRecord) -> dict[str, Any]:
    out = dataclasses.asdict(d)
    for key in ("created_at", "updated_at", "next_attempt_at", "retried_at"):
        out[key] = iso(out[key])
    out["attempt_log"] = [{**a, "started_at": iso(a["started_at"])} for a in out.pop("attempt_log")]
    return out


def _filters(args: argparse.Namespace, *, state: str | None, limit: int) -> DeliveryFilter:
    return DeliveryFilter(
        state=state,
        endpoint_id=args.endpoint,
        event_type=args.event_type,
        event_id=args.event_id,
        tenant=args.tenant,
        limit=limit,
        since=args.since,
        until=args.until,
    )


# -- list / show -------------------------------------------------------------------------------


def cmd_deliveries_list(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    filters = _filters(args, state=args.state, limit=args.limit)

    async def go(store: Store) -> tuple[list[DeliveryRecord], str | None]:
        return await store.list_deliveries(filters), await store.oldest_unprocessed()

    records, waiting_since = run_async(with_store(settings, go))
    if args.json:
        print_json([delivery_dict(d) for d in records])
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


def print_delivery(record: DeliveryRecord, indent: str = "") -> None:
    """A delivery and every attempt, for people (``deliveries show``, ``events show``)."""
    p = indent
    print(f"{p}delivery    {record.delivery_id}")
    print(f"{p}state       {record.state}")
    print(f"{p}endpoint    {record.endpoint_id}")
    print(f"{p}event       {record.event_type} {record.event_id}")
    if record.tenant:
        print(f"{p}tenant      {record.tenant}")
    print(f"{p}created     {iso(record.created_at)}")
    if record.retried_at is not None:
        print(
            f"{p}retried     {iso(record.retried_at)} after {record.attempts_before_retry} "
            "attempts (a fresh retry schedule from then)"
        )
    if record.next_attempt_at is not None:
        print(f"{p}next try    {iso(record.next_attempt_at)}")
    print(f"{p}attempts    {record.attempts}")
    for a in record.attempt_log:
        outcome = f"HTTP {a.status_code}" if a.status_code is not None else a.result
        took = f"{a.duration_seconds * 1000:.0f} ms"
        line = f"{p}  #{a.attempt_no}  {iso(a.started_at)}  {took}  {outcome}"
        if a.error_kind:
            line += f"  [{a.error_kind}]"
        if a.error and a.status_code is None:
            line += f"  {a.error}"
        print(line)
        if a.response_excerpt:
            print(f"{p}       response: {a.response_excerpt[:200]!r}")


def cmd_deliveries_show(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    record = run_async(with_store(settings, lambda s: s.get_delivery(args.delivery_id)))
    if record is None:
        raise NotFoundError(f"no delivery {args.delivery_id!r}")
    if args.json:
        print_json(delivery_dict(record))
        return EXIT_OK
    print_delivery(record)
    return EXIT_OK


# -- retry -------------------------------------------------------------------------------------


class Progress:
    """Progress of a long run on ``stream``: a redrawn bar on a terminal, else a plain line now
    and then. Nothing at all for a run shorter than PROGRESS_AFTER_SECONDS."""

    def __init__(self, total: int, stream: IO[str], what: str) -> None:
        self.total = total
        self.stream = stream
        self.what = what
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self.last_shown = self.started
        self.drawn = False

    def update(self, done: int) -> None:
        now = time.monotonic()
        elapsed = now - self.started
        if elapsed < PROGRESS_AFTER_SECONDS:
            return
        every = PROGRESS_REDRAW_SECONDS if self.tty else PROGRESS_LINE_SECONDS
        if self.drawn and now - self.last_shown < every and done < self.total:
            return
        self.last_shown = now
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (self.total - done) / rate if rate > 0 else 0.0
        if self.tty:
            width = 30
            filled = int(width * done / self.total) if self.total else width
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(
                f"\r[{bar}] {done}/{self.total} {self.what} {rate:.1f}/s, {left:.0f}s left "
            )
        else:
            self.stream.write(
                f"{self.what}: {done}/{self.total} ({100 * done // max(self.total, 1)}%), "
                f"{rate:.1f}/s, about {left:.0f}s left\n"
            )
        self.stream.flush()
        self.drawn = True

    def finish(self) -> None:
        if self.drawn and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _retry_states(state: str, include_succeeded: bool) -> set[str]:
    """The states a delivery may be in to be retried."""
    states = {state}
    if include_succeeded:
        states.add(DeliveryState.SUCCEEDED.value)
    return states


async def _requeue_paced(
    store: Store, ids: Sequence[str], states: set[str], rate: float | None
) -> list[str]:
    """Requeue ``ids`` in order, at most ``rate`` per second on average (bursts a few times a
    second), with progress on stderr."""
    batch = RETRY_BATCH if rate is None else max(1, int(rate / RATE_TICKS_PER_SECOND))
    progress = Progress(len(ids), sys.stderr, "retried")
    start = time.monotonic()
    changed: list[str] = []
    for offset in range(0, len(ids), batch):
        if rate is not None:
            wait = start + offset / rate - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        changed += await store.requeue(ids[offset : offset + batch], time.time(), states)
        progress.update(min(offset + batch, len(ids)))
    progress.finish()
    return changed


def _endpoint_warnings(
    settings: Settings, rows: Sequence[dict[str, object]], ids: set[str]
) -> None:
    """Say when retried deliveries will wait: their endpoint is disabled, invalid or gone."""
    table_eps = [endpoints_mod.from_table_row(r, settings) for r in rows]
    merged = endpoints_mod.merge(endpoints_mod.from_settings(settings), table_eps)
    for ep_id in sorted(ids):
        ep = merged.get(ep_id)
        if ep is None:
            why = "does not exist"
        elif ep.problem:
            why = f"is invalid ({ep.problem})"
        elif not ep.enabled:
            why = "is disabled"
        else:
            continue
        print(
            f"note: endpoint {ep_id!r} {why}: its retried deliveries wait until it can be used",
            file=sys.stderr,
        )


def _retry_one(args: argparse.Namespace, settings: Settings) -> int:
    if any(
        getattr(args, name) is not None
        for name in ("state", "endpoint", "event_type", "event_id", "tenant", "since", "until")
    ):
        raise PayloadError("bad_flags", "give a DELIVERY_ID or filters, not both")

    async def go(store: Store) -> tuple[DeliveryRecord, list[str], list[dict[str, object]]]:
        record = await store.get_delivery(args.delivery_id)
        if record is None:
            raise NotFoundError(f"no delivery {args.delivery_id!r}")
        if record.state == DeliveryState.SUCCEEDED and not args.include_succeeded:
            raise PayloadError(
                "bad_flags",
                f"delivery {record.delivery_id} succeeded already; retrying it sends the event "
                "again (a replay): add --include-succeeded",
            )
        if args.dry_run:
            return record, [], []
        states = _retry_states(record.state, args.include_succeeded)
        changed = await store.requeue([record.delivery_id], time.time(), states)
        rows = [dict(r) for r in await store.table_endpoints()]
        return record, changed, rows

    record, changed, rows = run_async(with_store(settings, go))
    if args.dry_run:
        verb = "would retry"
    elif changed:
        verb = "retried"
    else:
        verb = "not retried (its state changed meanwhile):"
    if args.json:
        print_json({"dry_run": args.dry_run, "retried": changed, "matched": [record.delivery_id]})
    else:
        print(f"{verb} {record.delivery_id} ({record.state}, {record.attempts} attempts)")
    if changed:
        _endpoint_warnings(settings, rows, {record.endpoint_id})
        print(
            "it is due now with a fresh retry schedule; a running daemon sends it at once",
            file=sys.stderr,
        )
    return EXIT_OK


def _retry_many(args: argparse.Namespace, settings: Settings) -> int:
    state = args.state or DeliveryState.FAILED.value
    if state == DeliveryState.SUCCEEDED and not args.include_succeeded:
        raise PayloadError(
            "bad_flags",
            "retrying succeeded deliveries sends their events again (a replay): add "
            "--include-succeeded",
        )
    if args.rate is not None and args.rate <= 0:
        raise PayloadError("bad_flags", "--rate must be a positive number of deliveries a second")
    filters = _filters(args, state=state, limit=-1)

    async def select(store: Store) -> list[DeliveryRecord]:
        return list(reversed(await store.list_deliveries(filters)))  # oldest first

    matched = run_async(with_store(settings, select))
    if args.dry_run:
        if args.json:
            print_json(
                {"dry_run": True, "retried": [], "matched": [d.delivery_id for d in matched]}
            )
            return EXIT_OK
        for d in matched[:DRY_RUN_SHOWN]:
            print(f"{d.delivery_id}  {d.state}  {d.endpoint_id}  {d.event_type}  {d.event_id}")
        if len(matched) > DRY_RUN_SHOWN:
            print(f"... and {len(matched) - DRY_RUN_SHOWN} more")
        print(f"would retry {len(matched)} {state} deliveries", file=sys.stderr)
        return EXIT_OK
    if not matched:
        if args.json:
            print_json({"dry_run": False, "retried": [], "matched": []})
        else:
            print(f"no {state} deliveries match", file=sys.stderr)
        return EXIT_OK
    if not args.all_matching:
        print(
            f"webhookd: error: {len(matched)} {state} deliveries match; add --all-matching to "
            "retry them all, or --dry-run to list them",
            file=sys.stderr,
        )
        return EXIT_USAGE
    ids = [d.delivery_id for d in matched]
    states = _retry_states(state, args.include_succeeded)
    started = time.monotonic()

    async def go(store: Store) -> tuple[list[str], list[dict[str, object]]]:
        changed = await _requeue_paced(store, ids, states, args.rate)
        return changed, [dict(r) for r in await store.table_endpoints()]

    changed, rows = run_async(with_store(settings, go))
    took = time.monotonic() - started
    if args.json:
        print_json({"dry_run": False, "retried": changed, "matched": ids})
    else:
        print(f"retried {len(changed)} of {len(ids)} {state} deliveries in {took:.1f}s")
    if len(changed) < len(ids):
        print(
            f"{len(ids) - len(changed)} were skipped: their state changed meanwhile",
            file=sys.stderr,
        )
    changed_set = set(changed)
    _endpoint_warnings(
        settings, rows, {d.endpoint_id for d in matched if d.delivery_id in changed_set}
    )
    return EXIT_OK


def cmd_deliveries_retry(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.delivery_id is not None:
        if args.all_matching or args.rate is not None:
            raise PayloadError("bad_flags", "--all-matching and --rate are for retries by filter")
        return _retry_one(args, settings)
    return _retry_many(args, settings)


# -- the parser --------------------------------------------------------------------------------


def _filter_flags(p: argparse.ArgumentParser, *, state_help: str) -> None:
    p.add_argument("--state", choices=["pending", "succeeded", "failed"], help=state_help)
    p.add_argument("--endpoint", help="endpoint id")
    p.add_argument("--event-type")
    p.add_argument("--event-id")
    p.add_argument("--tenant")
    p.add_argument(
        "--since",
        type=parse_moment,
        metavar="TIME",
        help="created at or after TIME: 2024-01-15T10:00:00Z, or a duration ago (1h, 7d)",
    )
    p.add_argument("--until", type=parse_moment, metavar="TIME", help="created before TIME")


def register(sub: Any, parents: Parents) -> None:
    deliveries = sub.add_parser(
        "deliveries", help="inspect and retry deliveries", parents=[parents.common]
    )
    dsub = deliveries.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    listing = [parents.common, parents.listing]
    p = dsub.add_parser("list", help="recent deliveries, newest first", parents=listing)
    p.set_defaults(func=cmd_deliveries_list)
    _filter_flags(p, state_help="only deliveries in this state")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p = dsub.add_parser("show", help="one delivery with every attempt", parents=listing)
    p.set_defaults(func=cmd_deliveries_show)
    p.add_argument("delivery_id", metavar="DELIVERY_ID")

    p = dsub.add_parser(
        "retry",
        help="send a delivery again now, or every delivery a filter selects",
        description="Make deliveries pending and due now, with a fresh retry schedule (their "
        "earlier attempts stay in their history; attempt numbers go on). A running daemon "
        "sends them at once. Give one DELIVERY_ID, or filters (--state failed by default) with "
        "--all-matching.",
        parents=listing,
    )
    p.set_defaults(func=cmd_deliveries_retry)
    p.add_argument("delivery_id", metavar="DELIVERY_ID", nargs="?")
    _filter_flags(p, state_help="retry deliveries in this state (default failed)")
    p.add_argument(
        "--all-matching",
        action="store_true",
        help="required to retry by filter: retry every delivery that matches",
    )
    p.add_argument(
        "--include-succeeded",
        action="store_true",
        help="allow retrying succeeded deliveries (a replay: receivers get them again)",
    )
    p.add_argument("--rate", type=float, metavar="N", help="retry at most N deliveries a second")
    p.add_argument("--dry-run", action="store_true", help="show what would be retried")
