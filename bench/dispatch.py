"""Dispatch across two federated regions: dispatch-to-running latency in the same region and
cross-region (both through global's agent, as `pyhpc dispatch` does), Nomad's own CLI dispatch
as the anchor, and N dispatches spread over both regions (throughput, failures).

Needs the test bed with both regions (scripts/testbed/cluster.sh up) and the demo image.
Usage:

    python bench/dispatch.py [--samples 20] [--spread 200] [--out bench/results/dispatch.md]

Latency = the task's "Started" event time minus the moment just before the dispatch request
(one machine, one clock). Throughput = dispatches / the time from the first request until every
dispatched job has ended.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.jobs import batch_job  # noqa: E402
from nomad_driver.federation.dispatch import Nomad, dispatch, ensure_job, follow

NOMAD = os.environ.get("NOMAD_ADDR", "http://127.0.0.1:4646")
IMAGE = "/var/lib/pyhpc/images/busybox.sqsh"
JOB = "bench-dispatch"


def parent() -> dict[str, Any]:
    """A parameterized pyhpc job that runs /bin/true (the measure is dispatch, not work)."""
    job = batch_job(JOB, "pyhpc", {"image": IMAGE, "command": "/bin/true"})
    job["ParameterizedJob"] = {"Payload": "optional", "MetaOptional": ["n"]}
    return job


def started_at(nomad: Nomad, region: str, job: str, timeout: float = 120) -> float:
    """Wall time (s) of the task's Started event in the job's allocation."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for alloc in nomad.call("GET", f"/v1/job/{job}/allocations", region) or []:
            for event in (alloc.get("TaskStates") or {}).get("t", {}).get("Events") or []:
                if event["Type"] == "Started":
                    return float(event["Time"]) / 1e9
        time.sleep(0.02)
    raise TimeoutError(f"{job} in {region} did not start within {timeout}s")


def latency_api(nomad: Nomad, region: str, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        before = time.time()
        [run] = dispatch(nomad, JOB, [region], {})
        samples.append(started_at(nomad, run.region, run.job) - before)
    return samples


def latency_cli(nomad: Nomad, nomad_bin: str, n: int) -> list[float]:
    """The anchor: `nomad job dispatch -detach` in the agent's own region."""
    samples = []
    for _ in range(n):
        before = time.time()
        out = subprocess.run(
            [nomad_bin, "job", "dispatch", "-detach", JOB],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "NOMAD_ADDR": NOMAD},
        ).stdout
        job = next(line.split("=")[1].strip() for line in out.splitlines() if "Dispatched" in line)
        samples.append(started_at(nomad, "global", job) - before)
    return samples


def spread(nomad: Nomad, regions: list[str], n: int) -> dict[str, Any]:
    before = time.time()
    runs = dispatch(nomad, JOB, [regions[i % len(regions)] for i in range(n)], {})
    sent = time.time() - before
    follow(nomad, runs, lambda changed: None, poll=0.5, timeout=1800)
    elapsed = time.time() - before
    return {
        "n": n,
        "dispatch_s": sent,
        "total_s": elapsed,
        "throughput": n / elapsed,
        "failed": sum(r.state != "complete" or r.exit_code not in (0, None) for r in runs),
        "per_region": {r: sum(x.region == r for x in runs) for r in regions},
    }


def purge_children(nomad: Nomad, regions: list[str]) -> None:
    for region in regions:
        for stub in nomad.call("GET", "/v1/jobs", region, params={"prefix": f"{JOB}/"}) or []:
            nomad.call("DELETE", f"/v1/job/{stub['ID']}", region, params={"purge": "true"})


def stats(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50": statistics.median(samples),
        "p95": statistics.quantiles(samples, n=20)[18] if len(samples) > 1 else samples[0],
    }


def nomad_binary() -> str:
    cache = Path(os.environ.get("PYHPC_TESTBED_CACHE", Path.home() / ".cache/pyhpc/testbed"))
    found = sorted(cache.glob("nomad-*/nomad"))
    if not found:
        raise SystemExit("no test-bed nomad binary (scripts/testbed/build.sh all)")
    return str(found[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20, help="dispatches per latency row")
    parser.add_argument("--spread", type=int, default=200, help="dispatches over both regions")
    parser.add_argument("--out", default="bench/results/dispatch.md")
    args = parser.parse_args()

    nomad = Nomad(NOMAD, timeout=30)
    regions = nomad.regions()
    if len(regions) < 2:
        raise SystemExit(f"needs two federated regions, the agent sees {regions}")
    nomad.call("POST", "/v1/jobs", "global", json={"Job": parent()})
    ensure_job(nomad, JOB, regions, "global")
    latency_api(nomad, "global", 2)  # warm-up: image mounts and caches
    latency_api(nomad, "east", 2)
    rows = {
        "nomad job dispatch (CLI), same region": stats(
            latency_cli(nomad, nomad_binary(), args.samples)
        ),
        "pyhpc dispatch, same region (global)": stats(latency_api(nomad, "global", args.samples)),
        "pyhpc dispatch, cross-region (global -> east)": stats(
            latency_api(nomad, "east", args.samples)
        ),
    }
    for name, row in rows.items():
        print(name, row, flush=True)
    purge_children(nomad, regions)
    load = spread(nomad, regions, args.spread)
    print("spread", load, flush=True)
    purge_children(nomad, regions)

    anchor = rows["nomad job dispatch (CLI), same region"]["p50"]
    lines = [
        "# Dispatch benchmark: same region vs cross-region, and a spread load",
        "",
        f"Command: `python bench/dispatch.py --samples {args.samples} --spread {args.spread}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: "
        f"{os.cpu_count()} cores; two federated Nomad 1.6.3 regions on loopback (global/dc1, "
        "east/dc2), one agent (server+client) each, requests sent to global's agent. "
        "Task: pyhpc `/bin/true`. Latency: dispatch request -> task Started event.",
        "",
        "| dispatch | n | p50 (s) | p95 (s) | p50 vs Nomad CLI |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        ratio = r["p50"] / anchor
        lines.append(f"| {name} | {r['n']:.0f} | {r['p50']:.3f} | {r['p95']:.3f} | {ratio:.2f}x |")
    lines += [
        "",
        f"Spread load: {load['n']} dispatches over {', '.join(regions)} "
        f"({', '.join(f'{n} to {r}' for r, n in load['per_region'].items())}): all requests "
        f"sent in {load['dispatch_s']:.1f} s, all ended {load['total_s']:.1f} s after the "
        f"first, **{load['throughput']:.2f} jobs/s**, **{load['failed']} failed**.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(
        json.dumps({"latency": rows, "spread": load}, indent=1)
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
