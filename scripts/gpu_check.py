"""The GPU check (issue: GPUs). On a machine with an NVIDIA GPU, in under 5 minutes:

1. the pyhpc-gpu device plugin's NVML fingerprint, read through its own gRPC service as Nomad
   reads it (go-plugin handshake, then DevicePlugin.Fingerprint), a Reserve of one GPU, and two
   Stats samples a second apart (each GPU's figures, recorded in --json); then each GPU's MIG
   mode: where MIG devices exist, that each was fingerprinted (its parent not) and that a
   Reserve of one gives its capability nodes; where MIG is off, that it was left off (turning
   it on takes an admin and a GPU reset, which this check never does), so only the whole-GPU
   path was checked; and where /etc/cdi or /var/run/cdi hold nvidia.com/gpu specs, that
   Reserve gave what they describe;
2. `pyhpc run --gpus all` of nvidia-smi in a SquashFS image;
3. `pyhpc run --gpus 1`: the container sees exactly one GPU;
4. a CUDA program (scripts/gpu/cudacheck.c: driver API, PTX kernel) in the container that
   allocates GPU memory, runs a kernel and checks its result;
5. the fingerprint time and the extra start time of GPU injection (`pyhpc run --gpus 1` vs
   no GPU, same image, same command);
6. the task cgroup tests (tests/runtime/test_cgroup_tree.py) on this machine's cgroup version
   (v2 on the lent machines): a task in the scope Nomad gives it, on its cores only, seeing `/`
   in its cgroup namespace, killed and paused whole.

Each step prints PASS, FAIL or SKIP with what it saw. Exit 0 when every step passed, 1 when one
failed, 77 when the machine has no usable GPU (nothing to check). Run as root:
    scripts/gpu-check.sh [--image PATH]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2

from nomad_driver.device import cdi, nvml
from nomad_driver.goplugin.server import NOMAD_HANDSHAKE
from nomad_driver.proto import device_pb2, device_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
PYHPC = [sys.executable, "-m", "nomad_driver.cli.main"]
results: list[tuple[str, str, str]] = []
measures: dict[str, Any] = {}


def report(step: str, status: str, detail: str) -> None:
    results.append((step, status, detail))
    print(f"[{status}] {step}\n{detail.rstrip()}\n", flush=True)


def fingerprint_and_reserve(work: Path, gpus: list[nvml.Gpu]) -> list[str]:
    env = {
        **os.environ,
        NOMAD_HANDSHAKE.cookie_key: NOMAD_HANDSHAKE.cookie_value,
        "PLUGIN_PROTOCOL_VERSIONS": "2",
        "PYHPC_LOG_FILE": str(work / "pyhpc-gpu.log"),
    }
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nomad_driver.device.main"], env=env, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        channel = grpc.insecure_channel(f"unix:{line.split('|')[3]}")
        stub = device_pb2_grpc.DevicePluginStub(channel)
        first = next(stub.Fingerprint(device_pb2.FingerprintRequest(), timeout=60))
        took = time.monotonic() - started
        measures["fingerprint_first_answer_ms"] = round(took * 1e3, 1)
        ids, lines = [], []
        for group in first.device_group:
            attrs = ", ".join(
                f"{k}={v.string_val or v.int_val}{v.unit}"
                for k, v in sorted(group.attributes.items())
            )
            lines.append(f"{group.vendor}/{group.device_type}/{group.device_name}: {attrs}")
            for dev in group.devices:
                ids.append(dev.ID)
                lines.append(f"  {dev.ID} healthy={dev.healthy} pci={dev.hw_locality.pci_bus_id}")
        if not ids:
            report("device plugin fingerprint", "FAIL", "no devices reported\n" + str(first))
            return []
        report(
            "device plugin fingerprint",
            "PASS",
            f"{len(ids)} GPU(s), first answer {took * 1e3:.0f} ms after the plugin started\n"
            + "\n".join(lines),
        )
        reply = stub.Reserve(device_pb2.ReserveRequest(device_ids=ids[:1]), timeout=30)
        res = reply.container_res
        report(
            "device plugin reserve (one GPU)",
            "PASS" if res.devices else "FAIL",
            f"envs: {dict(res.envs)}\n"
            f"devices: {[d.task_path for d in res.devices]}\n"
            f"mounts: {len(res.mounts)} read-only, e.g. "
            + ", ".join(m.task_path for m in res.mounts[:6]),
        )
        stats(stub, ids)
        mig_check(stub, ids)
        cdi_check(stub, gpus, ids)
        channel.close()
        return ids
    finally:
        proc.kill()
        proc.wait()


NEEDED_FIGURES = ("GPU utilization", "Memory utilization", "Memory state", "Temperature")
# NVML has no utilization per MIG device, and temperature is the parent's: memory only.
NEEDED_MIG_FIGURES = ("Memory state",)


def stats(stub: Any, ids: list[str]) -> None:
    """Two Stats samples on a one-second interval, as Nomad asks for them: every fingerprinted
    GPU must have utilization, memory and temperature figures; the rest is shown as NVML gave
    it (power, BAR1, ECC where the GPU has it)."""
    interval = duration_pb2.Duration(seconds=1)
    stream = stub.Stats(device_pb2.StatsRequest(collection_interval=interval), timeout=30)
    t0 = time.monotonic()
    next(stream)
    second = next(stream)
    gap = time.monotonic() - t0
    stream.cancel()
    measures["stats_interval_s"] = round(gap, 2)
    seen: dict[str, dict[str, str]] = {}
    for group in second.groups:
        for uuid, dev in group.instance_stats.items():
            seen[uuid] = {
                name: f"{v.int_numerator_val.value}"
                + (f"/{v.int_denominator_val.value}" if v.HasField("int_denominator_val") else "")
                + f" {v.unit}"
                for name, v in sorted(dev.stats.attributes.items())
            }
    measures["stats"] = seen
    missing = [
        f"{uuid}: {name}"
        for uuid in ids
        for name in (NEEDED_MIG_FIGURES if uuid.startswith("MIG-") else NEEDED_FIGURES)
        if name not in seen.get(uuid, {})
    ]
    report(
        "device plugin stats (two samples, 1 s interval)",
        "FAIL" if missing else "PASS",
        f"second sample {gap:.2f} s after the request\n"
        + "\n".join(
            f"  {uuid}: " + ", ".join(f"{k}={v}" for k, v in f.items()) for uuid, f in seen.items()
        )
        + (f"\nmissing: {', '.join(missing)}" if missing else ""),
    )


def mig_modes(nvml_module: Any = None) -> dict[str, tuple[bool | None, list[str]]]:
    """Each GPU's MIG mode (None: the GPU cannot do MIG) and its MIG devices' UUIDs, asked of
    NVML here, apart from the plugin, so the fingerprint is checked against a second reading."""
    out: dict[str, tuple[bool | None, list[str]]] = {}
    with nvml.opened(nvml_module) as (lib, why):
        if lib is None:
            return out
        for i in range(lib.nvmlDeviceGetCount()):
            h = lib.nvmlDeviceGetHandleByIndex(i)
            uuid = lib.nvmlDeviceGetUUID(h)
            mode = nvml.mig_mode(lib, h)
            migs = []
            for j in range(lib.nvmlDeviceGetMaxMigDeviceCount(h) if mode else 0):
                try:
                    m = lib.nvmlDeviceGetMigDeviceHandleByIndex(h, j)
                except Exception:  # noqa: BLE001 - an empty place
                    continue
                migs.append(_text(lib.nvmlDeviceGetUUID(m)))
            out[_text(uuid)] = (mode, migs)
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


ENABLE_MIG = (
    "enabling MIG needs an admin: `nvidia-smi -i N -mig 1`, a GPU reset (or reboot), then "
    "instances (`nvidia-smi mig -cgi PROFILES -C`); this check never changes a GPU's mode"
)


def mig_check(stub: Any, ids: list[str], nvml_module: Any = None) -> None:
    """MIG mode per GPU. With MIG devices: each fingerprinted in place of its parent, and a
    Reserve of one giving its parent's node and its capability nodes (character devices on
    this host). With MIG off: each GPU offered whole, and a note that only that path was
    checked, since turning MIG on is an admin's act."""
    modes = mig_modes(nvml_module)
    lines = [
        f"  {uuid}: MIG {'unsupported' if mode is None else 'on' if mode else 'off'}"
        + (f", {len(migs)} MIG device(s)" if mode else "")
        for uuid, (mode, migs) in modes.items()
    ]
    migs = [m for _, found in modes.values() for m in found]
    wrong = [f"{m} not fingerprinted" for m in migs if m not in ids]
    wrong += [
        f"{uuid} (MIG {'on' if mode else 'off'}) " + ("offered whole" if mode else "not offered")
        for uuid, (mode, _) in modes.items()
        if bool(mode) == (uuid in ids)
    ]
    if migs and not wrong:
        res = stub.Reserve(device_pb2.ReserveRequest(device_ids=migs[:1]), timeout=30).container_res
        caps = [d for d in res.devices if d.task_path.startswith("/dev/nvidia-caps/")]
        lines.append(f"  Reserve {migs[0]}: devices {[d.task_path for d in res.devices]}")
        if len(caps) != 2:
            wrong.append(f"Reserve of {migs[0]} gave {len(caps)} capability nodes, not 2")
        wrong += [f"{d.host_path} is not a character device" for d in caps if not _chr(d.host_path)]
    if wrong:
        status = "FAIL"
    elif migs:
        status = "PASS"
    else:
        status = "INFO"
        if any(mode for mode, _ in modes.values()):
            why = (
                "MIG is on but no MIG device exists (an admin creates them: `nvidia-smi mig "
                "-cgi PROFILES -C`); the GPUs in MIG mode were rightly not offered"
            )
        elif any(mode is not None for mode, _ in modes.values()):
            why = ENABLE_MIG
        else:
            why = "these GPUs cannot do MIG"
        lines.append(
            f"no MIG devices on this machine: {why}; only the non-MIG path (each GPU offered "
            "whole) was checked"
        )
    report("MIG mode per GPU", status, "\n".join(lines + wrong))


def _chr(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


class Skipped(logging.Handler):
    """The CDI loader's warnings (spec files and entries skipped), as lines for the report."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        kv = getattr(record, "kv", {})
        self.lines.append(f"{record.getMessage()}: " + " ".join(f"{k}={v}" for k, v in kv.items()))


def cdi_check(
    stub: Any,
    gpus: list[nvml.Gpu],
    ids: list[str],
    dirs: tuple[str, ...] = cdi.DEFAULT_DIRS,
    owner: int = 0,
) -> None:
    """Where CDI specs describe the first fingerprinted device, that the plugin's Reserve gave
    their nodes and mounts; else a note that Reserve used pyhpc's own discovery, with each
    spec file skipped and why."""
    skipped = Skipped()
    logging.getLogger("pyhpc.device").addHandler(skipped)
    try:
        specs = cdi.load(dirs, owner)
    finally:
        logging.getLogger("pyhpc.device").removeHandler(skipped)
    where = " or ".join(dirs)
    if not specs or not ids:
        report(
            "CDI specs",
            "INFO",
            f"no usable nvidia.com/gpu CDI spec in {where} (JSON, or YAML where PyYAML is "
            "installed; root-owned): Reserve used pyhpc's own discovery"
            + "".join(f"\n  {line}" for line in skipped.lines),
        )
        return
    expected = cdi.injection(specs, gpus, ids[:1])
    names = ", ".join(s.path for s in specs)
    if expected is None:
        report("CDI specs", "INFO", f"{names}: none describes {ids[0]}; Reserve used its own")
        return
    res = stub.Reserve(device_pb2.ReserveRequest(device_ids=ids[:1]), timeout=30).container_res
    got = (
        [(d.host_path, d.task_path) for d in res.devices],
        [(m.host_path, m.task_path, m.read_only) for m in res.mounts],
    )
    wanted = (
        [(n.host_path, n.path) for n in expected.nodes],
        [(m.host_path, m.container_path, m.read_only) for m in expected.mounts],
    )
    report(
        "CDI specs: Reserve used them",
        "PASS" if got == wanted else "FAIL",
        f"{ids[0]} from {', '.join(expected.sources)}: {len(got[0])} device nodes, "
        f"{len(got[1])} mounts (hooks not run)"
        + ("" if got == wanted else f"\nexpected {wanted}\ngot {got}"),
    )


def run(image: str, gpus: str, *command: str) -> subprocess.CompletedProcess[str]:
    """`pyhpc run` (as root) under a policy that allows images from the image's directory."""
    where = Path(image).parent
    with tempfile.NamedTemporaryFile("w", prefix="pyhpc-check-", suffix=".hcl", dir="/run") as f:
        f.write(f'plugin "pyhpc" {{\n  config {{\n    image_dirs = ["{where}"]\n  }}\n}}\n')
        f.flush()
        gpu = ["--gpus", gpus] if gpus else []
        args = [*PYHPC, "run", "--config", f.name, *gpu, image, "--", *command]
        return subprocess.run(args, capture_output=True, text=True, timeout=120)


def cuda_image(work: Path, prebuilt: str | None) -> Path:
    """A SquashFS image with cudacheck and the host's C library, which it, the host's libcuda
    and nvidia-smi need (the driver's libraries come from the host at run time)."""
    root = work / "cuda-root"
    binary = root / "cudacheck"
    root.mkdir()
    if prebuilt:
        shutil.copy2(prebuilt, binary)
    else:
        subprocess.run(
            ["gcc", "-O2", "-o", str(binary), str(REPO / "scripts/gpu/cudacheck.c"), "-ldl"],
            check=True,
        )
    libs = set()
    for line in subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout.split(
        "\n"
    ):
        for word in line.split():
            if word.startswith("/"):
                libs.add(word)
    # What libcuda itself links against (glibc's pieces), from the same host libc.
    for lib in ("libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1"):
        found = subprocess.run(
            ["sh", "-c", f"ldconfig -p | awk '/{lib} .*x86-64/ {{print $NF; exit}}'"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if found:
            libs.add(found)
    for lib in libs:
        target = root / lib.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(lib), target)
    (root / "tmp").mkdir(mode=0o1777)
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/:/cudacheck\n")
    image = work / "cuda.sqsh"
    subprocess.run(
        ["mksquashfs", str(root), str(image), "-quiet", "-all-root", "-noappend"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return image


def entry_ms(image: str, n: int = 25) -> dict[str, float]:
    """`pyhpc run IMAGE /bin/true` without and with `--gpus 1`, interleaved so that a change in
    the machine's load falls on both alike: the medians, and the quartiles of the paired
    differences (how much of the difference is noise)."""
    samples: dict[str, list[float]] = {"": [], "1": []}
    for _ in range(n):
        for gpus, times in samples.items():
            t0 = time.perf_counter()
            done = run(image, gpus, "/bin/true")
            times.append((time.perf_counter() - t0) * 1e3)
            if done.returncode != 0:
                raise RuntimeError(done.stderr)
    q1, q2, q3 = statistics.quantiles(
        [b - a for a, b in zip(samples[""], samples["1"], strict=True)], n=4
    )
    return {
        "run_plain_ms": statistics.median(samples[""]),
        "run_gpus1_ms": statistics.median(samples["1"]),
        "run_delta_q1_ms": q1,
        "run_delta_median_ms": q2,
        "run_delta_q3_ms": q3,
    }


def mount_ms(res: dict[str, Any], n: int = 20) -> float:
    """Median time the runtime's own bind_mounts takes for a reservation's mounts and device
    nodes, in a private mount namespace over a scratch tmpfs (a forked child): the part of
    the start cost that a task placed by Nomad pays, where the reservation is already made."""
    from nomad_driver.runtime.spec import BindMount

    items = tuple(BindMount(h, t, read_only=True) for h, t in res["mounts"])
    items += tuple(BindMount(node, node) for node in res["devices"])
    code = (
        "import json, os, statistics, sys, tempfile, time\n"
        "from nomad_driver.runtime import container, linux\n"
        "from nomad_driver.runtime.spec import BindMount\n"
        "items = tuple(BindMount(*m) for m in json.load(sys.stdin))\n"
        "linux.unshare(linux.CLONE_NEWNS)\n"
        "linux.mount('none', '/', None, linux.MS_REC | linux.MS_PRIVATE)\n"
        "samples = []\n"
        f"for _ in range({n}):\n"
        "    root = tempfile.mkdtemp(prefix='pyhpc-gpu-mounts-')\n"
        "    linux.mount('tmpfs', root, 'tmpfs', 0, 'size=1m')\n"
        "    t0 = time.perf_counter()\n"
        "    container.bind_mounts(root, items)\n"
        "    samples.append((time.perf_counter() - t0) * 1e3)\n"
        "print(statistics.median(samples))\n"
    )
    import json

    done = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps([(m.host_path, m.task_path, m.read_only) for m in items]),
        capture_output=True,
        text=True,
        check=False,
    )
    for leftover in Path(tempfile.gettempdir()).glob("pyhpc-gpu-mounts-*"):
        leftover.rmdir()
    return float(done.stdout) if done.returncode == 0 else float("nan")


def cgroup_check() -> None:
    """The task cgroup tests, run here: on a v2 machine they place a task in a Nomad-made scope
    for real (the CI machine has v1)."""
    version = 2 if Path("/sys/fs/cgroup/cgroup.controllers").exists() else 1
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(REPO / "tests/runtime/test_cgroup_tree.py")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    measures["cgroup_version"] = version
    report(
        f"task cgroups on cgroup v{version} (tests/runtime/test_cgroup_tree.py)",
        "PASS" if done.returncode == 0 else "FAIL",
        "\n".join(done.stdout.strip().splitlines()[-15:]),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--image",
        default="/var/lib/pyhpc/images/busybox.sqsh",
        help="a static shell image for the /dev listing and the start-cost samples",
    )
    parser.add_argument(
        "--cudacheck",
        metavar="BINARY",
        help="scripts/gpu/cudacheck.c built elsewhere, for a machine without gcc",
    )
    parser.add_argument(
        "--keep-image",
        metavar="PATH",
        help="keep the CUDA test image there (for jobspecs/gpu.nomad: scripts/gpu/nomad-gpu.sh)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the steps and measures here")
    args = parser.parse_args()
    t0 = time.monotonic()
    gpus, why = nvml.probe()
    probe_ms = (time.monotonic() - t0) * 1e3
    measures["nvml_probe_ms"] = round(probe_ms, 1)
    if not gpus:
        print(f"[SKIP] no usable NVIDIA GPU here: {why or 'NVML reports none'}")
        return 77
    print(
        f"NVML: {len(gpus)} GPU(s), probe {probe_ms:.0f} ms; driver {gpus[0].driver_version}, "
        f"CUDA {gpus[0].cuda_version}\n",
        flush=True,
    )
    # nvidia-smi -L lists GPUs, a MIG GPU once (its MIG devices on lines of their own).
    physical = {g.mig.parent_uuid if g.mig else g.uuid for g in gpus}
    work = Path(tempfile.mkdtemp(prefix="pyhpc-gpu-check-"))
    try:
        fingerprint_and_reserve(work, gpus)
        if not Path(args.image).exists():
            subprocess.run([str(REPO / "scripts/make-demo-image.sh"), args.image], check=True)
        # nvidia-smi is linked against the C library: it runs in the CUDA image, which has the
        # host's; the /dev listing needs a shell, from the static image.
        try:
            cuda_sqsh = str(cuda_image(work, args.cudacheck))
            if args.keep_image:
                shutil.copy2(cuda_sqsh, args.keep_image)
        except (subprocess.CalledProcessError, OSError) as err:
            report("CUDA test image", "FAIL", f"could not build it: {err}")
            cuda_sqsh = ""
        smi_path = "/usr/local/nvidia/bin/nvidia-smi"
        if cuda_sqsh:
            smi = run(cuda_sqsh, "all", smi_path, "-L")
            listed = [line for line in smi.stdout.splitlines() if line.startswith("GPU ")]
            report(
                "pyhpc run --gpus all: nvidia-smi -L",
                "PASS" if smi.returncode == 0 and len(listed) == len(physical) else "FAIL",
                smi.stdout + smi.stderr,
            )
            one = run(cuda_sqsh, "1", smi_path, "-L")
            seen = [line for line in one.stdout.splitlines() if line.startswith("GPU ")]
        else:
            one, seen = None, []
        nodes = run(args.image, "1", "/bin/sh", "-c", "ls /dev | grep -E '^nvidia[0-9]+$'")
        report(
            "pyhpc run --gpus 1: exactly one GPU visible",
            "PASS" if len(seen) == 1 and len(nodes.stdout.split()) == 1 else "FAIL",
            (one.stdout + one.stderr if one else "")
            + f"/dev: {nodes.stdout.split()} {nodes.stderr}",
        )
        if cuda_sqsh:
            cuda = run(cuda_sqsh, "1", "/cudacheck")
            report(
                "CUDA kernel in the container",
                "PASS" if cuda.returncode == 0 else "FAIL",
                cuda.stdout + cuda.stderr,
            )
        t1 = time.perf_counter()
        listed_gpus = nvml.from_proc()
        lookup_ms = (time.perf_counter() - t1) * 1e3
        t1 = time.perf_counter()
        res = nvml.reservation(gpus, [gpus[0].uuid])
        reserve_ms = (time.perf_counter() - t1) * 1e3
        mounting = mount_ms(res)
        measures.update(
            gpu_lookup_ms=lookup_ms if listed_gpus else probe_ms,
            gpu_lookup_from="/proc/driver/nvidia" if listed_gpus else "NVML",
            reservation_ms=reserve_ms,
            mounting_ms=mounting,
            device_nodes=len(res["devices"]),
            read_only_mounts=len(res["mounts"]),
        )
        per_task = reserve_ms + mounting
        report(
            "GPU injection cost per task (target under 20 ms)",
            "PASS" if per_task < 20 else "FAIL",
            f"{per_task:.1f} ms: reservation (linker cache, tools) {reserve_ms:.1f} ms, done once "
            f"per allocation by the device plugin, and the runtime binding "
            f"{len(res['devices'])} device nodes and {len(res['mounts'])} read-only mounts "
            f"{mounting:.1f} ms (median of 20); `pyhpc run --gpus` adds the GPU lookup: "
            + (
                f"from /proc/driver/nvidia {lookup_ms:.1f} ms"
                if listed_gpus
                else f"through NVML (no /proc/driver/nvidia listing) {probe_ms:.0f} ms"
            ),
        )
        entry = entry_ms(args.image)
        measures.update(entry)
        report(
            "pyhpc run /bin/true with --gpus 1 against none (25 interleaved pairs)",
            "INFO",
            f"medians {entry['run_plain_ms']:.1f} and {entry['run_gpus1_ms']:.1f} ms; paired "
            f"difference {entry['run_delta_median_ms']:+.1f} ms (quartiles "
            f"{entry['run_delta_q1_ms']:+.1f}, {entry['run_delta_q3_ms']:+.1f}): the whole "
            "command's noise on this machine, beside the parts measured above",
        )
        cgroup_check()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [r for r in results if r[1] == "FAIL"]
    if args.json:
        import json
        import platform

        measures.update(
            gpu=f"{len(gpus)} x {gpus[0].name}",
            driver=gpus[0].driver_version,
            cuda=gpus[0].cuda_version,
            kernel=platform.release(),
        )
        steps = [{"step": a, "status": b, "detail": c} for a, b, c in results]
        Path(args.json).write_text(json.dumps({"steps": steps, "measures": measures}, indent=1))
    print(
        f"{len(results) - len(failed)} of {len(results)} steps passed or informed "
        f"in {time.monotonic() - t0:.0f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
