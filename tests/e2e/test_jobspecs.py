"""The shipped jobspecs through the real Nomad and Consul: the flagship parameterized job is
registered, dispatched with meta and a payload, and its service shows up healthy in Consul."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import requests
from test_foundation import events_text

REPO = Path(__file__).resolve().parents[2]
CONSUL = "http://127.0.0.1:8500"


def passing(service: str) -> list[dict[str, Any]]:
    reply = requests.get(f"{CONSUL}/v1/health/service/{service}?passing=1", timeout=5)
    reply.raise_for_status()
    return reply.json()


def wait_healthy(cluster: Any, service: str, job_id: str, task: str) -> None:
    """Until the service is registered in Consul with every check passing. After the fault
    tests have restarted Consul, Nomad's sync to it can lag; 80 s leave room for that. On
    failure, say what Consul and Nomad show."""
    deadline = time.monotonic() + 80
    while not passing(service):
        if time.monotonic() > deadline:
            catalog = requests.get(f"{CONSUL}/v1/catalog/services", timeout=5).json()
            health = requests.get(f"{CONSUL}/v1/health/service/{service}", timeout=5).json()
            checks = [(c["Name"], c["Status"], c["Output"][:200]) for e in health
                      for c in e["Checks"]]  # fmt: skip
            stubs = cluster.allocs(job_id)
            events = events_text(cluster, cluster.alloc(stubs[0]["ID"]), task) if stubs else ""
            raise AssertionError(
                f"{service} never became healthy in Consul; catalog {catalog}; checks {checks}; "
                f"allocations {[a['ClientStatus'] for a in stubs]}: {events}"
            )
        time.sleep(1)


def allocated(cluster: Any, job_id: str) -> tuple[str, int]:
    """The address and port Nomad gave the job's group network (its one port)."""
    [stub] = cluster.allocs(job_id)
    alloc = cluster.alloc(stub["ID"])
    [port] = alloc["AllocatedResources"]["Shared"]["Ports"]
    return port["HostIP"], port["Value"]


def test_hpc_job_dispatches_and_registers_a_healthy_service(cluster: Any, tmp_path: Path) -> None:
    cluster.nomad("job", "run", str(REPO / "jobspecs" / "hpc.nomad"))
    payload = tmp_path / "input.txt"
    payload.write_text("a\nb\nc\n")
    out = cluster.nomad(
        "job",
        "dispatch",
        "-detach",
        "-meta",
        "size=1000",
        "-meta",
        "label=e2e",
        "-meta",
        "hold=90",
        "hpc",
        str(payload),
    ).stdout
    child = next(w for w in out.split() if w.startswith("hpc/dispatch-"))
    # The run holds 90 s: healthy while it works.
    wait_healthy(cluster, "hpc-solver", child, "solver")
    entry = passing("hpc-solver")[0]
    assert "pyhpc" in entry["Service"]["Tags"]
    assert (entry["Service"]["Address"], entry["Service"]["Port"]) == allocated(cluster, child)
    checks = {c["Name"]: c["Status"] for c in entry["Checks"] if c["ServiceName"]}
    assert checks.get("solver-alive") == "passing", checks  # the script check, through exec
    alloc = cluster.wait_alloc(child, {"complete", "failed"}, timeout=120)
    assert alloc["ClientStatus"] == "complete", events_text(cluster, alloc)
    logs = cluster.alloc_logs(alloc["ID"], "solver")
    assert "label=e2e size=1000 sum=500500 input_lines=3" in logs
    deadline = time.monotonic() + 30
    while passing("hpc-solver"):  # deregistered with the task
        assert time.monotonic() < deadline, "hpc-solver stayed registered after the task ended"
        time.sleep(1)
    cluster.stop_job("hpc")


def test_service_example_registers_its_address_and_port_and_both_checks_pass(
    cluster: Any,
) -> None:
    cluster.nomad("job", "run", "-detach", str(REPO / "jobspecs" / "service.nomad"))
    try:
        cluster.wait_alloc("web", {"running"})
        wait_healthy(cluster, "pyhpc-web", "web", "web")
        [entry] = passing("pyhpc-web")
        address, port = allocated(cluster, "web")
        assert (entry["Service"]["Address"], entry["Service"]["Port"]) == (address, port)
        checks = {c["Name"]: c["Status"] for c in entry["Checks"] if c["ServiceName"]}
        assert checks == {"http": "passing", "tcp": "passing"}, checks
        page = requests.get(f"http://{address}:{port}/index.html", timeout=5)
        assert page.text.strip() == "ok"
    finally:
        cluster.stop_job("web")
    assert not passing("pyhpc-web")
