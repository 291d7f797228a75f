"""User namespaces: root remapped to an unprivileged host uid, or the task's own uid mapped to
itself; checked from inside real containers and from the host."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from nomad_driver.runtime import client
from tests.runtime.test_supervisor import make_spec, run_script

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containers need root here")
REMAP = (200000, 65536)


def task_pid(init_pid: int) -> int:
    for _ in range(100):
        children = Path(f"/proc/{init_pid}/task/{init_pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.02)
    raise AssertionError("the task never started")


def test_root_is_remapped_and_owns_the_image_inside(tmp_path: Path, busybox_image: Path) -> None:
    result, out = run_script(
        tmp_path,
        busybox_image,
        "cat /proc/self/uid_map /proc/self/gid_map; id -u; ls -nd /bin | cut -c1-30;"
        "echo added >> /etc/passwd && chmod 600 /etc/passwd && echo wrote-etc",
        userns=REMAP,
        images_dir=str(tmp_path / "images"),
    )
    assert result.exit_code == 0, out
    lines = out.split("\n")
    assert lines[0].split() == ["0", "200000", "65536"]
    assert lines[1].split() == ["0", "200000", "65536"]
    assert lines[2] == "0"
    assert lines[3].split()[2:4] == ["0", "0"]  # the image's root-owned files are root's
    assert "wrote-etc" in out


def test_remapped_root_is_an_unprivileged_uid_on_the_host(
    tmp_path: Path, busybox_image: Path
) -> None:
    spec = make_spec(tmp_path, busybox_image, "/bin/sh", "-c", "sleep 30")._replace(
        userns=REMAP, images_dir=str(tmp_path / "images")
    )
    started = client.start(spec, str(tmp_path / "run"))
    try:
        status = Path(f"/proc/{task_pid(started.init_pid)}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert uids == ["200000"] * 4
    finally:
        client.send_signal(started.run_dir, 9)
        client.wait(started.run_dir)


def test_a_non_root_user_is_mapped_to_itself_only(tmp_path: Path, busybox_image: Path) -> None:
    result, out = run_script(
        tmp_path,
        busybox_image,
        "cat /proc/self/uid_map; id -u; id -g; ls -nd /bin | cut -c1-30;"
        "echo x > /etc/owned || echo cannot-write-etc",
        user="1234:1235",
        userns=REMAP,
        images_dir=str(tmp_path / "images"),
    )
    assert result.exit_code == 0, out
    lines = out.split("\n")
    assert lines[0].split() == ["1234", "1234", "1"]
    assert lines[1:3] == ["1234", "1235"]
    assert lines[3].split()[2:4] == ["65534", "65534"]  # the host's root is nobody here
    assert "cannot-write-etc" in out


def test_host_processes_and_files_are_invisible(tmp_path: Path, busybox_image: Path) -> None:
    marker = tmp_path / "host-only-marker"
    marker.write_text("secret")
    result, out = run_script(
        tmp_path,
        busybox_image,
        f"ls /proc | grep -c '^[0-9]'; ls {marker} 2>&1;"
        "cat /proc/1/environ >/dev/null 2>&1 || echo init-closed",
        userns=REMAP,
        images_dir=str(tmp_path / "images"),
    )
    lines = out.split("\n")
    assert int(lines[0]) <= 4, out  # init, sh, ls, grep: nothing of the host's
    assert "No such file" in lines[1]
    assert lines[2] == "init-closed"  # the init stays outside the task's user namespace
