"""`pyhpc jobspec validate`: every pyhpc task checked against the driver's own schema, each
problem once with its line, whether Nomad's parser (a `nomad` binary on PATH) or python-hcl2
reads the file. Tests that take `env` run once with each parser."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nomad_driver.driver import nomad_parser

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
VALID = sorted((FIXTURES / "valid").glob("*.nomad"))
SHIPPED = sorted((REPO / "jobspecs").glob("*.nomad"))


def _nomad_binary() -> Path | None:
    """The Nomad that scripts/testbed/build.sh builds, if it has been built."""
    cache = os.environ.get("PYHPC_TESTBED_CACHE") or os.path.expanduser("~/.cache/pyhpc/testbed")
    found = sorted(glob.glob(os.path.join(cache, "nomad-*", "nomad")))
    return Path(found[-1]) if found else None


@pytest.fixture(params=["nomad", "python-hcl2"])
def env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment of a `pyhpc` run: with the test bed's nomad first on PATH, or with no
    nomad on PATH at all; no NOMAD_VAR_* from outside."""
    found = {k: v for k, v in os.environ.items() if not k.startswith("NOMAD_VAR_")}
    path = [d for d in found.get("PATH", "").split(os.pathsep) if d]
    path = [d for d in path if not (Path(d) / "nomad").exists()]
    if request.param == "nomad":
        binary = _nomad_binary()
        if binary is None:
            pytest.skip("no Nomad build: run scripts/testbed/build.sh nomad")
        path.insert(0, str(binary.parent))
    found["PATH"] = os.pathsep.join(path)
    return found


def validate(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nomad_driver.cli.main", "jobspec", "validate", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**(env or dict(os.environ)), "PYTHONPATH": str(REPO)},
    )


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


def test_validate_names_the_line_the_option_and_a_suggestion(
    tmp_path: Path, env: dict[str, str]
) -> None:
    spec = tmp_path / "j.nomad"
    spec.write_text(SPEC)
    done = validate(spec, env=env)
    assert done.returncode == 1
    assert f"{spec}:3: job 'j' group 'g' task 'ok': ok" in done.stdout
    where = f"{spec}:15: job 'j' group 'g' task 'bad'"  # the option's own line
    assert f"{where}: unknown option 'comand' (did you mean 'command'?)" in done.stderr
    assert "name the registry host explicitly" in done.stderr


def test_validate_catches_a_wrong_type_and_a_bad_enum_value_each_with_its_line(
    tmp_path: Path, env: dict[str, str]
) -> None:
    spec = tmp_path / "types.nomad"
    spec.write_text(
        SPEC.replace('comand = "/bin/true"', 'command = "/bin/true"\n        args = "-c"').replace(
            'command = "/bin/true"\n      }\n    }\n\n', 'network = "bridge"\n      }\n    }\n\n'
        )
    )
    done = validate(spec, env=env)
    assert done.returncode == 1
    assert f"{spec}:7: job 'j' group 'g' task 'ok': option 'network' = 'bridge'" in done.stderr
    assert f"{spec}:16: job 'j' group 'g' task 'bad': args: expected list" in done.stderr


# (line, task, what the problem says) for tests/driver/fixtures/jobspecs/mistakes.nomad
MISTAKES = [
    (16, "first", "option 'image' = 'ubuntu:22.04'"),  # through local.image
    (17, "first", "unknown option 'comand' (did you mean 'command'?)"),
    (18, "first", 'args: expected list, got "-c"'),
    (19, "first", "option 'network' = 'bridge': must be \"host\" or \"none\""),
    (20, "first", "option 'work_dir' = 'tmp': must be an absolute path"),
    (22, "first", "option 'writable' set again (first at line 21)"),
    (23, "first", "command: expected string, got array"),
    (24, "first", "option 'image_pull_timeout' = '5 minutes': must be a duration"),
    (25, "first", "mpi is a block: write mpi { ... }, not mpi = { ... }"),
    (27, "first", "mpi block: option 'mode' = 'everywhere'"),
    (35, "second", "option 'image' is required"),
    (37, "second", "option 'hostname' = '-bad': must be a host name"),
    (38, "second", "unknown capabilities ['SYS_ADMINN']"),
    (39, "second", "option 'devices' = ['dev/fuse']"),
    (43, "second", "mpi block: option 'ranks_per_node' = 0: must be a whole number 1-4096"),
    (44, "second", "mpi block: unknown option 'implmentation' (did you mean 'implementation'?)"),
    (47, "second", "mpi block given again (first at line 41)"),
]


def test_a_file_with_many_mistakes_lists_each_once_on_its_line(env: dict[str, str]) -> None:
    spec = FIXTURES / "jobspecs" / "mistakes.nomad"
    done = validate(spec, env=env)
    assert done.returncode == 1
    reported = done.stderr.splitlines()
    for line, task, problem in MISTAKES:
        prefix = f"{spec}:{line}: job 'mistakes' group 'g' task '{task}': "
        hits = [r for r in reported if r.startswith(prefix) and problem in r]
        assert len(hits) == 1, (line, problem, done.stderr)
    assert len(reported) == len(MISTAKES), done.stderr  # nothing else, nothing twice
    # work_dir = "${NOMAD_TASK_DIR}" (line 36) is valid: it is known when the task starts
    assert f"{spec}:36:" not in done.stderr


@pytest.mark.parametrize("spec", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_jobspec_is_valid(spec: Path, env: dict[str, str]) -> None:
    done = validate(spec, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert ": ok" in done.stdout


@pytest.mark.parametrize("spec", VALID, ids=[p.name for p in VALID])
def test_valid_jobspecs_with_locals_interpolations_and_dynamic_blocks_get_no_false_alarm(
    spec: Path, env: dict[str, str]
) -> None:
    done = validate(spec, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert ": ok" in done.stdout


def test_the_valid_corpus_covers_what_real_jobspecs_use() -> None:
    text = "\n".join(p.read_text() for p in VALID)
    assert len(VALID) >= 6
    for used in ("locals {", "variable ", "${NOMAD_TASK_DIR}", "${NOMAD_ALLOC_DIR}", "${meta.",
                 "${attr.", 'dynamic "template"', 'dynamic "group"', 'dynamic "task"',
                 "template {", 'driver = "pyhpc"', 'driver = "docker"'):  # fmt: skip
        assert used in text, used


def test_nomad_evaluates_dynamic_tasks_and_reports_at_their_content(
    tmp_path: Path, env: dict[str, str]
) -> None:
    text = (FIXTURES / "valid" / "dynamic.nomad").read_text()
    spec = tmp_path / "dynamic.nomad"
    spec.write_text(text.replace("args  = [task.value]", "args  = task.value"))
    done = validate(spec, env=env)
    if nomad_parser.find(env) is None:
        assert done.returncode == 0, done.stderr  # python-hcl2 cannot expand dynamic blocks
        return
    assert done.returncode == 1
    line = text.splitlines().index("          args  = [task.value]") + 1
    for task in ("task-one", "task-two"):
        where = f"{spec}:{line}: job 'dynamic' group 'static' task '{task}'"
        assert f'{where}: args: expected list, got "{task[5:]}"' in done.stderr


def test_interpolations_are_judged_by_their_type_only(tmp_path: Path, env: dict[str, str]) -> None:
    spec = tmp_path / "i.nomad"
    spec.write_text(
        'job "i" {\n  group "g" {\n    task "t" {\n      driver = "pyhpc"\n      config {\n'
        '        image    = "${meta.image}"\n'
        '        work_dir = "${NOMAD_TASK_DIR}"\n'
        '        args     = "${NOMAD_ALLOC_DIR}"\n'
        '        mpi {\n          implementation = "openmpi"\n'
        '          ranks_per_node = "${meta.ranks}"\n        }\n'
        "      }\n    }\n  }\n}\n"
    )
    done = validate(spec, env=env)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"{spec}:8: job 'i' group 'g' task 't': args: expected list, got \"${{NOMAD_ALLOC_DIR}}\""
    ]


VARS = (
    'variable "image" {\n  type = string\n}\n'
    'variable "cmd" {\n  default = "/bin/true"\n}\n'
    'job "v" {\n  group "g" {\n    task "t" {\n      driver = "pyhpc"\n'
    '      config {\n        image   = var.image\n        command = "${var.cmd}"\n'
    "      }\n    }\n  }\n}\n"
)


def test_a_variable_without_default_is_named_once_at_its_declaration(
    tmp_path: Path, env: dict[str, str]
) -> None:
    spec = tmp_path / "vars.nomad"
    spec.write_text(VARS)
    missing = validate(spec, env=env)
    assert missing.returncode == 1
    assert missing.stderr.splitlines() == [
        f"{spec}:1: var.image has no default; give it with -var image=VALUE, in a -var-file "
        "or as NOMAD_VAR_image"
    ]
    assert validate(spec, "--var", "image=/x.sqsh", env=env).returncode == 0
    bad = validate(spec, "-var", "image=relative.sqsh", env=env)
    assert bad.returncode == 1 and f"{spec}:12: " in bad.stderr and "'relative.sqsh'" in bad.stderr


def test_var_file_and_nomad_var_give_a_variable_without_default(
    tmp_path: Path, env: dict[str, str]
) -> None:
    spec = tmp_path / "vars.nomad"
    spec.write_text(VARS)
    good = tmp_path / "good.hcl"
    good.write_text('image = "/var/lib/pyhpc/images/a.sqsh"\n')
    bad = tmp_path / "bad.hcl"
    bad.write_text('image = "relative.sqsh"\n')
    assert validate(spec, "-var-file", good, env=env).returncode == 0
    assert validate(spec, env={**env, "NOMAD_VAR_image": "/x.sqsh"}).returncode == 0
    from_env = validate(spec, env={**env, "NOMAD_VAR_image": "env.sqsh"})
    assert from_env.returncode == 1 and "'env.sqsh'" in from_env.stderr
    # later wins: NOMAD_VAR_* < -var-file (in order) < -var
    assert validate(spec, "-var-file", good, env={**env, "NOMAD_VAR_image": "x"}).returncode == 0
    last = validate(spec, "-var-file", good, "-var-file", bad, env=env)
    assert last.returncode == 1 and "'relative.sqsh'" in last.stderr
    assert validate(spec, "-var-file", bad, "-var", "image=/y.sqsh", env=env).returncode == 0
    # NOMAD_VAR_* may hold other jobs' variables; -var and -var-file may not
    other = {**env, "NOMAD_VAR_image": "/x.sqsh", "NOMAD_VAR_unrelated": "1"}
    assert validate(spec, env=other).returncode == 0
    typo = validate(spec, "--var", "imge=/x.sqsh", env=env)
    assert typo.returncode == 1
    assert "-var imge: the jobspec declares no such variable" in typo.stderr
    extra = tmp_path / "extra.hcl"
    extra.write_text('image = "/x.sqsh"\nimge = "/y"\n')
    listed = validate(spec, "-var-file", extra, env=env)
    assert f"-var-file {extra}: imge: the jobspec declares no such variable" in listed.stderr
    unreadable = validate(spec, "-var-file", tmp_path / "none.hcl", env=env)
    assert unreadable.returncode == 2 and "none.hcl" in unreadable.stderr


def test_var_overrides_defaults_of_every_type(env: dict[str, str]) -> None:
    spec = FIXTURES / "valid" / "variables.nomad"
    given = ["-var", "ranks=4", "-var", 'args=["-n", "8"]', "-var", "disk=true"]
    done = validate(spec, *given, "-var", "image=docker://registry.example.org/mpi:1", env=env)
    assert done.returncode == 0, done.stderr
    zero = validate(spec, *given, "-var", "ranks=0", env=env)
    assert zero.returncode == 1
    line = next(i for i, s in enumerate(spec.read_text().splitlines(), 1) if "ranks_per_node" in s)
    assert zero.stderr.splitlines() == [
        f"{spec}:{line}: job 'variables' group 'g' task 't': "
        "mpi block: option 'ranks_per_node' = 0: must be a whole number 1-4096"
    ]


BROKEN = {
    "unterminated.nomad": ('job "j" {\n  group "g" {\n    count = "3\n  }\n}\n', 3),
    "separator.nomad": (SPEC.replace('"/bin/true"\n      }', '["a" "b"]\n      }', 1), 7),
    "unclosed.nomad": (SPEC.rsplit("}", 1)[0], 19),
    "stray.nomad": ('job "j" {\n  group "g" {}\n}\n}\n', 4),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_syntax_error_is_one_line_with_file_line_and_column(
    tmp_path: Path, env: dict[str, str], name: str
) -> None:
    text, line = BROKEN[name]
    spec = tmp_path / name
    spec.write_text(text)
    done = validate(spec, env=env)
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert re.fullmatch(rf"{re.escape(str(spec))}:{line}:\d+: \S.*\n", done.stderr), done.stderr
    assert "Expected one of" not in done.stderr and "Token(" not in done.stderr


JOB = {
    "ID": "j",
    "Name": "j",
    "TaskGroups": [
        {
            "Name": "g",
            "Tasks": [
                {"Name": "web", "Driver": "docker", "Config": {"image": "nginx"}},
                {
                    "Name": "t",
                    "Driver": "pyhpc",
                    "Config": {
                        "image": "/var/lib/pyhpc/images/busybox.sqsh",
                        "args": ["${NOMAD_TASK_DIR}/x"],
                        "mpi": [{"implementation": "openmpi", "ranks_per_node": 2}],
                    },
                },
            ],
        }
    ],
}


def test_a_json_jobspec_is_checked_as_nomads_job_format(
    tmp_path: Path, env: dict[str, str]
) -> None:
    wrapped = tmp_path / "job.json"
    wrapped.write_text(json.dumps({"Job": JOB}, indent=2))
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(JOB, indent=2))
    for spec in (wrapped, bare):
        done = validate(spec, env=env)
        assert done.returncode == 0, done.stderr
        assert "job 'j' group 'g' task 't': ok" in done.stdout
    wrong = json.loads(json.dumps(JOB))
    wrong["TaskGroups"][0]["Tasks"][1]["Config"].update(network="bridge", work_dir="tmp")
    text = json.dumps({"Job": wrong}, indent=2)
    spec = tmp_path / "wrong.json"
    spec.write_text(text)
    done = validate(spec, env=env)
    assert done.returncode == 1
    lines = text.splitlines()
    for option in ("network", "work_dir"):
        line = next(i for i, s in enumerate(lines, 1) if f'"{option}"' in s)
        assert f"{spec}:{line}: job 'j' group 'g' task 't': option '{option}'" in done.stderr


def test_a_json_syntax_error_is_one_line_with_line_and_column(
    tmp_path: Path, env: dict[str, str]
) -> None:
    spec = tmp_path / "broken.json"
    spec.write_text('{"Job": {"ID": "j",\n  "TaskGroups": [}\n')
    done = validate(spec, env=env)
    assert done.returncode == 1
    assert done.stderr == f"{spec}:2:18: Expecting value\n"


def test_a_block_given_as_config_attribute_is_named_once(
    tmp_path: Path, env: dict[str, str]
) -> None:
    spec = tmp_path / "attr.nomad"
    spec.write_text(SPEC.replace("      config {\n        image  =", "      config = {\n  image ="))
    done = validate(spec, env=env)
    assert done.returncode == 1
    assert done.stderr.splitlines()[0] == (
        f"{spec}:13: job 'j' group 'g' task 'bad': config is a block: write config {{ ... }}"
    )
    assert done.stderr.count(f"{spec}:13:") == 1


def test_a_second_config_block_is_named_once(tmp_path: Path, env: dict[str, str]) -> None:
    second = '      }\n      config {\n        image = "relative"\n      }'
    spec = tmp_path / "two.nomad"
    spec.write_text(
        SPEC.replace('comand = "/bin/true"\n      }', f'command = "/bin/true"\n{second}')
    )
    done = validate(spec, env=env)
    assert done.returncode == 1
    again = "config block given again (first at line 13): a task has one"
    assert done.stderr.count(f"{spec}:17:") == 1
    assert f"{spec}:17: job 'j' group 'g' task 'bad': {again}" in done.stderr


def test_nomads_refusal_is_one_line_with_its_position() -> None:
    out = (
        "Error getting job struct: Failed to parse using HCL 2. Use the HCL 1 parser with "
        "`nomad run -hcl1`, or address the following issues:\n"
        'stdin:7,9-14: Attribute redefined; The argument "image" was already set at '
        "stdin:6,9-14. Each argument may be set only once.\n"
    )
    refused = nomad_parser.refusal(out)
    assert (refused.line, refused.column, refused.file) == (7, 9, "")
    assert refused.message == (  # the jobspec goes in on stdin: its lines are the file's
        'Attribute redefined; The argument "image" was already set at line 6. Each argument '
        "may be set only once."
    )
    in_file = nomad_parser.refusal(
        "Error getting job struct: Error parsing job file from -:\n"
        "vars.hcl:2,8-17: Invalid value for variable; list of string required.\n"
    )
    assert (in_file.file, in_file.line, in_file.column) == ("vars.hcl", 2, 8)
    unplaced = nomad_parser.refusal(
        'Error getting job struct: Error parsing job file from -:\n<nil>: Unset variable "u"; A\n'
        "used variable must be set.\n"
    )
    assert (unplaced.line, unplaced.message) == (
        0,
        'Unset variable "u"; A used variable must be set.',
    )


def test_strict_refuses_images_and_datasets_named_by_a_tag_that_may_move(
    tmp_path: Path, env: dict[str, str]
) -> None:
    pinned = "docker://reg.example:5000/hpc/app@sha256:" + "a" * 64
    spec = tmp_path / "j.nomad"
    spec.write_text(
        'job "j" {\n  group "g" {\n    task "t" {\n      driver = "pyhpc"\n      config {\n'
        '        image    = "docker://reg.example:5000/hpc/app:2024"\n'
        '        datasets = ["oras://reg.example:5000/data/ref:latest:/db", '
        '"/var/lib/pyhpc/images/d.sqsh:/d"]\n'
        "      }\n    }\n"
        f'    task "p" {{\n      driver = "pyhpc"\n      config {{\n        image = "{pinned}"\n'
        "      }\n    }\n  }\n}\n"
    )
    relaxed = validate(spec, env=env)
    assert relaxed.returncode == 0, relaxed.stderr  # the control: tags are valid
    strict = validate("--strict", spec, env=env)
    assert strict.returncode == 1
    lines = strict.stderr.strip().splitlines()
    assert len(lines) == 2 and all(
        "task 't'" in line and "pin it by digest" in line for line in lines
    )
    assert "option 'image'" in lines[0] + lines[1] and "option 'datasets'" in lines[0] + lines[1]
    assert f"{spec}:10: job 'j' group 'g' task 'p': ok" in strict.stdout
