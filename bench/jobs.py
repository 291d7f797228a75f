"""The one-task batch job the benchmarks and the load suite register through Nomad's API."""

from __future__ import annotations

from typing import Any


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
