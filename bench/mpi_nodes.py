"""MPI across nodes (issue: MPI), on the test bed's network-namespace nodes
(scripts/testbed/mpi-nodes.sh), in one run:

1. ping-pong between two ranks on two nodes: through Nomad in pyhpc containers
   (jobspecs/mpi-multi.nomad, one rank per worker) against the same binaries on the host (the
   image mounted and entered with chroot in the two namespaces, the second rank started by an
   nsenter remote shell), for Open MPI and MPICH, interleaved;
2. time from `nomad job run` to every rank started (each rank's hello line in the launcher's
   log) for 2 and 4 workers of 2 ranks.

    python bench/mpi_nodes.py [--runs 5] [--starts 5]

Needs root, the test bed up (scripts/testbed/cluster.sh up) and the MPI image
(scripts/make-mpi-image.sh). Brings 4 MPI nodes up and down. Writes
bench/results/mpi_nodes.md and .json. Target: bandwidth within 5 % of the host.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.mpi import CHROOT, ENV, TABLE_HEAD, parse, summarize  # noqa: E402

NODES_SH = REPO / "scripts" / "testbed" / "mpi-nodes.sh"
SPEC = REPO / "jobspecs" / "mpi-multi.nomad"
NOMAD = os.environ.get("NOMAD_ADDR", "http://127.0.0.1:4646")
HTTP = requests.Session()
HTTP.trust_env = False
# The host's remote shell: it starts a rank's daemon in namespace i (the host name's last
# number), in the same chroot, with IPC, PID and UTS namespaces and a /dev/shm of its own, as on
# another machine: else UCX (MPICH's device) and Open MPI 5 would take the two ranks for one
# host and use shared memory between them. MPICH's first rank runs where mpiexec does
# (namespace 1, its address local there); Open MPI's are both started through it, named node-1
# and node-2, as in pyhpc, where the launcher is a task of its own (given the addresses, Open
# MPI 5 counts one slot; it cuts names at the first dot).
AGENT = """#!/bin/sh
while [ $# -gt 0 ]; do case $1 in -*) shift ;; *) break ;; esac; done
host=$1; shift
n=${host##*[.-]}
exec nsenter --net=/run/netns/pyhpc-mpi-$n unshare --ipc --pid --uts --mount-proc --fork \
    /bin/sh -c "mount -t sysfs sysfs /sys; mount -t tmpfs tmpfs /dev/shm; \
    echo host-$n >/proc/sys/kernel/hostname; $*"
"""
# The host's ranks run unconstrained; a worker's cgroup gets this CPU weight (MHz), enough
# that its rank is not outweighed by the agents beside it.
WORKER_CPU = 2000
# Open MPI binds each rank to a core, the first of its node's: here every "node" is this
# machine, so both ranks would share core 0 and take turns a scheduler tick (4 ms) at a time.
LAUNCHER_ARGS = {"openmpi": ["--bind-to", "none"], "mpich": []}
HOST_LAUNCH = {
    "openmpi": ["mpirun", "-n", "2", "--host", "node-1:1,node-2:1", *LAUNCHER_ARGS["openmpi"],
                "--mca", "plm_rsh_agent", "/tmp/agent"],
    "mpich": ["mpiexec.hydra", "-n", "2", "-hosts", "10.99.0.1:1,10.99.0.2:1",
              "-launcher", "rsh", "-launcher-exec", "/tmp/agent"],
}  # fmt: skip


def nomad(*args: str) -> str:
    return subprocess.run(
        ["nomad", *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def launcher_log(job: str) -> str:
    allocs = HTTP.get(f"{NOMAD}/v1/job/{job}/allocations", timeout=10).json()
    ids = [a["ID"] for a in allocs if a["TaskGroup"] == "launcher"]
    if not ids:
        return ""
    r = HTTP.get(
        f"{NOMAD}/v1/client/fs/logs/{ids[0]}",
        params={"task": "launcher", "type": "stdout", "plain": "true", "origin": "start"},
        timeout=10,
    )
    return r.text if r.status_code == 200 else ""


def run_job(job: str, *variables: str, spec: Path = SPEC) -> float:
    """Submit SPEC renamed to JOB; the time it was submitted."""
    name = re.search(r'^job "([^"]+)"', spec.read_text(), re.M)
    assert name, spec
    text = spec.read_text().replace(name.group(0), f'job "{job}"')
    path = Path(tempfile.mkdtemp()) / "job.nomad"
    path.write_text(text)
    args = [a for v in variables for a in ("-var", v)]
    started = time.monotonic()
    nomad("job", "run", "-detach", *args, str(path))
    return started


def wait_for(
    job: str, pattern: str, count: int, timeout: float = 120, every: float = 0.1
) -> tuple[float, str]:
    deadline = time.monotonic() + timeout
    while True:
        out = launcher_log(job)
        if len(re.findall(pattern, out)) >= count:
            return time.monotonic(), out
        if time.monotonic() > deadline:
            raise RuntimeError(f"{job}: {count} x {pattern!r} not seen in {timeout}s: {out[-400:]}")
        time.sleep(every)


def stop(job: str) -> None:
    subprocess.run(["nomad", "job", "stop", "-purge", job], capture_output=True, timeout=120)


def in_pyhpc(impl: str, n: int) -> tuple[float, float]:
    job = f"bench-pingpong-{impl}-{n}"
    run_job(job, f"implementation={impl}", f"program=/opt/mpi/{impl}/pingpong",
            "ranks_per_node=1", f"worker_cpu={WORKER_CPU}",
            f"launcher_args={json.dumps(LAUNCHER_ARGS[impl])}")  # fmt: skip
    try:
        # Polled once a second: the log API's load (the server, the node's agent) would
        # otherwise compete with the ranks for the 2 CPUs, which the host's run does not see.
        _, out = wait_for(job, r"pingpong latency_us=", 1, timeout=300, every=1.0)
        return parse(out)
    finally:
        stop(job)


def host_run(root: Path, launch: list[str], until: str) -> str:
    """Run LAUNCH (mpirun or mpiexec.hydra and the program, its remote shell /tmp/agent) in
    the image ROOT under chroot in namespace 1; its output up to the first line holding UNTIL,
    even should MPI_Finalize not return."""
    # A mount namespace of its own, for a sysfs of namespace 1 (its network devices).
    argv = ["nsenter", "--net=/run/netns/pyhpc-mpi-1", "unshare", "--mount", CHROOT, str(root),
            "/bin/sh", "-c", f"mount -t sysfs sysfs /sys && exec {' '.join(launch)}"]  # fmt: skip
    env = {k: v for k, v in ENV.items() if not k.endswith("_agent")}
    env["PRTE_MCA_plm_ssh_agent"] = "/tmp/agent"  # Open MPI 5; 4 takes HOST_LAUNCH's --mca
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)  # fmt: skip
    out = ""
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            out += line
            if until in line:
                return out
        raise RuntimeError(f"host: no {until!r} from {launch[-1]}: {out[-1500:]}")
    finally:
        proc.kill()
        proc.wait()
        subprocess.run(["pkill", "-f", launch[-1]], check=False)


def on_host(root: Path, impl: str) -> tuple[float, float]:
    program = f"/opt/mpi/{impl}/pingpong"
    return parse(host_run(root, [*HOST_LAUNCH[impl], program], "pingpong latency_us="))


@contextlib.contextmanager
def host_nodes(image: str, nodes: int) -> Iterator[Path]:
    """NODES MPI nodes up (and down after), and IMAGE mounted as a root for host_run."""
    subprocess.run([str(NODES_SH), "down"], capture_output=True, check=False)
    subprocess.run([str(NODES_SH), "up", str(nodes)], check=True)
    root = Path(tempfile.mkdtemp(prefix="pyhpc-mpi-host-"))
    subprocess.run(["mount", "-o", "loop,ro", image, str(root)], check=True)
    mounts = [
        ("proc", root / "proc", ["-t", "proc"]),
        ("/dev", root / "dev", ["--rbind"]),
        ("tmpfs", root / "tmp", ["-t", "tmpfs"]),
        ("tmpfs", root / "run", ["-t", "tmpfs"]),
    ]
    try:
        for src, dst, how in mounts:
            subprocess.run(["mount", *how, src, str(dst)], check=True)
        (root / "run" / "netns").mkdir()
        subprocess.run(["mount", "--rbind", "/run/netns", str(root / "run" / "netns")], check=True)
        # Else unmounting it at the end would propagate back and detach the nodes' namespaces.
        subprocess.run(["mount", "--make-rslave", str(root / "run" / "netns")], check=True)
        (root / "tmp" / "agent").write_text(AGENT)
        (root / "tmp" / "agent").chmod(0o755)
        yield root
    finally:
        for _, dst, _ in reversed(mounts):
            subprocess.run(["umount", "-R", str(dst)], check=False)
        subprocess.run(["umount", str(root)], check=False)
        os.rmdir(root)
        subprocess.run([str(NODES_SH), "down"], capture_output=True, check=False)


def start_time(workers: int, n: int) -> float:
    job = f"bench-start-{workers}-{n}"
    started = run_job(job, f"workers={workers}")
    try:
        seen, _ = wait_for(job, r"hello from rank", 2 * workers)
        return seen - started
    finally:
        stop(job)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="/var/lib/pyhpc/images/mpi.sqsh")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "mpi_nodes.md"))
    args = parser.parse_args()
    pingpong: dict[str, dict[str, list[tuple[float, float]]]] = {}
    starts: dict[int, list[float]] = {2: [], 4: []}
    with host_nodes(args.image, 4) as root:
        for impl in HOST_LAUNCH:
            pingpong[impl] = {"host": [], "pyhpc": []}
            for i in range(args.runs):  # interleaved, so drift hits both alike
                pingpong[impl]["host"].append(on_host(root, impl))
                pingpong[impl]["pyhpc"].append(in_pyhpc(impl, i))
            print(impl, pingpong[impl], flush=True)
        for i in range(args.starts):
            for workers in starts:
                starts[workers].append(start_time(workers, i))
        print("starts", starts, flush=True)
    summary: dict[str, Any] = {"pingpong": {}, "start_s": {}}
    lines = [
        "# MPI across two nodes: pyhpc through Nomad vs the same binaries on the host",
        "",
        f"Measured by `python bench/mpi_nodes.py --runs {args.runs} --starts {args.starts}` on "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}. The nodes are Nomad clients in "
        "their own network namespaces on this machine, joined by veth links to a bridge. "
        "Ping-pong: one rank per node, medians of interleaved runs; latency 8 bytes one way "
        "(about 0.5 s of round trips), bandwidth 4 MiB messages (about 1 s). "
        "pyhpc: jobspecs/mpi-multi.nomad (launcher, 2 workers, "
        "daemons started through Nomad's exec API). Host: the image's binaries under chroot in "
        "the same two namespaces, the remote rank started with nsenter. Workers ask for "
        f"cpu = {WORKER_CPU} MHz.",
        "",
        *TABLE_HEAD,
    ]
    summary["pingpong"], rows = summarize(pingpong)
    lines += rows
    lines += ["", "Target: bandwidth ratio at least 0.95.", "",
              "Time from `nomad job run` to every rank's hello line in the launcher's log "
              "(workers of 2 ranks each, Open MPI):", "",
              "| workers | ranks | median (s) | min (s) | max (s) |",
              "|---|---|---|---|---|"]  # fmt: skip
    for workers, times in starts.items():
        summary["start_s"][str(workers)] = times
        lines.append(
            f"| {workers} | {2 * workers} | {statistics.median(times):.2f} | {min(times):.2f} "
            f"| {max(times):.2f} |"
        )
    lines.append("")
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(json.dumps(summary))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
