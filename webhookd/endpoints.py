"""Endpoints: validation of URLs and headers, and the merged set from the config file and the
``webhook_endpoints`` table."""

from __future__ import annotations

import os
import re
import ssl
import stat
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from webhookd.errors import PayloadError, WebhookdError
from webhookd.events import normalize_timestamp, timestamp_to_unix
from webhookd.models import Endpoint
from webhookd.routing import parse_patterns, pattern_problem
from webhookd.settings import ENDPOINT_ID_PATTERN, HEADER_NAME_PATTERN, Settings
from webhookd.signing import SCHEMES, standard_key

MAX_URL_LENGTH = 2048
MAX_CA_BUNDLE_BYTES = 16 * 1024 * 1024
_ID_RE = re.compile(ENDPOINT_ID_PATTERN)
_HEADER_NAME_RE = re.compile(HEADER_NAME_PATTERN)
# Headers webhookd owns on every request; an endpoint's extra headers can never replace them.
_RESERVED_HEADERS = frozenset(
    {"content-type", "content-length", "user-agent", "host", "transfer-encoding", "connection"}
)
_RESERVED_PREFIXES = ("webhook-",)


def url_problem(url: str, *, allow_http: bool) -> str | None:
    """Why ``url`` cannot be an endpoint URL, or None."""
    if len(url) > MAX_URL_LENGTH:
        return f"url is longer than {MAX_URL_LENGTH} characters"
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        return "url must not contain spaces or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"url is not valid: {exc}"
    if parts.scheme not in ("https", "http"):
        shown = f"{parts.scheme}:" if parts.scheme else "no scheme"
        return f"url must start with https:// (got {shown})"
    if parts.scheme == "http" and not allow_http:
        return (
            "url uses plain http://; use https://, or set delivery.allow_http = true "
            "for trusted networks"
        )
    if not parts.hostname:
        return "url has no host name"
    if parts.username or parts.password:
        return "url must not contain credentials; use the endpoint's headers instead"
    if parts.fragment:
        return "url must not contain a #fragment"
    return None


class CABundleError(WebhookdError):
    """A CA bundle file cannot be loaded."""


def load_ca_bundle(path: str) -> ssl.SSLContext:
    """A verifying TLS context that trusts the CAs in the PEM file ``path`` (and no others,
    like ``curl --cacert``); :class:`CABundleError` says why it cannot be loaded."""
    try:
        info = os.stat(path)
        # Only a regular file of sane size: a FIFO or a device could block or never end.
        if not stat.S_ISREG(info.st_mode):
            reason = "not a regular file"
        elif info.st_size > MAX_CA_BUNDLE_BYTES:
            reason = f"larger than {MAX_CA_BUNDLE_BYTES // (1024 * 1024)} MiB"
        else:
            return ssl.create_default_context(cafile=path)
    except ssl.SSLError as exc:
        reason = f"no PEM certificate could be read from it ({exc.reason or exc})"
    except OSError as exc:
        reason = exc.strerror or str(exc)
    except ValueError as exc:  # e.g. an embedded NUL in a path from the table
        reason = str(exc)
    raise CABundleError(f"cannot load CA bundle {path!r}: {reason}")


def ca_bundle_problem(path: str) -> str | None:
    """Why ``path`` cannot be a CA bundle, or None."""
    if not Path(path).is_absolute():
        return f"ca_bundle {path!r} must be an absolute path"
    try:
        load_ca_bundle(path)
    except CABundleError as exc:
        return str(exc)
    return None


def header_problem(name: str, value: str) -> str | None:
    if not _HEADER_NAME_RE.fullmatch(name):
        return f"header name {name!r} is not a valid HTTP header name"
    if any(c in value for c in "\r\n\0"):
        return f"header {name!r} value must not contain line breaks"
    return None


def reserved_header_problem(name: str, header_prefix: str) -> str | None:
    lower = name.lower()
    if (
        lower in _RESERVED_HEADERS
        or lower.startswith(header_prefix.lower() + "-")
        or lower.startswith(_RESERVED_PREFIXES)
    ):
        return f"header {name!r} is set by webhookd and cannot be overridden"
    return None


def from_settings(settings: Settings) -> list[Endpoint]:
    """The static endpoints of the config file (already validated by the settings model)."""
    default_cap = settings.delivery.max_concurrency_per_endpoint
    out = []
    for ep in settings.endpoints:
        headers = tuple(ep.headers.items())
        problems = [
            p
            for p in (
                reserved_header_problem(k, settings.delivery.header_prefix) for k, _ in headers
            )
            if p
        ]
        out.append(
            Endpoint(
                id=ep.id,
                url=ep.url,
                secret=ep.secret_value(),
                events=ep.events,
                tenant=ep.tenant,
                enabled=ep.enabled,
                max_concurrency=ep.max_concurrency or default_cap,
                headers=headers,
                description=ep.description,
                source="config",
                problem="; ".join(problems) or None,
                schemes=tuple(ep.signature_schemes),
                previous_secret=ep.previous_secret_value(),
                previous_secret_expires_at=(
                    ep.previous_secret_expires_at.timestamp()
                    if ep.previous_secret_expires_at
                    else None
                ),
                ca_bundle=str(ep.ca_bundle) if ep.ca_bundle is not None else None,
            )
        )
    return out


def from_table_row(row: Mapping[str, object], settings: Settings) -> Endpoint:
    """An endpoint from a ``webhook_endpoints`` row. A row that breaks the rules still becomes an
    Endpoint, with ``problem`` set, so that it is visible in the CLI and never routed to."""
    problems: list[str] = []
    ep_id = str(row.get("id"))
    if not _ID_RE.fullmatch(ep_id):
        problems.append(f"id {ep_id!r} must match {ENDPOINT_ID_PATTERN}")
    url = str(row.get("url") or "")
    problem = url_problem(url, allow_http=settings.delivery.allow_http)
    if problem:
        problems.append(problem)
    secret = row.get("secret")
    if not isinstance(secret, str) or not secret.strip():
        problems.append("secret is empty")
        secret = ""
    try:
        events = tuple(parse_patterns(row.get("events")))
    except ValueError as exc:
        problems.append(str(exc))
        events = ()
    problems += [p for p in (pattern_problem(e) for e in events) if p]
    if not events:
        problems.append("events lists no pattern")
    cap = row.get("max_concurrency")
    if cap is None:
        max_concurrency = settings.delivery.max_concurrency_per_endpoint
    elif isinstance(cap, int) and 1 <= cap <= 1000:
        max_concurrency = cap
    else:
        problems.append(f"max_concurrency must be an integer from 1 to 1000, got {cap!r}")
        max_concurrency = 1
    headers: tuple[tuple[str, str], ...] = ()
    raw_headers = row.get("headers")
    if raw_headers:
        headers, header_problems = _parse_headers(raw_headers, settings.delivery.header_prefix)
        problems += header_problems
    schemes, previous, expires_at, signing_problems = _table_signing(row, secret)
    problems += signing_problems
    ca_bundle = row.get("ca_bundle")
    if ca_bundle in (None, ""):
        ca_bundle = None
    else:
        ca_bundle = str(ca_bundle)
        problem = ca_bundle_problem(ca_bundle)
        if problem:
            problems.append(problem)
    tenant = row.get("tenant")
    return Endpoint(
        id=ep_id,
        url=url,
        secret=secret,
        events=events,
        tenant=str(tenant) if tenant not in (None, "") else None,
        enabled=bool(row.get("enabled", 1)),
        max_concurrency=max_concurrency,
        headers=headers,
        description=str(row.get("description") or ""),
        source="table",
        problem="; ".join(problems) or None,
        schemes=schemes,
        previous_secret=previous,
        previous_secret_expires_at=expires_at,
        ca_bundle=ca_bundle,
    )


def _table_signing(
    row: Mapping[str, object], secret: str
) -> tuple[tuple[str, ...], str | None, float | None, list[str]]:
    """Schemes, previous secret and its expiry from a table row, and what is wrong with them."""
    problems = []
    raw = row.get("signature_schemes")
    try:
        # Same notation as ``events``: a JSON array, or names separated by commas/whitespace.
        schemes = tuple(parse_patterns(raw if raw not in (None, "") else "seed"))
    except ValueError:
        schemes = ()
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown or not schemes:
        problems.append(f"signature_schemes must list 'seed' and/or 'standard', got {raw!r}")
        schemes = tuple(s for s in schemes if s in SCHEMES) or ("seed",)
    previous = row.get("previous_secret")
    previous = previous if isinstance(previous, str) and previous.strip() else None
    expires_at: float | None = None
    raw_expiry = row.get("previous_secret_expires_at")
    if previous is not None and raw_expiry not in (None, ""):
        try:
            expires_at = timestamp_to_unix(normalize_timestamp(raw_expiry))
        except (PayloadError, ValueError):
            problems.append(f"previous_secret_expires_at {raw_expiry!r} is not an ISO-8601 time")
    if "standard" in schemes and secret:
        # Only the current secret must be a whsec_ key (see signing.request_headers).
        try:
            standard_key(secret)
        except ValueError as exc:
            problems.append(f"secret: {exc}")
    return schemes, previous, expires_at, problems


def _parse_headers(raw: object, prefix: str) -> tuple[tuple[tuple[str, str], ...], list[str]]:
    import json

    try:
        parsed = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return (), ["headers must be a JSON object of strings"]
    if not isinstance(parsed, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()
    ):
        return (), ["headers must be a JSON object of strings"]
    problems = [
        p
        for k, v in parsed.items()
        for p in (header_problem(k, v), reserved_header_problem(k, prefix))
        if p
    ]
    return tuple(parsed.items()), problems


def merge(static: Iterable[Endpoint], table: Iterable[Endpoint]) -> dict[str, Endpoint]:
    """Static endpoints win over table rows with the same id; the shadowed row gets a problem."""
    merged: dict[str, Endpoint] = {}
    for ep in static:
        merged[ep.id] = ep
    for ep in table:
        if ep.id in merged:
            continue
        merged[ep.id] = ep
    return merged


def shadowed(static: Iterable[Endpoint], table: Iterable[Endpoint]) -> list[Endpoint]:
    ids = {ep.id for ep in static}
    return [
        replace(ep, problem=f"id {ep.id!r} is also defined in the config file, which wins")
        for ep in table
        if ep.id in ids
    ]
