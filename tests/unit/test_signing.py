"""The seed's signature and the request headers of one attempt."""

from __future__ import annotations

import hashlib
import hmac
import re

import pytest

from webhookd import __version__
from webhookd.signing import request_headers, seed_signature

BODY = b'{"event":"booking.created","timestamp":"2024-01-15T10:00:00Z","data":{"id":"book_1"}}'
RESERVED = ("Signature", "Event", "Delivery", "Timestamp")


def headers(**kwargs: object) -> dict[str, str]:
    args: dict[str, object] = {
        "header_prefix": "X-BookingScheduler",
        "secret": "whsec_test",
        "body": BODY,
        "event_type": "booking.created",
        "delivery_id": "dlv_1",
        "timestamp": 1705312800,
    }
    args.update(kwargs)
    return request_headers(**args)  # type: ignore[arg-type]


def test_a_published_hmac_sha256_vector() -> None:
    assert (
        seed_signature("key", b"The quick brown fox jumps over the lazy dog")
        == "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
    )


@pytest.mark.parametrize("secret", ["whsec_test", "clé-secrète", "x" * 200])
def test_the_seed_signature_is_64_lowercase_hex_of_hmac_sha256(secret: str) -> None:
    signature = seed_signature(secret, BODY)
    assert re.fullmatch(r"[0-9a-f]{64}", signature)
    assert signature == hmac.new(secret.encode("utf-8"), BODY, hashlib.sha256).hexdigest()


def test_every_request_carries_the_documented_headers() -> None:
    assert headers() == {
        "Content-Type": "application/json",
        "User-Agent": f"webhookd/{__version__}",
        "X-BookingScheduler-Signature": seed_signature("whsec_test", BODY),
        "X-BookingScheduler-Event": "booking.created",
        "X-BookingScheduler-Delivery": "dlv_1",
        "X-BookingScheduler-Timestamp": "1705312800",
    }


def test_the_header_prefix_is_configurable() -> None:
    got = headers(header_prefix="X-Acme")
    assert got["X-Acme-Signature"] == seed_signature("whsec_test", BODY)
    assert got["X-Acme-Event"] == "booking.created"
    assert got["X-Acme-Delivery"] == "dlv_1"
    assert got["X-Acme-Timestamp"] == "1705312800"
    assert not [name for name in got if name.lower().startswith("x-bookingscheduler")]


def test_the_same_inputs_give_the_same_headers() -> None:
    assert headers() == headers()
    assert headers(secret="other")["X-BookingScheduler-Signature"] != seed_signature(
        "whsec_test", BODY
    )


def test_extra_headers_are_sent() -> None:
    got = headers(extra=(("X-Team", "ops"), ("Authorization", "Bearer abc")))
    assert got["X-Team"] == "ops"
    assert got["Authorization"] == "Bearer abc"
    assert got["X-BookingScheduler-Signature"] == seed_signature("whsec_test", BODY)


@pytest.mark.parametrize("case", [str, str.lower, str.upper, str.swapcase])
@pytest.mark.parametrize("prefix", ["X-BookingScheduler", "X-Acme"])
def test_extra_headers_can_never_override_ours(prefix: str, case: object) -> None:
    assert callable(case)
    ours = [f"{prefix}-{name}" for name in RESERVED] + ["Content-Type", "User-Agent"]
    extra = tuple((case(name), "forged") for name in ours)
    got = headers(header_prefix=prefix, extra=(*extra, ("X-Other", "kept")))
    expected = headers(header_prefix=prefix)
    for name in ours:
        same_name = [k for k in got if k.lower() == name.lower()]
        assert same_name == [name], same_name
        assert got[name] == expected[name]
    assert "forged" not in got.values()
    assert got["X-Other"] == "kept"
