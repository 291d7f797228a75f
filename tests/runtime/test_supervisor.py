"""Real containers through the supervisor: no Nomad, but real mounts and namespaces."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from nomad_driver.runtime import client
from nomad_driver.runtime.spec import BindMount, ContainerSpec, ExitStatus

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containers need root here")


def make_spec(
    tmp: Path, image: Path, *argv: str, user: str = "", work_dir: str = "/"
) -> ContainerSpec:
    for d in ("alloc", "local", "secrets"):
        (tmp / d).mkdir(exist_ok=True)
    (tmp / "out").touch()
    (tmp / "err").touch()
    return ContainerSpec(
        task_id="alloc/task/x",
        hostname="testtask",
        image=str(image),
        command=argv[0],
        args=tuple(argv[1:]),
        env={"PATH": "/bin", "GREETING": "hi"},
        work_dir=work_dir,
        user=user,
        stdout_path=str(tmp / "out"),
        stderr_path=str(tmp / "err"),
        mounts=(
            BindMount(str(tmp / "alloc"), "/alloc"),
            BindMount(str(tmp / "local"), "/local"),
            BindMount(str(tmp / "secrets"), "/secrets", read_only=True),
        ),
    )


def loop_devices_of(image: Path) -> list[str]:
    found = []
    for entry in Path("/sys/block").glob("loop*"):
        backing = entry / "loop" / "backing_file"
        if backing.exists() and backing.read_text().strip() == str(image):
            found.append(entry.name)
    return found


def run_script(tmp: Path, image: Path, script: str, **overrides: Any) -> tuple[ExitStatus, str]:
    """Run a shell script in a container made from make_spec plus overrides; its stdout."""
    spec = make_spec(tmp, image, "/bin/sh", "-c", script)._replace(**overrides)
    started = client.start(spec, str(tmp / f"run-{len(list(tmp.glob('run*')))}"))
    return client.wait(started.run_dir), (tmp / "out").read_text()


def test_command_runs_in_its_own_root_with_output_and_exit_code(
    tmp_path: Path, busybox_image: Path
) -> None:
    spec = make_spec(
        tmp_path,
        busybox_image,
        "/bin/sh",
        "-c",
        'echo "$GREETING from $(hostname) pid $$"; ls /; echo oops >&2; exit 3',
    )
    started = client.start(spec, str(tmp_path / "run"))
    result = client.wait(started.run_dir)
    assert (result.exit_code, result.signal) == (3, 0)
    out = (tmp_path / "out").read_text()
    assert "hi from testtask pid 2" in out  # PID 1 is our init
    for name in ("alloc", "local", "secrets", "proc", "dev", "bin"):
        assert name in out.split()
    assert (tmp_path / "err").read_text() == "oops\n"


def test_nothing_is_left_mounted_or_attached_after_exit(
    tmp_path: Path, busybox_image: Path
) -> None:
    spec = make_spec(tmp_path, busybox_image, "/bin/true")
    started = client.start(spec, str(tmp_path / "run"))
    assert client.wait(started.run_dir).exit_code == 0
    time.sleep(0.2)
    assert str(tmp_path) not in Path("/proc/mounts").read_text()
    assert loop_devices_of(busybox_image) == []


def test_image_is_never_modified_and_writes_go_to_the_task_layer(
    tmp_path: Path, busybox_image: Path
) -> None:
    before = busybox_image.read_bytes()
    spec = make_spec(
        tmp_path,
        busybox_image,
        "/bin/sh",
        "-c",
        "echo data > /bin/newfile && cat /bin/newfile && echo shared > /alloc/f",
    )
    started = client.start(spec, str(tmp_path / "run"))
    assert client.wait(started.run_dir).exit_code == 0
    assert busybox_image.read_bytes() == before
    assert (tmp_path / "alloc" / "f").read_text() == "shared\n"


def test_read_only_mount_cannot_be_written(tmp_path: Path, busybox_image: Path) -> None:
    spec = make_spec(tmp_path, busybox_image, "/bin/sh", "-c", "echo x > /secrets/f")
    started = client.start(spec, str(tmp_path / "run"))
    assert client.wait(started.run_dir).exit_code != 0
    assert not (tmp_path / "secrets" / "f").exists()


def test_signal_reaches_the_command_through_init(tmp_path: Path, busybox_image: Path) -> None:
    spec = make_spec(
        tmp_path,
        busybox_image,
        "/bin/sh",
        "-c",
        "trap 'echo term; exit 7' TERM; while true; do sleep 0.1; done",
    )
    started = client.start(spec, str(tmp_path / "run"))
    time.sleep(0.3)
    client.send_signal(started.run_dir, signal.SIGTERM)
    result = client.wait(started.run_dir)
    assert result.exit_code == 7
    assert "term" in (tmp_path / "out").read_text()


def test_sigkill_ends_the_whole_container_and_reports_signal_9(
    tmp_path: Path, busybox_image: Path
) -> None:
    spec = make_spec(tmp_path, busybox_image, "/bin/sh", "-c", "sleep 1000 & sleep 1000")
    started = client.start(spec, str(tmp_path / "run"))
    client.send_signal(started.run_dir, signal.SIGKILL)
    result = client.wait(started.run_dir)
    assert (result.exit_code, result.signal) == (137, 9)
    time.sleep(0.2)
    assert not Path(f"/proc/{started.init_pid}").exists()


def test_exit_status_survives_the_supervisor(tmp_path: Path, busybox_image: Path) -> None:
    spec = make_spec(tmp_path, busybox_image, "/bin/sh", "-c", "exit 42")
    started = client.start(spec, str(tmp_path / "run"))
    deadline = time.time() + 10
    while Path(f"/proc/{started.supervisor_pid}").exists() and time.time() < deadline:
        time.sleep(0.05)
    # A later plugin process only has the run directory.
    assert client.wait(started.run_dir).exit_code == 42


@pytest.mark.parametrize(
    ("argv", "user", "work_dir", "expected"),
    [
        (("/bin/nope",), "", "/", "'/bin/nope' does not exist in the image"),
        (("nope",), "", "/", "'nope' was not found in the image's PATH"),
        (("/bin/true",), "ghost", "/", "user 'ghost' does not exist"),
        (("/bin/true",), "", "/missing", "work_dir '/missing' is not a directory"),
    ],
)
def test_bad_task_fails_to_start_with_a_clear_reason(
    tmp_path: Path,
    busybox_image: Path,
    argv: tuple[str, ...],
    user: str,
    work_dir: str,
    expected: str,
) -> None:
    spec = make_spec(tmp_path, busybox_image, *argv, user=user, work_dir=work_dir)
    with pytest.raises(client.StartError, match=expected.replace("(", r"\(")):
        client.start(spec, str(tmp_path / "run"))
    time.sleep(0.2)
    assert loop_devices_of(busybox_image) == []


def test_not_a_squashfs_image_is_reported(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.sqsh"
    bogus.write_bytes(b"not an image" * 1000)
    spec = make_spec(tmp_path, bogus, "/bin/true")
    with pytest.raises(client.StartError, match="is not a (readable )?SquashFS file"):
        client.start(spec, str(tmp_path / "run"))


def test_task_runs_as_the_requested_user(tmp_path: Path, busybox_image: Path) -> None:
    spec = make_spec(tmp_path, busybox_image, "/bin/id", user="nobody")
    started = client.start(spec, str(tmp_path / "run"))
    assert client.wait(started.run_dir).exit_code == 0
    assert "uid=65534" in (tmp_path / "out").read_text()


def test_home_comes_from_the_images_passwd_unless_the_task_sets_it(
    tmp_path: Path, busybox_image: Path
) -> None:
    # As a login (or Docker) would: Open MPI 5, among others, will not start without HOME.
    cases = [
        ({}, "/root"),
        ({"user": "nobody"}, "/home"),
        ({"user": "4242"}, "/"),  # no entry in /etc/passwd
        ({"env": {"PATH": "/bin", "HOME": "/scratch"}}, "/scratch"),
    ]
    for n, (overrides, home) in enumerate(cases):
        (tmp_path / str(n)).mkdir()
        _, out = run_script(tmp_path / str(n), busybox_image, 'echo "home=$HOME"', **overrides)
        assert out == f"home={home}\n", overrides


def test_task_over_its_memory_limit_is_oom_killed_and_reported(
    tmp_path: Path, busybox_image: Path
) -> None:
    from nomad_driver.runtime.cgroups import Limits

    spec = make_spec(
        tmp_path, busybox_image, "/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1"
    )
    spec = spec._replace(limits=Limits(memory_bytes=32 << 20, memory_max_bytes=32 << 20))
    started = client.start(spec, str(tmp_path / "run"))
    result = client.wait(started.run_dir)
    assert result.oom_killed, result
    assert result.signal == signal.SIGKILL


def test_writable_none_gives_a_read_only_root_with_writable_alloc_dirs(
    tmp_path: Path, busybox_image: Path
) -> None:
    result, out = run_script(
        tmp_path,
        busybox_image,
        "touch /newfile || echo root-ro; echo ok > /alloc/f && echo alloc-rw",
        writable="none",
    )
    assert result.exit_code == 0
    assert "root-ro" in out and "alloc-rw" in out, out
    assert str(tmp_path) not in Path("/proc/mounts").read_text()


def test_writable_disk_keeps_the_layer_in_the_given_directory(
    tmp_path: Path, busybox_image: Path
) -> None:
    result, _ = run_script(
        tmp_path,
        busybox_image,
        "echo kept > /bin/newfile",
        writable="disk",
        upper_dir=str(tmp_path / "layer"),
    )
    assert result.exit_code == 0
    assert (tmp_path / "layer" / "upper" / "bin" / "newfile").read_text() == "kept\n"


def test_network_none_leaves_only_loopback_and_it_is_up(
    tmp_path: Path, busybox_image: Path
) -> None:
    result, out = run_script(
        tmp_path,
        busybox_image,
        "cat /proc/net/dev; cat /sys/class/net/lo/operstate /sys/class/net/lo/flags",
        network="none",
    )
    assert result.exit_code == 0
    interfaces = [line.split(":")[0].strip() for line in out.splitlines() if ":" in line]
    assert interfaces == ["lo"], out
    assert int(out.split()[-1], 16) & 1, "lo is not up"


def test_pids_limit_stops_a_fork_bomb(tmp_path: Path, busybox_image: Path) -> None:
    from nomad_driver.runtime.cgroups import Limits

    spec = make_spec(
        tmp_path, busybox_image, "/bin/sh", "-c", "for i in $(seq 1 40); do sleep 1 & done; wait"
    )
    started = client.start(spec._replace(limits=Limits(pids_max=16)), str(tmp_path / "run"))
    client.wait(started.run_dir)
    # 16 processes at most, our init and the shell among them: the 40 sleeps cannot all start.
    assert "can't fork: Resource temporarily unavailable" in (tmp_path / "err").read_text()
    unlimited = make_spec(
        tmp_path, busybox_image, "/bin/sh", "-c", "for i in $(seq 1 40); do sleep 1 & done; wait"
    )
    (tmp_path / "err").write_text("")
    started = client.start(unlimited, str(tmp_path / "run2"))
    client.wait(started.run_dir)
    assert "fork" not in (tmp_path / "err").read_text()


def test_passed_through_device_is_usable_inside(tmp_path: Path, busybox_image: Path) -> None:
    result, out = run_script(
        tmp_path,
        busybox_image,
        "ls -l /dev/hostzero; head -c 4 /dev/hostzero | od -An -tx1",
        devices=(BindMount("/dev/zero", "/dev/hostzero"),),
    )
    assert result.exit_code == 0
    assert out.startswith("crw") and "00 00 00 00" in out, out


def test_task_joins_a_given_network_namespace(tmp_path: Path, busybox_image: Path) -> None:
    name = f"pyhpc-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                name,
                "ip",
                "link",
                "add",
                "probe0",
                "type",
                "veth",
                "peer",
                "name",
                "probe1",
            ],
            check=True,
        )
        result, out = run_script(
            tmp_path, busybox_image, "cat /proc/net/dev", netns_path=f"/var/run/netns/{name}"
        )
        assert result.exit_code == 0
        interfaces = sorted(line.split(":")[0].strip() for line in out.splitlines() if ":" in line)
        assert interfaces == ["lo", "probe0", "probe1"], out
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_orphaned_processes_are_reaped_by_the_init(tmp_path: Path, busybox_image: Path) -> None:
    result, out = run_script(
        tmp_path,
        busybox_image,
        "for i in 1 2 3; do sh -c 'sleep 0.1 &'; done; sleep 1; "
        "cat /proc/[0-9]*/status | grep -c '^State:.*zombie' || true",
    )
    assert result.exit_code == 0 and out.split()[-1] == "0", out


def test_task_is_pinned_to_its_cpuset(tmp_path: Path, busybox_image: Path) -> None:
    from nomad_driver.runtime.cgroups import Limits

    result, out = run_script(
        tmp_path,
        busybox_image,
        "grep Cpus_allowed_list /proc/self/status",
        limits=Limits(cpuset_cpus="0"),
    )
    assert out.split() == ["Cpus_allowed_list:", "0"], out


def test_exec_joins_the_tasks_cgroup_and_counts_against_its_limits(
    tmp_path: Path, busybox_image: Path
) -> None:
    # An exec session (nomad alloc exec, script checks, MPI daemons) must not escape the task's
    # limits: it lands in the task's own cgroup(s), and the pids limit holds for it.
    from nomad_driver.runtime import enter
    from nomad_driver.runtime.cgroups import Limits

    spec = make_spec(tmp_path, busybox_image, "/bin/sleep", "60")
    spec = spec._replace(limits=Limits(memory_bytes=64 << 20, pids_max=12))
    started = client.start(spec, str(tmp_path / "run"))

    def exec_(*command: str) -> subprocess.CompletedProcess[str]:
        argv = enter.argv(started.run_dir, started.init_pid, list(command))
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    try:
        done = exec_("/bin/cat", "/proc/self/cgroup")
        assert done.returncode == 0, done.stderr
        mine = Path("/proc/self/cgroup").read_text().splitlines()
        theirs = done.stdout.splitlines()
        assert theirs and len(theirs) == len(mine), (theirs, mine)
        # In the task's cgroup namespace: a process in any cgroup but the task's own would
        # show a path ("/.." at least), so every hierarchy holds the exec'd process too.
        assert all(line.endswith(":/") for line in theirs), theirs
        bomb = exec_("/bin/sh", "-c", "for i in $(seq 30); do sleep 5 & done; wait")
        assert "can't fork" in bomb.stderr, bomb
    finally:
        client.send_signal(started.run_dir, signal.SIGKILL)
        client.wait(started.run_dir)


def test_an_exec_session_killed_by_sigkill_ends_by_sigkill(
    tmp_path: Path, busybox_image: Path
) -> None:
    """An exec'd command the OOM killer (or anyone) SIGKILLs: the session ends as it did, not
    as "cannot enter the container: the task has ended" while the task runs on."""
    from nomad_driver.runtime import enter

    spec = make_spec(tmp_path, busybox_image, "/bin/sleep", "60")
    started = client.start(spec, str(tmp_path / "run"))
    try:
        argv = enter.argv(started.run_dir, started.init_pid, ["/bin/sh", "-c", "kill -9 $$"])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr)
        assert "cannot enter" not in done.stderr
        term = subprocess.run(
            enter.argv(started.run_dir, started.init_pid, ["/bin/sh", "-c", "kill -TERM $$"]),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert term.returncode == -signal.SIGTERM  # the control: a catchable one, as before
    finally:
        client.send_signal(started.run_dir, signal.SIGKILL)
        client.wait(started.run_dir)
