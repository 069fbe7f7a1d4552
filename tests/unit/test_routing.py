"""Routing: which endpoints get an event (patterns, tenants, disabled or broken endpoints)."""

from __future__ import annotations

import pytest

from webhookd.models import Endpoint
from webhookd.routing import (
    MAX_EVENT_TYPE_LENGTH,
    event_type_problem,
    parse_patterns,
    pattern_matches,
    pattern_problem,
    route,
)


def ep(ep_id: str, *events: str, tenant: str | None = None, **kwargs: object) -> Endpoint:
    return Endpoint(
        id=ep_id,
        url=f"https://{ep_id}.example/hook",
        secret="s",
        events=events or ("*",),
        tenant=tenant,
        **kwargs,  # type: ignore[arg-type]
    )


def ids(endpoints: list[Endpoint]) -> list[str]:
    return [e.id for e in endpoints]


@pytest.mark.parametrize(
    ("pattern", "event_type", "matches"),
    [
        ("*", "booking.created", True),
        ("*", "payment.succeeded", True),
        ("booking.*", "booking.created", True),
        ("booking.*", "booking.cancelled", True),
        ("booking.*", "bookings.created", False),
        ("booking.*", "payment.succeeded", False),
        ("booking.*", "booking", False),
        ("payment.succeeded", "payment.succeeded", True),
        ("payment.succeeded", "payment.failed", False),
        ("payment.succeeded", "payment.succeeded_late", False),
        ("payment.succeeded", "payment", False),
    ],
)
def test_pattern_matches(pattern: str, event_type: str, matches: bool) -> None:
    assert pattern_matches(pattern, event_type) is matches


def test_route_by_pattern() -> None:
    endpoints = [
        ep("all", "*"),
        ep("bookings", "booking.*"),
        ep("paid", "payment.succeeded"),
        ep("mixed", "payment.succeeded", "booking.cancelled"),
    ]
    assert ids(route("booking.created", None, endpoints)) == ["all", "bookings"]
    assert ids(route("booking.cancelled", None, endpoints)) == ["all", "bookings", "mixed"]
    assert ids(route("payment.succeeded", None, endpoints)) == ["all", "paid", "mixed"]
    assert ids(route("payment.failed", None, endpoints)) == ["all"]


def test_route_by_tenant() -> None:
    """An endpoint without a tenant gets every tenant's events; one with a tenant only its own."""
    endpoints = [ep("platform"), ep("org1", tenant="org_1"), ep("org2", tenant="org_2")]
    assert ids(route("booking.created", "org_1", endpoints)) == ["platform", "org1"]
    assert ids(route("booking.created", "org_2", endpoints)) == ["platform", "org2"]
    assert ids(route("booking.created", "org_3", endpoints)) == ["platform"]
    assert ids(route("booking.created", None, endpoints)) == ["platform"]


def test_tenant_and_patterns_must_both_match() -> None:
    endpoints = [ep("org1-bookings", "booking.*", tenant="org_1")]
    assert ids(route("booking.created", "org_1", endpoints)) == ["org1-bookings"]
    assert route("payment.succeeded", "org_1", endpoints) == []
    assert route("booking.created", "org_2", endpoints) == []


def test_disabled_and_broken_endpoints_are_never_routed() -> None:
    endpoints = [
        ep("off", enabled=False),
        ep("broken", problem="url is not valid"),
        ep("ok"),
    ]
    for tenant in (None, "org_1"):
        assert ids(route("booking.created", tenant, endpoints)) == ["ok"]


@pytest.mark.parametrize(
    "pattern", ["*", "booking.*", "payment.succeeded", "a.b.*", "a.b.c", "booking_v2.created"]
)
def test_valid_patterns(pattern: str) -> None:
    assert pattern_problem(pattern) is None


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "booking",  # an event type has two segments at least
        "**",
        "*.created",
        "booking.*.created",
        "booking*",
        "booking.",
        "Booking.created",
        " booking.created",
        "booking.created ",
        "booking..created",
        "booking.1created",
    ],
)
def test_invalid_patterns_say_what_is_allowed(pattern: str) -> None:
    problem = pattern_problem(pattern)
    assert problem is not None
    assert "booking.*" in problem


@pytest.mark.parametrize(
    "event_type", ["booking.created", "payment.succeeded", "a.b.c", "booking_v2.created_at"]
)
def test_valid_event_types(event_type: str) -> None:
    assert event_type_problem(event_type) is None


@pytest.mark.parametrize(
    "event_type",
    [
        "",
        "booking",
        "Booking.Created",
        "booking.created!",
        "booking created",
        "booking.*",
        ".booking",
        "booking.",
        "a." + "b" * MAX_EVENT_TYPE_LENGTH,
        None,
        42,
        b"booking.created",
    ],
)
def test_invalid_event_types(event_type: object) -> None:
    assert event_type_problem(event_type) is not None


@pytest.mark.parametrize(
    ("column", "patterns"),
    [
        (None, ("*",)),
        ("*", ("*",)),
        ('["booking.*", "payment.succeeded"]', ("booking.*", "payment.succeeded")),
        ("booking.*, payment.succeeded", ("booking.*", "payment.succeeded")),
        ("booking.* payment.succeeded", ("booking.*", "payment.succeeded")),
        (" booking.created ", ("booking.created",)),
    ],
)
def test_patterns_from_the_endpoints_table(column: object, patterns: tuple[str, ...]) -> None:
    assert tuple(parse_patterns(column)) == patterns


@pytest.mark.parametrize("column", ['["booking.*", 3]', '["booking.*"', "[not json"])
def test_malformed_pattern_columns_are_refused(column: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - json errors are ValueErrors too
        parse_patterns(column)
