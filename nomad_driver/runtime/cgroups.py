"""Resource limits and accounting for one task through cgroups, v1 or v2 (both exist on real
clusters; this module detects which). A task's cgroup is named after its run directory."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from typing import NamedTuple

from nomad_driver.util.errors import PyhpcError

ROOT = "/sys/fs/cgroup"
# Every v1 controller Nomad's own exec driver places a task in (devices only for host root).
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer", "cpuset", "devices")
V2_CONTROLLERS = ("cpu", "cpuset", "memory", "pids")
PARENT = "pyhpc"  # a task of no Nomad client, where no parent is given
# `pyhpc run`'s parent: the cgroup its caller is in, in each hierarchy, so a limit the caller
# lives under (a Slurm job's, a systemd session's) bounds the container too.
CALLER = "."
NOMAD_PARENT = {1: "nomad", 2: "nomad.slice"}  # the Nomad client's default cgroup_parent
PREFIX = "pyhpc-"  # the cgroups pyhpc makes, among Nomad's own under the same parent
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
NS_PER_TICK = 1e9 / os.sysconf("SC_CLK_TCK")


class CgroupError(PyhpcError, RuntimeError):
    """A task's cgroup cannot be made as its security needs; the message says why."""


class Limits(NamedTuple):  # NamedTuple: loaded by every supervisor (see spec.py)
    """What Nomad allocated: memory (soft) and memory_max (hard), CPU shares, reserved cores,
    and where the task's cgroups go: the client's cgroup_parent, and the cpuset cgroup Nomad
    made for the task (v1: its parent's shared or reserved cpuset; v2: the task's own scope),
    which keeps cores reserved for other tasks out of this one's reach."""

    memory_bytes: int = 0
    memory_max_bytes: int = 0
    cpu_shares: int = 0
    cpuset_cpus: str = ""
    pids_max: int = 0
    cgroup_parent: str = ""
    cpuset_cgroup: str = ""


class Usage(NamedTuple):
    """A cgroup's counters: CPU in nanoseconds, memory in bytes keyed by Nomad's names for the
    figures (only those this node's cgroup version measures)."""

    cpu_ns: int
    user_ns: int
    system_ns: int
    throttled_periods: int
    throttled_ns: int
    memory: dict[str, int]


def version() -> int:
    return 2 if os.path.exists(os.path.join(ROOT, "cgroup.controllers")) else 1


def nomad_parent(cpuset_cgroup: str, ver: int) -> str:
    """The client's cgroup_parent, read from the cpuset cgroup it gave a task (v1:
    PARENT/shared or PARENT/reserved/ID under the cpuset hierarchy; v2: PARENT/ID.scope); its
    default where Nomad gave none (no cpuset management on this client)."""
    if not cpuset_cgroup:
        return NOMAD_PARENT[ver]
    rel = os.path.relpath(cpuset_cgroup, os.path.join(ROOT, "cpuset" if ver == 1 else ""))
    if rel.startswith(".."):
        return NOMAD_PARENT[ver]
    if ver == 2:
        return os.path.dirname(rel) or NOMAD_PARENT[ver]
    if os.path.basename(os.path.dirname(rel)) == "reserved":
        return os.path.dirname(os.path.dirname(rel)) or NOMAD_PARENT[ver]
    return os.path.dirname(rel) or NOMAD_PARENT[ver]


def prewarm() -> None:
    """Start now, in the background, the RCU grace period the next cgroup attach would wait
    for. Moving a task takes a global lock whose first writer waits a grace period (10-15 ms
    here, measured; later writers within about one more are quick), so this moves the calling
    process into the cgroup it is already in: nothing changes but the wait starts, while the
    caller does its other work (a task start's policy checks, the supervisor's fork). Best
    effort: any failure only means the attach waits as before."""
    import threading

    try:  # in a cgroup namespace /proc/self/cgroup is relative to it: not a path to write
        if os.readlink("/proc/self/ns/cgroup") != os.readlink("/proc/1/ns/cgroup"):
            return
    except OSError:
        return
    own = _own_cgroups()
    ver = version()
    where = own.get("") if ver == 2 else own.get("pids", own.get("memory"))
    if where is None:
        return
    name = "" if ver == 2 else ("pids" if "pids" in own else "memory")
    path = os.path.join(ROOT, name, where.lstrip("/"), "cgroup.procs")

    def move() -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        except OSError:
            pass

    threading.Thread(target=move, name="cgroup-prewarm", daemon=True).start()


def _own_cgroups() -> dict[str, str]:
    """The calling process's cgroup in each hierarchy: controller -> path ("" for v2)."""
    found: dict[str, str] = {}
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            for line in f:
                _, names, path = line.rstrip("\n").split(":", 2)
                for name in names.split(",") if names else [""]:
                    found[name] = path
    except (OSError, ValueError):
        pass
    return {k: v for k, v in found.items() if ".." not in v.split("/")}


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


def _number(path: str) -> int | None:
    try:
        return int(_read(path))
    except (OSError, ValueError):
        return None


class Cgroup:
    """One task's cgroup(s), under the parent its Limits name. The cgroups Nomad made for the
    task (its cpuset) are joined and read, never made or removed: the client owns them. All
    methods tolerate a cgroup that is already gone."""

    def __init__(self, name: str, limits: Limits | None = None) -> None:
        self.name = name
        self.version = version()
        limits = limits or Limits()
        self.parent = limits.cgroup_parent.strip("/") or PARENT
        self.caller = _own_cgroups() if limits.cgroup_parent == CALLER else {}
        if limits.cgroup_parent == CALLER:
            # Fail closed: a hierarchy whose caller cgroup is unknown would fall back to the
            # root, outside the caller's limits.
            wanted = [""] if self.version == 2 else [
                c for c in V1_CONTROLLERS if os.path.isdir(os.path.join(ROOT, c))
            ]  # fmt: skip
            unknown = [c or "unified" for c in wanted if c not in self.caller]
            if unknown:
                raise CgroupError(
                    f"cannot tell the caller's own cgroup in the {', '.join(unknown)} "
                    "hierarchy (/proc/self/cgroup); refusing to start the container outside it"
                )
        self.given = limits.cpuset_cgroup
        hierarchy = os.path.join(ROOT, "cpuset") if self.version == 1 else ROOT
        if self.given and (
            os.path.normpath(self.given) != self.given or not self.given.startswith(hierarchy + "/")
        ):
            raise CgroupError(
                f"the cpuset cgroup Nomad gave, {self.given!r}, is not under this node's cgroup "
                f"v{self.version} hierarchy"
            )
        if self.caller:
            self.parent = ""
        elif self.parent != os.path.normpath(self.parent) or self.parent.startswith(".."):
            raise CgroupError(f"cgroup parent {limits.cgroup_parent!r} is not a plain path")
        # The devices controller is joined only by host-root tasks, which need its allowlist:
        # each more v1 controller joined costs a start about a millisecond.
        self.devices = False

    def _path(self, controller: str) -> str:
        if self.version == 2:
            parent = self.caller.get("", "") or self.parent
            return self.given or os.path.join(ROOT, parent.lstrip("/"), PREFIX + self.name)
        if controller == "cpuset" and self.given:
            return self.given
        parent = self.caller.get(controller, "") or self.parent
        return os.path.join(ROOT, controller, parent.lstrip("/"), PREFIX + self.name)

    def paths(self) -> list[str]:
        if self.version == 2:
            return [self._path("")]
        return [
            self._path(c)
            for c in V1_CONTROLLERS
            if os.path.isdir(os.path.join(ROOT, c))
            and (c != "devices" or self.devices or os.path.isdir(self._path(c)))
        ]

    def owned(self) -> list[str]:
        """The paths pyhpc made and so removes."""
        return [p for p in self.paths() if p != self.given]

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
        if self.version == 2 and self.caller:
            # The caller's cgroup holds processes (the caller): v2 lets it hand no controller
            # down, and it is not ours (a Slurm step's, a systemd session's) to change. The
            # container's cgroup then groups it (kill, freeze) with whatever limits the caller's
            # cgroup already hands down; the caller's own limits above it bound it anyway.
            os.makedirs(self._path(""), exist_ok=True)
            try:
                self._apply(limits)
            except OSError:
                pass
            return
        if self.version == 2:
            self._delegate(os.path.dirname(self._path("")))
        elif os.path.isdir(os.path.join(ROOT, "cpuset")) and not self.given:
            # A v1 cpuset starts empty: the parent gets its own parent's cores and memory nodes.
            above = os.path.join(ROOT, "cpuset")
            for part in self.parent.split("/"):
                below = os.path.join(above, part)
                if not os.path.isdir(below):
                    os.makedirs(below, exist_ok=True)
                    for f in ("cpuset.cpus", "cpuset.mems"):
                        _write(os.path.join(below, f), _read(os.path.join(above, f)))
                above = below
        for path in self.owned():
            os.makedirs(path, exist_ok=True)
        self._apply(limits)

    @staticmethod
    def _delegate(parent: str) -> None:
        """v2: every cgroup from the root down to parent hands its children the controllers."""
        available = set(_read(os.path.join(ROOT, "cgroup.controllers")).split())
        wanted = [c for c in V2_CONTROLLERS if c in available]
        os.makedirs(parent, exist_ok=True)
        at = ROOT
        for part in [""] + os.path.relpath(parent, ROOT).split("/"):
            at = os.path.join(at, part) if part and part != "." else at
            control = os.path.join(at, "cgroup.subtree_control")
            enabled = set(_read(control).split())
            for c in wanted:
                if c not in enabled:
                    _write(control, "+" + c)

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
            if limits.cpuset_cpus and not self.given:  # Nomad keeps its scope's cpuset itself
                _write(os.path.join(p, "cpuset.cpus"), limits.cpuset_cpus)
            return
        mem = self._path("memory")
        if hard:
            _write(os.path.join(mem, "memory.limit_in_bytes"), str(hard))
            # v1 charges TCP buffers to no cgroup until this is set: a task could fill the
            # node's tcp_mem with sockets nobody reads, against every tenant's TCP.
            tcp = os.path.join(mem, "memory.kmem.tcp.limit_in_bytes")
            if os.path.exists(tcp):
                _write(tcp, str(hard))
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
        if os.path.isdir(cpuset) and not self.given:
            parent = os.path.dirname(cpuset)
            _write(os.path.join(cpuset, "cpuset.mems"), _read(os.path.join(parent, "cpuset.mems")))
            _write(
                os.path.join(cpuset, "cpuset.cpus"),
                limits.cpuset_cpus or _read(os.path.join(parent, "cpuset.cpus")),
            )

    def join(self, pid: int = 0) -> None:
        """Move process pid (0: the calling one), and so all it starts, into the cgroup(s)."""
        for path in self.paths():
            _write(os.path.join(path, "cgroup.procs"), str(pid))

    def freezer(self) -> tuple[str, str, str] | None:
        """(control file, state file, the state line meaning frozen), or None without one."""
        path = self._path("freezer")
        if self.version == 2:
            found = (os.path.join(path, "cgroup.freeze"), os.path.join(path, "cgroup.events"))
            return (*found, "frozen 1") if os.path.exists(found[0]) else None
        state = os.path.join(path, "freezer.state")
        return (state, state, "FROZEN") if os.path.exists(state) else None

    def freeze(self, frozen: bool, timeout: float = 1.0) -> bool:
        """Stop every process of the task at once (frozen), or let them go on. True once the
        kernel reports them all stopped; False where there is no freezer, or when some process
        does not stop within timeout (one in uninterruptible sleep: a slow disk, NFS), and then
        the cgroup is thawed again: never left half frozen."""
        import time

        freezer = self.freezer()
        if freezer is None:
            return False
        control, state, want = freezer
        v2 = self.version == 2
        try:
            if not frozen:
                _write(control, "0" if v2 else "THAWED")
                return True
            _write(control, "1" if v2 else "FROZEN")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if want in _read(state).splitlines():
                    return True
                time.sleep(0.005)
            _write(control, "0" if v2 else "THAWED")
        except OSError:
            pass
        return False

    def members(self) -> list[int]:
        try:
            return [
                int(p) for p in _read(os.path.join(self._path("freezer"), "cgroup.procs")).split()
            ]
        except (OSError, ValueError):
            return []

    def kill(self, timeout: float = 5.0) -> bool:
        """SIGKILL every process of the task, so none can fork away meanwhile: v2 cgroup.kill;
        v1 freeze (as far as the kernel manages: a process in uninterruptible sleep does not
        stop), kill each member, thaw (a frozen process acts on SIGKILL only once thawed), and
        again until the cgroup is empty or timeout passes. False where neither is there or
        processes remain."""
        import time

        path = self._path("freezer")
        if self.version == 2 and os.path.exists(os.path.join(path, "cgroup.kill")):
            try:
                _write(os.path.join(path, "cgroup.kill"), "1")
                return True
            except OSError:
                return False
        if self.freezer() is None:
            return False
        deadline = time.monotonic() + timeout
        while True:
            self.freeze(True, timeout=0.2)
            try:
                for pid in self.members():
                    try:
                        os.kill(pid, 9)
                    except ProcessLookupError:
                        pass
            finally:
                self.freeze(False)
            time.sleep(0.01)
            if not self.members():
                return True
            if time.monotonic() > deadline:
                return False

    def oom_kills(self) -> int:
        if self.version == 2:
            return _keyed(os.path.join(self._path(""), "memory.events")).get("oom_kill", 0)
        return _keyed(os.path.join(self._path("memory"), "memory.oom_control")).get("oom_kill", 0)

    def usage(self) -> Usage | None:
        """The counters Nomad's executor reports, as this cgroup version names them; None once
        the cgroup is gone."""
        try:
            return self._usage_v2() if self.version == 2 else self._usage_v1()
        except (OSError, ValueError):
            return None

    def _usage_v2(self) -> Usage:
        p = self._path("")
        cpu = _keyed(os.path.join(p, "cpu.stat"))
        stat = _keyed(os.path.join(p, "memory.stat"))
        memory = {"Usage": int(_read(os.path.join(p, "memory.current")))}
        memory["RSS"] = stat.get("anon", 0)
        memory["Cache"] = stat.get("file", 0)
        for name, source in (("Swap", "memory.swap.current"), ("Max Usage", "memory.peak")):
            value = _number(os.path.join(p, source))
            if value is not None:
                memory[name] = value
        if "kernel" in stat:
            memory["Kernel Usage"] = stat["kernel"]
        return Usage(
            cpu.get("usage_usec", 0) * 1000,
            cpu.get("user_usec", 0) * 1000,
            cpu.get("system_usec", 0) * 1000,
            cpu.get("nr_throttled", 0),
            cpu.get("throttled_usec", 0) * 1000,
            memory,
        )

    def _usage_v1(self) -> Usage:
        mem = self._path("memory")
        stat = _keyed(os.path.join(mem, "memory.stat"))
        memory = {
            "RSS": stat.get("total_rss", stat.get("rss", 0)),
            "Cache": stat.get("total_cache", stat.get("cache", 0)),
            "Usage": int(_read(os.path.join(mem, "memory.usage_in_bytes"))),
            "Max Usage": int(_read(os.path.join(mem, "memory.max_usage_in_bytes"))),
        }
        if "total_swap" in stat or "swap" in stat:
            memory["Swap"] = stat.get("total_swap", stat.get("swap", 0))
        for name, source in (
            ("Kernel Usage", "memory.kmem.usage_in_bytes"),
            ("Kernel Max Usage", "memory.kmem.max_usage_in_bytes"),
        ):
            value = _number(os.path.join(mem, source))
            if value is not None:
                memory[name] = value
        acct = self._path("cpuacct")
        ticks = _keyed(os.path.join(acct, "cpuacct.stat"))
        throttling = _keyed(os.path.join(self._path("cpu"), "cpu.stat"))
        return Usage(
            int(_read(os.path.join(acct, "cpuacct.usage"))),
            int(ticks.get("user", 0) * NS_PER_TICK),
            int(ticks.get("system", 0) * NS_PER_TICK),
            throttling.get("nr_throttled", 0),
            throttling.get("throttled_time", 0),
            memory,
        )

    def remove(self) -> None:
        for path in self.owned():
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


def names() -> dict[str, str]:
    """The task cgroups pyhpc made that exist, in any hierarchy: name -> parent. Only under
    the parents pyhpc uses by default (Nomad's own cgroups there are not ours to judge)."""
    ver = version()
    found: dict[str, str] = {}
    for parent in (PARENT, NOMAD_PARENT[ver]):
        dirs = (
            [os.path.join(ROOT, parent)]
            if ver == 2
            else [os.path.join(ROOT, c, parent) for c in V1_CONTROLLERS]
        )
        for d in dirs:
            try:
                found.update(
                    (e.name[len(PREFIX) :], parent)
                    for e in os.scandir(d)
                    if e.is_dir() and e.name.startswith(PREFIX)
                )
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
    found = names()
    busy = in_use()
    for name in sorted(set(found) - busy):
        group = Cgroup(name, Limits(cgroup_parent=found[name]))
        try:
            born = min(os.stat(p).st_ctime for p in group.owned() if os.path.isdir(p))
        except (OSError, ValueError):
            continue
        if now - born < SWEEP_GRACE_S:
            continue
        group.remove()
        if not any(os.path.isdir(p) for p in group.owned()):
            removed.append(name)
    return removed
