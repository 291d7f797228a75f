"""Encode and decode go-cty's msgpack wire format, the form in which Nomad sends plugin and task
configuration, checking plain Python values against an HCL type expression such as ``list(string)``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, TypeAlias, TypeVar

import msgpack

from nomad_driver.util.errors import InvalidArgument

__all__ = ["UNKNOWN", "CtyDecodeError", "CtyEncodeError", "CtyType", "TypeExprError", "TypeJSON"]
__all__ += ["decode", "encode", "parse_type"]

TypeJSON: TypeAlias = str | list["TypeJSON"] | dict[str, "TypeJSON"]
_T = TypeVar("_T")
_Leaf: TypeAlias = Callable[[Any, "CtyType", str], Any]

_PRIMITIVES: Final = ("string", "number", "bool", "any")
_COLLECTIONS: Final = ("list", "set", "map")
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_IDENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
# What Go's big.ParseFloat accepts in base 10, which is how cty reads numbers sent as strings.
_NUMBER_TEXT: Final = re.compile(r"[+-]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[Ii]nf)")
_TOKEN: Final = re.compile(r'(\s*)(?:([A-Za-z_][A-Za-z0-9_-]*)|("(?:[^"\\]|\\.)*")|(\S))')


class TypeExprError(InvalidArgument, ValueError):
    """An HCL type expression or a go-cty type JSON document is malformed."""


class CtyDecodeError(InvalidArgument, ValueError):
    """msgpack data does not match the declared cty type."""


class CtyEncodeError(InvalidArgument, ValueError):
    """A Python value cannot be written as the declared cty type."""


class _Unknown:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNKNOWN"

    # Naming the module global keeps pickle and copy from minting a second sentinel.
    def __reduce__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = _Unknown()
_UNKNOWN_EXT: Final = msgpack.ExtType(0, b"\x00")


@dataclass(frozen=True)
class CtyType:
    """A cty type: ``kind`` names a primitive or a constructor, whose one argument field is set."""

    kind: str
    elem: CtyType | None = None
    attrs: tuple[tuple[str, CtyType], ...] | None = None
    elems: tuple[CtyType, ...] | None = None

    def __post_init__(self) -> None:
        shape = (self.elem is not None, self.attrs is not None, self.elems is not None)
        wanted = {"list": 0, "set": 0, "map": 0, "object": 1, "tuple": 2}.get(self.kind)
        if self.kind not in _PRIMITIVES and wanted is None:
            raise TypeExprError(f"unknown type kind {self.kind!r}")
        if shape != tuple(i == wanted for i in range(3)):
            raise TypeExprError(f"malformed {self.kind} type")
        if self.attrs is not None:
            names = [name for name, _ in self.attrs]
            if dups := sorted({n for n in names if names.count(n) > 1}):
                raise TypeExprError(f"duplicate attribute {dups[0]!r}")
            # Canonical order makes equal object types compare equal and matches the wire order.
            object.__setattr__(self, "attrs", tuple(sorted(self.attrs, key=lambda a: a[0])))

    def __str__(self) -> str:
        if self.elem is not None:
            return f"{self.kind}({self.elem})"
        if self.elems is not None:
            return f"tuple([{', '.join(map(str, self.elems))}])"
        if self.attrs is not None:
            attrs = ", ".join(f"{_attr_name(n)} = {t}" for n, t in self.attrs)
            return f"object({{{attrs}}})"
        return self.kind

    def to_json(self) -> TypeJSON:
        """The type in go-cty's JSON form, as used inside the dynamic-value wrapper."""
        if self.elem is not None:
            return [self.kind, self.elem.to_json()]
        if self.elems is not None:
            return ["tuple", [e.to_json() for e in self.elems]]
        if self.attrs is not None:
            return ["object", {n: t.to_json() for n, t in self.attrs}]
        return "dynamic" if self.kind == "any" else self.kind

    @classmethod
    def from_json(cls, doc: Any) -> CtyType:
        """Read already-parsed go-cty type JSON; the inverse of ``to_json``."""
        if doc in ("string", "number", "bool", "dynamic"):
            return cls("any" if doc == "dynamic" else doc)
        if isinstance(doc, list) and len(doc) >= 2:
            kind, arg = doc[0], doc[1]
            if kind in _COLLECTIONS and len(doc) == 2:
                return cls(kind, elem=cls.from_json(arg))
            if kind == "tuple" and len(doc) == 2 and isinstance(arg, list):
                return cls(kind, elems=tuple(cls.from_json(e) for e in arg))
            # A third element lists optional attributes, which only matter for conversion.
            if kind == "object" and len(doc) <= 3 and isinstance(arg, dict):
                return cls(kind, attrs=tuple((str(n), cls.from_json(t)) for n, t in arg.items()))
        raise TypeExprError(f"invalid cty type JSON: {json.dumps(doc, default=repr)}")


_ANY: Final = CtyType("any")
# Python types that pass through unchanged in each direction (decoding never sees `any` here).
_PLAIN: Final[dict[str, Any]] = {"string": str, "bool": bool, "any": (str, bool)}
_LIST_OF_ANY: Final = CtyType("list", elem=_ANY)
_MAP_OF_ANY: Final = CtyType("map", elem=_ANY)


def _attr_name(name: str) -> str:
    return name if _IDENT.fullmatch(name) else json.dumps(name, ensure_ascii=False)


class _TypeParser:
    def __init__(self, expr: str) -> None:
        self.expr, self.at = expr, 0
        # Each token: kind, text, offset, and whether a newline came before it.
        self.tokens: list[tuple[str, str, int, bool]] = []
        for m in _TOKEN.finditer(expr):
            g = m.lastindex or 4
            self.tokens.append(
                ({2: "name", 3: "str"}.get(g, "punct"), m[g], m.start(g), "\n" in m[1])
            )
        self.tokens.append(("end", "", len(expr), False))

    def fail(self, message: str) -> TypeExprError:
        pos = self.tokens[self.at][2]
        return TypeExprError(f"invalid type expression {self.expr!r}: {message} at offset {pos}")

    def found(self) -> str:
        kind, text, _, _ = self.tokens[self.at]
        return "end of text" if kind == "end" else repr(text)

    def peek(self, text: str) -> bool:
        return self.tokens[self.at][0] == "punct" and self.tokens[self.at][1] == text

    def take(self, text: str) -> None:
        if not self.peek(text):
            raise self.fail(f"expected {text!r}, found {self.found()}")
        self.at += 1

    def items(self, close: str, item: Callable[[], _T], newline_separates: bool) -> list[_T]:
        out: list[_T] = []
        while not self.peek(close):
            out.append(item())
            if self.peek(","):
                self.at += 1
            elif not self.peek(close) and not (newline_separates and self.tokens[self.at][3]):
                raise self.fail(f"expected ',' or {close!r}, found {self.found()}")
        self.take(close)
        return out

    def type(self) -> CtyType:
        kind, name, _, _ = self.tokens[self.at]
        if kind != "name":
            raise self.fail(f"expected a type, found {self.found()}")
        if name not in _PRIMITIVES + _COLLECTIONS + ("tuple", "object"):
            raise self.fail(f"unknown type {name!r}")
        self.at += 1
        if name in _PRIMITIVES:
            return CtyType(name)
        self.take("(")
        if name in _COLLECTIONS:
            result = CtyType(name, elem=self.type())
        elif name == "tuple":
            self.take("[")
            result = CtyType(name, elems=tuple(self.items("]", self.type, False)))
        else:
            self.take("{")
            try:
                result = CtyType(name, attrs=tuple(self.items("}", self.attr, True)))
            except TypeExprError as exc:  # a duplicate name
                raise self.fail(str(exc)) from exc
        self.take(")")
        return result

    def attr(self) -> tuple[str, CtyType]:
        kind, text, _, _ = self.tokens[self.at]
        if kind not in ("name", "str"):
            raise self.fail(f"expected an attribute name, found {self.found()}")
        self.at += 1
        self.take(":" if self.peek(":") else "=")
        return (text if kind == "name" else str(json.loads(text)), self.type())


def parse_type(expr: str) -> CtyType:
    """Parse an HCL type expression such as ``object({a = string, b = list(number)})``."""
    parser = _TypeParser(expr)
    result = parser.type()
    if parser.tokens[parser.at][0] != "end":
        raise parser.fail(f"unexpected {parser.found()} after the type")
    return result


def _describe(value: Any) -> str:
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 40 else text[:36] + '..."'
    names = {list: "array", tuple: "array", dict: "map", bytes: "binary", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _error(kind: type[ValueError], path: str, message: str) -> ValueError:
    return kind(f"{path or '<root>'}: {message}")


def _mismatch(kind: type[ValueError], path: str, expected: str, got: Any) -> ValueError:
    return _error(kind, path, f"expected {expected}, got {_describe(got)}")


def _attr_path(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _key_path(path: str, key: str) -> str:
    return f"{path}[{json.dumps(key, ensure_ascii=False)}]"


def _walk(value: Any, ty: CtyType, path: str, err: type[ValueError], leaf: _Leaf) -> Any:
    """Shared shape check for both directions; ``leaf`` converts each element or attribute."""
    kind = ty.kind
    if ty.elem is not None and kind != "map" and isinstance(value, list | tuple):
        return [leaf(v, ty.elem, f"{path}[{i}]") for i, v in enumerate(value)]
    if ty.elems is not None and isinstance(value, list | tuple):
        if len(value) != len(ty.elems):
            raise _error(err, path, f"expected {len(ty.elems)} tuple elements, got {len(value)}")
        return [leaf(value[i], t, f"{path}[{i}]") for i, t in enumerate(ty.elems)]
    if kind in ("map", "object") and isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise _mismatch(err, path, "string keys", key)
        if ty.elem is not None:
            return {k: leaf(value[k], ty.elem, _key_path(path, k)) for k in sorted(value)}
        attrs = dict(ty.attrs or ())
        for key in value:
            if key not in attrs:
                raise _error(err, _attr_path(path, key), "unexpected attribute")
        return {n: leaf(value.get(n), t, _attr_path(path, n)) for n, t in attrs.items()}
    raise _mismatch(err, path, kind, value)


def decode(data: bytes, ty: CtyType) -> Any:
    """Decode go-cty msgpack bytes of type ``ty`` into plain Python values."""
    try:
        # cty has no extensions besides (refined) unknown values, so every ext code means unknown.
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=lambda c, b: UNKNOWN)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CtyDecodeError(f"malformed msgpack: {str(exc) or type(exc).__name__}") from exc
    return _from_wire(raw, ty, "")


def _from_wire(raw: Any, ty: CtyType, path: str) -> Any:
    # msgpack turns ext type -1 into a Timestamp without calling our hook.
    if raw is UNKNOWN or isinstance(raw, msgpack.Timestamp):
        return UNKNOWN
    if raw is None:
        return None
    if ty.kind == "any":
        return _from_dynamic(raw, path)
    if ty.kind == "number":
        return _number_from_wire(raw, path)
    if isinstance(raw, _PLAIN.get(ty.kind, ())):
        return raw
    return _walk(raw, ty, path, CtyDecodeError, _from_wire)


def _number_from_wire(raw: Any, path: str) -> int | float:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, float) and not math.isnan(raw):
        return int(raw) if raw.is_integer() else raw
    if isinstance(raw, str) and _NUMBER_TEXT.fullmatch(raw):
        exact = Decimal(raw)
        integral = exact.is_finite() and exact == exact.to_integral_value()
        return int(exact) if integral else float(exact)
    raise _mismatch(CtyDecodeError, path, "number", raw)


def _from_dynamic(raw: Any, path: str) -> Any:
    if isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], bytes):
        try:
            actual = CtyType.from_json(json.loads(raw[0]))
        except ValueError as exc:  # bad UTF-8, bad JSON or a TypeExprError
            raise _error(CtyDecodeError, path, f"bad dynamic value type: {exc}") from exc
        return _from_wire(raw[1], actual, path)
    # Nomad marshals with the concrete type, so `any` spots usually hold plain values.
    if isinstance(raw, list | dict):
        wider = _LIST_OF_ANY if isinstance(raw, list) else _MAP_OF_ANY
        return _walk(raw, wider, path, CtyDecodeError, _from_wire)
    if isinstance(raw, bytes):
        raise _mismatch(CtyDecodeError, path, "a cty value", raw)
    return raw


def encode(value: Any, ty: CtyType) -> bytes:
    """Encode ``value`` as type ``ty``, byte for byte as go-cty's msgpack.Marshal would."""
    wire = _to_wire(value, ty, "")
    try:
        packed: bytes = msgpack.Packer(use_bin_type=True, use_single_float=False).pack(wire)
    except (ValueError, TypeError) as exc:  # e.g. a lone surrogate in a str
        raise CtyEncodeError(f"cannot pack value: {exc}") from exc
    return packed


def _to_wire(value: Any, ty: CtyType, path: str) -> Any:
    """Convert to the exact shapes msgpack must write: sorted dicts, numbers as Go writes them."""
    if value is None:
        return None
    if value is UNKNOWN:
        return _UNKNOWN_EXT
    kind = ty.kind
    if isinstance(value, _PLAIN.get(kind, ())):
        return value
    if kind == "number" or (kind == "any" and isinstance(value, int | float | Decimal)):
        return _number_to_wire(value, path)
    if kind == "any":
        # `any` spots carry no type wrapper: Nomad marshals with the value's concrete type.
        if isinstance(value, set | frozenset):
            return _set_to_wire(value, _ANY, path)
        if isinstance(value, list | tuple | Mapping):
            wider = _MAP_OF_ANY if isinstance(value, Mapping) else _LIST_OF_ANY
            return _walk(value, wider, path, CtyEncodeError, _to_wire)
        raise _mismatch(CtyEncodeError, path, "a cty value", value)
    if kind == "set" and ty.elem is not None and isinstance(value, set | frozenset | list | tuple):
        return _set_to_wire(value, ty.elem, path)
    return _walk(value, ty, path, CtyEncodeError, _to_wire)


def _set_to_wire(value: Any, elem: CtyType, path: str) -> list[Any]:
    # A cty set holds each value once and iterates primitive elements in ascending order.
    unique: dict[bytes, Any] = {}
    for i, item in enumerate(value):
        wire = _to_wire(item, elem, f"{path}[{i}]")
        unique.setdefault(msgpack.packb(wire, use_bin_type=True), wire)
    if elem.kind not in ("string", "number", "bool"):
        return list(unique.values())

    def order(item: Any) -> tuple[int, Any]:
        if item is None or isinstance(item, msgpack.ExtType):
            return (1, 0)
        return (0, Decimal(item) if elem.kind == "number" else item)

    return sorted(unique.values(), key=order)


def _number_to_wire(value: Any, path: str) -> int | float | str:
    # Decimal() is exact for int and float, so one representation serves every input type.
    exact = Decimal(value) if isinstance(value, int | float | Decimal) else None
    if exact is None or exact.is_nan() or isinstance(value, bool):
        raise _mismatch(CtyEncodeError, path, "number", value)
    if exact.is_infinite():
        return float(exact)
    # Go's rule: exact int64, else exact float64, else the decimal text of the number.
    integral = exact == exact.to_integral_value()
    if integral and _INT64_MIN <= exact <= _INT64_MAX:
        return int(exact)
    as_float = float(exact)
    if math.isfinite(as_float) and Decimal(as_float) == exact:
        return as_float
    if integral:
        return str(int(exact))
    # big.Float.Text('f', -1) is positional with no trailing zeros.
    return format(exact, "f").rstrip("0").rstrip(".")
