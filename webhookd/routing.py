"""Which endpoints get an event: event-type names, subscription patterns and tenant routing.

Pure functions; the dispatcher calls :func:`route` once per event, at fan-out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from webhookd.models import Endpoint

MAX_EVENT_TYPE_LENGTH = 100

# "dotted lower-case name": two or more segments of [a-z0-9_], each starting with a letter.
EVENT_TYPE_RE = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)+")
_PREFIX_PATTERN_RE = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*\.\*")


def event_type_problem(event_type: object) -> str | None:
    """Why ``event_type`` is not a valid event-type name, or None when it is."""
    if not isinstance(event_type, str):
        return f"event_type must be text, got {type(event_type).__name__}"
    if len(event_type) > MAX_EVENT_TYPE_LENGTH:
        return f"event_type is longer than {MAX_EVENT_TYPE_LENGTH} characters"
    if not EVENT_TYPE_RE.fullmatch(event_type):
        return (
            f"event_type {event_type!r} is not a dotted lower-case name "
            "such as 'booking.created' (letters, digits, '_', segments joined by '.')"
        )
    return None


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid subscription pattern, or None when it is."""
    if pattern == "*" or _PREFIX_PATTERN_RE.fullmatch(pattern):
        return None
    if event_type_problem(pattern) is None:
        return None
    return (
        f"event pattern {pattern!r} must be '*', a prefix such as 'booking.*', "
        "or an exact event type such as 'payment.succeeded'"
    )


def pattern_matches(pattern: str, event_type: str) -> bool:
    """``*`` matches everything, ``booking.*`` every type under ``booking.``, else exact."""
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return event_type.startswith(pattern[:-1])
    return pattern == event_type


def subscribes(endpoint: Endpoint, event_type: str, tenant: str | None) -> bool:
    """Whether ``endpoint`` receives an event of this type and tenant."""
    if not endpoint.enabled or endpoint.problem is not None:
        return False
    if endpoint.tenant is not None and endpoint.tenant != tenant:
        return False
    return any(pattern_matches(p, event_type) for p in endpoint.events)


def route(event_type: str, tenant: str | None, endpoints: Iterable[Endpoint]) -> list[Endpoint]:
    """Every enabled endpoint whose tenant is empty or equal and whose patterns match."""
    return [e for e in endpoints if subscribes(e, event_type, tenant)]


def parse_patterns(value: object) -> Sequence[str]:
    """Patterns from a table column: a JSON array, or names separated by commas/whitespace."""
    if value is None:
        return ("*",)
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value)
    text = str(value).strip()
    if text.startswith("["):
        import json

        parsed = json.loads(text)
        if not isinstance(parsed, list) or not all(isinstance(p, str) for p in parsed):
            raise ValueError("events must be a JSON array of strings")
        return tuple(parsed)
    return tuple(p for p in re.split(r"[\s,]+", text) if p)
