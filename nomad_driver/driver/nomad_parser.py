"""The seam to Nomad's own jobspec parser: `nomad job run -output` evaluates a jobspec (variables,
locals, functions, dynamic blocks) and prints the job as JSON without contacting an agent."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from nomad_driver.util.errors import InvalidArgument

# "stdin:7,9-14: Attribute redefined; ..." (an HCL diagnostic), or "<nil>: Unset variable ...".
_DIAGNOSTIC = re.compile(
    r"^(?P<file>\S.*?):(?P<line>\d+),(?P<column>\d+)(?:-\d+(?:,\d+)?)?: (?P<m>.+)"
)
_UNPLACED = re.compile(r"^<nil>: (?P<m>.+)")
# The jobspec goes in on stdin: "defined at stdin:5,7-13" names the jobspec's line 5.
_STDIN = re.compile(r"\bstdin:(\d+),\d+(?:-\d+(?:,\d+)?)?")


class NomadRefused(InvalidArgument):
    """Nomad would not parse the jobspec: its first diagnostic, in one line. file is "" for the
    jobspec itself, else the -var-file the diagnostic is in; line 0 when Nomad names none."""

    def __init__(self, message: str, line: int = 0, column: int = 0, file: str = "") -> None:
        super().__init__(message)
        self.message, self.line, self.column, self.file = message, line, column, file


def find(environ: Mapping[str, str]) -> str | None:
    """The `nomad` binary on environ's PATH, if there is one."""
    return shutil.which("nomad", path=environ.get("PATH", os.defpath))


def job(
    nomad: str, text: str, arguments: Sequence[str], environ: Mapping[str, str]
) -> dict[str, Any]:
    """The job of the jobspec text as Nomad's API JSON (the object under "Job"). arguments
    (-var, -var-file) and environ's NOMAD_VAR_* are applied by Nomad itself. NomadRefused
    when it refuses the text."""
    try:
        done = subprocess.run(
            [nomad, "job", "run", "-output", *arguments, "-"],
            input=text,
            capture_output=True,
            text=True,
            env=dict(environ),
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise NomadRefused(f"could not run {nomad}: {err}") from err
    if done.returncode == 0:
        try:
            found = json.loads(done.stdout)
        except json.JSONDecodeError as err:
            raise NomadRefused(f"{nomad} printed no job: {err}") from err
        job = found.get("Job") if isinstance(found, dict) else None
        if isinstance(job, dict):
            return job
        raise NomadRefused(f"{nomad} printed no job")
    raise refusal(done.stderr + "\n" + done.stdout)


def refusal(output: str) -> NomadRefused:
    """Nomad's error output as one line: its first diagnostic, or else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        rest = " ".join(lines[i + 1 :])
        if found := _DIAGNOSTIC.match(line):
            name = found.group("file")
            file = "" if name in ("stdin", "-", "<stdin>") else name
            message = _STDIN.sub(r"line \1", " ".join(f"{found.group('m')} {rest}".split()))
            return NomadRefused(message, int(found.group("line")), int(found.group("column")), file)
        if found := _UNPLACED.match(line):
            return NomadRefused(" ".join(f"{found.group('m')} {rest}".split()))
    last = lines[-1] if lines else "nomad failed without a message"
    return NomadRefused(last.removeprefix("Error getting job struct: "))
