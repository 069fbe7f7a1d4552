"""Endpoint health for `webhookd endpoints list|show`: state (with the circuit breaker's, and
why), success rate and p95 latency over a recent window, the last error, pending deliveries."""

from __future__ import annotations

import time
from typing import Any

from webhookd import endpoints as endpoints_mod
from webhookd.cli.common import human_seconds, iso
from webhookd.models import Endpoint, EndpointHealth, EndpointState, EndpointStatus
from webhookd.settings import Settings
from webhookd.store.base import Store


def endpoint_state(ep: Endpoint, circuit: EndpointState | None = None) -> str:
    """``invalid`` (the daemon cannot use it), ``disabled`` (by its configuration, or by the
    daemon: 410 Gone, failing too long), ``backing_off`` (the circuit breaker) or ``enabled``."""
    if ep.problem:
        return "invalid"
    if not ep.enabled or (circuit is not None and circuit.state is EndpointStatus.DISABLED):
        return "disabled"
    if circuit is not None and circuit.state is EndpointStatus.BACKING_OFF:
        return "backing_off"
    return "enabled"


def circuit_dict(circuit: EndpointState | None) -> dict[str, Any]:
    """The circuit breaker's view of an endpoint, for ``--json``."""
    if circuit is None:
        circuit = EndpointState("")
    return {
        "state": circuit.state.value,
        "reason": circuit.reason,
        "since": iso(circuit.since) if circuit.since else None,
        "consecutive_failures": circuit.consecutive_failures,
        "failing_since": iso(circuit.failing_since),
        "paused_until": iso(circuit.paused_until),
        "disabled_reason": circuit.disabled_reason,
    }


def circuit_note(ep_id: str, circuit: EndpointState | None) -> str | None:
    """One line saying why an endpoint is backing off or was disabled by the daemon."""
    if circuit is None or circuit.state is EndpointStatus.OK:
        return None
    if circuit.state is EndpointStatus.DISABLED:
        return (
            f"{ep_id}: disabled since {iso(circuit.since)}: {circuit.disabled_reason}; its "
            f"pending deliveries are kept: `webhookd endpoints enable {ep_id}` resumes it"
        )
    until = f" until {iso(circuit.paused_until)}" if circuit.paused_until is not None else ""
    return f"{ep_id}: backing off{until} (then one probe at a time): {circuit.reason}"


def health_dict(health: EndpointHealth, window_seconds: float) -> dict[str, Any]:
    rate = health.success_rate
    return {
        "window_seconds": window_seconds,
        "attempts": health.attempts,
        "succeeded": health.succeeded,
        "success_rate": None if rate is None else round(rate, 4),
        "p95_latency_seconds": health.p95_seconds,
        "last_error": None
        if health.last_error_at is None
        else {
            "at": iso(health.last_error_at),
            "error": health.last_error,
            "status": health.last_error_status,
        },
    }


def endpoint_dict(
    ep: Endpoint | None,
    ep_id: str,
    health: EndpointHealth,
    window_seconds: float,
    circuit: EndpointState | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"id": ep_id}
    if ep is None:  # deliveries are pending for an endpoint that no longer exists
        out.update(source=None, state="unknown", url=None, events=[], tenant=None)
        out.update(enabled=False, max_concurrency=None, description="", problem=None)
    else:
        out.update(
            url=ep.url,
            source=ep.source,
            state=endpoint_state(ep, circuit),
            events=list(ep.events),
            tenant=ep.tenant,
            enabled=ep.enabled,
            max_concurrency=ep.max_concurrency,
            schemes=list(ep.schemes),
            headers=[name for name, _ in ep.headers],  # names only: values may be credentials
            description=ep.description,
            problem=ep.problem,
        )
    out["pending"] = health.pending
    out["health"] = health_dict(health, window_seconds)
    out["circuit"] = circuit_dict(circuit)
    return out


def span_text(seconds: float) -> str:
    """A window as it was probably typed: ``90s``, ``30m``, ``1h``, ``7d``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def millis(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def last_error_text(health: EndpointHealth, now: float, width: int | None = None) -> str:
    if health.last_error_at is None:
        return "-"
    ago = human_seconds(round(max(0.0, now - health.last_error_at)))
    what = health.last_error or (
        f"HTTP {health.last_error_status}" if health.last_error_status else "failed"
    )
    text = f"{ago} ago: {what}"
    if width is not None and len(text) > width:
        text = text[: width - 1] + "…"
    return text


async def endpoints_with_health(
    store: Store, settings: Settings, window_seconds: float
) -> list[tuple[str, Endpoint | None, EndpointHealth]]:
    """Every endpoint (config, table, shadowed table rows) with its health, then endpoints that
    exist only as pending deliveries (removed while deliveries were pending)."""
    table_eps = [endpoints_mod.from_table_row(r, settings) for r in await store.table_endpoints()]
    static = endpoints_mod.from_settings(settings)
    merged = endpoints_mod.merge(static, table_eps)
    shadowed = endpoints_mod.shadowed(static, table_eps)
    health = await store.endpoint_health(time.time() - window_seconds)
    items: list[tuple[str, Endpoint | None, EndpointHealth]] = [
        (ep.id, ep, health.get(ep.id, EndpointHealth(ep.id))) for ep in merged.values()
    ]
    items += [(ep.id, ep, EndpointHealth(ep.id)) for ep in shadowed]
    items += [(h.endpoint_id, None, h) for h in health.values() if h.endpoint_id not in merged]
    return [item for item in items if item[1] is not None or item[2].pending]
