"""What of scripts/gpu-check.sh can run without a GPU: it skips (77) naming why, its CUDA
test image (cudacheck built against the host C library) starts in a pyhpc container, where
without a driver it says libcuda.so.1 cannot be loaded, and its MIG and CDI steps judge
recorded NVML answers and a stand-in for the plugin's Reserve."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nomad_driver.device import nvml
from nomad_driver.proto import device_pb2
from tests.device.test_mig import A100, LARGE, MIG_RECORDED, SMALL
from tests.device.test_nvml import RECORDED, recorded_nvml

REPO = Path(__file__).resolve().parents[2]


def load_check():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_the_check_skips_and_says_why() -> None:
    done = subprocess.run([str(REPO / "scripts" / "gpu-check.sh")], capture_output=True, text=True)
    assert done.returncode == 77, done.stdout + done.stderr
    assert "[SKIP] no usable NVIDIA GPU here: NVML" in done.stdout


@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")
def test_the_cuda_test_image_runs_in_a_container(tmp_path: Path) -> None:
    check = load_check()
    image = check.cuda_image(tmp_path, None)
    done = check.run(str(image), "", "/cudacheck")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cudacheck: cannot load libcuda.so.1" in done.stderr


def test_a_program_whose_interpreter_or_loader_is_missing_is_named_so(tmp_path: Path) -> None:
    # As nvidia-smi (dynamically linked) in an image without a C library, or a wrapper script
    # whose #! interpreter the image lacks: execve says ENOENT although the file is there.
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "wrapper").write_text("#!/bin/nope\n")
    (root / "bin" / "wrapper").chmod(0o755)
    shutil.copy2("/bin/true", root / "bin" / "dynamic")
    image = tmp_path / "bare.sqsh"
    subprocess.run(
        ["mksquashfs", str(root), str(image), "-quiet", "-all-root", "-noappend"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    check = load_check()
    for program in ("/bin/wrapper", "/bin/dynamic"):
        done = check.run(str(image), "", program)
        assert done.returncode != 0
        assert (
            f"cannot start '{program}': its interpreter or dynamic loader is not in the image"
            in (done.stderr)
        ), done.stderr
    done = check.run(str(image), "", "/bin/absent")
    assert "command '/bin/absent' does not exist in the image" in done.stderr


class Stub:
    """The plugin's Reserve, answering as the plugin would for `devices` (task, host)."""

    def __init__(self, devices: list[tuple[str, str]], mounts: list[tuple[str, str, bool]]):
        self.devices, self.mounts = devices, mounts
        self.asked: list[list[str]] = []

    def Reserve(self, request: Any, timeout: float) -> Any:  # noqa: N802 - gRPC's name
        self.asked.append(list(request.device_ids))
        return device_pb2.ReserveResponse(
            container_res=device_pb2.ContainerReservation(
                devices=[device_pb2.DeviceSpec(task_path=t, host_path=h) for t, h in self.devices],
                mounts=[
                    device_pb2.Mount(task_path=t, host_path=h, read_only=r)
                    for h, t, r in self.mounts
                ],
            )
        )


def test_the_mig_step_checks_mig_devices_where_they_exist_and_says_why_not_elsewhere() -> None:
    check = load_check()
    stub = Stub(
        [
            ("/dev/nvidia3", "/dev/null"),
            ("/dev/nvidia-caps/nvidia-cap84", "/dev/null"),
            ("/dev/nvidia-caps/nvidia-cap85", "/dev/null"),
        ],
        [],
    )
    check.mig_check(stub, [SMALL, LARGE, "GPU-aa11"], recorded_nvml(MIG_RECORDED))
    step, status, detail = check.results[-1]
    assert (step, status) == ("MIG mode per GPU", "PASS"), detail
    assert f"{A100}: MIG on, 2 MIG device(s)" in detail and "GPU-aa11: MIG unsupported" in detail
    assert stub.asked == [[SMALL]]
    # The plugin offering the MIG GPU whole, or leaving out a MIG device, fails the step.
    check.mig_check(stub, [A100, SMALL, "GPU-aa11"], recorded_nvml(MIG_RECORDED))
    assert check.results[-1][1] == "FAIL"
    assert f"{LARGE} not fingerprinted" in check.results[-1][2]
    assert f"{A100} (MIG on) offered whole" in check.results[-1][2]
    # MIG off (as on most lent machines): the whole GPUs are checked, and the step says that
    # turning MIG on is an admin's act this check does not do.
    check.mig_check(stub, [g["uuid"] for g in RECORDED], recorded_nvml())
    step, status, detail = check.results[-1]
    assert status == "INFO", detail
    assert "GPU-6f1c7a0e-000: MIG off" in detail
    assert "nvidia-smi -i N -mig 1`, a GPU reset" in detail
    assert "only the non-MIG path (each GPU offered whole) was checked" in detail
    assert len(stub.asked) == 1  # no MIG device: no MIG Reserve


def test_the_cdi_step_says_whether_reserve_used_the_specs(tmp_path: Path) -> None:
    check = load_check()
    gpus, _ = nvml.probe(recorded_nvml())
    ids = [g.uuid for g in gpus]
    check.cdi_check(Stub([], []), gpus, ids, (str(tmp_path / "none"),))
    assert check.results[-1][1] == "INFO"
    assert "Reserve used pyhpc's own discovery" in check.results[-1][2]
    where = tmp_path / "cdi"
    where.mkdir(mode=0o755)
    spec = {
        "cdiVersion": "0.6.0",
        "kind": "nvidia.com/gpu",
        "devices": [{"name": "0", "containerEdits": {"deviceNodes": [{"path": "/dev/null"}]}}],
    }
    (where / "nvidia.json").write_text(json.dumps(spec))
    (where / "nvidia.json").chmod(0o644)
    stub = Stub([("/dev/null", "/dev/null")], [])
    check.cdi_check(stub, gpus, ids, (str(where),), os.getuid())
    assert check.results[-1][:2] == ("CDI specs: Reserve used them", "PASS"), check.results[-1]
    check.cdi_check(
        Stub([("/dev/nvidia0", "/dev/nvidia0")], []), gpus, ids, (str(where),), os.getuid()
    )
    assert check.results[-1][1] == "FAIL"
