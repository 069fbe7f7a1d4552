"""HTTP attempts in child processes: the sender pool (``delivery.sender_processes`` above 0).

One Python process runs on one core at a time, and an HTTP request through aiohttp costs about
as much CPU as everything else a delivery needs (fan-out, claim, the durable record) together.
With ``sender_processes = N`` the daemon keeps the store, the scheduling, the limits and every
record, and N child processes make the requests (signing included), each with its own
:class:`~webhookd.delivery.Sender`, address guard and keep-alive pool.

Nothing about delivery changes: the daemon holds an attempt's concurrency slot until its
outcome is committed, exactly as with the requests made in its own process.

The children talk to the daemon over their stdin and stdout (a private pipe between two
webhookd processes): frames of a 4-byte length and a pickled list of messages, one frame per
event-loop turn in each direction.

- daemon → child: ``("settings", DeliverySettings, log level, log format)``, ``("endpoint",
  key, Endpoint)``, ``("forget_endpoints",)``, ``("send", request id, endpoint key, body, event
  type, delivery id)``, ``("cancel", request id)``;
- child → daemon: ``("ready",)`` once, then ``("result", request id, HttpResult)``, or
  ``("error", request id, text)`` should its Sender raise (a bug: the attempt's task fails, as
  it would in the daemon's own process).

A child never outlives the daemon: it exits when its stdin closes (the daemon stopped or died),
cancelling what it has in flight. It ignores SIGINT, SIGTERM and SIGHUP, which systemd or a
terminal send to the whole process group: the daemon drains first, then closes the pipes.
A child that dies leaves its requests' outcomes unknown: :meth:`SenderPool.send` raises
:class:`SenderLost`, the dispatcher gives the delivery back without counting an attempt (it is
sent again; the receiver may see it twice, as after a crash), and the pool starts another child.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import signal
import sys
from typing import Any

from webhookd import log
from webhookd.delivery import HttpResult, Sender
from webhookd.errors import WebhookdError
from webhookd.log import log_event
from webhookd.models import Delivery, Endpoint
from webhookd.settings import DeliverySettings

logger = logging.getLogger("webhookd.sender_pool")

_HEADER_BYTES = 4
# Endpoints a child remembers before the daemon starts their numbering again (they change
# rarely: a reload, a row of webhook_endpoints, a breaker's state does not count).
_MAX_ENDPOINT_KEYS = 4096
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 5.0
RESTART_INITIAL_SECONDS = 0.5
RESTART_MAX_SECONDS = 30.0


class SenderLost(Exception):
    """The child process making the request stopped before it answered: the outcome is unknown."""


def _frame(messages: list[tuple[Any, ...]]) -> bytes:
    data = pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(_HEADER_BYTES, "big") + data


async def _read_frame(reader: asyncio.StreamReader) -> list[tuple[Any, ...]]:
    """The next frame's messages; IncompleteReadError at the end of the stream."""
    size = int.from_bytes(await reader.readexactly(_HEADER_BYTES), "big")
    messages: list[tuple[Any, ...]] = pickle.loads(await reader.readexactly(size))
    return messages


class _Outbox:
    """Messages to one peer, written together once per event-loop turn."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._messages: list[tuple[Any, ...]] = []

    def post(self, message: tuple[Any, ...]) -> None:
        if not self._messages:
            asyncio.get_running_loop().call_soon(self._flush)
        self._messages.append(message)

    def _flush(self) -> None:
        messages, self._messages = self._messages, []
        if messages and not self.writer.is_closing():
            self.writer.write(_frame(messages))


async def _kill(proc: asyncio.subprocess.Process) -> int:
    """SIGKILL ``proc`` if it still runs; its exit status."""
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    return await proc.wait()


def _log_stream() -> int | None:
    """The daemon's stdout (where its log lines go), for the child's stderr; None: inherit."""
    try:
        return sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a stream without a descriptor
        return None


class _Child:
    """One child process, as the daemon sees it."""

    def __init__(self, number: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None
        assert proc.stdout is not None
        self.number = number
        self.proc = proc
        self.reader = proc.stdout
        self.out = _Outbox(proc.stdin)
        self.pending: dict[int, asyncio.Future[HttpResult]] = {}
        # id(Endpoint) -> (that Endpoint, its key): the reference keeps the id from being reused.
        self.endpoint_keys: dict[int, tuple[Endpoint, int]] = {}
        self.alive = True
        self.task: asyncio.Task[None] | None = None

    def fail_pending(self, why: str) -> int:
        """Fail every request still waiting for this child with :class:`SenderLost`; how many."""
        lost, self.pending = self.pending, {}
        for future in lost.values():
            if not future.done():
                future.set_exception(SenderLost(why))
        return len(lost)

    def endpoint_key(self, endpoint: Endpoint) -> int:
        found = self.endpoint_keys.get(id(endpoint))
        if found is not None and found[0] is endpoint:
            return found[1]
        if len(self.endpoint_keys) >= _MAX_ENDPOINT_KEYS:
            self.endpoint_keys.clear()
            self.out.post(("forget_endpoints",))
        key = len(self.endpoint_keys)
        self.endpoint_keys[id(endpoint)] = (endpoint, key)
        self.out.post(("endpoint", key, endpoint))
        return key


class SenderPool:
    """The :class:`~webhookd.delivery.HttpSender` whose requests N child processes make."""

    def __init__(self, settings: DeliverySettings, processes: int) -> None:
        if processes < 1:
            raise ValueError("a sender pool needs at least one process")
        self._settings = settings
        self._size = processes
        self._children: list[_Child | None] = [None] * processes
        self._request_ids = itertools.count()
        self._alive = asyncio.Event()  # set while at least one child is running
        self._closing = False
        self._restarts: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Start every child and wait until each is ready to send."""
        try:
            for number in range(self._size):
                self._children[number] = await self._spawn(number)
        except BaseException:
            await self.close()
            raise
        self._alive.set()

    async def _spawn(self, number: int) -> _Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "webhookd.sender_pool",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=_log_stream(),  # the child logs where the daemon logs
        )
        child = _Child(number, proc)
        child.out.post(("settings", self._settings, *log.current()))
        try:
            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                first = await _read_frame(child.reader)
        except (asyncio.IncompleteReadError, TimeoutError) as exc:
            await _kill(proc)
            raise WebhookdError(
                f"sender process {number} did not start (exit status {proc.returncode}); "
                "see its error above, or set delivery.sender_processes = 0"
            ) from exc
        if first != [("ready",)]:
            await _kill(proc)
            raise WebhookdError(f"sender process {number} answered {first!r} instead of ready")
        child.task = asyncio.create_task(self._read_results(child), name=f"sender:{number}")
        log_event(logger, logging.INFO, "sender_process_started", number=number, pid=proc.pid)
        return child

    def apply(self, settings: DeliverySettings) -> None:
        """Use ``settings`` (and the log level and format in force) from the next attempt on,
        in every child and in those started later."""
        self._settings = settings
        for child in self._children:
            if child is not None and child.alive:
                child.out.post(("settings", settings, *log.current()))

    async def send(self, endpoint: Endpoint, delivery: Delivery) -> HttpResult:
        """Make one attempt in the least busy child. Raises :class:`SenderLost` if that child
        dies first; cancelling it cancels the child's request."""
        child = self._least_busy()
        while child is None:
            if self._closing:
                raise SenderLost("the sender processes are stopping")
            await self._alive.wait()
            child = self._least_busy()
        request = next(self._request_ids)
        future: asyncio.Future[HttpResult] = asyncio.get_running_loop().create_future()
        child.pending[request] = future
        key = child.endpoint_key(endpoint)
        child.out.post(
            ("send", request, key, delivery.body, delivery.event_type, delivery.delivery_id)
        )
        try:
            return await future
        except asyncio.CancelledError:
            if child.pending.pop(request, None) is not None and child.alive:
                child.out.post(("cancel", request))
            raise

    def _least_busy(self) -> _Child | None:
        best: _Child | None = None
        for child in self._children:
            if (
                child is not None
                and child.alive
                and (best is None or len(child.pending) < len(best.pending))
            ):
                best = child
        return best

    async def _read_results(self, child: _Child) -> None:
        try:
            while True:
                for message in await _read_frame(child.reader):
                    future = child.pending.pop(message[1], None)
                    if future is None or future.done():
                        continue
                    if message[0] == "result":
                        future.set_result(message[2])
                    else:  # "error": the child's Sender raised; so does the attempt
                        future.set_exception(
                            RuntimeError(f"sender process {child.number}: {message[2]}")
                        )
        except (asyncio.IncompleteReadError, ConnectionError, pickle.UnpicklingError):
            pass
        await self._lost(child)

    async def _lost(self, child: _Child) -> None:
        child.alive = False
        lost = child.fail_pending(f"sender process {child.number} stopped")
        if not any(c is not None and c.alive for c in self._children):
            self._alive.clear()
        if self._closing:
            return
        status = await _kill(child.proc)  # it broke the protocol, or it is already gone
        log_event(
            logger,
            logging.ERROR,
            "sender_process_exited",
            number=child.number,
            pid=child.proc.pid,
            status=status,
            requests_lost=lost,
            hint="their deliveries are sent again; a replacement process is started",
        )
        task = asyncio.create_task(self._restart(child.number), name=f"restart:{child.number}")
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, number: int) -> None:
        delay = RESTART_INITIAL_SECONDS
        while not self._closing:
            await asyncio.sleep(delay)
            if self._closing:
                return
            try:
                child = await self._spawn(number)
            except (WebhookdError, OSError) as exc:
                delay = min(delay * 2, RESTART_MAX_SECONDS)
                log_event(
                    logger,
                    logging.ERROR,
                    "sender_process_start_failed",
                    number=number,
                    error=str(exc),
                    retry_in=delay,
                )
                continue
            if self._closing:
                await _kill(child.proc)
                return
            self._children[number] = child
            self._alive.set()
            return

    async def close(self) -> None:
        """Stop every child: its stdin closes, it cancels what it still has and exits."""
        self._closing = True
        self._alive.set()  # senders waiting for a child give up (SenderLost)
        for task in list(self._restarts):
            task.cancel()
        children = [c for c in self._children if c is not None]
        self._children = [None] * self._size
        for child in children:
            child.alive = False
            child.out.writer.close()
        for child in children:
            try:
                async with asyncio.timeout(STOP_TIMEOUT_SECONDS):
                    await child.proc.wait()
            except TimeoutError:
                await _kill(child.proc)
            if child.task is not None:
                child.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await child.task
            child.fail_pending("the sender processes stopped")


# -- the child process ---------------------------------------------------------------------------


async def _serve(reader: asyncio.StreamReader, out: _Outbox) -> None:
    first = await _read_frame(reader)
    kind, settings, level, style = first[0]
    if kind != "settings":
        raise RuntimeError(f"expected settings first, got {kind!r}")
    log.configure(level, style, stream=sys.stderr)
    sender = Sender(settings)
    await sender.start()
    endpoints: dict[int, Endpoint] = {}
    running: dict[int, asyncio.Task[None]] = {}

    async def attempt(request: int, endpoint: Endpoint, body: bytes, et: str, dlv: str) -> None:
        try:
            result = await sender.send_body(endpoint, body, et, dlv)
        except Exception as exc:  # a bug: the daemon fails the attempt's task, as in-process
            out.post(("error", request, f"{type(exc).__name__}: {exc}"))
            return
        finally:
            running.pop(request, None)
        out.post(("result", request, result))

    out.post(("ready",))
    pending_first = list(first[1:])
    while True:
        if pending_first:
            batch, pending_first = pending_first, []
        else:
            try:
                batch = await _read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break  # the daemon closed the pipe, or died
        for message in batch:
            kind = message[0]
            if kind == "send":
                _, request, key, body, event_type, delivery_id = message
                running[request] = asyncio.create_task(
                    attempt(request, endpoints[key], body, event_type, delivery_id)
                )
            elif kind == "cancel":
                task = running.pop(message[1], None)
                if task is not None:
                    task.cancel()
            elif kind == "endpoint":
                endpoints[message[1]] = message[2]
            elif kind == "forget_endpoints":
                endpoints.clear()
            elif kind == "settings":
                sender.apply(message[1])
                log.configure(message[2], message[3], stream=sys.stderr)
    for task in list(running.values()):
        task.cancel()
    if running:
        await asyncio.gather(*running.values(), return_exceptions=True)
    await sender.close()


def main() -> None:
    """The child's entry point: ``python -m webhookd.sender_pool`` (started by the daemon)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the daemon stops its children itself
    # The protocol owns the original stdout; anything printed goes to stderr instead (the
    # daemon's stdout, where the log lines go too).
    protocol_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**31)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, protocol_out
        )
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        await _serve(reader, _Outbox(writer))

    import uvloop

    uvloop.run(run())


if __name__ == "__main__":
    main()
