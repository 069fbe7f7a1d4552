"""Signatures and request headers. Pure: the same inputs always give the same headers."""

from __future__ import annotations

import hashlib
import hmac

from webhookd import __version__

USER_AGENT = f"webhookd/{__version__}"


def seed_signature(secret: str, body: bytes) -> str:
    """The seed scheme: lowercase hex HMAC-SHA256 of the body, key = the secret as UTF-8.

    Always 64 characters: the seed's verifier uses ``timingSafeEqual``, which throws on any
    other length.
    """
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def request_headers(
    *,
    header_prefix: str,
    secret: str,
    body: bytes,
    event_type: str,
    delivery_id: str,
    timestamp: int,
    extra: tuple[tuple[str, str], ...] = (),
) -> dict[str, str]:
    """Every header of one attempt. Extra headers come first and can never replace ours."""
    ours = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        f"{header_prefix}-Signature": seed_signature(secret, body),
        f"{header_prefix}-Event": event_type,
        f"{header_prefix}-Delivery": delivery_id,
        f"{header_prefix}-Timestamp": str(timestamp),
    }
    if not extra:
        return ours
    taken = {name.lower() for name in ours}
    headers = {name: value for name, value in extra if name.lower() not in taken}
    headers.update(ours)
    return headers
