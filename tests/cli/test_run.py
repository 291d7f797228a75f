"""`pyhpc run` end to end: a real container from the command line, under a real policy file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containers need root here")
PYHPC = [sys.executable, "-m", "nomad_driver.cli.main", "run"]


def pyhpc_run(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PYHPC, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def policy(tmp: Path, text: str) -> Path:
    path = tmp / "pyhpc.hcl"
    path.write_text(f'plugin "pyhpc" {{\n  config {{\n{text}\n  }}\n}}\n')
    return path


def test_output_input_and_exit_code_pass_through_with_root_remapped(busybox_image: Path) -> None:
    done = pyhpc_run(
        str(busybox_image),
        "--",
        "sh",
        "-c",
        "read line; echo got $line; cat /proc/self/uid_map; exit 7",
        stdin="hello\n",
    )
    assert done.returncode == 7, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "got hello"
    assert lines[1].split() == ["0", "100000", "65536"]


def test_user_under_sudo_is_mapped_to_itself(busybox_image: Path) -> None:
    done = pyhpc_run(str(busybox_image), "--", "id", env={"SUDO_UID": "1234", "SUDO_GID": "100"})
    assert done.stdout.startswith("uid=1234 gid=100"), done.stdout + done.stderr
    root = pyhpc_run("--root", str(busybox_image), "--", "id", env={"SUDO_UID": "1234"})
    assert root.stdout.startswith("uid=0(root)"), root.stdout


def test_the_policy_file_is_obeyed_and_its_changes_seen(
    tmp_path: Path, busybox_image: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("shared\n")
    config = policy(tmp_path, "    mount_dirs = []")
    refused = pyhpc_run(
        "--config", str(config), "--mount", f"{data}:/data", str(busybox_image), "true"
    )
    assert refused.returncode == 125
    assert f"mounts: '{data}' is outside the plugin's mount_dirs []" in refused.stderr
    time.sleep(0.01)  # a new mtime even on coarse clocks
    config = policy(tmp_path, f'    mount_dirs = ["{tmp_path}"]')
    allowed = pyhpc_run(
        "--config", str(config), "--mount", f"{data}:/data:ro", str(busybox_image), "cat", "/data/f"
    )
    assert (allowed.returncode, allowed.stdout) == (0, "shared\n"), allowed.stderr


def test_bad_options_are_refused_naming_them(tmp_path: Path, busybox_image: Path) -> None:
    for args, message in (
        (["--cap-add", "SYS_ADMIN"], "cap_add: SYS_ADMIN not in the plugin's allow_caps"),
        (["--cap-add", "FLY"], "unknown capabilities ['FLY']"),
        (["--seccomp", "unconfined"], "allow_unconfined_seccomp is false"),
        (["--env", "NOEQUALS"], "--env 'NOEQUALS': expected KEY=VALUE"),
    ):
        done = pyhpc_run(*args, str(busybox_image), "true")
        assert done.returncode == 125 and message in done.stderr, (args, done.stderr)
    bad = pyhpc_run(str(tmp_path / "missing.sqsh"), "true")
    assert bad.returncode == 125 and "no such file" in bad.stderr


def test_a_signal_to_pyhpc_run_reaches_the_command(busybox_image: Path) -> None:
    proc = subprocess.Popen(
        [
            *PYHPC,
            str(busybox_image),
            "--",
            "sh",
            "-c",
            "trap 'echo term; exit 3' TERM; echo up; while true; do sleep 0.1; done",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "up\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 3
    assert proc.stdout.read() == "term\n"


def test_gpus_on_a_node_without_any_are_refused_clearly(busybox_image: Path) -> None:
    pytest.importorskip("pynvml")
    from nomad_driver.device import nvml

    if nvml.probe()[0]:
        pytest.skip("this node has GPUs: scripts/gpu-check.sh covers it")
    done = pyhpc_run("--gpus", "all", str(busybox_image), "true")
    assert done.returncode == 125
    assert "--gpus all: no NVIDIA GPU on this node" in done.stderr
