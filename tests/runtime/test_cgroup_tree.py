"""Where a task's cgroups go and what pyhpc does with them: every controller under the parent
its limits name (Nomad's, for driver tasks), the cpuset cgroup Nomad made joined but never
touched, a cgroup namespace rooted at the task, one-step kill and pause through the freezer
(cgroup.kill and cgroup.freeze on v2), and the counters the stats come from."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nomad_driver.runtime import cgroups, client
from nomad_driver.runtime.cgroups import Cgroup, Limits
from tests.runtime.test_supervisor import make_spec

V1_TASK_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer", "cpuset")


def host_cgroups(pid: int) -> dict[str, str]:
    """controller -> path, from the host's /proc/PID/cgroup."""
    found = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        for name in names.split(","):
            found[name] = path
    return found


def task_pid(init_pid: int) -> int:
    children = Path(f"/proc/{init_pid}/task/{init_pid}/children").read_text().split()
    return int(children[0])


@pytest.fixture
def nomad_like_parent() -> Iterator[tuple[str, str]]:
    """A cgroup parent laid out as Nomad's client makes it, and the cpuset cgroup it gives a
    task without reserved cores, limited to core 0: v1, PARENT/shared (and PARENT/reserved) in
    the cpuset hierarchy; v2, the task's own PARENT/ALLOC.TASK.scope."""
    parent = f"nomad-test-{uuid.uuid4().hex[:8]}"
    if cgroups.version() == 2:
        top = Path(cgroups.ROOT, parent)
        top.mkdir()
        controllers = Path(cgroups.ROOT, "cgroup.controllers").read_text().split()
        for c in ("cpuset", "cpu", "memory", "pids"):
            if c in controllers:
                Path(cgroups.ROOT, "cgroup.subtree_control").write_text(f"+{c}")
                (top / "cgroup.subtree_control").write_text(f"+{c}")
        scope = top / "a1b2c3.t.scope"
        scope.mkdir()
        (scope / "cpuset.cpus").write_text("0")
        yield parent, str(scope)
        scope.rmdir()
        top.rmdir()
        return
    top = Path(cgroups.ROOT, "cpuset", parent)
    root_cpus = Path(cgroups.ROOT, "cpuset", "cpuset.cpus").read_text().strip()
    mems = Path(cgroups.ROOT, "cpuset", "cpuset.mems").read_text().strip()
    made = [top, top / "shared", top / "reserved"]
    for d in made:
        d.mkdir()
        (d / "cpuset.mems").write_text(mems)
    (top / "cpuset.cpus").write_text(root_cpus)
    (top / "shared").joinpath("cpuset.cpus").write_text("0")
    yield parent, str(top / "shared")
    for d in reversed(made):
        d.rmdir()
    for c in V1_TASK_CONTROLLERS:
        p = Path(cgroups.ROOT, c, parent)
        if p.is_dir() and c != "cpuset":
            p.rmdir()


def allowed_cpus(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":")[1].strip()
    return ""


def test_task_is_in_every_controller_under_its_parent_and_sees_only_its_namespace_root(
    tmp_path: Path, busybox_image: Path, nomad_like_parent: tuple[str, str]
) -> None:
    parent, shared = nomad_like_parent
    limits = Limits(memory_bytes=64 << 20, cgroup_parent=parent, cpuset_cgroup=shared)
    spec = make_spec(
        tmp_path, busybox_image, "/bin/sh", "-c", "cat /proc/self/cgroup; exec sleep 30"
    )._replace(limits=limits)
    started = client.start(spec, str(tmp_path / "run"))
    try:
        pid = task_pid(started.init_pid)
        placed = host_cgroups(pid)
        given = "/" + os.path.relpath(shared, cgroups.ROOT).split("/", 1)[1]  # v1: less "cpuset"
        if cgroups.version() == 2:
            assert placed[""] == "/" + os.path.relpath(shared, cgroups.ROOT), placed
            assert host_cgroups(os.getpid())[""] != placed[""]  # the control
        else:
            own = f"/{parent}/{cgroups.PREFIX}run"
            for c in V1_TASK_CONTROLLERS:
                want = given if c == "cpuset" else own
                assert placed[c] == want, (c, placed)
            # The control: a process outside sits elsewhere, so the check above can fail.
            assert host_cgroups(os.getpid())["memory"] != own
        assert allowed_cpus(pid) == "0"  # the cores of the cpuset Nomad gave, nothing else
        deadline = time.time() + 5
        while "cpuset" not in (tmp_path / "out").read_text() and time.time() < deadline:
            time.sleep(0.05)
        inside = (tmp_path / "out").read_text().splitlines()
        assert inside and all(line.endswith(":/") for line in inside), inside
    finally:
        client.send_signal(started.run_dir, 9)
        client.wait(started.run_dir)
    group = Cgroup("run", limits)
    assert not any(os.path.exists(p) for p in group.owned())
    assert os.path.isdir(shared)  # Nomad's, not ours to remove


@pytest.mark.skipif(cgroups.version() == 2, reason="v1: a cpuset with no cores refuses a task")
def test_a_task_its_cgroup_refuses_does_not_start_and_leaves_nothing(
    tmp_path: Path, busybox_image: Path, nomad_like_parent: tuple[str, str]
) -> None:
    """The init is moved into the task's cgroups while it builds the root, and waits for that
    before the task exists: a move the kernel refuses (a cpuset emptied of cores) stops the
    start with the reason, and takes its cgroups and image mount with it. The control, the
    same cpuset with a core, starts (the test above)."""
    parent, shared = nomad_like_parent
    Path(shared, "cpuset.cpus").write_text("\n")  # no cores: attaching fails with ENOSPC
    limits = Limits(memory_bytes=64 << 20, cgroup_parent=parent, cpuset_cgroup=shared)
    spec = make_spec(tmp_path, busybox_image, "/bin/true")._replace(limits=limits)
    try:
        with pytest.raises(client.StartError, match="cannot move the task into its cgroup: No "):
            client.start(spec, str(tmp_path / "run"))
        assert (tmp_path / "out").read_text() == ""  # the command never ran
        assert not any(os.path.exists(p) for p in Cgroup("run", limits).owned())
    finally:
        Path(shared, "cpuset.cpus").write_text("0")


def test_a_task_without_nomad_stays_under_pyhpcs_own_parent(
    tmp_path: Path, busybox_image: Path
) -> None:
    spec = make_spec(tmp_path, busybox_image, "/bin/sh", "-c", "exec sleep 30")
    spec = spec._replace(limits=Limits(memory_bytes=64 << 20))
    started = client.start(spec, str(tmp_path / "run"))
    try:
        placed = host_cgroups(task_pid(started.init_pid))
        key = "memory" if cgroups.version() == 1 else ""
        assert placed[key] == f"/{cgroups.PARENT}/{cgroups.PREFIX}run", placed
    finally:
        client.send_signal(started.run_dir, 9)
        client.wait(started.run_dir)
    assert not any(os.path.exists(p) for p in Cgroup("run").paths())


def in_cgroup(group: Cgroup, script: str) -> subprocess.Popen[bytes]:
    def join() -> None:
        group.join()

    return subprocess.Popen(["/bin/sh", "-c", script], preexec_fn=join)


def alive(pids: list[int]) -> list[int]:
    live = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            live.append(pid)
    return live


def test_kill_ends_every_process_of_the_cgroup_even_one_that_keeps_forking() -> None:
    group = Cgroup(f"t-kill-{uuid.uuid4().hex[:8]}")
    group.create(Limits(memory_bytes=64 << 20, pids_max=200))
    forker = "while :; do sleep 60 & done"  # new processes all the time
    procs = [in_cgroup(group, forker), in_cgroup(group, "exec sleep 60")]
    try:
        time.sleep(0.3)
        members = [int(p) for p in Path(group.paths()[0], "cgroup.procs").read_text().split()]
        assert len(members) > 2, members  # the control: the processes really are in it
        assert group.kill()
        for p in procs:
            p.wait(timeout=5)
        assert alive(members) == []
        assert Path(group.paths()[0], "cgroup.procs").read_text().split() == []
    finally:
        for p in procs:
            p.kill()
            p.wait()
        group.remove()
    assert not any(os.path.exists(p) for p in group.paths())


def test_pause_freezes_the_whole_task_and_resume_lets_it_go_on(
    tmp_path: Path, busybox_image: Path
) -> None:
    script = "while :; do echo . >> /alloc/n; done"  # grows while it runs
    spec = make_spec(tmp_path, busybox_image, "/bin/sh", "-c", script)
    spec = spec._replace(limits=Limits(memory_bytes=64 << 20))
    started = client.start(spec, str(tmp_path / "run"))
    counter = tmp_path / "alloc" / "n"
    try:
        time.sleep(0.3)
        client.pause(started.run_dir, True)
        before = counter.stat().st_size
        time.sleep(0.5)
        assert counter.stat().st_size == before  # frozen: not one more step
        client.pause(started.run_dir, False)
        time.sleep(0.5)
        assert counter.stat().st_size > before  # the control: it runs when not frozen
    finally:
        client.pause(started.run_dir, False)
        client.send_signal(started.run_dir, 9)
        client.wait(started.run_dir)


def test_usage_counts_the_cgroups_cpu_and_memory() -> None:
    group = Cgroup(f"t-usage-{uuid.uuid4().hex[:8]}")
    group.create(Limits(memory_bytes=256 << 20))
    # 64 MiB held in a shell variable's string, then a busy loop for a while.
    script = (
        "x=$(head -c 67108864 /dev/zero | tr '\\0' a); end=$(($(date +%s)+1)); "
        "while [ $(date +%s) -lt $end ]; do :; done; sleep 5"
    )
    proc = in_cgroup(group, script)
    try:
        time.sleep(2.0)
        usage = group.usage()
        assert usage is not None
        assert usage.cpu_ns > 0.3e9 and usage.user_ns > 0
        assert usage.memory["Usage"] >= 64 << 20
        assert usage.memory["Max Usage" if cgroups.version() == 1 else "Usage"] >= 64 << 20
        assert usage.memory["RSS"] >= 60 << 20
    finally:
        group.kill()
        proc.wait()
        group.remove()
    assert group.usage() is None


def test_nomad_parent_is_read_from_the_cpuset_cgroup_nomad_gave() -> None:
    root = cgroups.ROOT
    assert cgroups.nomad_parent(f"{root}/cpuset/nomad/shared", 1) == "nomad"
    assert cgroups.nomad_parent(f"{root}/cpuset/hpc/nomad/reserved/a1-task", 1) == "hpc/nomad"
    assert cgroups.nomad_parent(f"{root}/nomad.slice/a1.task.scope", 2) == "nomad.slice"
    assert cgroups.nomad_parent(f"{root}/custom.slice/a1.task.scope", 2) == "custom.slice"
    assert cgroups.nomad_parent("", 1) == "nomad"
    assert cgroups.nomad_parent("", 2) == "nomad.slice"


def test_v2_paths_follow_nomads_scope(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """On v2 the task uses the scope Nomad made for it (its cpuset written by Nomad), as the
    exec driver does; pyhpc neither writes its cores nor removes it."""
    monkeypatch.setattr(cgroups, "version", lambda: 2)
    monkeypatch.setattr(cgroups, "ROOT", str(tmp_path))
    scope = tmp_path / "nomad.slice" / "a1b2.train.scope"
    scope.mkdir(parents=True)
    (tmp_path / "cgroup.subtree_control").write_text("")
    (tmp_path / "nomad.slice" / "cgroup.subtree_control").write_text("cpu cpuset io memory pids")
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids")
    (scope / "cpuset.cpus").write_text("1")
    limits = Limits(
        memory_bytes=64 << 20,
        cpu_shares=1024,
        cpuset_cpus="1",
        cgroup_parent="nomad.slice",
        cpuset_cgroup=str(scope),
    )
    group = Cgroup("run", limits)
    assert group.paths() == [str(scope)]
    assert group.owned() == []
    group.create(limits)
    assert (scope / "memory.max").read_text() == str(64 << 20)
    assert (scope / "cpu.weight").read_text() == "39"
    assert (scope / "cpuset.cpus").read_text() == "1"  # Nomad's value, untouched
    # Controllers handed down where missing (a plain file keeps the last write), and only there.
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+pids"
    assert (tmp_path / "nomad.slice" / "cgroup.subtree_control").read_text().startswith("cpu ")
    group.remove()
    assert scope.is_dir()
    # Without Nomad's scope (no cpuset management): pyhpc's own cgroup under the parent.
    own = Cgroup("run", limits._replace(cpuset_cgroup=""))
    assert own.paths() == [str(tmp_path / "nomad.slice" / f"{cgroups.PREFIX}run")]
    with pytest.raises(cgroups.CgroupError, match="not under"):
        Cgroup("run", limits._replace(cpuset_cgroup="/tmp/elsewhere"))


def frozen(group: Cgroup) -> bool:
    """Whether the cgroup's freezer is set (v1 FROZEN or FREEZING; v2 cgroup.freeze 1)."""
    found = group.freezer()
    assert found is not None
    if cgroups.version() == 2:
        return Path(found[0]).read_text().strip() == "1"
    return Path(found[0]).read_text().strip() != "THAWED"


DIRECT_WRITER = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
buf = mmap.mmap(-1, 2 << 20)  # page-aligned, as O_DIRECT needs
while True:  # each call: 1 GiB from one buffer, in uninterruptible sleep for its duration
    os.pwritev(fd, [buf] * 512, 0)
"""


def test_kill_ends_a_task_whose_processes_will_not_freeze(tmp_path: Path) -> None:
    """Processes in uninterruptible I/O do not freeze (v1 stays FREEZING): the kill must still
    signal every member, thaw, and end them all; never leave the cgroup frozen with SIGKILL
    pending (a task that never ends, its memory held)."""
    group = Cgroup(f"t-dio-{uuid.uuid4().hex[:8]}")
    group.create(Limits(memory_bytes=256 << 20))
    target = tmp_path / "direct"
    procs = [in_cgroup(group, "exec sleep 600")]
    procs += [
        subprocess.Popen(
            [sys.executable, "-c", DIRECT_WRITER, f"{target}{i}"],
            preexec_fn=group.join,
            stderr=subprocess.DEVNULL,
        )
        for i in range(4)
    ]
    try:
        time.sleep(2)
        stalled = not group.freeze(True, timeout=0.2)  # the attack worked: not all stopped
        assert not stalled or not frozen(group)  # a failed freeze is thawed again
        group.freeze(False)
        start = time.monotonic()
        assert group.kill(timeout=30), "members left after the kill"
        print(f"freeze stalled: {stalled}; kill took {time.monotonic() - start:.2f}s")
        assert group.members() == []
        assert not frozen(group)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        group.freeze(False)
        group.remove()


def test_kill_signals_every_member_even_when_the_freeze_times_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same rule, made certain: a freeze that never completes changes nothing."""
    group = Cgroup(f"t-nofreeze-{uuid.uuid4().hex[:8]}")
    group.create(Limits(memory_bytes=64 << 20))
    procs = [in_cgroup(group, "exec sleep 600") for _ in range(3)]
    monkeypatch.setattr(Cgroup, "freeze", lambda self, frozen, timeout=1.0: False)
    try:
        time.sleep(0.2)
        assert len(group.members()) == 3  # the control
        assert group.kill(timeout=5)
        assert group.members() == []
        assert all(p.wait(timeout=5) == -9 for p in procs)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        group.remove()


def test_tcp_buffers_count_against_the_memory_limit_on_v1() -> None:
    if cgroups.version() != 1:
        pytest.skip("v2 charges socket memory to the cgroup always")
    group = Cgroup(f"t-tcp-{uuid.uuid4().hex[:8]}")
    group.create(Limits(memory_bytes=64 << 20))
    try:
        tcp = Path(group._path("memory"), "memory.kmem.tcp.limit_in_bytes")
        if not tcp.exists():
            pytest.skip("this kernel has no v1 TCP accounting")
        assert int(tcp.read_text()) == 64 << 20
    finally:
        group.remove()


def test_v2_under_the_caller_changes_nothing_of_the_callers_cgroups(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`pyhpc run` on v2: the container's cgroup is made below the caller's (a Slurm step's, a
    systemd session's) and no ancestor's subtree_control is written: not pyhpc's to change."""
    monkeypatch.setattr(cgroups, "version", lambda: 2)
    monkeypatch.setattr(cgroups, "ROOT", str(tmp_path))
    monkeypatch.setattr(cgroups, "_own_cgroups", lambda: {"": "/user.slice/session-1.scope"})
    caller = tmp_path / "user.slice" / "session-1.scope"
    caller.mkdir(parents=True)
    for d in (tmp_path, tmp_path / "user.slice", caller):
        (d / "cgroup.subtree_control").write_text("")
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids")
    limits = Limits(pids_max=64, cgroup_parent=cgroups.CALLER)
    group = Cgroup("run", limits)
    assert group.paths() == [str(caller / f"{cgroups.PREFIX}run")]
    group.create(limits)
    assert (caller / f"{cgroups.PREFIX}run").is_dir()
    for d in (tmp_path, tmp_path / "user.slice", caller):
        assert (d / "cgroup.subtree_control").read_text() == "", d


def test_prewarm_leaves_the_caller_where_it_was() -> None:
    """cgroups.prewarm moves the caller into the cgroup it is in (to start the kernel's wait
    early): a process in a cgroup of its own is still there, and only there, afterwards."""
    group = Cgroup(f"prewarm-{uuid.uuid4().hex[:6]}", Limits(pids_max=64))
    group.create(Limits(pids_max=64), host_root=True)
    script = (
        "import os, sys, threading, time\n"
        "from nomad_driver.runtime import cgroups\n"
        "before = open('/proc/self/cgroup').read()\n"
        "cgroups.prewarm()\n"
        "for t in threading.enumerate():\n"
        "    if t.name == 'cgroup-prewarm': t.join(5)\n"
        "sys.stdout.write(str(before == open('/proc/self/cgroup').read()) + ' ' + before)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], preexec_fn=group.join, stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=30)
        same, _, before = out.decode().partition(" ")
        assert group.name in before  # the control: not where a wrong move would take it
        assert same == "True" and proc.returncode == 0
    finally:
        group.remove()
