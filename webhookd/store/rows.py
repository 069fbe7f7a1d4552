"""What the SQL stores share: the parameters they bind and the records they build from rows.

The SQLite and PostgreSQL queries of the same name take the same named parameters and return
the same columns in the same order, so one function here serves both dialects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from webhookd.models import (
    Delivery,
    DeliveryFilter,
    DeliveryRecord,
    EndpointHealth,
    EndpointState,
    EndpointStatus,
    Event,
    StoreStats,
)


def claimed_delivery(r: Any) -> Delivery:
    """A row of ``claim_due``."""
    return Delivery(
        pk=int(r[0]),
        delivery_id=r[1],
        endpoint_id=r[2],
        event_id=r[3],
        event_type=r[4],
        occurred_at=r[5],
        body=bytes(r[6]),
        attempts=int(r[7]),
        created_at=float(r[8]),
        attempts_before_schedule=int(r[9]),
        schedule_started_at=r[10],
    )


def endpoint_state(r: Any) -> EndpointState:
    """A row of ``endpoint_states`` / ``endpoint_state``."""
    return EndpointState(
        endpoint_id=str(r[0]),
        state=EndpointStatus(r[1]),
        reason=r[2],
        since=float(r[3]),
        consecutive_failures=int(r[4]),
        failing_since=r[5],
        paused_until=r[6],
        cooldown_level=int(r[7]),
        disabled_reason=r[8],
        updated_at=float(r[9]),
    )


def endpoint_state_params(state: EndpointState) -> dict[str, object]:
    """The parameters of ``save_endpoint_state``."""
    return {
        "endpoint_id": state.endpoint_id,
        "state": state.state.value,
        "reason": state.reason,
        "since": state.since,
        "consecutive_failures": state.consecutive_failures,
        "failing_since": state.failing_since,
        "paused_until": state.paused_until,
        "cooldown_level": state.cooldown_level,
        "disabled_reason": state.disabled_reason,
        "updated_at": state.updated_at,
    }


def send_test_event_params(event: Event, now: float) -> dict[str, object]:
    """The parameters of ``insert_test_event``."""
    return {
        "event_id": event.event_id,
        "event_type": event.event_type,
        "tenant": event.tenant,
        "occurred_at": event.occurred_at,
        "body": event.body,
        "now": now,
    }


def delivery_filter_params(f: DeliveryFilter, delivery_id: str | None) -> dict[str, object]:
    """The parameters of ``list_deliveries``."""
    return {
        "state": f.state,
        "endpoint": f.endpoint_id,
        "event_type": f.event_type,
        "event_id": f.event_id,
        "tenant": f.tenant,
        "delivery_id": delivery_id,
        "limit": f.limit,
        "since": f.since,
        "until": f.until,
    }


def delivery_record(r: Any) -> DeliveryRecord:
    """A row of ``list_deliveries``."""
    return DeliveryRecord(
        delivery_id=r[0],
        endpoint_id=r[1],
        event_id=r[2],
        event_type=r[3],
        tenant=r[4],
        state=r[5],
        attempts=r[6],
        created_at=r[7],
        updated_at=r[8],
        next_attempt_at=r[9] if r[5] == "pending" else None,
        last_status=r[10],
        last_error=r[11],
        retried_at=r[13],
        attempts_before_retry=r[14],
    )


def endpoint_health(
    window: Iterable[Any], errors: Iterable[Any], pending: Mapping[str, int]
) -> dict[str, EndpointHealth]:
    """From the rows of ``endpoint_health_window`` and ``endpoint_last_errors`` and the
    pending counts: each endpoint's health, by id."""
    out: dict[str, EndpointHealth] = {}
    for ep_id, count, succeeded, p95 in window:
        out[ep_id] = EndpointHealth(ep_id, int(count), int(succeeded), float(p95))
    for ep_id, error, status, at in errors:
        base = out.get(ep_id, EndpointHealth(ep_id))
        out[ep_id] = replace(
            base, last_error=error, last_error_status=status, last_error_at=float(at)
        )
    for ep_id, n in pending.items():
        out[ep_id] = replace(out.get(ep_id, EndpointHealth(ep_id)), pending=n)
    return dict(sorted(out.items()))


def store_stats(
    since: float,
    backlog: Any,
    attempts: Any,
    failures: Iterable[Any],
    oldest_unprocessed: str | None,
) -> StoreStats:
    """From the rows of ``stats_backlog``, ``stats_attempts`` and
    ``stats_failures_by_endpoint``."""
    tried, succeeded = int(attempts[0]), int(attempts[1])
    return StoreStats(
        since=since,
        outbox_unprocessed=int(backlog[0]),
        oldest_unprocessed=oldest_unprocessed,
        pending=int(backlog[1]),
        due=int(backlog[2]),
        attempts=tried,
        attempts_succeeded=succeeded,
        attempts_failed=tried - succeeded,
        deliveries_succeeded=int(backlog[3]),
        deliveries_failed=int(backlog[4]),
        quarantined=int(backlog[5]),
        failures_by_endpoint=tuple((str(e), int(n)) for e, n in failures),
    )
