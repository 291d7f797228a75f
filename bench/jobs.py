"""The one-task batch job the benchmarks and the load suite register through Nomad's API, the
three calls they make with it, and the sampler of the driver's memory and CPU."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import requests

from nomad_driver.runtime import client

TICK = os.sysconf("SC_CLK_TCK")


def batch_job(
    name: str,
    driver: str,
    config: dict[str, Any],
    count: int = 1,
    cpu: int = 20,
    memory: int = 32,
    disk: int = 300,
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
                "EphemeralDisk": {"SizeMB": disk},
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


class Sampler(threading.Thread):
    """The driver's RSS (MB) and CPU seconds, once a second."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.stop = pid, threading.Event()
        self.samples: list[tuple[float, float, float, int]] = []  # (s, RSS MB, CPU s, tasks)
        self.t0 = time.monotonic()

    def sample(self) -> None:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return  # the driver is gone (killed): a caller may point pid at the next one
        rss = int(next(x for x in status.splitlines() if x.startswith("VmRSS:")).split()[1])
        cpu = (int(fields[11]) + int(fields[12])) / TICK
        running = len(client.supervisors())  # tasks up (one supervisor each)
        self.samples.append((round(time.monotonic() - self.t0, 1), rss / 1024, cpu, running))

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.sample()
