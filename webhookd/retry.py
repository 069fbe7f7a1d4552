"""The retry schedule: exponential backoff with jitter, bounded by attempts and age. Pure."""

from __future__ import annotations

import email.utils
import math
from dataclasses import dataclass
from datetime import UTC

from webhookd.settings import RetrySettings

# Statuses whose Retry-After header is honoured (RFC 9110 §10.2.3: 503 and 3xx; RFC 6585: 429).
RETRY_AFTER_STATUSES = frozenset({429, 503})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    initial_delay_seconds: float
    multiplier: float
    max_delay_seconds: float
    jitter: float
    max_attempts: int
    max_age_seconds: float

    @classmethod
    def from_settings(cls, s: RetrySettings) -> RetryPolicy:
        return cls(
            initial_delay_seconds=s.initial_delay_seconds,
            multiplier=s.multiplier,
            max_delay_seconds=s.max_delay_seconds,
            jitter=s.jitter,
            max_attempts=s.max_attempts,
            max_age_seconds=s.max_age_seconds,
        )


def backoff_delay(policy: RetryPolicy, attempt_no: int, rand: float) -> float:
    """Seconds to wait after failed attempt ``attempt_no`` (1-based) before the next one.

    ``rand`` is a uniform number in [0, 1): 0.5 gives the nominal delay, 0 and 1 its
    ``-jitter`` and ``+jitter`` extremes.
    """
    exponent = max(attempt_no - 1, 0)
    nominal = policy.initial_delay_seconds
    # Grow step by step so that a huge attempt number cannot overflow a float.
    for _ in range(exponent):
        nominal *= policy.multiplier
        if nominal >= policy.max_delay_seconds:
            break
    nominal = min(nominal, policy.max_delay_seconds)
    return max(0.0, nominal * (1.0 + policy.jitter * (2.0 * rand - 1.0)))


def next_attempt_at(
    policy: RetryPolicy, *, attempts_made: int, created_at: float, now: float, rand: float
) -> float | None:
    """When to try again after a failed attempt, or None when the delivery has failed for good.

    A delivery gets at most ``max_attempts`` attempts, none after ``max_age_seconds`` from its
    creation; a retry that would fall after the deadline is moved to the deadline itself so that
    the last chance is not lost to rounding. After ``webhookd deliveries retry`` the schedule
    starts afresh: pass the attempts made since the retry and the retry's time as ``created_at``
    (:attr:`webhookd.models.Delivery.schedule_start`).
    """
    if attempts_made >= policy.max_attempts:
        return None
    deadline = created_at + policy.max_age_seconds
    if now >= deadline:
        return None
    return min(now + backoff_delay(policy, attempts_made, rand), deadline)


def schedule(policy: RetryPolicy) -> list[float]:
    """The nominal delays between attempts (no jitter), for documentation and ``check-config``."""
    return [backoff_delay(policy, n, 0.5) for n in range(1, policy.max_attempts)]


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from ``now`` that a ``Retry-After`` value asks to wait: delta-seconds or an
    HTTP-date (a date in the past gives 0). None when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(int(text))
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:  # the asctime form carries no zone: every HTTP-date is GMT
        moment = moment.replace(tzinfo=UTC)
    seconds = moment.timestamp() - now
    return max(0.0, seconds) if math.isfinite(seconds) else None


def retry_after_until(
    status: int | None, value: str | None, now: float, max_seconds: float
) -> float | None:
    """When the endpoint may be tried again after a 429/503 carrying ``Retry-After``: ``now``
    plus what it asks, at most ``max_seconds``. None when there is nothing to honour."""
    if status not in RETRY_AFTER_STATUSES or max_seconds <= 0:
        return None
    seconds = parse_retry_after(value, now)
    if seconds is None or seconds <= 0:
        return None
    return now + min(seconds, max_seconds)
