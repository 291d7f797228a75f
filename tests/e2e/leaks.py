"""What a pyhpc node could leak, counted node-wide: supervisor processes, mounts, loop devices,
cgroups, task run directories, image references, FIFOs and descriptors the plugin holds, and
store locks held. Compare a snapshot before a load or a fault with one after."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

RUN_DIR = Path("/run/pyhpc")
STORE = Path("/var/lib/pyhpc/store")


def _cmdlines() -> dict[int, str]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found[int(entry)] = (
                    Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                )
            except OSError:
                continue
    return found


def parent_pid(pid: int) -> int:
    """pid's parent, or 0 once pid is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def plugin_pids(state_dir: Path) -> list[int]:
    """The pyhpc task driver processes Nomad runs (one per region's agent). A driver's own
    child between fork and exec shows the driver's command line too (CI saw one while tasks
    started): a process whose parent is one of these is not a driver, nor is one now gone."""
    found = [
        pid
        for pid, cmd in _cmdlines().items()
        if cmd.rstrip().endswith(f"{state_dir}/plugins/pyhpc")
    ]
    return sorted(pid for pid in found if parent_pid(pid) not in (0, *found))


def supervisors() -> list[int]:
    """Every task supervisor on the node: exec'd ones by their command line, forkserver ones
    by their working directory (client.supervisors knows both)."""
    from nomad_driver.runtime import client

    return sorted(client.supervisors().values())


def _held_store_locks() -> list[str]:
    locks = STORE / "locks"
    if not locks.is_dir():
        return []
    inodes = {
        f"{os.major(s.st_dev):02x}:{os.minor(s.st_dev):02x}:{s.st_ino}": p.name
        for p in locks.iterdir()
        for s in [p.stat()]
    }
    held = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[5] in inodes:
            held.append(inodes[fields[5]])
    return sorted(held)


def _plugin_fds(state_dir: Path) -> tuple[int, list[str]]:
    total, fifos = 0, []
    for pid in plugin_pids(state_dir):
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            for fd in fd_dir.iterdir():
                total += 1
                try:
                    if stat.S_ISFIFO(os.stat(fd).st_mode) and os.readlink(fd).startswith("/"):
                        fifos.append(os.readlink(fd))
                except OSError:
                    continue
        except OSError:
            continue
    return total, sorted(fifos)


def _fifos_under(top: Path) -> list[str]:
    """FIFOs under pyhpc's run dir. The walk does not enter mount points (an image root is the
    image's files, not ours, and may be unmounted mid-walk: CI saw that race; a leaked mount is
    caught as a mount) and skips entries that vanish while it looks."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if not os.path.ismount(os.path.join(dirpath, d))]
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                if stat.S_ISFIFO(os.lstat(path).st_mode):
                    found.append(path)
            except OSError:
                continue
    return sorted(found)


def snapshot(state_dir: Path) -> dict[str, Any]:
    # A `pyhpc run` earlier on this node may have left an image mount lingering (its
    # image_mount_linger): a cache, dropped before the count, not a leak. Mounts with any
    # reference, live or stale, stay and are counted.
    from nomad_driver.runtime.imagemount import SharedImages

    SharedImages(str(RUN_DIR / "images")).drop_lingering()
    mounts = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(str(RUN_DIR))
    ]
    loops = [
        line
        for line in subprocess.run(
            ["losetup", "-a"], capture_output=True, text=True
        ).stdout.splitlines()
        if "/var/lib/pyhpc/" in line
    ]
    cgroups = sorted(
        str(p) for p in Path("/sys/fs/cgroup").glob("*/pyhpc/*") if p.is_dir()
    ) + sorted(str(p) for p in Path("/sys/fs/cgroup").glob("pyhpc/*") if p.is_dir())
    tasks = (
        sorted(p.name for p in (RUN_DIR / "tasks").iterdir())
        if (RUN_DIR / "tasks").is_dir()
        else []
    )
    refs = sorted(p.name for p in (RUN_DIR / "images").glob("*/refs/*"))
    fifo_files = _fifos_under(RUN_DIR)
    fds, fifo_fds = _plugin_fds(state_dir)
    return {
        "supervisors": supervisors(),
        "mounts": sorted(mounts),
        "loop devices": sorted(loops),
        "cgroups": cgroups,
        "task run dirs": tasks,
        "image refs": refs,
        "fifos": fifo_files + fifo_fds,
        "store locks held": _held_store_locks(),
        "store tmp": sorted(p.name for p in (STORE / "tmp").iterdir())
        if (STORE / "tmp").is_dir()
        else [],
        "plugin fds": fds,
    }


def settle(
    state_dir: Path, before: dict[str, Any], timeout: float = 60, fd_slack: int = 4
) -> dict[str, Any]:
    """Wait until everything but the plugin's descriptors is back to before (Nomad destroys
    finished tasks asynchronously); returns the last snapshot."""
    deadline = time.monotonic() + timeout
    while True:
        after = snapshot(state_dir)
        same = all(after[k] == before[k] for k in before if k != "plugin fds")
        if same and after["plugin fds"] <= before["plugin fds"] + fd_slack:
            return after
        if time.monotonic() > deadline:
            return after


def leaked(before: dict[str, Any], after: dict[str, Any], fd_slack: int = 4) -> dict[str, Any]:
    """What differs (the plugin's descriptor count may grow by fd_slack)."""
    diff = {k: (before[k], after[k]) for k in before if k != "plugin fds" and before[k] != after[k]}
    if after["plugin fds"] > before["plugin fds"] + fd_slack:
        diff["plugin fds"] = (before["plugin fds"], after["plugin fds"])
    return diff


def quiet_baseline(state_dir: Path, timeout: float = 60) -> dict[str, Any]:
    """The snapshot to compare a test's end with, once an earlier test's tasks have ended (CI
    saw a dispatched `solver` end mid-test and count as a difference): up to timeout for
    them, then the count, settled."""
    deadline = time.monotonic() + timeout
    while supervisors() and time.monotonic() < deadline:
        time.sleep(0.5)
    return settle(state_dir, snapshot(state_dir), timeout=10)
