"""``webhookd send-test``'s pure parts: the verdict for each kind of answer, the test event, the
endpoint lookup and the report. Sending against real receivers is in
``tests/integration/test_send_test.py``."""

from __future__ import annotations

import base64
import json

import pytest

from webhookd import canonical_json
from webhookd.catalogue import CATALOGUE, SEED_EVENTS
from webhookd.delivery import HttpResult
from webhookd.events import build_body
from webhookd.models import (
    AttemptOutcome,
    AttemptResult,
    DeliveryFilter,
    DeliveryState,
    Endpoint,
)
from webhookd.send_test import (
    DEFAULT_EVENT_TYPE,
    SendTestReport,
    SendTestUsageError,
    build_test_event,
    example_data,
    example_types,
    find_endpoint,
    notes,
    render_text,
    report_json,
    verdict,
)
from webhookd.settings import Settings
from webhookd.store.base import Store
from webhookd.store.memory import MemoryBackend

NOW = 1_705_312_800.25  # 2024-01-15T10:00:00.250Z
URL = "https://crm.example.com/hooks"
SECRET = "very-secret-signing-key-never-shown"
SEED_TYPES = [t for t, _, _, _ in SEED_EVENTS]


def http(
    status: int | None = None,
    *,
    result: AttemptResult | None = None,
    error: str | None = None,
    excerpt: str | None = None,
    duration: float = 0.023,
) -> HttpResult:
    if result is None:
        result = (
            AttemptResult.SUCCESS if status and 200 <= status < 300 else AttemptResult.HTTP_ERROR
        )
    if error is None and result is AttemptResult.HTTP_ERROR:
        error = f"HTTP {status}"
    return HttpResult(NOW, duration, result, status, error, excerpt)


def judge(result: HttpResult, url: str = URL, timeout: float = 15.0) -> str:
    return verdict(result, url, timeout_seconds=timeout)


# -- verdict ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_any_2xx_is_delivered(status: int) -> None:
    assert judge(http(status)) == "delivered"


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_point_at_the_secret(status: int) -> None:
    assert judge(http(status)) == (
        f"rejected by the receiver with {status}: check the signing secret"
    )


@pytest.mark.parametrize("status", [404, 405])
def test_404_and_405_point_at_the_path(status: int) -> None:
    assert judge(http(status)) == f"the receiver answered {status}: check the URL path"


def test_410_says_the_receiver_calls_the_endpoint_gone() -> None:
    text = judge(http(410))
    assert "410" in text
    assert "gone" in text


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_say_they_are_not_followed(status: int) -> None:
    text = judge(http(status))
    assert text.startswith(f"the receiver redirected with {status}")
    assert "never follows redirects: use the final URL" in text


def test_413_says_the_payload_is_too_large() -> None:
    text = judge(http(413))
    assert "413" in text
    assert "too large" in text


@pytest.mark.parametrize("status", [429, 503])
def test_429_and_503_say_busy(status: int) -> None:
    text = judge(http(status))
    assert str(status) in text
    assert "busy or rate-limiting" in text


@pytest.mark.parametrize("status", [500, 502, 504, 599])
def test_other_5xx_are_the_receivers_own_error(status: int) -> None:
    assert judge(http(status)).startswith(f"the receiver failed with {status} (its own error)")


@pytest.mark.parametrize("status", [400, 409, 422])
def test_other_4xx_are_rejections_with_their_status(status: int) -> None:
    assert judge(http(status)).startswith(f"rejected by the receiver with {status}")


def test_a_timeout_names_the_configured_time() -> None:
    result = http(result=AttemptResult.TIMEOUT, error="timed out after 15 s")
    assert judge(result).startswith("timed out after 15 s")
    # without the sender's text, the configured timeout is used
    bare = http(result=AttemptResult.TIMEOUT, error=None)
    assert judge(bare, timeout=2.5).startswith("timed out after 2.5 s")


def test_a_timeout_after_the_status_line_is_still_a_timeout() -> None:
    result = http(
        200, result=AttemptResult.TIMEOUT, error="timed out reading the response after 15 s"
    )
    text = judge(result)
    assert text.startswith("timed out reading the response after 15 s")
    assert text != "delivered"


def test_a_connect_timeout_points_at_the_network() -> None:
    result = http(result=AttemptResult.TIMEOUT, error="timed out connecting after 5 s")
    text = judge(result)
    assert text.startswith("timed out connecting after 5 s")
    assert "firewall" in text


def test_tls_errors_are_shown_as_the_sender_words_them() -> None:
    error = "TLS certificate not trusted: certificate has expired"
    result = http(result=AttemptResult.NETWORK_ERROR, error=error)
    assert judge(result) == error


def test_dns_failures_name_the_host() -> None:
    error = "DNS lookup failed for crm.example.com: Name or service not known"
    text = judge(http(result=AttemptResult.NETWORK_ERROR, error=error))
    assert text.startswith(error)
    assert "host name" in text


@pytest.mark.parametrize(
    ("url", "error", "where"),
    [
        (
            "http://127.0.0.1:4567/hook",
            "cannot connect to 127.0.0.1:4567: Connect call failed ('127.0.0.1', 4567)",
            "127.0.0.1:4567",
        ),
        (
            "https://crm.example.com/hooks",
            "cannot connect to x: Connection refused",
            "crm.example.com:443",
        ),
        (
            "http://crm.example.com/hooks",
            "cannot connect to x: Connection refused",
            "crm.example.com:80",
        ),
        ("http://[::1]:8080/h", "cannot connect to ::1:8080: Connection refused", "[::1]:8080"),
    ],
)
def test_connection_refused_names_host_and_port(url: str, error: str, where: str) -> None:
    result = http(result=AttemptResult.NETWORK_ERROR, error=error)
    assert judge(result, url) == f"connection refused: nothing listens at {where}"


def test_a_broken_response_after_a_2xx_status_is_not_delivered() -> None:
    error = "broken response body: Response payload is not completed"
    result = http(200, result=AttemptResult.NETWORK_ERROR, error=error)
    assert judge(result) == error


def test_other_network_errors_are_shown_as_the_sender_words_them() -> None:
    error = "the server closed the connection without a response"
    assert judge(http(result=AttemptResult.NETWORK_ERROR, error=error)) == error


# -- the test event --------------------------------------------------------------------------


def test_every_seed_type_and_the_ping_have_an_example() -> None:
    assert set(example_types()) == {*SEED_TYPES, DEFAULT_EVENT_TYPE}
    assert len(SEED_TYPES) == 7


def test_an_unknown_event_type_is_a_usage_error_listing_the_choices() -> None:
    with pytest.raises(SendTestUsageError) as info:
        example_data("booking.exploded")
    message = str(info.value)
    assert "'booking.exploded'" in message
    for event_type in [*SEED_TYPES, DEFAULT_EVENT_TYPE]:
        assert event_type in message


@pytest.mark.parametrize("event_type", SEED_TYPES)
def test_a_seed_event_carries_the_seed_example_stamped_now(event_type: str) -> None:
    [data] = [d for t, _, _, d in SEED_EVENTS if t == event_type]
    event = build_test_event(event_type, tenant="org_1", now=NOW)
    assert event.occurred_at == "2024-01-15T10:00:00.250Z"
    assert event.body == build_body(event_type, event.occurred_at, canonical_json.dumps(data))
    parsed = json.loads(event.body)
    assert list(parsed) == ["event", "timestamp", "data"]
    assert parsed == {"event": event_type, "timestamp": event.occurred_at, "data": data}
    assert event.event_type == event_type
    assert event.tenant == "org_1"
    assert event.event_id.startswith("evt_test_")


def test_each_test_event_has_a_fresh_id_and_the_current_time() -> None:
    first = build_test_event("booking.created", tenant=None, now=NOW)
    second = build_test_event("booking.created", tenant=None, now=NOW + 61)
    assert first.event_id != second.event_id
    assert json.loads(second.body)["timestamp"] == "2024-01-15T10:01:01.250Z"
    whole_second = build_test_event("booking.created", tenant=None, now=1_705_312_800.0)
    assert whole_second.occurred_at == "2024-01-15T10:00:00Z"


def test_the_ping_is_the_catalogues_webhook_test_example() -> None:
    event = build_test_event(DEFAULT_EVENT_TYPE, tenant=None, now=NOW)
    parsed = json.loads(event.body)
    assert parsed == {
        "event": "webhook.test",
        "timestamp": "2024-01-15T10:00:00.250Z",
        "data": dict(CATALOGUE["webhook.test"].example_data),
    }
    assert set(parsed["data"]) == {"id", "message"}


# -- the endpoint ----------------------------------------------------------------------------


def settings_with(*endpoints: dict[str, object], allow_http: bool = False) -> Settings:
    return Settings.model_validate(
        {"delivery": {"allow_http": allow_http}, "endpoints": list(endpoints)}
    )


def table_row(**values: object) -> dict[str, object]:
    row: dict[str, object] = {
        "id": "crm",
        "url": URL,
        "secret": SECRET,
        "events": "*",
        "tenant": None,
        "enabled": 1,
        "max_concurrency": None,
        "headers": None,
        "description": "",
        "signature_schemes": "seed",
        "previous_secret": None,
        "previous_secret_expires_at": None,
    }
    row.update(values)
    return row


def test_an_unknown_endpoint_is_a_usage_error_naming_the_known_ones() -> None:
    settings = settings_with({"id": "billing", "url": URL, "secret": SECRET})
    with pytest.raises(SendTestUsageError) as info:
        find_endpoint("crn", settings, [table_row()])
    message = str(info.value)
    assert "'crn'" in message
    assert "billing" in message
    assert "crm" in message


def test_a_table_endpoint_is_found_and_the_config_file_wins() -> None:
    assert find_endpoint("crm", settings_with(), [table_row()]).source == "table"
    settings = settings_with({"id": "crm", "url": "https://static.example/h", "secret": SECRET})
    found = find_endpoint("crm", settings, [table_row()])
    assert (found.source, found.url) == ("config", "https://static.example/h")


def test_an_endpoint_the_daemon_cannot_use_is_a_usage_error_with_its_problem() -> None:
    rows = [table_row(url="http://plain.example/h")]
    with pytest.raises(SendTestUsageError, match="plain http"):
        find_endpoint("crm", settings_with(), rows)
    assert find_endpoint("crm", settings_with(allow_http=True), rows).url.startswith("http://")


def test_notes_say_when_the_daemon_would_not_send_this() -> None:
    endpoint = Endpoint(id="crm", url=URL, secret=SECRET, events=("payment.*",))
    assert notes(endpoint, "payment.failed") == []
    [note] = notes(endpoint, "booking.created")
    assert "does not subscribe to booking.created" in note
    assert notes(endpoint, DEFAULT_EVENT_TYPE) == []  # the ping goes to any endpoint
    disabled = Endpoint(id="crm", url=URL, secret=SECRET, enabled=False)
    [note] = notes(disabled, DEFAULT_EVENT_TYPE)
    assert "disabled" in note


# -- the report ------------------------------------------------------------------------------


def report(
    result: HttpResult, *, previous: bool = False, previous_secret: str = "old-" + SECRET
) -> SendTestReport:
    endpoint = Endpoint(
        id="crm",
        url=URL,
        secret=SECRET,
        schemes=("seed", "standard"),
        previous_secret=previous_secret if previous else None,
        previous_secret_expires_at=NOW + 3600 if previous else None,
    )
    return SendTestReport(
        endpoint=endpoint,
        event=build_test_event(DEFAULT_EVENT_TYPE, tenant=None, now=NOW),
        delivery_id="dlv_01hm0000000000000000000000",
        result=result,
        verdict=judge(result),
        signed_by_previous_secret=previous,
    )


def test_the_text_report_shows_status_latency_response_and_verdict() -> None:
    text = render_text(report(http(401, excerpt="Invalid signature")))
    lines = text.splitlines()
    assert lines[0] == (
        f"send-test to crm ({URL}) — event webhook.test, delivery dlv_01hm0000000000000000000000"
    )
    assert "  status:   401 in 23 ms" in lines
    assert '  response: "Invalid signature"' in lines
    assert "  verdict:  rejected by the receiver with 401: check the signing secret" in lines


def test_the_text_report_without_a_response() -> None:
    result = http(result=AttemptResult.TIMEOUT, error="timed out after 15 s", duration=15.002)
    text = render_text(report(result))
    assert "  status:   none after 15002 ms" in text.splitlines()
    assert "  response: (none)" in text.splitlines()
    assert "  verdict:  timed out after 15 s" in text


def test_a_long_or_multiline_response_is_shown_on_one_line_and_cut() -> None:
    text = render_text(report(http(500, excerpt="line one\nline two\x1b[31m" + "x" * 500)))
    [line] = [ln for ln in text.splitlines() if ln.startswith("  response:")]
    assert "\\n" in line
    assert "\x1b" not in line  # no terminal escapes from the receiver reach the terminal
    assert line.endswith("…")
    assert len(line) < 300


def test_the_report_says_which_schemes_and_secrets_signed() -> None:
    whsec = "whsec_" + base64.b64encode(bytes(range(32))).decode()
    lines = render_text(report(http(200), previous=True, previous_secret=whsec)).splitlines()
    assert (
        "  signed:   seed + standard, by the current and the previous secret (the previous "
        "one until 2024-01-15T11:00:00.250Z)"
    ) in lines
    legacy = render_text(report(http(200), previous=True, previous_secret="legacy-free-text"))
    assert "the previous one is no whsec_ key, so it signs the seed header only" in legacy
    assert (
        "  signed:   seed + standard, by the current secret"
        in render_text(report(http(200), previous=False)).splitlines()
    )


def test_no_secret_is_ever_in_the_report() -> None:
    for r in (report(http(200), previous=True), report(http(401), previous=True)):
        shown = render_text(r) + json.dumps(report_json(r)) + repr(r)
        assert SECRET not in shown


def test_the_json_report_has_what_a_script_needs() -> None:
    out = report_json(report(http(404, excerpt="Not Found")))
    assert out["delivered"] is False
    assert (out["endpoint"], out["event_type"], out["delivery_id"]) == (
        "crm",
        "webhook.test",
        "dlv_01hm0000000000000000000000",
    )
    assert (out["status_code"], out["result"], out["response_excerpt"]) == (
        404,
        "http_error",
        "Not Found",
    )
    assert out["duration_ms"] == 23.0
    assert out["verdict"] == "the receiver answered 404: check the URL path"
    assert out["signature_schemes"] == ["seed", "standard"]
    assert out["event_id"].startswith("evt_test_")
    json.dumps(out)  # serialisable as it is


# -- recording -------------------------------------------------------------------------------


async def test_a_test_send_is_recorded_final_and_never_pending(
    memory_backend: MemoryBackend,
) -> None:
    store = Store(memory_backend)
    event = build_test_event("booking.created", tenant=None, now=NOW)
    outcome = AttemptOutcome(
        delivery_pk=0,
        attempt_no=1,
        started_at=NOW,
        duration_seconds=0.02,
        result=AttemptResult.HTTP_ERROR,
        status_code=500,
        error="HTTP 500",
        response_excerpt="boom",
        new_state=DeliveryState.PENDING,
        next_attempt_at=NOW + 10,
    )
    with pytest.raises(ValueError, match="never retried"):
        await store.record_test_send(event, "crm", "dlv_a", outcome)
    assert await store.list_deliveries(DeliveryFilter()) == []


def test_a_refused_ping_suggests_a_seed_event_type() -> None:
    from webhookd.send_test import _after_notes

    [note] = _after_notes(DEFAULT_EVENT_TYPE, http(400))
    assert "--event booking.created" in note
    assert _after_notes(DEFAULT_EVENT_TYPE, http(401)) == []
    assert _after_notes("booking.created", http(400)) == []
