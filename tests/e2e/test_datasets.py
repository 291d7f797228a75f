"""SquashFS datasets through the real Nomad: two tasks share one read-only mount of a dataset
(the control), and a dataset file a tenant can rewrite is refused as such an image is (the
attack: mounted once per digest, its rewrite would become what every task of that digest
reads)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_foundation import IMAGE, completed, events_text, job, refused, running_alloc
from test_tenant_jobs import TENANT, tenant_images  # noqa: F401 - a fixture used below

from nomad_driver.runtime.imagemount import SharedImages
from nomad_driver.util.digest import file_digest

NODE_IMAGES = Path("/run/pyhpc/images")  # the test bed's run_dir/images
WAIT = "cat /data/facts.txt; while [ ! -e /alloc/go ]; do sleep 0.2; done"


@pytest.fixture
def dataset(tmp_path: Path) -> Iterator[Path]:
    """A root-owned dataset in the node's image_dirs."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "facts.txt").write_text(f"dataset-{os.getpid()}\n")
    path = Path(IMAGE).parent / f"e2e-dataset-{os.getpid()}.sqsh"
    subprocess.run(
        ["mksquashfs", str(tree), str(path), "-quiet", "-all-root", "-noappend"],
        check=True,
        capture_output=True,
    )
    path.chmod(0o644)
    yield path
    path.unlink(missing_ok=True)


def dataset_job(name: str, source: Path, script: str = WAIT, type_: str = "service") -> str:
    return job(name, script, type_=type_, config_extra=f'datasets = ["{source}:/data"]')


def test_two_tasks_share_one_read_only_mount_of_a_dataset(cluster: Any, dataset: Path) -> None:
    ids = [cluster.run_job(dataset_job(f"e2e-dataset-{n}", dataset)) for n in "ab"]
    try:
        allocs = [running_alloc(cluster, job_id) for job_id in ids]
        digest = file_digest(str(dataset))
        users = SharedImages(str(NODE_IMAGES)).users(digest)
        assert len(users) == 2, users  # one mount, two tasks holding it
        root = NODE_IMAGES / digest.partition(":")[2] / "root"
        mounts = [
            line
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4] == str(root)
        ]
        assert len(mounts) == 1, mounts
        for alloc in allocs:
            logs = cluster.alloc_logs(alloc["ID"], "t")
            assert logs.strip() == f"dataset-{os.getpid()}", events_text(cluster, alloc)
        out = subprocess.run(
            [
                str(cluster.nomad_bin),
                "alloc",
                "exec",
                "-task",
                "t",
                allocs[0]["ID"],
                "/bin/sh",
                "-c",
                "touch /data/new && echo WROTE || echo read-only",
            ],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "read-only" in out.stdout and "WROTE" not in out.stdout, out
    finally:
        for job_id in ids:
            cluster.stop_job(job_id)


def test_a_tenant_writable_dataset_is_refused_like_such_an_image(
    cluster: Any,
    dataset: Path,
    tenant_images: Path,  # noqa: F811 - the fixture
) -> None:
    copy = tenant_images / "facts.sqsh"  # the same bytes as the admin's: the same digest
    shutil.copyfile(dataset, copy)
    os.chown(copy, TENANT, TENANT)
    alloc = refused(
        cluster, dataset_job("e2e-dataset-tenant", copy), f"can be changed by uid {TENANT}"
    )
    assert "option 'datasets'" in events_text(cluster, alloc)
    # The control: the root-owned original of the same bytes runs.
    out, _ = completed(
        cluster, dataset_job("e2e-dataset-admin", dataset, "cat /data/facts.txt", "batch")
    )
    assert out.strip() == f"dataset-{os.getpid()}"
