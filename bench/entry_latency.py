"""Container entry latency of `/bin/true` on one small image: pyhpc against the anchors.

Runs, in one go on this machine: bare exec, unshare+chroot, Charliecloud ch-run (directory and
SquashFS), Podman (runc or crun, whichever Podman uses here), `pyhpc run`, and pyhpc's entry as
the driver does it (supervisor start -> exec of the task, image already mounted, measured
inside a preloaded process). Anchors that are not installed are listed as such. Needs root.

    python bench/entry_latency.py [--runs 30] [--out bench/results/runtime.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_IMAGE = Path("/var/lib/pyhpc/images/busybox.sqsh")
IMAGE = Path("/var/lib/pyhpc/images/bench-busybox.sqsh")  # the demo image plus ch-run's dirs
PYHPC = [sys.executable, "-m", "nomad_driver.cli.main"]
# Podman with runc, as the anchors were measured, when runc is installed; else its default.
PODMAN = (
    ["podman", "--runtime", "runc"] if shutil.which("runc") else ["podman", "--runtime", "crun"]
)
# ch-run runs as root here: /dev/fuse is root-only on this machine, and it needs $USER.
CH_RUN = ["env", "USER=root", "ch-run"]


def timed(argv: list[str], runs: int) -> list[float]:
    subprocess.run(argv, check=True, capture_output=True)  # warm caches, fail loudly
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        out.append(time.perf_counter() - start)
    return out


def driver_entry(runs: int, userns: bool, cgroup: bool) -> list[float]:
    """Supervisor.start() to the task's exec, forked from a process that has the runtime loaded
    (as the driver's supervisor has), with the image already mounted."""
    from nomad_driver.runtime import client, container, security  # noqa: F401 - preloaded
    from nomad_driver.runtime.cgroups import Limits
    from nomad_driver.runtime.imagefile import open_image
    from nomad_driver.runtime.imagemount import SharedImages
    from nomad_driver.runtime.spec import ContainerSpec
    from nomad_driver.runtime.supervisor import Supervisor

    work = Path(tempfile.mkdtemp(prefix="pyhpc-entry-"))
    images = SharedImages(str(work / "images"))
    opened = open_image(str(IMAGE))
    root = images.acquire(opened, "bench")
    opened.close()
    spec = ContainerSpec(
        task_id="bench",
        hostname="bench",
        image=str(IMAGE),
        command="/bin/true",
        args=(),
        env={"PATH": "/bin"},
        work_dir="/",
        user="",
        stdout_path=os.devnull,
        stderr_path=os.devnull,
        mounts=(),
        capabilities=tuple(sorted(security.DEFAULT_CAPS)),
        seccomp=security.default_profile(),
        images_dir=str(work / "images"),
        image_root=root,
        userns=(100000, 65536) if userns else None,
        limits=Limits(pids_max=16384) if cgroup else None,
    )
    out = []
    try:
        for i in range(runs + 1):
            run_dir = work / f"run-{i}"
            run_dir.mkdir()
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # a PID namespace can be made once per process: one child per run
                supervisor = Supervisor(str(run_dir), spec)
                start = time.perf_counter()
                supervisor.start()
                os.write(w, str(time.perf_counter() - start).encode())
                supervisor.finish()
                os._exit(0)
            os.close(w)
            took = float(os.read(r, 64))
            os.close(r)
            os.waitpid(pid, 0)
            client.remove(str(run_dir))
            if i:  # the first run warms caches
                out.append(took)
    finally:
        images.release("bench")
        shutil.rmtree(work, ignore_errors=True)
    return out


def candidates(rootfs: Path, runs: int) -> list[tuple[str, Callable[[], list[float]] | str]]:
    found: list[tuple[str, Callable[[], list[float]] | str]] = [
        ("bare exec", lambda: timed(["/bin/true"], runs)),
        (
            "unshare + chroot",
            lambda: timed(["unshare", "-mpiu", "--fork", "chroot", str(rootfs), "/bin/true"], runs),
        ),
    ]
    if shutil.which("ch-run"):
        found.append(
            (
                "ch-run, directory",
                lambda: timed([*CH_RUN, str(rootfs), "--", "/bin/true"], runs),
            )
        )
        found.append(
            (
                "ch-run, SquashFS",
                lambda: timed([*CH_RUN, str(IMAGE), "--", "/bin/true"], runs),
            )
        )
    else:
        found.append(("ch-run", "not installed (apt install charliecloud-runtime)"))
    if shutil.which("podman"):

        def podman() -> list[float]:
            tar = subprocess.run(
                ["tar", "-C", str(rootfs), "-c", "."], check=True, capture_output=True
            ).stdout
            subprocess.run(
                ["podman", "import", "-", "pyhpc-bench-busybox"],
                input=tar,
                check=True,
                capture_output=True,
            )
            return timed(
                [
                    *PODMAN,
                    "run",
                    "--rm",
                    "--network=host",
                    *(["--cgroups=disabled"] if PODMAN[-1] == "crun" else []),
                    # podman's default open-files limit is above this machine's hard limit
                    "--ulimit=nofile=1024:1024",
                    "--ulimit=nproc=1024:1024",
                    "pyhpc-bench-busybox",
                    "/bin/true",
                ],
                runs,
            )

        found.append((f"podman run ({PODMAN[-1]})", podman))
    else:
        found.append(("podman run", "not installed (apt install podman)"))
    found.append(("pyhpc run", lambda: timed([*PYHPC, "run", str(IMAGE), "/bin/true"], runs)))
    found.append(
        (
            "pyhpc driver entry: userns + cgroup (as Nomad runs it)",
            lambda: driver_entry(runs, True, True),
        )
    )
    found.append(("pyhpc driver entry: userns, no cgroup", lambda: driver_entry(runs, True, False)))
    found.append(
        ("pyhpc driver entry: no userns, no cgroup", lambda: driver_entry(runs, False, False))
    )
    return found


def ch_run_image(work: Path, target: Path) -> Path:
    """The demo image unpacked in WORK/rootfs (WORK made 0755), given the mount points ch-run
    expects in an image (pyhpc and podman make their own), and packed again as TARGET (0644),
    so that every runtime starts the same bytes. Returns the unpacked tree."""
    os.chmod(work, 0o755)
    rootfs = work / "rootfs"
    subprocess.run(
        ["unsquashfs", "-q", "-d", str(rootfs), str(DEMO_IMAGE)], check=True, capture_output=True
    )
    os.chmod(rootfs, 0o755)
    for d in ("dev", "proc", "sys", "tmp", "home", "mnt", "run", "var/tmp"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    for f in ("etc/hosts", "etc/resolv.conf", "etc/group"):
        (rootfs / f).touch()
    subprocess.run(
        ["mksquashfs", str(rootfs), str(target), "-noappend", "-quiet", "-comp", "gzip"],
        check=True,
        capture_output=True,
    )
    os.chmod(target, 0o644)
    return rootfs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "runtime.md"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("entry_latency: needs root (loop mounts, namespaces)")
    if not DEMO_IMAGE.exists():
        sys.exit(f"entry_latency: {DEMO_IMAGE} is missing; run scripts/make-demo-image.sh")
    work = Path(tempfile.mkdtemp(prefix="pyhpc-bench-"))
    rootfs = ch_run_image(work, IMAGE)
    rows: list[tuple[str, float | None, float | None, str]] = []
    try:
        for name, run in candidates(rootfs, args.runs):
            if isinstance(run, str):
                rows.append((name, None, None, run))
                continue
            try:
                samples = sorted(run())
            except (subprocess.CalledProcessError, OSError) as err:
                detail = getattr(err, "stderr", b"") or b""
                why = " ".join(f"{err} {detail.decode()[-200:]}".split())
                rows.append((name, None, None, f"failed: {why}"))
                continue
            p95 = samples[min(len(samples) - 1, int(len(samples) * 0.95))]
            mid = statistics.median(samples)
            rows.append((name, mid, p95, ""))
            print(
                f"{name:40s} median {mid * 1e3:8.2f} ms  p95 {p95 * 1e3:8.2f} ms",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        IMAGE.unlink(missing_ok=True)
    base = next((m for n, m, _, _ in rows if n == "pyhpc run"), None) or float("nan")
    lines = [
        "# Container entry latency: `/bin/true` on the busybox demo image",
        "",
        f"Measured by `python bench/entry_latency.py --runs {args.runs}` on "
        f"{os.cpu_count()} CPUs, kernel {os.uname().release}, "
        f"{time.strftime('%Y-%m-%d')}; every row in the same run. "
        "Ratio: this row's median over `pyhpc run`'s.",
        "",
        "| runtime | median (ms) | p95 (ms) | ratio to pyhpc run | note |",
        "|---|---|---|---|---|",
    ]
    for name, med, high, note in rows:
        if med is None or high is None:
            lines.append(f"| {name} | - | - | - | {note} |")
        else:
            lines.append(
                f"| {name} | {med * 1e3:.2f} | {high * 1e3:.2f} | {med / base:.2f} | {note} |"
            )
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps({"rows": rows}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
