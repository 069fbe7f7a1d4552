"""The daemon's lifecycle: start in order, run until told to stop, stop in order.

Shutdown is one readable sequence: stop claiming → let in-flight requests finish within the
grace period → cancel the rest (left pending, no attempt counted) → persist → close.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from webhookd import __version__
from webhookd.delivery import Sender
from webhookd.dispatcher import Dispatcher
from webhookd.errors import StorageError, WebhookdError
from webhookd.http_api import HttpServer, make_app
from webhookd.log import log_event
from webhookd.metrics import Metrics
from webhookd.settings import Settings
from webhookd.store import open_store

logger = logging.getLogger("webhookd.daemon")

READINESS_PING_TIMEOUT_SECONDS = 2.0


class Daemon:
    def __init__(self, settings: Settings, *, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(settings.http.max_endpoint_labels)
        self.store = open_store(settings, self.metrics)
        self.sender = Sender(settings.delivery)
        self.dispatcher = Dispatcher(settings, self.store, self.sender, self.metrics)
        self.http: HttpServer | None = None
        self.stop_event = asyncio.Event()
        self.ready = False
        self.started = asyncio.Event()

    def request_stop(self, signame: str = "request") -> None:
        """Only sets an event: safe from a signal handler."""
        if not self.stop_event.is_set():
            log_event(logger, logging.INFO, "stop_requested", signal=signame)
        self.stop_event.set()

    def _sighup(self) -> None:
        log_event(
            logger,
            logging.WARNING,
            "reload_unsupported",
            hint="this version does not reload its configuration; restart to apply changes",
        )

    async def run(self, *, install_signal_handlers: bool = False) -> None:
        """Run until :meth:`request_stop` (or SIGTERM/SIGINT when handlers are installed)."""
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop, sig.name)
            # Until configuration reload exists, SIGHUP must not kill the daemon (its default).
            loop.add_signal_handler(signal.SIGHUP, self._sighup)
        try:
            await self._start()
            waiters = [
                asyncio.create_task(self.stop_event.wait()),
                asyncio.create_task(self.dispatcher.crash_event.wait()),
            ]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
        finally:
            await self._shutdown()
            if install_signal_handlers:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
        if self.dispatcher.crashed is not None:
            raise WebhookdError(f"stopped after an internal failure: {self.dispatcher.crashed!r}")

    async def _start(self) -> None:
        await self.store.open()
        await self.store.backend.claim_ownership()
        await self.store.migrate()
        await self.sender.start()
        await self.dispatcher.start()
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
        self.ready = True
        self.started.set()
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

    async def _shutdown(self) -> None:
        was_ready = self.ready
        self.ready = False
        t0 = time.monotonic()
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

    async def readiness(self) -> list[str]:
        """Why the daemon is not ready ([] when it is). Never includes secrets."""
        reasons = []
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
            reasons.append("cannot record delivery results in the store")
        lag = self.dispatcher.outbox_lag_seconds
        if lag > self.settings.http.ready_max_lag_seconds:
            reasons.append(
                f"outbox lag {lag:.0f} s is over http.ready_max_lag_seconds "
                f"({self.settings.http.ready_max_lag_seconds:g} s)"
            )
        return reasons
