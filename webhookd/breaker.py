"""The circuit breaker: what an endpoint's state becomes after one of its attempts. Pure.

An endpoint is ``ok`` (full speed), ``backing_off`` (paused until ``paused_until``, then one
probe at a time) or ``disabled`` (nothing is sent until an operator enables it again). It backs
off after ``failure_threshold`` consecutive failures, for a cool-down that grows with each failed
probe up to a cap, and also when a 429/503 asks to wait with ``Retry-After``. Any success closes
the breaker. A ``410 Gone``, or failing continuously for ``disable_after_seconds``, disables it.
Deliveries are never dropped here: they wait.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from webhookd.log import iso_time
from webhookd.models import EndpointState, EndpointStatus
from webhookd.settings import Settings


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    failure_threshold: int
    cooldown_seconds: float
    cooldown_multiplier: float
    max_cooldown_seconds: float
    disable_after_seconds: float  # 0: never

    @classmethod
    def from_settings(cls, settings: Settings) -> BreakerPolicy:
        b = settings.breaker
        return cls(
            failure_threshold=b.failure_threshold,
            cooldown_seconds=b.cooldown_seconds,
            cooldown_multiplier=b.cooldown_multiplier,
            max_cooldown_seconds=b.max_cooldown_seconds,
            disable_after_seconds=b.disable_after_seconds,
        )


@dataclass(frozen=True, slots=True)
class Failure:
    """What the breaker needs to know about one failed attempt."""

    reason: str  # e.g. "HTTP 500" or "cannot connect to ...: Connection refused"
    probe: bool  # the one attempt made while backing off
    gone: bool = False  # 410 Gone
    retry_after_until: float | None = None  # a bounded Retry-After, as a unix time


def cooldown(policy: BreakerPolicy, level: int) -> float:
    """The wait before the next probe after ``level`` failed probes (0: the breaker just
    opened): exponential, capped."""
    wait = policy.cooldown_seconds
    for _ in range(max(level, 0)):
        wait *= policy.cooldown_multiplier
        if wait >= policy.max_cooldown_seconds:
            break
    return min(wait, policy.max_cooldown_seconds)


def _moved(
    state: EndpointState, status: EndpointStatus, now: float, **changes: object
) -> EndpointState:
    since = state.since if status is state.state else now
    return replace(state, state=status, since=since, updated_at=now, **changes)  # type: ignore[arg-type]


def after_success(state: EndpointState, now: float) -> EndpointState:
    """Any success closes the breaker (full speed). A disabled endpoint stays disabled: the
    answer came from a request that was in flight when it was disabled."""
    if state.state is EndpointStatus.DISABLED:
        return state
    if state.state is EndpointStatus.OK and state.consecutive_failures == 0:
        return state  # the common case changes (and writes) nothing
    return _moved(
        state,
        EndpointStatus.OK,
        now,
        reason=None,
        consecutive_failures=0,
        failing_since=None,
        paused_until=None,
        cooldown_level=0,
    )


def after_failure(
    state: EndpointState, failure: Failure, policy: BreakerPolicy, now: float
) -> EndpointState:
    """The state after a failed attempt."""
    if state.state is EndpointStatus.DISABLED:
        return state
    failures = state.consecutive_failures + 1
    failing_since = state.failing_since if state.failing_since is not None else now
    counted = replace(
        state, consecutive_failures=failures, failing_since=failing_since, updated_at=now
    )
    if failure.gone:
        return disabled(
            counted, f"the receiver answered 410 Gone at {iso_time(now)}: it wants no more", now
        )
    if policy.disable_after_seconds > 0 and now - failing_since >= policy.disable_after_seconds:
        return disabled(
            counted,
            f"failing continuously since {iso_time(failing_since)} ({failures} consecutive "
            f"failures, the last: {failure.reason})",
            now,
        )
    until: float | None = None
    level = state.cooldown_level
    reason = failure.reason
    backing_off = state.state is EndpointStatus.BACKING_OFF
    if failures >= policy.failure_threshold:
        # The breaker opens, or a probe failed: wait (longer) before the next probe. A request
        # that was already in flight when it opened changes nothing.
        if not backing_off:
            level = 0
            until = now + cooldown(policy, level)
        elif failure.probe:
            level += 1
            until = now + cooldown(policy, level)
        reason = f"{failures} consecutive failures, the last: {failure.reason}"
    if failure.retry_after_until is not None and failure.retry_after_until > now:
        until = max(until or 0.0, failure.retry_after_until)
        asked = iso_time(failure.retry_after_until)
        reason = f"the receiver asked to wait until {asked} ({failure.reason})"
    if until is not None:
        return _moved(
            counted,
            EndpointStatus.BACKING_OFF,
            now,
            reason=reason,
            paused_until=max(until, state.paused_until or 0.0),
            cooldown_level=level,
        )
    if failure.probe and backing_off and failures < policy.failure_threshold:
        # The pause a Retry-After asked for is over and the breaker is not open: full speed.
        return _moved(counted, EndpointStatus.OK, now, reason=None, paused_until=None)
    return counted


def disabled(state: EndpointState, reason: str, now: float) -> EndpointState:
    return _moved(
        state,
        EndpointStatus.DISABLED,
        now,
        reason=reason,
        disabled_reason=reason,
        paused_until=None,
    )


def reenabled(endpoint_id: str, now: float) -> EndpointState:
    """A fresh start: ``webhookd endpoints enable``, or a table row enabled again."""
    return EndpointState(endpoint_id, EndpointStatus.OK, since=now, updated_at=now)


def probe_allowed(state: EndpointState, now: float) -> bool:
    """Whether a backing-off endpoint may make its probe now (its pause is over)."""
    return state.paused_until is None or now >= state.paused_until
