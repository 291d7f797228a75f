"""Site hooks (hooks_dir): what they answer becomes binds, devices and variables of the
container; a failing, slow or babbling hook fails the start saying which; a hook directory or
file a tenant could change is never run. The shipped contrib/hooks keep tenant-chosen values
from turning into host binds."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from nomad_driver.driver import config, policy
from nomad_driver.runtime.security import PolicyError
from nomad_driver.wire import schema

REPO = Path(__file__).resolve().parents[2]


def plugin(**options: object) -> config.PluginConfig:
    return schema.load(config.PluginConfig, options, "test")


def hook(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text("#!/usr/bin/python3\nimport json, sys\ntask = json.load(sys.stdin)\n" + body)
    path.chmod(0o755)
    return path


def spec_with(hooks_dir: Path, env: dict[str, str] | None = None, **options: object) -> object:
    image = hooks_dir.parent / "img.sqsh"
    image.write_bytes(b"x")
    task = schema.load(config.TaskConfig, {"image": str(image), "command": "true"}, "t")
    ctx = policy.TaskContext("t1", "host", env or {}, "1000", "/dev/null", "/dev/null")
    cfg = plugin(hooks_dir=str(hooks_dir), **options)
    return policy.container_spec(cfg, task, str(image), ctx)


@pytest.fixture
def hooks_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "hooks"
    directory.mkdir(mode=0o755)
    return directory


def test_hooks_add_binds_devices_and_variables_in_name_order(hooks_dir: Path) -> None:
    hook(hooks_dir, "10-first", 'print("mount /opt/site\\nenv SITE=one\\nenv MODE=hook")\n')
    hook(
        hooks_dir,
        "20-second",
        'print("# seen: " + task["env"].get("SITE", "-"))\n'
        'print("mount /srv/data:/data:rw\\ndevice /dev/null:/dev/site-null\\nenv SITE=two")\n',
    )
    (hooks_dir / ".hidden").write_text("not run")
    spec = spec_with(hooks_dir, {"MODE": "task"})
    binds = {m.task_path: (m.host_path, m.read_only) for m in spec.mounts}  # type: ignore[attr-defined]
    assert binds["/opt/site"] == ("/opt/site", True) and binds["/data"] == ("/srv/data", False)
    assert [(d.host_path, d.task_path) for d in spec.devices] == [("/dev/null", "/dev/site-null")]  # type: ignore[attr-defined]
    env = spec.env  # type: ignore[attr-defined]
    assert env["MODE"] == "task"  # the task's own wins
    assert env["SITE"] == "two"  # a later hook wins over an earlier one


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            'sys.stderr.write("no IB on this node\\n"); sys.exit(3)',
            "failed (exit 3): no IB on this node",
        ),
        ('print("rm -rf /")', "is not `mount SRC[:DST[:ro|rw]]`"),
        ('print("mount relative:/x")', "both paths must be absolute"),
        ('print("device /etc/passwd")', "is not /dev/HOST[:/dev/CONTAINER]"),
        ("import time; time.sleep(5)", "did not finish within 1s"),
    ],
    ids=["exit", "babble", "relative", "not-a-device", "slow"],
)
def test_a_failing_hook_fails_the_start_naming_it(
    hooks_dir: Path, body: str, expected: str
) -> None:
    hook(hooks_dir, "50-bad", body + "\n")
    with pytest.raises(PolicyError, match=f"hook {hooks_dir}/50-bad") as refused:
        spec_with(hooks_dir, hook_timeout="1s")
    assert expected in str(refused.value)


def test_hooks_a_tenant_could_change_are_never_run(hooks_dir: Path, tmp_path: Path) -> None:
    """The attack: a hook (or the directory) someone other than root can write, or a symlink
    to a tenant's file; root would run the tenant's code. The control: root's hook runs."""
    marker = tmp_path / "ran"
    good = hook(hooks_dir, "10-good", f'open("{marker}", "w").write("x")\n')
    spec_with(hooks_dir)
    assert marker.exists()  # the control
    marker.unlink()
    tenant = tmp_path / "tenant-hook"
    tenant.write_text(good.read_text())
    tenant.chmod(0o755)
    os.chown(tenant, 1000, 1000)
    (hooks_dir / "20-link").symlink_to(tenant)
    with pytest.raises(PolicyError, match="20-link must be an executable regular file"):
        spec_with(hooks_dir)
    (hooks_dir / "20-link").unlink()
    good.chmod(0o775)
    with pytest.raises(PolicyError, match="10-good must be"):
        spec_with(hooks_dir)
    good.chmod(0o755)
    hooks_dir.chmod(0o777)
    with pytest.raises(PolicyError, match="must be root's and writable by root alone"):
        spec_with(hooks_dir)
    assert not marker.exists()


def run_contrib(name: str, task: dict[str, object]) -> str:
    done = subprocess.run(
        [str(REPO / "contrib" / "hooks" / name)],
        input=json.dumps(task), capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return done.stdout


def test_contrib_hooks_never_bind_what_the_tenant_names(tmp_path: Path) -> None:
    # 30-slurm-pmix: PMIX_SERVER_TMPDIR is the tenant's to set: only a slurmd step directory
    # of the task's own user is bound.
    for tmpdir in ("/etc", "/var/spool/slurmd/../../../etc", "/var/spool/slurmd/pmix.1.0"):
        said = run_contrib("30-slurm-pmix", {"user": "1000", "env": {"PMIX_SERVER_TMPDIR": tmpdir}})
        assert said == "", (tmpdir, said)
    # 20-home: never root's, only a real user's own home directory.
    assert run_contrib("20-home", {"user": "", "env": {}}) == ""
    assert run_contrib("20-home", {"user": "0", "env": {}}) == ""
    nobody = run_contrib("20-home", {"user": "65534", "env": {}})
    assert nobody == "" or nobody.startswith("mount /")
    assert run_contrib("10-infiniband", {"user": "", "env": {}}).count("mount /etc/passwd") == 0
