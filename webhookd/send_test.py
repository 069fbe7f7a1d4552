"""``webhookd send-test``: send one example event to an endpoint now and say what happened.

    webhookd send-test crm --event booking.created

The seed's set-up steps end with "Save and Test". This sends the example of an event type from
the catalogue (default: a ``webhook.test`` ping) to one endpoint at once, signed exactly as the
daemon signs (every scheme of the endpoint, and the previous secret during a rotation grace
period), then prints the status, the latency, the start of the response and a verdict a person
can act on. The attempt is recorded like any other (``webhookd deliveries show``), as a delivery
that is never retried. Exit code: 0 delivered, 1 not delivered, 2 unknown endpoint or event type.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from webhookd import canonical_json, catalogue
from webhookd import endpoints as endpoints_mod
from webhookd.delivery import HttpResult, Sender
from webhookd.errors import StorageError, WebhookdError
from webhookd.events import build_body, format_timestamp
from webhookd.ids import new_id
from webhookd.models import AttemptOutcome, AttemptResult, Delivery, DeliveryState, Endpoint, Event
from webhookd.routing import pattern_matches
from webhookd.settings import Settings
from webhookd.signing import active_secrets, standard_key
from webhookd.store.base import Store

DEFAULT_EVENT_TYPE = "webhook.test"
RESPONSE_PREVIEW_CHARS = 200

EXIT_DELIVERED = 0
EXIT_NOT_DELIVERED = 1
EXIT_USAGE = 2


class SendTestUsageError(WebhookdError):
    """The endpoint or the event type does not exist, or the endpoint cannot be used."""


# -- the test event --------------------------------------------------------------------------


def example_types() -> list[str]:
    """The event types that have an example to send, in the catalogue's order."""
    return list(catalogue.CATALOGUE)


def example_data(event_type: str) -> dict[str, Any]:
    """The catalogue's example ``data`` of ``event_type``; SendTestUsageError if it has none."""
    entry = catalogue.CATALOGUE.get(event_type)
    if entry is None:
        raise SendTestUsageError(
            f"no example for event type {event_type!r}; choose one of: "
            + ", ".join(example_types())
        )
    return dict(entry.example_data)


def build_test_event(event_type: str, *, tenant: str | None, now: float) -> Event:
    """A fresh ``evt_test_…`` event holding the example of ``event_type``, stamped ``now``.

    It comes from no outbox row: ``outbox_id`` is 0 here and NULL once recorded.
    """
    data_json = canonical_json.dumps(example_data(event_type))
    timestamp = format_timestamp(datetime.fromtimestamp(now, UTC))
    return Event(
        outbox_id=0,
        event_id=new_id("evt_test", now),
        event_type=event_type,
        tenant=tenant,
        occurred_at=timestamp,
        body=build_body(event_type, timestamp, data_json),
    )


# -- the endpoint ----------------------------------------------------------------------------


def find_endpoint(
    endpoint_id: str, settings: Settings, table_rows: Sequence[Mapping[str, object]]
) -> Endpoint:
    """The endpoint the daemon would use under this id (the config file wins over the table)."""
    static = endpoints_mod.from_settings(settings)
    table = [endpoints_mod.from_table_row(row, settings) for row in table_rows]
    merged = endpoints_mod.merge(static, table)
    endpoint = merged.get(endpoint_id)
    if endpoint is None:
        known = ", ".join(sorted(merged)) or "none"
        raise SendTestUsageError(
            f"no endpoint {endpoint_id!r} in the config file or the webhook_endpoints table "
            f"(endpoints: {known}); `webhookd endpoints list` shows them"
        )
    if endpoint.problem is not None:
        raise SendTestUsageError(
            f"endpoint {endpoint_id!r} cannot be used: {endpoint.problem}; "
            "the daemon sends it nothing until this is fixed"
        )
    return endpoint


def notes(endpoint: Endpoint, event_type: str) -> list[str]:
    """What differs between this test and what the daemon would do."""
    out = []
    if not endpoint.enabled:
        out.append(f"endpoint {endpoint.id!r} is disabled: the daemon sends it nothing")
    if event_type != DEFAULT_EVENT_TYPE and not any(
        pattern_matches(p, event_type) for p in endpoint.events
    ):
        out.append(
            f"endpoint {endpoint.id!r} does not subscribe to {event_type} "
            f"(events: {', '.join(endpoint.events)}): the daemon would not send it this event"
        )
    return out


# -- the verdict -----------------------------------------------------------------------------


def verdict(result: HttpResult, url: str, *, timeout_seconds: float) -> str:
    """What the attempt means for the person who set the endpoint up. Pure."""
    answered = result.result in (AttemptResult.SUCCESS, AttemptResult.HTTP_ERROR)
    if answered and result.status_code is not None:
        return _status_verdict(result.status_code)
    error = result.error or ""
    if result.result is AttemptResult.TIMEOUT:
        text = error or f"timed out after {timeout_seconds:g} s"
        if "connecting" in text:
            return f"{text}: check the host, the port and any firewall in between"
        return f"{text}: the receiver must answer sooner (reply 2xx first, work afterwards)"
    lowered = error.lower()
    # The sender keeps only asyncio's wording, "Connect call failed", whatever the errno; a
    # refusal is by far the most common cause (an unreachable host mostly times out instead).
    if "refused" in lowered or "connect call failed" in lowered:
        return f"connection refused: nothing listens at {_host_port(url)}"
    if error.startswith("DNS lookup failed"):
        return f"{error}: check the host name in the URL"
    return error or "no response"


def _status_verdict(status: int) -> str:
    if 200 <= status < 300:
        return "delivered"
    if status in (401, 403):
        return f"rejected by the receiver with {status}: check the signing secret"
    if status in (404, 405):
        return f"the receiver answered {status}: check the URL path"
    if status == 410:
        return "the receiver answered 410: it says this endpoint is gone; update or remove it"
    if 300 <= status < 400:
        # HttpResult does not keep the Location header, so the target cannot be named here.
        return (
            f"the receiver redirected with {status}; webhookd never follows redirects: "
            "use the final URL"
        )
    if status == 413:
        return "the receiver answered 413: the payload is too large for it; raise its body limit"
    if status in (429, 503):
        return (
            f"the receiver is busy or rate-limiting ({status}); the daemon would retry later: "
            "try again in a moment"
        )
    if 500 <= status < 600:
        return f"the receiver failed with {status} (its own error): check its logs"
    if 400 <= status < 500:
        return f"rejected by the receiver with {status}: see its response"
    return f"the receiver answered {status}, which is not a success"


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{host}:{port}"


# -- sending ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendTestReport:
    """What one test send did. Its repr shows no secret (the endpoint's are ``repr=False``)."""

    endpoint: Endpoint
    event: Event
    delivery_id: str
    result: HttpResult
    verdict: str
    signed_by_previous_secret: bool
    notes: tuple[str, ...] = ()
    record_error: str | None = None  # why the attempt could not be recorded, if it could not

    @property
    def delivered(self) -> bool:
        return self.result.result is AttemptResult.SUCCESS


async def send_test(
    settings: Settings, store: Store, endpoint_id: str, event_type: str = DEFAULT_EVENT_TYPE
) -> SendTestReport:
    """Send the example of ``event_type`` to the endpoint once, and record the attempt."""
    example_data(event_type)  # an unknown type fails before anything is read or sent
    endpoint = find_endpoint(endpoint_id, settings, await store.table_endpoints())
    now = time.time()
    event = build_test_event(event_type, tenant=endpoint.tenant, now=now)
    delivery = Delivery(
        pk=0,
        delivery_id=new_id("dlv", now),
        endpoint_id=endpoint.id,
        event_id=event.event_id,
        event_type=event.event_type,
        occurred_at=event.occurred_at,
        body=event.body,
        attempts=0,
        created_at=now,
    )
    sender = Sender(settings.delivery)
    await sender.start()
    try:
        result = await sender.send(endpoint, delivery)
    finally:
        await sender.close()
    outcome = AttemptOutcome(
        delivery_pk=0,
        attempt_no=1,
        started_at=result.started_at,
        duration_seconds=result.duration_seconds,
        result=result.result,
        status_code=result.status_code,
        error=result.error,
        response_excerpt=result.response_excerpt,
        new_state=(
            DeliveryState.SUCCEEDED
            if result.result is AttemptResult.SUCCESS
            else DeliveryState.FAILED
        ),
        next_attempt_at=None,
        error_kind=None if result.error_kind is None else result.error_kind.value,
    )
    record_error = None
    try:
        # What the network did is kept even if the command is interrupted now.
        await asyncio.shield(
            store.record_test_send(event, endpoint.id, delivery.delivery_id, outcome)
        )
    except StorageError as exc:
        record_error = str(exc)  # the result is still worth showing
    return SendTestReport(
        endpoint=endpoint,
        event=event,
        delivery_id=delivery.delivery_id,
        result=result,
        verdict=verdict(result, endpoint.url, timeout_seconds=settings.delivery.timeout_seconds),
        signed_by_previous_secret=len(active_secrets(endpoint, result.started_at)) > 1,
        notes=tuple(notes(endpoint, event_type) + _after_notes(event_type, result)),
        record_error=record_error,
    )


def _after_notes(event_type: str, result: HttpResult) -> list[str]:
    if event_type == DEFAULT_EVENT_TYPE and result.status_code in (400, 422):
        return [
            f"a receiver may refuse event types it does not know, such as {DEFAULT_EVENT_TYPE}; "
            "try --event with a type it handles, e.g. --event booking.created"
        ]
    return []


# -- output ----------------------------------------------------------------------------------


def _preview(excerpt: str | None) -> str:
    if excerpt is None:
        return "(none)"
    if not excerpt:
        return "(empty)"
    shown = json.dumps(excerpt[:RESPONSE_PREVIEW_CHARS], ensure_ascii=False)
    return shown + (" …" if len(excerpt) > RESPONSE_PREVIEW_CHARS else "")


def _is_standard_key(secret: str) -> bool:
    try:
        standard_key(secret)
    except ValueError:
        return False
    return True


def render_text(report: SendTestReport) -> str:
    """The human-readable report (no secret in it)."""
    r = report.result
    took = f"{r.duration_seconds * 1000:.0f} ms"
    status = f"{r.status_code} in {took}" if r.status_code is not None else f"none after {took}"
    secrets = "by the current secret"
    expires_at = report.endpoint.previous_secret_expires_at
    if report.signed_by_previous_secret and expires_at is not None:
        until = format_timestamp(datetime.fromtimestamp(expires_at, UTC))
        secrets = f"by the current and the previous secret (the previous one until {until})"
        previous = report.endpoint.previous_secret or ""
        if "standard" in report.endpoint.schemes and not _is_standard_key(previous):
            secrets += "; the previous one is no whsec_ key, so it signs the seed header only"
    lines = [
        f"send-test to {report.endpoint.id} ({report.endpoint.url}) — event "
        f"{report.event.event_type}, delivery {report.delivery_id}",
        f"  status:   {status}",
        f"  response: {_preview(r.response_excerpt)}",
        f"  signed:   {' + '.join(report.endpoint.schemes)}, {secrets}",
        f"  verdict:  {report.verdict}",
    ]
    return "\n".join(lines)


def report_json(report: SendTestReport) -> dict[str, Any]:
    r = report.result
    return {
        "endpoint": report.endpoint.id,
        "url": report.endpoint.url,
        "event_type": report.event.event_type,
        "event_id": report.event.event_id,
        "delivery_id": report.delivery_id,
        "delivered": report.delivered,
        "result": r.result.value,
        "status_code": r.status_code,
        "duration_ms": round(r.duration_seconds * 1000, 1),
        "response_excerpt": r.response_excerpt,
        "error": r.error,
        "verdict": report.verdict,
        "signature_schemes": list(report.endpoint.schemes),
        "signed_by_previous_secret": report.signed_by_previous_secret,
        "notes": list(report.notes),
        "recorded": report.record_error is None,
    }


# -- command line ----------------------------------------------------------------------------


def add_send_test_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common_parents: Sequence[argparse.ArgumentParser] = (),
) -> None:
    """Add ``send-test`` to ``subparsers``; its ``func`` default is :func:`cmd_send_test`."""
    description = (
        "Send the example of an event type to one endpoint now, signed as the daemon signs, and "
        "say what the receiver made of it. The attempt is recorded (webhookd deliveries show). "
        "Exit code: 0 delivered, 1 not delivered, 2 unknown endpoint or event type."
    )
    p = subparsers.add_parser(
        "send-test",
        help="send a test event to an endpoint now",
        description=description,
        parents=list(common_parents),
    )
    p.set_defaults(func=cmd_send_test)
    p.add_argument("endpoint_id", metavar="ENDPOINT", help="endpoint id (webhookd endpoints list)")
    p.add_argument(
        "--event",
        dest="event_type",
        default=DEFAULT_EVENT_TYPE,
        metavar="TYPE",
        help=f"event type whose example to send (default: {DEFAULT_EVENT_TYPE}, a ping); one of "
        + ", ".join(example_types()),
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def cmd_send_test(args: argparse.Namespace) -> int:
    from webhookd.cli.common import run_async, settings_from_args, with_store

    settings = settings_from_args(args)
    try:
        example_data(args.event_type)
        report = run_async(
            with_store(
                settings,
                lambda store: send_test(settings, store, args.endpoint_id, args.event_type),
            )
        )
    except SendTestUsageError as exc:
        print(f"webhookd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report_json(report), indent=2, ensure_ascii=False))
    else:
        print(render_text(report))
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    if report.record_error is not None:
        print(
            f"webhookd: error: the attempt was not recorded: {report.record_error}", file=sys.stderr
        )
        return EXIT_NOT_DELIVERED
    return EXIT_DELIVERED if report.delivered else EXIT_NOT_DELIVERED
