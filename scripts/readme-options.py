#!/usr/bin/env python3
"""Write the generated parts of docs/reference.md, which tests/test_readme.py checks:

- between <!-- options:begin --> and <!-- options:end -->: `pyhpc config-reference` (the plugin,
  task and pyhpc-gpu option tables, from their schema declarations);
- between <!-- cli:begin --> and <!-- cli:end -->: every `pyhpc` command, from its argparse
  parser (rendered here rather than pasted from --help, whose layout changes with the Python
  version and the terminal's width).

    scripts/readme-options.py            rewrite both sections
    scripts/readme-options.py --check    exit 1 naming the stale sections, change nothing
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "docs" / "reference.md"


def options_reference() -> str:
    return subprocess.run(
        [sys.executable, "-m", "nomad_driver.cli.main", "config-reference"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout.strip()


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _name(action: argparse.Action) -> str:
    if not action.option_strings:
        metavar = action.metavar or action.dest.upper()
        assert isinstance(metavar, str)
        if action.nargs in ("+", "*"):
            return f"{metavar}..."
        return f"[{metavar}]" if action.nargs == "?" else metavar
    flags = ", ".join(action.option_strings)
    if action.nargs == 0:
        return flags
    if isinstance(action.metavar, str):
        return f"{flags} {action.metavar}"
    if action.choices:
        return f"{flags} {{{','.join(map(str, action.choices))}}}"
    return f"{flags} {action.dest.upper()}"


def _default(action: argparse.Action) -> str:
    if not action.option_strings:
        return "" if action.nargs in ("?", "*", argparse.REMAINDER) else "required"
    if action.nargs == 0:
        return ""
    if action.required:
        return "required"
    if action.default in (None, "", [], argparse.SUPPRESS):
        return ""
    return f"`{action.default}`"


def _meaning(action: argparse.Action) -> str:
    text = (action.help or "").replace("%%", "%")
    if isinstance(action, argparse._AppendAction):
        text = f"{text}; repeatable" if text else "repeatable"
    if action.choices and action.metavar is None and action.option_strings:
        text = text or "one of " + ", ".join(f"`{c}`" for c in action.choices)
    return text


def _table(actions: list[argparse.Action]) -> list[str]:
    rows = ["| argument | default | meaning |", "|---|---|---|"]
    for a in actions:
        rows.append(f"| `{_cell(_name(a))}` | {_default(a)} | {_cell(_meaning(a))} |")
    return rows


def _commands(
    parser: argparse.ArgumentParser, path: str, summary: str
) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    yield path, summary, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, child in action.choices.items():
                yield from _commands(child, f"{path} {name}", helps.get(name, ""))


def cli_reference() -> str:
    """Every command of `pyhpc`: what it does, its arguments (by argument group), examples."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from nomad_driver.cli import main

    saved = os.environ.pop("PYHPC_STORE", None)  # `pyhpc image --store` defaults to it
    try:
        top = main.parser()
    finally:
        if saved is not None:
            os.environ["PYHPC_STORE"] = saved
    out: list[str] = []
    for path, summary, parser in _commands(top, "pyhpc", ""):
        out += [f"### `{path}`", ""]
        if summary:
            out += [summary[:1].upper() + summary[1:] + ".", ""]
        if parser.description:
            out += [" ".join(parser.description.split()), ""]
        # argparse's own two groups (positionals, options) as one table; named groups apart.
        tables: dict[str, list[argparse.Action]] = {}
        for group in parser._action_groups:
            own = group.title in ("positional arguments", "options", "optional arguments")
            tables.setdefault("" if own else str(group.title), []).extend(
                a
                for a in group._group_actions
                if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
            )
        for title, shown in tables.items():
            if shown:
                out += [f"{title}:", ""] if title else []
                out += [*_table(shown), ""]
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for action in subs:
            names = ", ".join(f"`{path} {n}`" for n in action.choices)
            out += [f"{action.metavar or 'COMMAND'}: {names}.", ""]
        if parser.epilog:
            out += ["```", parser.epilog.strip(), "```", ""]
    return "\n".join(out).strip()


def sections() -> dict[str, str]:
    return {"options": options_reference(), "cli": cli_reference()}


def replace(text: str, marker: str, body: str) -> str:
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def current(text: str, marker: str) -> str:
    return text.split(f"<!-- {marker}:begin -->")[1].split(f"<!-- {marker}:end -->")[0].strip()


def main() -> int:
    check = sys.argv[1:] == ["--check"]
    text = REFERENCE.read_text(encoding="utf-8")
    wanted = sections()
    if check:
        stale = [m for m, body in wanted.items() if current(text, m) != body]
        for marker in stale:
            print(f"{REFERENCE.relative_to(REPO)}: the {marker} section is stale", file=sys.stderr)
        if stale:
            print("run scripts/readme-options.py", file=sys.stderr)
        return 1 if stale else 0
    for marker, body in wanted.items():
        text = replace(text, marker, body)
    REFERENCE.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
