"""The `plugin "pyhpc"` block of a Nomad agent configuration, found where the agent finds it.

Agent configurations are HCL1 (quoted keys such as `"driver.denylist" = "docker"`, which
python-hcl2 rejects) or JSON, so they are read with pyhcl; jobspecs, HCL2, stay with python-hcl2.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import hcl

from nomad_driver.driver import config
from nomad_driver.wire import schema


def config_files(path: str) -> list[str]:
    """The files the agent loads for `-config PATH`: PATH itself, or for a directory its *.hcl
    and *.json files in lexical order (not subdirectories, nor Emacs lock files `.#name`,
    which the agent skips too)."""
    if not os.path.isdir(path):
        return [path]
    names = sorted(
        name
        for name in os.listdir(path)
        if name.endswith((".hcl", ".json"))
        and not name.startswith(".#")
        and not os.path.isdir(os.path.join(path, name))
    )
    if not names:
        raise schema.ConfigError(path, ["no *.hcl or *.json agent configuration files in it"])
    return [os.path.join(path, name) for name in names]


def plugin_config(files: Sequence[str], where: str) -> config.PluginConfig:
    """The `plugin "pyhpc" { config { ... } }` block of these agent files (config_files),
    decoded and checked like the agent's own copy. Where several files or blocks have one, the
    later non-empty config replaces the earlier whole, as the agent merges plugin blocks; none
    means every default. Problems name the file that the block came from (where, if none)."""
    options: dict[str, Any] = {}
    for path in files:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw.count(b"\n", 0, err.start) + 1
            raise schema.ConfigError(f"{path}:{line}", ["not UTF-8 text"]) from err
        found = _plugin_options(parse(text, path), path)
        if found:
            options, where = found, path
    return schema.load(config.PluginConfig, options, where)


def parse(text: str, path: str) -> dict[str, Any]:
    """One agent file as nested dicts; a syntax error is one ConfigError naming path:line."""
    if not text.strip():
        return {}  # pyhcl refuses a file of blanks; the agent reads it as empty
    try:
        parsed = hcl.loads(text)
    except json.JSONDecodeError as err:
        where = f"{path}:{err.lineno}:{err.colno}"
        raise schema.ConfigError(where, [f"not valid JSON: {err.msg}"]) from err
    except Exception as err:  # noqa: BLE001 - pyhcl raises ValueError, and others on odd input
        raise _syntax_error(text, path, err) from err
    if not isinstance(parsed, dict):
        raise schema.ConfigError(path, ["not an agent configuration (an HCL body or JSON object)"])
    return parsed


# pyhcl's messages: the lexer's "Line L, column C, index I: what", the parser's
# "Line L, column I: unexpected TOKEN; expected A, B, ..." (its "column" is an offset into the
# text) and "Unexpected end of file; expected ...".
_AT = re.compile(r"Line (\d+), column (\d+)(?:, index (\d+))?: (.*)", re.DOTALL)
_TOKEN = re.compile(r'"[^"\n]{0,40}"?|[\w.-]{1,40}|\S')


def _syntax_error(text: str, path: str, err: Exception) -> schema.ConfigError:
    message = str(err).split("; expected", 1)[0].strip()  # not ply's list of token names
    at = _AT.match(message)
    if message.startswith("Unexpected end of file"):
        pos = len(text.rstrip())
        what = "unexpected end of file: a block, list or string is not closed"
    elif at:
        line, what = int(at.group(1)), at.group(4).splitlines()[0]
        pos = int(at.group(3) or at.group(2))
        if _line(text, pos) != line:  # not an offset after all: keep the line alone
            return schema.ConfigError(f"{path}:{line}", [f"not valid HCL: {what}"])
        if what.startswith("unexpected "):  # the text itself, not the token's name
            token = _TOKEN.match(text, pos)
            shown = token.group(0) if token else ""
            what = "unexpected " + (shown if shown.startswith('"') else repr(shown))
    else:
        first = message.splitlines()[0] if message else type(err).__name__
        return schema.ConfigError(path, [f"not valid HCL: {first}"])
    column = pos - text.rfind("\n", 0, pos)
    return schema.ConfigError(f"{path}:{_line(text, pos)}:{column}", [f"not valid HCL: {what}"])


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _bodies(value: Any) -> list[dict[str, Any]]:
    """The bodies of a block: pyhcl gives one block as a dict, a repeated one (and Nomad's JSON
    form, `"plugin": [{"pyhpc": [{"config": [{...}]}]}]`) as a list of them."""
    items = value if isinstance(value, list) else [value]
    return [item for item in items if isinstance(item, dict)]


def _plugin_options(parsed: dict[str, Any], path: str) -> dict[str, Any]:
    """The options of the last non-empty `config` of a `plugin "pyhpc"` block in one file."""
    options: dict[str, Any] = {}
    for plugins in _bodies(parsed.get("plugin")):
        for block in _bodies(plugins.get(config.PLUGIN_NAME)):
            raw = block.get("config")
            bodies = _bodies(raw)
            if raw is not None and not bodies:
                shown = f'plugin "{config.PLUGIN_NAME}"'
                raise schema.ConfigError(path, [f"{shown}: config is a block, not {raw!r}"])
            options = next((body for body in reversed(bodies) if body), options)
    return options
