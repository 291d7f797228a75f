"""What one stats sample costs the plugin: TaskHandle.usage() (the task's cgroup counters, its
process tree from /proc, per-process rates) turned into Nomad's TaskStats message, on a task of
N processes, against the raw read of the cgroup's counters alone. Needs root.

    python bench/stats_cost.py [--processes 1 8 32] [--samples 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nomad_driver.driver.handle import TaskHandle  # noqa: E402
from nomad_driver.driver.service import resource_usage  # noqa: E402
from nomad_driver.driver.state import DriverState  # noqa: E402
from nomad_driver.runtime import client  # noqa: E402
from nomad_driver.runtime.cgroups import Limits  # noqa: E402
from nomad_driver.runtime.spec import ContainerSpec  # noqa: E402
from nomad_driver.runtime.stats import cpu_mhz  # noqa: E402

IMAGE = "/var/lib/pyhpc/images/busybox.sqsh"


def median_us(call: object, samples: int) -> float:
    times = []
    for _ in range(samples):
        start = time.perf_counter_ns()
        call()  # type: ignore[operator]
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1000


def measure(processes: int, samples: int) -> dict[str, float | int]:
    work = Path(tempfile.mkdtemp(prefix="pyhpc-stats-"))
    script = f"for i in $(seq {processes - 1}); do sleep 600 & done; exec sleep 600"
    spec = ContainerSpec(
        task_id="bench", hostname="bench", image=IMAGE, command="/bin/sh", args=("-c", script),
        env={"PATH": "/bin"}, work_dir="/", user="", stdout_path=os.devnull,
        stderr_path=os.devnull, mounts=(), images_dir=str(work / "images"),
        userns=(100000, 65536),
        limits=Limits(memory_bytes=256 << 20, pids_max=4096),
    )  # fmt: skip
    started = client.start(spec, str(work / "run"))
    try:
        time.sleep(0.5)
        state = DriverState(started.run_dir, started.supervisor_pid, started.init_pid, 0.0)
        handle = TaskHandle("bench", "bench", "alloc", state)
        mhz = cpu_mhz()
        seen = len(handle.usage().by_pid)
        full = median_us(lambda: resource_usage(handle.usage().total, mhz), samples)
        cgroup = handle.cgroup
        assert cgroup is not None
        raw = median_us(cgroup.usage, samples)
        return {"processes": seen, "sample_us": round(full, 1), "cgroup_only_us": round(raw, 1)}
    finally:
        client.send_signal(started.run_dir, 9)
        client.wait(started.run_dir)
        client.remove(started.run_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    rows = [measure(n, args.samples) for n in args.processes]
    out = REPO / "bench" / "results"
    (out / "stats_cost.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "# Cost of one stats sample",
        "",
        f"`python bench/stats_cost.py` on this machine ({os.cpu_count()} cores, cgroup "
        f"v{handle_version()}), median of {args.samples} samples. Nomad asks for one sample per "
        "task per collection interval (1 s by default).",
        "",
        "| task processes | whole sample (µs) | cgroup counters alone (µs) |",
        "|---|---|---|",
        *(f"| {r['processes']} | {r['sample_us']} | {r['cgroup_only_us']} |" for r in rows),
        "",
    ]
    (out / "stats_cost.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def handle_version() -> int:
    from nomad_driver.runtime.cgroups import version

    return version()


if __name__ == "__main__":
    sys.exit(main())
