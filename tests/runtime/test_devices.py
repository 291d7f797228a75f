"""A host-root task (user_namespace = false) must not reach the host's devices: /dev is nodev,
the devices cgroup allows only the standard nodes and what the admin passes through, and MKNOD
is not in its default capabilities. Each attack runs beside a control that must succeed, so a
broken setup cannot pass. Also: a failed start leaves no cgroup behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nomad_driver.driver import config, policy
from nomad_driver.runtime import cgroups, client, security
from nomad_driver.runtime.cgroups import Cgroup, CgroupError, Limits
from nomad_driver.runtime.spec import BindMount, ContainerSpec
from nomad_driver.wire import schema
from tests.runtime.test_supervisor import make_spec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containers need root here")
SECRET = "SECRET-DISK-CONTENT"  # on a disk no task is given
ALLOWED = "ALLOWED-DISK-CONTENT"  # on a disk the admin passes through
HOST_ROOT_CAPS = tuple(security.capability_set([], [], [], host_root=True))
WITH_MKNOD = tuple(security.capability_set(["MKNOD"], [], ["MKNOD"], host_root=True))
MODES = pytest.mark.parametrize("userns", [None, (100000, 65536)], ids=["host-root", "remapped"])


def loop_device(backing: Path, content: str) -> str:
    backing.write_bytes(content.encode() + b"\0" * (1 << 20))
    device = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(backing)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # Readable by a remapped root too (to it, host root's nodes belong to nobody), as GPU
    # and InfiniBand nodes are; read-only and detached at the end of the test.
    os.chmod(device, 0o666)
    assert Path(device).read_bytes()[: len(content)] == content.encode()  # readable here
    return device


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """Two real block devices (loop devices over files): the minor of the one holding SECRET,
    the path of the one holding ALLOWED."""
    made: list[str] = []
    try:
        made.append(loop_device(tmp_path / "secret.img", SECRET))
        made.append(loop_device(tmp_path / "allowed.img", ALLOWED))
        yield os.minor(os.stat(made[0]).st_rdev), made[1]
    finally:
        for device in made:
            subprocess.run(["losetup", "--detach", device], check=False)


def run_dir(tmp: Path) -> str:
    # Unique: the cgroup is named after it, and other test runs on this host make theirs.
    return str(tmp / f"run-{uuid.uuid4().hex[:12]}")


def spec_for(tmp: Path, image: Path, script: str, **overrides: Any) -> ContainerSpec:
    """A host-root task (as user_namespace = false makes it) with a cgroup, unless overridden."""
    settings: dict[str, Any] = {"userns": None, "capabilities": HOST_ROOT_CAPS, "limits": Limits()}
    return make_spec(tmp, image, "/bin/sh", "-c", script)._replace(
        images_dir=str(tmp / "images"), **{**settings, **overrides}
    )


def run(tmp: Path, image: Path, script: str, **overrides: Any) -> str:
    """The script's output (stdout and stderr), after checking it exited 0."""
    started = client.start(spec_for(tmp, image, "exec 2>&1; " + script, **overrides), run_dir(tmp))
    result = client.wait(started.run_dir)
    out = (tmp / "out").read_text()
    assert result.exit_code == 0, out
    return out


def leftover_cgroups(name: str) -> list[str]:
    return [str(p) for p in Path(cgroups.ROOT).glob(f"*/{cgroups.PARENT}/{cgroups.PREFIX}{name}")]


# The standard nodes open, and a device the admin passed through reads: the control for every
# attack below. /dev/tty opens as far as the driver, which says there is no controlling tty.
CONTROL = (
    "echo x > /dev/null && head -c 3 /dev/zero | wc -c && head -c 3 /dev/urandom | wc -c && "
    "head -c 3 /dev/full | wc -c && head -c 3 /dev/random | wc -c && "
    "cat /dev/tty; exec 3<>/dev/ptmx && echo ptmx-ok && ls /dev/pts; "
    "head -c 20 /dev/allowed; echo"
)


def assert_control(out: str) -> None:
    assert out.count("3\n") == 4, out
    assert "ptmx-ok" in out and "No such device or address" in out, out  # ENXIO from tty
    assert ALLOWED in out, out


@MODES
def test_standard_nodes_and_a_passed_device_work_on_a_nodev_dev(
    tmp_path: Path, busybox_image: Path, disks: tuple[int, str], userns: Any
) -> None:
    _, device = disks
    caps = tuple(sorted(security.DEFAULT_CAPS)) if userns else HOST_ROOT_CAPS
    out = run(
        tmp_path,
        busybox_image,
        f"grep ' /dev ' /proc/mounts; {CONTROL}",
        userns=userns,
        capabilities=caps,
        devices=(BindMount(device, "/dev/allowed"),),
    )
    assert_control(out)
    dev_line = next(line for line in out.splitlines() if " /dev tmpfs " in line)
    assert "nodev" in dev_line.split()[3].split(","), dev_line


def test_host_root_cannot_mknod_a_host_disk(
    tmp_path: Path, busybox_image: Path, disks: tuple[int, str]
) -> None:
    minor, device = disks
    assert "MKNOD" not in HOST_ROOT_CAPS
    out = run(
        tmp_path,
        busybox_image,
        f"grep CapEff /proc/self/status; "
        f"mknod /dev/sdz b 7 {minor}; mknod /tmp/sdz b 7 {minor}; "
        f"head -c 20 /dev/sdz; head -c 20 /tmp/sdz; echo; {CONTROL}",
        devices=(BindMount(device, "/dev/allowed"),),
    )
    assert SECRET not in out, out
    cap_eff = int(out.split("CapEff:")[1].split()[0], 16)
    assert not cap_eff & 1 << security.CAP_NUMBER["MKNOD"], out
    assert cap_eff & 1 << security.CAP_NUMBER["CHOWN"], out  # the rest of the defaults stay
    assert "mknod: /dev/sdz: Operation not permitted" in out, out
    assert "mknod: /tmp/sdz: Operation not permitted" in out, out
    assert_control(out)


def test_with_mknod_a_node_in_dev_or_tmp_opens_nothing_even_without_a_cgroup(
    tmp_path: Path, busybox_image: Path, disks: tuple[int, str]
) -> None:
    # No cgroup: the nodev mounts alone must hold.
    minor, device = disks
    out = run(
        tmp_path,
        busybox_image,
        f"mknod /dev/sdz b 7 {minor} && echo made-dev; "
        f"mknod /tmp/sdz b 7 {minor} && echo made-tmp; "
        f"head -c 20 /dev/sdz; head -c 20 /tmp/sdz; echo; {CONTROL}",
        capabilities=WITH_MKNOD,
        limits=None,
        devices=(BindMount(device, "/dev/allowed"),),
    )
    assert "made-dev" in out and "made-tmp" in out, out  # the nodes exist: the attack is real
    assert "head: /dev/sdz: Permission denied" in out, out
    assert "head: /tmp/sdz: Permission denied" in out, out
    assert SECRET not in out, out
    assert_control(out)


def test_with_mknod_the_devices_cgroup_refuses_nodes_on_mounts_that_allow_devices(
    tmp_path: Path, busybox_image: Path, disks: tuple[int, str]
) -> None:
    # A host directory bound in (not nodev) holding a node of the disk, and mknod in /alloc:
    # only the devices cgroup stands between the task and the disk.
    minor, device = disks
    hostdev = tmp_path / "hostdev"
    hostdev.mkdir()
    os.mknod(hostdev / "sdz", 0o600 | 0o060000, os.makedev(7, minor))
    assert (hostdev / "sdz").read_bytes()[: len(SECRET)] == SECRET.encode()  # readable here
    out = run(
        tmp_path,
        busybox_image,
        f"head -c 20 /hostdev/sdz; mknod /alloc/sdy b 7 {minor}; echo; {CONTROL}",
        capabilities=WITH_MKNOD,
        mounts=(
            *make_spec(tmp_path, busybox_image, "x").mounts,
            BindMount(str(hostdev), "/hostdev"),
        ),
        devices=(BindMount(device, "/dev/allowed"),),
    )
    # Binds are nodev now (EACCES) and the devices cgroup refuses behind them (EPERM).
    assert re.search(r"head: /hostdev/sdz: (Operation not permitted|Permission denied)", out), out
    assert "mknod: /alloc/sdy: Operation not permitted" in out, out
    assert not (tmp_path / "alloc" / "sdy").exists()
    assert SECRET not in out, out
    assert_control(out)


def test_host_root_without_a_devices_controller_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    group = Cgroup(f"never-{uuid.uuid4().hex[:12]}")
    monkeypatch.setattr(group, "version", 2)
    with pytest.raises(CgroupError, match="user_namespace = false.*user_namespace = true"):
        group.create(Limits(), host_root=True)
    assert leftover_cgroups(group.name) == []


@MODES
@pytest.mark.parametrize(
    "why, overrides, expected",
    [
        ("bad command", {"command": "/no/such/program"}, "does not exist in the image"),
        ("missing work_dir", {"work_dir": "/missing"}, "work_dir '/missing' is not a directory"),
        ("refused user", {"user": "5"}, "outside the plugin's allowed_uids"),
        ("cgroup write fails midway", {"limits": Limits(cpuset_cpus="4096")}, r"\[Errno"),
        ("missing device", {"devices": (BindMount("/dev/no-such", "/dev/x"),)}, "/dev/no-such"),
    ],
)
def test_a_failed_start_leaves_no_cgroup(
    tmp_path: Path, busybox_image: Path, userns: Any, why: str, overrides: Any, expected: str
) -> None:
    spec = spec_for(tmp_path, busybox_image, "true", userns=userns)._replace(**overrides)
    assert spec.limits is not None, why
    where = run_dir(tmp_path)
    with pytest.raises(client.StartError, match=expected):
        client.start(spec, where)
    assert leftover_cgroups(os.path.basename(where)) == []


@MODES
def test_a_task_that_ran_leaves_no_cgroup(tmp_path: Path, busybox_image: Path, userns: Any) -> None:
    # The control: while it runs, its cgroup exists in every v1 hierarchy it uses: devices
    # (with the allowlist) for host root only; in a user namespace the kernel keeps devices out.
    spec = spec_for(tmp_path, busybox_image, "sleep 60", userns=userns)
    where = run_dir(tmp_path)
    started = client.start(spec, where)
    name = os.path.basename(where)
    try:
        present = leftover_cgroups(name)
        assert any(f"/memory/{cgroups.PARENT}/" in p for p in present), present
        in_devices = any(f"/devices/{cgroups.PARENT}/" in p for p in present)
        assert in_devices == (userns is None), present
        if userns is None:
            own = cgroups.PREFIX + name
            listed = Path(cgroups.ROOT, "devices", cgroups.PARENT, own, "devices.list")
            assert listed.read_text().split("\n")[:-1] == list(cgroups.STANDARD_DEVICES)
    finally:
        client.send_signal(started.run_dir, signal.SIGKILL)
        client.wait(started.run_dir)
    assert leftover_cgroups(name) == []


def test_host_root_gets_no_mknod_unless_the_task_adds_it(tmp_path: Path) -> None:
    image = tmp_path / "img.sqsh"
    image.write_bytes(b"x")
    ctx = policy.TaskContext("t1", "host", {}, "", "/dev/null", "/dev/null")

    def capabilities(user_namespace: bool, **task: object) -> set[str]:
        plugin = schema.load(config.PluginConfig, {"user_namespace": user_namespace}, "test")
        cfg = schema.load(config.TaskConfig, {"image": str(image), "command": "x", **task}, "t")
        return set(policy.container_spec(plugin, cfg, str(image), ctx).capabilities)

    assert capabilities(True) == security.DEFAULT_CAPS  # in a user namespace, as before
    assert capabilities(False) == security.DEFAULT_CAPS - {"MKNOD"}
    # An admin who allows MKNOD lets a task add it back (nodev and the devices cgroup remain).
    assert "MKNOD" in capabilities(False, cap_add=["MKNOD"])
