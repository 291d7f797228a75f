"""Start latency and batch throughput of pyhpc against Nomad's exec and raw_exec drivers,
side by side on the same agent, plus the plugin's and supervisor's memory.

Needs a running test-bed cluster (scripts/testbed/cluster.sh up) and the demo image
(scripts/make-demo-image.sh). Usage:

    python bench/start_latency.py [--jobs 50] [--batch 100] [--out bench/results/foundation.md]

Start latency = the task's "Started" event time minus the moment just before the job was
registered through the HTTP API. Jobs run one at a time for latency; for throughput the whole
batch is registered at once and timed until every allocation is complete.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.jobs import allocs, batch_job, purge, register  # noqa: E402
from nomad_driver.runtime import client  # noqa: E402

NOMAD = os.environ.get("NOMAD_ADDR", "http://127.0.0.1:4646")
IMAGE = "/var/lib/pyhpc/images/busybox.sqsh"
# exec runs last: removing its per-task chroots keeps the client busy long after its jobs end.
DRIVERS: dict[str, dict[str, Any]] = {
    "pyhpc": {"image": IMAGE, "command": "/bin/true"},
    "raw_exec": {"command": "/bin/true"},
    "exec": {"command": "/bin/true"},
}


def job(driver: str, name: str) -> dict[str, Any]:
    return batch_job(name, driver, DRIVERS[driver])


def wait_done(job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = allocs(NOMAD, job_id)
        if found and found[0]["ClientStatus"] in ("complete", "failed", "lost"):
            full: dict[str, Any] = requests.get(
                f"{NOMAD}/v1/allocation/{found[0]['ID']}", timeout=30
            ).json()
            return full
        time.sleep(0.05)
    raise TimeoutError(f"{job_id} did not finish in {timeout}s")


def start_latency(driver: str, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        name = f"bench-{driver}-{uuid.uuid4().hex[:8]}".replace("_", "-")
        before = time.time()
        register(NOMAD, job(driver, name))
        alloc = wait_done(name)
        if alloc["ClientStatus"] != "complete":
            raise RuntimeError(f"{driver} job failed: {alloc['TaskStates']}")
        started = next(
            e["Time"] for e in alloc["TaskStates"]["t"]["Events"] if e["Type"] == "Started"
        )
        samples.append(started / 1e9 - before)
        purge(NOMAD, name)
    return samples


def throughput(driver: str, n: int) -> float:
    names = [f"tput-{driver}-{uuid.uuid4().hex[:8]}".replace("_", "-") for _ in range(n)]
    before = time.time()
    for name in names:
        register(NOMAD, job(driver, name))
    for name in names:
        alloc = wait_done(name, timeout=600)
        if alloc["ClientStatus"] != "complete":
            raise RuntimeError(f"{driver} job failed: {alloc['TaskStates']}")
    elapsed = time.time() - before
    for name in names:
        purge(NOMAD, name)
    return n / elapsed


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def pgrep(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def memory() -> dict[str, float]:
    """Idle plugin RSS, then a running task's supervisor and container-init RSS."""
    plugin = [
        p for p in pgrep("plugins/pyhpc") if "pgrep" not in Path(f"/proc/{p}/cmdline").read_text()
    ]
    result = {"plugin_rss": max((rss_mb(p) for p in plugin), default=0.0)}
    name = f"bench-mem-{uuid.uuid4().hex[:8]}"
    spec = job("pyhpc", name)
    spec["Type"] = "service"
    spec["TaskGroups"][0]["Tasks"][0]["Config"] = {
        "image": IMAGE,
        "command": "/bin/sleep",
        "args": ["600"],
    }
    register(NOMAD, spec)
    deadline = time.time() + 60
    sups: list[int] = []
    while time.time() < deadline and not sups:
        sups = list(client.supervisors().values())
        time.sleep(0.2)
    time.sleep(1)
    sup = sups[0]
    inits = [  # the container's init is the supervisor's child
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _parent(int(p.name)) == sup
    ]
    result["supervisor_rss"] = rss_mb(sup)
    result["supervisor_pss"] = pss_mb(sup)
    result["init_rss"] = rss_mb(inits[0]) if inits else 0.0
    result["init_pss"] = pss_mb(inits[0]) if inits else 0.0
    purge(NOMAD, name)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=50, help="jobs per driver for latency")
    parser.add_argument("--batch", type=int, default=100, help="jobs per driver for throughput")
    parser.add_argument(
        "--exec-jobs",
        type=int,
        default=10,
        help="latency jobs for exec (it builds a chroot per task)",
    )
    parser.add_argument("--exec-batch", type=int, default=20, help="throughput jobs for exec")
    parser.add_argument("--out", default="bench/results/foundation.md")
    args = parser.parse_args()

    rows: dict[str, dict[str, float]] = {}
    for driver in DRIVERS:
        jobs = args.exec_jobs if driver == "exec" else args.jobs
        batch = args.exec_batch if driver == "exec" else args.batch
        start_latency(driver, 2)  # warm-up: first runs pay for image and chroot caches
        lat = start_latency(driver, jobs)
        rows[driver] = {
            "jobs": jobs,
            "p50": statistics.median(lat),
            "p95": statistics.quantiles(lat, n=20)[18],
        }
        print(driver, "latency", rows[driver], flush=True)
        rows[driver].update(batch=batch, tput=throughput(driver, batch))
        print(driver, "throughput", rows[driver], flush=True)
    mem = memory()
    print(mem, flush=True)

    ref_exec, ref_raw = rows["exec"], rows["raw_exec"]
    lines = [
        "# Foundation benchmark: pyhpc vs Nomad's exec and raw_exec",
        "",
        f"Command: `python bench/start_latency.py --jobs {args.jobs} --batch {args.batch} "
        f"--exec-jobs {args.exec_jobs} --exec-batch {args.exec_batch}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"machine: {os.cpu_count()} cores; one Nomad 1.6.3 agent (server+client) on loopback. "
        "Task: `/bin/true`. Start latency: job registered -> task Started event.",
        "",
        "| driver | jobs | start p50 (s) | start p95 (s) | p50 vs exec | p50 vs raw_exec "
        "| batch | throughput (jobs/s) | throughput vs raw_exec |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for driver, r in rows.items():
        lines.append(
            f"| {driver} | {r['jobs']:.0f} | {r['p50']:.3f} | {r['p95']:.3f} "
            f"| {r['p50'] / ref_exec['p50']:.3f}x | {r['p50'] / ref_raw['p50']:.2f}x "
            f"| {r['batch']:.0f} | {r['tput']:.2f} | {r['tput'] / ref_raw['tput']:.2f}x |"
        )
    lines += [
        "",
        "Targets: pyhpc p50 at or below exec's (ratio <= 1.00), within 1.5x of raw_exec.",
        "exec builds a chroot per task from its default chroot_env (this machine's /usr holds",
        "5 GB), so it runs fewer jobs (--exec-jobs, --exec-batch) to keep the run short.",
        "",
        "| memory | MB | target |",
        "|---|---|---|",
        f"| plugin, idle (RSS) | {mem['plugin_rss']:.1f} | <= 60 |",
        f"| per-task supervisor (RSS / PSS) | {mem['supervisor_rss']:.1f} / "
        f"{mem['supervisor_pss']:.1f} | <= 12 |",
        f"| per-task container init (RSS / PSS) | {mem['init_rss']:.1f} / "
        f"{mem['init_pss']:.1f} | |",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(json.dumps({"rows": rows, "memory": mem}))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
