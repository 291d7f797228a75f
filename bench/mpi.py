"""MPI ping-pong between two ranks on one node: inside one pyhpc container (`pyhpc run`, the
ranks sharing its namespaces) against the same binaries on the host (the image mounted and
entered with chroot alone: no namespaces, cgroup or seccomp), for Open MPI and MPICH, in one run.

    python bench/mpi.py [--image /var/lib/pyhpc/images/mpi.sqsh] [--runs 3]

Needs root and the MPI image (scripts/make-mpi-image.sh). Writes bench/results/mpi.md and
.json. Target: the container within 5 % of the host on bandwidth. Across nodes:
bench/mpi_nodes.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
LAUNCH = {
    "openmpi": ["mpirun", "-n", "2", "--mca", "btl", "self,vader"],
    "mpich": ["mpiexec.hydra", "-n", "2"],
}
ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_plm_rsh_agent": "false",  # Open MPI 4
    "PRTE_MCA_plm_ssh_agent": "false",  # Open MPI 5
    "HOME": "/tmp",
}


TABLE_HEAD = [
    "| MPI | host latency (us) | pyhpc latency (us) | host bandwidth (MB/s) "
    "| pyhpc bandwidth (MB/s) | bandwidth ratio |",
    "|---|---|---|---|---|---|",
]


def summarize(
    results: dict[str, dict[str, list[tuple[float, float]]]],
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Medians per MPI of (latency, bandwidth) runs on the host and in pyhpc, and the table
    rows under TABLE_HEAD."""
    summary, rows = {}, []
    for impl, runs in results.items():
        h_lat = statistics.median(r[0] for r in runs["host"])
        h_bw = statistics.median(r[1] for r in runs["host"])
        p_lat = statistics.median(r[0] for r in runs["pyhpc"])
        p_bw = statistics.median(r[1] for r in runs["pyhpc"])
        summary[impl] = {"host_lat": h_lat, "host_bw": h_bw, "pyhpc_lat": p_lat, "pyhpc_bw": p_bw}
        rows.append(
            f"| {impl} | {h_lat:.2f} | {p_lat:.2f} | {h_bw:.0f} | {p_bw:.0f} | {p_bw / h_bw:.3f} |"
        )
    return summary, rows


def parse(out: str) -> tuple[float, float]:
    found = re.search(r"latency_us=([\d.]+) bandwidth_MBps=([\d.]+)", out)
    if not found:
        raise RuntimeError(f"no ping-pong result in: {out[-500:]}")
    return float(found.group(1)), float(found.group(2))


def on_host(root: Path, impl: str) -> tuple[float, float]:
    argv = [CHROOT, str(root), *LAUNCH[impl], f"/opt/mpi/{impl}/pingpong"]
    done = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=300)
    return parse(done.stdout + done.stderr)


def in_pyhpc(image: str, impl: str) -> tuple[float, float]:
    env = [f"--env={k}={v}" for k, v in ENV.items() if k.startswith("OMPI_")]
    argv = [sys.executable, "-m", "nomad_driver.cli.main", "run", "--root", *env, image, "--",
            *LAUNCH[impl], f"/opt/mpi/{impl}/pingpong"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    return parse(done.stdout + done.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="/var/lib/pyhpc/images/mpi.sqsh")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "mpi.md"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pyhpc-mpi-host-"))
    subprocess.run(["mount", "-o", "loop,ro", args.image, str(root)], check=True)
    mounts = [("proc", root / "proc", ["-t", "proc"]), ("/dev", root / "dev", ["--rbind"]),
              ("tmpfs", root / "tmp", ["-t", "tmpfs"])]  # fmt: skip
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    try:
        for src, dst, how in mounts:
            subprocess.run(["mount", *how, src, str(dst)], check=True)
        for impl in LAUNCH:
            results[impl] = {"host": [], "pyhpc": []}
            for _ in range(args.runs):  # interleaved, so drift hits both alike
                results[impl]["host"].append(on_host(root, impl))
                results[impl]["pyhpc"].append(in_pyhpc(args.image, impl))
            print(impl, results[impl], flush=True)
    finally:
        for _, dst, _ in reversed(mounts):
            subprocess.run(["umount", "-R", str(dst)], check=False)
        subprocess.run(["umount", str(root)], check=False)
        os.rmdir(root)
    lines = [
        "# MPI ping-pong on one node: pyhpc container vs the same binaries on the host",
        "",
        f"Measured by `python bench/mpi.py --runs {args.runs}` on {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d')}; medians of {args.runs} interleaved runs. Latency: 8 bytes, "
        "one way, over about 0.5 s of round trips. Bandwidth: 4 MiB messages, over about 1 s. "
        "Host: the image's binaries under chroot (no "
        "namespaces, cgroup or seccomp); pyhpc: `pyhpc run` with both ranks in one container.",
        "",
        *TABLE_HEAD,
    ]
    summary, rows = summarize(results)
    lines += rows
    lines += ["", "Target: bandwidth ratio at least 0.95.", ""]
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(json.dumps({"results": summary}))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
