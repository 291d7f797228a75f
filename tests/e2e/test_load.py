"""Load through the real Nomad: many tasks at once on one client, then many short batch jobs in
a row; afterwards nothing leaked (tests/e2e/leaks.py: processes, mounts, loop devices, cgroups,
run directories, image references, FIFOs, descriptors, store locks), every exit code true, and
the plugin's memory and CPU sampled throughout.

Sizes: short by default (what CI runs); PYHPC_SOAK=full for 200 at once and 1,000 in a row.
PYHPC_LOAD_REPORT=FILE writes the samples and timings as JSON (bench/report.py uses it)."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import leaks
from test_faults import driver_pid
from test_foundation import IMAGE

from bench.jobs import Sampler, allocs, batch_job, purge, register

FULL = os.environ.get("PYHPC_SOAK") == "full"
CONCURRENT = 200 if FULL else 30
SEQUENTIAL = 1000 if FULL else 60
NOMAD = "http://127.0.0.1:4646"
# What the driver may keep (MB) after a burst of CONCURRENT tasks, and gain over the jobs in
# a row. Before the elastic thread pool and heap trims, 200 at once left it 28 MB larger and
# 1,000 in a row added 8 MB more (bench/results/load.json of 2026-12-01); on 2026-12-03,
# +8.9 MB and +0.0 MB.
BURST_MB = 10.0
IN_A_ROW_MB = 2.0


def settled_rss(sampler: Sampler, limit: float, wait: float = 75.0) -> float:
    """The driver's RSS once it is at most limit MB, or its lowest within wait seconds (two
    fingerprint periods: the heap is trimmed once in each)."""
    deadline = time.monotonic() + wait
    while True:
        sampler.sample()
        lowest = min(s[1] for s in sampler.samples[-3:])
        if lowest <= limit or time.monotonic() > deadline:
            return lowest
        time.sleep(1.0)


def batch(name: str, script: str, count: int = 1) -> dict[str, Any]:
    config = {"image": IMAGE, "command": "/bin/sh", "args": ["-c", script]}
    return batch_job(name, "pyhpc", config, count, cpu=10, memory=16)


def exit_code(alloc: dict[str, Any]) -> int | None:
    events = ((alloc.get("TaskStates") or {}).get("t") or {}).get("Events") or []
    codes = [int(e["ExitCode"]) for e in events if e["Type"] == "Terminated"]
    assert len(codes) <= 1, events
    return codes[0] if codes else None


def test_many_at_once_then_many_in_a_row_through_nomad_leave_nothing(cluster: Any) -> None:
    before = leaks.quiet_baseline(cluster.state_dir)
    sampler = Sampler(driver_pid(cluster))
    sampler.sample()
    sampler.start()
    hold = 10 + CONCURRENT // 5  # long enough for every task to be up at the same time
    name = f"e2e-load-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    register(NOMAD, batch(name, f"sleep {hold}; exit 3", CONCURRENT))
    deadline = started + hold + 600
    while True:
        found = allocs(NOMAD, name)
        if len(found) == CONCURRENT and all(
            a["ClientStatus"] in ("complete", "failed", "lost") for a in found
        ):
            break
        assert time.monotonic() < deadline, f"{CONCURRENT} at once did not finish"
        time.sleep(1)
    concurrent_s = time.monotonic() - started
    codes = [exit_code(a) for a in found]
    assert codes == [3] * CONCURRENT, codes
    peak = max(s[3] for s in sampler.samples)
    assert peak == CONCURRENT, f"at most {peak} of {CONCURRENT} ran at the same time"
    purge(NOMAD, name)
    after_burst = settled_rss(sampler, sampler.samples[0][1] + BURST_MB)

    started = time.monotonic()
    for i in range(SEQUENTIAL):
        one = f"e2e-load-seq-{uuid.uuid4().hex[:6]}-{i}"
        register(NOMAD, batch(one, "exit 0"))
        while True:
            done = [
                a for a in allocs(NOMAD, one) if a["ClientStatus"] in ("complete", "failed", "lost")
            ]
            if done:
                break
            time.sleep(0.05)
        assert done[0]["ClientStatus"] == "complete" and exit_code(done[0]) == 0, done[0]
        purge(NOMAD, one)
    sequential_s = time.monotonic() - started
    after = leaks.settle(cluster.state_dir, before, timeout=60)
    end = settled_rss(sampler, after_burst + IN_A_ROW_MB)
    sampler.stop.set()
    sampler.join()
    assert driver_pid(cluster) == sampler.pid  # the driver itself never restarted
    assert leaks.leaked(before, after) == {}
    rss = [s[1] for s in sampler.samples]
    summary = {
        "concurrent": CONCURRENT,
        "concurrent_s": round(concurrent_s, 1),
        "sequential": SEQUENTIAL,
        "sequential_s": round(sequential_s, 1),
        "sequential_per_s": round(SEQUENTIAL / sequential_s, 2),
        "rss_start_mb": round(rss[0], 1),
        "rss_peak_mb": round(max(rss), 1),
        "rss_after_burst_mb": round(after_burst, 1),
        "rss_end_mb": round(end, 1),
        "cpu_s": round(sampler.samples[-1][2] - sampler.samples[0][2], 1),
        "samples": sampler.samples,
    }
    if os.environ.get("PYHPC_LOAD_REPORT"):
        Path(os.environ["PYHPC_LOAD_REPORT"]).write_text(json.dumps(summary))
    print({k: v for k, v in summary.items() if k != "samples"})
    # Memory comes back once the burst is over (idle gRPC threads leave, the C heap is trimmed
    # each fingerprint period), and the jobs in a row add nothing.
    assert after_burst <= rss[0] + BURST_MB, (
        f"{CONCURRENT} at once: {rss[0]:.1f} -> {after_burst:.1f} MB"
    )
    assert end <= after_burst + IN_A_ROW_MB, (
        f"{SEQUENTIAL} in a row: {after_burst:.1f} -> {end:.1f} MB"
    )
