"""From NVML answers to Nomad's device messages, and from a reservation to what the task gets.
The NVML answers here are recorded test data (an 8-GPU H100 node), not a stand-in for a GPU
check: scripts/gpu-check.sh runs on a real GPU. The figures the Stats stream reports come from
answers in the same place: the second H100 cannot say its power draw, the L4 has no ECC. MIG
answers are recorded beside them (tests/device/test_mig.py): the H100s are in MIG mode off (the
second with MIG pending a reset), the L4 cannot do MIG."""

from __future__ import annotations

import functools
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nomad_driver.device import nvml
from nomad_driver.device.service import device_stats, fingerprint_message, stats_message

MIB = 1 << 20
RECORDED: list[dict[str, Any]] = [
    {
        "uuid": f"GPU-6f1c7a0e-00{i}",
        "name": "NVIDIA H100 80GB HBM3",
        "minor": i,
        "total": 85520809984,
        "bus": f"00000000:{0x18 + i:02X}:00.0",
        "used": (1 + 4095 * i) * MIB + 123,
        "util": SimpleNamespace(gpu=87 + i, memory=41),
        "temp": 54,
        "power_mw": None if i else 312_499,  # the second H100's power query fails
        "limit_mw": 700_000,
        "ecc": {"corrected": 3, "uncorrected": 0},
        "bar1": SimpleNamespace(bar1Used=5 * MIB, bar1Total=131072 * MIB),
        "mig": {"mode": ["mig-disabled", "mig-enabled" if i else "mig-disabled"], "devices": {}},
    }
    for i in range(2)
] + [
    {
        "uuid": "GPU-aa11",
        "name": "NVIDIA L4",
        "minor": 2,
        "total": 24152899584,
        "bus": "00000000:9A:00.0",
        "used": 512 * MIB,
        "util": SimpleNamespace(gpu=0, memory=0),
        "temp": 38,
        "power_mw": 27_500,
        "limit_mw": 72_000,
        "ecc": None,  # ECC off: NVML says not supported
        "bar1": SimpleNamespace(bar1Used=2 * MIB, bar1Total=32768 * MIB),
    }
]
LDCONFIG = """\t3 libs found in cache `/etc/ld.so.cache'
\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1
\tlibnvidia-ml.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1
\tlibcuda.so.1 (libc6) => /usr/lib/i386-linux-gnu/libcuda.so.1
\tlibz.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libz.so.1
"""


class NotSupported(Exception):
    """As pynvml's NVMLError_NotSupported."""


def _by_uuid(handles: list[dict[str, Any]], uuid: str) -> dict[str, Any]:
    for h in handles:
        if h["uuid"] == uuid:
            return h
    raise LookupError(f"NVML_ERROR_NOT_FOUND: {uuid}")


def _mig(h: dict[str, Any]) -> dict[str, Any]:
    if h.get("mig") is None:
        raise NotSupported("mig")
    return dict(h["mig"])


def _mig_handle(h: dict[str, Any], j: int) -> dict[str, Any]:
    if j not in _mig(h)["devices"]:
        raise LookupError(f"NVML_ERROR_NOT_FOUND: MIG device {j}")
    return dict(_mig(h)["devices"][j])


def _instance(key: str) -> Any:
    def query(h: dict[str, Any]) -> int:
        if key not in h:  # a whole GPU: NVML says invalid argument
            raise NotSupported(key)
        return int(h[key])

    return query


def _answer(key: str, *expected: str) -> Any:
    def query(h: dict[str, Any], *args: str) -> Any:
        if h[key] is None or args != expected[: len(args)]:
            raise NotSupported(key)
        return h[key]

    return query


def _ecc(h: dict[str, Any], kind: str, counter: str) -> int:
    if h["ecc"] is None or counter != "volatile":
        raise NotSupported("ecc")
    return int(h["ecc"][kind])


def recorded_nvml(recorded: list[dict[str, Any]] | None = None) -> Any:
    """A pynvml stand-in answering from `recorded` (RECORDED unless given); `calls` records
    each init and shutdown. Its constants are names, not pynvml's numbers, so a query made
    with the wrong one fails. A GPU's "mig" is None where it cannot do MIG, else its mode
    (current, pending) and its MIG devices by index (a missing index is an empty place)."""
    recorded = RECORDED if recorded is None else recorded
    calls: list[str] = []
    migs: list[dict[str, Any]] = [
        m for h in recorded for m in (h.get("mig") or {"devices": {}})["devices"].values()
    ]
    handle = recorded.__getitem__
    by_uuid = functools.partial(_by_uuid, [*recorded, *migs])
    return SimpleNamespace(
        calls=calls,
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlSystemGetDriverVersion=lambda: b"550.54.15",
        nvmlSystemGetCudaDriverVersion=lambda: 12040,
        nvmlDeviceGetCount=lambda: len(recorded),
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetCudaComputeCapability=lambda h: (9, 0) if "H100" in h["name"] else (8, 9),
        nvmlDeviceGetUUID=lambda h: h["uuid"].encode(),
        nvmlDeviceGetName=lambda h: h["name"],
        nvmlDeviceGetMinorNumber=lambda h: h["minor"],
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=h["total"], used=h["used"]),
        nvmlDeviceGetPciInfo=lambda h: SimpleNamespace(busId=h["bus"].encode()),
        nvmlDeviceGetPowerManagementLimit=lambda h: 700000,
        nvmlDeviceGetHandleByUUID=by_uuid,
        nvmlDeviceGetUtilizationRates=_answer("util"),
        nvmlDeviceGetTemperature=_answer("temp", "gpu"),
        nvmlDeviceGetPowerUsage=_answer("power_mw"),
        nvmlDeviceGetEnforcedPowerLimit=_answer("limit_mw"),
        nvmlDeviceGetTotalEccErrors=_ecc,
        nvmlDeviceGetBAR1MemoryInfo=_answer("bar1"),
        nvmlDeviceGetMigMode=lambda h: _mig(h)["mode"],
        nvmlDeviceGetMaxMigDeviceCount=lambda h: 7 if h.get("mig") else 0,
        nvmlDeviceGetMigDeviceHandleByIndex=_mig_handle,
        nvmlDeviceGetGpuInstanceId=_instance("gi"),
        nvmlDeviceGetComputeInstanceId=_instance("ci"),
        nvmlDeviceGetAttributes=_answer("attrs"),
        NVML_DEVICE_MIG_ENABLE="mig-enabled",
        NVML_TEMPERATURE_GPU="gpu",
        NVML_MEMORY_ERROR_TYPE_CORRECTED="corrected",
        NVML_MEMORY_ERROR_TYPE_UNCORRECTED="uncorrected",
        NVML_VOLATILE_ECC="volatile",
    )


def shown(value: Any) -> tuple[int, int | None, str]:
    """A StatValue as (number, of, unit)."""
    of = value.int_denominator_val.value if value.HasField("int_denominator_val") else None
    return value.int_numerator_val.value, of, value.unit


def test_nvml_answers_become_one_group_per_model_with_uuids_and_attributes() -> None:
    gpus, why = nvml.probe(recorded_nvml())
    assert why == "" and len(gpus) == 3
    message = fingerprint_message(gpus, ignored=("GPU-aa11",))
    [group] = message.device_group  # the ignored L4 is not offered
    assert (group.vendor, group.device_type, group.device_name) == (
        "nvidia",
        "gpu",
        "NVIDIA H100 80GB HBM3",
    )
    assert [d.ID for d in group.devices] == ["GPU-6f1c7a0e-000", "GPU-6f1c7a0e-001"]
    assert all(d.healthy for d in group.devices)
    assert group.devices[1].hw_locality.pci_bus_id == "00000000:19:00.0"
    assert (group.attributes["memory"].int_val, group.attributes["memory"].unit) == (81559, "MiB")
    assert group.attributes["cuda_version"].string_val == "12.4"
    assert group.attributes["compute_capability"].string_val == "9.0"
    assert group.attributes["driver_version"].string_val == "550.54.15"


def test_no_nvml_means_no_devices_and_a_reason() -> None:
    broken = SimpleNamespace(
        nvmlInit=lambda: (_ for _ in ()).throw(OSError("libnvidia-ml.so.1 not found"))
    )
    gpus, why = nvml.probe(broken)
    assert gpus == [] and "libnvidia-ml.so.1 not found" in why
    assert list(fingerprint_message([], ()).device_group) == []


def test_a_reservation_gives_only_its_gpus_nodes_libraries_and_consistent_env() -> None:
    gpus, _ = nvml.probe(recorded_nvml())
    present = {"/dev/nvidiactl", "/dev/nvidia-uvm", "/usr/bin/nvidia-smi"}
    res = nvml.reservation(
        gpus,
        ["GPU-6f1c7a0e-001"],
        LDCONFIG,
        exists=present.__contains__,
        lib_dirs=(),
        tool_dirs=("/usr/bin",),
        is_binary=present.__contains__,
    )
    assert res["devices"] == ["/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm"]
    assert (
        res["envs"]["NVIDIA_VISIBLE_DEVICES"]
        == res["envs"]["CUDA_VISIBLE_DEVICES"]
        == "GPU-6f1c7a0e-001"
    )
    assert "LD_PRELOAD" not in res["envs"]
    assert res["mounts"] == [
        ("/usr/lib/x86_64-linux-gnu/libcuda.so.1", "/usr/local/nvidia/lib64/libcuda.so.1"),
        (
            "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
            "/usr/local/nvidia/lib64/libnvidia-ml.so.1",
        ),
        ("/usr/bin/nvidia-smi", "/usr/local/nvidia/bin/nvidia-smi"),
    ]
    with pytest.raises(KeyError, match="unknown device IDs: GPU-nope"):
        nvml.reservation(gpus, ["GPU-nope"], LDCONFIG)


def test_a_driver_outside_the_linker_cache_is_found_where_the_loader_is_told_to_look() -> None:
    # Hosts that install the driver under /usr/local/nvidia (as cloud GPU images do) give
    # the loader LD_LIBRARY_PATH instead of a cache entry; nvidia-smi is then on PATH only.
    gpus, _ = nvml.probe(recorded_nvml())
    listing = {
        "/usr/local/nvidia/lib64": [
            "libcuda.so",
            "libcuda.so.1",
            "libcuda.so.580.159.04",
            "libnvidia-gpucomp.so.580.159.04",
            "libnvidia-ml.so.1",
            "libnvidia-ml.so.1",
            "libEGL.so.1",
            "libnvidia-ptxjitcompiler.so.1",
        ]
    }

    def listdir(d: str) -> list[str]:
        if d not in listing:
            raise FileNotFoundError(d)
        return listing[d]

    found = nvml.host_libraries("", ("/usr/local/nvidia/lib64", "/nowhere"), listdir)
    assert found == [
        "/usr/local/nvidia/lib64/libcuda.so.1",
        "/usr/local/nvidia/lib64/libnvidia-gpucomp.so.580.159.04",
        "/usr/local/nvidia/lib64/libnvidia-ml.so.1",
        "/usr/local/nvidia/lib64/libnvidia-ptxjitcompiler.so.1",
    ]
    # A library the cache already names is not mounted twice from another directory.
    assert nvml.host_libraries(LDCONFIG, ("/usr/local/nvidia/lib64",), listdir) == sorted(
        [
            "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
            "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
            "/usr/local/nvidia/lib64/libnvidia-gpucomp.so.580.159.04",
            "/usr/local/nvidia/lib64/libnvidia-ptxjitcompiler.so.1",
        ]
    )
    assert nvml.loader_dirs({"LD_LIBRARY_PATH": "/usr/local/nvidia/lib64::lib:/opt/x"}) == (
        "/usr/local/nvidia/lib64",
        "/opt/x",
    )
    res = nvml.reservation(
        gpus,
        ["GPU-6f1c7a0e-001"],
        "",
        exists=lambda path: True,
        lib_dirs=(),
        tool_dirs=("/usr/bin", "/usr/local/nvidia/bin"),
        # /usr/bin/nvidia-smi is a wrapper script there, which an image could not run.
        is_binary={"/usr/local/nvidia/bin/nvidia-smi"}.__contains__,
    )
    assert ("/usr/local/nvidia/bin/nvidia-smi", "/usr/local/nvidia/bin/nvidia-smi") in res["mounts"]


def test_the_kernel_drivers_listing_gives_uuid_minor_and_bus(tmp_path: Path) -> None:
    for bus, minor, uuid in (("0000:41:00.0", 1, "GPU-b"), ("0000:00:06.0", 0, "GPU-a")):
        (tmp_path / bus).mkdir()
        (tmp_path / bus / "information").write_text(
            f"Model: \t\t NVIDIA H200\nIRQ:   \t\t 37\nGPU UUID: \t {uuid}\n"
            f"Video BIOS: \t 96.00.af.00.01\nBus Location: \t {bus}\n"
            f"Device Minor: \t {minor}\nGPU Excluded:\t No\n"
        )
    gpus = nvml.from_proc(str(tmp_path))
    assert [(g.uuid, g.minor, g.pci_bus_id, g.name) for g in gpus] == [
        ("GPU-a", 0, "0000:00:06.0", "NVIDIA H200"),
        ("GPU-b", 1, "0000:41:00.0", "NVIDIA H200"),
    ]
    assert nvml.reservation(gpus, ["GPU-b"], "", exists=lambda p: False)["devices"] == [
        "/dev/nvidia1"
    ]
    assert nvml.from_proc(str(tmp_path / "absent")) == []
    (tmp_path / "0000:00:06.0" / "information").write_text("garbled\n")
    assert nvml.from_proc(str(tmp_path)) == []


def test_driver_attributes_summarise_the_gpus_and_say_zero_without_them() -> None:
    gpus, _ = nvml.probe(recorded_nvml())
    assert nvml.driver_attributes(gpus) == {
        "driver.pyhpc.gpu.count": 3,
        "driver.pyhpc.gpu.model": "NVIDIA H100 80GB HBM3,NVIDIA L4",
        "driver.pyhpc.gpu.memory_mib": 23034,
        "driver.pyhpc.gpu.driver_version": "550.54.15",
        "driver.pyhpc.gpu.cuda_version": "12.4",
        "driver.pyhpc.gpu.compute_capability": "8.9",
    }
    assert nvml.driver_attributes([]) == {"driver.pyhpc.gpu.count": 0}


def test_the_linker_cache_is_read_as_ldconfig_prints_it(tmp_path: Path) -> None:
    # This machine's own cache against its own ldconfig, 64-bit entries in the same order.
    printed = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True).stdout
    wanted = [line for line in printed.splitlines() if "x86-64" in line or "AArch64" in line]
    assert wanted and nvml.linker_cache().splitlines() == wanted
    # A cache written here: one x86-64 entry, one 32-bit entry (left out).
    strings = b"libcuda.so.1\0/opt/nv/libcuda.so.1\0libz.so.1\0/lib32/libz.so.1\0"
    head = 48 + 2 * 24
    entries = struct.pack("<iIIIQ", 0x0303, head, head + 13, 0, 0)
    entries += struct.pack("<iIIIQ", 0x0003, head + 34, head + 44, 0, 0)
    header = b"glibc-ld.so.cache1.1" + struct.pack("<IIB3xI12x", 2, len(strings), 0, 0)
    cache = tmp_path / "ld.so.cache"
    cache.write_bytes(header + entries + strings)
    assert nvml.linker_cache(str(cache)) == "\tlibcuda.so.1 (libc6,x86-64) => /opt/nv/libcuda.so.1"
    # Not a cache glibc writes: ldconfig is asked instead.
    cache.write_bytes(b"ld.so-1.7.0" + bytes(40))
    assert "\tlibc.so.6 (libc6,x86-64" in nvml.linker_cache(str(cache))


def test_stats_report_each_gpus_figures_under_nomads_names_and_units() -> None:
    fake = recorded_nvml()
    gpus, _ = nvml.probe(fake)
    ignored = ("GPU-6f1c7a0e-000",)
    figures = nvml.telemetry(fake, [g.uuid for g in gpus if g.uuid not in ignored])
    message = stats_message(gpus, ignored, figures, when_ns=1_700_000_000_250_000_000)
    by_name = {g.name: g for g in message.groups}
    assert sorted(by_name) == ["NVIDIA H100 80GB HBM3", "NVIDIA L4"]
    assert {(g.vendor, g.type) for g in message.groups} == {("nvidia", "gpu")}
    h100 = by_name["NVIDIA H100 80GB HBM3"].instance_stats
    assert list(h100) == ["GPU-6f1c7a0e-001"]  # the ignored H100 is not reported
    l4 = by_name["NVIDIA L4"].instance_stats["GPU-aa11"]
    assert {k: shown(v) for k, v in h100["GPU-6f1c7a0e-001"].stats.attributes.items()} == {
        "GPU utilization": (88, None, "%"),
        "Memory utilization": (41, None, "%"),
        "Memory state": (4096, 81559, "MiB"),
        "Temperature": (54, None, "C"),
        # no "Power usage": its query raised, and nothing else went with it
        "BAR1 buffer state": (5, 131072, "MiB"),
        "ECC single-bit errors": (3, None, "#"),
        "ECC double-bit errors": (0, None, "#"),
    }
    assert {k: shown(v) for k, v in l4.stats.attributes.items()} == {
        "GPU utilization": (0, None, "%"),
        "Memory utilization": (0, None, "%"),
        "Memory state": (512, 23034, "MiB"),
        "Temperature": (38, None, "C"),
        "Power usage": (28, 72, "W"),
        "BAR1 buffer state": (2, 32768, "MiB"),
        # no ECC figures: the L4 runs without ECC
    }
    assert shown(l4.summary) == (512, 23034, "MiB")
    assert l4.summary.desc == "Used / total memory"
    assert all(v.desc for v in l4.stats.attributes.values())
    assert (l4.timestamp.seconds, l4.timestamp.nanos) == (1_700_000_000, 250_000_000)


def test_a_failing_nvml_query_drops_only_its_own_figure() -> None:
    fake = recorded_nvml()
    figures = nvml.telemetry(fake, ["GPU-6f1c7a0e-001", "GPU-aa11", "GPU-gone"])
    assert "GPU-gone" not in figures  # unknown to NVML since the fingerprint
    assert figures["GPU-6f1c7a0e-001"] == nvml.Telemetry(
        gpu_utilization_pct=88,
        memory_utilization_pct=41,
        memory_used_mib=4096,
        memory_total_mib=81559,
        temperature_c=54,
        power_w=None,
        power_limit_w=700,
        ecc_single_bit=3,
        ecc_double_bit=0,
        bar1_used_mib=5,
        bar1_total_mib=131072,
    )
    assert (figures["GPU-aa11"].ecc_single_bit, figures["GPU-aa11"].ecc_double_bit) == (None, None)
    assert figures["GPU-aa11"].power_w == 28
    # A GPU that answers nothing but its handle (here: a pynvml without these functions) is
    # still reported, with its timestamp and no figures.
    mute = {
        k: v
        for k, v in vars(fake).items()
        if not k.startswith("nvmlDeviceGet") or k.endswith("ByUUID")
    }
    assert nvml.telemetry(SimpleNamespace(**mute), ["GPU-aa11"]) == {"GPU-aa11": nvml.Telemetry()}
    empty = device_stats(nvml.Telemetry(), when_ns=5)
    assert not empty.HasField("summary") and dict(empty.stats.attributes) == {}
    assert empty.timestamp.nanos == 5
    # A power limit without the draw says nothing; a draw without the limit is still a draw.
    assert "Power usage" not in device_stats(nvml.Telemetry(power_limit_w=700), 0).stats.attributes
    drawn = device_stats(nvml.Telemetry(power_w=90), 0).stats.attributes["Power usage"]
    assert shown(drawn) == (90, None, "W")


def test_nvml_is_started_once_and_shut_down_when_the_block_ends() -> None:
    fake = recorded_nvml()
    with nvml.opened(fake) as (lib, why):
        assert (lib, why) == (fake, "")
        for _ in range(3):
            nvml.telemetry(lib, ["GPU-aa11"])
        assert fake.calls == ["init"]
    assert fake.calls == ["init", "shutdown"]
    broken = SimpleNamespace(nvmlInit=lambda: (_ for _ in ()).throw(OSError("no driver")))
    with nvml.opened(broken) as (lib, why):
        assert (lib, why) == (None, "no driver")
