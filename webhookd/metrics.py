"""Prometheus metrics. Names and labels are part of the contract (DESIGN.md, "Metrics").

Each daemon owns one :class:`Metrics` with its own registry, so tests can run several.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from webhookd import __version__
from webhookd.models import AttemptResult, DeliveryState

DEFAULT_MAX_ENDPOINT_LABELS = 200
OTHER_ENDPOINTS_LABEL = "_other"
ENDPOINT_STATES = ("ok", "backing_off", "disabled")
# What retention deletes: the ``kind`` label of webhookd_pruned_rows_total.
PRUNE_KINDS = (
    "deliveries_succeeded",
    "deliveries_failed",
    "attempts",
    "events",
    "outbox",
    "quarantine",
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 60)
_EVENT_TO_DELIVERY_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class EndpointSeries:
    """One endpoint label's series that every attempt touches, looked up once: a ``labels()``
    call sorts and hashes the label values under a lock, several times per delivery."""

    inflight: Gauge
    duration: Histogram
    attempts: dict[str, Counter]  # by AttemptResult value
    deliveries: dict[str, Counter]  # by final DeliveryState value


_ATTEMPT_RESULTS = tuple(r.value for r in AttemptResult)
_FINAL_STATES = tuple(s.value for s in DeliveryState if s is not DeliveryState.PENDING)


class Metrics:
    def __init__(self, max_endpoint_labels: int = DEFAULT_MAX_ENDPOINT_LABELS) -> None:
        # The *_created series double the output and tell monitoring nothing it needs.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self._max_endpoint_labels = max_endpoint_labels
        self._endpoint_labels: set[str] = set()
        self._series: dict[str, EndpointSeries] = {}  # by label
        r = self.registry
        self.events_dispatched = Counter(
            "webhookd_events_dispatched",
            "Outbox events fanned out to their endpoints.",
            registry=r,
        )
        self.events_rejected = Counter(
            "webhookd_events_rejected",
            "Outbox rows quarantined because they break the outbox contract.",
            ["reason"],
            registry=r,
        )
        self.events_schema_mismatch = Counter(
            "webhookd_events_schema_mismatch",
            "Events delivered although their data does not match the event catalogue "
            "(events.schema_mismatch = 'warn'); only catalogued types are labels.",
            ["event_type"],
            registry=r,
        )
        self.delivery_attempts = Counter(
            "webhookd_delivery_attempts",
            "HTTP delivery attempts by result.",
            ["endpoint", "result"],
            registry=r,
        )
        self.deliveries = Counter(
            "webhookd_deliveries",
            "Deliveries that reached a final state.",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.delivery_duration = Histogram(
            "webhookd_delivery_duration_seconds",
            "Duration of one HTTP delivery attempt.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.event_to_delivery = Histogram(
            "webhookd_event_to_delivery_seconds",
            "Time from an event's occurred_at to its successful delivery.",
            buckets=_EVENT_TO_DELIVERY_BUCKETS,
            registry=r,
        )
        self.deliveries_pending = Gauge(
            "webhookd_deliveries_pending",
            "Deliveries waiting for a (next) attempt.",
            ["endpoint"],
            registry=r,
        )
        self.inflight = Gauge(
            "webhookd_inflight_requests",
            "HTTP requests in flight.",
            ["endpoint"],
            registry=r,
        )
        self.outbox_lag = Gauge(
            "webhookd_outbox_lag_seconds",
            "Age of the oldest outbox event not yet fanned out (0 when caught up).",
            registry=r,
        )
        self.endpoint_state = Gauge(
            "webhookd_endpoint_state",
            "1 for the endpoint's current state, 0 for the others.",
            ["endpoint", "state"],
            registry=r,
        )
        self.build_info = Gauge(
            "webhookd_build_info", "Always 1; the version is a label.", ["version"], registry=r
        )
        self.build_info.labels(version=__version__).set(1)
        self.ready = Gauge(
            "webhookd_ready",
            "1 when /readyz answers 200, else 0; refreshed on every scrape of /metrics.",
            registry=r,
        )
        self.store_errors = Counter(
            "webhookd_store_errors",
            "Store operations that failed and will be retried.",
            ["operation"],
            registry=r,
        )
        self.pruned_rows = Counter(
            "webhookd_pruned_rows",
            "Rows deleted by retention ([retention]), by kind.",
            ["kind"],
            registry=r,
        )
        for kind in PRUNE_KINDS:
            self.pruned_rows.labels(kind=kind)  # every series exists from the start, at 0

    def endpoint_label(self, endpoint_id: str) -> str:
        """The endpoint's label value; past the cap, endpoints share one label."""
        if endpoint_id in self._endpoint_labels:
            return endpoint_id
        if len(self._endpoint_labels) < self._max_endpoint_labels:
            self._endpoint_labels.add(endpoint_id)
            return endpoint_id
        return OTHER_ENDPOINTS_LABEL

    def set_endpoint_state(self, endpoint_id: str, state: str) -> None:
        label = self.endpoint_label(endpoint_id)
        for name in ENDPOINT_STATES:
            self.endpoint_state.labels(endpoint=label, state=name).set(1 if name == state else 0)
        # Every series of a known endpoint exists from the start at 0, so that increase() sees
        # its first failure (a counter born at 1 looks like no change to Prometheus).
        self.series(endpoint_id)

    def series(self, endpoint_id: str) -> EndpointSeries:
        """The endpoint's per-attempt series (created at 0 the first time)."""
        label = self.endpoint_label(endpoint_id)
        found = self._series.get(label)
        if found is None:
            found = self._series[label] = EndpointSeries(
                inflight=self.inflight.labels(endpoint=label),
                duration=self.delivery_duration.labels(endpoint=label),
                attempts={
                    r: self.delivery_attempts.labels(endpoint=label, result=r)
                    for r in _ATTEMPT_RESULTS
                },
                deliveries={
                    o: self.deliveries.labels(endpoint=label, outcome=o) for o in _FINAL_STATES
                },
            )
        return found

    def forget_endpoint(self, endpoint_id: str) -> None:
        """A removed endpoint's state and gauges go (its counters stay: they are history)."""
        if endpoint_id not in self._endpoint_labels:
            return  # folded into "_other", which other endpoints still share
        self._series.pop(endpoint_id, None)  # its in-flight gauge goes: made again if it returns
        for name in ENDPOINT_STATES:
            with contextlib.suppress(KeyError):
                self.endpoint_state.remove(endpoint_id, name)
        for gauge in (self.deliveries_pending, self.inflight):
            with contextlib.suppress(KeyError):
                gauge.remove(endpoint_id)

    def set_pending(self, counts: dict[str, int], known_endpoints: list[str]) -> None:
        folded: dict[str, int] = {}
        for endpoint_id in [*known_endpoints, *counts]:
            label = self.endpoint_label(endpoint_id)
            folded.setdefault(label, 0)
        for endpoint_id, count in counts.items():
            folded[self.endpoint_label(endpoint_id)] += count
        for label, count in folded.items():
            self.deliveries_pending.labels(endpoint=label).set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
