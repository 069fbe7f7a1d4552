"""canonical_json against real JavaScript: every body is what JSON.stringify writes.

Receivers sign ``JSON.stringify(JSON.parse(body))``; these properties run generated documents
through one Node.js process (the ``js_json`` fixture) and compare byte for byte:

* ``dumps(value)`` survives ``JSON.stringify(JSON.parse(body))`` unchanged, and is exactly
  what JavaScript writes for the same value given as Python's own (differently formatted) JSON;
* for arbitrary texts, ``canonicalize`` either agrees with JavaScript or refuses, and it only
  refuses what JavaScript rejects or would alter;
* for arbitrary bytes, likewise, and ``invalid_utf8`` only when decoding would alter them;
* Python integers are refused exactly when JavaScript would write them differently;
* nesting up to MAX_DEPTH round-trips, deeper is refused.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any, Protocol

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from webhookd.canonical_json import (
    MAX_DEPTH,
    MAX_SAFE_INTEGER,
    CanonicalJSONError,
    JSONValue,
    canonicalize,
    dumps,
    loads,
)

pytestmark = pytest.mark.node

EXAMPLES = 300
PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class JavaScriptJSON(Protocol):  # the js_json fixture, tests/integration/conftest.py
    def texts(self, *texts: str) -> list[dict[str, Any]]: ...
    def bodies(self, *bodies: bytes) -> list[dict[str, Any]]: ...


# --------------------------------------------------------------------------- values


def _double_from_bits(bits: int) -> float:
    value: float = struct.unpack("<d", struct.pack("<Q", bits))[0]
    return value


EDGE_FLOATS = [
    0.0,
    -0.0,
    5e-324,
    -5e-324,
    2.225073858507201e-308,
    2.2250738585072014e-308,
    1.7976931348623157e308,
    1e-7,
    1e-6,
    1e-5,
    1e-4,
    0.1 + 0.2,
    1e16,
    1e20,
    1e21,
    float(MAX_SAFE_INTEGER),
    float(2**53),
    1.5,
    -1.0,
]

finite_floats = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    # Uniform over bit patterns: every exponent, subnormals and both zeros equally often.
    st.integers(0, 2**64 - 1).map(_double_from_bits).filter(math.isfinite),
    # Decimal-looking values around every power of ten, where the notation switches.
    st.builds(
        lambda mantissa, exponent: float(f"{mantissa}e{exponent}"),
        st.integers(-(10**17), 10**17),
        st.integers(-345, 300),
    ).filter(math.isfinite),
    # Integral floats, also beyond 2**53 (JS prints these as integers up to 1e21).
    st.integers(-(2**75), 2**75).map(float),
    st.sampled_from(EDGE_FLOATS),
)

safe_integers = st.one_of(
    st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER),
    st.integers(MAX_SAFE_INTEGER - 100, MAX_SAFE_INTEGER),
    st.integers(-MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER + 100),
    st.integers(-1000, 1000),
)

SPECIAL_CHARACTERS = [
    "\u2028",
    "\u2029",
    "\ud800",
    "\udbff",
    "\udc00",
    "\udfff",
    "\ud83d",
    "\ude00",
    "\U0001f600",
    "\U0010ffff",
    "\x00",
    "\x1f",
    "\x7f",
    "\x80",
    '"',
    "\\",
    "/",
    "\b",
    "\ufeff",
    "\u0661",
    "é",
]
characters = st.one_of(
    st.characters(codec="ascii"),
    st.characters(),  # any code point except surrogates
    st.sampled_from(SPECIAL_CHARACTERS),
)
strings = st.lists(characters, max_size=10).map("".join)

INDEX_LIKE_KEYS = ["0", "1", "2", "10", "01", "00", "-1", "1.0", "+1", " 1", "1e3", "", "\u0661"]
INDEX_LIKE_KEYS += ["4294967294", "4294967295", "4294967296", "9007199254740993"]
keys = st.one_of(
    strings,
    st.integers(0, 2**32 + 2).map(str),
    st.integers(0, 30).map(str),
    st.sampled_from(INDEX_LIKE_KEYS),
    st.sampled_from(["a", "b", "\ud83d\ude00", "\U0001f600"]),  # the last two are one key in JS
)

scalars = st.one_of(st.none(), st.booleans(), safe_integers, finite_floats, strings)
values: st.SearchStrategy[JSONValue] = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(keys, children, max_size=6)
    ),
    max_leaves=25,
)


def _canonicalize(text: str | bytes) -> tuple[str | None, CanonicalJSONError | None]:
    try:
        return canonicalize(text), None
    except CanonicalJSONError as exc:
        return None, exc


def _assert_fixed_point(body: str, value: JSONValue) -> None:
    """canonicalize(body) == body: canonical text is accepted and left as it is."""
    again, refusal = _canonicalize(body)
    assert refusal is None, refusal
    assert again == body


@PROPERTY_SETTINGS
@given(value=values)
def test_dumps_writes_what_json_stringify_writes(js_json: JavaScriptJSON, value: JSONValue) -> None:
    body = dumps(value)
    # Python's own JSON for the same value: other number forms, key order, ASCII escapes.
    reference = json.dumps(value, ensure_ascii=True, allow_nan=False)
    from_body, from_reference = js_json.texts(body, reference)
    assert from_body["ok"], from_body
    assert from_body["out"] == body  # JSON.stringify(JSON.parse(body)) === body
    assert from_reference["out"] == body  # and it is JavaScript's text for this very value
    _assert_fixed_point(body, value)


# --------------------------------------------------------------------------- texts

whitespace = st.sampled_from(["", "", "", " ", "\n", "\t", "\r\n  "])
not_whitespace = st.sampled_from(["\u00a0", "\ufeff", "\u2028", "\x0b", "\x0c", "\x00"])

valid_number_texts = st.one_of(
    st.from_regex(r"-?(0|[1-9][0-9]{0,22})(\.[0-9]{1,19})?([eE][+-]?[0-9]{1,3})?", fullmatch=True),
    safe_integers.map(str),
    st.integers(-(2**64), 2**64).map(str),
    st.integers(MAX_SAFE_INTEGER - 3, MAX_SAFE_INTEGER + 3).map(str),
    st.integers(-MAX_SAFE_INTEGER - 3, -MAX_SAFE_INTEGER + 3).map(str),
    finite_floats.map(repr),
    finite_floats.map(dumps),
    st.sampled_from(
        [
            *("1e400", "-1e309", "1" + "0" * 400, "1" + "0" * 20, "1E2", "-0", "-0.0", "0e0"),
            *("4.9e-325", "2.4703282292062328e-324", "9007199254740993.0", "1e-400"),
        ]
    ),
)
number_texts = st.one_of(
    valid_number_texts,
    st.sampled_from(
        [
            *("NaN", "Infinity", "-Infinity", "01", "-01", "+1", ".5", "1.", "-", "1e", "1e+"),
            *("0x1F", "1_0", "--1", "- 1", "\u0661"),
        ]
    ),
)

ESCAPES_AND_RAW = ["\\n", "\\/", "\\u00e9", "\\u2028", "\\ud83d", "\\ude00", "\\uDE00", "\\uD83D"]
ESCAPES_AND_RAW += ["\\x41", "\\u12", "\\", "\\'", "\t", "\x01", "\n", '"']
valid_string_texts = st.one_of(
    strings.map(lambda s: json.dumps(s, ensure_ascii=False)),  # raw characters, lone surrogates
    strings.map(lambda s: json.dumps(s, ensure_ascii=True)),  # \\uXXXX escapes
)
string_texts = st.one_of(
    valid_string_texts,
    valid_string_texts,
    st.lists(st.one_of(characters, st.sampled_from(ESCAPES_AND_RAW)), max_size=8).map(
        lambda parts: '"' + "".join(parts) + '"'  # escapes and raw characters, often invalid
    ),
)
key_texts = st.one_of(
    string_texts,
    keys.map(json.dumps),
    st.sampled_from(['"a"', '"1"', '"0"', '"\\ud83d\\ude00"', '"\U0001f600"']),  # duplicates
)
literal_texts = st.one_of(
    st.sampled_from(["true", "false", "null"]),
    st.sampled_from(["True", "nul", "undefined", "'a'", "[,]", "{,}"]),
)


def _array_text(items: list[tuple[str, str, str]]) -> str:
    return "[" + ",".join(before + item + after for before, item, after in items) + "]"


def _object_text(members: list[tuple[str, str, str, str, str]]) -> str:
    pairs = (f"{key}{gap}:{space}{value}{end}" for key, gap, space, value, end in members)
    return "{" + ",".join(pairs) + "}"


json_texts = st.recursive(
    st.one_of(number_texts, string_texts, literal_texts),
    lambda children: st.one_of(
        st.lists(st.tuples(whitespace, children, whitespace), max_size=4).map(_array_text),
        st.lists(
            st.tuples(key_texts, whitespace, whitespace, children, whitespace), max_size=4
        ).map(_object_text),
    ),
    max_leaves=12,
)
documents = st.builds(
    lambda before, text, after: before + text + after,
    st.one_of(whitespace, st.just(""), st.just(" "), not_whitespace),
    json_texts,
    st.one_of(whitespace, st.just(""), st.just("\n"), not_whitespace, st.sampled_from([",", "x"])),
)


def _number_literals(text: str) -> list[str]:
    """Every number literal in a valid JSON text, also those a later duplicate key overwrites."""
    found: list[str] = []

    def keep(literal: str) -> int:
        found.append(literal)
        return 0

    json.loads(text, parse_int=keep, parse_float=keep, object_pairs_hook=list)
    return found


def _javascript_alters(literal: str, answer: dict[str, Any]) -> bool:
    """JSON.parse reads a different number than the literal spells out (exact comparison), or,
    for an integer literal, JSON.stringify writes it back differently (1000000000000000000000
    comes back as 1e+21: same value, other bytes, so the receiver's HMAC would not match)."""
    exact = json.loads(literal)  # integers exact; an overflowing float is inf
    after = json.loads(answer["out"])  # JS writes Infinity as null
    rewritten = literal.lstrip("-").isdigit() and answer["out"] != str(int(literal))
    return after is None or exact != after or rewritten


def _assert_refusal_is_justified(
    js_json: JavaScriptJSON, exc: CanonicalJSONError, text: str, js: dict[str, Any]
) -> None:
    if exc.reason in ("invalid_json", "invalid_utf8") or not js["ok"]:
        assert not js["ok"], f"{exc.reason}: {exc}, but JSON.parse accepted it: {js}"
        return
    assert exc.reason in ("non_finite_number", "unsafe_integer"), exc
    # Judge each number literal on its own: the offending one may sit under a duplicate key
    # that JSON.parse then drops, but it is still a number JavaScript cannot read as written.
    literals = _number_literals(text)
    answers = js_json.texts(*literals)
    altered = any(map(_javascript_alters, literals, answers))
    assert altered, f"{exc.reason}: {exc}, but JavaScript reads every number as written"


@PROPERTY_SETTINGS
@given(text=documents)
def test_canonicalize_agrees_with_javascript_or_refuses_with_cause(
    js_json: JavaScriptJSON, text: str
) -> None:
    [js] = js_json.texts(text)
    ours, refusal = _canonicalize(text)
    event(refusal.reason if refusal else "accepted")
    if refusal is not None:
        _assert_refusal_is_justified(js_json, refusal, text, js)
    else:
        assert js["ok"], f"canonicalize accepted what JSON.parse rejects: {js['error']}"
        assert ours == js["out"]


def _splice(body: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    for position, insert in edits:
        position %= len(body) + 1
        body = body[:position] + insert + body[position:]
    return body


raw_bytes = st.one_of(
    st.binary(min_size=1, max_size=3),
    st.sampled_from(
        [
            *(b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80"),
            *(
                b"\xe2\x82",
                b"\xc3\xa9",
                b"\xe2\x80\xa8",
                b"\xf0\x9f\x98\x80",
                b"\xef\xbb\xbf",
                b"\x80",
            ),
        ]
    ),
)
byte_documents = st.one_of(
    st.builds(
        _splice,
        values.map(lambda v: dumps(v).encode()),
        st.lists(st.tuples(st.integers(0, 10**6), raw_bytes), max_size=2),
    ),
    documents.map(lambda text: text.encode("utf-8", "surrogatepass")),  # CESU-style surrogates
    st.binary(max_size=12),
)


@PROPERTY_SETTINGS
@given(body=byte_documents)
def test_bytes_are_refused_only_if_javascript_would_alter_or_reject_them(
    js_json: JavaScriptJSON, body: bytes
) -> None:
    [js] = js_json.bodies(body)
    ours, refusal = _canonicalize(body)
    event(refusal.reason if refusal else "accepted")
    if refusal is not None and refusal.reason == "invalid_utf8":
        assert js["decode_altered"], f"{refusal}, but Node decodes the bytes losslessly"
    elif refusal is not None:
        assert not js["decode_altered"]
        _assert_refusal_is_justified(js_json, refusal, body.decode(), js)
    else:
        assert not js["decode_altered"]
        assert js["ok"], f"canonicalize accepted what JSON.parse rejects: {js['error']}"
        assert ours == js["out"]


@settings(max_examples=EXAMPLES // 2, deadline=None)
@given(
    number=st.one_of(
        st.integers(MAX_SAFE_INTEGER - 5, MAX_SAFE_INTEGER + 5),
        st.integers(-MAX_SAFE_INTEGER - 5, -MAX_SAFE_INTEGER + 5),
        st.integers(-(2**70), 2**70),
    )
)
def test_dumps_refuses_exactly_the_integers_javascript_would_write_differently(
    js_json: JavaScriptJSON, number: int
) -> None:
    text = json.dumps([number])
    [js] = js_json.texts(text)
    try:
        body = dumps([number])
    except CanonicalJSONError as exc:
        refusal = exc
    else:
        assert body == text
        assert js["out"] == body
        return
    _assert_refusal_is_justified(js_json, refusal, text, js)


# --------------------------------------------------------------------------- depth


def _nest(depth: int, shape: int, leaf: JSONValue) -> JSONValue:
    value = leaf
    for level in range(depth):
        choice = (shape >> (2 * level)) & 3
        if choice == 0:
            value = [value]
        elif choice == 1:
            value = [1, value, "x"]
        elif choice == 2:
            value = {"k": value}
        else:
            value = {"z": 0, "7": value}  # an index key, moved first
    return value


@settings(max_examples=EXAMPLES // 2, deadline=None)
@given(
    depth=st.one_of(st.integers(1, MAX_DEPTH + 20), st.integers(MAX_DEPTH - 3, MAX_DEPTH + 3)),
    shape=st.integers(0, 2 ** (2 * (MAX_DEPTH + 20))),
    leaf=scalars,
)
def test_nesting_to_max_depth_round_trips_and_deeper_is_refused(
    js_json: JavaScriptJSON, depth: int, shape: int, leaf: JSONValue
) -> None:
    value = _nest(depth, shape, leaf)
    python_text = json.dumps(value, ensure_ascii=True)
    if depth <= MAX_DEPTH:
        body = dumps(value)
        [js] = js_json.texts(body)
        assert js["out"] == body
        _assert_fixed_point(body, value)
        return
    with pytest.raises(CanonicalJSONError) as info:
        dumps(value)
    assert info.value.reason == "too_deep"
    with pytest.raises(CanonicalJSONError) as info:
        loads(python_text)
    assert info.value.reason == "too_deep"


def test_oracle_sees_what_the_wire_carries(js_json: JavaScriptJSON) -> None:
    """The pipe to Node must not be the thing that makes bodies match."""
    texts = ['"\\ud800"', '"\u2028\U0001f600"', '{"1":1,"0":0}', "1.0", "[1e21]"]
    answers = js_json.texts(*texts)
    assert [a["out"] for a in answers] == [
        '"\\ud800"',
        '"\u2028\U0001f600"',
        '{"0":0,"1":1}',
        "1",
        "[1e+21]",
    ]
    [bad] = js_json.bodies(b'"\xed\xa0\x80"')
    assert bad["decode_altered"]
