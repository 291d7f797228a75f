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
    where = f"{spec}:15: job 'j' group 'g' task 'bad'"  # the option's own line
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


def validate(spec: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nomad_driver.cli.main", "jobspec", "validate", *args, str(spec)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )


def test_validate_catches_a_wrong_type_and_a_bad_enum_value_each_with_its_line(
    tmp_path: Path,
) -> None:
    spec = tmp_path / "types.nomad"
    spec.write_text(
        SPEC.replace('comand = "/bin/true"', 'command = "/bin/true"\n        args = "-c"').replace(
            'command = "/bin/true"\n      }\n    }\n\n', 'network = "bridge"\n      }\n    }\n\n'
        )
    )
    done = validate(spec)
    assert done.returncode == 1
    assert f"{spec}:7: job 'j' group 'g' task 'ok': option 'network' = 'bridge'" in done.stderr
    assert f"{spec}:16: job 'j' group 'g' task 'bad': args: expected list" in done.stderr


def test_variables_resolve_from_defaults_and_var_and_a_missing_one_is_named(
    tmp_path: Path,
) -> None:
    spec = tmp_path / "vars.nomad"
    spec.write_text(
        'variable "image" {\n  type = string\n}\n'
        'variable "cmd" {\n  default = "/bin/true"\n}\n'
        'job "v" {\n  group "g" {\n    task "t" {\n      driver = "pyhpc"\n'
        '      config {\n        image   = var.image\n        command = "${var.cmd}"\n'
        "      }\n    }\n  }\n}\n"
    )
    missing = validate(spec)
    assert missing.returncode == 1
    assert "var.image has no default; give it with --var image=VALUE" in missing.stderr
    assert validate(spec, "--var", "image=/x.sqsh").returncode == 0
    bad = validate(spec, "--var", "image=relative.sqsh")
    assert bad.returncode == 1 and "'relative.sqsh'" in bad.stderr
    unknown = validate(spec, "--var", "imge=/x.sqsh")
    assert unknown.returncode == 1 and "--var imge: the jobspec declares no such variable" in (
        unknown.stderr
    )
