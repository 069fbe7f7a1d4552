"""JavaScript-canonical JSON: exactly the text JavaScript's ``JSON.stringify`` would produce.

Receivers compute the HMAC over ``JSON.stringify(JSON.parse(body))``, so every body we send must
survive that round trip byte for byte. Python's ``json`` differs from JavaScript in number
formatting, object key order and lone surrogates, and it accepts values JavaScript would change
(big integers, NaN, numbers that overflow). This module produces the JavaScript form and rejects
what cannot be sent unaltered. Pure functions, no I/O.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from json.encoder import encode_basestring
from typing import TypeAlias

from webhookd.errors import PayloadError

__all__ = [
    "MAX_DEPTH",
    "MAX_SAFE_INTEGER",
    "CanonicalJSONError",
    "JSONValue",
    "canonicalize",
    "dumps",
    "format_number",
    "loads",
]

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None

MAX_SAFE_INTEGER: int = 2**53 - 1  # JavaScript's Number.MAX_SAFE_INTEGER
MAX_DEPTH: int = 256  # deepest nesting of arrays/objects accepted; a scalar has depth 0
_MAX_ARRAY_INDEX = 2**32 - 2  # JS orders keys "0".."4294967294" first, ascending

# Integer literals of up to 15 digits are always safe (MAX_SAFE_INTEGER has 16 digits).
_SAFE_INTEGER_DIGITS = 15
# JavaScript writes integers below 1e21 in full; anything longer it writes with an exponent.
_MAX_INTEGER_LITERAL_DIGITS = 22
_DIGITS = frozenset("0123456789")
_SURROGATE_RE = re.compile("[\\ud800-\\udfff]")
_JSON_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKET_RE = re.compile(r"[\[\]{}]")
_BRACKET_DEPTH = {"[": 1, "{": 1, "]": -1, "}": -1}
_CONSTANT_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|(-?Infinity|NaN)')


class CanonicalJSONError(PayloadError):
    """A value or text cannot be sent as JavaScript-canonical JSON; ``reason`` says why.

    Reasons: ``invalid_json``, ``invalid_utf8``, ``non_finite_number``, ``unsafe_integer``,
    ``too_deep``, ``bad_key``, ``unsupported_type``.
    """


# --------------------------------------------------------------------------- numbers


def format_number(x: int | float) -> str:
    """Return JavaScript's ``Number.prototype.toString()`` of ``x`` as a double."""
    if isinstance(x, bool):
        raise CanonicalJSONError("unsupported_type", "a bool is not a number")
    if isinstance(x, int):
        return _format_int(x)
    return _format_float(x)


def _format_int(n: int) -> str:
    text = int.__repr__(n)
    if -MAX_SAFE_INTEGER <= n <= MAX_SAFE_INTEGER or _javascript_keeps(text):
        return text
    raise _unsafe_integer(text)


def _javascript_keeps(literal: str) -> bool:
    """Whether JavaScript reads this integer literal and writes it back unchanged. Beyond the
    safe range only some are: 2**53 is, 2**53 + 1 is not (it becomes 2**53), nor is 2**60
    (it is a double, but JavaScript writes it 1152921504606847000)."""
    try:
        return _format_float(float(literal)) == literal
    except (OverflowError, CanonicalJSONError):
        return False


def _format_float(x: float) -> str:
    if not math.isfinite(x):
        raise CanonicalJSONError(
            "non_finite_number",
            f"{x!r} is not a JSON number; JSON.stringify would send null instead",
        )
    text = float.__repr__(x)
    if "e" in text:
        return _from_exponent_repr(text)
    if text.endswith(".0"):
        # Integral and below 1e16: repr already wrote all digits; JS drops the ".0" and the sign
        # of negative zero.
        return "0" if x == 0.0 else text[:-2]
    return text  # 1e-4 <= |x| < 1e16 with a fraction: repr and JS agree digit for digit


def _from_exponent_repr(text: str) -> str:
    """Re-lay repr's shortest digits (``d[.ddd]e±NN``) by ECMAScript's Number::toString rules."""
    sign = ""
    if text[0] == "-":
        sign, text = "-", text[1:]
    mantissa, _, exponent = text.partition("e")
    digits = mantissa.replace(".", "")
    k = len(digits)
    n = int(exponent) + 1  # the value is 0.<digits> x 10**n
    if k <= n <= 21:
        body = digits + "0" * (n - k)
    elif 0 < n <= 21:
        body = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        body = "0." + "0" * -n + digits
    else:
        fraction = f".{digits[1:]}" if k > 1 else ""
        body = f"{digits[0]}{fraction}e{'+' if n > 0 else '-'}{abs(n - 1)}"
    return sign + body


def _unsafe_integer(literal: str) -> CanonicalJSONError:
    shown = literal if len(literal) <= 40 else f"{literal[:20]}...({len(literal)} digits)"
    try:
        becomes = _format_float(float(literal))
    except (OverflowError, ValueError, CanonicalJSONError):
        becomes = "Infinity"
    return CanonicalJSONError(
        "unsafe_integer",
        f"integer {shown} is beyond JavaScript's safe range ±{MAX_SAFE_INTEGER} and JavaScript "
        f"would change it to {becomes}. Send it as a string instead",
    )


# --------------------------------------------------------------------------- strings and keys


def _encode_str(s: str) -> str:
    if s.isascii() or _SURROGATE_RE.search(s) is None:
        return encode_basestring(s)
    # Lone surrogates stay; JSON.stringify writes them as lowercase \uXXXX escapes.
    return _SURROGATE_RE.sub(_escape_surrogate, encode_basestring(_merge_pairs(s)))


def _merge_pairs(s: str) -> str:
    """Join surrogate pairs held as two code points into the one astral character JS sees."""
    return s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


def _escape_surrogate(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _is_array_index(key: str) -> bool:
    return (
        key.isascii()
        and key.isdigit()
        and (key[0] != "0" or len(key) == 1)
        and (len(key) < 10 or int(key) <= _MAX_ARRAY_INDEX)
    )


# --------------------------------------------------------------------------- dumps


class _Failure(Exception):
    """Internal: a value that cannot be encoded, with the path to it built on the way out."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail
        self.path: list[str | int] = []


def dumps(value: JSONValue) -> str:
    """Return the exact text ``JSON.stringify`` produces for ``value`` (compact, unescaped).

    Tuples are written as arrays, as JavaScript has no other form for them.
    """
    text = _plain_dumps(value)
    if text is not None:
        return text
    try:
        return _encode(value, 0)
    except RecursionError:  # only when called from an already deep stack
        raise CanonicalJSONError("too_deep", _too_deep().detail) from None
    except _Failure as failure:
        where = "".join(
            f"[{p}]" if isinstance(p, int) else f"[{json.dumps(p)}]" for p in failure.path
        )
        at = f"${where}: " if where else ""
        raise CanonicalJSONError(failure.reason, f"{at}{failure.detail}") from None


# Cycles end in RecursionError and then the Python encoder reports them; cheaper than tracking.
_PLAIN_ENCODER = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, check_circular=False, separators=(",", ":")
)

# Patterns in the C encoder's output where JavaScript would write something else. Each has a
# literal first character so the regex engine can skip ahead; one alternation of all of them
# is several times slower. False alarms (the pattern inside a string) only cost the slow path.
_JS_DIFFERENCES = (
    # An index-like key ("10" is ordered first by JS) or a non-str key json turned into a string.
    re.compile(r'"(?:[\d-][^"\\]*|true|false|null)":'),
    re.compile(r"e[+-]\d\d"),  # a float in exponent form: repr and JS switch at other magnitudes
    re.compile(r"\.0[,\]}]"),  # an integral float: repr writes "1.0", JS "1"
    re.compile(r":-?\d{16}"),  # integers of 16+ digits may be beyond MAX_SAFE_INTEGER
    re.compile(r",-?\d{16}"),
    re.compile(r"\[-?\d{16}"),
)


def _plain_dumps(value: JSONValue) -> str | None:
    """The C encoder's output if JSON.stringify would write exactly the same, else None."""
    # Measured on a 1.2 kB booking payload (CPython 3.11): the C encoder plus these checks take
    # 28 us, the Python encoder 47 us (1.7x). Checks cost about as much as the encoding itself.
    try:
        text = _PLAIN_ENCODER.encode(value)
    except (TypeError, ValueError, RecursionError):
        return None  # the Python encoder raises the precise error
    if not text.isascii():
        try:
            text.encode("utf-8")  # fails exactly when a surrogate code point is present
        except UnicodeEncodeError:
            return None
    if text[-2:] == ".0" or text[:16].lstrip("-").isdigit():
        return None  # a top-level float or integer the patterns above cannot see
    if any(pattern.search(text) for pattern in _JS_DIFFERENCES):
        return None
    if text.count("[") + text.count("{") > MAX_DEPTH and _text_depth(text) > MAX_DEPTH:
        return None
    return text


def _encode(value: object, depth: int) -> str:
    if isinstance(value, str):
        return _encode_str(value)
    if isinstance(value, dict):
        return _encode_dict(value, depth + 1)
    if isinstance(value, list | tuple):
        return _encode_list(value, depth + 1)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    try:
        if isinstance(value, int):
            return _format_int(value)
        if isinstance(value, float):
            return _format_float(value)
    except CanonicalJSONError as exc:
        raise _Failure(exc.reason, str(exc)) from None
    raise _Failure(
        "unsupported_type",
        f"{type(value).__name__} is not a JSON type (use dict, list, str, int, float, bool, None)",
    )


def _too_deep() -> _Failure:
    return _Failure(
        "too_deep", f"nesting is deeper than {MAX_DEPTH} levels (or contains a reference cycle)"
    )


def _encode_list(items: list[object] | tuple[object, ...], depth: int) -> str:
    if depth > MAX_DEPTH:
        raise _too_deep()
    parts = []
    for index, item in enumerate(items):
        try:
            parts.append(_encode(item, depth))
        except _Failure as failure:
            failure.path.insert(0, index)
            raise
    return "[" + ",".join(parts) + "]"


def _encode_dict(obj: dict[object, object], depth: int) -> str:
    if depth > MAX_DEPTH:
        raise _too_deep()
    indices: list[str] = []
    surrogates = False
    for key in obj:
        if not isinstance(key, str):
            raise _Failure("bad_key", f"object key {key!r} is not a string")
        if key[:1] in _DIGITS and _is_array_index(key):
            indices.append(key)
        elif not key.isascii() and _SURROGATE_RE.search(key) is not None:
            surrogates = True
    if surrogates:
        # Two keys can be one string to JS (a pair held as two code points, and the astral
        # character itself); as in JS, the last value wins in the first key's position.
        obj = {_merge_pairs(key): value for key, value in obj.items()}  # type: ignore[arg-type]
    keys: list[str] = list(obj)  # type: ignore[arg-type]  # all checked to be str above
    if indices:
        # JS lists integer-index keys first in ascending order, then the rest as inserted.
        index_set = set(indices)
        keys = sorted(indices, key=int) + [k for k in keys if k not in index_set]
    parts = []
    for key in keys:
        try:
            parts.append(_encode_str(key) + ":" + _encode(obj[key], depth))
        except _Failure as failure:
            failure.path.insert(0, key)
            raise
    return "{" + ",".join(parts) + "}"


# --------------------------------------------------------------------------- loads


def _parse_int(literal: str) -> int:
    if len(literal) <= _SAFE_INTEGER_DIGITS:
        return int(literal)
    # Only integer literals are checked: a float literal such as 1e25 means the double JS
    # stores, but 9007199254740993 would silently become 9007199254740992.
    value = int(literal) if len(literal) <= _MAX_INTEGER_LITERAL_DIGITS else None
    if value is not None and (
        -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER or _javascript_keeps(int.__repr__(value))
    ):
        return value
    raise _unsafe_integer(literal)


def _parse_float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise CanonicalJSONError(
            "non_finite_number",
            f"number {literal[:40]} overflows a double; JavaScript would read it as Infinity and "
            "send null",
        )
    return value


class _ConstantFound(Exception):
    pass


def _parse_constant(name: str) -> object:
    raise _ConstantFound(name)


_DECODER = json.JSONDecoder(
    parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
)


def loads(text: str | bytes) -> JSONValue:
    """Parse ``text`` as JavaScript's ``JSON.parse`` would, rejecting anything it would alter.

    Integer literals beyond ±MAX_SAFE_INTEGER are refused unless JavaScript writes the same
    digits back (2**53 and 10**20 pass; 2**53 + 1 would become 2**53 and is refused).
    """
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CanonicalJSONError(
                "invalid_utf8", f"body is not valid UTF-8: {exc.reason} at byte {exc.start}"
            ) from None
    if text.startswith("\ufeff"):
        raise CanonicalJSONError(
            "invalid_json",
            "invalid JSON: text starts with a byte order mark (U+FEFF), which JSON.parse rejects",
        )
    try:
        value: JSONValue = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise CanonicalJSONError("invalid_json", f"invalid JSON: {exc}") from None
    except _ConstantFound as found:
        raise CanonicalJSONError(
            "non_finite_number",
            f"{found.args[0]} is not valid JSON (JSON.parse rejects it) at char "
            f"{_constant_position(text)}",
        ) from None
    except RecursionError:
        raise CanonicalJSONError("too_deep", _too_deep().detail) from None
    # Cheap bound first: nesting can never exceed the number of opening brackets.
    if text.count("[") + text.count("{") > MAX_DEPTH and _text_depth(text) > MAX_DEPTH:
        raise CanonicalJSONError("too_deep", _too_deep().detail)
    return value


def canonicalize(text: str | bytes) -> str:
    """Return the JavaScript-canonical form of JSON ``text``: ``dumps(loads(text))``."""
    return dumps(loads(text))


def _constant_position(text: str) -> int:
    # The scanner reached the constant, so every string before it is well formed.
    for match in _CONSTANT_RE.finditer(text):
        if match.group(1):
            return match.start()
    return -1  # pragma: no cover - the decoder only calls the hook on a constant


def _text_depth(text: str) -> int:
    """Nesting depth of valid JSON ``text`` (brackets inside strings ignored)."""
    brackets = _BRACKET_RE.findall(_JSON_STRING_RE.sub("", text))
    return max(accumulate(map(_BRACKET_DEPTH.__getitem__, brackets)), default=0)
