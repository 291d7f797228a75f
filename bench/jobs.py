"""The one-task batch job the benchmarks and the load suite register through Nomad's API, and
the three calls they make with it."""

from __future__ import annotations

from typing import Any

import requests


def batch_job(
    name: str, driver: str, config: dict[str, Any], count: int = 1, cpu: int = 20, memory: int = 32
) -> dict[str, Any]:
    """Job `name`: group "g" of count tasks "t", no restart or reschedule (a failure shows)."""
    return {
        "ID": name,
        "Name": name,
        "Type": "batch",
        "Datacenters": ["*"],
        "TaskGroups": [
            {
                "Name": "g",
                "Count": count,
                "RestartPolicy": {"Attempts": 0, "Mode": "fail"},
                "ReschedulePolicy": {"Attempts": 0, "Unlimited": False},
                "Tasks": [
                    {
                        "Name": "t",
                        "Driver": driver,
                        "Config": config,
                        "Resources": {"CPU": cpu, "MemoryMB": memory},
                        "LogConfig": {"MaxFiles": 1, "MaxFileSizeMB": 1},
                    }
                ],
            }
        ],
    }


def register(nomad: str, spec: dict[str, Any]) -> None:
    requests.post(f"{nomad}/v1/jobs", json={"Job": spec}, timeout=30).raise_for_status()


def allocs(nomad: str, job_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = requests.get(
        f"{nomad}/v1/job/{job_id}/allocations", timeout=30
    ).json()
    return found


def purge(nomad: str, job_id: str) -> None:
    requests.delete(f"{nomad}/v1/job/{job_id}", params={"purge": "true"}, timeout=30)
