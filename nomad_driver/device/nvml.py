"""What the node's GPUs are (through NVML) and what a task given some of them needs: device
nodes, the host driver's user-space libraries and tools, and the environment. Pure mappings,
so they can be tested with recorded NVML answers; `opened`, `probe` and `telemetry` are the one
seam to NVML."""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

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


class Gpu(NamedTuple):
    uuid: str
    name: str
    minor: int
    memory_mib: int
    pci_bus_id: str
    driver_version: str
    cuda_version: str
    compute_capability: str
    power_limit_w: int


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
            gpus = []
            for i in range(lib.nvmlDeviceGetCount()):
                h = lib.nvmlDeviceGetHandleByIndex(i)
                major, minor_cc = lib.nvmlDeviceGetCudaComputeCapability(h)
                gpus.append(
                    Gpu(
                        uuid=_text(lib.nvmlDeviceGetUUID(h)),
                        name=_text(lib.nvmlDeviceGetName(h)) or "N/A",
                        minor=int(lib.nvmlDeviceGetMinorNumber(h)),
                        memory_mib=int(lib.nvmlDeviceGetMemoryInfo(h).total) // MIB,
                        pci_bus_id=_text(lib.nvmlDeviceGetPciInfo(h).busId),
                        driver_version=driver,
                        cuda_version=f"{cuda // 1000}.{cuda % 1000 // 10}",
                        compute_capability=f"{major}.{minor_cc}",
                        power_limit_w=int(lib.nvmlDeviceGetPowerManagementLimit(h)) // 1000,
                    )
                )
            return gpus, ""
        except Exception as err:  # noqa: BLE001
            return [], f"NVML failed: {err}"


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
    out only its own figures."""
    out: dict[str, Telemetry] = {}
    for uuid in uuids:
        try:
            h = nvml.nvmlDeviceGetHandleByUUID(uuid)
        except Exception:  # noqa: BLE001, S112 - gone since the fingerprint
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


def groups(gpus: list[Gpu], ignored: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Device groups (vendor nvidia, type gpu, one per model) with their instances by UUID."""
    by_name: dict[str, list[Gpu]] = {}
    for gpu in gpus:
        if gpu.uuid not in ignored:
            by_name.setdefault(gpu.name, []).append(gpu)
    out = []
    for name, members in sorted(by_name.items()):
        first = members[0]
        out.append(
            {
                "vendor": "nvidia",
                "type": "gpu",
                "name": name,
                "devices": [(g.uuid, g.pci_bus_id) for g in members],
                "attributes": {
                    "memory": (first.memory_mib, "MiB"),
                    "power": (first.power_limit_w, "W"),
                    "driver_version": first.driver_version,
                    "cuda_version": first.cuda_version,
                    "compute_capability": first.compute_capability,
                },
            }
        )
    return out


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
    for bus in buses:
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
                )
            )
        except (OSError, KeyError, ValueError):
            return []
    return gpus


def loader_dirs(environ: Any = os.environ) -> tuple[str, ...]:
    """The absolute directories in this process's LD_LIBRARY_PATH."""
    return tuple(d for d in environ.get("LD_LIBRARY_PATH", "").split(":") if d.startswith("/"))


def reservation(
    gpus: list[Gpu],
    ids: list[str],
    ldconfig_output: str | None = None,
    exists: Any = os.path.exists,
    lib_dirs: tuple[str, ...] | None = None,
    tool_dirs: tuple[str, ...] | None = None,
    is_binary: Any = None,
) -> dict[str, Any]:
    """What a task given GPUs `ids` needs; KeyError names unknown ids."""
    known = {g.uuid: g for g in gpus}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise KeyError(f"unknown device IDs: {', '.join(unknown)}")
    nodes = [f"/dev/nvidia{known[i].minor}" for i in ids]
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
