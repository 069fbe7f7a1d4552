"""Concurrency limits that a configuration reload can change while requests are in flight.

``asyncio.Semaphore`` fixes its size at creation. :class:`Limiter` is the same idea with a limit
that can be raised or lowered at any time: raising it admits waiters at once; lowering it takes
effect as slots are released (requests already running are never interrupted).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from types import TracebackType


class Limiter:
    """At most ``limit`` holders at once, first come first served."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._limit = limit
        self._in_use = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_use(self) -> int:
        """Slots held now; above ``limit`` for a while after the limit was lowered."""
        return self._in_use

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def resize(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._limit = limit
        self._wake()

    async def acquire(self) -> None:
        if self._in_use < self._limit and not self._waiters:
            self._in_use += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.cancelled():
                with contextlib.suppress(ValueError):
                    self._waiters.remove(future)
            else:
                # The slot was granted just as the waiter was cancelled: hand it on.
                self.release()
            raise

    def release(self) -> None:
        if self._in_use <= 0:
            raise RuntimeError("Limiter.release() called more often than acquire()")
        self._in_use -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._in_use < self._limit:
            future = self._waiters.popleft()
            if not future.done():
                self._in_use += 1  # counted at grant time, so no one can overtake the waiter
                future.set_result(None)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
