"""The receiver-side helper ``webhookd.verify`` and the ``webhookd verify`` command.

Requests are signed here by hand, following the wire format of the design (not with
``webhookd.signing``), so that a change on the sending side cannot hide a broken verifier.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict

from webhookd.cli import main
from webhookd.errors import WebhookdError
from webhookd.verify import (
    CaseInsensitiveHeaders,
    SecretError,
    VerificationError,
    headers_from_asgi_scope,
    headers_from_wsgi_environ,
    parse_envelope,
    verify,
    verify_seed,
    verify_standard,
)

SEED_SECRET = "seed-signing-secret-do-not-print"
OLD_SEED_SECRET = "the-rotated-out-seed-secret"
KEY = bytes(range(1, 33))
WHSEC = "whsec_" + base64.b64encode(KEY).decode()
OLD_KEY = bytes(range(101, 133))
OLD_WHSEC = "whsec_" + base64.b64encode(OLD_KEY).decode()
NOW = 1_705_312_800
MSG_ID = "dlv_01HMXYZ"
BODY = (
    b'{"event":"booking.created","timestamp":"2024-01-15T10:00:00Z","data":{"id":"book_123",'
    b'"customerName":"Jos\xc3\xa9 \xf0\x9f\x8e\x89","totalAmount":9000,"ratio":1e+21}}'
)
PREFIX = "X-BookingScheduler"


def seed_hex(secret: str, body: bytes = BODY) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def seed_headers(*secrets: str, body: bytes = BODY, prefix: str = PREFIX) -> dict[str, str]:
    """What webhookd sends under the seed scheme: current secret, then a previous one if any."""
    headers = {
        "Content-Type": "application/json",
        f"{prefix}-Event": "booking.created",
        f"{prefix}-Delivery": MSG_ID,
        f"{prefix}-Timestamp": str(NOW),
        f"{prefix}-Signature": seed_hex(secrets[0], body),
    }
    if len(secrets) > 1:
        headers[f"{prefix}-Signature-Previous"] = seed_hex(secrets[1], body)
    return headers


def v1(key: bytes, body: bytes = BODY, msg_id: str = MSG_ID, ts: int | str = NOW) -> str:
    digest = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def standard_headers(*keys: bytes, body: bytes = BODY, ts: int = NOW) -> dict[str, str]:
    return {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(ts),
        "webhook-signature": " ".join(v1(key, body, ts=ts) for key in keys),
    }


def reason_of(excinfo: pytest.ExceptionInfo[VerificationError]) -> str:
    return excinfo.value.reason


# --------------------------------------------------------------------------- seed scheme


def test_a_seed_signature_by_the_secret_verifies() -> None:
    result = verify_seed(BODY, seed_headers(SEED_SECRET), SEED_SECRET)
    assert result.scheme == "seed"
    assert result.header == f"{PREFIX}-Signature"
    assert not result.by_previous_secret


def test_a_seed_signature_by_another_secret_says_to_check_the_secret() -> None:
    with pytest.raises(VerificationError, match="check the signing secret") as excinfo:
        verify_seed(BODY, seed_headers(SEED_SECRET), "some-other-secret")
    assert reason_of(excinfo) == "signature_mismatch"


@pytest.mark.parametrize(
    "tampered",
    [
        BODY.replace(b"9000", b"9001"),
        BODY + b"\n",
        b" " + BODY,
        json.dumps(json.loads(BODY)).encode(),  # parsed and serialised again by Python
    ],
    ids=["value", "trailing-newline", "leading-space", "python-reserialised"],
)
def test_any_change_to_the_body_fails_the_seed_signature(tampered: bytes) -> None:
    with pytest.raises(VerificationError, match="raw request body") as excinfo:
        verify_seed(tampered, seed_headers(SEED_SECRET), SEED_SECRET)
    assert reason_of(excinfo) == "signature_mismatch"


def test_a_missing_seed_signature_header_is_named() -> None:
    headers = seed_headers(SEED_SECRET)
    del headers[f"{PREFIX}-Signature"]
    with pytest.raises(VerificationError, match=f"{PREFIX}-Signature is missing") as excinfo:
        verify_seed(BODY, headers, SEED_SECRET)
    assert reason_of(excinfo) == "missing_header"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("abc", "got 3 characters"),
        ("sha256=" + "a" * 64, "got 71 characters"),
        ("g" * 64, "got 64 characters"),
        ("\u00e9" * 64, "not all ASCII"),
    ],
)
def test_a_malformed_seed_signature_says_what_was_expected(value: str, expected: str) -> None:
    headers = {f"{PREFIX}-Signature": value}
    with pytest.raises(VerificationError, match="expected 64 hexadecimal") as excinfo:
        verify_seed(BODY, headers, SEED_SECRET)
    assert expected in str(excinfo.value)
    assert reason_of(excinfo) == "malformed_header"


def test_an_uppercase_hex_signature_is_the_same_signature() -> None:
    headers = {f"{PREFIX}-Signature": seed_hex(SEED_SECRET).upper()}
    assert verify_seed(BODY, headers, SEED_SECRET).scheme == "seed"


def test_the_header_prefix_is_configurable() -> None:
    headers = seed_headers(SEED_SECRET, prefix="X-Acme")
    assert verify_seed(BODY, headers, SEED_SECRET, header_prefix="X-Acme").scheme == "seed"
    with pytest.raises(VerificationError, match=f"{PREFIX}-Signature is missing"):
        verify_seed(BODY, headers, SEED_SECRET)


def test_a_receiver_mid_rotation_can_pass_its_new_and_old_secrets() -> None:
    # The sender already signs with the new secret; the receiver lists both.
    result = verify_seed(BODY, seed_headers(SEED_SECRET), [OLD_SEED_SECRET, SEED_SECRET])
    assert result.secret_index == 1
    assert not result.by_previous_secret


def test_a_receiver_with_only_the_old_secret_verifies_the_previous_signature() -> None:
    headers = seed_headers(SEED_SECRET, OLD_SEED_SECRET)
    result = verify_seed(BODY, headers, OLD_SEED_SECRET)
    assert result.header == f"{PREFIX}-Signature-Previous"
    assert result.by_previous_secret
    assert verify_seed(BODY, headers, SEED_SECRET).header == f"{PREFIX}-Signature"


def test_the_previous_signature_can_be_refused() -> None:
    headers = seed_headers(SEED_SECRET, OLD_SEED_SECRET)
    with pytest.raises(VerificationError, match="does not match"):
        verify_seed(BODY, headers, OLD_SEED_SECRET, allow_previous=False)


def test_a_previous_signature_by_an_unknown_secret_does_not_pass() -> None:
    headers = seed_headers("attacker-secret", "attacker-old-secret")
    with pytest.raises(VerificationError) as excinfo:
        verify_seed(BODY, headers, [SEED_SECRET, OLD_SEED_SECRET])
    assert f"{PREFIX}-Signature or {PREFIX}-Signature-Previous" in str(excinfo.value)
    assert "any of the 2 secrets" in str(excinfo.value)


def test_canonical_mode_signs_what_javascript_would_reserialise() -> None:
    # The seed's Node code signs JSON.stringify(req.body): for a pretty-printed body that is the
    # compact form, so the raw-body check fails while the canonical one passes.
    pretty = json.dumps(json.loads(BODY), indent=2, ensure_ascii=False).encode()
    compact_js = BODY  # BODY is already JavaScript-canonical
    headers = {f"{PREFIX}-Signature": seed_hex(SEED_SECRET, compact_js)}
    assert verify_seed(pretty, headers, SEED_SECRET, canonical=True).scheme == "seed"
    with pytest.raises(VerificationError):
        verify_seed(pretty, headers, SEED_SECRET)


def test_for_canonical_bodies_both_modes_agree() -> None:
    headers = seed_headers(SEED_SECRET)
    assert verify_seed(BODY, headers, SEED_SECRET, canonical=True).scheme == "seed"
    assert verify_seed(BODY, headers, SEED_SECRET, canonical=False).scheme == "seed"


def test_canonical_mode_on_a_body_that_is_not_json_says_so() -> None:
    body = b"not json"
    headers = {f"{PREFIX}-Signature": seed_hex(SEED_SECRET, body)}
    with pytest.raises(VerificationError, match="canonical=True needs a JSON body") as excinfo:
        verify_seed(body, headers, SEED_SECRET, canonical=True)
    assert reason_of(excinfo) == "invalid_body"


# --------------------------------------------------------------------------- standard webhooks


def test_a_standard_signature_verifies_with_the_signed_id_and_timestamp() -> None:
    result = verify_standard(BODY, standard_headers(KEY), WHSEC, now=NOW)
    assert (result.scheme, result.message_id, result.timestamp) == ("standard", MSG_ID, NOW)
    assert not result.by_previous_secret


def test_a_bare_base64_key_without_whsec_is_accepted() -> None:
    bare = base64.b64encode(KEY).decode()
    assert verify_standard(BODY, standard_headers(KEY), bare, now=NOW).scheme == "standard"
    unpadded = base64.b64encode(KEY[:31]).decode().rstrip("=")
    assert verify_standard(BODY, standard_headers(KEY[:31]), unpadded, now=NOW)


def test_a_standard_signature_by_another_secret_fails() -> None:
    with pytest.raises(VerificationError, match="check the signing secret") as excinfo:
        verify_standard(BODY, standard_headers(OLD_KEY), WHSEC, now=NOW)
    assert reason_of(excinfo) == "signature_mismatch"


@pytest.mark.parametrize("field", ["body", "webhook-id", "webhook-timestamp"])
def test_the_id_and_timestamp_are_signed_with_the_body(field: str) -> None:
    headers = standard_headers(KEY)
    body = BODY
    if field == "body":
        body = BODY.replace(b"book_123", b"book_124")
    elif field == "webhook-id":
        headers["webhook-id"] = "dlv_other"
    else:
        headers["webhook-timestamp"] = str(NOW + 1)
    with pytest.raises(VerificationError) as excinfo:
        verify_standard(body, headers, WHSEC, now=NOW)
    assert reason_of(excinfo) == "signature_mismatch"


def test_two_signatures_in_one_header_pass_with_either_secret() -> None:
    headers = standard_headers(KEY, OLD_KEY)  # during a rotation: current first
    assert verify_standard(BODY, headers, WHSEC, now=NOW).signature_index == 0
    result = verify_standard(BODY, headers, OLD_WHSEC, now=NOW)
    assert result.by_previous_secret
    assert result.signature_index == 1


def test_a_list_of_secrets_matches_any() -> None:
    result = verify_standard(BODY, standard_headers(KEY), [OLD_WHSEC, WHSEC], now=NOW)
    assert result.secret_index == 1


def test_entries_with_unknown_versions_are_ignored() -> None:
    headers = standard_headers(KEY)
    headers["webhook-signature"] = "v1a,c29tZXRoaW5n v2,xyz " + headers["webhook-signature"]
    assert verify_standard(BODY, headers, WHSEC, now=NOW).signature_index == 0


def test_a_header_with_only_unknown_versions_is_malformed() -> None:
    headers = standard_headers(KEY)
    headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v1a,")
    with pytest.raises(VerificationError, match=r"no valid v1 signature.*v1a") as excinfo:
        verify_standard(BODY, headers, WHSEC, now=NOW)
    assert reason_of(excinfo) == "malformed_header"


@pytest.mark.parametrize(
    "signature",
    ["", "garbage", "v1,", "v1,not base64!", "v1," + base64.b64encode(b"short").decode()],
)
def test_malformed_standard_signatures_are_refused(signature: str) -> None:
    headers = {**standard_headers(KEY), "webhook-signature": signature}
    with pytest.raises(VerificationError) as excinfo:
        verify_standard(BODY, headers, WHSEC, now=NOW)
    assert reason_of(excinfo) in ("malformed_header", "missing_header")


def test_signatures_joined_with_a_comma_by_a_proxy_still_verify() -> None:
    headers = CaseInsensitiveHeaders(
        [
            ("webhook-id", MSG_ID),
            ("webhook-timestamp", str(NOW)),
            ("webhook-signature", v1(OLD_KEY)),
            ("webhook-signature", v1(KEY)),
        ]
    )
    assert headers["Webhook-Signature"] == f"{v1(OLD_KEY)}, {v1(KEY)}"
    assert verify_standard(BODY, headers, WHSEC, now=NOW).signature_index == 1


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_each_missing_standard_header_is_named(missing: str) -> None:
    headers = standard_headers(KEY)
    del headers[missing]
    with pytest.raises(VerificationError, match=f"header {missing} is missing") as excinfo:
        verify_standard(BODY, headers, WHSEC, now=NOW)
    assert reason_of(excinfo) == "missing_header"


@pytest.mark.parametrize("timestamp", ["1705312800.5", "-1", "soon", "+1705312800", "1_705"])
def test_a_timestamp_that_is_not_whole_seconds_is_malformed(timestamp: str) -> None:
    headers = {**standard_headers(KEY), "webhook-timestamp": timestamp}
    headers["webhook-signature"] = v1(KEY, ts=timestamp)  # validly signed, still refused
    with pytest.raises(VerificationError, match="not a Unix time") as excinfo:
        verify_standard(BODY, headers, WHSEC, now=NOW)
    assert reason_of(excinfo) == "malformed_header"


@pytest.mark.parametrize("skew", [-300, -299.5, 0, 299.9, 300])
def test_timestamps_within_the_tolerance_pass(skew: float) -> None:
    assert verify_standard(BODY, standard_headers(KEY), WHSEC, now=NOW + skew)


@pytest.mark.parametrize(
    ("skew", "words"),
    [
        (300.001, r"is 301 s old.*replayed"),
        (3 * 3600, r"is 10800 s \(3\.0 h\) old"),
        (-301, r"is 301 s in the future.*clock"),
    ],
)
def test_timestamps_beyond_the_tolerance_say_by_how_much(skew: float, words: str) -> None:
    with pytest.raises(VerificationError, match=words) as excinfo:
        verify_standard(BODY, standard_headers(KEY), WHSEC, now=NOW + skew)
    assert reason_of(excinfo) == "timestamp_out_of_tolerance"
    assert "the signature is valid" in str(excinfo.value)
    assert "tolerance of 300 s" in str(excinfo.value)


def test_the_tolerance_is_configurable_and_can_be_switched_off() -> None:
    headers = standard_headers(KEY)
    assert verify_standard(BODY, headers, WHSEC, now=NOW + 3599, tolerance_seconds=3600)
    with pytest.raises(VerificationError, match="tolerance of 10 s"):
        verify_standard(BODY, headers, WHSEC, now=NOW + 11, tolerance_seconds=10)
    assert verify_standard(BODY, headers, WHSEC, now=NOW + 10**7, tolerance_seconds=None)


def test_now_may_be_a_datetime_and_defaults_to_the_clock() -> None:
    moment = datetime.fromtimestamp(NOW + 30, UTC)
    assert verify_standard(BODY, standard_headers(KEY), WHSEC, now=moment)
    with pytest.raises(VerificationError, match="old"):  # NOW is in 2024
        verify_standard(BODY, standard_headers(KEY), WHSEC)


def test_a_forged_request_with_a_fresh_timestamp_is_still_a_mismatch() -> None:
    # A wrong signature is reported as such even when the timestamp is also stale.
    with pytest.raises(VerificationError) as excinfo:
        verify_standard(BODY, standard_headers(OLD_KEY), WHSEC, now=NOW + 10**6)
    assert reason_of(excinfo) == "signature_mismatch"


@pytest.mark.parametrize("bad", ["whsec_not*base64", "whsec_", "whsec_YWJj-_"])
def test_an_unusable_standard_secret_is_a_configuration_error(bad: str) -> None:
    with pytest.raises(SecretError, match="secret #1") as excinfo:
        verify_standard(BODY, standard_headers(KEY), bad, now=NOW)
    assert not isinstance(excinfo.value, VerificationError)
    assert isinstance(excinfo.value, WebhookdError)


@pytest.mark.parametrize("secret", ["", "   ", [], ["ok", ""]])
def test_an_empty_secret_is_refused_before_anything_is_checked(secret: str | list[str]) -> None:
    with pytest.raises(SecretError, match=r"empty|no secret"):
        verify_seed(BODY, seed_headers("ok"), secret)


# --------------------------------------------------------------------------- verify()


def test_verify_picks_standard_when_webhook_signature_is_present() -> None:
    # An endpoint with both schemes sends both sets of headers, signed by one whsec_ secret.
    headers = {**seed_headers(WHSEC), **standard_headers(KEY)}
    assert verify(BODY, headers, WHSEC, now=NOW) == json.loads(BODY)
    headers["webhook-signature"] = v1(OLD_KEY)
    with pytest.raises(VerificationError, match="webhook-signature"):
        verify(BODY, headers, WHSEC, now=NOW)
    assert verify(BODY, headers, WHSEC, scheme="seed")["event"] == "booking.created"


def test_verify_falls_back_to_the_seed_scheme() -> None:
    envelope = verify(BODY, seed_headers(SEED_SECRET), SEED_SECRET)
    assert envelope["data"]["customerName"] == "José 🎉"


def test_verify_with_no_signature_header_names_both() -> None:
    with pytest.raises(VerificationError, match=r"webhook-signature.*X-BookingScheduler-Sig"):
        verify(BODY, {"Content-Type": "application/json"}, SEED_SECRET)


def test_verify_with_a_forced_scheme_does_not_look_at_the_other() -> None:
    with pytest.raises(VerificationError, match="webhook-id is missing"):
        verify(BODY, seed_headers(WHSEC), WHSEC, scheme="standard")
    with pytest.raises(VerificationError, match=f"{PREFIX}-Signature is missing"):
        verify(BODY, standard_headers(KEY), WHSEC, scheme="seed")


def test_verify_refuses_a_validly_signed_body_that_is_not_an_object() -> None:
    body = b"[1,2,3]"
    with pytest.raises(VerificationError, match="not a JSON object") as excinfo:
        verify(body, {f"{PREFIX}-Signature": seed_hex(SEED_SECRET, body)}, SEED_SECRET)
    assert reason_of(excinfo) == "invalid_body"
    with pytest.raises(VerificationError, match="not a JSON object"):
        parse_envelope(b"\xff")


def test_verification_errors_are_webhookd_errors_and_value_errors() -> None:
    with pytest.raises(VerificationError) as excinfo:
        verify(BODY, {}, SEED_SECRET)
    assert isinstance(excinfo.value, WebhookdError)
    assert isinstance(excinfo.value, ValueError)


# --------------------------------------------------------------------------- header mappings


def lowercase(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def uppercase(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.upper(): v for k, v in headers.items()}


def wsgi_environ(headers: Mapping[str, str]) -> dict[str, Any]:
    environ: dict[str, Any] = {"REQUEST_METHOD": "POST", "wsgi.input": object()}
    environ.update({"HTTP_" + k.upper().replace("-", "_"): v for k, v in headers.items()})
    return environ


def asgi_scope(headers: Mapping[str, str]) -> dict[str, Any]:
    return {
        "type": "http",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
    }


@pytest.mark.parametrize(
    "convert",
    [
        lowercase,
        uppercase,
        lambda h: CIMultiDict(lowercase(h)),  # aiohttp's request.headers
        wsgi_environ,  # a raw WSGI environ (or Django's request.META)
        lambda h: headers_from_wsgi_environ(wsgi_environ(h)),
        lambda h: headers_from_asgi_scope(asgi_scope(h)),
    ],
    ids=["lower", "upper", "cimultidict", "environ", "from-wsgi", "from-asgi"],
)
@pytest.mark.parametrize("scheme", ["seed", "standard"])
def test_headers_are_found_in_any_case_and_any_mapping(convert: Any, scheme: str) -> None:
    if scheme == "seed":
        headers, secret = seed_headers(SEED_SECRET, OLD_SEED_SECRET), OLD_SEED_SECRET
    else:
        headers, secret = standard_headers(KEY), WHSEC
    envelope = verify(BODY, convert(headers), secret, now=NOW)
    assert envelope["event"] == "booking.created"


def test_header_helpers_give_case_insensitive_mappings() -> None:
    environ = {
        "HTTP_WEBHOOK_ID": "a",
        "CONTENT_TYPE": "application/json",
        "PATH_INFO": "/hook",
        "wsgi.errors": object(),
    }
    headers = headers_from_wsgi_environ(environ)
    assert dict(headers) == {"Webhook-Id": "a", "Content-Type": "application/json"}
    assert headers["WEBHOOK-ID"] == "a"
    assert "content-type" in headers
    scope = {"headers": [(b"x-a", b"1"), (b"X-A", b"2"), (b"b", b"\xe9")]}
    asgi = headers_from_asgi_scope(scope)
    assert asgi["x-A"] == "1, 2"
    assert asgi["B"] == "\u00e9"
    assert len(asgi) == 2


# --------------------------------------------------------------------------- secrets stay secret


def all_failures() -> list[tuple[str, Any]]:
    """(message, exception) of every kind of failure, with the secrets in play."""
    cases: list[Any] = [
        lambda: verify_seed(BODY, seed_headers("other"), SEED_SECRET),
        lambda: verify_seed(BODY, seed_headers("other", "x"), [SEED_SECRET, OLD_SEED_SECRET]),
        lambda: verify_seed(BODY, {f"{PREFIX}-Signature": "x"}, SEED_SECRET),
        lambda: verify_seed(b"x", {f"{PREFIX}-Signature": "0" * 64}, SEED_SECRET, canonical=True),
        lambda: verify_standard(BODY, standard_headers(OLD_KEY), WHSEC, now=NOW),
        lambda: verify_standard(BODY, standard_headers(KEY), WHSEC, now=NOW + 999),
        lambda: verify_standard(BODY, {}, WHSEC, now=NOW),
        lambda: verify_standard(BODY, standard_headers(KEY), WHSEC + "*", now=NOW),
        lambda: verify(BODY, {}, [SEED_SECRET, WHSEC]),
    ]
    failures = []
    for case in cases:
        with pytest.raises((VerificationError, SecretError)) as excinfo:
            case()
        failures.append((str(excinfo.value), excinfo.value))
    return failures


def test_no_error_message_reveals_a_secret_or_an_expected_signature() -> None:
    forbidden = [
        SEED_SECRET,
        OLD_SEED_SECRET,
        WHSEC,
        WHSEC.removeprefix("whsec_")[:12],
        seed_hex(SEED_SECRET),  # an expected signature would make the receiver a signing oracle
        v1(KEY).removeprefix("v1,")[:12],
    ]
    failures = all_failures()
    assert len(failures) == 9
    for message, exc in failures:
        for secret in forbidden:
            assert secret not in message
            assert secret not in repr(exc)


# --------------------------------------------------------------------------- webhookd verify


def run_cli(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    headers: str,
    *extra: str,
    secret: str = SEED_SECRET,
    body: bytes = BODY,
) -> tuple[int, str, str]:
    (tmp_path / "secret").write_text(secret + "\n")
    (tmp_path / "headers").write_text(headers)
    (tmp_path / "body").write_bytes(body)
    argv = ["verify", "--secret-file", str(tmp_path / "secret"), "--headers"]
    argv += [str(tmp_path / "headers"), "--body", str(tmp_path / "body"), *extra]
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def http_lines(headers: Mapping[str, str], first: str = "POST /hook HTTP/1.1") -> str:
    return "\r\n".join([first, *(f"{k}: {v}" for k, v in headers.items()), "", ""])


def test_cli_accepts_a_raw_http_request_capture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(tmp_path, capsys, http_lines(seed_headers(SEED_SECRET)))
    assert code == 0, err
    assert out.startswith("valid: seed signature by the current secret")
    assert "event booking.created" in out
    assert f"delivery {MSG_ID}" in out
    assert len(out.splitlines()) == 1
    assert SEED_SECRET not in out + err


def test_cli_reports_a_wrong_secret_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    headers = http_lines(seed_headers(SEED_SECRET))
    code, out, err = run_cli(tmp_path, capsys, headers, secret="not-the-secret")
    assert code == 1
    assert out.startswith("INVALID: ")
    assert "check the signing secret" in out
    assert "not-the-secret" not in out + err


def test_cli_hints_at_a_line_break_added_to_the_body(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    headers = http_lines(seed_headers(SEED_SECRET))
    code, out, _ = run_cli(tmp_path, capsys, headers, body=BODY + b"\n")
    assert code == 1
    assert "ends with a line break" in out


def test_cli_reads_curl_dump_json_and_verbose_formats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    headers = standard_headers(KEY, ts=NOW)
    curl_d = http_lines(headers, first="HTTP/1.1 200 OK") + "trailing body text: ignored\n"
    as_json = json.dumps(headers)
    curl_v = "* Connected to 127.0.0.1\n> POST /hook HTTP/1.1\n"
    curl_v += "".join(f"> {k}: {v}\n" for k, v in headers.items()) + "> \n"
    as_pairs = json.dumps([[k, v] for k, v in headers.items()])
    for text in (curl_d, as_json, as_pairs, curl_v):
        code, out, err = run_cli(tmp_path, capsys, text, "--no-tolerance", secret=WHSEC)
        assert (code, err) == (0, "")
        assert out.startswith("valid: Standard Webhooks signature by the current secret")
        assert f"signed at {NOW}" in out


def test_cli_checks_the_tolerance_and_suggests_no_tolerance_for_old_captures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    headers = http_lines(standard_headers(KEY, ts=NOW))  # NOW is in 2024: long ago
    code, out, _ = run_cli(tmp_path, capsys, headers, secret=WHSEC)
    assert code == 1
    assert "use --no-tolerance" in out
    assert "old" in out
    code, out, _ = run_cli(tmp_path, capsys, headers, "--tolerance", "1e9", secret=WHSEC)
    assert code == 0, out


def test_cli_tells_a_receiver_on_the_old_secret_to_switch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    headers = http_lines(seed_headers(SEED_SECRET, OLD_SEED_SECRET))
    code, out, _ = run_cli(tmp_path, capsys, headers, secret=OLD_SEED_SECRET)
    assert code == 0
    assert out.startswith("valid: seed signature by the previous secret")
    assert f"{PREFIX}-Signature-Previous" in out
    assert "switch to the new one" in out
    code, out, _ = run_cli(tmp_path, capsys, headers, "--no-previous", secret=OLD_SEED_SECRET)
    assert code == 1


def test_cli_secret_file_may_hold_several_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    headers = http_lines(seed_headers(SEED_SECRET))
    two = f"{OLD_SEED_SECRET}\n\n{SEED_SECRET}"
    code, out, _ = run_cli(tmp_path, capsys, headers, secret=two)
    assert code == 0
    assert "(secret 2 of 2 in the secret file)" in out


def test_cli_scheme_and_prefix_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    both = {**seed_headers(WHSEC, prefix="X-Acme"), **standard_headers(OLD_KEY)}
    code, out, _ = run_cli(tmp_path, capsys, http_lines(both), secret=WHSEC)
    assert code == 1  # auto picks Standard Webhooks, whose signature is by another key
    args = ("--scheme", "seed", "--header-prefix", "X-Acme")
    code, out, _ = run_cli(tmp_path, capsys, http_lines(both), *args, secret=WHSEC)
    assert code == 0, out
    assert out.startswith("valid: seed signature")


def test_cli_canonical_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pretty = json.dumps(json.loads(BODY), indent=2).encode()
    headers = http_lines(seed_headers(SEED_SECRET))
    assert run_cli(tmp_path, capsys, headers, body=pretty)[0] == 1
    assert run_cli(tmp_path, capsys, headers, "--canonical", body=pretty)[0] == 0


def test_cli_reads_the_body_from_stdin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import sys

    (tmp_path / "secret").write_text(SEED_SECRET)
    (tmp_path / "headers").write_text(http_lines(seed_headers(SEED_SECRET)))
    stdin = io.TextIOWrapper(io.BytesIO(BODY))
    monkeypatch.setattr(sys, "stdin", stdin)
    argv = ["verify", "--secret-file", str(tmp_path / "secret"), "--headers"]
    code = main([*argv, str(tmp_path / "headers"), "--body", "-"])
    assert code == 0
    assert capsys.readouterr().out.startswith("valid:")


@pytest.mark.parametrize(
    ("secret", "headers", "message"),
    [
        ("", "X-BookingScheduler-Signature: " + "0" * 64, "secret file .* is empty"),
        (SEED_SECRET, "", "no headers found"),
        (SEED_SECRET, "[1, 2]", "expected a JSON object"),
        (SEED_SECRET, "A: 1\nthis is not a header\n", "not a 'Name: value' header line"),
        ("whsec_***", "webhook-signature: v1,AAAA", "not a Standard Webhooks secret"),
    ],
)
def test_cli_usage_errors_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    secret: str,
    headers: str,
    message: str,
) -> None:
    code, out, err = run_cli(tmp_path, capsys, headers, secret=secret)
    assert code == 2
    assert out == ""
    assert re.search(message, err), err
    assert not secret or secret not in err


def test_cli_a_missing_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "secret").write_text(SEED_SECRET)
    secret = str(tmp_path / "secret")
    code = main(["verify", "--secret-file", secret, "--headers", "nope", "--body", secret])
    assert code == 2
    assert "cannot read the headers file" in capsys.readouterr().err


def test_a_free_text_secret_beside_a_whsec_one_does_not_break_standard_verification() -> None:
    # A receiver mid-rotation from a legacy (seed-only) secret holds both; with the standard
    # scheme only the whsec_ one can match, and the free-text one must not make it an error.
    result = verify_standard(BODY, standard_headers(KEY), ["legacy-free-text", WHSEC], now=NOW)
    assert result.secret_index == 1
    with pytest.raises(SecretError):
        verify_standard(BODY, standard_headers(KEY), ["legacy-free-text"], now=NOW)
