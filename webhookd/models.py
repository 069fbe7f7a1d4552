"""Plain data records passed between the layers (no behaviour, no I/O)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class AttemptResult(enum.StrEnum):
    """How one HTTP attempt ended; the values are the metric's ``result`` label."""

    SUCCESS = "success"
    HTTP_ERROR = "http_error"
    TIMEOUT = "timeout"
    NETWORK_ERROR = "network_error"


class ErrorKind(enum.StrEnum):
    """What exactly went wrong in a failed attempt (recorded beside its result)."""

    CONNECT_TIMEOUT = "connect_timeout"  # no connection within delivery.connect_timeout_seconds
    READ_TIMEOUT = "read_timeout"  # connected, but no complete response within the total timeout
    CONNECTION_REFUSED = "connection_refused"
    CONNECTION_RESET = "connection_reset"  # reset by the peer (RST)
    CONNECTION_CLOSED = "connection_closed"  # closed by the peer before a complete response
    DNS = "dns"
    TLS = "tls"
    PROTOCOL = "protocol"  # not a valid HTTP response
    NETWORK = "network"  # another network error (unreachable host, ...)
    BLOCKED = "blocked"  # SSRF protection refused the address (netguard); no connection made
    REDIRECT = "redirect"  # a 3xx: never followed
    GONE = "gone"  # 410: the endpoint is disabled
    RATE_LIMITED = "rate_limited"  # 429, or 503 with Retry-After
    HTTP_STATUS = "http_status"  # any other non-2xx status


class EndpointStatus(enum.StrEnum):
    """An endpoint's circuit state; the values are the ``state`` label of
    ``webhookd_endpoint_state``."""

    OK = "ok"
    BACKING_OFF = "backing_off"  # backed off as a whole: paused, then one probe at a time
    DISABLED = "disabled"  # no attempts until `webhookd endpoints enable`


@dataclass(frozen=True, slots=True)
class EndpointState:
    """The daemon's view of an endpoint's health (table webhookd_endpoint_state). No row: ok."""

    endpoint_id: str
    state: EndpointStatus = EndpointStatus.OK
    reason: str | None = None  # why it is in this state (the last failure, the pause, ...)
    since: float = 0.0  # when it entered this state (unix seconds)
    consecutive_failures: int = 0
    failing_since: float | None = None  # the first failure of the current run of failures
    paused_until: float | None = None  # backing off: no attempt before this
    cooldown_level: int = 0  # failed probes since the breaker opened: the cool-down exponent
    disabled_reason: str | None = None
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A place deliveries go. ``secret`` never leaves the signing code and is never logged."""

    id: str
    url: str
    secret: str = field(repr=False)
    events: tuple[str, ...] = ("*",)
    tenant: str | None = None
    enabled: bool = True
    max_concurrency: int = 10
    headers: tuple[tuple[str, str], ...] = ()
    description: str = ""
    source: str = "config"  # "config" (static) or "table" (webhook_endpoints)
    problem: str | None = None  # why a table endpoint could not be used, if it cannot
    schemes: tuple[str, ...] = ("seed",)  # signature schemes: "seed", "standard"
    previous_secret: str | None = field(default=None, repr=False)  # signs until it expires
    previous_secret_expires_at: float | None = None  # Unix time
    ca_bundle: str | None = None  # PEM file of the CAs trusted for TLS (None: delivery.ca_bundle)


@dataclass(frozen=True, slots=True)
class OversizedPayload:
    """Stands in for a payload over the size limit, which the store does not even read."""

    size: int


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One row of ``webhook_outbox`` exactly as the application wrote it."""

    id: int
    event_type: object
    payload: object
    event_id: object
    tenant: object
    occurred_at: object


@dataclass(frozen=True, slots=True)
class Event:
    """A validated event with its final body (built once, identical for every endpoint/attempt)."""

    outbox_id: int
    event_id: str
    event_type: str
    tenant: str | None
    occurred_at: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Quarantined:
    """An outbox row that breaks the contract, kept with the reason it was refused."""

    outbox_id: int
    reason: str
    detail: str
    event_type: str | None
    event_id: str | None


@dataclass(frozen=True, slots=True)
class NewDelivery:
    delivery_id: str
    endpoint_id: str


@dataclass(frozen=True, slots=True)
class PlannedEvent:
    event: Event
    deliveries: tuple[NewDelivery, ...]


@dataclass(frozen=True, slots=True)
class FanoutPlan:
    """What to write for a batch of outbox rows, all in one transaction."""

    events: tuple[PlannedEvent, ...]
    quarantined: tuple[Quarantined, ...]


@dataclass(frozen=True, slots=True)
class FanoutResult:
    rows: int = 0
    events: int = 0
    deliveries: int = 0
    quarantined: tuple[Quarantined, ...] = ()
    endpoints: frozenset[str] = frozenset()  # endpoints that got new deliveries


@dataclass(frozen=True, slots=True)
class Delivery:
    """A claimed delivery with everything needed to send it."""

    pk: int
    delivery_id: str
    endpoint_id: str
    event_id: str
    event_type: str
    occurred_at: str
    body: bytes
    attempts: int  # attempts already made
    created_at: float  # unix seconds when it was fanned out
    # Since `webhookd deliveries retry`: the retry schedule's budget (attempts and age) counts
    # from here. Without a retry: no attempts before it, and it started at created_at.
    attempts_before_schedule: int = 0
    schedule_started_at: float | None = None

    @property
    def schedule_start(self) -> float:
        """When the current retry schedule started (unix seconds)."""
        return self.created_at if self.schedule_started_at is None else self.schedule_started_at


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """What one HTTP attempt did, and what the delivery becomes because of it."""

    delivery_pk: int
    attempt_no: int
    started_at: float
    duration_seconds: float
    result: AttemptResult
    status_code: int | None
    error: str | None
    response_excerpt: str | None
    new_state: DeliveryState
    next_attempt_at: float | None  # set when new_state is pending
    error_kind: str | None = None  # an ErrorKind value for a failed attempt


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    attempt_no: int
    started_at: float
    duration_seconds: float
    result: str
    status_code: int | None
    error: str | None
    response_excerpt: str | None
    error_kind: str | None = None


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """A delivery as the CLI shows it."""

    delivery_id: str
    endpoint_id: str
    event_id: str
    event_type: str
    tenant: str | None
    state: str
    attempts: int
    created_at: float
    updated_at: float
    next_attempt_at: float | None
    last_status: int | None
    last_error: str | None
    attempt_log: tuple[AttemptRecord, ...] = ()
    retried_at: float | None = None  # the last `webhookd deliveries retry`, if any
    attempts_before_retry: int = 0  # attempts made before that retry


@dataclass(frozen=True, slots=True)
class QuarantineRecord:
    outbox_id: int
    reason: str
    detail: str
    event_type: str | None
    event_id: str | None
    quarantined_at: float


@dataclass(frozen=True, slots=True)
class DeliveryFilter:
    state: str | None = None
    endpoint_id: str | None = None
    event_type: str | None = None
    event_id: str | None = None
    tenant: str | None = None
    limit: int = 100  # negative: no limit
    since: float | None = None  # created at or after (unix seconds)
    until: float | None = None  # created before (unix seconds)


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A fanned-out event as ``webhookd events show EVENT_ID`` shows it."""

    event_id: str
    event_type: str
    tenant: str | None
    occurred_at: str
    outbox_id: int | None  # None for a test event (`webhookd send-test`)
    created_at: float  # when it was fanned out


@dataclass(frozen=True, slots=True)
class EndpointHealth:
    """An endpoint's recent record, from its attempts (within a window) and deliveries."""

    endpoint_id: str
    attempts: int = 0  # in the window
    succeeded: int = 0  # successful attempts in the window
    p95_seconds: float | None = None  # nearest-rank 95th percentile of attempt durations
    last_error: str | None = None  # the latest failed attempt (any time)
    last_error_status: int | None = None
    last_error_at: float | None = None
    pending: int = 0

    @property
    def success_rate(self) -> float | None:
        return self.succeeded / self.attempts if self.attempts else None


@dataclass(frozen=True, slots=True)
class EndpointRemoval:
    """What ``remove_endpoint`` did: nothing when the row is missing or, without ``force``,
    while the endpoint has pending deliveries (their number is ``pending``)."""

    found: bool
    removed: bool
    pending: int


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Backlog and activity, for ``webhookd stats``. Counts over the window are since ``since``."""

    since: float
    outbox_unprocessed: int
    oldest_unprocessed: str | None  # occurred_at of the next outbox row to fan out
    pending: int
    due: int  # pending with next_attempt_at <= now
    attempts: int
    attempts_succeeded: int
    attempts_failed: int
    deliveries_succeeded: int  # became succeeded in the window
    deliveries_failed: int  # became failed (dead letters) in the window
    quarantined: int
    failures_by_endpoint: tuple[tuple[str, int], ...]  # failed attempts, most first
