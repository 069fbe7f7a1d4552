"""The resizable limiter behind the global in-flight cap (webhookd.limits.Limiter)."""

from __future__ import annotations

import asyncio

import pytest

from webhookd.limits import Limiter

WAIT_SECONDS = 5.0


async def _settle() -> None:
    """Let every task that can run, run."""
    for _ in range(5):
        await asyncio.sleep(0)


async def _holders(
    limiter: Limiter, count: int, release: asyncio.Event
) -> list[asyncio.Task[None]]:
    async def hold() -> None:
        async with limiter:
            await release.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(count)]
    await _settle()
    return tasks


async def test_never_more_holders_than_the_limit() -> None:
    limiter = Limiter(2)
    release = asyncio.Event()
    tasks = await _holders(limiter, 5, release)
    assert (limiter.in_use, limiter.waiting) == (2, 3)
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT_SECONDS)
    assert (limiter.in_use, limiter.waiting) == (0, 0)


async def test_raising_the_limit_admits_waiters_at_once() -> None:
    limiter = Limiter(1)
    release = asyncio.Event()
    tasks = await _holders(limiter, 4, release)
    assert limiter.in_use == 1
    limiter.resize(3)
    await _settle()
    assert (limiter.in_use, limiter.waiting) == (3, 1)
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT_SECONDS)


async def test_lowering_the_limit_interrupts_no_holder_and_admits_no_one_until_below() -> None:
    limiter = Limiter(3)
    first = asyncio.Event()
    holders = await _holders(limiter, 3, first)
    limiter.resize(1)
    later = asyncio.Event()
    waiters = await _holders(limiter, 2, later)
    assert not any(t.done() for t in holders), "holders keep their slots"
    assert (limiter.in_use, limiter.waiting) == (3, 2)

    first.set()  # the three finish; only one waiter may enter under the new limit
    await asyncio.wait_for(asyncio.gather(*holders), WAIT_SECONDS)
    await _settle()
    assert (limiter.in_use, limiter.waiting) == (1, 1)
    later.set()
    await asyncio.wait_for(asyncio.gather(*waiters), WAIT_SECONDS)
    assert limiter.in_use == 0


async def test_waiters_enter_in_arrival_order() -> None:
    limiter = Limiter(1)
    order: list[int] = []
    gate = asyncio.Event()

    async def worker(n: int) -> None:
        async with limiter:
            order.append(n)
            await gate.wait()

    tasks = []
    for n in range(4):
        tasks.append(asyncio.create_task(worker(n)))
        await _settle()
    gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT_SECONDS)
    assert order == [0, 1, 2, 3]


async def test_a_cancelled_waiter_leaves_no_slot_behind() -> None:
    limiter = Limiter(1)
    release = asyncio.Event()
    [holder] = await _holders(limiter, 1, release)
    waiter = asyncio.create_task(limiter.acquire())
    await _settle()
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert limiter.waiting == 0
    release.set()
    await asyncio.wait_for(holder, WAIT_SECONDS)
    assert limiter.in_use == 0
    await asyncio.wait_for(limiter.acquire(), WAIT_SECONDS)  # the slot is free for anyone


async def test_a_waiter_cancelled_just_after_its_slot_was_granted_hands_it_on() -> None:
    limiter = Limiter(1)
    await limiter.acquire()
    granted = asyncio.create_task(limiter.acquire())
    next_in_line = asyncio.create_task(limiter.acquire())
    await _settle()
    limiter.release()  # grants the slot to `granted`...
    granted.cancel()  # ...which is cancelled before it runs again
    await asyncio.gather(granted, return_exceptions=True)
    await asyncio.wait_for(next_in_line, WAIT_SECONDS)
    assert limiter.in_use == 1


def test_limits_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Limiter(0)
    with pytest.raises(ValueError, match="at least 1"):
        Limiter(1).resize(0)
