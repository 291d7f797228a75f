"""Checking the `config {}` of every pyhpc task in a jobspec before Nomad sees it.

Nomad's own parser evaluates the file when a `nomad` binary is on PATH (`nomad job run
-output`, no agent needed); python-hcl2 reads it otherwise. Either way python-hcl2's tree gives
the lines and the source form (a block written as `mpi = {...}`, an option set twice), and every
option of every task is checked against the TaskConfig declaration, each problem once."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hcl2.utils import SerializationOptions

from nomad_driver.driver import config, nomad_parser
from nomad_driver.driver.hcl_source import Node, SyntaxProblem, evaluate, parse
from nomad_driver.driver.hcl_source import variables_and_locals as _scope
from nomad_driver.wire import cty, schema

# How `-var-file` files are read (nomad_driver.cli.job_variables): plain values.
_OPTIONS = SerializationOptions(
    with_comments=False, explicit_blocks=False, strip_string_quotes=True, with_meta=True
)


@dataclass(frozen=True, order=True)
class Problem:
    """One problem at a line (and column, for syntax errors) of the jobspec, or of the
    -var-file named by file."""

    line: int
    column: int
    message: str
    file: str = ""


@dataclass(frozen=True)
class TaskReport:
    job: str
    group: str
    task: str
    line: int
    problems: tuple[Problem, ...]
    warnings: tuple[Problem, ...] = ()  # what --strict refuses: images that may change


@dataclass(frozen=True)
class Report:
    """What validation found: each pyhpc task, and the file's own problems (syntax errors,
    unset variables, Nomad's refusal)."""

    parser: str  # "nomad", "python-hcl2" or "json"
    tasks: tuple[TaskReport, ...] = ()
    problems: tuple[Problem, ...] = ()


@dataclass(frozen=True)
class Variables:
    """Input variables as `nomad job run` takes them (NOMAD_VAR_* < each -var-file < -var):
    their merged values; where each one given by -var or -var-file was named ("-var NAME",
    "-var-file FILE: NAME"), since those must be declared while the environment may hold
    NOMAD_VAR_* for other jobs; and the arguments and environment that hand them to Nomad."""

    values: Mapping[str, Any] = field(default_factory=dict)
    named_by: Mapping[str, str] = field(default_factory=dict)
    arguments: tuple[str, ...] = ()
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


def check(text: str, variables: Variables | None = None, nomad: str | None = None) -> Report:
    """Every problem of every pyhpc task in the jobspec text, parsed by the `nomad` binary at
    path nomad, else by python-hcl2 (a text starting with "{" is Nomad's JSON job format).
    ValueError, in one line, for a variable given that the jobspec does not declare or whose
    value does not fit its type."""
    variables = variables or Variables()
    if text.lstrip().startswith("{"):
        return _check_json(text)
    try:
        document: Node | None = parse(text)
    except SyntaxProblem as err:
        if nomad is None:
            return Report("python-hcl2", problems=(Problem(err.line, err.column, err.message),))
        document = None  # python-hcl2 reads less than Nomad does: Nomad decides
    problems: list[Problem] = []
    scope: dict[str, dict[str, Any]] = {"var": {}, "local": {}}
    if document is not None:
        declared = {b.labels[0] for b in document.blocks("variable") if b.labels}
        for name, where in variables.named_by.items():
            if name not in declared:
                raise ValueError(f"{where}: the jobspec declares no such variable")
        scope, unset = _scope(document, variables.values)
        for block in unset:
            name = block.labels[0]
            where = f"-var {name}=VALUE, in a -var-file or as NOMAD_VAR_{name}"
            problems.append(
                Problem(block.line, 0, f"var.{name} has no default; give it with {where}")
            )
    if nomad is not None and not problems:
        blanked = _without_repeats(text, document, scope)
        try:
            job = nomad_parser.job(nomad, blanked, variables.arguments, variables.environ)
        except nomad_parser.NomadRefused as err:
            problems.append(Problem(err.line, err.column, err.message, err.file))
        else:
            return Report("nomad", tuple(_nomad_tasks(text, job, document)))
    if document is None:
        return Report("nomad", problems=tuple(problems))
    tasks = tuple(_hcl_tasks(text, document, scope))
    lines = {p.line for t in tasks for p in t.problems}
    # Nomad refuses what a task problem already says (config = {...}): say it once.
    problems = [p for p in problems if p.file or p.line not in lines]
    return Report("python-hcl2", tasks, tuple(problems))


# -- where options are written ----------------------------------------------------------------


def _line_at(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


@dataclass(frozen=True)
class Lines:
    """Where the options of one config body are written: python-hcl2's nodes when it read the
    file (nodes=() when the body is not written out, e.g. made by a dynamic block), else the
    first match in the text after start."""

    text: str
    line: int  # the body's own line, for what is not written in it
    nodes: tuple[Node, ...] | None = None
    start: int = 0
    end: int | None = None

    def _matches(self, name: str) -> Iterator[re.Match[str]]:
        pattern = re.compile(rf'(?<![\w.$-])"?{re.escape(name)}"?\s*(?:[:=](?!=)|\{{)')
        end = len(self.text) if self.end is None else self.end
        return pattern.finditer(self.text, self.start, end)

    def _dynamic(self, name: str) -> Node | None:
        dynamic = (n for n in self.nodes or () if n.name == "dynamic" and n.labels[:1] == (name,))
        return next(dynamic, None)

    def of(self, name: str) -> int:
        if self.nodes is not None:
            node = next((n for n in self.nodes if n.name == name), self._dynamic(name))
            return node.line if node else self.line
        found = next(self._matches(name), None)
        return _line_at(self.text, found.start()) if found else self.line

    def block(self, name: str, k: int) -> Lines:
        """The k-th `name { }` block's own Lines."""
        if self.nodes is None:
            found = next((m for i, m in enumerate(self._matches(name)) if i == k), None)
            if found is None:
                return Lines(self.text, self.of(name), ())
            return Lines(self.text, _line_at(self.text, found.start()), None, found.end(), self.end)
        written = [n for n in self.nodes if n.name == name and n.body is not None]
        if k < len(written):
            return Lines(self.text, written[k].line, written[k].body, written[k].span[0])
        attribute = next((n for n in self.nodes if n.name == name), None)
        if attribute is not None:  # `mpi = {...}`: search inside its value
            return Lines(self.text, attribute.line, None, attribute.span[0], attribute.span[1])
        dynamic = self._dynamic(name)
        content = next(dynamic.blocks("content"), None) if dynamic else None
        if dynamic is not None:
            return Lines(self.text, dynamic.line, content.body if content else ())
        return Lines(self.text, self.line, ())


# -- the checks ---------------------------------------------------------------------------------

_REQUIRED = re.compile(r"option '(\w+)' is required")


def _interpolated(value: Any) -> bool:
    """Whether part of value is known only when the task runs ("${NOMAD_TASK_DIR}") or only to
    Nomad's evaluator (cty.UNKNOWN, from python-hcl2)."""
    if value is cty.UNKNOWN:
        return True
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, list | tuple):
        return any(_interpolated(v) for v in value)
    if isinstance(value, Mapping):
        return any(_interpolated(v) for v in value.values())
    return False


def _converted(value: Any, kind: cty.CtyType) -> Any:
    """value as HCL converts it to kind (2 to "2", "2" to 2, "true" to true); an interpolated
    string where a number or bool goes becomes UNKNOWN (Nomad converts it when the task runs)."""
    if kind.kind == "string" and isinstance(value, bool):
        return "true" if value else "false"
    if kind.kind == "string" and isinstance(value, int | float):
        return str(value)
    if kind.kind in ("number", "bool") and isinstance(value, str):
        if "${" in value:
            return cty.UNKNOWN
        if kind.kind == "bool" and value in ("true", "false"):
            return value == "true"
        if kind.kind == "number":
            try:
                return int(value) if value.strip().lstrip("-").isdigit() else float(value)
            except ValueError:
                return value
    if kind.elem is not None and isinstance(value, list | tuple):
        return [_converted(v, kind.elem) for v in value]
    if kind.elem is not None and isinstance(value, Mapping):
        return {k: _converted(v, kind.elem) for k, v in value.items()}
    return value


def _option_problems(cls: type[Any], name: str, value: Any) -> list[str]:
    """The problems of one option alone, in the declaration's own words. An interpolated value
    is judged by its type only."""
    spec = dict(schema.options(cls)).get(name)
    if spec is not None:
        value = _converted(value, cty.parse_type(spec.hcl_type))
        if value is cty.UNKNOWN:
            return []
        if _interpolated(value):
            try:
                cty.encode({name: value}, schema.object_type(cls))
            except (cty.CtyEncodeError, TypeError, ValueError) as err:
                return [str(err)]
            return []
    try:
        schema.load(cls, {name: value}, "")
    except schema.ConfigError as err:
        return [p for p in err.problems if (m := _REQUIRED.match(p)) is None or m.group(1) == name]
    return []


def _config_problems(
    cls: type[Any], values: Mapping[str, Any], lines: Lines, prefix: str = ""
) -> list[Problem]:
    """Every problem of a config body: each option checked on its own, so that one wrong type
    hides nothing else; blocks checked inside."""
    known = dict(schema.options(cls))
    found = []
    for name, value in values.items():
        spec = known.get(name)
        if spec is not None and spec.block is not None:
            found += _block_problems(name, spec, value, lines, prefix)
            continue
        line = lines.of(name)
        found += [Problem(line, 0, prefix + p) for p in _option_problems(cls, name, value)]
    for name, spec in known.items():
        if spec.required and name not in values:
            found += [Problem(lines.line, 0, prefix + p) for p in _option_problems(cls, name, None)]
    return found


def _block_problems(
    name: str, spec: schema.OptionSpec, value: Any, lines: Lines, prefix: str
) -> list[Problem]:
    if value is cty.UNKNOWN or spec.block is None:
        return []
    bodies = list(value) if isinstance(value, list | tuple) else [value]
    first = lines.block(name, 0).line
    found = []
    for k, body in enumerate(bodies):
        where = lines.block(name, k)
        if k:
            again = f"given again (first at line {first}): a task has at most one"
            found.append(Problem(where.line, 0, f"{prefix}{name} block {again}"))
        if body is cty.UNKNOWN:
            continue
        if not isinstance(body, Mapping):
            found.append(Problem(where.line, 0, f"{prefix}{name}: expected a block, got {body!r}"))
            continue
        inner = _config_problems(spec.block, body, where, f"{prefix}{name} block: ")
        found += inner
        if not inner and spec.check is not None and not _interpolated(body):
            if message := spec.check(schema.load(spec.block, body, name)):
                found.append(Problem(where.line, 0, f"{prefix}{name} block: {message}"))
    return found


def _form_problems(cls: type[Any], body: Sequence[Node], prefix: str = "") -> list[Problem]:
    """What Nomad's block decoding refuses but its `-output` JSON cannot show: an option set
    twice, a block written as an attribute (`mpi = {...}`)."""
    known = dict(schema.options(cls))
    first: dict[str, int] = {}
    found = []
    for node in body:
        spec = known.get(node.name)
        block = spec.block if spec is not None else None
        if node.body is not None:
            if block is not None:
                found += _form_problems(block, node.body, f"{prefix}{node.name} block: ")
            continue
        if node.name in first:
            again = f"set again (first at line {first[node.name]}): set each option once"
            found.append(Problem(node.line, 0, f"{prefix}option {node.name!r} {again}"))
            continue
        first[node.name] = node.line
        if block is not None:
            wanted = f"write {node.name} {{ ... }}, not {node.name} = {{ ... }}"
            found.append(Problem(node.line, 0, f"{prefix}{node.name} is a block: {wanted}"))
    return found


def _repeats(body: Sequence[Node]) -> Iterator[Node]:
    """Attributes set again in a body or in its blocks, which python-hcl2 keeps and Nomad
    refuses."""
    seen: set[str] = set()
    for node in body:
        if node.body is not None:
            yield from _repeats(node.body)
        elif node.name in seen:
            yield node
        else:
            seen.add(node.name)


# -- tasks as python-hcl2 reads them ----------------------------------------------------------


@dataclass(frozen=True)
class _Written:
    job: str
    group: str
    task: str
    node: Node

    @property
    def config(self) -> Node | None:
        return next(self.node.blocks("config"), None) or self.node.attribute("config")

    def lines(self, text: str) -> Lines:
        written = self.config
        if written is None:
            return Lines(text, self.node.line, ())
        if written.body is None:  # config = {...}
            return Lines(text, written.line, None, written.span[0], written.span[1])
        return Lines(text, written.line, written.body, written.span[0])

    def form_problems(self) -> list[Problem]:
        written = self.config
        if written is None:
            return []
        again = f"config block given again (first at line {written.line}): a task has one"
        found = [Problem(n.line, 0, again) for n in list(self.node.blocks("config"))[1:]]
        if written.body is None:
            return [*found, Problem(written.line, 0, "config is a block: write config { ... }")]
        return found + _form_problems(config.TaskConfig, written.body)


def _written_tasks(document: Node) -> Iterator[_Written]:
    for job in document.blocks("job"):
        for group in job.blocks("group"):
            for task in group.blocks("task"):
                yield _Written(job.labels[0], group.labels[0], task.labels[0], task)


def _is_pyhpc(task: Node, scope: Mapping[str, Mapping[str, Any]]) -> bool:
    driver = task.attribute("driver")
    return driver is not None and evaluate(driver.value, scope) == config.PLUGIN_NAME


def _values(body: Sequence[Node], scope: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A config body as Nomad's JSON gives it: blocks as lists of objects, an attribute given
    with a block of its name dropped (as Nomad drops it), the first of repeated attributes."""
    blocks = {n.name for n in body if n.body is not None and n.name != "dynamic"}
    values: dict[str, Any] = {}
    for node in body:
        if node.name == "dynamic":
            continue  # Nomad expands it; its content is not known here
        if node.body is not None:
            values.setdefault(node.name, []).append(_values(node.body, scope))
        elif node.name not in blocks and node.name not in values:
            values[node.name] = evaluate(node.value, scope)
    return values


def _hcl_tasks(text: str, document: Node, scope: dict[str, dict[str, Any]]) -> Iterator[TaskReport]:
    for written in _written_tasks(document):
        if not _is_pyhpc(written.node, scope):
            continue
        body = written.config
        if body is None:
            values: Any = {}
        elif body.body is None:
            values = evaluate(body.value, scope)
            values = values if isinstance(values, dict) else {}
        else:
            values = _values(body.body, scope)
        found = written.form_problems()
        found += _config_problems(config.TaskConfig, values, written.lines(text))
        yield _report(written.job, written.group, written.task, written.node.line, found, values)


def _report(
    job: str, group: str, task: str, line: int, found: list[Problem], values: Any = None
) -> TaskReport:
    return TaskReport(
        job, group, task, line, tuple(sorted(set(found))), tuple(mutable_images(values, line))
    )


def mutable_images(values: Any, line: int) -> list[Problem]:
    """A registry image or dataset named by tag: a re-run may get other bytes (pin it by
    digest, as @sha256:..., for a result others can reproduce)."""
    if not isinstance(values, Mapping):
        return []
    named = [("image", values.get("image"))]
    datasets = values.get("datasets")
    if isinstance(datasets, (list, tuple)):
        named += [("datasets", str(d).rpartition(":")[0]) for d in datasets]
    return [
        Problem(
            line,
            0,
            f"option {option!r} = {text!r} names a tag, which may move: pin it by digest "
            "(...@sha256:HEX) for a result others can reproduce",
        )
        for option, text in named
        if isinstance(text, str)
        and text.startswith(("docker://", "oras://"))
        and "@sha256:" not in text
    ]


def _without_repeats(text: str, document: Node | None, scope: Mapping[str, Any]) -> str:
    """text with the repeated options of pyhpc configs blanked out (lines kept), so that Nomad
    judges the rest of the file while those are reported as our own problems."""
    if document is None:
        return text
    spans = [
        n.span
        for w in _written_tasks(document)
        if _is_pyhpc(w.node, scope) and (c := w.config) is not None and c.body is not None
        for n in _repeats(c.body)
    ]
    for start, end in sorted(spans, reverse=True):
        text = text[:start] + re.sub(r"[^\n]", " ", text[start:end]) + text[end:]
    return text


# -- tasks as Nomad evaluates them ----------------------------------------------------------------


def _nomad_tasks(text: str, job: Mapping[str, Any], document: Node | None) -> Iterator[TaskReport]:
    job_name = str(job.get("Name") or job.get("ID") or "")
    for group in job.get("TaskGroups") or []:
        for task in group.get("Tasks") or []:
            if task.get("Driver") != config.PLUGIN_NAME:
                continue
            names = (job_name, str(group.get("Name")), str(task.get("Name")))
            values = task.get("Config") or {}
            source = _as_written(document, *names) if document is not None else None
            if source is not None:
                found = source.form_problems()
                lines, line = source.lines(text), source.node.line
            else:  # python-hcl2 could not read the file: search its text
                line = _line_of(text, ("job", names[0]), ("group", names[1]), ("task", names[2]))
                start = sum(len(s) for s in text.splitlines(keepends=True)[: max(line - 1, 0)])
                found, lines = [], Lines(text, line, None, start)
            found += _config_problems(config.TaskConfig, values, lines)
            yield _report(*names, line, found, values)


def _as_written(document: Node, job: str, group: str, task: str) -> _Written | None:
    """A task of Nomad's JSON where the file writes it: its own block, or the content of the
    dynamic block that made it (or made its group)."""
    node: Node | None = document
    for kind, label in (("job", job), ("group", group), ("task", task)):
        node = _block(node, kind, label) if node is not None else None
    return _Written(job, group, task, node) if node is not None else None


def _block(parent: Node, kind: str, label: str) -> Node | None:
    found = next(parent.blocks(kind, label), None)
    if found is not None:
        return found
    for dynamic in parent.blocks("dynamic", kind):
        for content in dynamic.blocks("content"):
            return Node(kind, dynamic.line, (label,), body=content.body, span=content.span)
    return None


def _line_of(text: str, *blocks: tuple[str, str]) -> int:
    """Line of the last block, found after each enclosing one (when python-hcl2 cannot read
    the file)."""
    pos = 0
    for kind, label in blocks:
        found = re.compile(rf'(?m)^\s*{kind}\s+"{re.escape(label)}"\s*\{{').search(text, pos)
        if found is None:
            return 0
        pos = found.start()
    return text.count("\n", 0, pos) + 1 + (text[pos] == "\n")


# -- Nomad's JSON job format ----------------------------------------------------------------------


def _check_json(text: str) -> Report:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        return Report("json", problems=(Problem(err.lineno, err.colno, err.msg),))
    job = document.get("Job", document) if isinstance(document, dict) else None
    if not isinstance(job, dict) or not isinstance(job.get("TaskGroups"), list):
        wanted = 'not a Nomad JSON job: expected {"Job": {...}} or a job with "TaskGroups"'
        return Report("json", problems=(Problem(1, 1, wanted),))
    tasks = []
    drivers = re.finditer(rf'"Driver"\s*:\s*"{config.PLUGIN_NAME}"', text)
    for group in job["TaskGroups"]:
        for task in (group.get("Tasks") or []) if isinstance(group, dict) else []:
            if not isinstance(task, dict) or task.get("Driver") != config.PLUGIN_NAME:
                continue
            driver = next(drivers, None)
            start = driver.start() if driver else 0
            line = _line_at(text, start) if driver else 1
            body = re.compile(r'"Config"\s*:\s*\{').search(text, start)
            lines = Lines(text, line, ())
            if body is not None:
                lines = Lines(text, _line_at(text, body.start()), None, body.end())
            values = task.get("Config")
            values = values if isinstance(values, dict) else {}
            job_name = str(job.get("Name") or job.get("ID"))
            names = (job_name, str(group.get("Name")), str(task.get("Name")))
            found = _config_problems(config.TaskConfig, values, lines)
            tasks.append(_report(*names, line, found, values))
    return Report("json", tuple(tasks))
