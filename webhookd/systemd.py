"""The systemd notification protocol (``sd_notify``), without libsystemd.

A service of ``Type=notify`` tells systemd how it is doing by sending datagrams such as
``READY=1`` or ``STATUS=...`` to the AF_UNIX socket named in ``$NOTIFY_SOCKET``. A name that
starts with ``@`` is an abstract socket (a leading NUL byte on the wire). Without the variable
every call here does nothing, so the daemon runs the same outside systemd.

The watchdog (``WatchdogSec=`` → ``$WATCHDOG_USEC``) is fed from the event loop itself, so a loop
that is stuck (a blocking call, a busy coroutine) stops the pings and systemd restarts the
service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping

from webhookd.log import log_event

logger = logging.getLogger("webhookd.systemd")

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"
# A send must never hold the event loop for long, even if systemd stops reading its socket.
SEND_TIMEOUT_SECONDS = 0.5
# systemd's notification messages are at most a page or so; STATUS= is cut to stay well inside.
MAX_STATUS_CHARS = 400


def socket_address(name: str) -> str | bytes | None:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value: a path, an abstract name (``@``
    becomes a leading NUL), or None for kinds this module does not speak (``vsock:``)."""
    if name.startswith("/"):
        return name
    if name.startswith("@") and len(name) > 1:
        return b"\0" + name[1:].encode()
    return None


def watchdog_interval_seconds(environ: Mapping[str, str], pid: int) -> float | None:
    """How often to send ``WATCHDOG=1`` (half of ``$WATCHDOG_USEC``), or None when there is no
    watchdog for this process (unset, invalid, or ``$WATCHDOG_PID`` names another process)."""
    usec_text = environ.get(WATCHDOG_USEC_ENV, "")
    if not usec_text.isdigit() or int(usec_text) == 0:
        return None
    pid_text = environ.get(WATCHDOG_PID_ENV, "")
    if pid_text and (not pid_text.isdigit() or int(pid_text) != pid):
        return None
    return int(usec_text) / 1_000_000 / 2


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd wants it with ``RELOADING=1``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends notifications to systemd; every method is a no-op when not under ``Type=notify``.

    Sending is one non-blocking-ish datagram, safe to call from the event loop. Failures are
    logged once (then again only after a success) and otherwise ignored: systemd being away must
    never stop the daemon.
    """

    def __init__(self, address: str | bytes | None, watchdog_seconds: float | None = None) -> None:
        self.address = address
        self.watchdog_seconds = watchdog_seconds if address is not None else None
        self._sock: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], pid: int | None = None) -> Notifier:
        """The notifier systemd asked for through the environment (a no-op one otherwise)."""
        name = environ.get(NOTIFY_SOCKET_ENV, "")
        address = socket_address(name) if name else None
        if name and address is None:
            log_event(
                logger,
                logging.WARNING,
                "notify_socket_unsupported",
                notify_socket=name,
                hint="only AF_UNIX sockets (a path or @abstract name) are supported",
            )
        return cls(address, watchdog_interval_seconds(environ, os.getpid() if pid is None else pid))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True if it was sent."""
        if self.address is None:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(SEND_TIMEOUT_SECONDS)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            if not self._failing:
                log_event(
                    logger,
                    logging.WARNING,
                    "notify_failed",
                    error=exc.strerror or str(exc),
                    message=assignments[0] if assignments else None,
                )
            self._failing = True
            return False
        self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.notify(*_status(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    async def watchdog_loop(self) -> None:
        """Ping the watchdog at half its timeout, from the event loop, until cancelled."""
        if self.watchdog_seconds is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(self.watchdog_seconds)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _status(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    line = " ".join(text.split())  # one line: systemd's messages are newline separated
    if len(line) > MAX_STATUS_CHARS:
        line = line[: MAX_STATUS_CHARS - 1] + "…"
    return (f"STATUS={line}",)
