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
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.entry_latency import ch_run_image  # noqa: E402

DEMO_IMAGE = Path("/var/lib/pyhpc/images/busybox.sqsh")
IMAGE = Path("/var/lib/pyhpc/images/guard-busybox.sqsh")  # the demo image with ch-run's dirs
LIMITS = {
    "pyhpc run / ch-run": 4.5,  # 4.48 before the entry work of issue 20 (now 2.8-3.7)
    "pyhpc run / unshare + chroot": 60.0,
    "driver start / ch-run": 1.5,  # 2.0 before the forkserver
    "driver start / unshare + chroot": 25.0,
    "plugin RSS after a burst of 200 calls / before": 1.20,  # 1.23 with a pool that keeps
}


def command(argv: list[str]) -> Callable[[], None]:
    subprocess.run(argv, check=True, capture_output=True)  # fail loudly, before timing

    def run() -> None:
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)

    return run


class DriverStart:
    """client.start to the task's exec, as the plugin starts a task: user namespace, cgroup,
    the default capabilities and seccomp profile, through the forkserver."""

    def __init__(self, work: Path) -> None:
        from nomad_driver.runtime import client, security
        from nomad_driver.runtime.cgroups import Limits
        from nomad_driver.runtime.spec import ContainerSpec

        self.client, self.work, self.n = client, work, 0
        self.spec = ContainerSpec(
            task_id="guard", hostname="guard", image=str(IMAGE), command="/bin/true",
            args=(), env={"PATH": "/bin"}, work_dir="/", user="",
            stdout_path=os.devnull, stderr_path=os.devnull, mounts=(),
            capabilities=tuple(sorted(security.DEFAULT_CAPS)),
            seccomp=security.default_profile(), images_dir=str(work / "images"),
            userns=(100000, 65536), limits=Limits(pids_max=1024),
        )  # fmt: skip
        self.took = 0.0
        self()  # the forkserver, warm

    def __call__(self) -> None:
        self.n += 1
        start = time.perf_counter()
        started = self.client.start(self.spec, str(self.work / f"run-{self.n}"))
        self.took = time.perf_counter() - start
        if self.client.wait(started.run_dir).exit_code != 0:
            raise RuntimeError("the driver's /bin/true failed")
        self.client.remove(started.run_dir)


def interleaved(subjects: dict[str, Callable[[], None]], runs: int) -> dict[str, float]:
    """Median seconds of each, run in turn, runs rounds: whatever else loads the machine
    loads every subject alike, so their ratios hold still where their times do not."""
    samples: dict[str, list[float]] = {name: [] for name in subjects}
    for _ in range(runs):
        for name, run in subjects.items():
            start = time.perf_counter()
            run()
            took = time.perf_counter() - start
            samples[name].append(getattr(run, "took", took))  # the driver: start only
    return {name: statistics.median(values) for name, values in samples.items()}


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
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "guard.md"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("guard: needs root (loop mounts, namespaces)")
    if not DEMO_IMAGE.exists():
        sys.exit(f"guard: {DEMO_IMAGE} is missing; run scripts/make-demo-image.sh")
    began = time.monotonic()
    # Byte-compiled, as an installed package is (a checkout run with PYTHONDONTWRITEBYTECODE
    # would otherwise compile the changed modules on every start it measures).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "nomad_driver")],
                   check=True, capture_output=True)  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="pyhpc-guard-"))
    rootfs = ch_run_image(work, IMAGE)
    measured: dict[str, tuple[float, float]] = {}  # measure -> (pyhpc, anchor)
    notes: list[str] = []
    try:
        subjects: dict[str, Callable[[], None]] = {
            "unshare + chroot": command(
                ["unshare", "-mpiu", "--fork", "chroot", str(rootfs), "/bin/true"]
            ),
            "pyhpc run": command(
                [sys.executable, "-m", "nomad_driver.cli.main", "run", str(IMAGE), "/bin/true"]
            ),
            "driver start": DriverStart(work),
        }
        if shutil.which("ch-run"):
            try:
                subjects["ch-run"] = command(
                    ["env", "USER=root", "ch-run", str(IMAGE), "--", "/bin/true"]
                )
            except subprocess.CalledProcessError as err:
                why = (err.stderr or b"").decode(errors="replace").strip()[-200:]
                notes.append(f"ch-run could not run here, not compared: {why}")
        else:
            notes.append("ch-run is not installed (apt install charliecloud-runtime): not compared")
        median = interleaved(subjects, args.runs)
        for subject in ("pyhpc run", "driver start"):
            for anchor in ("ch-run", "unshare + chroot"):
                if f"{subject} / {anchor}" in LIMITS and anchor in median:
                    measured[f"{subject} / {anchor}"] = (median[subject], median[anchor])
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
