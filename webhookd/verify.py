"""Verifying webhookd's requests on the receiving side: what a Python receiver imports.

    from webhookd.verify import VerificationError, verify

    try:
        envelope = verify(raw_body, request_headers, secret)
    except VerificationError as exc:
        return 401, str(exc)

Two schemes, picked from the headers present (``scheme="auto"``):

- ``seed``: ``{prefix}-Signature`` is the lowercase hex HMAC-SHA256 of the body, keyed with the
  secret string as UTF-8. The seed's own Node.js verifier signs ``JSON.stringify(req.body)``,
  the body re-serialised after parsing; webhookd only sends JavaScript-canonical bodies, for
  which that re-serialisation gives back the very same bytes, so the HMAC of the raw body is the
  same value. ``canonical=True`` reproduces the Node code exactly instead. The seed scheme signs
  the body only: its timestamp and delivery headers are not covered, so it cannot detect a
  replay (deduplicate on ``{prefix}-Delivery``, or use Standard Webhooks).
- ``standard`` (https://www.standardwebhooks.com): ``webhook-signature`` holds space-separated
  ``v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">`` entries, keyed with
  the bytes of a ``whsec_<base64>`` secret; the signed timestamp must be within a tolerance of
  this machine's clock.

During a secret rotation webhookd signs with both its new and its old secret (the seed scheme
in ``{prefix}-Signature-Previous``, Standard Webhooks as a second ``v1,`` entry), so a receiver
that still holds only the old secret keeps verifying. A receiver may also pass a list of
secrets (new and old) while it switches. Accepting a signature by any secret the receiver holds
adds no forgery risk: a forger still needs one of those secrets.

Always verify the raw request body, before any JSON parsing. Error messages never contain a
secret or an expected signature. Pure: no I/O; the clock is read only when ``now`` is omitted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from webhookd.canonical_json import CanonicalJSONError, canonicalize
from webhookd.errors import WebhookdError

__all__ = [
    "DEFAULT_HEADER_PREFIX",
    "DEFAULT_TOLERANCE_SECONDS",
    "CaseInsensitiveHeaders",
    "SecretError",
    "Verification",
    "VerificationError",
    "detect_scheme",
    "headers_from_asgi_scope",
    "headers_from_wsgi_environ",
    "parse_envelope",
    "verify",
    "verify_seed",
    "verify_standard",
]

DEFAULT_HEADER_PREFIX = "X-BookingScheduler"
DEFAULT_TOLERANCE_SECONDS = 300  # Standard Webhooks' recommended five minutes
WHSEC_PREFIX = "whsec_"
STANDARD_ID_HEADER = "webhook-id"
STANDARD_TIMESTAMP_HEADER = "webhook-timestamp"
STANDARD_SIGNATURE_HEADER = "webhook-signature"
PREVIOUS_SUFFIX = "-Previous"

Scheme = Literal["seed", "standard"]
SchemeChoice = Literal["auto", "seed", "standard"]

_HEX_SIGNATURE_RE = re.compile(r"[0-9a-fA-F]{64}")
_TIMESTAMP_RE = re.compile(r"[0-9]{1,15}")
_SHA256_BYTES = 32
_RAW_BODY_HINT = (
    "and that you pass the raw request body, exactly as received (not JSON your framework "
    "parsed and serialised again)"
)


class VerificationError(WebhookdError, ValueError):
    """The request is not a genuine, current webhookd delivery: answer 401 and ignore it.

    ``reason`` is a stable code: ``missing_header``, ``malformed_header``,
    ``signature_mismatch``, ``timestamp_out_of_tolerance`` or ``invalid_body``.
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class SecretError(WebhookdError, ValueError):
    """The receiver's own secret is unusable (empty, or not a key for Standard Webhooks).

    A configuration problem of the receiver, not a bad request: deliberately not a
    VerificationError, so that it surfaces as a server error instead of a quiet 401.
    """


@dataclass(frozen=True, slots=True)
class Verification:
    """What a successful verification established. Only signed facts are reported."""

    scheme: Scheme
    header: str  # the header that held the matching signature
    signature_index: int  # 0: by the sender's current secret, 1+: by a rotated-out one
    secret_index: int  # which of the secrets passed in matched; 0 is the first
    message_id: str | None = None  # webhook-id (standard only: the seed scheme signs no id)
    timestamp: int | None = None  # webhook-timestamp (standard only)

    @property
    def by_previous_secret(self) -> bool:
        """Signed by the sender's rotated-out secret: switch to the new one soon."""
        return self.signature_index > 0


# --------------------------------------------------------------------------- headers


class CaseInsensitiveHeaders(Mapping[str, str]):
    """Read-only headers looked up without regard to case; repeated names joined with ", "."""

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: dict[str, tuple[str, str]] = {}
        for name, value in items:
            key = name.lower()
            if key in self._items:
                first_name, first_value = self._items[key]
                self._items[key] = (first_name, f"{first_value}, {value}")
            else:
                self._items[key] = (name, value)

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()][1]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({[v for v in self._items.values()]!r})"


def headers_from_wsgi_environ(environ: Mapping[str, Any]) -> CaseInsensitiveHeaders:
    """The request headers of a WSGI ``environ`` (``HTTP_X_FOO`` becomes ``X-Foo``)."""
    items: list[tuple[str, str]] = []
    for key, value in environ.items():
        if not isinstance(value, str):
            continue
        if key.startswith("HTTP_"):
            items.append((key[5:].replace("_", "-").title(), value))
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            items.append((key.replace("_", "-").title(), value))
    return CaseInsensitiveHeaders(items)


def headers_from_asgi_scope(scope: Mapping[str, Any]) -> CaseInsensitiveHeaders:
    """The request headers of an ASGI HTTP ``scope`` (byte pairs, decoded as Latin-1)."""
    return CaseInsensitiveHeaders(
        (bytes(name).decode("latin-1"), bytes(value).decode("latin-1"))
        for name, value in scope.get("headers", ())
    )


def _header(headers: Mapping[str, Any], name: str) -> str | None:
    """``name``'s value from any mapping of headers: plain dict in any case, a case-insensitive
    multidict (aiohttp, Starlette, Werkzeug), or a WSGI environ (``HTTP_...`` keys)."""
    value = headers.get(name)
    if value is None:
        lower = name.lower()
        cgi = "HTTP_" + name.upper().replace("-", "_")
        for key, candidate in headers.items():
            if isinstance(key, str) and (key.lower() == lower or key == cgi):
                value = candidate
                break
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("latin-1")
    elif isinstance(value, list | tuple):
        value = ", ".join(str(v) for v in value)
    if not isinstance(value, str):
        return None
    return value.strip()


def _require(headers: Mapping[str, Any], name: str, scheme_hint: str) -> str:
    value = _header(headers, name)
    if not value:
        state = "is empty" if value == "" else "is missing"
        raise VerificationError(
            "missing_header",
            f"header {name} {state}: {scheme_hint}, and that nothing between the sender and "
            "this code (proxy, framework) drops it",
        )
    return value


# --------------------------------------------------------------------------- secrets


def _secret_list(secret: str | Sequence[str]) -> list[str]:
    secrets = [secret] if isinstance(secret, str) else list(secret)
    if not secrets:
        raise SecretError("no secret given: pass the endpoint's signing secret (or a list)")
    for number, value in enumerate(secrets, 1):
        if not isinstance(value, str):
            raise SecretError(f"secret #{number} is a {type(value).__name__}, not a str")
        if not value.strip():
            raise SecretError(
                f"secret #{number} is empty: is the environment variable or file that should "
                "hold the signing secret set?"
            )
    return secrets


def _standard_key(secret: str, number: int) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret; as in the Standard Webhooks libraries, a
    bare base64 key without the prefix is accepted too, and missing padding is forgiven."""
    encoded = secret.strip()
    encoded = encoded.removeprefix(WHSEC_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SecretError(
            f"secret #{number} is not a Standard Webhooks secret: expected whsec_ followed by "
            "base64 (the secret webhookd shows for the endpoint)"
        ) from None
    if not key:
        raise SecretError(f"secret #{number} holds an empty key after whsec_")
    return key


# --------------------------------------------------------------------------- seed scheme


def verify_seed(
    body: bytes,
    headers: Mapping[str, str],
    secret: str | Sequence[str],
    *,
    header_prefix: str = DEFAULT_HEADER_PREFIX,
    allow_previous: bool = True,
    canonical: bool = False,
) -> Verification:
    """Check the seed scheme's ``{prefix}-Signature`` (and, if ``allow_previous``, the
    ``{prefix}-Signature-Previous`` sent during a rotation) against one or more secrets.

    ``canonical=True`` signs ``JSON.stringify(JSON.parse(body))`` as the seed's Node.js code
    does, instead of the raw body; for webhookd's bodies both give the same result.
    """
    secrets = _secret_list(secret)
    name = f"{header_prefix}-Signature"
    hint = (
        f"check that this endpoint uses the seed signature scheme with header prefix "
        f"{header_prefix!r}"
    )
    received = [(name, _seed_hex(name, _require(headers, name, hint)))]
    previous_name = name + PREVIOUS_SUFFIX
    previous = _header(headers, previous_name) if allow_previous else None
    if previous:
        received.append((previous_name, _seed_hex(previous_name, previous)))
    message = _canonical_body(body) if canonical else body
    for secret_index, value in enumerate(secrets):
        expected = hmac.new(value.encode("utf-8"), message, hashlib.sha256).hexdigest()
        for signature_index, (header, signature) in enumerate(received):
            if hmac.compare_digest(expected, signature):
                return Verification("seed", header, signature_index, secret_index)
    checked = " or ".join(header for header, _ in received)
    raise VerificationError(
        "signature_mismatch",
        f"{checked} does not match the body under {_count(len(secrets))}: check the signing "
        f"secret (the one configured for this endpoint in webhookd) {_RAW_BODY_HINT}",
    )


def _seed_hex(name: str, value: str) -> str:
    if _HEX_SIGNATURE_RE.fullmatch(value) is None:
        raise VerificationError(
            "malformed_header",
            f"header {name} is not a seed signature: expected 64 hexadecimal characters, got "
            f"{len(value)} characters{'' if value.isascii() else ' (not all ASCII)'}",
        )
    return value.lower()


def _canonical_body(body: bytes) -> bytes:
    try:
        return canonicalize(body).encode("utf-8")
    except CanonicalJSONError as exc:
        raise VerificationError(
            "invalid_body",
            f"canonical=True needs a JSON body that JavaScript reads without change: {exc}",
        ) from None


# --------------------------------------------------------------------------- standard webhooks


def verify_standard(
    body: bytes,
    headers: Mapping[str, str],
    secret: str | Sequence[str],
    *,
    tolerance_seconds: float | None = DEFAULT_TOLERANCE_SECONDS,
    now: float | datetime | None = None,
) -> Verification:
    """Check a Standard Webhooks request: any ``v1`` entry of ``webhook-signature`` by any of
    the secrets passes (entries of other versions are ignored), and ``webhook-timestamp`` must
    be within ``tolerance_seconds`` of ``now`` (default: this machine's clock; ``None``
    disables the check, e.g. for a captured request).
    """
    secrets = _secret_list(secret)
    keys = _standard_keys(secrets)
    hint = "check that this endpoint uses the Standard Webhooks signature scheme"
    message_id = _require(headers, STANDARD_ID_HEADER, hint)
    timestamp_text = _require(headers, STANDARD_TIMESTAMP_HEADER, hint)
    signatures = _v1_signatures(_require(headers, STANDARD_SIGNATURE_HEADER, hint))
    if _TIMESTAMP_RE.fullmatch(timestamp_text) is None:
        raise VerificationError(
            "malformed_header",
            f"header {STANDARD_TIMESTAMP_HEADER} is not a Unix time in whole seconds "
            f"({len(timestamp_text)} characters, expected digits only)",
        )
    signed = f"{message_id}.{timestamp_text}.".encode() + body
    match = _first_match(keys, signed, signatures)
    if match is None:
        raise VerificationError(
            "signature_mismatch",
            f"no signature in {STANDARD_SIGNATURE_HEADER} matches under {_count(len(keys))}: "
            f"check the signing secret (the whsec_ secret of this endpoint in webhookd) "
            f"{_RAW_BODY_HINT}",
        )
    timestamp = int(timestamp_text)
    if tolerance_seconds is not None:
        _check_timestamp(timestamp, tolerance_seconds, now)
    secret_index, signature_index = match
    return Verification(
        "standard",
        STANDARD_SIGNATURE_HEADER,
        signature_index,
        secret_index,
        message_id=message_id,
        timestamp=timestamp,
    )


def _v1_signatures(header: str) -> list[bytes]:
    """The decoded ``v1`` signatures; entries of other versions are skipped, per the spec.

    Entries are space-separated; a comma after an entry is tolerated, as when a proxy joined two
    headers with ", ".
    """
    found: list[bytes] = []
    versions: list[str] = []
    for entry in header.split():
        version, comma, encoded = entry.rstrip(",").partition(",")
        versions.append(version if comma else "?")
        if version != "v1" or not comma:
            continue
        try:
            digest = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(digest) == _SHA256_BYTES:
            found.append(digest)
    if not found:
        seen = ", ".join(sorted(set(versions))) or "none"
        raise VerificationError(
            "malformed_header",
            f"header {STANDARD_SIGNATURE_HEADER} holds no valid v1 signature (expected "
            f"space-separated 'v1,<base64 of 32 bytes>' entries; versions seen: {seen})",
        )
    return found


def _standard_keys(secrets: Sequence[str]) -> list[bytes | None]:
    """One key per secret, None for a secret that is not a Standard Webhooks key. A receiver
    mid-rotation may hold an old free-text secret (used for the seed scheme) beside its whsec_
    one; only when no secret at all is usable is that the receiver's configuration error."""
    keys: list[bytes | None] = []
    first_error: SecretError | None = None
    for number, value in enumerate(secrets, 1):
        try:
            keys.append(_standard_key(value, number))
        except SecretError as exc:
            keys.append(None)
            first_error = first_error or exc
    if first_error is not None and not any(keys):
        raise first_error
    return keys


def _first_match(
    keys: Sequence[bytes | None], signed: bytes, signatures: Sequence[bytes]
) -> tuple[int, int] | None:
    for key_index, key in enumerate(keys):
        if key is None:
            continue
        expected = hmac.new(key, signed, hashlib.sha256).digest()
        for signature_index, signature in enumerate(signatures):
            if hmac.compare_digest(expected, signature):
                return key_index, signature_index
    return None


def _check_timestamp(
    timestamp: int, tolerance_seconds: float, now: float | datetime | None
) -> None:
    if now is None:
        current = time.time()
    elif isinstance(now, datetime):
        current = now.timestamp()
    else:
        current = float(now)
    skew = current - timestamp
    if abs(skew) <= tolerance_seconds:
        return
    if skew > 0:
        what = f"{_seconds(skew)} old"
        cause = "a replayed or long-delayed request, or a slow clock on this machine"
    else:
        what = f"{_seconds(-skew)} in the future"
        cause = "a fast clock on this machine, or on the sender's"
    raise VerificationError(
        "timestamp_out_of_tolerance",
        f"the signature is valid but {STANDARD_TIMESTAMP_HEADER} {timestamp} is {what}, beyond "
        f"the tolerance of {_seconds(tolerance_seconds)}: {cause}; check that this machine's "
        "clock is synchronised (NTP), and do not accept replayed requests",
    )


# --------------------------------------------------------------------------- either scheme


def detect_scheme(
    headers: Mapping[str, str], *, header_prefix: str = DEFAULT_HEADER_PREFIX
) -> Scheme:
    """``standard`` if a ``webhook-signature`` header is present, else ``seed``."""
    if _header(headers, STANDARD_SIGNATURE_HEADER) is not None:
        return "standard"
    if _header(headers, f"{header_prefix}-Signature") is not None:
        return "seed"
    raise VerificationError(
        "missing_header",
        f"no signature header: expected {STANDARD_SIGNATURE_HEADER} (Standard Webhooks) or "
        f"{header_prefix}-Signature (seed scheme); check the header prefix configured for this "
        "endpoint, and that nothing between the sender and this code (proxy, framework) drops "
        "these headers",
    )


def verify(
    body: bytes,
    headers: Mapping[str, str],
    secret: str | Sequence[str],
    *,
    scheme: SchemeChoice = "auto",
    header_prefix: str = DEFAULT_HEADER_PREFIX,
    allow_previous: bool = True,
    canonical: bool = False,
    tolerance_seconds: float | None = DEFAULT_TOLERANCE_SECONDS,
    now: float | datetime | None = None,
) -> dict[str, Any]:
    """Verify a request under ``scheme`` (``auto``: by the headers present) and return its
    parsed JSON envelope (``event``, ``timestamp``, ``data``). Raises VerificationError."""
    chosen = detect_scheme(headers, header_prefix=header_prefix) if scheme == "auto" else scheme
    if chosen == "standard":
        verify_standard(body, headers, secret, tolerance_seconds=tolerance_seconds, now=now)
    elif chosen == "seed":
        verify_seed(
            body,
            headers,
            secret,
            header_prefix=header_prefix,
            allow_previous=allow_previous,
            canonical=canonical,
        )
    else:
        raise ValueError(f"scheme must be 'auto', 'seed' or 'standard', not {scheme!r}")
    return parse_envelope(body)


def parse_envelope(body: bytes) -> dict[str, Any]:
    """The JSON object of a verified body; VerificationError if it is not one."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise VerificationError(
            "invalid_body",
            "the signature is valid but the body is not a JSON object: check that the body "
            "passed in is the request body, whole",
        )
    return value


def _count(n: int) -> str:
    return "the secret given" if n == 1 else f"any of the {n} secrets given"


def _seconds(value: float) -> str:
    """Whole seconds (rounded up, so that a value just over a limit never reads as the limit),
    with a rougher unit alongside for long spans."""
    whole = math.ceil(value)
    if whole < 600:
        return f"{whole} s"
    if whole < 7200:
        return f"{whole} s ({whole / 60:.0f} min)"
    if whole < 172800:
        return f"{whole} s ({whole / 3600:.1f} h)"
    return f"{whole} s ({whole / 86400:.1f} days)"
