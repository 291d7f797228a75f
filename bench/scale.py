"""One node, many concurrent tasks, through the real Nomad (issue: performance, item 5):
N long tasks started at once on the test bed's one client, then the driver killed with
SIGKILL while they run. Measures the driver's CPU and RSS throughout, the latency of every
unary RPC Nomad makes (PYHPC_RPC_TIMING, see nomad_driver/goplugin/timing.py), the time
until all N run, the time until a new driver has recovered all N (Nomad calls RecoverTask
for each), and the time to stop them.

    python bench/scale.py [--tasks 250,500]

Restarts the test bed with one region and the RPC timing on for each size, and at the end
brings it back as it was (up as usual, or down).
Needs root and the test bed built (scripts/setup.sh). Writes bench/results/scale.md, .json
and scale-N.png for each size N.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import requests  # noqa: E402

from bench.jobs import Sampler, allocs, batch_job, purge, register  # noqa: E402
from nomad_driver.runtime import client  # noqa: E402
from tests.e2e.leaks import plugin_pids  # noqa: E402

CLUSTER_SH = REPO / "scripts" / "testbed" / "cluster.sh"
STATE = Path(os.environ.get("PYHPC_CLUSTER_DIR", "/tmp/pyhpc-cluster"))
NOMAD = "http://127.0.0.1:4646"
IMAGE = "/var/lib/pyhpc/images/busybox.sqsh"
JOB = "bench-scale"


def _drivers(old: int) -> list[int]:
    """The test bed's pyhpc driver processes (tests/e2e/leaks.py knows them), but not old."""
    return [p for p in plugin_pids(STATE) if p != old]


def _catches_sigusr1(pid: int) -> bool:
    """Whether pid has a handler for SIGUSR1 (/proc/PID/status SigCgt); False once gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & 1 << (signal.SIGUSR1 - 1))
    except OSError:
        pass
    return False


def driver_pid(old: int = 0, timeout: float = 120) -> int:
    """The one pyhpc driver the test bed's agent runs (not old): the same one twice, a second
    apart, and catching SIGUSR1 (its RPC timing on), so that signal cannot kill it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        first = _drivers(old)
        time.sleep(1)
        if len(first) == 1 and _drivers(old) == first:
            if _catches_sigusr1(first[0]):
                return first[0]
    raise RuntimeError(f"no single pyhpc driver with its RPC timing on (found {_drivers(old)})")


def rpc_calls(pid: int, directory: Path) -> list[tuple[str, float, float]]:
    """The driver's timed RPCs so far: (method, wall-clock start, seconds)."""
    path = directory / f"{pid}.json"
    before = path.stat().st_mtime_ns if path.exists() else 0
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while not path.exists() or path.stat().st_mtime_ns == before:
        if time.monotonic() > deadline:
            raise RuntimeError(f"driver {pid} wrote no RPC timings to {path}")
        time.sleep(0.1)
    return [(str(c[0]), float(c[1]), float(c[2])) for c in json.loads(path.read_text())]


def running() -> int:
    return sum(1 for a in allocs(NOMAD, JOB) if a["ClientStatus"] == "running")


def wait(what: str, done: Any, timeout: float) -> float:
    started = time.monotonic()
    while not done():
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.5)
    return time.monotonic() - started


def latency(calls: list[tuple[str, float, float]], since: float, until: float) -> dict[str, Any]:
    """Per method: count, p50 and p99 (ms) of the calls started in [since, until)."""
    out: dict[str, Any] = {}
    for method in sorted({c[0] for c in calls}):
        times = sorted(c[2] * 1000 for c in calls if c[0] == method and since <= c[1] < until)
        if times:
            out[method.rsplit("/", 1)[1]] = {
                "count": len(times),
                "p50_ms": round(statistics.median(times), 2),
                "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 2),
                "max_ms": round(times[-1], 2),
            }
    return out


def plot(
    path: Path, samples: list[tuple[float, float, float, int]], marks: dict[str, float]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] for s in samples]
    cpu = [0.0] + [
        100 * (b[2] - a[2]) / max(b[0] - a[0], 0.1) for a, b in itertools.pairwise(samples)
    ]
    fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    for ax, values, label in ((axes[0], [s[3] for s in samples], "tasks running"),
                              (axes[1], [s[1] for s in samples], "driver RSS (MB)"),
                              (axes[2], cpu, "driver CPU (% of one core)")):  # fmt: skip
        ax.plot(t, values)
        ax.set_ylabel(label)
        for name, at in marks.items():
            ax.axvline(at, color="grey", linestyle=":")
            if ax is axes[0]:
                ax.text(at, max(values) * 0.5, f" {name}", fontsize=8)
    axes[2].set_xlabel("seconds")
    fig.suptitle(f"{max(s[3] for s in samples)} concurrent tasks on one node")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def node_ready() -> bool:
    nodes = requests.get(f"{NOMAD}/v1/nodes", timeout=30).json()
    return any(n["Status"] == "ready" for n in nodes)


def machine() -> dict[str, Any]:
    """What loads the machine: the load average, and processes and RSS (MB) by command."""
    counts: dict[str, list[float]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                status = Path(entry.path, "status").read_text().splitlines()
            except OSError:
                continue
            name = status[0].split(":", 1)[1].strip()
            rss = next((int(x.split()[1]) for x in status if x.startswith("VmRSS:")), 0)
            counts.setdefault(name, [0, 0.0])
            counts[name][0] += 1
            counts[name][1] += rss / 1024
    top = sorted(counts.items(), key=lambda kv: -kv[1][1])[:6]
    return {"load": os.getloadavg()[0],
            "processes": {k: [int(v[0]), round(v[1])] for k, v in top}}  # fmt: skip


def ramp(n: int) -> tuple[int, float, str]:
    """Wait for n tasks up: (how many came up, seconds, why it stopped short or "")."""
    started = last_change = time.monotonic()
    best = 0
    while True:
        up = len(client.supervisors())
        if up > best:
            best, last_change = up, time.monotonic()
        if up >= n:
            return up, time.monotonic() - started, ""
        if not node_ready():
            return best, time.monotonic() - started, "the Nomad node went down (missed heartbeats)"
        if time.monotonic() - last_change > 180:
            return best, time.monotonic() - started, "no task started for 3 minutes"
        time.sleep(1)


def one_size(n: int, timings: Path, out: Path) -> dict[str, Any]:
    """Start n tasks on a fresh test bed, kill the driver, recover, stop: the measurements."""
    env = {**os.environ, "PYHPC_RPC_TIMING": str(timings), "PYHPC_REGIONS": "1",
           "PYHPC_PYTHON": os.environ.get("PYHPC_PYTHON", sys.executable)}  # fmt: skip
    subprocess.run([str(CLUSTER_SH), "down"], capture_output=True, check=False)
    subprocess.run([str(CLUSTER_SH), "up"], env=env, check=True, capture_output=True)
    r: dict[str, Any] = {"tasks": n}
    marks: dict[str, float] = {}
    pid = driver_pid()
    sampler = Sampler(pid)
    sampler.sample()
    sampler.start()
    try:
        t0 = time.time()
        spec = {"image": IMAGE, "command": "/bin/sleep", "args": ["100000"]}
        register(NOMAD, batch_job(JOB, "pyhpc", spec, n, cpu=5, memory=16, disk=10))
        up, took, short = ramp(n)
        r.update(reached=up, start_all_s=round(took, 1), stopped_short=short, machine=machine())
        r["rpc_start"] = latency(rpc_calls(pid, timings), t0, time.time())
        print(f"{up} of {n} up after {took:.0f} s {short}", flush=True)
        if not short:
            wait("Nomad sees them running", lambda: running() >= n, 300)
            t_up, steady = time.time(), sampler.samples[-1]
            time.sleep(60)
            last = sampler.samples[-1]
            r["steady_cpu_pct"] = round(100 * (last[2] - steady[2]) / (last[0] - steady[0]), 1)
            r["steady_rss_mb"] = round(last[1], 1)
            r["rpc_steady"] = latency(rpc_calls(pid, timings), t_up, time.time())
            t_kill = time.time()
            marks["kill -9"] = time.monotonic() - sampler.t0
            os.kill(pid, signal.SIGKILL)
            new = driver_pid(old=pid)
            sampler.pid = new

            def recovered() -> bool:
                done = [c for c in rpc_calls(new, timings) if c[0].endswith("/RecoverTask")]
                if len(done) < n:
                    return False
                r["recover_all_s"] = round(max(c[1] + c[2] for c in done) - t_kill, 1)
                r["rpc_recover"] = latency(done, t_kill, time.time())
                return True

            wait(f"{n} tasks recovered", recovered, 1200)
            marks["recovered"] = marks["kill -9"] + r["recover_all_s"]
            r["survived"], r["running_after"] = len(client.supervisors()), running()
            time.sleep(20)
        if not short:  # a node that is down stops nothing: the test bed's end does
            marks["stop"] = time.monotonic() - sampler.t0
            purge(NOMAD, JOB)
            r["stop_all_s"] = round(wait("all gone", lambda: not client.supervisors(), 1800), 1)
            time.sleep(5)
    finally:
        sampler.stop.set()
        sampler.join()
        purge(NOMAD, JOB)
        subprocess.run([str(CLUSTER_SH), "down"], capture_output=True, check=False)
    rss = [s[1] for s in sampler.samples if s[1]]
    r.update(rss_start_mb=round(rss[0], 1), rss_peak_mb=round(max(rss), 1),
             rss_end_mb=round(rss[-1], 1), samples=sampler.samples)  # fmt: skip
    plot(out.with_name(f"{out.stem}-{n}.png"), sampler.samples, marks)
    return r


def sizes(text: str) -> list[int]:
    """--tasks: positive task counts, comma-separated."""
    try:
        counts = [int(n) for n in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected task counts such as 250,500")
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="250,500", type=sizes,
                        help="sizes to run, comma-separated")  # fmt: skip
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.md"))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the test bed still comes down
    out = Path(args.out)
    timings = Path(tempfile.mkdtemp(prefix="pyhpc-rpc-timing-"))
    was_up = subprocess.run([str(CLUSTER_SH), "status"], capture_output=True).returncode == 0
    try:
        results = [one_size(n, timings, out) for n in args.tasks]
    finally:
        if was_up:  # as it was: the other benchmarks run on the usual test bed
            subprocess.run([str(CLUSTER_SH), "up"], capture_output=True, check=False,
                           env={**os.environ, "PYHPC_PYTHON": sys.executable})  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(results))
    lines = [f"# Concurrent tasks on one node: {', '.join(str(r['tasks']) for r in results)}", ""]
    lines += [
        f"Measured by `python bench/scale.py --tasks {','.join(map(str, args.tasks))}` on "
        f"{os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') >> 30} GB, "
        f"{time.strftime('%Y-%m-%d')}: the test bed's one Nomad client (server and client in "
        "one agent, one region), `sleep` tasks of one batch job (cpu 5 MHz, 16 MB each) "
        "registered at once, every protection on; where all came up, the driver was killed "
        "with SIGKILL while they ran. RPC times are the driver's own, around each unary call "
        "(PYHPC_RPC_TIMING).",
        "",
    ]
    for r in results:
        lines += report(r, f"{out.stem}-{r['tasks']}.png")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def report(r: dict[str, Any], png: str) -> list[str]:
    n, m = r["tasks"], r["machine"]
    procs = ", ".join(f"{k} {v[0]} ({v[1]} MB)" for k, v in m["processes"].items())
    lines = [
        f"## {n} tasks",
        "",
        f"![tasks, driver RSS and CPU]({png})",
        "",
        "| measure | value |",
        "|---|---|",
        f"| tasks up | {r['reached']} of {n}, after {r['start_all_s']} s "
        f"{'(' + r['stopped_short'] + ')' if r['stopped_short'] else ''} |",
        f"| the machine then | load average {m['load']:.0f}; processes (RSS): {procs} |",
        f"| driver RSS: fresh / peak / at the end | {r['rss_start_mb']} / {r['rss_peak_mb']} / "
        f"{r['rss_end_mb']} MB |",
    ]
    if "steady_cpu_pct" in r:
        lines += [
            f"| driver with {n} running: CPU, RSS | {r['steady_cpu_pct']} % of a core, "
            f"{r['steady_rss_mb']} MB |",
            f"| a new driver has recovered all {n}, from the kill | {r['recover_all_s']} s |",
            f"| tasks alive / running in Nomad after the recovery | {r['survived']} / "
            f"{r['running_after']} |",
        ]
    if "stop_all_s" in r:
        lines.append(f"| all gone, from the job's purge | {r['stop_all_s']} s |")
    lines += ["",
              "| phase | RPC | calls | p50 (ms) | p99 (ms) | max (ms) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for phase in ("rpc_start", "rpc_steady", "rpc_recover"):
        for method, s in r.get(phase, {}).items():
            lines.append(f"| {phase[4:]} | {method} | {s['count']} | {s['p50_ms']} | "
                         f"{s['p99_ms']} | {s['max_ms']} |")  # fmt: skip
    return [*lines, ""]


if __name__ == "__main__":
    raise SystemExit(main())
