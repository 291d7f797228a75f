"""What the race-free start path costs: the driver's container entry of this checkout against
another revision's (default: the last commit before the descriptor-based start path), both
with Nomad's three binds (/alloc, /local, /secrets), a user namespace and a cgroup, as Nomad
runs a task. Rounds alternate between the two, in one run, so both see the same machine.
Needs root.

    python bench/security_cost.py [--base 8c61705] [--rounds 8] [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE = "/var/lib/pyhpc/images/busybox.sqsh"

# Run inside each checkout (cwd and sys.path[0] are that checkout): the entry as the driver's
# supervisor does it, image already mounted, timed from Supervisor.start() to the task's exec.
PROBE = r"""
import inspect, json, os, sys, tempfile, time
from pathlib import Path
from nomad_driver.runtime import client, container, security
from nomad_driver.runtime.cgroups import Limits
from nomad_driver.runtime.imagemount import SharedImages
from nomad_driver.runtime.spec import BindMount, ContainerSpec
from nomad_driver.runtime.supervisor import Supervisor

image, runs = sys.argv[1], int(sys.argv[2])
work = Path(tempfile.mkdtemp(prefix="pyhpc-cost-"))
images = SharedImages(str(work / "images"))
if "ImageFile" in str(inspect.signature(images.acquire)):
    from nomad_driver.runtime.imagefile import open_image
    opened = open_image(image)
    root = images.acquire(opened, "bench")
    opened.close()
else:
    root = images.acquire(image, "bench")
alloc = work / "alloc-dir"
for d in ("alloc", "t/local", "t/secrets"):
    (alloc / d).mkdir(parents=True)
extra = {"beneath": str(alloc)} if "beneath" in BindMount._fields else {}
mounts = (
    BindMount(str(alloc / "alloc"), "/alloc", **extra),
    BindMount(str(alloc / "t/local"), "/local", **extra),
    BindMount(str(alloc / "t/secrets"), "/secrets", **extra),
)
spec = ContainerSpec(
    task_id="bench", hostname="bench", image=image, command="/bin/true", args=(),
    env={"PATH": "/bin"}, work_dir="/", user="", stdout_path=os.devnull,
    stderr_path=os.devnull, mounts=mounts, capabilities=tuple(sorted(security.DEFAULT_CAPS)),
    seccomp=security.default_profile(), images_dir=str(work / "images"), image_root=root,
    userns=(100000, 65536),
    limits=Limits(pids_max=16384) if os.environ.get("COST_CGROUP", "1") == "1" else None,
)
out = []
try:
    for i in range(runs + 1):
        run_dir = work / f"run-{i}"
        run_dir.mkdir()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
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
        if i:
            out.append(took * 1000)
finally:
    images.release("bench")
print(json.dumps(out))
"""


def entry_ms(checkout: Path, runs: int) -> list[float]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, IMAGE, str(runs)],
        cwd=checkout,
        env={**os.environ, "PYTHONPATH": str(checkout)},
        capture_output=True,
        text=True,
        check=True,
    )
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def quartile(values: list[float], which: int) -> float:
    return sorted(values)[(which * len(values)) // 4]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="8c61705", help="the revision to compare against")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "security_cost"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("security_cost: needs root (mounts, namespaces)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pyhpc-base-") as base:
        subprocess.run(
            f"git -C {REPO} archive {args.base} | tar -x -C {base}", shell=True, check=True
        )
        samples: dict[str, list[float]] = {"base": [], "this": []}
        paired: list[float] = []  # per round: this round's median minus base's
        for _ in range(args.rounds):
            old, new = entry_ms(Path(base), args.runs), entry_ms(REPO, args.runs)
            samples["base"] += old
            samples["this"] += new
            paired.append(statistics.median(new) - statistics.median(old))
    med = {k: statistics.median(v) for k, v in samples.items()}
    p95 = {k: sorted(v)[int(0.95 * (len(v) - 1))] for k, v in samples.items()}
    rev = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    lines = [
        "# What the race-free start path costs: driver entry, base against this checkout",
        "",
        f"`python bench/security_cost.py --base {args.base} --rounds {args.rounds} --runs "
        f"{args.runs}` on {os.cpu_count()} CPUs, kernel {os.uname().release}; rounds alternate "
        "base and this checkout in one run. Entry: Supervisor.start() to the exec of /bin/true, "
        "image mounted, user namespace, cgroup, Nomad's three binds, default seccomp.",
        "",
        "| checkout | runs | median (ms) | p95 (ms) |",
        "|---|---|---|---|",
        f"| base {args.base} | {len(samples['base'])} | {med['base']:.2f} | {p95['base']:.2f} |",
        f"| this ({rev}) | {len(samples['this'])} | {med['this']:.2f} | {p95['this']:.2f} |",
        "",
        f"Difference of medians: {med['this'] - med['base']:+.2f} ms "
        f"(ratio {med['this'] / med['base']:.3f}); median of the per-round differences "
        f"{statistics.median(paired):+.2f} ms, the middle half of them "
        f"{quartile(paired, 1):+.2f} to {quartile(paired, 3):+.2f} ms.",
    ]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"samples_ms": samples, "base": args.base}))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
