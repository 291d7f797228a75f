"""What the node's GPUs are (through NVML) and what a task given some of them needs: device
nodes, the host driver's user-space libraries and tools, and the environment. Pure mappings,
so they can be tested with recorded NVML answers; `opened`, `probe` and `telemetry` are the one
seam to NVML.

A GPU in MIG mode is not offered itself: each of its MIG devices (a compute instance in a GPU
instance, with its own "MIG-..." UUID) is, as a device of its own. A task given one gets the
parent's /dev/nvidiaN and the two capability nodes that grant that GPU and compute instance."""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from nomad_driver.util.errors import PyhpcError

CONTROL_NODES = (
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
)
LIBRARY_PATTERNS = (
    r"libcuda\.so",
    r"libnvidia-ml\.so",
    r"libnvidia-ptxjitcompiler\.so",
    r"libnvidia-nvvm\.so",
    r"libnvidia-gpucomp\.so",
    r"libnvidia-allocator\.so",
    r"libcudadebugger\.so",
)
TOOLS = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced")
TASK_LIB_DIR = "/usr/local/nvidia/lib64"
TASK_BIN_DIR = "/usr/local/nvidia/bin"
MIB = 1 << 20
CAPS_PROC = "/proc/driver/nvidia/capabilities"
CAPS_DEV = "/dev/nvidia-caps"


class Mig(NamedTuple):
    """Where a MIG device sits: its parent GPU, its GPU and compute instance ids, its place
    among the parent's MIG devices (NVML's index, which CDI's "GPU:MIG" names use) and its
    profile as nvidia-smi names it ("1g.10gb"; "1c.3g.40gb" for a compute instance smaller
    than its GPU instance). Slice counts are None where NVML did not give them."""

    parent_uuid: str
    gpu_instance: int
    compute_instance: int
    mig_index: int
    profile: str
    gpu_slices: int | None = None
    compute_slices: int | None = None


class Gpu(NamedTuple):
    """A device a task can be given: a whole GPU, or a MIG device (`mig` set; then `minor`,
    `pci_bus_id` and `power_limit_w` are its parent's). `nvml_index` is NVML's index of the GPU
    (of the parent, for a MIG device); -1 where unknown."""

    uuid: str
    name: str
    minor: int
    memory_mib: int
    pci_bus_id: str
    driver_version: str
    cuda_version: str
    compute_capability: str
    power_limit_w: int
    nvml_index: int = -1
    mig: Mig | None = None


class Unavailable(PyhpcError):
    """A reserved device exists but the host cannot give it now (its MIG capability unreadable
    or its device node missing): what is missing is named."""


@contextmanager
def opened(nvml: Any = None) -> Iterator[tuple[Any, str]]:
    """NVML initialised for the length of the block, and why not ("" when it is): the module, or
    None where there is no library, driver or GPU. Shut down again when the block ends."""
    try:
        if nvml is None:
            import pynvml as nvml  # type: ignore[no-redef]
        nvml.nvmlInit()
    except Exception as err:  # noqa: BLE001 - no library, no driver, no GPU: all mean none
        yield None, str(err)
        return
    try:
        yield nvml, ""
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001, S110 - nothing to do on a failed shutdown
            pass


def probe(nvml: Any = None) -> tuple[list[Gpu], str]:
    """The GPUs NVML reports, and why there are none ("" when NVML answered)."""
    with opened(nvml) as (lib, why):
        if lib is None:
            return [], f"NVML unavailable: {why}"
        try:
            driver = _text(lib.nvmlSystemGetDriverVersion())
            cuda = lib.nvmlSystemGetCudaDriverVersion()
            gpus: list[Gpu] = []
            for i in range(lib.nvmlDeviceGetCount()):
                h = lib.nvmlDeviceGetHandleByIndex(i)
                major, minor_cc = lib.nvmlDeviceGetCudaComputeCapability(h)
                gpu = Gpu(
                    uuid=_text(lib.nvmlDeviceGetUUID(h)),
                    name=_text(lib.nvmlDeviceGetName(h)) or "N/A",
                    minor=int(lib.nvmlDeviceGetMinorNumber(h)),
                    memory_mib=int(lib.nvmlDeviceGetMemoryInfo(h).total) // MIB,
                    pci_bus_id=_text(lib.nvmlDeviceGetPciInfo(h).busId),
                    driver_version=driver,
                    cuda_version=f"{cuda // 1000}.{cuda % 1000 // 10}",
                    compute_capability=f"{major}.{minor_cc}",
                    power_limit_w=int(lib.nvmlDeviceGetPowerManagementLimit(h)) // 1000,
                    nvml_index=i,
                )
                migs = mig_devices(lib, h, gpu)
                gpus.extend([gpu] if migs is None else migs)
            return gpus, ""
        except Exception as err:  # noqa: BLE001
            return [], f"NVML failed: {err}"


def mig_mode(nvml: Any, handle: Any) -> bool | None:
    """Whether MIG mode is on now (not merely pending a GPU reset); None where the GPU or this
    pynvml cannot say (NotSupported: a GPU without MIG)."""
    mode = _ask(nvml, "nvmlDeviceGetMigMode", handle)
    return None if mode is None else mode[0] == nvml.NVML_DEVICE_MIG_ENABLE


def mig_devices(nvml: Any, handle: Any, parent: Gpu) -> list[Gpu] | None:
    """The MIG devices of GPU `parent`, or None when it is not in MIG mode (then it is offered
    whole). A GPU in MIG mode without instances has none to offer: its own node runs no CUDA
    work. A MIG device whose figures NVML will not give is left out, not guessed."""
    if not mig_mode(nvml, handle):
        return None
    count = _ask(nvml, "nvmlDeviceGetMaxMigDeviceCount", handle)
    out = []
    for j in range(int(count or 0)):
        try:
            m = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)
            memory_mib = int(nvml.nvmlDeviceGetMemoryInfo(m).total) // MIB
            gi = int(nvml.nvmlDeviceGetGpuInstanceId(m))
            ci = int(nvml.nvmlDeviceGetComputeInstanceId(m))
            uuid = _text(nvml.nvmlDeviceGetUUID(m))
        except Exception:  # noqa: BLE001, S112 - NVML_ERROR_NOT_FOUND: an empty place
            continue
        attrs = _ask(nvml, "nvmlDeviceGetAttributes", m)
        gpu_slices = None if attrs is None else int(attrs.gpuInstanceSliceCount)
        compute_slices = None if attrs is None else int(attrs.computeInstanceSliceCount)
        profile = profile_name(gpu_slices, compute_slices, memory_mib, parent.memory_mib)
        out.append(
            parent._replace(
                uuid=uuid,
                name=f"{parent.name} MIG {profile}",
                memory_mib=memory_mib,
                mig=Mig(parent.uuid, gi, ci, j, profile, gpu_slices, compute_slices),
            )
        )
    return out


def profile_name(
    gpu_slices: int | None, compute_slices: int | None, memory_mib: int, parent_mib: int
) -> str:
    """A MIG profile's name as nvidia-smi gives it: compute slices, then memory in GB, where
    the memory is the instance's share of the GPU rounded up to eighths, times the GPU's
    memory in whole GB (so 9.75 GiB of an 80 GB H100 is "10gb", 16.5 GiB of a 141 GB H200
    "18gb"). Without slice counts, the memory alone ("10gb")."""
    if parent_mib > 0:
        eighths = -(-8 * memory_mib // parent_mib)
        gb = (eighths * -(-parent_mib // 1024) * 2 + 8) // 16  # halves rounded up
    else:
        gb = -(-memory_mib // 1024)
    name = f"{gb}gb" if gpu_slices is None else f"{gpu_slices}g.{gb}gb"
    if compute_slices is not None and compute_slices != gpu_slices:
        name = f"{compute_slices}c.{name}"
    return name


class Telemetry(NamedTuple):
    """One GPU's figures at one moment; None where NVML could not give that figure (a query the
    GPU does not support, such as ECC counts on a GPU without ECC, or one that failed)."""

    gpu_utilization_pct: int | None = None
    memory_utilization_pct: int | None = None
    memory_used_mib: int | None = None
    memory_total_mib: int | None = None
    temperature_c: int | None = None
    power_w: int | None = None
    power_limit_w: int | None = None
    ecc_single_bit: int | None = None
    ecc_double_bit: int | None = None
    bar1_used_mib: int | None = None
    bar1_total_mib: int | None = None


def telemetry(nvml: Any, uuids: Iterable[str]) -> dict[str, Telemetry]:
    """The figures of GPUs `uuids` through an initialised NVML (see `opened`). A GPU NVML no
    longer knows is left out (the next fingerprint says it is gone); a query that fails leaves
    out only its own figures. A MIG device ("MIG-..." UUID) has its memory only: NVML gives
    no utilization per MIG device (that takes DCGM's profiling counters), and temperature,
    power, BAR1 and ECC belong to the whole GPU, shared by its instances."""
    out: dict[str, Telemetry] = {}
    for uuid in uuids:
        try:
            h = nvml.nvmlDeviceGetHandleByUUID(uuid)
        except Exception:  # noqa: BLE001, S112 - gone since the fingerprint
            continue
        if uuid.startswith("MIG-"):
            memory = _ask(nvml, "nvmlDeviceGetMemoryInfo", h)
            out[uuid] = Telemetry(
                memory_used_mib=None if memory is None else int(memory.used) // MIB,
                memory_total_mib=None if memory is None else int(memory.total) // MIB,
            )
            continue
        util = _ask(nvml, "nvmlDeviceGetUtilizationRates", h)
        memory = _ask(nvml, "nvmlDeviceGetMemoryInfo", h)
        power_mw = _ask(nvml, "nvmlDeviceGetPowerUsage", h)
        limit_mw = _ask(nvml, "nvmlDeviceGetEnforcedPowerLimit", h)
        bar1 = _ask(nvml, "nvmlDeviceGetBAR1MemoryInfo", h)
        # Volatile counts: since the driver last loaded, as nvidia-smi shows them first.
        ecc = [
            _ask(nvml, "nvmlDeviceGetTotalEccErrors", h, kind, nvml.NVML_VOLATILE_ECC)
            for kind in (
                nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,  # single bit
                nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,  # double bit
            )
        ]
        out[uuid] = Telemetry(
            gpu_utilization_pct=None if util is None else int(util.gpu),
            memory_utilization_pct=None if util is None else int(util.memory),
            memory_used_mib=None if memory is None else int(memory.used) // MIB,
            memory_total_mib=None if memory is None else int(memory.total) // MIB,
            temperature_c=_int(
                _ask(nvml, "nvmlDeviceGetTemperature", h, nvml.NVML_TEMPERATURE_GPU)
            ),
            power_w=_watts(power_mw),
            power_limit_w=_watts(limit_mw),
            ecc_single_bit=_int(ecc[0]),
            ecc_double_bit=_int(ecc[1]),
            bar1_used_mib=None if bar1 is None else int(bar1.bar1Used) // MIB,
            bar1_total_mib=None if bar1 is None else int(bar1.bar1Total) // MIB,
        )
    return out


def _ask(nvml: Any, function: str, *args: Any) -> Any:
    """One NVML query's answer, or None when it raises (NVMLError_NotSupported and the like, or
    a function this pynvml lacks)."""
    try:
        return getattr(nvml, function)(*args)
    except Exception:  # noqa: BLE001
        return None


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _watts(milliwatts: Any) -> int | None:
    """NVML's milliwatts as whole watts, halves rounded up."""
    return None if milliwatts is None else (int(milliwatts) + 500) // 1000


def driver_attributes(gpus: list[Gpu]) -> dict[str, int | str]:
    """The task driver's `driver.pyhpc.gpu.*` node attributes, for jobspec constraints such as
    `${attr.driver.pyhpc.gpu.count} > 0` (a count of 0 on a node without GPUs or NVML)."""
    attrs: dict[str, int | str] = {"driver.pyhpc.gpu.count": len(gpus)}
    if gpus:
        attrs.update(
            {
                "driver.pyhpc.gpu.model": ",".join(sorted({g.name for g in gpus})),
                "driver.pyhpc.gpu.memory_mib": min(g.memory_mib for g in gpus),
                "driver.pyhpc.gpu.driver_version": gpus[0].driver_version,
                "driver.pyhpc.gpu.cuda_version": gpus[0].cuda_version,
                "driver.pyhpc.gpu.compute_capability": min(g.compute_capability for g in gpus),
            }
        )
    return attrs


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def offered(gpus: list[Gpu], ignored: tuple[str, ...] = ()) -> list[Gpu]:
    """The devices offered to jobs: those not ignored, by their UUID or by their parent's (a
    GPU ignored in `ignored_gpu_ids` is not offered in slices either)."""
    return [
        g
        for g in gpus
        if g.uuid not in ignored and (g.mig is None or g.mig.parent_uuid not in ignored)
    ]


def groups(gpus: list[Gpu], ignored: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Device groups (vendor nvidia, type gpu, one per model, and one per model and MIG
    profile: "NVIDIA A100-SXM4-80GB MIG 1g.10gb") with their instances by UUID. A MIG device
    is still of type gpu, so `device "nvidia/gpu"` takes either, and a job that wants one
    kind names it or constrains on the `mig_profile` attribute."""
    by_name: dict[str, list[Gpu]] = {}
    for gpu in offered(gpus, ignored):
        by_name.setdefault(gpu.name, []).append(gpu)
    return [
        {
            "vendor": "nvidia",
            "type": "gpu",
            "name": name,
            "devices": [(g.uuid, g.pci_bus_id) for g in members],
            "attributes": _attributes(members[0]),
        }
        for name, members in sorted(by_name.items())
    ]


def _attributes(gpu: Gpu) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "memory": (gpu.memory_mib, "MiB"),
        "driver_version": gpu.driver_version,
        "cuda_version": gpu.cuda_version,
        "compute_capability": gpu.compute_capability,
    }
    if gpu.mig is None:
        # A MIG device draws from its parent's power limit, shared: not its own figure.
        attrs["power"] = (gpu.power_limit_w, "W")
        return attrs
    attrs["mig_profile"] = gpu.mig.profile
    attrs["model"] = gpu.name.partition(" MIG ")[0]
    if gpu.mig.gpu_slices is not None:
        attrs["gpu_instance_slices"] = (gpu.mig.gpu_slices, "")
    if gpu.mig.compute_slices is not None:
        attrs["compute_instance_slices"] = (gpu.mig.compute_slices, "")
    return attrs


def host_libraries(
    ldconfig_output: str, lib_dirs: tuple[str, ...] = (), listdir: Any = None
) -> list[str]:
    """The driver's user-space libraries by their versioned names (libcuda.so.1, not the
    build-time libcuda.so), one file per name: from `ldconfig -p` (the host's linker cache,
    in the loader's order) and from `lib_dirs`, the directories the host's loader is told to
    search (LD_LIBRARY_PATH: drivers installed outside the cache, as under
    /usr/local/nvidia/lib64, are found there, as NVML was)."""
    wanted = re.compile("(?:" + "|".join(LIBRARY_PATTERNS) + r")(?:\.\d+)+")
    by_name: dict[str, str] = {}
    for m in re.finditer(r"^\s*(\S+) \(([^)]*)\) => (\S+)$", ldconfig_output, re.MULTILINE):
        if wanted.fullmatch(m.group(1)) and ("x86-64" in m.group(2) or "AArch64" in m.group(2)):
            by_name.setdefault(m.group(1), m.group(3))
    for directory in lib_dirs:
        try:
            entries = sorted((listdir or os.listdir)(directory))
        except OSError:
            continue
        for entry in entries:
            if wanted.fullmatch(entry):
                by_name.setdefault(entry, os.path.join(directory, entry))
    # Per library, the name with the shortest version: the soname (libcuda.so.1 rather than
    # libcuda.so.580.159.04, which is the same file); libnvidia-gpucomp's soname is its full
    # version, so that one is kept.
    chosen: dict[str, str] = {}
    for name in sorted(by_name, key=lambda n: (n.count("."), n)):
        chosen.setdefault(name[: name.index(".so") + 3], by_name[name])
    return sorted(chosen.values())


_CACHE_MAGIC = b"glibc-ld.so.cache1.1"
_ARCH = {0x0300: "x86-64", 0x0A00: "AArch64"}


def linker_cache(path: str = "/etc/ld.so.cache") -> str:
    """The host's linker cache in `ldconfig -p`'s line format, read from the cache file (glibc's
    format since 2.32: a 48-byte header, 24-byte entries whose name and path are offsets from
    the header). Reading it takes well under a millisecond where running ldconfig, a shell
    wrapper on some distributions, takes several; ldconfig is the fallback for other formats."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        start = data.find(_CACHE_MAGIC)
        if start < 0:
            raise ValueError("no glibc 1.1 cache")
        (count,) = struct.unpack_from("<I", data, start + 20)
        lines = []
        for i in range(count):
            flags, key, value = struct.unpack_from("<iII", data, start + 48 + 24 * i)
            arch = _ARCH.get(flags & 0xFF00)
            if arch:
                name, target = (
                    data[start + o : data.index(b"\0", start + o)].decode() for o in (key, value)
                )
                lines.append(f"\t{name} (libc6,{arch}) => {target}")
        return "\n".join(lines)
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        import subprocess

        return subprocess.run(
            ["/sbin/ldconfig", "-p"], capture_output=True, text=True, check=False
        ).stdout


def _elf(path: str) -> bool:
    """An ELF program: a wrapper script (some hosts put one in /usr/bin) cannot run in an image
    without its interpreter, so the real program is looked for further along the path."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def from_proc(root: str = "/proc/driver/nvidia/gpus") -> list[Gpu]:
    """The GPUs as the kernel driver lists them (UUID, minor number, bus, model), in bus
    order as NVML numbers them: enough for a reservation, in about a millisecond where
    NVML's start takes 80 ms or more. Empty when the driver offers no such listing."""
    gpus = []
    try:
        buses = sorted(os.listdir(root))
    except OSError:
        return []
    for index, bus in enumerate(buses):
        try:
            with open(os.path.join(root, bus, "information")) as f:
                info = dict(
                    (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in f) if v
                )
            gpus.append(
                Gpu(
                    uuid=info["GPU UUID"],
                    name=info.get("Model", "N/A"),
                    minor=int(info["Device Minor"]),
                    memory_mib=0,
                    pci_bus_id=info.get("Bus Location", bus),
                    driver_version="",
                    cuda_version="",
                    compute_capability="",
                    power_limit_w=0,
                    nvml_index=index,
                )
            )
        except (OSError, KeyError, ValueError):
            return []
    return gpus


def loader_dirs(environ: Any = os.environ) -> tuple[str, ...]:
    """The absolute directories in this process's LD_LIBRARY_PATH."""
    return tuple(d for d in environ.get("LD_LIBRARY_PATH", "").split(":") if d.startswith("/"))


def reserved(gpus: list[Gpu], ids: list[str]) -> list[Gpu]:
    """The devices `ids` names, in its order; KeyError names unknown ids."""
    known = {g.uuid: g for g in gpus}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise KeyError(f"unknown device IDs: {', '.join(unknown)}")
    return [known[i] for i in ids]


def mig_nodes(
    gpu: Gpu, caps_proc: str = CAPS_PROC, caps_dev: str = CAPS_DEV
) -> list[tuple[str, str]]:
    """The capability device nodes a MIG device needs beside its parent's /dev/nvidiaN: the one
    granting its GPU instance and the one granting its compute instance. The driver lists each
    capability's node minor in an `access` file ("DeviceFileMinor: 12") under
    capabilities/gpu<parent minor>/mig/gi<id>[/ci<id>]; the node is nvidia-caps/nvidia-cap<minor>.
    Each node with the access file it came from; Unavailable names a file that cannot be read
    or says no minor."""
    assert gpu.mig is not None
    gi_dir = os.path.join(caps_proc, f"gpu{gpu.minor}", "mig", f"gi{gpu.mig.gpu_instance}")
    nodes: list[tuple[str, str]] = []
    for access in (
        os.path.join(gi_dir, "access"),
        os.path.join(gi_dir, f"ci{gpu.mig.compute_instance}", "access"),
    ):
        try:
            with open(access) as f:
                text = f.read()
        except OSError as err:
            raise Unavailable(f"MIG device {gpu.uuid}: cannot read {access}: {err}") from err
        m = re.search(r"^DeviceFileMinor:\s*(\d+)\s*$", text, re.MULTILINE)
        if not m:
            raise Unavailable(f"MIG device {gpu.uuid}: {access} names no DeviceFileMinor")
        nodes.append((os.path.join(caps_dev, f"nvidia-cap{m.group(1)}"), access))
    return nodes


def reservation(
    gpus: list[Gpu],
    ids: list[str],
    ldconfig_output: str | None = None,
    exists: Any = os.path.exists,
    lib_dirs: tuple[str, ...] | None = None,
    tool_dirs: tuple[str, ...] | None = None,
    is_binary: Any = None,
    caps_proc: str = CAPS_PROC,
    caps_dev: str = CAPS_DEV,
) -> dict[str, Any]:
    """What a task given devices `ids` needs; KeyError names unknown ids, Unavailable a MIG
    device whose capability nodes cannot be found."""
    nodes: list[str] = []
    for gpu in reserved(gpus, ids):
        wanted = [f"/dev/nvidia{gpu.minor}"]
        if gpu.mig is not None:
            for node, access in mig_nodes(gpu, caps_proc, caps_dev):
                if not exists(node):
                    # Made on first use by the driver's helper; a task cannot make it itself.
                    raise Unavailable(
                        f"MIG device {gpu.uuid}: no device node {node} (as root: "
                        f"nvidia-modprobe -f {access})"
                    )
                wanted.append(node)
        nodes += [n for n in wanted if n not in nodes]  # two slices share one parent node
    nodes += [n for n in CONTROL_NODES if exists(n)]
    if ldconfig_output is None:
        ldconfig_output = linker_cache()
    libraries = host_libraries(ldconfig_output, lib_dirs if lib_dirs is not None else loader_dirs())
    mounts = [(lib, f"{TASK_LIB_DIR}/{os.path.basename(lib)}") for lib in libraries]
    is_binary = is_binary or _elf
    if tool_dirs is None:
        path = os.environ.get("PATH", "").split(":")
        tool_dirs = ("/usr/bin", "/usr/local/bin", *(d for d in path if d.startswith("/")))
    for tool in TOOLS:
        for directory in tool_dirs:
            if is_binary(f"{directory}/{tool}"):
                mounts.append((f"{directory}/{tool}", f"{TASK_BIN_DIR}/{tool}"))
                break
    visible = ",".join(ids)
    return {
        "envs": {
            "NVIDIA_VISIBLE_DEVICES": visible,
            "CUDA_VISIBLE_DEVICES": visible,
            "LD_LIBRARY_PATH": TASK_LIB_DIR,
        },
        "devices": nodes,
        "mounts": mounts,
    }
