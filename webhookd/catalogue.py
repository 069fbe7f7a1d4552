"""The event catalogue: the events of the product's webhook documentation, each with a pydantic
model of its ``data`` and the documentation's example payload.

The models describe what receivers are promised, so fan-out can check each outbox row against
its entry (the ``[events]`` settings say what a mismatch does). They follow the seed's examples:
field names exactly as there (camelCase), strict JSON types (the text ``"9000"`` is not an
integer), and extra fields allowed, since receivers must tolerate additions. The seed's examples
pass their own models, so they double as fixtures.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

# The seed documentation's seven events: (type, description, example timestamp, example data).
# The examples are verbatim, including the no-break space in "[email\u00a0protected]".
SEED_EVENTS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    (
        "booking.created",
        "Triggered when a new booking is created",
        "2024-01-15T10:00:00Z",
        {
            "id": "book_123",
            "experienceId": "exp_456",
            "experienceName": "City Walking Tour",
            "customerName": "John Doe",
            "customerEmail": "[email\u00a0protected]",
            "startTime": "2024-02-15T14:00:00Z",
            "participants": 2,
            "status": "CONFIRMED",
            "totalAmount": 9000,
            "currency": "USD",
        },
    ),
    (
        "booking.confirmed",
        "Triggered when a pending booking is confirmed",
        "2024-01-15T10:05:00Z",
        {"id": "book_123", "status": "CONFIRMED", "confirmedAt": "2024-01-15T10:05:00Z"},
    ),
    (
        "booking.cancelled",
        "Triggered when a booking is cancelled",
        "2024-01-15T10:10:00Z",
        {
            "id": "book_123",
            "status": "CANCELLED",
            "cancelledAt": "2024-01-15T10:10:00Z",
            "reason": "Customer request",
            "refundAmount": 9000,
            "refundStatus": "PENDING",
        },
    ),
    (
        "booking.updated",
        "Triggered when booking details are modified",
        "2024-01-15T10:15:00Z",
        {
            "id": "book_123",
            "changes": {
                "participants": {"old": 2, "new": 3},
                "totalAmount": {"old": 9000, "new": 13500},
            },
        },
    ),
    (
        "payment.succeeded",
        "Triggered when a payment is successfully processed",
        "2024-01-15T10:20:00Z",
        {
            "id": "pay_789",
            "bookingId": "book_123",
            "amount": 9000,
            "currency": "USD",
            "method": "card",
            "status": "SUCCEEDED",
        },
    ),
    (
        "payment.failed",
        "Triggered when a payment fails",
        "2024-01-15T10:25:00Z",
        {
            "id": "pay_789",
            "bookingId": "book_123",
            "amount": 9000,
            "currency": "USD",
            "status": "FAILED",
            "errorCode": "CARD_DECLINED",
            "errorMessage": "The card was declined",
        },
    ),
    (
        "customer.created",
        "Triggered when a new customer is created",
        "2024-01-15T10:30:00Z",
        {
            "id": "cust_321",
            "name": "Jane Smith",
            "email": "[email\u00a0protected]",
            "phone": "+1234567890",
            "createdAt": "2024-01-15T10:30:00Z",
        },
    ),
)

# -- field types -----------------------------------------------------------------------------

# JSON has one number type and receivers see the canonical body, where 9000.0 is written 9000:
# an integral float is the integer a receiver will read. Larger values would not stay exact.
_MAX_SAFE_INTEGER = 2**53 - 1


def _integral_float_to_int(value: object) -> object:
    if isinstance(value, float) and value.is_integer() and abs(value) <= _MAX_SAFE_INTEGER:
        return int(value)
    return value


# The validator goes after the bounds so that the JSON Schema keeps them (as "minimum").
_INTEGRAL = BeforeValidator(_integral_float_to_int)
Amount = Annotated[int, Field(ge=0, description="in the currency's minor unit (cents)"), _INTEGRAL]
Count = Annotated[int, Field(ge=1), _INTEGRAL]
Id = Annotated[str, Field(min_length=1)]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code, e.g. USD")]
Status = Annotated[str, Field(min_length=1)]
Timestamp = Annotated[str, Field(description="UTC ISO-8601, e.g. 2024-01-15T10:05:00Z")]


class EventData(BaseModel):
    """Base of the catalogue's models: strict types, extra fields allowed.

    Timestamps are strings (not parsed: receivers get the text as sent); amounts are integers in
    the currency's minor unit, as the seed's 9000 for USD 90.00 shows.
    """

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


# -- the seed's events -------------------------------------------------------------------------


class BookingCreated(EventData):
    """``booking.created``: every field of the seed's example is required.

    ``customerEmail`` is any string: the seed's own example holds an obfuscated address.
    """

    id: Id
    experienceId: Id
    experienceName: str
    customerName: str
    customerEmail: str
    startTime: Timestamp
    participants: Count
    status: Status
    totalAmount: Amount
    currency: Currency


class BookingConfirmed(EventData):
    """``booking.confirmed``: id, status and confirmedAt, all required."""

    id: Id
    status: Status
    confirmedAt: Timestamp


class BookingCancelled(EventData):
    """``booking.cancelled``: all required but ``reason``, free text a cancellation may lack.

    A cancellation without a refund still says so (``refundAmount`` 0 and a ``refundStatus``),
    because receivers that follow the seed read both.
    """

    id: Id
    status: Status
    cancelledAt: Timestamp
    reason: str | None = None
    refundAmount: Amount
    refundStatus: Status


class FieldChange(EventData):
    """One changed field of ``booking.updated``: its ``old`` and ``new`` values (any JSON value,
    null included, as a field may be set or cleared), both required."""

    old: Any
    new: Any


class BookingUpdated(EventData):
    """``booking.updated``: ``changes`` maps each changed field's name to ``{old, new}``; an
    update reports at least one change."""

    id: Id
    changes: Annotated[dict[str, FieldChange], Field(min_length=1)]


class PaymentSucceeded(EventData):
    """``payment.succeeded``: every field of the seed's example is required."""

    id: Id
    bookingId: Id
    amount: Amount
    currency: Currency
    method: str
    status: Status


class PaymentFailed(EventData):
    """``payment.failed``: all required but ``errorMessage``; ``errorCode`` is the field
    receivers act on, the message is for people."""

    id: Id
    bookingId: Id
    amount: Amount
    currency: Currency
    status: Status
    errorCode: str
    errorMessage: str | None = None


class CustomerCreated(EventData):
    """``customer.created``: all required but ``phone``, which not every customer gives.

    ``email`` is any string: the seed's own example holds an obfuscated address.
    """

    id: Id
    name: str
    email: str
    phone: str | None = None
    createdAt: Timestamp


class WebhookTest(EventData):
    """``webhook.test``: webhookd's own ping, sent by ``webhookd send-test``; both required."""

    id: Id
    message: str


# -- the catalogue ------------------------------------------------------------------------------

TEST_EVENT_TYPE = "webhook.test"
TEST_EVENT_DESCRIPTION = "A test ping that checks an endpoint receives and verifies webhooks"
TEST_EVENT_TIMESTAMP = "2024-01-15T10:35:00Z"
TEST_EVENT_DATA: dict[str, Any] = {
    "id": "test_123",
    "message": "This is a test event from webhookd",
}

Origin = Literal["seed", "webhookd"]
EventModel: TypeAlias = type[EventData]  # named here: CatalogueEntry's "type" field shadows type


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    """One event type: its model of ``data`` and an example (timestamp and data)."""

    type: str
    description: str
    model: EventModel
    example_timestamp: str
    example_data: Mapping[str, Any]
    origin: Origin = "seed"  # "webhookd" for the events webhookd itself sends


_MODELS: dict[str, type[EventData]] = {
    "booking.created": BookingCreated,
    "booking.confirmed": BookingConfirmed,
    "booking.cancelled": BookingCancelled,
    "booking.updated": BookingUpdated,
    "payment.succeeded": PaymentSucceeded,
    "payment.failed": PaymentFailed,
    "customer.created": CustomerCreated,
}


def _build_catalogue() -> Mapping[str, CatalogueEntry]:
    entries = {
        event_type: CatalogueEntry(event_type, description, _MODELS[event_type], timestamp, data)
        for event_type, description, timestamp, data in SEED_EVENTS
    }
    entries[TEST_EVENT_TYPE] = CatalogueEntry(
        TEST_EVENT_TYPE,
        TEST_EVENT_DESCRIPTION,
        WebhookTest,
        TEST_EVENT_TIMESTAMP,
        TEST_EVENT_DATA,
        origin="webhookd",
    )
    return MappingProxyType(entries)


CATALOGUE: Mapping[str, CatalogueEntry] = _build_catalogue()
"""Every catalogued event type, in the seed's order, then ``webhook.test``."""


# -- checking data ------------------------------------------------------------------------------

SchemaMismatchAction = Literal["deliver", "warn", "quarantine"]


@dataclass(frozen=True, slots=True)
class CataloguePolicy:
    """What fan-out does with the catalogue (the ``[events]`` settings).

    ``schema_mismatch``: ``deliver`` (no check), ``warn`` (deliver, log and count) or
    ``quarantine``. ``allow_unknown_types``: whether types outside the catalogue are delivered.
    """

    schema_mismatch: SchemaMismatchAction = "warn"
    allow_unknown_types: bool = True


DEFAULT_POLICY = CataloguePolicy()

_IDENTIFIER_RE = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")
_MAX_PATH_CHARS = 120
_EXPECTED = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "string_type": "a string",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def check_data(event_type: str, data: Mapping[str, Any]) -> str | None:
    """One line saying how ``data`` breaks ``event_type``'s catalogue entry, or None if it fits.

    The line names the field (``data.totalAmount: expected an integer, got a string``) but
    never echoes values, which may be personal data. Types outside the catalogue give None:
    whether they are allowed is the caller's decision.
    """
    entry = CATALOGUE.get(event_type)
    if entry is None:
        return None
    try:
        entry.model.model_validate(data if isinstance(data, dict) else dict(data))
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False)
        line = describe_error(errors[0])
        if len(errors) > 1:
            more = len(errors) - 1
            line += f" (and {more} more problem{'s' if more > 1 else ''})"
        return line
    return None


def describe_error(error: ErrorDetails) -> str:
    """``data.<path>: <what is wrong>`` for one pydantic error, without the offending value."""
    path = _format_path(error["loc"])
    kind = error["type"]
    if kind == "missing":
        message = "required field is missing"
    elif kind in ("too_short", "string_too_short"):
        message = "must not be empty"  # the catalogue's only length bound is "at least one"
    elif kind in _EXPECTED:
        message = f"expected {_EXPECTED[kind]}, got {json_kind(error['input'])}"
    else:
        text = error["msg"]
        message = text[:1].lower() + text[1:]
    return f"{path}: {message}"


def _format_path(loc: tuple[int | str, ...]) -> str:
    out = "data"
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENTIFIER_RE.fullmatch(part):
            out += f".{part}"
        else:
            out += "[" + json.dumps(part) + "]"
    if len(out) > _MAX_PATH_CHARS:
        out = out[: _MAX_PATH_CHARS - 1] + "…"
    return out


def json_kind(value: object) -> str:
    """The JSON kind of a parsed value, as a person would say it (``a string``, ``null``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    return "an object"
