"""The retry schedule: exponential, capped, jittered, bounded by attempts and by age."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from webhookd.retry import RetryPolicy, backoff_delay, next_attempt_at, schedule
from webhookd.settings import RetrySettings

POLICY = RetryPolicy(
    initial_delay_seconds=5.0,
    multiplier=3.0,
    max_delay_seconds=100.0,
    jitter=0.2,
    max_attempts=6,
    max_age_seconds=1000.0,
)
NO_JITTER = RetryPolicy(
    initial_delay_seconds=5.0,
    multiplier=3.0,
    max_delay_seconds=100.0,
    jitter=0.0,
    max_attempts=6,
    max_age_seconds=1000.0,
)


@pytest.mark.parametrize(
    ("attempt_no", "nominal"),
    [(1, 5.0), (2, 15.0), (3, 45.0), (4, 100.0), (5, 100.0), (50, 100.0)],
)
def test_delay_is_initial_times_multiplier_to_the_n_minus_1_capped(
    attempt_no: int, nominal: float
) -> None:
    assert backoff_delay(POLICY, attempt_no, 0.5) == pytest.approx(nominal)
    assert backoff_delay(NO_JITTER, attempt_no, 0.0) == pytest.approx(nominal)
    assert backoff_delay(NO_JITTER, attempt_no, 0.999) == pytest.approx(nominal)


@pytest.mark.parametrize(("attempt_no", "nominal"), [(1, 5.0), (3, 45.0), (9, 100.0)])
def test_jitter_extremes(attempt_no: int, nominal: float) -> None:
    assert backoff_delay(POLICY, attempt_no, 0.0) == pytest.approx(nominal * 0.8)
    assert backoff_delay(POLICY, attempt_no, 1.0) == pytest.approx(nominal * 1.2)


def test_a_huge_attempt_number_does_not_overflow() -> None:
    assert backoff_delay(POLICY, 10**9, 0.5) == pytest.approx(100.0)


@given(
    attempt_no=st.integers(min_value=1, max_value=200),
    rand=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_every_delay_stays_within_the_jitter_band(attempt_no: int, rand: float) -> None:
    nominal = min(5.0 * 3.0 ** (attempt_no - 1), 100.0)
    delay = backoff_delay(POLICY, attempt_no, rand)
    assert nominal * 0.8 - 1e-9 <= delay <= nominal * 1.2 + 1e-9


def test_next_attempt_follows_the_schedule() -> None:
    created = 10_000.0
    now = created + 7
    assert next_attempt_at(
        NO_JITTER, attempts_made=1, created_at=created, now=now, rand=0.5
    ) == pytest.approx(now + 5)
    assert next_attempt_at(
        NO_JITTER, attempts_made=3, created_at=created, now=now, rand=0.5
    ) == pytest.approx(now + 45)


def test_no_retry_after_max_attempts() -> None:
    kwargs = {"created_at": 0.0, "now": 1.0, "rand": 0.5}
    assert next_attempt_at(POLICY, attempts_made=5, **kwargs) is not None
    assert next_attempt_at(POLICY, attempts_made=6, **kwargs) is None
    assert next_attempt_at(POLICY, attempts_made=7, **kwargs) is None


def test_no_retry_after_max_age() -> None:
    kwargs = {"attempts_made": 1, "created_at": 0.0, "rand": 0.5}
    assert next_attempt_at(POLICY, now=999.0, **kwargs) is not None
    assert next_attempt_at(POLICY, now=1000.0, **kwargs) is None
    assert next_attempt_at(POLICY, now=5000.0, **kwargs) is None


def test_the_last_retry_is_moved_to_the_deadline() -> None:
    """A retry that would come after the maximum age is kept, at the deadline itself."""
    at = next_attempt_at(POLICY, attempts_made=4, created_at=0.0, now=950.0, rand=0.5)
    assert at == pytest.approx(1000.0)
    early = next_attempt_at(POLICY, attempts_made=1, created_at=0.0, now=990.0, rand=0.5)
    assert early == pytest.approx(995.0)


def test_schedule_lists_the_nominal_delays_between_attempts() -> None:
    assert schedule(POLICY) == pytest.approx([5.0, 15.0, 45.0, 100.0, 100.0])


def test_policy_from_settings() -> None:
    s = RetrySettings(
        initial_delay_seconds=1,
        multiplier=2,
        max_delay_seconds=30,
        jitter=0.5,
        max_attempts=4,
        max_age_seconds=60,
    )
    assert RetryPolicy.from_settings(s) == RetryPolicy(1.0, 2.0, 30.0, 0.5, 4, 60.0)
