"""Checking the `config {}` of every pyhpc task in a jobspec before Nomad sees it."""

from __future__ import annotations

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
    import re

    pos = 0
    for kind, label in blocks:
        found = re.compile(rf'(?m)^\s*{kind}\s+"{re.escape(label)}"\s*\{{').search(text, pos)
        if found is None:
            return 0
        pos = found.start()
    return text.count("\n", 0, pos) + 1 + (text[pos] == "\n")


def check(text: str) -> list[TaskReport]:
    """One report per pyhpc task; raises ValueError when the text is not HCL."""
    try:
        parsed = hcl2.loads(text, serialization_options=_OPTIONS)
    except Exception as err:  # noqa: BLE001 - the parser raises many types
        raise ValueError(f"not a valid HCL jobspec: {err}") from err
    reports = []
    for job_name, job in _labelled(parsed.get("job", [])):
        for group_name, group in _labelled(job.get("group", [])):
            for task_name, task in _labelled(group.get("task", [])):
                if task.get("driver") != config.PLUGIN_NAME:
                    continue
                problems: tuple[str, ...] = ()
                try:
                    schema.load(config.TaskConfig, _config_values(task.get("config", {})), "")
                except schema.ConfigError as err:
                    problems = tuple(err.problems)
                line = _line_of(text, ("job", job_name), ("group", group_name), ("task", task_name))
                reports.append(TaskReport(job_name, group_name, task_name, line, problems))
    return reports


def plugin_config(text: str, where: str) -> config.PluginConfig:
    """The `plugin "pyhpc" { config { ... } }` block of an agent configuration file, decoded
    and checked like the agent's own copy; an absent block means every default."""
    try:
        parsed = hcl2.loads(text, serialization_options=_OPTIONS)
    except Exception as err:  # noqa: BLE001 - the parser raises many types
        raise schema.ConfigError(where, [f"not valid HCL: {err}"]) from err
    for name, block in _labelled(parsed.get("plugin", [])):
        if name == config.PLUGIN_NAME:
            return schema.load(config.PluginConfig, _config_values(block.get("config", {})), where)
    return schema.load(config.PluginConfig, {}, where)
