"""One test per published container escape that applies to our runtime (see SECURITY.md, which
maps every case of the landscape's security table to a test here or elsewhere)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from nomad_driver.runtime import client, security
from nomad_driver.runtime.client import StartError
from nomad_driver.runtime.spec import BindMount
from tests.runtime.test_supervisor import make_spec, run_script

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containers need root here")
REPO = Path(__file__).resolve().parents[2]
MODES = pytest.mark.parametrize("userns", [None, (100000, 65536)], ids=["host-root", "remapped"])


def variant(tmp: Path, base: Path, *symlinks: tuple[str, str]) -> Path:
    """The busybox image with extra symlinks planted in it, as a hostile image would."""
    root = tmp / "variant-root"
    subprocess.run(["unsquashfs", "-q", "-d", str(root), str(base)], check=True)
    for link, target in symlinks:
        path = root / link.lstrip("/")
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        path.symlink_to(target)
    out = tmp / "variant.sqsh"
    subprocess.run(["mksquashfs", str(root), str(out), "-noappend", "-quiet"], check=True)
    return out


def start(tmp: Path, image: Path, script: str, **overrides: object) -> client.Started:
    spec = make_spec(tmp, image, "/bin/sh", "-c", script)._replace(
        images_dir=str(tmp / "images"), **overrides
    )
    return client.start(spec, str(tmp / f"run-{len(list(tmp.glob('run-*')))}"))


# 2. runc CVE-2024-21626: a leaked host descriptor as working directory.
@pytest.mark.parametrize("fd", [3, 4, 5, 6, 7, 8])
def test_work_dir_through_a_leaked_descriptor_is_refused(
    tmp_path: Path, busybox_image: Path, fd: int
) -> None:
    with pytest.raises(StartError, match="work_dir"):
        start(tmp_path, busybox_image, "pwd", work_dir=f"/proc/self/fd/{fd}")


# 3. crun CVE-2019-16884: an image's own /proc.
def test_image_with_a_proc_symlink_is_refused(tmp_path: Path, busybox_image: Path) -> None:
    image = variant(tmp_path, busybox_image, ("proc", "/etc"))
    with pytest.raises(StartError, match="/proc is a symlink in the image"):
        start(tmp_path, image, "true")


def test_proc_is_a_fresh_procfs(tmp_path: Path, busybox_image: Path) -> None:
    result, out = run_script(tmp_path, busybox_image, "stat -f -c %T /proc")
    assert result.exit_code == 0 and out.strip() == "proc", out


# 4. runc CVE-2021-30465 and Nomad CVE-2026-14891: mount targets through image symlinks.
def test_mount_target_through_an_image_symlink_never_touches_the_host(
    tmp_path: Path, busybox_image: Path
) -> None:
    sentinel = tmp_path / "host-sentinel"
    sentinel.mkdir()
    image = variant(tmp_path, busybox_image, ("mnt", str(sentinel)))
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(StartError, match="/mnt is a symlink in the image"):
        start(tmp_path, image, "true", mounts=(BindMount(str(data), "/mnt/x"),))
    assert list(sentinel.iterdir()) == []


# 5. runc CVE-2025-31133 and friends: host-wide /proc knobs.
@MODES
def test_proc_sys_and_sysrq_trigger_are_read_only(
    tmp_path: Path, busybox_image: Path, userns: object
) -> None:
    result, out = run_script(
        tmp_path,
        busybox_image,
        "echo 0 > /proc/sys/kernel/sysrq || echo sys-ro; echo h > /proc/sysrq-trigger || "
        "echo sysrq-ro; cat /proc/kcore | wc -c",
        userns=userns,
        images_dir=str(tmp_path / "images"),
    )
    lines = out.split()
    assert "sys-ro" in lines and "sysrq-ro" in lines, out
    assert lines[-1] == "0", out  # /proc/kcore is /dev/null here


# 6. runc CVE-2026-41579: an image whose /dev is a symlink.
def test_image_with_a_dev_symlink_is_refused_and_the_host_is_untouched(
    tmp_path: Path, busybox_image: Path
) -> None:
    target = tmp_path / "would-be-created"
    image = variant(tmp_path, busybox_image, ("dev", str(target)))
    with pytest.raises(StartError, match="/dev is a symlink in the image"):
        start(tmp_path, image, "true")
    assert not target.exists()


# 1. runc CVE-2019-5736: the host binary of a runtime process seen from the task.
@MODES
def test_the_init_is_out_of_reach_through_proc_1(
    tmp_path: Path, busybox_image: Path, userns: object
) -> None:
    result, out = run_script(
        tmp_path,
        busybox_image,
        "readlink /proc/1/exe || echo exe-closed; ls /proc/1/root/ >/dev/null 2>&1 || "
        "echo root-closed; cat /proc/1/environ > /dev/null 2>&1 || echo environ-closed",
        userns=userns,
        images_dir=str(tmp_path / "images"),
    )
    assert out.split()[-3:] == ["exe-closed", "root-closed", "environ-closed"], out


# 17. exec2 CVE-2026-8052: the log FIFO (or its directory) replaced by a symlink.
@pytest.mark.parametrize("where", ["file", "directory"])
def test_log_path_replaced_by_a_symlink_is_refused(
    tmp_path: Path, busybox_image: Path, where: str
) -> None:
    sentinel = tmp_path / "host-file"
    sentinel.write_text("untouched")
    logs = tmp_path / "logs"
    if where == "file":
        logs.mkdir()
        (logs / "t.stdout").symlink_to(sentinel)
    else:
        real = tmp_path / "elsewhere"
        real.mkdir()
        (real / "t.stdout").symlink_to(sentinel)
        logs.symlink_to(real)
    with pytest.raises(StartError, match="symlink"):
        start(tmp_path, busybox_image, "echo overwritten", stdout_path=str(logs / "t.stdout"))
    assert sentinel.read_text() == "untouched"


# 22. enroot 2026-04: mounts made inside must not propagate to the host.
def test_a_mount_made_inside_stays_inside(tmp_path: Path, busybox_image: Path) -> None:
    seen = tmp_path / "alloc" / "inner"
    result, out = run_script(
        tmp_path,
        busybox_image,
        "mkdir -p /alloc/inner && mount -t tmpfs none /alloc/inner && echo mounted",
        capabilities=tuple(sorted(security.DEFAULT_CAPS | {"SYS_ADMIN"})),
        seccomp=None,
    )
    assert "mounted" in out, out
    assert str(seen) not in Path("/proc/self/mounts").read_text()


# 24. enroot shares the host's /dev/shm; each container here has its own.
def test_dev_shm_is_private(tmp_path: Path, busybox_image: Path) -> None:
    name = f"pyhpc-shm-probe-{os.getpid()}"
    result, out = run_script(tmp_path, busybox_image, f"echo x > /dev/shm/{name} && echo wrote")
    assert "wrote" in out
    assert not Path("/dev/shm", name).exists()


# 11. Singularity CVE-2020-25039/25040: runtime directories readable by others.
def test_run_and_image_directories_are_private(tmp_path: Path, busybox_image: Path) -> None:
    started = start(tmp_path, busybox_image, "true")
    client.wait(started.run_dir)
    assert os.stat(started.run_dir).st_mode & 0o077 == 0
    assert os.stat(tmp_path / "images").st_mode & 0o077 == 0


# 13. Apptainer CVE-2023-30549: nothing setuid ships with us.
def test_the_package_has_no_setuid_files() -> None:
    found = [
        str(p)
        for p in (REPO / "nomad_driver").rglob("*")
        if p.is_file() and p.stat().st_mode & 0o6000
    ]
    assert found == []
