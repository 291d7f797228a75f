"""From NVML answers to Nomad's device messages, and from a reservation to what the task gets.
The NVML answers here are recorded test data (an 8-GPU H100 node), not a stand-in for a GPU
check: scripts/gpu-check.sh runs on a real GPU."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nomad_driver.device import nvml
from nomad_driver.device.service import fingerprint_message

RECORDED = [
    {
        "uuid": f"GPU-6f1c7a0e-00{i}",
        "name": "NVIDIA H100 80GB HBM3",
        "minor": i,
        "total": 85520809984,
        "bus": f"00000000:{0x18 + i:02X}:00.0",
    }
    for i in range(2)
] + [
    {
        "uuid": "GPU-aa11",
        "name": "NVIDIA L4",
        "minor": 2,
        "total": 24152899584,
        "bus": "00000000:9A:00.0",
    }
]
LDCONFIG = """\t3 libs found in cache `/etc/ld.so.cache'
\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1
\tlibnvidia-ml.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1
\tlibcuda.so.1 (libc6) => /usr/lib/i386-linux-gnu/libcuda.so.1
\tlibz.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libz.so.1
"""


def recorded_nvml() -> Any:
    def handle(i: int) -> dict[str, Any]:
        return RECORDED[i]

    return SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: b"550.54.15",
        nvmlSystemGetCudaDriverVersion=lambda: 12040,
        nvmlDeviceGetCount=lambda: len(RECORDED),
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetCudaComputeCapability=lambda h: (9, 0) if "H100" in h["name"] else (8, 9),
        nvmlDeviceGetUUID=lambda h: h["uuid"].encode(),
        nvmlDeviceGetName=lambda h: h["name"],
        nvmlDeviceGetMinorNumber=lambda h: h["minor"],
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=h["total"]),
        nvmlDeviceGetPciInfo=lambda h: SimpleNamespace(busId=h["bus"].encode()),
        nvmlDeviceGetPowerManagementLimit=lambda h: 700000,
    )


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
