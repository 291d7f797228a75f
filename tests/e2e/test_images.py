"""Images by reference through the real Nomad: docker:// and oras:// from the test bed's
registry (127.0.0.1:5000, allowed by the cluster's image_sources), imported once per node."""

from __future__ import annotations

import subprocess
import sys
import uuid
from typing import Any

import pytest
from test_foundation import IMAGE, completed, events_text, job, refused

from tests.images.ocitools import layout_from_dir, skopeo_push

REGISTRY = "127.0.0.1:5000"
CONFIG = {
    "Env": ["PATH=/bin", "FROM_IMAGE=yes"],
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ["echo from-image-config $FROM_IMAGE in $(pwd) as $(id -u)"],
    "WorkingDir": "/etc",
}


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh repository per run: the node's store must not know it yet."""
    work = tmp_path_factory.mktemp("e2e-image")
    rootfs = work / "rootfs"
    subprocess.run(["unsquashfs", "-q", "-d", str(rootfs), IMAGE], check=True)
    layout = layout_from_dir(rootfs, work / "layout", CONFIG, "1")
    name = f"e2e/busybox-{uuid.uuid4().hex[:8]}"
    skopeo_push(layout, "1", f"docker://{REGISTRY}/{name}:1")
    return name


def image_job(name: str, image: str, script: str | None = None) -> str:
    spec = job(name, script or "unused", command=None).replace(f'"{IMAGE}"', f'"{image}"')
    if script is None:
        spec = spec.replace('args  = ["-c", "unused"]', "")
    return spec


def test_two_tasks_start_together_on_one_import_and_use_the_image_config(
    cluster: Any, pushed: str
) -> None:
    ref = f"docker://{REGISTRY}/{pushed}:1"
    ids = [cluster.run_job(image_job(f"e2e-pull-{i}", ref)) for i in range(2)]
    allocs = [cluster.wait_alloc(job_id, {"complete", "failed"}, timeout=180) for job_id in ids]
    for alloc in allocs:
        assert alloc["ClientStatus"] == "complete", events_text(cluster, alloc)
        assert cluster.alloc_logs(alloc["ID"], "t").strip() == "from-image-config yes in /etc as 0"
    merged = [a for a in allocs if "Image: merging" in events_text(cluster, a)]
    assert len(merged) == 1, [events_text(cluster, a) for a in allocs]
    for job_id in ids:
        cluster.stop_job(job_id)


def test_a_task_runs_from_an_oras_artifact(cluster: Any, pushed: str) -> None:
    sqsh = f"oras://{REGISTRY}/{pushed}-sqsh:1"
    store = ["--store", "/var/lib/pyhpc/store"]
    cli = [sys.executable, "-m", "nomad_driver.cli.main", "image"]
    subprocess.run(
        [*cli, *store, "import", f"docker://{REGISTRY}/{pushed}:1"], check=True, capture_output=True
    )
    subprocess.run(
        [*cli, *store, "push", f"docker://{REGISTRY}/{pushed}:1", sqsh],
        check=True,
        capture_output=True,
    )
    out, _ = completed(
        cluster, image_job("e2e-oras", sqsh, "cat /etc/hostname 2>/dev/null; echo oras-ok")
    )
    assert "oras-ok" in out


def test_an_image_source_outside_the_allowlist_is_refused(cluster: Any) -> None:
    refused(
        cluster,
        image_job("e2e-source", "docker://127.0.0.1:5999/other/app:1"),
        "is not from the plugin's image_sources",
    )


def test_a_missing_image_fails_the_task_with_the_registry_answer(cluster: Any) -> None:
    alloc = refused(
        cluster,
        image_job("e2e-missing", f"docker://{REGISTRY}/e2e/does-not-exist:1"),
        f"importing docker://{REGISTRY}/e2e/does-not-exist:1: registry {REGISTRY}: "
        "manifest e2e/does-not-exist:1: HTTP 404 (manifest unknown)",
    )
    assert '"errors"' not in events_text(cluster, alloc)  # the answer, not its raw JSON body
