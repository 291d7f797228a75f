"""A hostile tenant against its neighbours, through the real Nomad: two jobs, one hostile.
B1 (a tenant's writable copy of another's image) and B3 (a bind source swapped for a symlink by
a racing job); B4 (a seccomp profile an earlier job wrote) is in test_runtime. Each runs the
benign control beside the attack."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_foundation import IMAGE, completed, events_text, job, refused, running_alloc

TENANT = 1000


@pytest.fixture
def tenant_images() -> Iterator[Path]:
    """A directory of the tenant's (uid 1000) inside the node's image_dirs."""
    where = Path(IMAGE).parent / f"e2e-tenant-{os.getpid()}"
    where.mkdir()
    os.chown(where, TENANT, TENANT)
    yield where
    shutil.rmtree(where, ignore_errors=True)


def test_b1_a_tenants_writable_copy_of_an_image_is_refused_and_the_victim_runs_its_own(
    cluster: Any, tenant_images: Path
) -> None:
    victim_passwd = "root:x:0:0:root:/root:/bin/sh"
    # The victim holds the shared mount of the busybox digest with a running task.
    holder = cluster.run_job(
        job("e2e-b1-victim", "while [ ! -e /alloc/go ]; do sleep 0.2; done", type_="service")
    )
    try:
        running_alloc(cluster, holder)
        copy = tenant_images / "busybox.sqsh"  # same bytes, so the same digest
        shutil.copyfile(IMAGE, copy)
        os.chown(copy, TENANT, TENANT)
        hostile = job("e2e-b1-tenant", "cat /etc/passwd").replace(IMAGE, str(copy))
        refused(cluster, hostile, f"can be changed by uid {TENANT}")
        # Had it been mounted for the digest, the tenant's in-place rewrite would now be what
        # every task of that digest runs.
        with open(copy, "r+b") as f:
            f.seek(os.path.getsize(copy) // 2)
            f.write(b"\xff" * 4096)
        out, _ = completed(cluster, job("e2e-b1-victim-2", "head -1 /etc/passwd"))
        assert out.strip() == victim_passwd, out
    finally:
        cluster.stop_job(holder)


RACER = (
    "cd /scratch && while true; do mv data real && ln -s /etc data && rm data && mv real data; done"
)


def test_b3_a_job_racing_a_bind_source_into_a_symlink_never_gets_the_host_mounted(
    cluster: Any,
) -> None:
    scratch = cluster.state_dir / "scratch" / f"t-{os.getpid()}"
    scratch.mkdir()
    os.chown(scratch, TENANT, TENANT)
    data = scratch / "data"
    data.mkdir()
    (data / "benign").write_text("ok\n")
    os.chown(data, TENANT, TENANT)

    def victim(i: int) -> str:
        return job(
            f"e2e-b3-victim-{i}", "ls /data", config_extra=f'        mounts = ["{data}:/data"]'
        )

    # Control: the bind works while nobody races.
    out, _ = completed(cluster, victim(99))
    assert out.split() == ["benign"], out
    # The hostile job: as the tenant, it swaps scratch/data for a symlink to /etc in a loop.
    racer = cluster.run_job(
        job(
            "e2e-b3-racer",
            RACER,
            type_="service",
            task_extra='      user = "1000:1000"',
            config_extra=f'        mounts = ["{scratch}:/scratch"]',
        )
    )
    benign = refused_count = 0
    try:
        running_alloc(cluster, racer)
        deadline = time.monotonic() + 20
        while not (data / "benign").exists() or data.is_symlink():
            assert time.monotonic() < deadline, "the racer never ran"
            time.sleep(0.05)
        for i in range(12):
            job_id = cluster.run_job(victim(i))
            alloc = cluster.wait_alloc(job_id, {"complete", "failed"})
            if alloc["ClientStatus"] == "failed":
                text = events_text(cluster, alloc)
                # Refused at the policy check or by the init's own open, or the source was
                # mid-rename (missing): never mounted.
                assert any(w in text for w in ("symlink", "does not exist", "No such file")), text
                refused_count += 1
            else:
                out = cluster.alloc_logs(alloc["ID"], "t")
                assert "shadow" not in out and "passwd" not in out, f"host /etc mounted: {out}"
                benign += out.split() == ["benign"]
            cluster.stop_job(job_id)
    finally:
        cluster.stop_job(racer)
    assert benign + refused_count == 12
    assert refused_count > 0, "the racer never won a check: the race did not run"
