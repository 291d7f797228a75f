"""Load without leaks, through the runtime: many containers at once and many in a row, then
count what could leak (processes, mounts, loop devices, cgroups, descriptors, image references).

Sizes: a short run by default (what CI runs); PYHPC_SOAK=full for 200 at once and 1,000 in a
row, the reliability issue's numbers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nomad_driver.runtime import client
from tests.runtime.test_supervisor import loop_devices_of, make_spec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containers need root here")
FULL = os.environ.get("PYHPC_SOAK") == "full"
CONCURRENT = 200 if FULL else 30
SEQUENTIAL = 1000 if FULL else 60


def snapshot(tmp: Path, image: Path) -> dict[str, object]:
    mounts = [
        line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(tmp) in line
    ]
    cgroups = subprocess.run(
        ["find", "/sys/fs/cgroup", "-maxdepth", "3", "-type", "d", "-path", "*pyhpc/soak-*"],
        capture_output=True,
        text=True,
    ).stdout.split()
    supervisors = sorted(d for d in client.supervisors() if d.startswith(str(tmp)))
    return {
        "mounts": mounts,
        "loops": loop_devices_of(image),
        "cgroups": cgroups,
        "supervisors": supervisors,
        "fds": len(os.listdir("/proc/self/fd")),
        "image refs": sorted(p.name for p in (tmp / "images").rglob("refs/*")),
    }


def run_one(tmp: Path, image: Path, i: int, script: str) -> int:
    from nomad_driver.runtime.cgroups import Limits

    spec = make_spec(tmp, image, "/bin/sh", "-c", script)._replace(
        images_dir=str(tmp / "images"),
        stdout_path=os.devnull,
        stderr_path=os.devnull,
        limits=Limits(memory_bytes=64 << 20, pids_max=64),  # a cgroup each, as under Nomad
    )
    run_dir = str(tmp / f"soak-{i}")
    started = client.start(spec, run_dir)
    code = client.wait(started.run_dir).exit_code
    client.remove(run_dir)
    return code


def soak(tmp: Path, image: Path) -> str:
    """The load and the count; "" when nothing leaked, else what did. One task first: the
    forkserver it starts (and the one socket to it) stays, by design."""
    if (code := run_one(tmp, image, -1, "true")) != 0:
        return f"the first task exited {code}"
    before = snapshot(tmp, image)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=CONCURRENT) as pool:
        codes = list(
            pool.map(lambda i: run_one(tmp, image, i, "sleep 1; exit 3"), range(CONCURRENT))
        )
    if codes != [3] * CONCURRENT:
        return f"exit codes {codes}"
    concurrent_s = time.monotonic() - started
    started = time.monotonic()
    for i in range(SEQUENTIAL):
        if (code := run_one(tmp, image, CONCURRENT + i, "true")) != 0:
            return f"run {i} exited {code}"
    sequential_s = time.monotonic() - started
    time.sleep(0.5)
    after = snapshot(tmp, image)
    if after != before:
        return f"leaked: before {before}, after {after}"
    print(
        f"{CONCURRENT} at once: {concurrent_s:.1f} s; {SEQUENTIAL} in a row: "
        f"{sequential_s:.1f} s ({SEQUENTIAL / sequential_s:.1f}/s); nothing leaked"
    )
    return ""


def test_many_at_once_then_many_in_a_row_leave_nothing(tmp_path: Path, busybox_image: Path) -> None:
    """In a process of its own: descriptors are counted per process, and the test session's
    other threads (a gRPC poller, an earlier test's server) open and close their own."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.soak.test_soak", str(tmp_path), str(busybox_image)],
        capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr


if __name__ == "__main__":
    problem = soak(Path(sys.argv[1]), Path(sys.argv[2]))
    print(problem or "ok")
    sys.exit(1 if problem else 0)
