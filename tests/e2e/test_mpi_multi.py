"""MPI across Nomad allocations (jobspecs/mpi-multi.nomad) through the real Nomad: two client
nodes on this machine, each in its own network namespace (scripts/testbed/mpi-nodes.sh), a
worker allocation on each with 2 ranks, and a launcher that waits for both and starts the MPI
daemons in the workers' containers through Nomad's exec API. For Open MPI and MPICH: hello and
allreduce show every rank and both hosts; the LAMMPS example (jobspecs/lammps.nomad) runs its
benchmark across both; the rendezvous works through Consul as through
Nomad's own catalog; a killed worker fails the run within 30 s naming it,
and a rerun works; the start barrier gives up with a count; a stopped job leaves no rank."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_mpi import mpi_image  # noqa: F401 - the fixture that builds the MPI image

REPO = Path(__file__).resolve().parents[2]
NODES_SH = REPO / "scripts" / "testbed" / "mpi-nodes.sh"
SPEC = REPO / "jobspecs" / "mpi-multi.nomad"


@pytest.fixture(scope="module")
def mpi_nodes(cluster: Any, mpi_image: str) -> Iterator[int]:  # noqa: F811
    env = {**cluster.env, "PYHPC_CLUSTER_DIR": str(cluster.state_dir)}
    subprocess.run([str(NODES_SH), "down"], env=env, capture_output=True, timeout=120)
    up = subprocess.run(
        [str(NODES_SH), "up", "2"], env=env, capture_output=True, text=True, timeout=180
    )
    assert up.returncode == 0, up.stdout + up.stderr
    yield 2
    down = subprocess.run(
        [str(NODES_SH), "down"], env=env, capture_output=True, text=True, timeout=180
    )
    assert down.returncode == 0, down.stdout + down.stderr


def log(cluster: Any, alloc_id: str, task: str, kind: str = "stdout") -> str:
    """A task's log through the server's HTTP API (the CLI would call the node directly,
    which sits in a namespace of its own)."""
    r = cluster._http.get(
        f"{cluster.nomad_addr}/v1/client/fs/logs/{alloc_id}",
        params={"task": task, "type": kind, "plain": "true", "origin": "start", "offset": 0},
        timeout=30,
    )
    return str(r.text) if r.status_code == 200 else ""


def submit(
    cluster: Any, name: str, *variables: str, edit: tuple[str, str] = ("", ""), spec: Path = SPEC
) -> str:
    text = re.sub(r'^job "[^"]+"', f'job "{name}"', spec.read_text(), count=1, flags=re.M)
    if edit[0]:
        assert edit[0] in text
        text = text.replace(*edit)
    path = Path(cluster._jobdir) / f"{name}.nomad.hcl"
    path.write_text(text)
    args = [a for v in variables for a in ("-var", v)]
    cluster.nomad("job", "run", "-detach", *args, str(path))
    return name


def launcher(cluster: Any, job_id: str) -> dict[str, Any] | None:
    stubs = [a for a in cluster.allocs(job_id) if a["TaskGroup"] == "launcher"]
    return stubs[0] if stubs else None


def finish(cluster: Any, job_id: str, timeout: float = 120) -> tuple[dict[str, Any], str, str]:
    """Wait for the launcher to end; its stdout and stderr."""
    deadline = time.monotonic() + timeout
    while True:
        stub = launcher(cluster, job_id)
        if stub and stub["ClientStatus"] in ("complete", "failed"):
            break
        assert time.monotonic() < deadline, stuck(cluster, job_id)
        time.sleep(0.5)
    time.sleep(1)  # the last lines reach the log after the task's end
    return (
        stub,
        log(cluster, stub["ID"], "launcher"),
        log(cluster, stub["ID"], "launcher", "stderr"),
    )


def stuck(cluster: Any, job_id: str) -> str:
    """What a launcher that did not end had to say, and where every allocation stood."""
    lines = []
    for a in cluster.allocs(job_id):
        where = f"{a['TaskGroup']} {a['ID'][:8]} on {a['NodeName']}"
        lines.append(f"{where}: {a['ClientStatus']}, {a['ClientDescription']}")
        for task in a.get("TaskStates") or {}:
            for kind in ("stdout", "stderr"):
                lines.append(f"--- {task} {kind}:\n{log(cluster, a['ID'], task, kind)[-3000:]}")
    return "launcher did not end\n" + "\n".join(lines)


def workers_end(cluster: Any, job_id: str, timeout: float = 30) -> None:
    """The workers end when the launcher has: no allocation of the job runs on."""
    deadline = time.monotonic() + timeout
    while any(a["ClientStatus"] == "running" for a in cluster.allocs(job_id)):
        assert time.monotonic() < deadline, cluster.allocs(job_id)
        time.sleep(0.5)


def ranks(out: str, word: str) -> dict[int, str]:
    """rank -> host, from lines such as 'hello from rank 2 of 4 on mpi-2 (pid 8)'."""
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if word in line and "rank" in parts:
            at = parts.index("rank")
            found[int(parts[at + 1])] = parts[parts.index("on") + 1].rstrip(":")
    return found


@pytest.mark.parametrize("implementation", ["openmpi", "mpich"])
def test_hello_and_allreduce_across_two_nodes(
    cluster: Any, mpi_nodes: int, implementation: str
) -> None:
    for program, word in (("hello", "hello from"), ("allreduce", "allreduce rank")):
        job = submit(
            cluster,
            f"e2e-mpim-{implementation}-{program}",
            f"implementation={implementation}",
            f"program=/opt/mpi/{implementation}/{program}",
        )
        try:
            stub, out, err = finish(cluster, job)
            assert stub["ClientStatus"] == "complete", out + err
            assert "pyhpc-mpi: 2 workers ready" in err
            seen = ranks(out, word)
            assert sorted(seen) == [0, 1, 2, 3], out
            # Two ranks on each node, and never in the launcher's own container.
            assert sorted(seen.values()) == ["mpi-1", "mpi-1", "mpi-2", "mpi-2"], out
            if program == "allreduce":
                assert out.count("sum 10 (expected 10), ok") == 4, out
            workers = [a for a in cluster.allocs(job) if a["TaskGroup"] == "worker"]
            assert len({w["NodeID"] for w in workers}) == 2
            workers_end(cluster, job)
        finally:
            cluster.stop_job(job)


def test_workers_and_launcher_meet_through_consul_when_asked(cluster: Any, mpi_nodes: int) -> None:
    job = submit(cluster, "e2e-mpim-consul", "service_provider=consul")
    try:
        # Both workers are in Consul's catalog, each tagged with its allocation ID.
        deadline = time.monotonic() + 60
        while True:
            r = cluster._http.get(
                f"http://{cluster.consul_addr}/v1/catalog/service/{job}-workers", timeout=10
            )
            found = {e["ServiceAddress"]: e["ServiceTags"] for e in r.json()}
            if len(found) == 2:
                break
            assert time.monotonic() < deadline, (r.text, cluster.allocs(job))
            time.sleep(0.2)
        workers = {a["ID"] for a in cluster.allocs(job) if a["TaskGroup"] == "worker"}
        assert {t for tags in found.values() for t in tags} == workers, found
        assert sorted(found) == ["10.99.0.1", "10.99.0.2"], found
        stub, out, err = finish(cluster, job)
        assert stub["ClientStatus"] == "complete", out + err
        assert sorted(ranks(out, "hello from").values()) == ["mpi-1", "mpi-1", "mpi-2", "mpi-2"]
        # Nomad's own catalog was not used.
        r = cluster._http.get(f"{cluster.nomad_addr}/v1/service/{job}-workers", timeout=10)
        assert r.status_code == 200 and r.json() == [], r.text
    finally:
        cluster.stop_job(job)


def test_a_killed_worker_fails_the_run_promptly_naming_it_and_a_rerun_works(
    cluster: Any, mpi_nodes: int
) -> None:
    job = submit(
        cluster, "e2e-mpim-kill", "program=/opt/mpi/openmpi/allreduce", 'args=["10000000"]'
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            stub = launcher(cluster, job)
            if stub and "workers ready" in log(cluster, stub["ID"], "launcher", "stderr"):
                break
            assert time.monotonic() < deadline, cluster.allocs(job)
            time.sleep(0.5)
        time.sleep(2)  # the ranks are computing
        victim = next(a for a in cluster.allocs(job) if a["TaskGroup"] == "worker")
        killed = time.monotonic()
        cluster.nomad("alloc", "signal", "-s", "SIGKILL", victim["ID"], "worker")
        stub, out, err = finish(cluster, job, timeout=30)
        took = time.monotonic() - killed
        assert stub["ClientStatus"] == "failed", out + err
        assert took < 30, took
        assert "worker(s) lost during the run: 10.99.0." in err, err
        assert f"(allocation {victim['ID']}, failed)" in err, err
    finally:
        cluster.stop_job(job)
    job = submit(cluster, "e2e-mpim-rerun")
    try:
        stub, out, err = finish(cluster, job)
        assert stub["ClientStatus"] == "complete", out + err
        assert sorted(ranks(out, "hello from")) == [0, 1, 2, 3], out
    finally:
        cluster.stop_job(job)


@pytest.mark.parametrize("implementation", ["openmpi", "mpich"])
def test_a_failing_rank_ends_the_run_promptly_naming_it(
    cluster: Any, mpi_nodes: int, implementation: str
) -> None:
    # Rank 3 (on the second worker) exits 3 after MPI_Init, without MPI_Finalize, as a crashed
    # rank would; the others wait in a barrier that cannot complete.
    job = submit(
        cluster,
        f"e2e-mpim-fail-{implementation}",
        f"implementation={implementation}",
        f"program=/opt/mpi/{implementation}/hello",
        'args=["--fail-rank", "3"]',
    )
    started = time.monotonic()
    try:
        stub, out, err = finish(cluster, job, timeout=90)
        took = time.monotonic() - started
        assert stub["ClientStatus"] == "failed", out + err
        assert took < 30, f"the run outlived its failed rank by {took:.0f} s"
        # pyhpc-mpi-rank's record, collected by the launcher: MPICH's hydra names no rank (and
        # sometimes never ends such a run), Open MPI 5's mpirun may blame a rank that aborted
        # because rank 3 was gone.
        named = f"pyhpc-mpi: rank 3 (on mpi-2) exited with code 3: /opt/mpi/{implementation}/hello"
        assert named in err, err
        assert "pyhpc-mpi: the MPI run failed (exit 3)" in err, err
        assert "worker(s) lost" not in err, err
        workers_end(cluster, job)  # the other ranks do not live on
    finally:
        cluster.stop_job(job)


def test_the_start_barrier_gives_up_with_the_count_it_saw(cluster: Any, mpi_nodes: int) -> None:
    # Three workers on distinct hosts, two nodes: one is never placed.
    job = submit(
        cluster,
        "e2e-mpim-barrier",
        "workers=3",
        edit=(
            'mode           = "launcher"',
            'mode           = "launcher"\n barrier_timeout = "6s"',
        ),
    )
    try:
        stub, out, err = finish(cluster, job, timeout=60)
        assert stub["ClientStatus"] == "failed"
        assert "pyhpc-mpi: start barrier: 2 of 3 workers registered within 6s" in err, err
    finally:
        cluster.stop_job(job)


def test_lammps_runs_the_lj_melt_across_two_nodes(cluster: Any, mpi_nodes: int) -> None:
    """The shipped LAMMPS example as a user runs it, shortened: Debian's lmp, one rank on each
    node, the launcher's log ending with LAMMPS' timing and performance lines."""
    job = submit(cluster, "e2e-mpim-lammps", "steps=50", spec=REPO / "jobspecs" / "lammps.nomad")
    try:
        stub, out, err = finish(cluster, job, timeout=300)
        assert stub["ClientStatus"] == "complete", out + err
        assert "pyhpc-mpi: 2 workers ready" in err
        assert "32000 atoms" in out, out
        assert re.search(r"\d by \d by \d MPI processor grid", out), out
        assert "2 MPI tasks x 1 OpenMP threads" in out, out
        assert re.search(r"Loop time of [\d.]+ on 2 procs for 50 steps with 32000 atoms", out), out
        assert re.search(r"Performance: .* [\d.]+ timesteps/s", out), out
        workers = [a for a in cluster.allocs(job) if a["TaskGroup"] == "worker"]
        assert len({w["NodeID"] for w in workers}) == 2
        workers_end(cluster, job)
    finally:
        cluster.stop_job(job)


def test_stopping_the_job_mid_run_ends_every_rank(cluster: Any, mpi_nodes: int) -> None:
    job = submit(cluster, "e2e-mpim-stop", "program=/opt/mpi/mpich/allreduce",
                 "implementation=mpich", 'args=["10000000"]')  # fmt: skip
    try:
        # All four ranks running (the two nodes' ranks start a moment apart).
        deadline = time.monotonic() + 60
        while len(rank_pids()) < 4:
            assert time.monotonic() < deadline, (rank_pids(), cluster.allocs(job))
            time.sleep(0.5)
        assert len(rank_pids()) == 4
    finally:
        cluster.stop_job(job)
    deadline = time.monotonic() + 30
    while rank_pids():
        assert time.monotonic() < deadline, rank_pids()
        time.sleep(0.5)


def rank_pids() -> list[int]:
    """The MPI test programs running on this machine, in any container."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    program = f.read().split(b"\0")[0]
            except OSError:
                continue
            if program.startswith(b"/opt/mpi/") and program.endswith(b"/allreduce"):
                found.append(int(entry.name))
    return found
