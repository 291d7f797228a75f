"""A jobspec read with python-hcl2: its blocks and attributes with their lines, and the values
python-hcl2 can give without Nomad's evaluator (literals, `var.X`, `local.X`). `pyhpc jobspec
validate` uses it for line numbers and the source form of options, and to check values when no
`nomad` binary is there to evaluate the file."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import hcl2
from hcl2.rules.base import AttributeRule, BlockRule
from hcl2.utils import SerializationOptions, process_escape_sequences

from nomad_driver.util.errors import InvalidArgument
from nomad_driver.wire.cty import UNKNOWN

# Strings keep their quotes, so a literal "a" and an expression a can be told apart.
_RAW = SerializationOptions(
    with_comments=False,
    explicit_blocks=False,
    strip_string_quotes=False,
    preserve_heredocs=False,
    preserve_scientific_notation=False,
)


@dataclass(frozen=True)
class Expression:
    """An expression left for Nomad to evaluate, e.g. `local.x` or `upper(var.y)`."""

    text: str


@dataclass(frozen=True)
class Template:
    """A quoted string or heredoc as written: escapes, `${...}` and `%{...}` still in it."""

    raw: str


@dataclass(frozen=True)
class Node:
    """One attribute (value set) or block (body set) of an HCL body, where it is written."""

    name: str
    line: int
    labels: tuple[str, ...] = ()
    value: Any = None
    body: tuple[Node, ...] | None = None
    span: tuple[int, int] = (0, 0)  # offsets in the text, end excluded

    def blocks(self, kind: str, label: str | None = None) -> Iterator[Node]:
        for node in self.body or ():
            if node.body is not None and node.name == kind:
                if label is None or node.labels[:1] == (label,):
                    yield node

    def attribute(self, name: str) -> Node | None:
        return next((n for n in self.body or () if n.body is None and n.name == name), None)


class SyntaxProblem(InvalidArgument, ValueError):
    """The text is not HCL: where, and what was found there, in one line."""

    def __init__(self, line: int, column: int, message: str) -> None:
        self.line, self.column, self.message = line, column, message
        super().__init__(f"{line}:{column}: {message}")


def parse(text: str) -> Node:
    """The document as a Node named "" whose body holds the top-level attributes and blocks;
    SyntaxProblem when python-hcl2 cannot read it."""
    try:
        tree = hcl2.parses(text)
    except Exception as err:  # noqa: BLE001 - lark and the transformer raise many types
        raise _syntax_problem(err) from None
    return Node("", 1, body=_body(tree.body))


def _body(rule: Any) -> tuple[Node, ...]:
    nodes = []
    for child in rule.children:
        meta = getattr(child, "_meta", None)
        line = getattr(meta, "line", 0) or 0
        span = (getattr(meta, "start_pos", 0) or 0, getattr(meta, "end_pos", 0) or 0)
        if isinstance(child, AttributeRule):
            name = str(child.identifier.serialize(_RAW))
            nodes.append(Node(name, line, value=_value(child.expression), span=span))
        elif isinstance(child, BlockRule):
            kind, *labels = (_label(label) for label in child.labels)
            nodes.append(Node(kind, line, tuple(labels), body=_body(child.body), span=span))
    return tuple(nodes)


def _label(rule: Any) -> str:
    text = str(rule.serialize(_RAW))
    return _unquote(text[1:-1]) if len(text) >= 2 and text[0] == text[-1] == '"' else text


def _value(expression: Any) -> Any:
    try:
        serialized = expression.serialize(_RAW)
    except Exception:  # noqa: BLE001 - an expression the serializer cannot render
        return Expression("?")
    return _literal(serialized)


def _literal(raw: Any) -> Any:
    """python-hcl2's serialization with quotes kept, as Template, Expression or plain values."""
    if isinstance(raw, str):
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            return Template(raw[1:-1])
        if raw.startswith("${") and raw.endswith("}"):
            return Expression(raw[2:-1].strip())
        return Expression(raw)
    if isinstance(raw, list):
        return [_literal(item) for item in raw]
    if isinstance(raw, dict):
        return {_key(k): _literal(v) for k, v in raw.items()}
    return raw


def _key(raw: str) -> str:
    return _unquote(raw[1:-1]) if len(raw) >= 2 and raw[0] == raw[-1] == '"' else raw


def _unquote(raw: str) -> str:
    return str(process_escape_sequences(raw)).replace("$${", "${").replace("%%{", "%{")


_TOKENS = {
    "$END": "end of file",
    "RBRACE": "'}'",
    "LBRACE": "'{'",
    "RSQB": "']'",
    "LSQB": "'['",
    "RPAR": "')'",
    "LPAR": "'('",
    "COMMA": "','",
    "EQ": "'='",
    "COLON": "':'",
    "DBLQUOTE": "'\"'",
    "NAME": "a name",
}


def _syntax_problem(err: Exception) -> SyntaxProblem:
    """One line from lark's multi-line dump: line, column, what was found and what was wanted."""
    line = int(getattr(err, "line", 0) or 0)
    column = int(getattr(err, "column", 0) or 0)
    token = getattr(err, "token", None)
    char = getattr(err, "char", None)
    if token is not None:
        value = str(token)
        if token.type == "$END":
            found = "end of file"
        elif not value.strip() or value.startswith(("\n", "\r")):
            found = "end of line"
        else:
            found = repr(value.strip().splitlines()[0][:20])
    elif char is not None:
        found = repr(char)
    else:
        first = str(err).strip().splitlines()
        return SyntaxProblem(line, column, first[0] if first else type(err).__name__)
    expected = set(getattr(err, "expected", None) or getattr(err, "allowed", None) or ())
    wanted = sorted(_TOKENS[e] for e in expected if e in _TOKENS)
    if "INT_LITERAL" in expected or ("DBLQUOTE" in expected and len(expected) > 4):
        wanted = ["a value"]
    hint = f" (expected {' or '.join(wanted)})" if wanted and len(wanted) <= 3 else ""
    return SyntaxProblem(line, column, f"unexpected {found}{hint}")


# Scope: {"var": {...}, "local": {...}}; a name without a known value is absent.
Scope = Mapping[str, Mapping[str, Any]]
_REFERENCE = re.compile(r"(var|local)\.([A-Za-z_][A-Za-z0-9_-]*)")
_INTERPOLATION = re.compile(r"(?<!\$)\$\{\s*(var|local)\.([A-Za-z_][A-Za-z0-9_-]*)\s*\}")


def evaluate(value: Any, scope: Scope) -> Any:
    """value with what python-hcl2 can know replaced: templates become strings, `var.X` and
    `local.X` their values; anything else Nomad would compute becomes cty's UNKNOWN."""
    if isinstance(value, list):
        return [evaluate(item, scope) for item in value]
    if isinstance(value, dict):
        return {k: evaluate(v, scope) for k, v in value.items()}
    if isinstance(value, Expression):
        whole = _REFERENCE.fullmatch(value.text)
        if whole and whole.group(2) in scope.get(whole.group(1), {}):
            return scope[whole.group(1)][whole.group(2)]
        return UNKNOWN
    if isinstance(value, Template):
        return _template(value.raw, scope)
    return value


def _template(raw: str, scope: Scope) -> Any:
    if re.search(r"(?<!%)%\{", raw):  # template directives: only Nomad can render them
        return UNKNOWN
    whole = _INTERPOLATION.fullmatch(raw)
    if whole:  # "${var.args}" keeps the variable's own type, as in HCL
        return scope.get(whole.group(1), {}).get(whole.group(2), UNKNOWN)

    def one(m: re.Match[str]) -> str:
        known = scope.get(m.group(1), {}).get(m.group(2), UNKNOWN)
        if isinstance(known, bool):
            return "true" if known else "false"
        if isinstance(known, str | int | float):
            return str(known)
        return m.group(0)  # left as an interpolation: the value is not judged, only its type

    return _unquote(_INTERPOLATION.sub(one, raw))


def type_name(node: Node) -> str:
    """A variable block's declared type as written (`string`, `list(string)`), else "any"."""
    declared = node.attribute("type")
    if declared is None:
        return "any"
    value = declared.value
    return value.text if isinstance(value, Expression) else str(value)


def typed(name: str, text: str, kind: str) -> Any:
    """A variable given as text (-var, NOMAD_VAR_) as its declared type: Nomad reads the text
    as an HCL expression unless the variable is a string."""
    if kind in ("string", "any"):
        return text
    if kind == "number":
        try:
            return int(text) if text.lstrip("-").isdigit() else float(text)
        except ValueError:
            raise ValueError(f"variable {name} is a number, not {text!r}") from None
    if kind == "bool":
        if text not in ("true", "false"):
            raise ValueError(f"variable {name} is true or false, not {text!r}")
        return text == "true"
    try:
        node = parse(f"v = {text}\n")
    except SyntaxProblem:
        raise ValueError(f"variable {name} is a {kind}, not {text!r}") from None
    value = evaluate(node.body[0].value if node.body else None, {})
    wanted = list if kind.startswith(("list", "set", "tuple")) else dict
    if not isinstance(value, wanted):
        raise ValueError(f"variable {name} is a {kind}, not {text!r}")
    return value


def variables_and_locals(
    document: Node, given: Mapping[str, Any]
) -> tuple[dict[str, dict[str, Any]], list[Node]]:
    """The values of `var.X` (given, else the default) and of `local.X` as far as they can be
    known, and the variable blocks that have neither a default nor a given value."""
    variables: dict[str, Any] = {}
    unset = []
    for block in document.blocks("variable"):
        if not block.labels:
            continue
        name = block.labels[0]
        default = block.attribute("default")
        if name in given:
            value = given[name]
            kind = type_name(block)
            variables[name] = typed(name, value, kind) if isinstance(value, str) else value
        elif default is not None:
            variables[name] = evaluate(default.value, {})
        else:
            unset.append(block)
    values: dict[str, dict[str, Any]] = {"var": variables, "local": {}}
    written = [n for block in document.blocks("locals") for n in block.body or () if n.body is None]
    for _ in range(len(written) + 1):  # each pass resolves one more step of local.a = local.b
        for node in written:
            value = evaluate(node.value, values)
            if not _has_unknown(value):
                values["local"][node.name] = value
    return values, unset


def _has_unknown(value: Any) -> bool:
    if value is UNKNOWN:
        return True
    if isinstance(value, list):
        return any(_has_unknown(v) for v in value)
    if isinstance(value, dict):
        return any(_has_unknown(v) for v in value.values())
    return False
