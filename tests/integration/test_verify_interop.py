"""``webhookd.verify`` against the official ``standardwebhooks`` package from PyPI, both ways.

Theirs signs, ours verifies; ours (headers built as the design says webhookd sends them, and
as ``webhookd.signing`` builds them) signs, theirs verifies. Their verifier reads the real
clock, so timestamps here are the current time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks import Webhook, WebhookVerificationError

from webhookd.signing import request_headers
from webhookd.verify import VerificationError, verify, verify_standard

KEY = os.urandom(32)
WHSEC = "whsec_" + base64.b64encode(KEY).decode()
OLD_KEY = os.urandom(24)
OLD_WHSEC = "whsec_" + base64.b64encode(OLD_KEY).decode()
BODY = (
    '{"event":"payment.failed","timestamp":"2024-01-15T10:25:00Z","data":{"id":"pay_789",'
    '"errorMessage":"The card was declined \u2014 \u00e9\U0001f4b3","amount":9000}}'
).encode()
MSG_ID = "dlv_01HMXYZABCDEF"


def ours(*keys: bytes, msg_id: str = MSG_ID, body: bytes = BODY, ts: int) -> dict[str, str]:
    """The design's Standard Webhooks headers: webhook-id = delivery id, webhook-timestamp =
    attempt time, webhook-signature = one v1 entry per secret, current first."""
    entries = []
    for key in keys:
        digest = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
        entries.append("v1," + base64.b64encode(digest).decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": " ".join(entries),
    }


def theirs(secret: str, *, msg_id: str = MSG_ID, body: bytes = BODY, ts: int) -> dict[str, str]:
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(ts, UTC), body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": signature}


def now() -> int:
    return int(time.time())


# --------------------------------------------------------------------------- theirs → ours


def test_their_signature_verifies_with_ours() -> None:
    ts = now()
    envelope = verify(BODY, theirs(WHSEC, ts=ts), WHSEC)
    assert envelope["data"]["errorMessage"].endswith("\U0001f4b3")
    result = verify_standard(BODY, theirs(WHSEC, ts=ts), WHSEC)
    assert (result.message_id, result.timestamp) == (MSG_ID, ts)


def test_their_two_signatures_in_one_header_verify_with_either_of_our_secrets() -> None:
    ts = now()
    current, previous = theirs(WHSEC, ts=ts), theirs(OLD_WHSEC, ts=ts)
    headers = {
        **current,
        "webhook-signature": f"{current['webhook-signature']} {previous['webhook-signature']}",
    }
    assert verify_standard(BODY, headers, WHSEC).signature_index == 0
    assert verify_standard(BODY, headers, OLD_WHSEC).signature_index == 1
    with pytest.raises(VerificationError, match="check the signing secret"):
        verify_standard(BODY, headers, "whsec_" + base64.b64encode(os.urandom(32)).decode())


def test_their_signature_by_another_secret_fails_with_ours() -> None:
    with pytest.raises(VerificationError) as excinfo:
        verify(BODY, theirs(OLD_WHSEC, ts=now()), WHSEC)
    assert excinfo.value.reason == "signature_mismatch"


@settings(max_examples=150, deadline=None)
@given(
    key=st.binary(min_size=24, max_size=64),
    # Header values: visible ASCII (ids webhookd makes are far narrower).
    msg_id=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1),
    # No lone surrogates: their package decodes the body as strict UTF-8.
    text=st.text(st.characters(exclude_categories=["Cs"]), max_size=200),
    skew=st.integers(min_value=-290, max_value=290),
    bare=st.booleans(),
)
def test_any_request_they_sign_verifies_with_ours_and_a_tampered_one_does_not(
    key: bytes, msg_id: str, text: str, skew: int, bare: bool
) -> None:
    body = text.encode()
    encoded = base64.b64encode(key).decode()
    secret = encoded.rstrip("=") if bare else "whsec_" + encoded
    ts = now() + skew
    headers = theirs(secret, msg_id=msg_id, body=body, ts=ts)
    result = verify_standard(body, headers, secret, now=ts - skew)
    assert result.message_id == msg_id
    with pytest.raises(VerificationError):
        verify_standard(body + b"x", headers, secret, now=ts - skew)


# --------------------------------------------------------------------------- ours → theirs


def test_our_headers_verify_with_theirs() -> None:
    assert Webhook(WHSEC).verify(BODY, ours(KEY, ts=now()))["event"] == "payment.failed"


def test_our_two_signatures_during_a_rotation_verify_with_either_of_their_secrets() -> None:
    headers = ours(KEY, OLD_KEY, ts=now())
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert Webhook(WHSEC).verify(BODY, headers)["data"]["id"] == "pay_789"
    assert Webhook(OLD_WHSEC).verify(BODY, headers)["data"]["id"] == "pay_789"
    # ... and ours agrees on both, and on a third secret that signed neither.
    assert verify_standard(BODY, headers, OLD_WHSEC).by_previous_secret
    stranger = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(stranger).verify(BODY, headers)
    with pytest.raises(VerificationError):
        verify_standard(BODY, headers, stranger)


@pytest.mark.parametrize("skew", [-400, 400])
def test_both_refuse_a_timestamp_beyond_five_minutes(skew: int) -> None:
    headers = ours(KEY, ts=now() + skew)
    with pytest.raises(WebhookVerificationError, match=r"too (old|new)"):
        Webhook(WHSEC).verify(BODY, headers)
    with pytest.raises(VerificationError) as excinfo:
        verify_standard(BODY, headers, WHSEC)
    assert excinfo.value.reason == "timestamp_out_of_tolerance"


def test_what_webhookd_signing_sends_verifies_with_theirs_and_ours() -> None:
    """The sender's own header builder, both schemes, during a rotation grace period."""
    ts = now()
    headers = request_headers(
        header_prefix="X-BookingScheduler",
        secrets=(WHSEC, OLD_WHSEC),
        body=BODY,
        event_type="payment.failed",
        delivery_id=MSG_ID,
        timestamp=ts,
        schemes=("seed", "standard"),
    )
    assert headers["webhook-id"] == MSG_ID
    for secret in (WHSEC, OLD_WHSEC):
        assert Webhook(secret).verify(BODY, headers)["event"] == "payment.failed"
        assert verify(BODY, headers, secret)["event"] == "payment.failed"
        assert verify(BODY, headers, secret, scheme="seed")["event"] == "payment.failed"
