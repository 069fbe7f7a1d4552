"""Commands that run or prepare the daemon: run, migrate, check-config, version, demo."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from webhookd import __version__
from webhookd import endpoints as endpoints_mod
from webhookd.cli.common import (
    EXIT_OK,
    Parents,
    human_seconds,
    run_async,
    settings_from_args,
)
from webhookd.retry import RetryPolicy, schedule
from webhookd.settings import CONFIG_ENV_VAR
from webhookd.store import open_store

SWITCH_INTERVAL_SECONDS = 0.001


def cmd_version(args: argparse.Namespace) -> int:
    print(f"webhookd {__version__}")
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    static = endpoints_mod.from_settings(settings)
    delays = ", ".join(
        human_seconds(d) for d in schedule(RetryPolicy.from_settings(settings.retry))
    )
    print("configuration OK")
    print(f"  database:  {open_store(settings).description}")
    print(f"  http:      {settings.http.listen or '(disabled)'}")
    print(f"  endpoints: {len(static)} in the config file (the webhook_endpoints table adds more)")
    print(f"  retries:   {settings.retry.max_attempts} attempts, waits {delays}")
    unknown = "allowed" if settings.events.allow_unknown_types else "quarantined"
    print(
        f"  events:    data not matching the catalogue: {settings.events.schema_mismatch}; "
        f"types outside it: {unknown}"
    )
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)

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

    settings = settings_from_args(args)
    # The store's thread (aiosqlite) runs whole transactions in Python; when it holds the GIL
    # the event loop waits for it, 5 ms by default. 1 ms keeps those waits short: measured
    # (benchmarks/RESULTS.md), the hanging-endpoint scenario passed in 3 runs of 4 at 1 ms and
    # in none of 3 at 5 ms.
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    log.configure(settings.log.level, settings.log.format)
    # The file a SIGHUP re-reads: the one settings_from_args read.
    config_path = getattr(args, "config", None) or os.environ.get(CONFIG_ENV_VAR) or None

    async def go() -> None:
        await Daemon(settings, config_path=config_path).run(install_signal_handlers=True)

    run_async(go())
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from webhookd.demo import run_demo

    return run_async(run_demo())


def register(sub: Any, parents: Parents) -> None:
    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> None:
        p = sub.add_parser(name, help=help_, description=help_, parents=[parents.common])
        p.set_defaults(func=func)

    add("run", cmd_run, "run the daemon (migrates the database first)")
    add("migrate", cmd_migrate, "create or upgrade the database tables")
    add("check-config", cmd_check_config, "validate the configuration and exit")
    add("version", cmd_version, "print the version")
    add("demo", cmd_demo, "deliver the seven example events to a local verifying receiver")
