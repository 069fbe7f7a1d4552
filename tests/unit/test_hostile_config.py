"""Random configuration files: ``load_settings`` either returns Settings or raises ConfigError
listing ``key.path: message`` lines; never another exception, and never a secret's value.

Documents are built from the real schema's keys (read from the Settings model, so new keys are
covered as they are added) with plausible, boundary and junk values, plus junk keys and
sections, and written as real TOML files next to real (and broken) secret files.

A configuration that is accepted must also work: its retry schedule gives times a date can hold
(the daemon writes every next attempt's time as a date).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from webhookd.errors import ConfigError
from webhookd.retry import RetryPolicy, next_attempt_at
from webhookd.settings import EndpointSettings, Settings, load_settings

EXAMPLES = 150
SECRET = "S3cr3t-hostile-CONFIG-4f1d9b"
PREVIOUS_SECRET = "Pr3vious-hostile-CONFIG-7a2c5e"
NUMERIC_SECRET = 73917391739173  # a secret typed without quotes
HEADER_TOKEN = "Bearer t0ken-hostile-CONFIG-9e8d"
SECRET_TEXTS = (SECRET, PREVIOUS_SECRET, str(NUMERIC_SECRET), HEADER_TOKEN)
WHSEC = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0"  # a valid whsec_ key, not secret here

INT64 = 2**63 - 1
BREAKER_PROBES_CHECKED = 8  # failed probes after which the pause is checked
SECTIONS: dict[str, type[BaseModel]] = {
    name: field.annotation
    for name, field in Settings.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
}
ENDPOINT_KEYS = sorted(EndpointSettings.model_fields)
# "key.path: message" (a junk key is shown as it is, even " " or a line break, so the path
# itself is not checked).
PROBLEM_RE = re.compile(r"^.*?: \S", re.DOTALL)


# -- TOML ------------------------------------------------------------------------------------------


def toml_key(key: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_-]+", key):
        return key
    return toml_string(key)


def toml_string(text: str) -> str:
    # JSON escapes are TOML escapes, except that TOML wants DEL escaped too and has no \/.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007F")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, Mapping):
        inner = ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + inner + "}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def toml_document(doc: Mapping[str, Any]) -> str:
    """Top-level scalars first, then tables, then arrays of tables (TOML's order rules)."""
    lines = []
    tables = {k: v for k, v in doc.items() if isinstance(v, Mapping)}
    arrays = {
        k: v
        for k, v in doc.items()
        if isinstance(v, list) and v and all(isinstance(i, Mapping) for i in v)
    }
    for key, value in doc.items():
        if key not in tables and key not in arrays:
            lines.append(f"{toml_key(key)} = {toml_value(value)}")
    for key, table in tables.items():
        lines.append(f"[{toml_key(key)}]")
        lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    for key, items in arrays.items():
        for item in items:
            lines.append(f"[[{toml_key(key)}]]")
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


# -- values ----------------------------------------------------------------------------------------

junk_keys = st.text(min_size=1, max_size=12) | st.sampled_from(["secrt", "URL", "Secret", "id "])
toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=INT64),
    st.sampled_from([0, -1, 1, 2**31, INT64, -(2**63)]),
    st.floats(),
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, math.inf, -math.inf, math.nan]),
    st.text(max_size=20),
    st.datetimes(timezones=st.none() | st.just(UTC)),
    st.dates(),
    st.times(),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(junk_keys, inner, max_size=3),
    max_leaves=6,
)

_TZ = st.integers(-23 * 60, 23 * 60).map(lambda m: timezone(timedelta(minutes=m)))
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "path": st.sampled_from(["webhookd.db", "/tmp/x/y.db", "", ".", "sub/dir/app.db", "~/a.db"]),
    "listen": st.sampled_from(
        [
            "127.0.0.1:0",
            "[::1]:9180",
            "",
            "localhost:80",
            "1.2.3.4",
            ":80",
            "[zz]:1",
            "127.0.0.1:65536",
            "127.0.0.1:-1",
            "127.0.0.1:\u0663",
            "[::1]",
            "host:port",
        ]
    ),
    "url": st.sampled_from(
        [
            "https://h.example/x",
            "http://127.0.0.1:8080/h",
            "ftp://h/x",
            "https://u:p@h/x",
            "https://h/x#frag",
            "https://",
            "https://h:99999/",
            "//h/x",
            "https://h/\u00e9",
            "https://h/ x",
            "https://[::1/",
            "x" * 3000,
        ]
    ),
    "id": st.sampled_from(["crm", "a", "-bad", "x" * 65, "ok.id_1-2", "", "sp ace"]),
    "events": st.lists(
        st.sampled_from(["*", "booking.*", "payment.succeeded", "Booking", "a.", "", "*.*"]),
        max_size=3,
    ),
    "signature_schemes": st.lists(st.sampled_from(["seed", "standard", "other"]), max_size=3),
    "headers": st.dictionaries(
        st.sampled_from(
            [
                "X-Custom",
                "Authorization",
                "bad name",
                "X-BookingScheduler-Signature",
                "webhook-id",
                "Content-Type",
                "X-A",
            ]
        ),
        st.sampled_from(["v", HEADER_TOKEN, "a\r\nb", "", "\u0000"]) | toml_scalars,
        max_size=3,
    ),
    "header_prefix": st.sampled_from(["X-Acme", "", "X Acme", "x" * 65, "X-BookingScheduler"]),
    "level": st.sampled_from(["debug", "info", "warning", "error", "trace", "INFO"]),
    "format": st.sampled_from(["json", "logfmt", "text"]),
    "schema_mismatch": st.sampled_from(["deliver", "warn", "quarantine", "ignore"]),
    "previous_secret_expires_at": st.one_of(
        st.datetimes(timezones=_TZ),
        st.datetimes(),
        st.sampled_from(["2030-01-01T00:00:00Z", "soon", ""]),
    ),
    "secret": st.sampled_from([SECRET, "", "   ", WHSEC, "whsec_short"]) | st.just(NUMERIC_SECRET),
    "previous_secret": st.sampled_from([PREVIOUS_SECRET, "", WHSEC]) | st.just(NUMERIC_SECRET),
    "secret_file": st.sampled_from(
        [
            "secret.txt",
            "empty.txt",
            "binary.bin",
            "missing.txt",
            ".",
            "",
            "%d/cred",
            "$CREDENTIALS_DIRECTORY/cred",
            "nul\u0000byte",
            "/dev/null",
        ]
    ),
}
PLAUSIBLE["previous_secret_file"] = PLAUSIBLE["secret_file"]


def field_values(model: type[BaseModel], key: str) -> st.SearchStrategy[Any]:
    """Plausible values for ``model.key`` (by name, else by its type and default), or junk."""
    if key in PLAUSIBLE:
        plausible = PLAUSIBLE[key]
    else:
        field = model.model_fields[key]
        plausible = _by_type(field.annotation, field.default)
    return st.one_of(plausible, plausible, toml_values)


def _by_type(annotation: Any, default: Any) -> st.SearchStrategy[Any]:
    options: list[st.SearchStrategy[Any]] = []
    if isinstance(default, bool | int | float | str) and default is not None:
        options.append(st.just(default))
    for kind in _kinds(annotation):
        if kind is bool:
            options.append(st.booleans())
        elif kind is int:
            options.append(st.integers(-2, 20_000) | st.sampled_from([0, 1, 10**9, INT64]))
        elif kind is float:
            options.append(
                st.floats(min_value=-1, max_value=1e6)
                | st.sampled_from([0.0, 1e-9, 1e12, 1e300, math.inf, math.nan])
            )
        elif kind is str:
            options.append(st.text(max_size=15))
    return st.one_of(options) if options else toml_values


def _kinds(annotation: Any) -> set[Any]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    if origin is typing.Literal:
        return {str}
    return {annotation}


@st.composite
def sections(draw: st.DrawFn, name: str, model: type[BaseModel]) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(sorted(model.model_fields)), unique=True, max_size=4))
    table = {key: draw(field_values(model, key)) for key in keys}
    if draw(st.integers(0, 9)) == 0:
        table[draw(junk_keys)] = draw(toml_values)
    return table


@st.composite
def endpoints(draw: st.DrawFn, index: int) -> dict[str, Any]:
    """Mostly a valid endpoint with a few keys changed, sometimes anything."""
    item: dict[str, Any] = {
        "id": f"ep{index}",
        "url": "https://h.example/hook",
        "secret": SECRET,
    }
    if draw(st.booleans()):
        item["previous_secret"] = PREVIOUS_SECRET
        item["previous_secret_expires_at"] = datetime(2030, 1, 1, tzinfo=UTC)
    for key in draw(st.lists(st.sampled_from(ENDPOINT_KEYS), unique=True, max_size=3)):
        if draw(st.integers(0, 4)) == 0:
            item.pop(key, None)
        else:
            item[key] = draw(field_values(EndpointSettings, key))
    if draw(st.integers(0, 9)) == 0:
        item[draw(junk_keys)] = draw(toml_values)
    return item


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(sorted(SECTIONS)), unique=True, max_size=5)):
        doc[name] = (
            draw(toml_values)
            if draw(st.integers(0, 9)) == 0
            else draw(sections(name, SECTIONS[name]))
        )
    count = draw(st.integers(0, 3))
    if count:
        doc["endpoints"] = [draw(endpoints(i)) for i in range(count)]
        if draw(st.integers(0, 4)) == 0:
            doc["endpoints"].append(draw(endpoints(0)))  # a duplicate id
    elif draw(st.integers(0, 9)) == 0:
        doc["endpoints"] = draw(toml_values)
    if draw(st.integers(0, 9)) == 0:
        doc[draw(junk_keys)] = draw(toml_values)
    return doc


def write_secret_files(directory: Path) -> None:
    (directory / "secret.txt").write_text(SECRET + "\n", encoding="utf-8")
    (directory / "empty.txt").write_text("  \n", encoding="utf-8")
    (directory / "binary.bin").write_bytes(b"\xff\xfe" + SECRET.encode())


# -- the properties --------------------------------------------------------------------------------


def load(doc: Mapping[str, Any]) -> Settings | ConfigError:
    with tempfile.TemporaryDirectory(prefix="hostile-config-") as tmp:
        directory = Path(tmp)
        write_secret_files(directory)
        path = directory / "webhookd.toml"
        text = toml_document(doc)
        tomllib.loads(text)  # the generator writes valid TOML: the file's contents are at test
        path.write_text(text, encoding="utf-8")
        try:
            return load_settings(path)
        except ConfigError as exc:
            return exc


def check_refusal(error: ConfigError) -> None:
    assert error.problems, "a refusal must say what is wrong"
    for problem in error.problems:
        assert PROBLEM_RE.match(problem), f"not 'key.path: message': {problem!r}"
    shown = str(error) + "\n".join(error.problems)
    for secret in SECRET_TEXTS:
        assert secret not in shown, f"the secret {secret!r} is echoed:\n{shown}"


def check_schedule(loaded: Settings) -> None:
    """Every next attempt time of the accepted retry settings, and the circuit breaker's
    first pauses, can be written as a date (the daemon logs them as dates)."""
    policy = RetryPolicy.from_settings(loaded.retry)
    now = datetime.now(UTC).timestamp()
    breaker = getattr(loaded, "breaker", None)
    if breaker is not None:
        for probes in range(BREAKER_PROBES_CHECKED):
            pause = min(
                breaker.cooldown_seconds * breaker.cooldown_multiplier**probes,
                breaker.max_cooldown_seconds,
            )
            try:
                datetime.fromtimestamp(now + pause, UTC)
            except (OverflowError, ValueError, OSError) as exc:
                raise AssertionError(
                    f"breaker settings {breaker} were accepted, but after {probes} failed "
                    f"probes an endpoint would be paused for {pause!r} s, to no date: {exc}"
                ) from None
    for attempts_made in range(1, min(policy.max_attempts, 40) + 1):
        for rand in (0.0, 0.5, 0.999):
            at = next_attempt_at(
                policy, attempts_made=attempts_made, created_at=now, now=now, rand=rand
            )
            if at is None:
                break
            assert math.isfinite(at), (loaded.retry, attempts_made, at)
            try:
                datetime.fromtimestamp(at, UTC)
            except (OverflowError, ValueError, OSError) as exc:
                raise AssertionError(
                    f"retry settings {loaded.retry} were accepted, but attempt {attempts_made} "
                    f"would be retried at {at!r} s, which is no date: {exc}"
                ) from None


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(doc=documents())
def test_a_random_config_loads_or_is_refused_with_key_paths_and_no_secrets(
    doc: dict[str, Any],
) -> None:
    check(doc)


def check(doc: Mapping[str, Any]) -> None:
    outcome = load(doc)
    if isinstance(outcome, ConfigError):
        check_refusal(outcome)
        return
    assert isinstance(outcome, Settings)
    check_schedule(outcome)
    for ep in outcome.endpoints:
        assert ep.secret_value().strip()


ENDPOINT = {"id": "a", "url": "https://h.example/x", "secret": SECRET}
ROTATION = {"previous_secret_expires_at": datetime(2030, 1, 1, tzinfo=UTC)}


@pytest.mark.parametrize(
    "doc",
    [
        # A rotated-out secret typed without quotes is refused: its value must not be shown.
        {"endpoints": [{**ENDPOINT, **ROTATION, "previous_secret": NUMERIC_SECRET}]},
        {"endpoints": [{**ENDPOINT, **ROTATION, "previous_secret": [PREVIOUS_SECRET]}]},
        {"endpoints": [{**ENDPOINT, "secret": NUMERIC_SECRET}]},
        {"endpoints": [{**ENDPOINT, "secret": [SECRET]}]},
        # Header values may be credentials (`endpoints show` lists only their names).
        {"endpoints": [{**ENDPOINT, "headers": HEADER_TOKEN}]},
        {"endpoints": [{**ENDPOINT, "headers": {"Authorization": HEADER_TOKEN + "\n"}}]},
        {"endpoints": [{**ENDPOINT, "secret_file": "binary.bin"}]},
        {"endpoints": [{**ENDPOINT, "signature_schemes": ["standard"]}]},
    ],
    ids=[
        "numeric previous_secret",
        "list previous_secret",
        "numeric secret",
        "list secret",
        "headers as a string",
        "header value with a line break",
        "secret file not UTF-8",
        "seed secret for the standard scheme",
    ],
)
def test_refusals_never_show_a_secret(doc: dict[str, Any]) -> None:
    outcome = load(doc)
    assert isinstance(outcome, ConfigError)
    check_refusal(outcome)


@pytest.mark.parametrize("value", [False, ["secret.txt"]], ids=["bool", "list"])
def test_a_secret_file_of_the_wrong_type_is_refused_with_the_standard_scheme(value: Any) -> None:
    """Found by the property above: with signature_schemes = ["standard"], a secret_file that
    is not text made load_settings raise TypeError (Path(False)) instead of ConfigError."""
    doc = {
        "endpoints": [
            {"id": "a", "url": "https://h.example/x", "secret_file": value,
             "signature_schemes": ["standard"]}
        ]
    }  # fmt: skip
    outcome = load(doc)
    assert isinstance(outcome, ConfigError)
    check_refusal(outcome)
    assert any(p.startswith("endpoints[0].secret_file: ") for p in outcome.problems)


HUGE_SECONDS = 1e12  # about 31,700 years


@pytest.mark.parametrize(
    "doc",
    [
        {"retry": {"initial_delay_seconds": math.inf, "max_delay_seconds": math.inf,
                   "max_age_seconds": math.inf}},
        {"retry": {"initial_delay_seconds": HUGE_SECONDS, "max_delay_seconds": HUGE_SECONDS,
                   "max_age_seconds": HUGE_SECONDS}},
        {"breaker": {"cooldown_seconds": HUGE_SECONDS, "max_cooldown_seconds": HUGE_SECONDS}},
        {"breaker": {"cooldown_seconds": math.inf, "max_cooldown_seconds": math.inf}},
    ],
    ids=["infinite retry", "retry in 31,700 years", "pause of 31,700 years", "infinite pause"],
)  # fmt: skip
def test_delays_that_are_accepted_can_be_written_as_dates(doc: dict[str, Any]) -> None:
    """Such a delay stopped the daemon at the first failed attempt ("stopped after an internal
    failure: year 33715 is out of range", the attempt not recorded): it must be refused, or
    capped, not accepted as it is."""
    check(doc)


@settings(max_examples=EXAMPLES // 3, deadline=None)
@given(text=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_a_file_that_is_not_toml_is_one_clear_problem(text: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="hostile-config-") as tmp:
        path = Path(tmp) / "webhookd.toml"
        path.write_bytes(text)
        try:
            outcome: Settings | ConfigError = load_settings(path)
        except ConfigError as exc:
            outcome = exc
    if isinstance(outcome, ConfigError):
        assert outcome.problems
        assert all(p.strip() for p in outcome.problems)
    else:
        assert isinstance(outcome, Settings)
