"""The GPU device plugin in the real Nomad on a node without GPUs: loaded and running, no
devices reported, and a job asking for a GPU is not placed, with Nomad saying why."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def test_a_gpu_job_is_not_placed_on_a_node_without_gpus(cluster: Any) -> None:
    pids = subprocess.run(
        ["pgrep", "-f", f"{cluster.state_dir}/plugins/pyhpc-gpu"], capture_output=True, text=True
    ).stdout.split()
    assert pids, "Nomad did not start the pyhpc-gpu device plugin"
    node = cluster.node()
    assert not (node.get("NodeResources") or {}).get("Devices"), node["NodeResources"]
    job_id = cluster.run_job((REPO / "jobspecs" / "gpu.nomad").read_text())
    deadline = time.monotonic() + 30
    while True:
        evals = cluster.api(f"job/{job_id}/evaluations")
        failed = [e for e in evals if e.get("FailedTGAllocs")]
        if failed:
            break
        assert time.monotonic() < deadline, evals
        time.sleep(0.5)
    metrics = failed[0]["FailedTGAllocs"]["gpu"]
    assert metrics["ConstraintFiltered"].get("missing devices") == 1, metrics
    assert cluster.allocs(job_id) == []
    assert (
        subprocess.run(
            ["pgrep", "-f", f"{cluster.state_dir}/plugins/pyhpc-gpu"], capture_output=True
        ).returncode
        == 0
    )  # still running
    cluster.stop_job(job_id)


def test_the_driver_says_the_node_has_no_gpus_and_a_constraint_on_it_holds(cluster: Any) -> None:
    attrs = cluster.node()["Attributes"]
    assert attrs["driver.pyhpc.gpu.count"] == "0", {
        k: v for k, v in attrs.items() if k.startswith("driver.pyhpc")
    }
    spec = (
        (REPO / "jobspecs" / "hello.nomad").read_text().replace('job "hello"', 'job "e2e-gpu-attr"')
    )
    spec = spec.replace(
        '  group "hello" {',
        '  constraint {\n    attribute = "${attr.driver.pyhpc.gpu.count}"\n'
        '    operator  = ">"\n    value     = "0"\n  }\n\n  group "hello" {',
    )
    job_id = cluster.run_job(spec)
    deadline = time.monotonic() + 30
    while not [e for e in cluster.api(f"job/{job_id}/evaluations") if e.get("FailedTGAllocs")]:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert cluster.allocs(job_id) == []
    cluster.stop_job(job_id)
