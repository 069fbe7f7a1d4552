"""The seed's signature and the request headers of one attempt."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest

from webhookd import __version__
from webhookd.models import Endpoint
from webhookd.signing import (
    active_secrets,
    generate_secret,
    request_headers,
    seed_signature,
    standard_key,
)

BODY = b'{"event":"booking.created","timestamp":"2024-01-15T10:00:00Z","data":{"id":"book_1"}}'
RESERVED = ("Signature", "Event", "Delivery", "Timestamp")


def headers(**kwargs: object) -> dict[str, str]:
    args: dict[str, object] = {
        "header_prefix": "X-BookingScheduler",
        "secrets": ("whsec_test",),
        "body": BODY,
        "event_type": "booking.created",
        "delivery_id": "dlv_1",
        "timestamp": 1705312800,
    }
    if "secret" in kwargs:
        kwargs["secrets"] = (kwargs.pop("secret"),)
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


# -- Standard Webhooks and rotation ------------------------------------------------------------

KEY = bytes(range(32))
WHSEC = "whsec_" + base64.b64encode(KEY).decode()
OLD_KEY = bytes(range(100, 124))
OLD_WHSEC = "whsec_" + base64.b64encode(OLD_KEY).decode()


def _v1(key: bytes, msg_id: str, ts: int, body: bytes) -> str:
    digest = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def test_the_standard_scheme_signs_id_timestamp_and_body() -> None:
    got = headers(secrets=(WHSEC,), schemes=("standard",))
    assert got["webhook-id"] == "dlv_1"
    assert got["webhook-timestamp"] == "1705312800"
    assert got["webhook-signature"] == _v1(KEY, "dlv_1", 1705312800, BODY)
    assert "X-BookingScheduler-Signature" not in got
    assert got["X-BookingScheduler-Delivery"] == "dlv_1"


def test_both_schemes_at_once() -> None:
    got = headers(secrets=(WHSEC,), schemes=("seed", "standard"))
    assert got["X-BookingScheduler-Signature"] == seed_signature(WHSEC, BODY)
    assert got["webhook-signature"] == _v1(KEY, "dlv_1", 1705312800, BODY)


def test_during_rotation_the_seed_header_keeps_one_signature_and_standard_carries_two() -> None:
    got = headers(secrets=(WHSEC, OLD_WHSEC), schemes=("seed", "standard"))
    assert got["X-BookingScheduler-Signature"] == seed_signature(WHSEC, BODY)
    assert re.fullmatch(r"[0-9a-f]{64}", got["X-BookingScheduler-Signature"])
    assert got["X-BookingScheduler-Signature-Previous"] == seed_signature(OLD_WHSEC, BODY)
    assert got["webhook-signature"] == (
        _v1(KEY, "dlv_1", 1705312800, BODY) + " " + _v1(OLD_KEY, "dlv_1", 1705312800, BODY)
    )


def test_active_secrets_drop_the_previous_one_when_it_expires() -> None:
    ep = Endpoint(
        id="e",
        url="https://x.example/h",
        secret="new",
        previous_secret="old",
        previous_secret_expires_at=1000.0,
    )
    assert active_secrets(ep, 999.0) == ("new", "old")
    assert active_secrets(ep, 1000.0) == ("new",)
    assert active_secrets(Endpoint(id="e", url="https://x.example/h", secret="s"), 0) == ("s",)


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        ("not-whsec", "whsec_"),
        ("whsec_!!!", "base64"),
        ("whsec_" + base64.b64encode(b"x" * 23).decode(), "24-64 bytes"),
        ("whsec_" + base64.b64encode(b"x" * 65).decode(), "24-64 bytes"),
    ],
)
def test_standard_keys_must_be_whsec_with_24_to_64_bytes(secret: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        standard_key(secret)


def test_generated_secrets_suit_both_schemes_and_differ() -> None:
    a, b = generate_secret(), generate_secret()
    assert a != b
    assert len(standard_key(a)) == 32


def test_a_free_text_previous_secret_signs_only_the_seed_header() -> None:
    # An endpoint rotated off a legacy secret onto a whsec_ one, then given Standard Webhooks:
    # the old secret cannot key an HMAC there, so it rides in -Signature-Previous only.
    got = headers(secrets=(WHSEC, "legacy-secret"), schemes=("seed", "standard"))
    assert got["X-BookingScheduler-Signature-Previous"] == seed_signature("legacy-secret", BODY)
    assert got["webhook-signature"] == _v1(KEY, "dlv_1", 1705312800, BODY)
