"""Tests for the go-cty msgpack codec: round trips over generated types, and Go's exact bytes."""

from __future__ import annotations

import copy
import json
import math
import pickle
import re
from decimal import Decimal
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nomad_driver.wire.cty import (
    UNKNOWN,
    CtyDecodeError,
    CtyEncodeError,
    CtyType,
    TypeExprError,
    decode,
    encode,
    parse_type,
)

INT64 = 2**63
SCALARS = ("string", "number", "bool")
ANY = CtyType("any")
NUMBER = CtyType("number")

WORKED_TYPE = "object({args=list(string), command=string, debug=bool, ratio=number})"
WORKED_HEX = (
    "84a46172677391a26869a7636f6d6d616e64a92f62696e2f6563686fa56465627567c2a5726174696fa3302e31"
)


def pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


# --- strategies ---------------------------------------------------------------------------

names = st.from_regex(r"[a-z_][a-z0-9_-]{0,6}", fullmatch=True) | st.text(min_size=1, max_size=4)


def _compound(children: st.SearchStrategy[CtyType]) -> st.SearchStrategy[CtyType]:
    return st.one_of(
        children.map(lambda t: CtyType("list", elem=t)),
        children.map(lambda t: CtyType("map", elem=t)),
        # Sets are kept to scalar elements so the expected (sorted, deduplicated) order is simple.
        st.sampled_from(SCALARS).map(lambda k: CtyType("set", elem=CtyType(k))),
        st.lists(children, max_size=3).map(lambda ts: CtyType("tuple", elems=tuple(ts))),
        st.dictionaries(names, children, max_size=4).map(
            lambda d: CtyType("object", attrs=tuple(d.items()))
        ),
    )


types = st.recursive(st.sampled_from((*SCALARS, "any")).map(CtyType), _compound, max_leaves=6)

numbers = st.one_of(
    st.integers(-INT64, INT64 - 1),
    st.integers(INT64, 10**40),
    st.integers(-(10**40), -INT64 - 1),
    st.floats(allow_nan=False),
    st.decimals(allow_nan=False, allow_infinity=False, min_value=-(10**30), max_value=10**30),
    st.sampled_from([Decimal("0.1"), Decimal("-2.50"), Decimal("1E+30"), Decimal(10**20 + 1)]),
)

natural_values = st.recursive(
    st.none() | st.just(UNKNOWN) | st.booleans() | st.text(max_size=6) | numbers,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=6,
)


def values_for(ty: CtyType, nullable: bool = True) -> st.SearchStrategy[Any]:
    base = _base_values(ty)
    if not nullable:
        return base
    # About one value in six is null or unknown, at any depth.
    return st.integers(0, 5).flatmap(lambda n: st.sampled_from([None, UNKNOWN]) if n == 0 else base)


def _base_values(ty: CtyType) -> st.SearchStrategy[Any]:
    kind = ty.kind
    if kind == "string":
        return st.text(max_size=8)
    if kind == "number":
        return numbers
    if kind == "bool":
        return st.booleans()
    if kind == "any":
        return natural_values
    if ty.elem is not None and kind == "list":
        return st.lists(values_for(ty.elem), max_size=3)
    if ty.elem is not None and kind == "set":
        elem = ty.elem
        return st.lists(
            values_for(elem, nullable=False), max_size=4, unique_by=lambda v: expected(v, elem)
        )
    if ty.elem is not None:
        return st.dictionaries(st.text(max_size=5), values_for(ty.elem), max_size=3)
    if ty.elems is not None:
        return st.tuples(*(values_for(t) for t in ty.elems))
    assert ty.attrs is not None
    # Optional keys: attributes the user left out must come back as None.
    return st.fixed_dictionaries({}, optional={n: values_for(t) for n, t in ty.attrs})


typed_values = types.flatmap(lambda t: st.tuples(st.just(t), values_for(t)))


# --- the expected decoding, written independently of the module ---------------------------


class DecimalText:
    """Matches the canonical positional text Go writes for a number float64 cannot hold."""

    def __init__(self, value: Decimal) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, str)
            and re.fullmatch(r"-?[0-9]+(\.[0-9]*[1-9])?", other) is not None
            and Decimal(other) == self.value
        )

    def __hash__(self) -> int:
        return hash(self.value)

    def __repr__(self) -> str:
        return f"DecimalText({self.value})"


def decoded_number(v: Any) -> Any:
    if isinstance(v, float):
        return int(v) if v.is_integer() else v
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    return v


def wire_number(v: Any) -> Any:
    """What plain msgpack decoding yields for a number under `any`: Go's int/float64/text rule."""
    if isinstance(v, float) and not v.is_integer():
        return v
    exact = Decimal(v)
    if exact == exact.to_integral_value() and -INT64 <= exact < INT64:
        return int(exact)
    if Decimal(float(exact)) == exact:
        return float(exact)
    return DecimalText(exact)


def natural(v: Any) -> Any:
    if v is None or v is UNKNOWN or isinstance(v, str | bool):
        return v
    if isinstance(v, list):
        return [natural(x) for x in v]
    if isinstance(v, dict):
        return {k: natural(x) for k, x in v.items()}
    return wire_number(v)


def expected(v: Any, ty: CtyType) -> Any:
    if v is None or v is UNKNOWN:
        return v
    if ty.kind == "number":
        return decoded_number(v)
    if ty.kind == "any":
        return natural(v)
    if ty.elem is not None and ty.kind == "list":
        return [expected(x, ty.elem) for x in v]
    if ty.elem is not None and ty.kind == "set":
        return sorted(expected(x, ty.elem) for x in v)
    if ty.elem is not None:
        return {k: expected(x, ty.elem) for k, x in v.items()}
    if ty.elems is not None:
        return [expected(x, t) for x, t in zip(v, ty.elems, strict=True)]
    if ty.attrs is not None:
        return {n: expected(v.get(n), t) for n, t in ty.attrs}
    return v


# --- round trips --------------------------------------------------------------------------


@given(typed_values)
def test_round_trip(case: tuple[CtyType, Any]) -> None:
    ty, value = case
    assert decode(encode(value, ty), ty) == expected(value, ty)


@given(typed_values)
def test_maps_are_written_with_sorted_keys(case: tuple[CtyType, Any]) -> None:
    def check(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        keys = [k for k, _ in pairs]
        assert keys == sorted(keys)
        return dict(pairs)

    ty, value = case
    msgpack.unpackb(encode(value, ty), object_pairs_hook=check)


@given(typed_values)
def test_dynamic_wrapper_carries_the_real_type(case: tuple[CtyType, Any]) -> None:
    ty, value = case
    inner = msgpack.unpackb(encode(value, ty))
    wrapped = pack([json.dumps(ty.to_json()).encode(), inner])
    assert decode(wrapped, ANY) == decode(encode(value, ty), ty)


@given(types)
def test_type_expression_round_trip(ty: CtyType) -> None:
    assert parse_type(str(ty)) == ty
    assert CtyType.from_json(json.loads(json.dumps(ty.to_json()))) == ty


# --- the protocol fact sheet's worked example ---------------------------------------------


def test_worked_example_encodes_to_go_bytes() -> None:
    value = {"command": "/bin/echo", "args": ["hi"], "debug": False, "ratio": Decimal("0.1")}
    assert encode(value, parse_type(WORKED_TYPE)).hex() == WORKED_HEX


def test_worked_example_decodes() -> None:
    data = bytes.fromhex(WORKED_HEX)
    assert msgpack.unpackb(data) == {
        "args": ["hi"],
        "command": "/bin/echo",
        "debug": False,
        "ratio": "0.1",
    }
    decoded = decode(data, parse_type(WORKED_TYPE))
    assert decoded == {"args": ["hi"], "command": "/bin/echo", "debug": False, "ratio": 0.1}
    assert isinstance(decoded["ratio"], float)


def test_missing_object_attributes_are_nil_on_the_wire_and_none_back() -> None:
    ty = parse_type("object({b = number, a = string, c = list(bool)})")
    data = encode({"b": 1}, ty)
    assert data == pack({"a": None, "b": 1, "c": None})
    assert decode(pack({"b": 1}), ty) == {"a": None, "b": 1, "c": None}


# --- numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (1, "01"),
        (200, "ccc8"),
        (-1, "ff"),
        (-33, "d0df"),
        (INT64 - 1, "cf7fffffffffffffff"),
        (-INT64, "d38000000000000000"),
        (2.0, "02"),
        (-0.0, "00"),
        (1.5, "cb3ff8000000000000"),
        (math.inf, "cb7ff0000000000000"),
        (Decimal("-Infinity"), "cbfff0000000000000"),
        # Go tries float64 before text, so an exactly representable big integer is a double.
        (INT64, "cb43e0000000000000"),
        (99999999999999999999, pack("99999999999999999999").hex()),
        (Decimal("0.1"), "a3302e31"),
        (Decimal("0.10"), "a3302e31"),
        (Decimal("-2.50"), "cbc004000000000000"),
        (Decimal("12"), "0c"),
        (Decimal("1E+30"), pack("1" + "0" * 30).hex()),
    ],
)
def test_number_encoding_matches_go(value: Any, wire: str) -> None:
    assert encode(value, NUMBER).hex() == wire


@given(st.integers(-INT64, INT64 - 1))
def test_int64_values_use_the_smallest_msgpack_int(n: int) -> None:
    assert encode(n, NUMBER) == pack(n)


@given(st.floats(allow_nan=False).filter(lambda f: not f.is_integer()))
def test_non_integral_floats_are_float64(f: float) -> None:
    data = encode(f, NUMBER)
    assert data[0] == 0xCB and decode(data, NUMBER) == f


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("0.1", 0.1),
        ("12", 12),
        ("1e3", 1000),
        ("-2.5", -2.5),
        ("1.50", 1.5),
        (".5", 0.5),
        ("99999999999999999999", 99999999999999999999),
        ("Inf", math.inf),
        ("-inf", -math.inf),
    ],
)
def test_numbers_sent_as_strings_decode(text: str, number: float) -> None:
    got = decode(pack(text), NUMBER)
    assert got == number
    assert type(got) is type(number)


@given(st.integers())
def test_integral_number_strings_decode_to_exact_ints(n: int) -> None:
    got = decode(pack(str(n)), NUMBER)
    assert got == n and type(got) is int


@given(st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()))
def test_float_strings_decode_to_floats(f: float) -> None:
    assert decode(pack(repr(f)), NUMBER) == f


@pytest.mark.parametrize("text", ["abc", "", "1_000", " 1", "0x10", "NaN", "1e", "--1"])
def test_non_numeric_strings_are_rejected(text: str) -> None:
    with pytest.raises(CtyDecodeError, match="expected number"):
        decode(pack(text), NUMBER)


@pytest.mark.parametrize("value", [math.nan, Decimal("NaN"), True, "1", b"1", [1]])
def test_non_numbers_are_rejected_when_encoding(value: Any) -> None:
    with pytest.raises(CtyEncodeError, match="expected number"):
        encode(value, NUMBER)


# --- unknown values -----------------------------------------------------------------------


def test_unknown_sentinel() -> None:
    assert repr(UNKNOWN) == "UNKNOWN"
    assert copy.deepcopy(UNKNOWN) is UNKNOWN
    assert pickle.loads(pickle.dumps(UNKNOWN)) is UNKNOWN


@pytest.mark.parametrize("expr", ["string", "number", "any", "list(string)", WORKED_TYPE])
def test_unknown_encodings_decode_to_unknown(expr: str) -> None:
    ty = parse_type(expr)
    assert encode(UNKNOWN, ty) == b"\xd4\x00\x00"
    assert decode(b"\xd4\x00\x00", ty) is UNKNOWN
    refined = pack(msgpack.ExtType(12, pack({1: False, 2: "prefix"})))
    assert refined[0] != 0xD4
    assert decode(refined, ty) is UNKNOWN
    # Any extension code means unknown, including the one msgpack reserves for timestamps.
    assert decode(bytes.fromhex("d6ff00000000"), ty) is UNKNOWN


def test_unknown_inside_collections() -> None:
    ty = parse_type("object({args = list(string), env = map(number)})")
    data = pack({"args": ["a", msgpack.ExtType(0, b"\x00")], "env": {"X": msgpack.ExtType(5, b"")}})
    assert decode(data, ty) == {"args": ["a", UNKNOWN], "env": {"X": UNKNOWN}}


# --- the dynamic (`any`) wrapper ----------------------------------------------------------


@pytest.mark.parametrize(
    ("type_json", "inner", "value"),
    [
        ('"string"', "x", "x"),
        ('["list","number"]', [1, "0.1", 2.5], [1, 0.1, 2.5]),
        ('["map","bool"]', {"k": True}, {"k": True}),
        ('["object",{"a":"string","b":"number"}]', {"a": "x", "b": "12"}, {"a": "x", "b": 12}),
        ('["object",{"a":"string"},["a"]]', {"a": "x"}, {"a": "x"}),
        ('["tuple",["string","bool"]]', ["x", False], ["x", False]),
        ('"dynamic"', None, None),
        ('["set","string"]', msgpack.ExtType(0, b"\x00"), UNKNOWN),
    ],
)
def test_dynamic_wrapper_decodes(type_json: str, inner: Any, value: Any) -> None:
    assert decode(pack([type_json.encode(), inner]), ANY) == value


def test_any_accepts_plain_values_and_encodes_without_wrapper() -> None:
    ty = parse_type("object({name = string, extra = any})")
    assert decode(pack({"name": "n", "extra": {"k": [1, "x"]}}), ty) == {
        "name": "n",
        "extra": {"k": [1, "x"]},
    }
    assert encode({"name": "n", "extra": ["x", 1.5]}, ty) == pack(
        {"extra": ["x", 1.5], "name": "n"}
    )
    wrapped = pack({"name": "n", "extra": [b'["list","number"]', ["7"]]})
    assert decode(wrapped, ty) == {"name": "n", "extra": [7]}


@pytest.mark.parametrize(
    "data",
    [
        pack([b"not json", 1]),
        pack([b'"strin"', 1]),
        pack([b'["list"]', 1]),
        pack([b'"string"', 1]),
    ],
)
def test_bad_dynamic_wrapper_is_an_error(data: bytes) -> None:
    with pytest.raises(CtyDecodeError):
        decode(data, ANY)


# --- collections --------------------------------------------------------------------------


def test_sets_are_deduplicated_and_sorted() -> None:
    assert encode({"b", "a"}, parse_type("set(string)")) == pack(["a", "b"])
    assert encode([3, 1.0, 1, Decimal("1")], parse_type("set(number)")) == pack([1, 3])
    assert encode([True, False, True], parse_type("set(bool)")) == pack([False, True])


def test_maps_sort_keys_and_accept_tuples_for_lists() -> None:
    assert encode({"b": 1, "a": 2}, parse_type("map(number)")) == pack({"a": 2, "b": 1})
    assert encode(("x", "y"), parse_type("list(string)")) == pack(["x", "y"])


# --- errors name the path -----------------------------------------------------------------

ERROR_TYPE = parse_type(
    "object({args = list(string), resources = object({cpu = number}), env = map(string),"
    " pair = tuple([string, bool]), flag = bool})"
)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"args": ["a", "b", 3]}, "args[2]: expected string, got int"),
        ({"resources": {"cpu": "abc"}}, 'resources.cpu: expected number, got "abc"'),
        ({"env": {"PATH": 1}}, 'env["PATH"]: expected string, got int'),
        ({"pair": ["a"]}, "pair: expected 2 tuple elements, got 1"),
        ({"pair": ["a", "b"]}, 'pair[1]: expected bool, got "b"'),
        ({"flag": 1}, "flag: expected bool, got int"),
        ({"args": "x"}, 'args: expected list, got "x"'),
        ({"resources": {"cpu": 1, "mem": 2}}, "resources.mem: unexpected attribute"),
        ([1], "<root>: expected object, got array"),
    ],
)
def test_errors_name_the_path(value: Any, message: str) -> None:
    with pytest.raises(CtyDecodeError) as decoding:
        decode(pack(value), ERROR_TYPE)
    assert str(decoding.value) == message
    with pytest.raises(CtyEncodeError) as encoding:
        encode(value, ERROR_TYPE)
    assert str(encoding.value) == message


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x91", b"\x01\x02", b"\xa1\xff"])
def test_malformed_msgpack_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(CtyDecodeError, match="malformed msgpack"):
        decode(data, ANY)


def test_non_string_map_keys_are_rejected() -> None:
    with pytest.raises(CtyDecodeError, match="string keys"):
        decode(pack({1: 2}), parse_type("map(number)"))
    with pytest.raises(CtyEncodeError, match="string keys"):
        encode({1: 2}, ANY)


def test_values_without_a_cty_type_are_rejected() -> None:
    with pytest.raises(CtyEncodeError, match=r'^\["x"\]\[0\]: expected a cty value, got binary$'):
        encode({"x": [b"raw"]}, ANY)


# --- type expressions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "canonical"),
    [
        ("list(map(string))", "list(map(string))"),
        ("object({b=number, a=string})", "object({a = string, b = number})"),
        ("object({\n  b = number\n  a = string\n})", "object({a = string, b = number})"),
        ('object({"a b" = bool, c: any,})', 'object({"a b" = bool, c = any})'),
        ("tuple([ string , set(bool) ])", "tuple([string, set(bool)])"),
        ("tuple([])", "tuple([])"),
        ("object({})", "object({})"),
    ],
)
def test_type_expressions_print_canonically(expr: str, canonical: str) -> None:
    assert str(parse_type(expr)) == canonical


def test_type_json() -> None:
    assert parse_type("string").to_json() == "string"
    assert parse_type("any").to_json() == "dynamic"
    assert parse_type("list(string)").to_json() == ["list", "string"]
    assert parse_type("map(number)").to_json() == ["map", "number"]
    assert parse_type("object({a = string})").to_json() == ["object", {"a": "string"}]
    assert parse_type("tuple([bool, any])").to_json() == ["tuple", ["bool", "dynamic"]]


@pytest.mark.parametrize(
    ("expr", "bad"),
    [
        ("strin", "'strin'"),
        ("list(string", "end of text"),
        ("list()", "')'"),
        ("object({a = string, a = number})", "duplicate attribute 'a'"),
        ("tuple(string)", "'string'"),
        ("tuple([string number])", "'number'"),
        ("map(string) extra", "'extra'"),
        ("", "end of text"),
        ("object({a string})", "'string'"),
        ("list(#)", "'#'"),
    ],
)
def test_bad_type_expressions(expr: str, bad: str) -> None:
    with pytest.raises(TypeExprError) as raised:
        parse_type(expr)
    assert repr(expr) in str(raised.value)
    assert bad in str(raised.value)


@pytest.mark.parametrize("doc", ["float", ["list"], ["pair", "string"], ["object", ["a"]], 3])
def test_bad_type_json(doc: Any) -> None:
    with pytest.raises(TypeExprError):
        CtyType.from_json(doc)


def test_malformed_cty_types_are_rejected() -> None:
    with pytest.raises(TypeExprError):
        CtyType("list")
    with pytest.raises(TypeExprError):
        CtyType("wat")
    with pytest.raises(TypeExprError):
        CtyType("object", attrs=(("a", ANY), ("a", NUMBER)))
