"""MIG: a GPU in MIG mode is offered as its MIG devices, one group per profile, never whole;
reserving one gives its parent's node and its two capability nodes (found through the kernel
driver's capability files, here a copy under a temporary directory); its Stats are its memory.
The NVML answers are recorded as an A100 80GB in MIG mode with a 1g.10gb and a 3g.40gb
instance (and an empty place between them) would give them, beside a whole L4."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from nomad_driver.device import nvml
from nomad_driver.device.service import (
    DeviceConfig,
    DeviceService,
    fingerprint_message,
    stats_message,
)
from nomad_driver.proto import device_pb2
from tests.device.test_nvml import MIB, RECORDED, recorded_nvml, shown

A100 = "GPU-a100-0000"
SMALL = "MIG-5f0c4f4e-1g10"
LARGE = "MIG-9b2d77a1-3g40"


def instance(uuid: str, gi: int, slices: int, total_mib: int, used_mib: int) -> dict[str, Any]:
    return {
        "uuid": uuid,
        "gi": gi,
        "ci": 0,
        "total": total_mib * MIB,
        "used": used_mib * MIB,
        "util": None,  # NVML: not supported on a MIG device
        "attrs": SimpleNamespace(
            gpuInstanceSliceCount=slices, computeInstanceSliceCount=slices, memorySizeMB=total_mib
        ),
    }


MIG_RECORDED: list[dict[str, Any]] = [
    {
        "uuid": A100,
        "name": "NVIDIA A100-SXM4-80GB",
        "minor": 3,
        "total": 81920 * MIB,
        "bus": "00000000:07:00.0",
        "used": 0,
        "mig": {
            "mode": ["mig-enabled", "mig-enabled"],
            "devices": {
                0: instance(SMALL, gi=9, slices=1, total_mib=9984, used_mib=13),
                2: instance(LARGE, gi=2, slices=3, total_mib=40192, used_mib=1037),
            },
        },
    },
    RECORDED[2],  # the L4: no MIG
]


def mig_gpus() -> list[nvml.Gpu]:
    gpus, why = nvml.probe(recorded_nvml(MIG_RECORDED))
    assert why == ""
    return gpus


def test_a_mig_gpu_is_offered_as_its_instances_one_group_per_profile() -> None:
    gpus = mig_gpus()
    assert [g.uuid for g in gpus] == [SMALL, LARGE, "GPU-aa11"]  # never the A100 itself
    small = gpus[0]
    assert small.mig == nvml.Mig(A100, 9, 0, 0, "1g.10gb", 1, 1)
    assert (small.minor, small.pci_bus_id, small.nvml_index) == (3, "00000000:07:00.0", 0)
    assert gpus[1].mig is not None and gpus[1].mig.mig_index == 2
    groups = {g.device_name: g for g in fingerprint_message(gpus, ()).device_group}
    assert sorted(groups) == [
        "NVIDIA A100-SXM4-80GB MIG 1g.10gb",
        "NVIDIA A100-SXM4-80GB MIG 3g.40gb",
        "NVIDIA L4",
    ]
    one = groups["NVIDIA A100-SXM4-80GB MIG 1g.10gb"]
    assert (one.vendor, one.device_type) == ("nvidia", "gpu")
    assert [(d.ID, d.hw_locality.pci_bus_id) for d in one.devices] == [(SMALL, "00000000:07:00.0")]
    attrs = one.attributes
    assert (attrs["memory"].int_val, attrs["memory"].unit) == (9984, "MiB")
    assert attrs["mig_profile"].string_val == "1g.10gb"
    assert attrs["model"].string_val == "NVIDIA A100-SXM4-80GB"
    assert attrs["gpu_instance_slices"].int_val == 1
    assert attrs["compute_instance_slices"].int_val == 1
    assert "power" not in attrs  # the parent's limit, shared by its instances
    assert groups["NVIDIA A100-SXM4-80GB MIG 3g.40gb"].attributes["memory"].int_val == 40192
    assert "mig_profile" not in groups["NVIDIA L4"].attributes
    assert groups["NVIDIA L4"].attributes["power"].int_val == 700


def test_ignoring_a_mig_gpu_ignores_its_instances() -> None:
    gpus = mig_gpus()
    assert [g.device_name for g in fingerprint_message(gpus, (A100,)).device_group] == ["NVIDIA L4"]
    assert [g.uuid for g in nvml.offered(gpus, (SMALL,))] == [LARGE, "GPU-aa11"]


def test_gpus_without_mig_or_with_mig_only_pending_are_offered_whole() -> None:
    # The H100s are MIG-capable with MIG off (the second pending a reset); the L4 says
    # NotSupported: all three are offered whole, as before MIG was known.
    gpus, _ = nvml.probe(recorded_nvml())
    assert [(g.uuid, g.mig, g.nvml_index) for g in gpus] == [
        ("GPU-6f1c7a0e-000", None, 0),
        ("GPU-6f1c7a0e-001", None, 1),
        ("GPU-aa11", None, 2),
    ]
    # MIG on but no instance created: nothing to offer (its own node runs no CUDA work).
    empty = [{**MIG_RECORDED[0], "mig": {"mode": ["mig-enabled", "mig-enabled"], "devices": {}}}]
    assert nvml.probe(recorded_nvml(empty)) == ([], "")


def test_mig_profiles_are_named_as_nvidia_smi_names_them() -> None:
    cases = [
        ((1, 1, 9984, 81920), "1g.10gb"),  # A100 80GB
        ((3, 3, 40192, 81920), "3g.40gb"),
        ((7, 7, 81152, 81920), "7g.80gb"),
        ((1, 1, 4864, 40536), "1g.5gb"),  # A100 40GB
        ((3, 3, 19968, 40536), "3g.20gb"),
        ((1, 1, 16896, 143771), "1g.18gb"),  # H200 141GB
        ((2, 2, 33280, 143771), "2g.35gb"),
        ((4, 4, 66560, 143771), "4g.71gb"),
        ((7, 7, 142592, 143771), "7g.141gb"),
        ((3, 1, 40192, 81920), "1c.3g.40gb"),  # one compute slice of a 3-slice instance
        ((None, None, 9984, 81920), "10gb"),  # NVML gave no slice counts
        ((None, None, 9984, 0), "10gb"),  # nor the parent's memory
    ]
    assert [nvml.profile_name(*args) for args, _ in cases] == [name for _, name in cases]


def capabilities(root: Path, minors: dict[str, int]) -> tuple[str, str]:
    """A copy of /proc/driver/nvidia/capabilities and /dev/nvidia-caps for `minors`
    ({"gpu3/mig/gi9": 84, "gpu3/mig/gi9/ci0": 85}), the nodes as plain files."""
    proc, dev = root / "proc-capabilities", root / "dev-nvidia-caps"
    dev.mkdir(parents=True)
    for where, minor in minors.items():
        (proc / where).mkdir(parents=True, exist_ok=True)
        (proc / where / "access").write_text(
            f"DeviceFileMinor: {minor}\nDeviceFileMode: 292\nDeviceFileModify: 1\n"
        )
        (dev / f"nvidia-cap{minor}").touch()
    return str(proc), str(dev)


MINORS = {"gpu3/mig/gi9": 84, "gpu3/mig/gi9/ci0": 85, "gpu3/mig/gi2": 21, "gpu3/mig/gi2/ci0": 22}


def test_reserving_mig_devices_gives_the_parent_node_and_their_capability_nodes(
    tmp_path: Path,
) -> None:
    proc, dev = capabilities(tmp_path, MINORS)
    res = nvml.reservation(
        mig_gpus(),
        [SMALL, LARGE],
        "",
        exists=lambda p: p.startswith(dev) or p == "/dev/nvidiactl",
        lib_dirs=(),
        tool_dirs=(),
        caps_proc=proc,
        caps_dev=dev,
    )
    assert res["devices"] == [
        "/dev/nvidia3",  # once, though both instances live on it
        f"{dev}/nvidia-cap84",  # SMALL's GPU instance
        f"{dev}/nvidia-cap85",  # and its compute instance
        f"{dev}/nvidia-cap21",
        f"{dev}/nvidia-cap22",
        "/dev/nvidiactl",
    ]
    assert (
        res["envs"]["NVIDIA_VISIBLE_DEVICES"]
        == res["envs"]["CUDA_VISIBLE_DEVICES"]
        == (f"{SMALL},{LARGE}")
    )
    assert nvml.mig_nodes(mig_gpus()[0], proc, dev) == [
        (f"{dev}/nvidia-cap84", f"{proc}/gpu3/mig/gi9/access"),
        (f"{dev}/nvidia-cap85", f"{proc}/gpu3/mig/gi9/ci0/access"),
    ]


def test_a_mig_device_whose_capability_cannot_be_found_is_refused_naming_what_is_missing(
    tmp_path: Path,
) -> None:
    proc, dev = capabilities(tmp_path, {"gpu3/mig/gi9": 84, "gpu3/mig/gi9/ci0": 85})
    gpus = mig_gpus()
    with pytest.raises(nvml.Unavailable, match=f"cannot read {proc}/gpu3/mig/gi2/access"):
        nvml.reservation(gpus, [LARGE], "", caps_proc=proc, caps_dev=dev, lib_dirs=())
    (Path(dev) / "nvidia-cap85").unlink()
    with pytest.raises(nvml.Unavailable, match=f"no device node {dev}/nvidia-cap85 .*modprobe"):
        nvml.reservation(gpus, [SMALL], "", caps_proc=proc, caps_dev=dev, lib_dirs=())
    Path(proc, "gpu3/mig/gi9/access").write_text("DeviceFileMode: 292\n")
    with pytest.raises(nvml.Unavailable, match="names no DeviceFileMinor"):
        nvml.mig_nodes(gpus[0], proc, dev)


class Aborted(Exception):
    pass


class Context:
    """The part of grpc.ServicerContext Reserve uses: abort raises, as gRPC's does."""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Aborted(details)


def test_the_plugin_refuses_a_mig_reservation_the_host_cannot_give() -> None:
    # No /proc/driver/nvidia/capabilities here: Reserve says so, rather than hand Nomad
    # device nodes that would fail the task's start.
    service = DeviceService(threading.Event(), probe=lambda: (mig_gpus(), ""))
    service.config = DeviceConfig(cdi_spec_dirs=())
    service._look()
    context: Any = Context()
    with pytest.raises(Aborted):
        service.Reserve(device_pb2.ReserveRequest(device_ids=[SMALL]), context)
    assert context.code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"MIG device {SMALL}: cannot read /proc/driver/nvidia/capabilities/gpu3" in (
        context.details
    )


def test_stats_of_a_mig_device_are_its_memory_only() -> None:
    fake = recorded_nvml(MIG_RECORDED)
    gpus, _ = nvml.probe(fake)
    figures = nvml.telemetry(fake, [g.uuid for g in gpus])
    assert figures[SMALL] == nvml.Telemetry(memory_used_mib=13, memory_total_mib=9984)
    assert figures[LARGE] == nvml.Telemetry(memory_used_mib=1037, memory_total_mib=40192)
    assert figures["GPU-aa11"].gpu_utilization_pct == 0  # a whole GPU: every figure
    message = stats_message(gpus, (), figures, when_ns=7)
    by_name = {g.name: g.instance_stats for g in message.groups}
    small = by_name["NVIDIA A100-SXM4-80GB MIG 1g.10gb"][SMALL]
    assert {k: shown(v) for k, v in small.stats.attributes.items()} == {
        "Memory state": (13, 9984, "MiB")
    }
    assert shown(small.summary) == (13, 9984, "MiB")
    # Ignoring the parent drops its instances' figures too.
    assert [g.name for g in stats_message(gpus, (A100,), figures, 7).groups] == ["NVIDIA L4"]
