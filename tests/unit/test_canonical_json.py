"""canonical_json: the exact text JSON.stringify produces, and what must be refused.

Every expected string below was produced by Node.js 20 (``JSON.stringify`` /
``String(number)``); these tests do not need Node themselves.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from decimal import Decimal

import pytest

from webhookd.canonical_json import (
    MAX_DEPTH,
    MAX_SAFE_INTEGER,
    CanonicalJSONError,
    JSONValue,
    canonicalize,
    dumps,
    format_number,
    loads,
)
from webhookd.errors import PayloadError

# (Python number, String(x) in JavaScript)
NUMBERS: list[tuple[int | float, str]] = [
    (0, "0"),
    (-1, "-1"),
    (MAX_SAFE_INTEGER, "9007199254740991"),
    (-MAX_SAFE_INTEGER, "-9007199254740991"),
    (0.0, "0"),
    (-0.0, "0"),
    (1.0, "1"),
    (-2.0, "-2"),
    (100.0, "100"),
    (1.5, "1.5"),
    (-1.5, "-1.5"),
    (0.1 + 0.2, "0.30000000000000004"),
    (4.35, "4.35"),
    (123456.789, "123456.789"),
    (0.0001, "0.0001"),
    (1e-5, "0.00001"),
    (1e-6, "0.000001"),
    (1.5e-6, "0.0000015"),
    (1e-7, "1e-7"),
    (-1e-7, "-1e-7"),
    (1.2345e-7, "1.2345e-7"),
    (123e-20, "1.23e-18"),
    (5e-324, "5e-324"),
    (-5e-324, "-5e-324"),
    (2.2250738585072014e-308, "2.2250738585072014e-308"),
    (2.225073858507201e-308, "2.225073858507201e-308"),
    (1e15, "1000000000000000"),
    (1e16, "10000000000000000"),
    (1.5e16, "15000000000000000"),
    (2.0**53, "9007199254740992"),
    (2.0**60, "1152921504606847000"),
    (1e20, "100000000000000000000"),
    (123456789012345680000.0, "123456789012345680000"),
    (1e21, "1e+21"),
    (-1e21, "-1e+21"),
    (1.2345e21, "1.2345e+21"),
    (1e25, "1e+25"),
    (1.5e300, "1.5e+300"),
    (1.7976931348623157e308, "1.7976931348623157e+308"),
]


@pytest.mark.parametrize(("number", "expected"), NUMBERS)
def test_format_number_matches_javascript(number: int | float, expected: str) -> None:
    assert format_number(number) == expected
    assert dumps(number) == expected
    assert dumps([number]) == f"[{expected}]"
    assert dumps({"n": number}) == f'{{"n":{expected}}}'


@pytest.mark.parametrize(
    "number", [2**53 + 1, -(2**53 + 1), 2**60, -(2**64), 10**21, 10**400, 12345678901234567891]
)
def test_integers_javascript_would_change_are_refused(number: int) -> None:
    with pytest.raises(CanonicalJSONError) as info:
        dumps({"id": number})
    assert info.value.reason == "unsafe_integer"
    message = str(info.value)
    assert str(number)[:20] in message
    assert "JavaScript would change it to" in message
    assert '$["id"]' in message
    shapes: list[JSONValue] = [[number], [0, number], number]
    for where in shapes:
        with pytest.raises(CanonicalJSONError) as info:
            dumps(where)
        assert info.value.reason == "unsafe_integer"


@pytest.mark.parametrize(
    "number", [2**53, -(2**53), 2**53 + 2, 2**54, 10**20, 123 * 10**18, 999999999999999900000]
)
def test_integers_beyond_safe_range_that_javascript_keeps_are_sent(number: int) -> None:
    # These are doubles that JavaScript writes digit for digit as given, so the receiver's
    # JSON.stringify(JSON.parse(body)) reproduces them: nothing would be altered.
    text = str(number)
    assert dumps({"id": number}) == f'{{"id":{text}}}'
    assert loads(text) == number
    assert canonicalize(f"[{text}]") == f"[{text}]"


def test_unsafe_integer_message_says_what_javascript_would_make_of_it() -> None:
    with pytest.raises(CanonicalJSONError, match="change it to 9007199254740992"):
        loads("9007199254740993")
    with pytest.raises(CanonicalJSONError, match="change it to 1152921504606847000"):
        format_number(2**60)


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_refused(number: float) -> None:
    with pytest.raises(CanonicalJSONError) as info:
        dumps([1, number])
    assert info.value.reason == "non_finite_number"
    assert "$[1]" in str(info.value)
    with pytest.raises(CanonicalJSONError):
        format_number(number)


def test_bool_is_not_a_number() -> None:
    assert dumps([True, False, None]) == "[true,false,null]"
    with pytest.raises(CanonicalJSONError) as info:
        format_number(True)
    assert info.value.reason == "unsupported_type"


def test_error_is_a_payload_error_with_a_reason() -> None:
    with pytest.raises(PayloadError) as info:
        loads("{")
    assert isinstance(info.value, CanonicalJSONError)
    assert isinstance(info.value, ValueError)
    assert info.value.reason == "invalid_json"


# --------------------------------------------------------------------------- object keys


def test_array_index_keys_come_first_in_ascending_order() -> None:
    value: JSONValue = {
        "a": 1,
        "4294967295": 1,
        "4294967294": 2,
        "01": 3,
        "-1": 4,
        "10": 5,
        "0": 6,
        "1.0": 7,
        "2": 8,
        "": 9,
        "b": 10,
    }
    expected = (
        '{"0":6,"2":8,"10":5,"4294967294":2,"a":1,"4294967295":1,"01":3,"-1":4,"1.0":7,"":9,"b":10}'
    )
    assert dumps(value) == expected
    assert (
        canonicalize(
            '{"a":1,"4294967295":1,"4294967294":2,"01":3,"-1":4,"10":5,"0":6,"1.0":7,"2":8,"":9,"b":10}'
        )
        == expected
    )


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["b", "a"], '{"b":0,"a":1}'),  # insertion order, never sorted
        (["2", "1"], '{"1":1,"2":0}'),
        (["x", "9", "10", "00", "0"], '{"0":4,"9":1,"10":2,"x":0,"00":3}'),
        (["\u0661", "1"], '{"1":1,"\u0661":0}'),  # Arabic-Indic digit is an ordinary key
        (["1 ", " 1", "+1", "1e3"], '{"1 ":0," 1":1,"+1":2,"1e3":3}'),
    ],
)
def test_key_order(keys: list[str], expected: str) -> None:
    assert dumps({key: index for index, key in enumerate(keys)}) == expected


def test_duplicate_keys_keep_first_position_and_last_value() -> None:
    assert canonicalize('{"a":1,"b":2,"a":3}') == '{"a":3,"b":2}'


def test_keys_that_are_one_string_in_javascript_are_merged_like_duplicates() -> None:
    # A surrogate pair held as two code points and the astral character are the same JS key.
    assert dumps({"\ud83d\ude00": 1, "b": 2, "\U0001f600": 3}) == '{"\U0001f600":3,"b":2}'
    assert canonicalize('{"\ud83d\ude00":1,"b":2,"\U0001f600":3}') == '{"\U0001f600":3,"b":2}'


def test_nested_objects_are_ordered_too() -> None:
    assert dumps({"data": [{"2": "x", "1": "y", "k": {"5": 0, "z": 1, "3": 2}}]}) == (
        '{"data":[{"1":"y","2":"x","k":{"3":2,"5":0,"z":1}}]}'
    )


@pytest.mark.parametrize("key", [1, 1.5, None, True, -1, (1, 2)])
def test_non_string_keys_are_refused(key: object) -> None:
    with pytest.raises(CanonicalJSONError) as info:
        dumps({"outer": {key: 1}})  # type: ignore[dict-item]
    assert info.value.reason == "bad_key"
    assert '$["outer"]' in str(info.value)


# --------------------------------------------------------------------------- strings

STRINGS: list[tuple[str, str]] = [
    ("plain", '"plain"'),
    ('quote " backslash \\ slash /', '"quote \\" backslash \\\\ slash /"'),
    ("\b\f\n\r\t", '"\\b\\f\\n\\r\\t"'),
    ("\x00\x01\x0b\x1e\x1f", '"\\u0000\\u0001\\u000b\\u001e\\u001f"'),
    ("del \x7f c1 \x80\x9f nbsp \xa0", '"del \x7f c1 \x80\x9f nbsp \xa0"'),
    ("line \u2028 para \u2029", '"line \u2028 para \u2029"'),
    ("Zoë — 日本 \ufeff", '"Zoë — 日本 \ufeff"'),
    ("astral \U0001f600 \U0010ffff", '"astral \U0001f600 \U0010ffff"'),
    # A valid pair held as two code points is one character to JavaScript.
    ("pair \ud83d\ude00", '"pair \U0001f600"'),
    ("lone high \ud800 x", '"lone high \\ud800 x"'),
    ("lone low \udfff x", '"lone low \\udfff x"'),
    ("reversed \ude00\ud83d", '"reversed \\ude00\\ud83d"'),
    ("high then astral \ud83d\U0001f600", '"high then astral \\ud83d\U0001f600"'),
    ("ends high \udbff", '"ends high \\udbff"'),
    ("\ud800\ud800\udc00", '"\\ud800\U00010000"'),
]


@pytest.mark.parametrize(("text", "expected"), STRINGS)
def test_string_escaping_matches_javascript(text: str, expected: str) -> None:
    assert dumps(text) == expected
    assert dumps({text: text}) == f"{{{expected}:{expected}}}"


def test_every_control_character_is_escaped_like_javascript() -> None:
    short = {8: "\\b", 9: "\\t", 10: "\\n", 12: "\\f", 13: "\\r"}
    for code in range(0x20):
        expected = short.get(code, f"\\u{code:04x}")
        assert dumps(chr(code)) == f'"{expected}"'


def test_escaped_surrogates_in_text_are_canonicalized() -> None:
    assert canonicalize('"\\ud83d\\ude00"') == '"\U0001f600"'
    assert canonicalize('"\\uD800"') == '"\\ud800"'
    assert canonicalize('["\\u00e9\\u2028\\u001F\\/"]') == '["é\u2028\\u001f/"]'
    # A raw high surrogate followed by an escaped low one still forms a pair in JavaScript.
    assert canonicalize('"\ud83d\\ude00"') == '"\U0001f600"'


# --------------------------------------------------------------------------- loads


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" \t\n\r[1] \n", "[1]"),
        ("-0", "0"),
        ("-0.0", "0"),
        ("0e5", "0"),
        ("1E2", "100"),
        ("1.0", "1"),
        ("1e-400", "0"),
        ("[1e-7, 1e-6, 1e20, 1e21]", "[1e-7,0.000001,100000000000000000000,1e+21]"),
        ("1e25", "1e+25"),
        ("12345678901234567890.5", "12345678901234567000"),
        ("9007199254740993.0", "9007199254740992"),
        ("0.10000000000000001", "0.1"),
        ("9007199254740991", "9007199254740991"),
        ("-9007199254740991", "-9007199254740991"),
        ('{"a" : [ true , false , null ] }', '{"a":[true,false,null]}'),
        ('"\\u2028"', '"\u2028"'),
        ('{"__proto__":1}', '{"__proto__":1}'),
        ("[]", "[]"),
        ("{}", "{}"),
        ('""', '""'),
    ],
)
def test_canonicalize_matches_javascript(text: str, expected: str) -> None:
    assert canonicalize(text) == expected
    assert canonicalize(text.encode()) == expected


@pytest.mark.parametrize(
    "text", ["[1e-7,0.000001,1e+21]", '{"0":1,"a":[1.5,"\\ud800\u2028"]}', "-9007199254740991"]
)
def test_canonical_text_is_a_fixed_point(text: str) -> None:
    assert canonicalize(text) == text


def test_integral_floats_beyond_safe_range_are_a_fixed_point() -> None:
    # JavaScript writes the double 1e20 as "100000000000000000000"; read back, that integer
    # literal is one JavaScript keeps, so canonical text stays canonical.
    assert canonicalize("1e20") == "100000000000000000000"
    assert canonicalize("100000000000000000000") == "100000000000000000000"


def test_loads_returns_python_values() -> None:
    assert loads('{"a":[1,2.5,"x",null,true]}') == {"a": [1, 2.5, "x", None, True]}
    assert loads(b'{"caf\xc3\xa9":1}') == {"café": 1}
    assert type(loads("1")) is int
    assert type(loads("1.0")) is float


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("NaN", "non_finite_number"),
        ("[1,Infinity]", "non_finite_number"),
        ('{"x":-Infinity}', "non_finite_number"),
        ("1e400", "non_finite_number"),
        ("-1e400", "non_finite_number"),
        ("1" + "0" * 400, "unsafe_integer"),
        ("9007199254740993", "unsafe_integer"),
        ("-9007199254740993", "unsafe_integer"),
        ("1000000000000000000000", "unsafe_integer"),
        ("[1152921504606846976]", "unsafe_integer"),
        # Refused even where a later duplicate key would make JSON.parse drop it.
        ('{"a":1e400,"a":0}', "non_finite_number"),
        ('{"a":9007199254740993,"a":0}', "unsafe_integer"),
        ("", "invalid_json"),
        (" ", "invalid_json"),
        ("[1,]", "invalid_json"),
        ('{"a":1,}', "invalid_json"),
        ("{'a':1}", "invalid_json"),
        ("01", "invalid_json"),
        ("+1", "invalid_json"),
        (".5", "invalid_json"),
        ("1.", "invalid_json"),
        ("1e", "invalid_json"),
        ("0x10", "invalid_json"),
        ("[1 2]", "invalid_json"),
        ("[\u0661]", "invalid_json"),
        ("True", "invalid_json"),
        ("nul", "invalid_json"),
        ("{} x", "invalid_json"),
        ("\u00a0[]", "invalid_json"),
        ("[]\u2028", "invalid_json"),
        ('"\x01"', "invalid_json"),
        ('"tab\there"', "invalid_json"),
        ('"\\x41"', "invalid_json"),
        ('"\\u12"', "invalid_json"),
        ('"unterminated', "invalid_json"),
        ("\ufeff[]", "invalid_json"),
        ("//c\n[]", "invalid_json"),
    ],
)
def test_loads_refuses_what_javascript_would_refuse_or_alter(text: str, reason: str) -> None:
    with pytest.raises(CanonicalJSONError) as info:
        loads(text)
    assert info.value.reason == reason


def test_invalid_json_message_gives_the_position() -> None:
    with pytest.raises(CanonicalJSONError, match=r"line 2 column 3 \(char 6\)"):
        loads("[1,\n  ]")


def test_constant_message_gives_the_position() -> None:
    with pytest.raises(CanonicalJSONError, match=r"NaN .*char 8"):
        loads('{"NaN": NaN}')


def test_bom_is_refused_with_a_clear_message() -> None:
    with pytest.raises(CanonicalJSONError, match="byte order mark"):
        loads(b"\xef\xbb\xbf{}")


@pytest.mark.parametrize(
    "data",
    [
        b"\xff",
        b'"\xed\xa0\x80"',  # an encoded surrogate
        b'"\xc0\xaf"',  # overlong encoding of "/"
        b'"\xe2\x82"',  # truncated sequence
        b'"\xf4\x90\x80\x80"',  # beyond U+10FFFF
        b"\xff\xfe[\x00]\x00",  # UTF-16
    ],
)
def test_bytes_must_be_utf8(data: bytes) -> None:
    with pytest.raises(CanonicalJSONError) as info:
        loads(data)
    assert info.value.reason == "invalid_utf8"
    assert "byte" in str(info.value)


# --------------------------------------------------------------------------- depth


def _nested(depth: int) -> JSONValue:
    value: JSONValue = 0
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def test_nesting_up_to_max_depth_is_accepted() -> None:
    value = _nested(MAX_DEPTH)
    text = dumps(value)
    assert text.count("[") + text.count("{") == MAX_DEPTH
    assert canonicalize(text) == text
    assert loads(text) == value


def test_nesting_beyond_max_depth_is_refused() -> None:
    value = _nested(MAX_DEPTH + 1)
    with pytest.raises(CanonicalJSONError) as info:
        dumps(value)
    assert info.value.reason == "too_deep"
    text = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    with pytest.raises(CanonicalJSONError) as info:
        loads(text)
    assert info.value.reason == "too_deep"


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_very_deep_text_is_refused_without_recursion_error(depth: int) -> None:
    with pytest.raises(CanonicalJSONError) as info:
        loads("[" * depth + "]" * depth)
    assert info.value.reason == "too_deep"
    nested: list[JSONValue] = []
    for _ in range(depth):
        nested = [nested]
    with pytest.raises(CanonicalJSONError) as info:
        dumps(nested)
    assert info.value.reason == "too_deep"


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = '["' + "[{" * 300 + '\\"[", {"k": "]]]"}]'
    assert canonicalize(text) == '["' + "[{" * 300 + '\\"[",{"k":"]]]"}]'


def test_reference_cycle_is_refused() -> None:
    cycle: list[JSONValue] = []
    cycle.append(cycle)
    with pytest.raises(CanonicalJSONError) as info:
        dumps({"a": cycle})
    assert info.value.reason == "too_deep"


# --------------------------------------------------------------------------- types


class Colour(enum.IntEnum):
    RED = 1


class Kind(enum.StrEnum):
    BOOKING = "booking"


def test_subclasses_and_tuples_are_written_as_their_json_type() -> None:
    value = OrderedDict([("c", Colour.RED), ("k", Kind.BOOKING), ("t", (1, 2.0))])
    assert dumps(value) == '{"c":1,"k":"booking","t":[1,2]}'  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [{1, 2}, Decimal("1.5"), b"bytes", object()])
def test_unsupported_types_are_refused(bad: object) -> None:
    with pytest.raises(CanonicalJSONError) as info:
        dumps({"a": [bad]})  # type: ignore[list-item]
    assert info.value.reason == "unsupported_type"
    assert '$["a"][0]' in str(info.value)


# --------------------------------------------------------------------------- fast path


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # Text that looks like something JavaScript writes differently, inside strings only.
        ({"s": '"10":1.0,e+12,[12345678901234567'}, '{"s":"\\"10\\":1.0,e+12,[12345678901234567"}'),
        (
            {"id": "9b1deb4d-3b7d-4bad-9bdd-2b0d7b3e-123"},
            '{"id":"9b1deb4d-3b7d-4bad-9bdd-2b0d7b3e-123"}',
        ),
        (["2024-01-15T10:00:00Z", "10"], '["2024-01-15T10:00:00Z","10"]'),
        # The values themselves differ in the two encoders.
        ({"price": 39.5, "qty": 2.0}, '{"price":39.5,"qty":2}'),
        ({"x": [1e-5, 123456789012345]}, '{"x":[0.00001,123456789012345]}'),
        ({"t": True, "n": None, "f": False}, '{"t":true,"n":null,"f":false}'),
        ({"true": 1, "null": 2}, '{"true":1,"null":2}'),
        ({"s": "é\ud800"}, '{"s":"é\\ud800"}'),
        (-123456789012345, "-123456789012345"),
        (12.0, "12"),
        ("12", '"12"'),
    ],
)
def test_output_is_exact_whichever_encoder_is_used(value: JSONValue, expected: str) -> None:
    assert dumps(value) == expected


def test_typical_event_payload() -> None:
    payload: JSONValue = {
        "booking": {
            "id": "bk_01HMX",
            "customer": {"name": "Zoë Müller", "phone": "+49 30 1234567"},
            "price": {"amount": 39.5, "tax": 7.0, "currency": "EUR"},
            "slots": {"2": "b", "1": "a"},
            "starts_at": "2024-01-15T10:00:00Z",
        },
        "previous": None,
    }
    assert dumps(payload) == (
        '{"booking":{"id":"bk_01HMX","customer":{"name":"Zoë Müller","phone":"+49 30 1234567"},'
        '"price":{"amount":39.5,"tax":7,"currency":"EUR"},"slots":{"1":"a","2":"b"},'
        '"starts_at":"2024-01-15T10:00:00Z"},"previous":null}'
    )
