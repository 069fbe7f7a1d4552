"""What every command module shares: exit codes, the event loop, settings, output, the store."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from webhookd.errors import WebhookdError
from webhookd.settings import CONFIG_ENV_VAR, Settings, load_settings
from webhookd.store import open_store
from webhookd.store.base import Store

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


@dataclass(frozen=True)
class Parents:
    """Argument groups that subcommands inherit: ``--config`` and, for listings, ``--json``."""

    common: argparse.ArgumentParser
    listing: argparse.ArgumentParser


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a uvloop event loop (asyncio's own where uvloop is unavailable)."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported OS
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The settings from ``--config``, else ``$WEBHOOKD_CONFIG``, else the defaults."""
    path = getattr(args, "config", None) or os.environ.get(CONFIG_ENV_VAR) or None
    return load_settings(path)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    print("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


async def with_store(settings: Settings, body: Callable[[Store], Coroutine[Any, Any, T]]) -> T:
    """Run ``body`` on an open, migrated store. Never creates a database as a side effect."""
    if not settings.database.is_postgres and not settings.database.path.exists():
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


def human_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:g}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``24h``, ``7d`` → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; use e.g. 90s, 30m, 24h or 7d"
        )
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
