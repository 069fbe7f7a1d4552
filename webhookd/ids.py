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
    millis = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    value = (millis << 80) | int.from_bytes(os.urandom(10), "big")
    return prefix + "_" + "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS])
