"""One declaration per configuration: a frozen dataclass whose fields carry their HCL type.

From that declaration come the hclspec sent to Nomad, the decoding of Nomad's cty msgpack,
`pyhpc jobspec validate` and the option tables in the README.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from nomad_driver.util.errors import InvalidArgument
from nomad_driver.wire import cty

if TYPE_CHECKING:
    from nomad_driver.proto import hclspec_pb2

T = TypeVar("T")
Check = Callable[[Any], str | None]
_META = "pyhpc.option"


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """How one option looks in HCL and how its value is checked."""

    hcl_type: str
    required: bool
    default: Any
    doc: str
    check: Check | None
    block: type[Any] | None = None  # a nested `name { ... }` block declared by this dataclass


class ConfigError(InvalidArgument, ValueError):
    """Every problem found in one configuration, each naming its option."""

    def __init__(self, where: str, problems: list[str]) -> None:
        self.where = where
        self.problems = problems
        super().__init__(f"invalid {where}: " + "; ".join(problems))


def option(
    hcl_type: str,
    *,
    default: Any = dataclasses.MISSING,
    doc: str = "",
    check: Check | None = None,
    secret: bool = False,
) -> Any:
    """Declare a dataclass field as an HCL option. No default means the option is required;
    a secret one is left out of the dataclass's repr (so of every log line and message)."""
    required = default is dataclasses.MISSING
    spec = OptionSpec(hcl_type, required, None if required else default, doc, check)
    return _field(spec, repr=not secret)


def block(cls: type[Any], *, doc: str = "", check: Check | None = None) -> Any:
    """Declare a dataclass field as an optional nested block (`name { ... }`) whose options
    cls declares; absent, the field is None."""
    return _field(OptionSpec(str(object_type(cls)), False, None, doc, check, cls))


def _field(spec: OptionSpec, repr: bool = True) -> Any:  # noqa: A002 - dataclasses' name
    if spec.required:
        return dataclasses.field(metadata={_META: spec}, repr=repr)
    return dataclasses.field(default=spec.default, metadata={_META: spec}, repr=repr)


def options(cls: type[Any]) -> list[tuple[str, OptionSpec]]:
    return [(f.name, f.metadata[_META]) for f in dataclasses.fields(cls) if _META in f.metadata]


def object_type(cls: type[Any]) -> cty.CtyType:
    attrs = ", ".join(f"{name} = {spec.hcl_type}" for name, spec in options(cls))
    return cty.parse_type(f"object({{{attrs}}})")


def hcl_literal(value: Any) -> str:
    """Render a Python default as the HCL expression text a hclspec Literal carries."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(hcl_literal(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {hcl_literal(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(f"no HCL literal for {value!r}")


def hclspec(cls: type[Any]) -> hclspec_pb2.Spec:
    """The hclspec Object Nomad decodes the HCL block against."""
    # protobuf loads here only: `pyhpc run` decodes configs but never sends a spec to Nomad.
    from nomad_driver.proto import hclspec_pb2

    attributes: dict[str, hclspec_pb2.Spec] = {}
    for name, spec in options(cls):
        if spec.block is not None:
            nested = hclspec_pb2.Block(name=name, required=False, nested=hclspec(spec.block))
            attributes[name] = hclspec_pb2.Spec(block_value=nested)
            continue
        attr = hclspec_pb2.Attr(name=name, type=spec.hcl_type, required=spec.required)
        if spec.required or spec.default is None:
            attributes[name] = hclspec_pb2.Spec(Attr=attr)
        else:
            # Default{} does not pass the object key down: the Attr needs its own name.
            attributes[name] = hclspec_pb2.Spec(
                default=hclspec_pb2.Default(
                    primary=hclspec_pb2.Spec(Attr=attr),
                    default=hclspec_pb2.Spec(
                        literal=hclspec_pb2.Literal(value=hcl_literal(spec.default))
                    ),
                )
            )
    return hclspec_pb2.Spec(object=hclspec_pb2.Object(attributes=attributes))


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def load(cls: type[T], raw: bytes | Mapping[str, Any], where: str) -> T:
    """Build cls from Nomad's msgpack (or an already-parsed mapping), checking every option."""
    problems: list[str] = []
    known = dict(options(cls))
    if isinstance(raw, (bytes, bytearray)):
        try:
            values = cty.decode(bytes(raw), object_type(cls)) if raw else {}
        except cty.CtyDecodeError as err:
            raise ConfigError(where, [str(err)]) from err
        if values is None or values is cty.UNKNOWN:
            values = {}
    else:
        values = dict(raw)
        for extra in sorted(set(values) - set(known)):
            close = difflib.get_close_matches(extra, known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(known))}"
            problems.append(f"unknown option {extra!r} ({hint})")
        # Blocks are checked by their own declaration (_nested), with their own messages.
        blocks = {k: values[k] for k, s in known.items() if s.block is not None and k in values}
        plain = {k: v for k, v in values.items() if k in known and k not in blocks}
        try:
            values = cty.decode(cty.encode(plain, object_type(cls)), object_type(cls))
        except (cty.CtyDecodeError, TypeError, ValueError) as err:
            raise ConfigError(where, problems + [str(err)]) from err
        values.update(blocks)
    kwargs: dict[str, Any] = {}
    for name, spec in known.items():
        value = values.get(name)
        if value is None or value is cty.UNKNOWN:
            if spec.required:
                problems.append(f"option {name!r} is required ({spec.hcl_type}): {spec.doc}")
                continue
            value = spec.default
        elif spec.block is not None:
            try:
                value = _nested(spec.block, value, name)
            except ConfigError as err:
                problems += [f"{name} block: {p}" for p in err.problems]
                continue
            if spec.check is not None and (message := spec.check(value)):
                problems.append(f"{name} block: {message}")
                continue
        elif spec.check is not None:
            message = spec.check(value)
            if message:
                problems.append(f"option {name!r} = {value!r}: {message}")
                continue
        kwargs[name] = _freeze(value)
    if problems:
        raise ConfigError(where, problems)
    return cls(**kwargs)


def _nested(cls: type[Any], value: Any, name: str) -> Any:
    """A block's value: Nomad gives an object, python-hcl2 a list of one mapping."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ConfigError(name, [f"at most one {name} block, not {len(value)}"])
        value = value[0]
    if not isinstance(value, Mapping):
        raise ConfigError(name, [f"expected a block, got {value!r}"])
    odd = [k for k in value if not isinstance(k, str)]
    if odd:
        raise ConfigError(name, [f"option names are strings, not {odd[0]!r}"])
    return load(cls, {k: v for k, v in value.items() if not k.startswith("__")}, name)


def markdown_table(cls: type[Any], prefix: str = "") -> str:
    """The option table the README shows, generated so it cannot drift from the code."""
    rows = [] if prefix else ["| option | type | default | meaning |", "|---|---|---|---|"]
    for name, spec in options(cls):
        if spec.block is not None:
            rows.append(f"| `{prefix}{name} {{ }}` | block | unset | {spec.doc} |")
            rows.append(markdown_table(spec.block, f"{prefix}{name}."))
            continue
        default = "required" if spec.required else f"`{hcl_literal(spec.default)}`"
        if not spec.required and spec.default is None:
            default = "unset"
        rows.append(f"| `{prefix}{name}` | `{spec.hcl_type}` | {default} | {spec.doc} |")
    return "\n".join(rows)
