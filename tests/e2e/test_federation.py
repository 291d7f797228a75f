"""Two federated Nomad regions (global: dc1, east: dc2; cluster.sh): `pyhpc dispatch` from
global's address to east, spread and best placement, a region going away (failover, a pinned
dispatch failing clearly, no double dispatch on retry), and job sync to both."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {"NOMAD_ADDR": "http://127.0.0.1:4646", "PATH": "/usr/bin:/bin"}
QUICK = ("--meta", "size=100", "--meta", "hold=0")


def pyhpc(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nomad_driver.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def rows(stdout: str) -> list[list[str]]:
    """The last table's rows: [instance, region, job, state, exit, ...]."""
    tables = stdout.split("  #  REGION")
    return [line.split() for line in tables[-1].splitlines() if re.match(r"\s*\d+  ", line)]


def children(cluster: Any, region: str) -> set[str]:
    return {j["ID"] for j in cluster.api("jobs", prefix="hpc/dispatch-", region=region)}


@pytest.fixture
def hpc(cluster: Any) -> Iterator[None]:
    """hpc.nomad registered in global only (east must get it from pyhpc dispatch)."""
    cluster.nomad("job", "stop", "-region", "east", "-purge", "-yes", "-detach", "hpc", check=False)
    cluster.nomad("job", "run", "-detach", str(REPO / "jobspecs" / "hpc.nomad"))
    yield


def test_the_agent_federates_two_regions(cluster: Any) -> None:
    assert cluster.api("regions") == ["east", "global"]
    nodes = cluster.api("nodes", region="east")
    assert [n["Datacenter"] for n in nodes] == ["dc2"]
    assert nodes[0]["Drivers"]["pyhpc"]["Healthy"]


def test_dispatch_from_global_runs_in_east_and_its_output_comes_back(
    cluster: Any, hpc: None
) -> None:
    before = children(cluster, "global")
    done = pyhpc("dispatch", "hpc", "--region", "east", "--output", *QUICK)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "region east: registered hpc (copied from global)" in done.stdout
    [row] = rows(done.stdout.split("\n== ")[0])
    assert row[1] == "east" and row[3] == "complete" and row[4] == "0"
    assert row[2] in children(cluster, "east") and children(cluster, "global") == before
    assert "label=unlabelled size=100 sum=5050 input_lines=0" in done.stdout
    assert "1 of 1 completed successfully (1 in east)" in done.stdout


def test_spread_puts_instances_in_both_regions(cluster: Any, hpc: None) -> None:
    done = pyhpc("dispatch", "hpc", "--count", "4", *QUICK)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(r[1] for r in rows(done.stdout)) == ["east", "east", "global", "global"]
    assert "4 of 4 completed successfully (2 in east, 2 in global)" in done.stdout


def test_best_placement_avoids_the_full_region(cluster: Any, hpc: None) -> None:
    node = cluster.node()
    total = node["NodeResources"]["Cpu"]["CpuShares"]
    filler = f"e2e-filler-{uuid.uuid4().hex[:6]}"
    cluster.run_job(
        f'job "{filler}" {{\n  datacenters = ["*"]\n  group "g" {{\n'
        f'    task "t" {{\n      driver = "raw_exec"\n'
        f'      config {{\n        command = "/bin/sleep"\n        args = ["300"]\n      }}\n'
        f"      resources {{\n        cpu = {total - 100}\n        memory = 32\n      }}\n"
        f"    }}\n  }}\n}}\n"
    )
    try:
        cluster.wait_alloc(filler, {"running"})
        done = pyhpc("dispatch", "hpc", "--count", "2", "--placement", "best", *QUICK)
        assert done.returncode == 0, done.stdout + done.stderr
        assert [r[1] for r in rows(done.stdout)] == ["east", "east"]
    finally:
        cluster.stop_job(filler)


def test_a_region_down_fails_over_and_a_retry_dispatches_nothing_twice(
    cluster: Any, hpc: None
) -> None:
    pyhpc("dispatch", "hpc", "--region", "east", "--no-follow", *QUICK)  # east has the job
    token = uuid.uuid4().hex
    stopped = cluster.script("stop-region", "east", timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    try:
        pinned = pyhpc("dispatch", "hpc", "--region", "east", *QUICK)
        assert pinned.returncode == 1
        assert "east unreachable; no region left to try" in pinned.stdout
        assert "0 of 1 completed successfully" in pinned.stdout
        both = ("dispatch", "hpc", "--region", "east", "--region", "global", "--count", "2")
        moved = pyhpc(*both, "--idempotency-token", token, *QUICK)
        assert moved.returncode == 0, moved.stdout + moved.stderr
        assert [r[1] for r in rows(moved.stdout)] == ["global", "global"]
        assert "failed over from east" in moved.stdout
    finally:
        started = cluster.script("start-region", "east", timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
    east, glob = children(cluster, "east"), children(cluster, "global")
    again = pyhpc(*both, "--idempotency-token", token, *QUICK)
    assert again.returncode == 0, again.stdout + again.stderr
    again_rows = [" ".join(r) for r in rows(again.stdout)]
    assert all("dispatched before (same token)" in r for r in again_rows) and len(again_rows) == 2
    assert children(cluster, "east") == east and children(cluster, "global") == glob


def test_job_sync_registers_in_both_regions(cluster: Any, tmp_path: Path) -> None:
    name = f"e2e-fed-sync-{uuid.uuid4().hex[:6]}"
    spec = tmp_path / "job.nomad"
    spec.write_text(
        (REPO / "jobspecs" / "hello.nomad").read_text().replace('job "hello"', f'job "{name}"')
    )
    done = pyhpc("job", "sync", str(spec), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "region east: registered" in done.stdout
    assert "region global: registered" in done.stdout
    for region in ("east", "global"):
        assert [j["ID"] for j in cluster.api("jobs", prefix=name, region=region)] == [name]
        cluster.nomad("job", "stop", "-region", region, "-purge", "-yes", "-detach", name)
