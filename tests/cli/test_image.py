"""`pyhpc image` through real containers: prune keeps what a running task uses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nomad_driver.images.store import Store
from nomad_driver.runtime import client
from tests.runtime.test_supervisor import make_spec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containers need root here")


def image_cli(store: Path, run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "nomad_driver.cli.main",
            "image",
            "--store",
            str(store),
            "--run-dir",
            str(run_dir),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_ls_inspect_and_prune_around_a_running_task(
    tmp_path: Path, busybox_image: Path
) -> None:
    store, run_dir = tmp_path / "store", tmp_path / "run"
    done = image_cli(store, run_dir, "import", str(busybox_image), "--tag", "oci:/nowhere:v1")
    assert done.returncode == 0, done.stderr
    digest = done.stdout.split()[0]
    listed = image_cli(store, run_dir, "ls").stdout
    assert digest[:19] in listed and "oci:/nowhere:v1" in listed
    inspected = image_cli(store, run_dir, "inspect", digest)
    assert f'"source": "{busybox_image}"' in inspected.stdout

    path = Store(str(store)).lookup(digest).path  # type: ignore[union-attr]
    spec = make_spec(tmp_path, Path(path), "/bin/sh", "-c", "sleep 30")._replace(
        images_dir=str(run_dir / "images")
    )
    started = client.start(spec, str(tmp_path / "task"))
    try:
        assert "yes" in image_cli(store, run_dir, "ls").stdout
        kept = image_cli(store, run_dir, "prune", "--all")
        assert kept.returncode == 0 and "0 image(s) deleted" in kept.stdout
        refused = image_cli(store, run_dir, "rm", digest)
        assert refused.returncode == 1 and "in use by a running task" in refused.stderr
    finally:
        client.send_signal(started.run_dir, 9)
        client.wait(started.run_dir)
    gone = image_cli(store, run_dir, "prune", "--all")
    assert f"deleted {digest}" in gone.stdout and not os.path.exists(path)


def test_a_bad_reference_is_refused_naming_it(tmp_path: Path) -> None:
    done = image_cli(tmp_path / "s", tmp_path / "r", "import", "docker://ubuntu:22.04")
    assert done.returncode == 1
    assert "name the registry host explicitly" in done.stderr
