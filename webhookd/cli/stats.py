"""``webhookd stats``: backlog, lag, delivery rates and failures by endpoint, from the database
(so it works with or without a running daemon, and against a copy of the file)."""

from __future__ import annotations

import argparse
import time
from typing import Any

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
from webhookd.cli.endpoint_health import span_text
from webhookd.events import timestamp_to_unix
from webhookd.models import StoreStats

DEFAULT_WINDOW = "1h"
DEFAULT_TOP = 10


def outbox_lag_seconds(stats: StoreStats, now: float) -> float:
    """Age of the oldest outbox row not fanned out yet (0 when there is none)."""
    if stats.oldest_unprocessed is None:
        return 0.0
    try:
        return max(0.0, now - timestamp_to_unix(stats.oldest_unprocessed))
    except ValueError:
        return 0.0  # a malformed timestamp: that row is about to be quarantined


def stats_dict(stats: StoreStats, now: float, window_seconds: float) -> dict[str, Any]:
    minutes = window_seconds / 60

    def per_minute(n: int) -> float:
        return round(n / minutes, 3)

    return {
        "at": iso(now),
        "window_seconds": window_seconds,
        "since": iso(stats.since),
        "backlog": {
            "outbox_unprocessed": stats.outbox_unprocessed,
            "oldest_unprocessed_occurred_at": stats.oldest_unprocessed,
            "pending": stats.pending,
            "due": stats.due,
        },
        "lag_seconds": round(outbox_lag_seconds(stats, now), 3),
        "rates_per_minute": {
            "attempts": per_minute(stats.attempts),
            "succeeded": per_minute(stats.attempts_succeeded),
            "failed": per_minute(stats.attempts_failed),
        },
        "window": {
            "attempts": stats.attempts,
            "attempts_succeeded": stats.attempts_succeeded,
            "attempts_failed": stats.attempts_failed,
            "deliveries_succeeded": stats.deliveries_succeeded,
            "deliveries_failed": stats.deliveries_failed,
            "quarantined": stats.quarantined,
        },
        "failures_by_endpoint": [
            {"endpoint": ep_id, "failed_attempts": n} for ep_id, n in stats.failures_by_endpoint
        ],
    }


def cmd_stats(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    window = args.window
    now = time.time()
    stats = run_async(with_store(settings, lambda s: s.stats(now, now - window, args.top)))
    if args.json:
        print_json(stats_dict(stats, now, window))
        return EXIT_OK
    d = stats_dict(stats, now, window)
    rates = d["rates_per_minute"]
    print(f"window       last {span_text(window)} (since {d['since']})")
    print(
        f"backlog      {stats.outbox_unprocessed} outbox rows not fanned out; "
        f"{stats.pending} deliveries pending, {stats.due} of them due now"
    )
    print(f"lag          {d['lag_seconds']:g}s (oldest outbox row not fanned out yet)")
    print(
        f"rates        {rates['attempts']:g} attempts/min: {rates['succeeded']:g} succeeded, "
        f"{rates['failed']:g} failed"
    )
    print(
        f"settled      {stats.deliveries_succeeded} deliveries succeeded, "
        f"{stats.deliveries_failed} failed for good (dead letters)"
    )
    print(f"quarantined  {stats.quarantined} outbox rows")
    if stats.failures_by_endpoint:
        print()
        print(f"failed attempts by endpoint (top {args.top}):")
        table(["endpoint", "failed"], list(stats.failures_by_endpoint))
    return EXIT_OK


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _positive_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError("the window must be longer than 0s")
    return seconds


def register(sub: Any, parents: Parents) -> None:
    p = sub.add_parser(
        "stats",
        help="backlog, lag, delivery rates and failures by endpoint",
        description="Backlog (outbox rows not fanned out, pending and due deliveries), lag, "
        "attempt rates over a recent window, failures by endpoint and quarantined rows, read "
        "from the database.",
        parents=[parents.common, parents.listing],
    )
    p.add_argument(
        "--window",
        type=_positive_duration,
        default=parse_duration(DEFAULT_WINDOW),
        help="rates and counts over this recent window (default 1h)",
    )
    p.add_argument(
        "--top",
        type=_positive_int,
        default=DEFAULT_TOP,
        metavar="N",
        help=f"endpoints listed by failures (default {DEFAULT_TOP})",
    )
    p.set_defaults(func=cmd_stats)
