"""Checking the `config {}` of every pyhpc task in a jobspec before Nomad sees it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import hcl2
from hcl2.utils import SerializationOptions

from nomad_driver.driver import config
from nomad_driver.wire import schema

_OPTIONS = SerializationOptions(
    with_comments=False, explicit_blocks=False, strip_string_quotes=True, with_meta=True
)


@dataclass(frozen=True)
class TaskReport:
    job: str
    group: str
    task: str
    line: int
    problems: tuple[str, ...]
    lines: tuple[int, ...] = ()  # of each problem: the option's own line where it is found


def _labelled(blocks: Any) -> list[tuple[str, dict[str, Any]]]:
    """python-hcl2 gives `block "label" {}` as [{label: body}, ...]."""
    found = []
    for item in blocks if isinstance(blocks, list) else [blocks]:
        if isinstance(item, dict):
            found += [(label, body) for label, body in item.items() if isinstance(body, dict)]
    return found


def _config_values(block: Any) -> dict[str, Any]:
    body = block[0] if isinstance(block, list) and block else block
    if not isinstance(body, dict):
        return {}
    return {k: v for k, v in body.items() if not k.startswith("__")}


def _line_of(text: str, *blocks: tuple[str, str]) -> int:
    """Line of the last block, found after each enclosing one (python-hcl2 keeps no lines)."""
    pos = 0
    for kind, label in blocks:
        found = re.compile(rf'(?m)^\s*{kind}\s+"{re.escape(label)}"\s*\{{').search(text, pos)
        if found is None:
            return 0
        pos = found.start()
    return text.count("\n", 0, pos) + 1 + (text[pos] == "\n")


_VAR = re.compile(r"\$\{var\.([A-Za-z_][A-Za-z0-9_-]*)\}")


def _variables(parsed: dict[str, Any], given: dict[str, str]) -> dict[str, Any]:
    """Input variables: each `variable` block's default, overridden by given (as `-var`)."""
    declared = dict(_labelled(parsed.get("variable", [])))
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ValueError(f"--var {unknown[0]}: the jobspec declares no such variable")
    values = {}
    for name, block in declared.items():
        if name in given:
            values[name] = _typed(given[name], str(block.get("type", "string")), name)
        elif "default" in block:
            values[name] = block["default"]
    return values


def _typed(text: str, kind: str, name: str) -> Any:
    if kind == "number":
        try:
            return int(text) if text.lstrip("-").isdigit() else float(text)
        except ValueError:
            raise ValueError(f"--var {name}={text}: variable {name} is a number") from None
    if kind == "bool":
        if text not in ("true", "false"):
            raise ValueError(f"--var {name}={text}: variable {name} is true or false")
        return text == "true"
    return text


def _resolve(value: Any, variables: dict[str, Any], missing: set[str]) -> Any:
    """value with var.NAME references replaced; names without a value are added to missing."""
    if isinstance(value, list):
        return [_resolve(v, variables, missing) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, variables, missing) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    whole = _VAR.fullmatch(value)
    if whole:  # `image = var.image` keeps the variable's own type
        name = whole.group(1)
        if name in variables:
            return variables[name]
        missing.add(name)
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(1) in variables:
            return str(variables[m.group(1)])
        missing.add(m.group(1))
        return m.group(0)

    return _VAR.sub(one, value)


_NAMED = re.compile(r"^(?:\w+ block: )?(?:(?:unknown )?option '([A-Za-z_]+)'|([A-Za-z_]+):)")


def _option_line(text: str, task_line: int, problem: str) -> int:
    """Line of the option a problem names, the first assignment of it after the task's line."""
    named = _NAMED.match(problem)
    if not named:
        return 0
    name = named.group(1) or named.group(2)
    start = sum(len(line) for line in text.splitlines(keepends=True)[: max(task_line - 1, 0)])
    found = re.compile(rf"(?m)^[ \t]*{name}[ \t]*=").search(text, start)
    return text.count("\n", 0, found.start()) + 1 if found else 0


def check(text: str, given: dict[str, str] | None = None) -> list[TaskReport]:
    """One report per pyhpc task, with var.NAME references resolved from the variable blocks
    and given (`--var NAME=VALUE`); raises ValueError when the text is not HCL."""
    try:
        parsed = hcl2.loads(text, serialization_options=_OPTIONS)
    except Exception as err:  # noqa: BLE001 - the parser raises many types
        raise ValueError(f"not a valid HCL jobspec: {err}") from err
    variables = _variables(parsed, given or {})
    reports = []
    for job_name, job in _labelled(parsed.get("job", [])):
        for group_name, group in _labelled(job.get("group", [])):
            for task_name, task in _labelled(group.get("task", [])):
                if task.get("driver") != config.PLUGIN_NAME:
                    continue
                problems: tuple[str, ...] = ()
                missing: set[str] = set()
                values = _resolve(_config_values(task.get("config", {})), variables, missing)
                try:
                    schema.load(config.TaskConfig, values, "")
                except schema.ConfigError as err:
                    problems = tuple(err.problems)
                if missing:  # the values are not known, so neither are their problems
                    problems = tuple(
                        f"var.{name} has no default; give it with --var {name}=VALUE"
                        for name in sorted(missing)
                    )
                line = _line_of(text, ("job", job_name), ("group", group_name), ("task", task_name))
                lines = tuple(_option_line(text, line, p) or line for p in problems)
                reports.append(TaskReport(job_name, group_name, task_name, line, problems, lines))
    return reports
