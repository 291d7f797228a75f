"""CPU and memory of a container's processes, read from /proc on the host, and CPU counters
turned into shares of one core over the interval between two readings."""

from __future__ import annotations

import os
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcessUsage:
    user_seconds: float
    system_seconds: float
    rss_bytes: int


class Rate:
    """The share of one core, in percent, that a growing CPU-time counter (nanoseconds) used
    since the previous reading. The first reading has no interval and gives 0."""

    def __init__(self) -> None:
        self.last: tuple[int, float] | None = None

    def percent(self, cpu_ns: float, now_ns: int) -> float:
        last, self.last = self.last, (now_ns, cpu_ns)
        if last is None or now_ns <= last[0] or cpu_ns <= last[1]:
            return 0.0
        return (cpu_ns - last[1]) / (now_ns - last[0]) * 100.0


class Rates:
    """Rate for the total, user and system CPU time of one thing (a task, a process)."""

    def __init__(self) -> None:
        self.total, self.user, self.system = Rate(), Rate(), Rate()

    def percents(
        self, total_ns: float, user_ns: float, system_ns: float, now_ns: int
    ) -> tuple[float, float, float]:
        return (
            self.total.percent(total_ns, now_ns),
            self.user.percent(user_ns, now_ns),
            self.system.percent(system_ns, now_ns),
        )


def descendants(pid: int) -> list[int]:
    """pid and every process below it, through /proc/<pid>/task/<tid>/children."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            tids = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{current}/task/{tid}/children", encoding="ascii") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                continue
    return found


def process_usage(pid: int) -> ProcessUsage | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/statm", encoding="ascii") as f:
            rss_pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    # Counting from the state field after the command name: utime is 11, stime 12.
    return ProcessUsage(
        int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS, rss_pages * PAGE_SIZE
    )


def tree_usage(pid: int) -> dict[int, ProcessUsage]:
    usage = {}
    for p in descendants(pid):
        u = process_usage(p)
        if u is not None:
            usage[p] = u
    return usage


def cpu_mhz() -> float:
    """Per-core clock, for Nomad's "ticks" (MHz consumed)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.lower().startswith("cpu mhz"):
                    return float(line.split(":")[1])
    except (OSError, ValueError):
        pass
    return 1000.0
