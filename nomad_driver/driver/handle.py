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
    """CPU as shares of one core (percent) over the last interval, and memory in bytes keyed by
    Nomad's names for the figures; throttling where the cgroup counts it (else None)."""

    percent: float
    user: float
    system: float
    memory: dict[str, int]
    throttled: tuple[int, int] | None = None  # periods, nanoseconds


@dataclass(frozen=True)
class Sample:
    timestamp: float
    total: Usage
    by_pid: dict[int, Usage]


def task_cgroup(run_dir: str) -> Cgroup | None:
    """The cgroup the task's supervisor made, as its spec placed it."""
    try:
        spec = client.read_spec(run_dir)
    except (OSError, ValueError):
        return None
    return Cgroup(os.path.basename(run_dir), spec.limits) if spec.limits is not None else None


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
        self._rates: dict[int, stats.Rates] = {}  # pid, 0 for the task's cgroup
        self._lock = threading.Lock()
        self._on_exit = on_exit
        self.cgroup = task_cgroup(state.run_dir)
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

    def usage(self) -> Sample:
        """The task's usage from its cgroup (or, without one, the sum of its processes, our
        init excepted), and each process's own, with CPU shares since the last sample."""
        now = time.monotonic_ns()
        by_pid = stats.tree_usage(self.state.init_pid)
        by_pid.pop(self.state.init_pid, None)
        with self._lock:
            for gone in set(self._rates) - set(by_pid) - {0}:
                del self._rates[gone]
            per_pid = {
                pid: Usage(
                    *self._rates.setdefault(pid, stats.Rates()).percents(
                        u.user_seconds * 1e9 + u.system_seconds * 1e9,
                        u.user_seconds * 1e9,
                        u.system_seconds * 1e9,
                        now,
                    ),
                    memory={"RSS": u.rss_bytes},
                )
                for pid, u in by_pid.items()
            }
            rates = self._rates.setdefault(0, stats.Rates())
            measured = self.cgroup.usage() if self.cgroup is not None else None
            if measured is not None:
                total = Usage(
                    *rates.percents(measured.cpu_ns, measured.user_ns, measured.system_ns, now),
                    memory=measured.memory,
                    throttled=(measured.throttled_periods, measured.throttled_ns),
                )
            else:
                user = sum(u.user_seconds for u in by_pid.values()) * 1e9
                system = sum(u.system_seconds for u in by_pid.values()) * 1e9
                total = Usage(
                    *rates.percents(user + system, user, system, now),
                    memory={"RSS": sum(u.rss_bytes for u in by_pid.values())},
                )
        return Sample(time.time(), total, per_pid)
