"""The performance regression guard CI runs: container entry and the driver's memory, each as a
ratio to an anchor measured in the same run, never as an absolute time. Under a minute.

    python bench/guard.py [--runs 15] [--out bench/results/guard.md]

Entry: `pyhpc run /bin/true` against Charliecloud's `ch-run` on the same SquashFS (where it is
installed) and against `unshare + chroot` (always); the driver's start (client.start through the
forkserver to the task's exec) against `unshare + chroot`. Memory: the real plugin process,
started as a go-plugin host starts it, takes a burst of 200 concurrent streaming calls (a gRPC
thread each, as WaitTask and TaskStats hold one per task); once they end and the plugin has been
idle a while, its RSS over its RSS before the burst.

Exit 1, naming the measure, when a ratio is over its limit. The limits sit above this
checkout's measurements (bench/results/guard.md) with room for a loaded 2-core machine; they are
what a regression must cross, not the targets of the performance issue."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEMO_IMAGE = Path("/var/lib/pyhpc/images/busybox.sqsh")
IMAGE = Path("/var/lib/pyhpc/images/guard-busybox.sqsh")  # the demo image with ch-run's dirs
LIMITS = {
    "pyhpc run / ch-run": 4.0,
    "pyhpc run / unshare + chroot": 60.0,
    "driver start / unshare + chroot": 15.0,
    "plugin RSS after a burst of 200 calls / before": 1.20,
}


def timed(argv: list[str], runs: int) -> float:
    subprocess.run(argv, check=True, capture_output=True)  # warm, and fail loudly
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def driver_start(runs: int) -> float:
    """client.start to the task's exec, as the plugin starts a task (user namespace, cgroup,
    default capabilities and seccomp), median over runs after one to warm the forkserver."""
    from nomad_driver.runtime import client, security
    from nomad_driver.runtime.cgroups import Limits
    from nomad_driver.runtime.spec import ContainerSpec

    work = Path(tempfile.mkdtemp(prefix="pyhpc-guard-"))
    samples = []
    try:
        for i in range(runs + 1):
            spec = ContainerSpec(
                task_id=f"guard/{i}", hostname="guard", image=str(IMAGE), command="/bin/true",
                args=(), env={"PATH": "/bin"}, work_dir="/", user="",
                stdout_path=os.devnull, stderr_path=os.devnull, mounts=(),
                capabilities=tuple(sorted(security.DEFAULT_CAPS)),
                seccomp=security.default_profile(), images_dir=str(work / "images"),
                userns=(100000, 65536), limits=Limits(pids_max=1024),
            )  # fmt: skip
            start = time.perf_counter()
            started = client.start(spec, str(work / f"run-{i}"))
            took = time.perf_counter() - start
            client.wait(started.run_dir)
            client.remove(started.run_dir)
            if i:
                samples.append(took)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return statistics.median(samples)


def plugin_burst(calls: int = 200) -> tuple[float, float, float]:
    """(RSS before, at the peak, after) in MB of a standalone plugin process."""
    import grpc

    from nomad_driver.goplugin.server import NOMAD_HANDSHAKE
    from nomad_driver.proto import driver_pb2, driver_pb2_grpc

    env = {
        **os.environ,
        NOMAD_HANDSHAKE.cookie_key: NOMAD_HANDSHAKE.cookie_value,
        "PLUGIN_PROTOCOL_VERSIONS": "2",
        "PYHPC_LOG_FILE": os.devnull,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "nomad_driver.driver.main"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    assert proc.stdout is not None
    address = proc.stdout.readline().decode().split("|")[3]

    def rss() -> float:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    channel = grpc.insecure_channel(f"unix:{address}")
    stub = driver_pb2_grpc.DriverStub(channel)
    try:

        def hold(seconds: float) -> None:
            stream = stub.TaskEvents(driver_pb2.TaskEventsRequest())
            timer = threading.Timer(seconds, stream.cancel)
            timer.start()
            try:
                for _ in stream:
                    pass
            except grpc.RpcError:
                pass
            timer.cancel()

        for _ in range(3):  # warm: the first calls load what every later call uses
            hold(0.2)
        time.sleep(1)
        before = rss()
        threads = [threading.Thread(target=hold, args=(2.0,)) for _ in range(calls)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        peak = rss()
        for t in threads:
            t.join()
        time.sleep(11)  # idle gRPC threads leave after 10 s
        fingerprint = stub.Fingerprint(driver_pb2.FingerprintRequest())
        next(fingerprint)  # the heap is trimmed after each fingerprint
        time.sleep(1)
        fingerprint.cancel()
        return before, peak, rss()
    finally:
        channel.close()
        proc.kill()
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "guard.md"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("guard: needs root (loop mounts, namespaces)")
    if not DEMO_IMAGE.exists():
        sys.exit(f"guard: {DEMO_IMAGE} is missing; run scripts/make-demo-image.sh")
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="pyhpc-guard-"))
    os.chmod(work, 0o755)
    rootfs = work / "rootfs"
    subprocess.run(["unsquashfs", "-q", "-d", str(rootfs), str(DEMO_IMAGE)], check=True)
    os.chmod(rootfs, 0o755)
    for d in ("dev", "proc", "sys", "tmp", "home", "mnt", "run", "var/tmp"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)  # what ch-run expects in an image
    for f in ("etc/hosts", "etc/resolv.conf", "etc/group"):
        (rootfs / f).touch()
    subprocess.run(
        ["mksquashfs", str(rootfs), str(IMAGE), "-noappend", "-quiet", "-comp", "gzip"],
        check=True, capture_output=True,
    )  # fmt: skip
    os.chmod(IMAGE, 0o644)
    measured: dict[str, tuple[float, float]] = {}  # measure -> (pyhpc, anchor)
    notes: list[str] = []
    try:
        anchor = timed(
            ["unshare", "-mpiu", "--fork", "chroot", str(rootfs), "/bin/true"], args.runs
        )
        run = timed([sys.executable, "-m", "nomad_driver.cli.main", "run", str(IMAGE), "/bin/true"],
                    args.runs)  # fmt: skip
        measured["pyhpc run / unshare + chroot"] = (run, anchor)
        if shutil.which("ch-run"):
            ch = timed(["env", "USER=root", "ch-run", str(IMAGE), "--", "/bin/true"], args.runs)
            measured["pyhpc run / ch-run"] = (run, ch)
        else:
            notes.append("ch-run is not installed (apt install charliecloud-runtime): not compared")
        measured["driver start / unshare + chroot"] = (driver_start(args.runs), anchor)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        IMAGE.unlink(missing_ok=True)
    before, peak, after = plugin_burst()
    measured["plugin RSS after a burst of 200 calls / before"] = (after, before)
    took = time.monotonic() - began
    lines = [
        "# Performance guard",
        "",
        f"`python bench/guard.py --runs {args.runs}` on {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d')}, {took:.0f} s. Times are medians in ms; memory in MB "
        f"(plugin peak during the burst: {peak:.1f} MB).",
        "",
        "| measure | pyhpc | anchor | ratio | limit |",
        "|---|---|---|---|---|",
    ]
    failed = []
    for name, (ours, theirs) in measured.items():
        ratio = ours / theirs
        scale = 1 if name.startswith("plugin") else 1e3
        lines.append(
            f"| {name} | {ours * scale:.1f} | {theirs * scale:.1f} | {ratio:.2f} | "
            f"{LIMITS[name]:.2f} |"
        )
        if ratio > LIMITS[name]:
            failed.append(f"{name}: {ratio:.2f} is over its limit {LIMITS[name]:.2f}")
    lines += [f"\n{n}" for n in notes]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    for line in failed:
        print(f"guard: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
