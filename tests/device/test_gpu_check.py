"""What of scripts/gpu-check.sh can run without a GPU: it skips (77) naming why, and its CUDA
test image (cudacheck built against the host C library) starts in a pyhpc container, where
without a driver it says libcuda.so.1 cannot be loaded."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

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
