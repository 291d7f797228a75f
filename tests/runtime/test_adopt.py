"""After a plugin dies in the middle of StartTask, Nomad asks for the same task again: the
next plugin adopts the container the first start launched (never starts it twice), or clears a
start that never ran. And cgroups left by supervisors that died are swept, live ones never."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from nomad_driver.runtime import cgroups, client
from nomad_driver.runtime.cgroups import Cgroup, Limits
from tests.runtime.test_supervisor import make_spec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containers need root here")


def test_a_started_task_is_adopted_with_its_pids_and_exit_code(
    tmp_path: Path, busybox_image: Path
) -> None:
    spec = make_spec(tmp_path, busybox_image, "/bin/sh", "-c", "sleep 1; exit 7")._replace(
        images_dir=str(tmp_path / "images")
    )
    run_dir = str(tmp_path / "t-adopt")
    first = client.start(spec, run_dir)
    adopted = client.adopt(run_dir)
    assert adopted is not None
    assert (adopted.init_pid, adopted.started_at) == (first.init_pid, first.started_at)
    assert adopted.supervisor_pid == first.supervisor_pid
    assert client.wait(run_dir).exit_code == 7
    assert client.adopt(run_dir) is not None  # finished: still that task's, with its exit code
    client.remove(run_dir)


def test_a_start_that_never_ran_is_not_adopted_and_is_cleared(tmp_path: Path) -> None:
    run_dir = tmp_path / "t-never"
    run_dir.mkdir()
    (run_dir / "spec.json").write_text("{}")
    assert client.adopt(str(run_dir), timeout=1) is None
    client.discard(str(run_dir), str(tmp_path / "images"))
    assert not run_dir.exists()


def test_sweep_removes_cgroups_of_dead_tasks_only(tmp_path: Path) -> None:
    dead, live = Cgroup("t-sweep-dead"), Cgroup("t-sweep-live")
    for group in (dead, live):
        group.create(Limits(memory_bytes=32 << 20))
    try:
        in_use = lambda: {"t-sweep-live"} | (set(cgroups.names()) - {"t-sweep-dead"})  # noqa: E731
        # Just made: maybe another driver's starting task, so left alone for a while.
        assert cgroups.sweep(in_use) == []
        assert all(os.path.isdir(p) for p in dead.paths())
        later = time.time() + cgroups.SWEEP_GRACE_S + 1
        removed = cgroups.sweep(in_use, now=later)
        assert removed == ["t-sweep-dead"]
        assert not any(os.path.isdir(p) for p in dead.paths())
        assert all(os.path.isdir(p) for p in live.paths())
    finally:
        live.remove()
        dead.remove()


@pytest.mark.parametrize(
    "marker, script",
    [
        ("nomad_driver.runtime.supervisor", "sleep 600; exit 0"),
        # A forkserver's supervisor is known by its working directory: the tenant's is /tmp.
        ("nomad_driver.runtime.forkserver", "cd /tmp && sleep 600; exit 0"),
    ],
)
def test_a_task_naming_itself_a_supervisor_is_not_taken_for_one(
    tmp_path: Path, busybox_image: Path, marker: str, script: str
) -> None:
    """A task's command line is the tenant's: `sh -c ... nomad_driver.runtime.supervisor DIR`
    (or the forkserver's name, working in a directory of its choice) must not make the node
    believe a task alive there (the sweep would keep its cgroup, adopt would wait for it)."""
    spec = make_spec(tmp_path, busybox_image, "/bin/sh", "-c", script, marker, "/fake/run")
    started = client.start(spec, str(tmp_path / "run"))
    try:
        time.sleep(0.3)
        named = [  # the attack is in place: a process carries the marker and the directory
            p for p in Path("/proc").iterdir()
            if p.name.isdigit() and marker.encode() + b"\0/fake/run" in _cmdline(p)
        ]  # fmt: skip
        assert named
        found = client.supervisors()
        assert found.get(started.run_dir) == started.supervisor_pid  # the control
        assert "/fake/run" not in found and "/tmp" not in found, found
    finally:
        client.send_signal(started.run_dir, 9)
        client.wait(started.run_dir)


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_supervisors_outlive_their_forkserver_and_a_new_one_starts_the_next_task(
    tmp_path: Path, busybox_image: Path
) -> None:
    """Supervisors are forked from a warm forkserver: killing it (as a plugin's death ends it)
    leaves the running task alone, still found and waited for; the next start makes a new one."""
    running = client.start(
        make_spec(tmp_path, busybox_image, "/bin/sh", "-c", "sleep 2; exit 7"),
        str(tmp_path / "run-a"),
    )
    server = client._FORK_SERVER
    assert server.sock is not None
    forkservers = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and b"nomad_driver.runtime.forkserver\0" in _cmdline(p)
        and _parent(int(p.name)) == os.getpid()
    ]  # fmt: skip
    assert len(forkservers) == 1, forkservers
    assert _parent(running.supervisor_pid) == forkservers[0]  # forked by it, the control
    os.kill(forkservers[0], 9)
    time.sleep(0.2)
    assert client.supervisors().get(running.run_dir) == running.supervisor_pid
    assert client.wait(running.run_dir).exit_code == 7
    spec = make_spec(tmp_path, busybox_image, "/bin/sh", "-c", "sleep 1")
    second = client.start(spec, str(tmp_path / "run-b"))
    # Read while it runs: a supervisor that has ended has no parent to read (it flaked so).
    assert _parent(second.supervisor_pid) not in (0, forkservers[0])
    assert client.wait(second.run_dir).exit_code == 0


def _parent(pid: int) -> int:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def test_a_setuid_root_program_a_tenant_runs_is_not_taken_for_a_supervisor(
    tmp_path: Path,
) -> None:
    """A tenant can give a setuid-root program (su at its password prompt) any arguments: it
    runs with effective uid 0 in the host's PID namespace (red team). Only a process whose
    every uid is root counts. The control: the same program started by root is taken for one,
    so the check is what tells them apart."""
    import shutil
    import subprocess

    if shutil.which("gcc") is None:
        pytest.skip("needs gcc")
    tmp_path.chmod(0o755)
    source = tmp_path / "wait.c"
    source.write_text("#include <unistd.h>\nint main(void) { sleep(30); return 0; }\n")
    program = tmp_path / "wait"
    subprocess.run(["gcc", "-o", str(program), str(source)], check=True)
    program.chmod(0o4755)  # setuid root
    argv = [str(program), "nomad_driver.runtime.supervisor", "/fake/setuid-run"]
    tenant = subprocess.Popen(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", *argv])
    root = subprocess.Popen([*argv[:2], "/fake/root-run"])
    try:
        time.sleep(0.3)
        status = Path(f"/proc/{tenant.pid}/status").read_text()
        assert "\nUid:\t1000\t0\t0\t0" in status, status  # the attack: effective uid 0
        found = client.supervisors()
        assert found.get("/fake/root-run") == root.pid  # the control
        assert "/fake/setuid-run" not in found, found
    finally:
        for proc in (tenant, root):
            proc.kill()
            proc.wait()
