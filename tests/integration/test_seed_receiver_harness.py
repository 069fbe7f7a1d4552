"""The seed receiver harness runs the documentation's Node.js code as our users' receivers do.

These tests pin down what that code accepts, so webhookd's signing and body encoding are
checked against the real thing rather than against our reading of it. In particular the
seed's verifySignature signs ``JSON.stringify(req.body)``, not the raw request bytes: a body
is accepted only if it is exactly what JavaScript would serialize (compact separators, no
``\\uXXXX`` escapes for printable characters, numbers as JavaScript prints them, no duplicate
keys) and is sent as ``application/json``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import aiohttp
import pytest
from helpers import StartSeedReceiver

pytestmark = pytest.mark.node

SECRET = "whsec_test_harness_secret"
BOOKING_CREATED: dict[str, Any] = {
    "event": "booking.created",
    "timestamp": "2024-01-15T10:00:00Z",
    "data": {
        "id": "book_123",
        "experienceId": "exp_456",
        "experienceName": "City Walking Tour",
        "customerName": "John Doe",
        "startTime": "2024-02-15T14:00:00Z",
        "participants": 2,
        "status": "CONFIRMED",
        "totalAmount": 9000,
        "currency": "USD",
    },
}


def compact(value: object) -> bytes:
    """What JSON.stringify produces for simple values: compact, UTF-8, no ASCII escaping."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def post(
    url: str,
    body: bytes,
    signature: str | None,
    *,
    delivery_id: str = "dlv_1",
    content_type: str = "application/json",
) -> int:
    headers = {"Content-Type": content_type, "X-BookingScheduler-Delivery": delivery_id}
    if signature is not None:
        headers["X-BookingScheduler-Signature"] = signature
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as response,
    ):
        await response.read()
        return response.status


async def test_correctly_signed_post_is_accepted_and_recorded(
    seed_receiver: StartSeedReceiver,
) -> None:
    receiver = seed_receiver(SECRET)
    body = compact(BOOKING_CREATED)

    status = await post(receiver.url, body, sign(body))

    assert status == 200
    [record] = await receiver.wait_for(1)
    assert record["status"] == 200
    assert record["verified"] is True
    assert record["path"] == "/webhooks/bookingscheduler"
    assert record["body"] == BOOKING_CREATED
    assert record["headers"]["x-bookingscheduler-signature"] == sign(body)
    assert record["headers"]["x-bookingscheduler-delivery"] == "dlv_1"
    assert isinstance(record["received_at"], float)
    assert "New booking: book_123" in receiver.output()


async def test_signature_with_another_secret_is_rejected_with_401(
    seed_receiver: StartSeedReceiver,
) -> None:
    receiver = seed_receiver(SECRET)
    body = compact(BOOKING_CREATED)
    wrong = sign(body, secret="some-other-secret")
    assert len(wrong) == 64

    status = await post(receiver.url, body, wrong)

    assert status == 401
    [record] = await receiver.wait_for(1)
    assert record["status"] == 401
    assert record["verified"] is False
    assert record["body"] == BOOKING_CREATED


@pytest.mark.parametrize(
    "signature",
    [
        pytest.param("abc123", id="short-hex"),
        pytest.param("sha256=" + "0" * 64, id="prefixed"),
        pytest.param(None, id="header-missing"),
    ],
)
async def test_signature_not_64_chars_makes_the_seed_code_throw_500(
    seed_receiver: StartSeedReceiver, signature: str | None
) -> None:
    # crypto.timingSafeEqual throws on a length mismatch (Buffer.from(undefined) throws when
    # the header is missing); Express turns the exception into a 500, so such receivers ask
    # for retries rather than rejecting outright.
    receiver = seed_receiver(SECRET)
    body = compact(BOOKING_CREATED)

    status = await post(receiver.url, body, signature)

    assert status == 500
    [record] = await receiver.wait_for(1)
    assert record["status"] == 500
    assert record["verified"] is False


@pytest.mark.parametrize(
    ("raw", "javascript_form"),
    [
        pytest.param(b'{"a": 1.0}', b'{"a":1}', id="spaces-and-float"),
        pytest.param(b'{"name":"\\u00e9t\\u00e9"}', '{"name":"été"}'.encode(), id="ascii-escapes"),
        pytest.param(b'{"n":9007199254740993}', b'{"n":9007199254740992}', id="int-above-2**53"),
        pytest.param(b'{"n":1e3}', b'{"n":1000}', id="exponent"),
        pytest.param(b'{"a":1,"a":2}', b'{"a":2}', id="duplicate-keys"),
    ],
)
async def test_seed_verifies_json_stringify_of_the_parsed_body_not_the_raw_bytes(
    seed_receiver: StartSeedReceiver, raw: bytes, javascript_form: bytes
) -> None:
    receiver = seed_receiver(SECRET)

    signed_over_raw = await post(receiver.url, raw, sign(raw), delivery_id="raw")
    signed_over_js = await post(receiver.url, raw, sign(javascript_form), delivery_id="js")

    # Correctly signed bytes are rejected whenever they are not what JSON.stringify gives back:
    # webhookd must send JavaScript-canonical bodies.
    assert signed_over_raw == 401
    assert signed_over_js == 200
    records = await receiver.wait_for(2)
    assert [r["verified"] for r in records] == [False, True]


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        pytest.param("application/json; charset=utf-8", 200, id="json-with-charset"),
        pytest.param("text/plain", 401, id="text-plain"),
        pytest.param("application/octet-stream", 401, id="octet-stream"),
    ],
)
async def test_body_is_only_parsed_when_sent_as_json(
    seed_receiver: StartSeedReceiver, content_type: str, expected: int
) -> None:
    # express.json() leaves other content types unparsed (req.body is {}), so the seed then
    # verifies the signature of "{}" and rejects a correctly signed body.
    receiver = seed_receiver(SECRET)
    body = compact(BOOKING_CREATED)

    status = await post(receiver.url, body, sign(body), content_type=content_type)

    assert status == expected


async def test_response_plan_fails_the_first_requests_of_each_delivery(
    seed_receiver: StartSeedReceiver,
) -> None:
    receiver = seed_receiver(SECRET, response_plan={"fail_first": 2, "status": 503})
    body = compact(BOOKING_CREATED)

    first = [await post(receiver.url, body, sign(body), delivery_id="dlv_a") for _ in range(3)]
    second = [await post(receiver.url, body, sign(body), delivery_id="dlv_b") for _ in range(3)]

    assert first == [503, 503, 200]
    assert second == [503, 503, 200]
    records = await receiver.wait_for(6)
    assert [(r["headers"]["x-bookingscheduler-delivery"], r["status"]) for r in records] == [
        ("dlv_a", 503),
        ("dlv_a", 503),
        ("dlv_a", 200),
        ("dlv_b", 503),
        ("dlv_b", 503),
        ("dlv_b", 200),
    ]
    assert [r["verified"] for r in records] == [False, False, True] * 2
    assert [r["body"] for r in records] == [None, None, BOOKING_CREATED] * 2


async def test_receivers_are_independent_and_each_has_its_own_secret(
    seed_receiver: StartSeedReceiver,
) -> None:
    one = seed_receiver("secret-one")
    two = seed_receiver("secret-two")
    body = compact(BOOKING_CREATED)

    assert one.port != two.port
    assert await post(one.url, body, sign(body, "secret-one")) == 200
    assert await post(two.url, body, sign(body, "secret-one")) == 401
    assert [r["status"] for r in await one.wait_for(1)] == [200]
    assert [r["status"] for r in await two.wait_for(1)] == [401]
