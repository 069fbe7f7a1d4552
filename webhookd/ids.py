"""Identifiers: time-ordered, random, URL-safe (ULID layout in Crockford base32)."""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
# Two digits (10 bits) at a time: 13 lookups for the 26 digits (fan-out makes an id per event
# and one per delivery).
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]
_SHIFTS = tuple(range(120, -1, -10))


def new_id(prefix: str, now: float | None = None) -> str:
    """``prefix_`` + 26 characters: 48 bits of milliseconds then 80 random bits."""
    return new_ids(prefix, 1, now)[0]


def new_ids(prefix: str, count: int, now: float | None = None) -> list[str]:
    """``count`` ids as :func:`new_id` makes them, from one read of the random source (fan-out
    makes one per delivery; each read is a system call that lets go of the GIL)."""
    millis = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    high = millis << 80
    randomness = os.urandom(10 * count)
    head = prefix + "_"
    made = []
    for i in range(0, 10 * count, 10):
        value = high | int.from_bytes(randomness[i : i + 10], "big")
        made.append(head + "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS]))
    return made
