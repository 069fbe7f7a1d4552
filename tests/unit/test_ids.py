"""Identifiers: ULID layout in lower-case Crockford base32, time first."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from webhookd.ids import new_id, new_ids

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_ID = re.compile(r"^dlv_[0-9a-hjkmnp-tv-z]{26}$")


def _decode(digits: str) -> int:
    value = 0
    for ch in digits:
        value = value * 32 + _ALPHABET.index(ch)
    return value


@given(st.integers(min_value=0, max_value=(1 << 48) - 1))
def test_the_first_ten_digits_are_the_milliseconds(millis: int) -> None:
    made = new_id("dlv", millis / 1000)
    assert _ID.match(made), made
    value = _decode(made[4:])
    assert value < 1 << 128
    # The float division may land a millisecond low; never anything else.
    assert (value >> 80) in (millis, millis - 1)


def test_ids_are_unique_and_ordered_by_time() -> None:
    made = [new_id("dlv", 1_700_000_000 + i / 1000) for i in range(2000)]
    assert len(set(made)) == len(made)
    assert made == sorted(made)  # base32 digits sort like the numbers they write
    assert len({m[4:14] for m in made}) == len(made)  # each its own millisecond


def test_the_random_part_varies() -> None:
    made = {new_id("evt", 1_700_000_000.0)[14:] for _ in range(200)}
    assert len(made) == 200


def test_ids_made_together_are_distinct_and_share_the_time() -> None:
    made = new_ids("dlv", 500, 1_700_000_000.123)
    assert len(made) == len(set(made)) == 500
    assert all(_ID.match(m) for m in made)
    assert {_decode(m[4:]) >> 80 for m in made} == {1_700_000_000_123}
    assert new_ids("dlv", 0) == []
