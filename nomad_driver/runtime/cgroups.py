"""Resource limits and accounting for one task through cgroups, v1 or v2 (both exist on real
clusters; this module detects which). A task's cgroup is named after its run directory."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from typing import NamedTuple

ROOT = "/sys/fs/cgroup"
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "cpuset", "devices")
PARENT = "pyhpc"
# The devices every task may open (devices.allow lines): null, zero, full, random, urandom,
# tty, ptmx and the pseudo-terminals of its own devpts. Anything else only if passed through.
STANDARD_DEVICES = (
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
)


class CgroupError(RuntimeError):
    """A task's cgroup cannot be made as its security needs; the message says why."""


class Limits(NamedTuple):  # NamedTuple: loaded by every supervisor (see spec.py)
    """What Nomad allocated: memory (soft) and memory_max (hard), CPU shares, reserved cores."""

    memory_bytes: int = 0
    memory_max_bytes: int = 0
    cpu_shares: int = 0
    cpuset_cpus: str = ""
    pids_max: int = 0


class Usage(NamedTuple):
    memory_bytes: int
    rss_bytes: int
    cache_bytes: int
    max_memory_bytes: int
    cpu_seconds: float


def version() -> int:
    return 2 if os.path.exists(os.path.join(ROOT, "cgroup.controllers")) else 1


def _write(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read().strip()


def _keyed(path: str) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split()[:2] for line in _read(path).splitlines())}
    except (OSError, ValueError):
        return {}


class Cgroup:
    """One task's cgroup(s). All methods tolerate a cgroup that is already gone."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.version = version()
        # The devices controller is joined only by host-root tasks, which need its allowlist:
        # each more v1 controller joined costs a start about a millisecond.
        self.devices = False

    def paths(self) -> list[str]:
        if self.version == 2:
            return [os.path.join(ROOT, PARENT, self.name)]
        return [
            os.path.join(ROOT, c, PARENT, self.name)
            for c in V1_CONTROLLERS
            if os.path.isdir(os.path.join(ROOT, c))
            and (
                c != "devices"
                or self.devices
                or os.path.isdir(os.path.join(ROOT, c, PARENT, self.name))
            )
        ]

    def _path(self, controller: str) -> str:
        if self.version == 2:
            return os.path.join(ROOT, PARENT, self.name)
        return os.path.join(ROOT, controller, PARENT, self.name)

    def create(
        self, limits: Limits, devices: Iterable[tuple[str, bool]] = (), host_root: bool = False
    ) -> None:
        """Make the cgroup(s) with limits, and on v1 a device allowlist: STANDARD_DEVICES and
        devices, (host path, read_only) pairs, a directory meaning every device under it.
        host_root: the task has no user namespace, so only the allowlist keeps it from the
        host's devices; refused where there is none. On failure nothing is left behind."""
        if host_root and not self._confines_devices():
            raise CgroupError(
                "user_namespace = false needs the cgroup v1 devices controller to keep host "
                f"root tasks from the host's devices, and this node has cgroup v{self.version}"
                + (" (no device BPF program support yet)" if self.version == 2 else "")
                + "; set the plugin's user_namespace = true"
            )
        # In a user namespace the kernel already keeps the task from device nodes (mknod needs
        # CAP_MKNOD over the host, every mount it could use is nodev); host root needs the
        # allowlist (its own cgroup, nine writes): paid only where it protects.
        self.devices = confine = host_root and self._confines_devices()
        rules = [*STANDARD_DEVICES, *device_rules(devices)] if confine else []
        try:
            self._create(limits)
            if rules:
                allowlist = self._path("devices")
                _write(os.path.join(allowlist, "devices.deny"), "a")
                for rule in rules:
                    _write(os.path.join(allowlist, "devices.allow"), rule)
        except BaseException:
            self.remove()
            raise

    def _confines_devices(self) -> bool:
        return self.version == 1 and os.path.isdir(os.path.join(ROOT, "devices"))

    def _create(self, limits: Limits) -> None:
        if self.version == 2:
            parent = os.path.join(ROOT, PARENT)
            os.makedirs(parent, exist_ok=True)
            wanted = {"+memory", "+cpu", "+pids", "+cpuset"}
            available = set(
                "+" + c for c in _read(os.path.join(ROOT, "cgroup.controllers")).split()
            )
            for c in sorted(wanted & available):
                _write(os.path.join(ROOT, "cgroup.subtree_control"), c)
                _write(os.path.join(parent, "cgroup.subtree_control"), c)
        else:
            cpuset_parent = os.path.join(ROOT, "cpuset", PARENT)
            if os.path.isdir(os.path.join(ROOT, "cpuset")) and not os.path.isdir(cpuset_parent):
                os.makedirs(cpuset_parent, exist_ok=True)
                for f in ("cpuset.cpus", "cpuset.mems"):  # a v1 cpuset starts empty
                    _write(os.path.join(cpuset_parent, f), _read(os.path.join(ROOT, "cpuset", f)))
        for path in self.paths():
            os.makedirs(path, exist_ok=True)
        self._apply(limits)

    def _apply(self, limits: Limits) -> None:
        hard = max(limits.memory_max_bytes, limits.memory_bytes)
        if self.version == 2:
            p = self._path("")
            if hard:
                _write(os.path.join(p, "memory.max"), str(hard))
                if os.path.exists(os.path.join(p, "memory.swap.max")):
                    _write(os.path.join(p, "memory.swap.max"), "0")
            if limits.memory_bytes and limits.memory_max_bytes > limits.memory_bytes:
                _write(os.path.join(p, "memory.low"), str(limits.memory_bytes))
            if limits.cpu_shares:
                # cgroup v1 shares 2..262144 map onto v2 weights 1..10000 (the runc formula).
                weight = 1 + ((limits.cpu_shares - 2) * 9999) // 262142
                _write(os.path.join(p, "cpu.weight"), str(max(1, min(10000, weight))))
            if limits.pids_max:
                _write(os.path.join(p, "pids.max"), str(limits.pids_max))
            if limits.cpuset_cpus:
                _write(os.path.join(p, "cpuset.cpus"), limits.cpuset_cpus)
            return
        mem = self._path("memory")
        if hard:
            _write(os.path.join(mem, "memory.limit_in_bytes"), str(hard))
            swap = os.path.join(mem, "memory.memsw.limit_in_bytes")
            if os.path.exists(swap):
                _write(swap, str(hard))
        if limits.memory_bytes and limits.memory_max_bytes > limits.memory_bytes:
            _write(os.path.join(mem, "memory.soft_limit_in_bytes"), str(limits.memory_bytes))
        if limits.cpu_shares:
            _write(os.path.join(self._path("cpu"), "cpu.shares"), str(max(2, limits.cpu_shares)))
        if limits.pids_max and os.path.isdir(self._path("pids")):
            _write(os.path.join(self._path("pids"), "pids.max"), str(limits.pids_max))
        cpuset = self._path("cpuset")
        if os.path.isdir(cpuset):
            parent = os.path.dirname(cpuset)
            _write(os.path.join(cpuset, "cpuset.mems"), _read(os.path.join(parent, "cpuset.mems")))
            _write(
                os.path.join(cpuset, "cpuset.cpus"),
                limits.cpuset_cpus or _read(os.path.join(parent, "cpuset.cpus")),
            )

    def join(self) -> None:
        """Move the calling process (and so all it starts) into the cgroup(s)."""
        for path in self.paths():
            _write(os.path.join(path, "cgroup.procs"), "0")

    def oom_kills(self) -> int:
        if self.version == 2:
            return _keyed(os.path.join(self._path(""), "memory.events")).get("oom_kill", 0)
        return _keyed(os.path.join(self._path("memory"), "memory.oom_control")).get("oom_kill", 0)

    def usage(self) -> Usage | None:
        try:
            if self.version == 2:
                p = self._path("")
                stat = _keyed(os.path.join(p, "memory.stat"))
                cpu = _keyed(os.path.join(p, "cpu.stat")).get("usage_usec", 0) / 1e6
                current = int(_read(os.path.join(p, "memory.current")))
                peak_file = os.path.join(p, "memory.peak")
                peak = int(_read(peak_file)) if os.path.exists(peak_file) else 0
                return Usage(current, stat.get("anon", 0), stat.get("file", 0), peak, cpu)
            mem = self._path("memory")
            stat = _keyed(os.path.join(mem, "memory.stat"))
            cpu = int(_read(os.path.join(self._path("cpuacct"), "cpuacct.usage"))) / 1e9
            return Usage(
                int(_read(os.path.join(mem, "memory.usage_in_bytes"))),
                stat.get("total_rss", stat.get("rss", 0)),
                stat.get("total_cache", stat.get("cache", 0)),
                int(_read(os.path.join(mem, "memory.max_usage_in_bytes"))),
                cpu,
            )
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        for path in self.paths():
            try:
                os.rmdir(path)
            except OSError:
                pass


def device_rules(devices: Iterable[tuple[str, bool]]) -> list[str]:
    """devices.allow lines for host devices given as (path, read_only): a device node by its
    type and major:minor, a directory by every device node inside it."""
    rules = []
    for path, read_only in devices:
        access = "r" if read_only else "rw"
        try:
            found = [os.stat(path)]
            if stat.S_ISDIR(found[0].st_mode):
                found = [
                    os.lstat(os.path.join(parent, name))
                    for parent, _, files in os.walk(path)
                    for name in files
                ]
        except OSError as err:
            raise CgroupError(f"device {path}: {err.strerror}") from err
        for st in found:
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                kind = "c" if stat.S_ISCHR(st.st_mode) else "b"
                rules.append(f"{kind} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} {access}")
    return rules


def names() -> set[str]:
    """The task cgroups that exist under our parent, in any hierarchy."""
    parents = (
        [os.path.join(ROOT, PARENT)]
        if version() == 2
        else [os.path.join(ROOT, c, PARENT) for c in V1_CONTROLLERS]
    )
    found: set[str] = set()
    for parent in parents:
        try:
            found.update(e.name for e in os.scandir(parent) if e.is_dir())
        except OSError:
            continue
    return found


SWEEP_GRACE_S = 60.0


def sweep(in_use: Callable[[], set[str]], now: float | None = None) -> list[str]:
    """Remove the task cgroups not in in_use() (a supervisor that died before cleaning up leaves
    its cgroup). The cgroups are listed before in_use() is asked, so one made meanwhile by a
    starting supervisor is in use by then; only empty cgroups can be removed at all; and none
    younger than SWEEP_GRACE_S, since another pyhpc driver on the node (a second Nomad client,
    with its own run_dir) may have just made it for a supervisor about to join it."""
    import time

    removed = []
    now = time.time() if now is None else now
    for name in sorted(names() - in_use()):
        group = Cgroup(name)
        try:
            born = min(os.stat(p).st_ctime for p in group.paths() if os.path.isdir(p))
        except (OSError, ValueError):
            continue
        if now - born < SWEEP_GRACE_S:
            continue
        group.remove()
        if not any(os.path.isdir(p) for p in group.paths()):
            removed.append(name)
    return removed
