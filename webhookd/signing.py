"""Signatures and request headers. Pure: the same inputs always give the same headers.

Two schemes, chosen per endpoint (DESIGN.md, "Wire format"):

- ``seed``: ``{prefix}-Signature``, the lowercase hex HMAC-SHA256 of the body keyed with the
  secret string as UTF-8; exactly one signature, by the current secret. While a rotated-out
  secret is still valid its signature rides in ``{prefix}-Signature-Previous``.
- ``standard`` (Standard Webhooks): ``webhook-id``, ``webhook-timestamp`` and
  ``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``, keyed with the bytes
  of a ``whsec_<base64>`` secret; one ``v1,`` entry per valid secret, current first.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Sequence

from webhookd import __version__
from webhookd.models import Endpoint

USER_AGENT = f"webhookd/{__version__}"
SCHEMES = ("seed", "standard")
WHSEC_PREFIX = "whsec_"
MIN_KEY_BYTES = 24
MAX_KEY_BYTES = 64
GENERATED_KEY_BYTES = 32


def seed_signature(secret: str, body: bytes) -> str:
    """The seed scheme: lowercase hex HMAC-SHA256 of the body, key = the secret as UTF-8.

    Always 64 characters: the seed's verifier uses ``timingSafeEqual``, which throws on any
    other length.
    """
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def standard_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret; ValueError says what is wrong with it."""
    if not secret.startswith(WHSEC_PREFIX):
        raise ValueError(
            "the standard scheme needs a secret of the form whsec_<base64 of 24-64 random "
            "bytes>; `webhookd endpoints rotate-secret` makes one"
        )
    try:
        key = base64.b64decode(secret[len(WHSEC_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the part after whsec_ is not valid base64") from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(
            f"a whsec_ secret must hold {MIN_KEY_BYTES}-{MAX_KEY_BYTES} bytes, this one has "
            f"{len(key)}"
        )
    return key


def standard_signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` entry of the ``webhook-signature`` header."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def generate_secret() -> str:
    """A new secret that suits both schemes: ``whsec_`` + base64 of 32 random bytes."""
    return WHSEC_PREFIX + base64.b64encode(os.urandom(GENERATED_KEY_BYTES)).decode("ascii")


def active_secrets(endpoint: Endpoint, now: float) -> tuple[str, ...]:
    """The secrets that sign at ``now``: the current one, then a rotated-out one still in grace."""
    if (
        endpoint.previous_secret
        and endpoint.previous_secret_expires_at is not None
        and now < endpoint.previous_secret_expires_at
    ):
        return (endpoint.secret, endpoint.previous_secret)
    return (endpoint.secret,)


def _standard_keys(secrets: Sequence[str]) -> list[bytes]:
    """Keys of the secrets that are whsec_ keys. The current one always is (validated with the
    endpoint); a previous secret from before the endpoint used Standard Webhooks may not be,
    and then it signs the seed scheme's -Previous header only."""
    keys = [standard_key(secrets[0])]
    for secret in secrets[1:]:
        try:
            keys.append(standard_key(secret))
        except ValueError:
            continue
    return keys


def request_headers(
    *,
    header_prefix: str,
    secrets: Sequence[str],
    body: bytes,
    event_type: str,
    delivery_id: str,
    timestamp: int,
    schemes: Sequence[str] = ("seed",),
    extra: tuple[tuple[str, str], ...] = (),
) -> dict[str, str]:
    """Every header of one attempt. ``secrets``: current first, then the previous one if any.

    Extra headers come first and can never replace ours (compared without regard to case).
    """
    ours = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        f"{header_prefix}-Event": event_type,
        f"{header_prefix}-Delivery": delivery_id,
        f"{header_prefix}-Timestamp": str(timestamp),
    }
    if "seed" in schemes:
        ours[f"{header_prefix}-Signature"] = seed_signature(secrets[0], body)
        if len(secrets) > 1:
            ours[f"{header_prefix}-Signature-Previous"] = seed_signature(secrets[1], body)
    if "standard" in schemes:
        ours["webhook-id"] = delivery_id
        ours["webhook-timestamp"] = str(timestamp)
        ours["webhook-signature"] = " ".join(
            standard_signature(key, delivery_id, timestamp, body) for key in _standard_keys(secrets)
        )
    if not extra:
        return ours
    taken = {name.lower() for name in ours}
    headers = {name: value for name, value in extra if name.lower() not in taken}
    headers.update(ours)
    return headers
