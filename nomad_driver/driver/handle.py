"""One task the driver tracks: its run directory, its exit, and its resource usage over time."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from nomad_driver.driver.state import DriverState
from nomad_driver.runtime import client, stats
from nomad_driver.runtime.cgroups import Cgroup
from nomad_driver.runtime.spec import ExitStatus


@dataclass(frozen=True)
class Usage:
    timestamp: float
    user_seconds: float
    system_seconds: float
    percent: float
    rss_bytes: int
    by_pid: dict[int, stats.ProcessUsage]


class TaskHandle:
    def __init__(
        self,
        task_id: str,
        name: str,
        alloc_id: str,
        state: DriverState,
        on_exit: Callable[[TaskHandle], None] | None = None,
    ) -> None:
        self.task_id = task_id
        self.name = name
        self.alloc_id = alloc_id
        self.state = state
        self.result: ExitStatus | None = None
        self.exited = threading.Event()
        self._last: tuple[float, float] | None = None
        self._lock = threading.Lock()
        self._on_exit = on_exit
        self.cgroup = Cgroup(os.path.basename(state.run_dir))
        threading.Thread(target=self._watch, name=f"wait-{name}", daemon=True).start()

    def _watch(self) -> None:
        self.result = client.wait(self.state.run_dir)
        if self._on_exit is not None:
            self._on_exit(self)
        self.exited.set()

    @property
    def run_dir(self) -> str:
        return self.state.run_dir

    def wait(self, timeout: float | None) -> ExitStatus | None:
        self.exited.wait(timeout)
        return self.result

    def usage(self) -> Usage:
        """The task's usage from its cgroup (or its processes, our init excepted), with the CPU
        share since the last sample."""
        now = time.time()
        by_pid = stats.tree_usage(self.state.init_pid)
        by_pid.pop(self.state.init_pid, None)
        user = sum(u.user_seconds for u in by_pid.values())
        system = sum(u.system_seconds for u in by_pid.values())
        rss = sum(u.rss_bytes for u in by_pid.values())
        cpu_total = user + system
        measured = self.cgroup.usage()
        if measured is not None:
            cpu_total, rss = measured.cpu_seconds, measured.rss_bytes
        with self._lock:
            last, self._last = self._last, (now, cpu_total)
        percent = 0.0
        if last is not None and now > last[0]:
            percent = max(0.0, (cpu_total - last[1]) / (now - last[0]) * 100.0)
        return Usage(now, user, system, percent, rss, by_pid)
