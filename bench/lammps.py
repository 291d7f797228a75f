"""LAMMPS across two nodes (jobspecs/lammps.nomad) through Nomad in pyhpc containers against
the same binaries on the host, in one run: the Lennard-Jones melt (scripts/lammps/in.lj),
timesteps/s as LAMMPS reports them, runs interleaved.

    python bench/lammps.py [--runs 5] [--scale 1] [--steps 400]

The nodes are the test bed's network-namespace nodes (scripts/testbed/mpi-nodes.sh), one rank
on each; the host runs the image's own lmp and mpirun under chroot in the same two namespaces,
the remote rank started by an nsenter remote shell (bench/mpi_nodes.py). Needs root, the test
bed up (scripts/testbed/cluster.sh up) and the MPI image (scripts/make-mpi-image.sh). Writes
bench/results/lammps.md and .json. Target: pyhpc within 5 % of the host.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.mpi_nodes import HOST_LAUNCH, WORKER_CPU, host_nodes, host_run, run_job, stop, wait_for  # noqa: E402,I001

SPEC = REPO / "jobspecs" / "lammps.nomad"
PERFORMANCE = "Performance:"


def rate(out: str) -> float:
    """Timesteps/s from LAMMPS' 'Performance: ... tau/day, N timesteps/s' line."""
    found = re.search(r"Performance:.*?([\d.]+) timesteps/s", out)
    if not found:
        raise RuntimeError(f"no LAMMPS performance line in: {out[-800:]}")
    return float(found.group(1))


def lmp(scale: int, steps: int) -> list[str]:
    return ["/usr/bin/lmp", "-in", "/opt/lammps/in.lj", "-var", "scale", str(scale),
            "-var", "steps", str(steps), "-log", "none"]  # fmt: skip


def on_host(root: Path, scale: int, steps: int) -> float:
    launch = [*HOST_LAUNCH["openmpi"], "-x", "OMP_NUM_THREADS=1", *lmp(scale, steps)]
    return rate(host_run(root, launch, PERFORMANCE))


def in_pyhpc(run: int, scale: int, steps: int) -> float:
    job = f"bench-lammps-{run}"
    run_job(job, f"scale={scale}", f"steps={steps}", f"worker_cpu={WORKER_CPU}", spec=SPEC)
    try:
        # Polled every 2 s: the log API's load would compete with the ranks for the CPUs.
        _, out = wait_for(job, PERFORMANCE, 1, timeout=600, every=2.0)
        return rate(out)
    finally:
        stop(job)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="/var/lib/pyhpc/images/mpi.sqsh")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "lammps.md"))
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"host": [], "pyhpc": []}
    with host_nodes(args.image, 2) as root:
        for i in range(args.runs):  # interleaved, so drift hits both alike
            runs["host"].append(on_host(root, args.scale, args.steps))
            runs["pyhpc"].append(in_pyhpc(i, args.scale, args.steps))
            print(f"run {i}: host {runs['host'][-1]:.2f}, pyhpc {runs['pyhpc'][-1]:.2f} "
                  "timesteps/s", flush=True)  # fmt: skip
    host, pyhpc = statistics.median(runs["host"]), statistics.median(runs["pyhpc"])
    atoms = 32000 * args.scale**3
    summary = {"runs": runs, "host": host, "pyhpc": pyhpc, "ratio": pyhpc / host,
               "atoms": atoms, "steps": args.steps}  # fmt: skip
    lines = [
        "# LAMMPS across two nodes: pyhpc through Nomad vs the same binaries on the host",
        "",
        f"Measured by `python bench/lammps.py --runs {args.runs} --scale {args.scale} --steps "
        f"{args.steps}` on {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}: the "
        f"Lennard-Jones melt (scripts/lammps/in.lj, {atoms:,} atoms, {args.steps} steps), one "
        "Open MPI rank on each of two nodes, Debian's LAMMPS from the MPI image. The nodes are "
        "Nomad clients in network namespaces of their own on this machine. pyhpc: "
        "jobspecs/lammps.nomad (launcher and 2 workers, the ranks in the workers' containers "
        f"with every protection on, cpu = {WORKER_CPU} MHz each). Host: the image's lmp and "
        "mpirun under chroot in the same two namespaces. Medians of interleaved runs.",
        "",
        "| | timesteps/s (median) | min | max |",
        "|---|---|---|---|",
        *(
            f"| {where} | {statistics.median(r):.2f} | {min(r):.2f} | {max(r):.2f} |"
            for where, r in runs.items()
        ),  # fmt: skip
        "",
        f"pyhpc / host: **{pyhpc / host:.3f}** (target: at least 0.95). Single runs differ by "
        "up to 15 % either way here: the two ranks share this machine's cores with the Nomad "
        "and Consul agents.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(json.dumps(summary))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
