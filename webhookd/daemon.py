"""The daemon's lifecycle: start in order, run until told to stop, stop in order.

Shutdown is one readable sequence: stop claiming → let in-flight requests finish within the
grace period → cancel the rest (left pending, no attempt counted) → persist → close.

SIGHUP reloads the configuration file: what can change at run time is applied without
disturbing requests in flight; an invalid file is refused and the running configuration kept.
systemd hears about all of it through :mod:`webhookd.systemd` (READY, STATUS, WATCHDOG,
RELOADING, STOPPING).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from webhookd import __version__, log
from webhookd import endpoints as endpoints_mod
from webhookd.delivery import HttpSender, Sender
from webhookd.dispatcher import Dispatcher
from webhookd.errors import ConfigError, StorageError, StoreLockedError, WebhookdError
from webhookd.http_api import HttpServer, make_app
from webhookd.log import log_event
from webhookd.metrics import Metrics
from webhookd.models import Endpoint
from webhookd.sender_pool import SenderPool
from webhookd.settings import Settings, load_settings
from webhookd.store import open_store
from webhookd.systemd import Notifier

logger = logging.getLogger("webhookd.daemon")

READINESS_PING_TIMEOUT_SECONDS = 2.0
STATUS_INTERVAL_SECONDS = 2.0
STATUS_QUERY_TIMEOUT_SECONDS = 2.0
STORE_OPEN_RETRY_INITIAL_SECONDS = 1.0
STORE_OPEN_RETRY_MAX_SECONDS = 30.0

# Settings a running daemon cannot change: the open database, the bound port, the metrics
# registry's label cap. A reload logs them (reload_needs_restart) and keeps the running values.
RESTART_ONLY_KEYS: tuple[tuple[str, str], ...] = (
    ("database", "path"),
    ("database", "busy_timeout_seconds"),
    ("http", "listen"),
    ("http", "max_endpoint_labels"),
    ("delivery", "sender_processes"),
)


def keep_restart_only(old: Settings, new: Settings) -> tuple[Settings, dict[str, list[Any]]]:
    """``new`` with the restart-only keys set back to ``old``'s values, and those that differed
    as ``{"section.key": [running, in the file]}``."""
    differ: dict[str, list[Any]] = {}
    updates: dict[str, dict[str, Any]] = {}
    for section, key in RESTART_ONLY_KEYS:
        running = getattr(getattr(old, section), key)
        wanted = getattr(getattr(new, section), key)
        if running != wanted:
            differ[f"{section}.{key}"] = [_shown(running), _shown(wanted)]
            updates.setdefault(section, {})[key] = running
    sections = {name: getattr(new, name).model_copy(update=upd) for name, upd in updates.items()}
    return new.model_copy(update=sections), differ


def changed_settings(old: Settings, new: Settings) -> dict[str, list[Any]]:
    """``{"section.key": [old, new]}`` for every changed key outside ``endpoints`` (those hold
    secrets; :func:`changed_endpoints` compares them by id)."""
    out: dict[str, list[Any]] = {}
    for name in type(old).model_fields:
        if name == "endpoints":
            continue
        before, after = getattr(old, name), getattr(new, name)
        for key in type(before).model_fields:
            a, b = getattr(before, key), getattr(after, key)
            if a != b:
                out[f"{name}.{key}"] = [_shown(a), _shown(b)]
    return out


def changed_endpoints(old: list[Endpoint], new: list[Endpoint]) -> dict[str, list[str]]:
    """Ids of the config file's endpoints that were added, removed or changed (a changed
    secret counts; its value is never shown)."""
    before = {ep.id: ep for ep in old}
    after = {ep.id: ep for ep in new}
    diff = {
        "added": sorted(set(after) - set(before)),
        "removed": sorted(set(before) - set(after)),
        "changed": sorted(i for i in set(before) & set(after) if before[i] != after[i]),
    }
    return {k: v for k, v in diff.items() if v}


def _shown(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


class Daemon:
    """``config_path`` is the file a reload re-reads (None: the defaults and the environment,
    as at start). ``notifier`` defaults to the one ``$NOTIFY_SOCKET`` asks for."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        config_path: Path | str | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = Path(config_path) if config_path is not None else None
        self.notifier = notifier if notifier is not None else Notifier.from_environ(os.environ)
        self.metrics = metrics or Metrics(settings.http.max_endpoint_labels)
        self.store = open_store(settings, self.metrics)
        self.sender: HttpSender = (
            SenderPool(settings.delivery, settings.delivery.sender_processes)
            if settings.delivery.sender_processes
            else Sender(settings.delivery)
        )
        self.dispatcher = Dispatcher(settings, self.store, self.sender, self.metrics)
        self.http: HttpServer | None = None
        self.stop_event = asyncio.Event()
        self.ready = False
        self.startup_error: str | None = None  # why the store could not be opened yet
        self.started = asyncio.Event()
        self.reload_event = asyncio.Event()

    def request_stop(self, signame: str = "request") -> None:
        """Only sets an event: safe from a signal handler."""
        if not self.stop_event.is_set():
            log_event(logger, logging.INFO, "stop_requested", signal=signame)
        self.stop_event.set()

    def request_reload(self, signame: str = "request") -> None:
        """Only sets an event: safe from a signal handler. Reloads asked for while one runs
        are folded into one more reload after it."""
        log_event(logger, logging.INFO, "reload_requested", signal=signame)
        self.reload_event.set()

    async def run(self, *, install_signal_handlers: bool = False) -> None:
        """Run until :meth:`request_stop` (or SIGTERM/SIGINT when handlers are installed;
        SIGHUP then reloads the configuration)."""
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop, sig.name)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload, signal.SIGHUP.name)
        # From the very start: systemd's watchdog runs while migrations do, and until the end.
        watchdog = asyncio.create_task(self.notifier.watchdog_loop(), name="watchdog")
        side: list[asyncio.Task[None]] = []
        try:
            self.notifier.status("starting: opening the database")
            await self._start()
            side.append(asyncio.create_task(self._reload_loop(), name="reload"))
            if self.notifier.enabled:
                side.append(asyncio.create_task(self._status_loop(), name="status"))
            for task in side:
                task.add_done_callback(self.dispatcher.side_task_done)
            waiters = [
                asyncio.create_task(self.stop_event.wait()),
                asyncio.create_task(self.dispatcher.crash_event.wait()),
            ]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
        finally:
            for task in side:
                task.cancel()
            await asyncio.gather(*side, return_exceptions=True)
            try:
                await self._shutdown()
            finally:
                watchdog.cancel()
                await asyncio.gather(watchdog, return_exceptions=True)
                self.notifier.close()
                if install_signal_handlers:
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                        loop.remove_signal_handler(sig)
        if self.dispatcher.crashed is not None:
            raise WebhookdError(f"stopped after an internal failure: {self.dispatcher.crashed!r}")

    async def _start(self) -> None:
        # The HTTP port first: while the store cannot be opened, /healthz answers and /readyz
        # says why the daemon is not ready (READY=1 still waits for everything below).
        host_port = self.settings.http.host_port
        if host_port is not None:
            self.http = HttpServer(make_app(self.metrics, self.readiness), *host_port)
            try:
                await self.http.start()
            except OSError as exc:
                raise WebhookdError(
                    f"cannot listen on {self.settings.http.listen}: {exc.strerror or exc} "
                    "(set http.listen to a free address, or '' to disable the port)"
                ) from exc
        if not await self._open_store():
            return  # stopped while waiting for the store
        await self.sender.start()
        await self.dispatcher.start()
        self.ready = True
        self.started.set()
        # Only now: migrations are applied, endpoints loaded and the HTTP port is listening.
        self.notifier.ready(await self.status_line())
        if not self.dispatcher.endpoints:
            log_event(
                logger,
                logging.WARNING,
                "no_endpoints",
                hint="add [[endpoints]] to the config file or rows to webhook_endpoints; "
                "events are recorded but go nowhere until then",
            )
        log_event(
            logger,
            logging.INFO,
            "started",
            version=__version__,
            store=self.store.description,
            endpoints=len(self.dispatcher.endpoints),
            active_endpoints=len(self.dispatcher.workers),
            http=self.settings.http.listen or None,
            http_port=self.http.bound_port if self.http else None,
        )

    async def _open_store(self) -> bool:
        """Open, own and migrate the store, retrying with backoff while it fails (a full disk,
        an unwritable file): the daemon waits for the fault to clear instead of exiting into a
        restart loop. False when asked to stop meanwhile. Another daemon owning the database
        is final: waiting would not change it."""
        delay = STORE_OPEN_RETRY_INITIAL_SECONDS
        while True:
            try:
                await self.store.open()
                await self.store.backend.claim_ownership()
                await self.store.migrate()
            except StoreLockedError:
                raise
            except StorageError as exc:
                await self.store.close()
                self.startup_error = str(exc)
                log_event(
                    logger, logging.ERROR, "store_unavailable", error=str(exc), retry_in=delay
                )
                self.notifier.status(f"waiting for the store: {exc}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), delay)
                if self.stop_event.is_set():
                    return False
                delay = min(delay * 2, STORE_OPEN_RETRY_MAX_SECONDS)
                continue
            self.startup_error = None
            return True

    async def _shutdown(self) -> None:
        was_ready = self.ready
        self.ready = False
        t0 = time.monotonic()
        self.notifier.stopping(
            f"stopping: {self.inflight_count()} requests in flight, "
            f"grace period {self.settings.daemon.grace_seconds:g}s"
        )
        if self.dispatcher.running:
            log_event(
                logger, logging.INFO, "stopping", grace_seconds=self.settings.daemon.grace_seconds
            )
            cancelled = await self.dispatcher.drain(self.settings.daemon.grace_seconds)
            if cancelled:
                log_event(logger, logging.WARNING, "inflight_cancelled", count=cancelled)
        if self.http is not None:
            await self.http.close()
        await self.sender.close()
        await self.store.close()
        if was_ready:
            log_event(logger, logging.INFO, "stopped", seconds=round(time.monotonic() - t0, 3))

    # -- reload ------------------------------------------------------------------------------

    async def _reload_loop(self) -> None:
        while True:
            await self.reload_event.wait()
            self.reload_event.clear()
            await self.reload()

    async def reload(self) -> bool:
        """Re-read the configuration and apply it; False (old configuration kept) if invalid.

        systemd sees RELOADING=1 then READY=1 either way: the daemon keeps serving throughout.
        """
        self.notifier.reloading("reloading the configuration")
        try:
            return await self._reload()
        finally:
            if not self.stop_event.is_set():
                self.notifier.ready(await self.status_line())

    async def _reload(self) -> bool:
        source = str(self.config_path) if self.config_path else "defaults and environment"
        try:
            # Off the loop: reading the file and the secret files is blocking I/O.
            loaded = await asyncio.to_thread(load_settings, self.config_path)
            new, restart = keep_restart_only(self.settings, loaded)
            static = await asyncio.to_thread(endpoints_mod.from_settings, new)
        except ConfigError as exc:
            self._reload_failed(source, exc.problems)
            return False
        except (ValueError, OSError) as exc:  # e.g. a secret file removed since validation
            self._reload_failed(source, [str(exc)])
            return False
        if restart:
            log_event(
                logger,
                logging.WARNING,
                "reload_needs_restart",
                keys=restart,
                hint="these settings keep their running values until webhookd is restarted",
            )
        old = self.settings
        changed = changed_settings(old, new)
        endpoints = changed_endpoints(self.dispatcher.static_endpoints, static)
        self.settings = new
        if new.log != old.log:
            log.configure(new.log.level, new.log.format)
        self.sender.apply(new.delivery)
        await self.dispatcher.apply_settings(new, static)
        log_event(
            logger,
            logging.INFO,
            "reloaded",
            source=source,
            changed=changed,
            endpoints=endpoints,
            active_endpoints=len(self.dispatcher.workers),
        )
        return True

    def _reload_failed(self, source: str, problems: list[str]) -> None:
        log_event(
            logger,
            logging.ERROR,
            "reload_failed",
            source=source,
            problems=problems,
            hint="the running configuration stays in force; fix the file and reload again",
        )

    # -- status ------------------------------------------------------------------------------

    def inflight_count(self) -> int:
        return sum(len(tasks) for tasks in self.dispatcher.inflight.values())

    async def status_line(self) -> str:
        """One line for ``systemctl status``: endpoints, backlog, requests in flight, lag."""
        # As the housekeeping loop last counted them; before its first count, counted now.
        total = self.dispatcher.pending_total
        if total is None:
            try:
                counts = await asyncio.wait_for(
                    self.store.pending_counts(), STATUS_QUERY_TIMEOUT_SECONDS
                )
                total = sum(counts.values())
            except (StorageError, TimeoutError):
                pass
        pending = "?" if total is None else str(total)
        line = (
            f"{len(self.dispatcher.workers)} of {len(self.dispatcher.endpoints)} endpoints "
            f"active, {pending} deliveries pending, {self.inflight_count()} in flight, "
            f"outbox lag {self.dispatcher.outbox_lag_seconds:.0f}s"
        )
        if self.dispatcher.last_store_error:
            line += "; store errors"
        return line

    async def _status_loop(self) -> None:
        last = None
        while True:
            await asyncio.sleep(STATUS_INTERVAL_SECONDS)
            line = await self.status_line()
            if line != last:
                self.notifier.status(line)
                last = line

    async def readiness(self) -> list[str]:
        """Why the daemon is not ready ([] when it is). Never includes secrets."""
        reasons = []
        if self.startup_error is not None:
            reasons.append(f"cannot open the store, retrying: {self.startup_error}")
        if not self.ready:
            reasons.append("starting or stopping")
        if not self.dispatcher.running or self.dispatcher.crashed is not None:
            reasons.append("dispatcher is not running")
        try:
            await asyncio.wait_for(self.store.ping(), READINESS_PING_TIMEOUT_SECONDS)
        except (StorageError, TimeoutError) as exc:
            reasons.append(f"store unreachable: {exc or 'timed out'}")
        if self.dispatcher.last_store_error:
            reasons.append(f"store errors: {self.dispatcher.last_store_error}")
        if self.dispatcher.recorder.failing_since is not None:
            error = self.dispatcher.recorder.last_error
            reasons.append(f"cannot record delivery results in the store: {error}")
        lag = self.dispatcher.outbox_lag_seconds
        if lag > self.settings.http.ready_max_lag_seconds:
            reasons.append(
                f"outbox lag {lag:.0f} s is over http.ready_max_lag_seconds "
                f"({self.settings.http.ready_max_lag_seconds:g} s)"
            )
        return reasons
