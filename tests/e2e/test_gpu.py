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
