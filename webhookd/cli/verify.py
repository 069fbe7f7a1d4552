"""``webhookd verify``: check a captured request the way a receiver would, to debug a 401.

    webhookd verify --secret-file secret.txt --headers headers.txt --body body.json

Prints one line, ``valid: ...`` or ``INVALID: ...``; exit code 0 valid, 1 invalid, 2 usage
error. The secret is never printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from webhookd.verify import (
    DEFAULT_HEADER_PREFIX,
    DEFAULT_TOLERANCE_SECONDS,
    CaseInsensitiveHeaders,
    Scheme,
    SecretError,
    Verification,
    VerificationError,
    detect_scheme,
    parse_envelope,
    verify_seed,
    verify_standard,
)

EXIT_VALID = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """An input file is missing or unreadable; the message says which and why."""


def add_verify_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common_parents: Sequence[argparse.ArgumentParser] = (),
) -> argparse.ArgumentParser:
    """Add the ``verify`` command to ``subparsers``; its ``func`` default is ``cmd_verify``."""
    description = (
        "Check a captured webhook request (headers and raw body) against a signing secret, as "
        "a receiver would. Exit code: 0 valid, 1 invalid, 2 usage error."
    )
    p = subparsers.add_parser(
        "verify",
        help="check the signature of a captured webhook request",
        description=description,
        parents=list(common_parents),
    )
    p.set_defaults(func=cmd_verify)
    p.add_argument(
        "--secret-file",
        required=True,
        type=Path,
        metavar="FILE",
        help="file holding the signing secret; several lines = several secrets to try "
        "(e.g. new and old during a rotation)",
    )
    p.add_argument(
        "--headers",
        required=True,
        type=Path,
        metavar="FILE",
        help="the request's headers: 'Name: value' lines (raw HTTP, curl -D or curl -v '> ' "
        "output) or a JSON object",
    )
    p.add_argument(
        "--body",
        required=True,
        metavar="FILE",
        help="the raw request body, byte for byte ('-' reads standard input)",
    )
    p.add_argument(
        "--scheme",
        choices=["auto", "seed", "standard"],
        default="auto",
        help="signature scheme (default auto: standard if webhook-signature is present)",
    )
    tolerance = p.add_mutually_exclusive_group()
    tolerance.add_argument(
        "--tolerance",
        type=_non_negative_seconds,
        default=DEFAULT_TOLERANCE_SECONDS,
        metavar="SECONDS",
        help=f"Standard Webhooks: accepted clock difference (default {DEFAULT_TOLERANCE_SECONDS})",
    )
    tolerance.add_argument(
        "--no-tolerance",
        dest="tolerance",
        action="store_const",
        const=None,
        help="do not check the timestamp (for a request captured a while ago)",
    )
    p.add_argument(
        "--header-prefix",
        default=DEFAULT_HEADER_PREFIX,
        metavar="PREFIX",
        help=f"seed scheme header prefix (default {DEFAULT_HEADER_PREFIX})",
    )
    p.add_argument(
        "--canonical",
        action="store_true",
        help="seed scheme: sign JSON.stringify(JSON.parse(body)) as the seed's Node.js code "
        "does, instead of the raw body",
    )
    p.add_argument(
        "--no-previous",
        dest="allow_previous",
        action="store_false",
        help="seed scheme: ignore the -Signature-Previous header sent during a rotation",
    )
    return p


def _non_negative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite, non-negative number")
    return value


def cmd_verify(args: argparse.Namespace) -> int:
    """Run ``webhookd verify``: print one verdict line and return the exit code."""
    try:
        secrets = read_secrets(args.secret_file)
        headers = read_headers(args.headers)
        body = _read_body(args.body)
    except UsageError as exc:
        print(f"webhookd verify: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        scheme: Scheme = (
            detect_scheme(headers, header_prefix=args.header_prefix)
            if args.scheme == "auto"
            else args.scheme
        )
        result = _check(scheme, body, headers, secrets, args)
        envelope = parse_envelope(body)
    except SecretError as exc:
        print(f"webhookd verify: error: {exc} (in {args.secret_file})", file=sys.stderr)
        return EXIT_USAGE
    except VerificationError as exc:
        print(f"INVALID: {exc}{_hint(exc, body, args)}")
        return EXIT_INVALID
    print(_verdict(result, len(secrets), envelope, headers, args.header_prefix))
    return EXIT_VALID


def _check(
    scheme: Scheme,
    body: bytes,
    headers: CaseInsensitiveHeaders,
    secrets: list[str],
    args: argparse.Namespace,
) -> Verification:
    if scheme == "standard":
        return verify_standard(body, headers, secrets, tolerance_seconds=args.tolerance)
    return verify_seed(
        body,
        headers,
        secrets,
        header_prefix=args.header_prefix,
        allow_previous=args.allow_previous,
        canonical=args.canonical,
    )


def _hint(exc: VerificationError, body: bytes, args: argparse.Namespace) -> str:
    """A hint that only makes sense for a captured request."""
    if exc.reason == "timestamp_out_of_tolerance":
        return " (for a request captured a while ago, use --no-tolerance)"
    if exc.reason == "signature_mismatch" and body.endswith((b"\n", b"\r")):
        return (
            f" (note: {args.body} ends with a line break, which webhookd's bodies never do; "
            "was it added when the body was saved?)"
        )
    return ""


def _verdict(
    result: Verification,
    n_secrets: int,
    envelope: dict[str, Any],
    headers: CaseInsensitiveHeaders,
    header_prefix: str,
) -> str:
    kind = "seed signature" if result.scheme == "seed" else "Standard Webhooks signature"
    sender_key = "previous" if result.by_previous_secret else "current"
    line = f"valid: {kind} by the {sender_key} secret"
    if n_secrets > 1:
        line += f" (secret {result.secret_index + 1} of {n_secrets} in the secret file)"
    if result.by_previous_secret:
        line += (
            f" in {result.header}: the sender has rotated its secret; switch to the new one "
            "before its grace period ends"
        )
    details = []
    event = envelope.get("event")
    if isinstance(event, str):
        details.append(f"event {event}")
    delivery = result.message_id or headers.get(f"{header_prefix}-Delivery")
    if delivery:
        details.append(f"delivery {delivery}")
    if result.timestamp is not None:
        details.append(f"signed at {result.timestamp}")
    return line + (f"; {', '.join(details)}" if details else "")


# --------------------------------------------------------------------------- input files


def read_secrets(path: Path) -> list[str]:
    """The secrets in ``path``: one per non-blank line, surrounding whitespace removed."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read the secret file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"the secret file {path} is not UTF-8 text") from None
    secrets = [line.strip() for line in text.splitlines() if line.strip()]
    if not secrets:
        raise UsageError(f"the secret file {path} is empty")
    return secrets


def read_headers(path: Path) -> CaseInsensitiveHeaders:
    """Captured request headers: a JSON object (or list of [name, value] pairs), or
    ``Name: value`` lines as in raw HTTP, ``curl -D`` or the ``> `` lines of ``curl -v`` (a
    request or status line is skipped, and reading stops at the blank line ending the headers).
    """
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"cannot read the headers file {path}: {exc.strerror or exc}") from None
    if text.lstrip().startswith(("{", "[")):
        return _json_headers(text, path)
    items: list[tuple[str, str]] = []
    started = False
    for raw_line in text.splitlines():
        line = raw_line.removeprefix("> ")
        if not line.strip():
            if started:
                break  # the body (or the next message) follows the blank line
            continue
        if line[0] in " \t" and items:  # an obsolete folded continuation line
            name, value = items[-1]
            items[-1] = (name, f"{value} {line.strip()}")
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or " " in name:
            if not started:
                continue  # a request line ("POST /hook HTTP/1.1") or status line
            raise UsageError(f"{path}: {raw_line[:60]!r} is not a 'Name: value' header line")
        started = True
        items.append((name, value.strip()))
    if not items:
        raise UsageError(f"no headers found in {path}: expected 'Name: value' lines or JSON")
    return CaseInsensitiveHeaders(items)


def _json_headers(text: str, path: Path) -> CaseInsensitiveHeaders:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}") from None
    if isinstance(value, list) and all(_is_pair(pair) for pair in value):
        value = [(str(name), item) for name, item in value]
    elif isinstance(value, dict):
        value = list(value.items())
    else:
        raise UsageError(
            f"{path}: expected a JSON object of header names to values, or a list of "
            "[name, value] pairs"
        )
    items: list[tuple[str, str]] = []
    for name, item in value:
        values = item if isinstance(item, list) else [item]
        for one in values:
            if isinstance(one, bool) or not isinstance(one, str | int):
                raise UsageError(f"{path}: the value of {name!r} is not a string")
            items.append((name, str(one)))
    return CaseInsensitiveHeaders(items)


def _is_pair(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def _read_body(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the body file {name}: {exc.strerror or exc}") from None
