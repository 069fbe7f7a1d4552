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


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    attempt_no: int
    started_at: float
    duration_seconds: float
    result: str
    status_code: int | None
    error: str | None
    response_excerpt: str | None


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
    limit: int = 100
