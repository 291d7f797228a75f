"""`pyhpc jobspec validate`: every pyhpc task checked against the driver's own schema, with the
line of the task and a suggestion for a misspelt option."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SPEC = """job "j" {
  group "g" {
    task "ok" {
      driver = "pyhpc"
      config {
        image   = "/var/lib/pyhpc/images/busybox.sqsh"
        command = "/bin/true"
      }
    }

    task "bad" {
      driver = "pyhpc"
      config {
        image  = "docker://ubuntu:22.04"
        comand = "/bin/true"
      }
    }
  }
}
"""


def test_validate_names_the_line_the_option_and_a_suggestion(tmp_path: Path) -> None:
    spec = tmp_path / "j.nomad"
    spec.write_text(SPEC)
    done = subprocess.run(
        [sys.executable, "-m", "nomad_driver.cli.main", "jobspec", "validate", str(spec)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 1
    assert f"{spec}:3: job 'j' group 'g' task 'ok': ok" in done.stdout
    where = f"{spec}:11: job 'j' group 'g' task 'bad'"
    assert f"{where}: unknown option 'comand' (did you mean 'command'?)" in done.stderr
    assert "name the registry host explicitly" in done.stderr


def test_every_shipped_jobspec_is_valid() -> None:
    specs = sorted(str(p) for p in (REPO / "jobspecs").glob("*.nomad"))
    done = subprocess.run(
        [sys.executable, "-m", "nomad_driver.cli.main", "jobspec", "validate", *specs],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(": ok") >= len(specs)
