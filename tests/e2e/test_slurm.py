"""`pyhpc run` under a real Slurm (Debian's munge, slurmctld and slurmd on loopback, brought up
by scripts/testbed/slurm.sh): each srun task's SLURM_* reaches its container under the site's
env_passthrough (and not without it: the control), and `srun --mpi=pmix` wires up the image's
Open MPI through slurmd's PMIx server, whose step directory is bound into each container.
One node; test_slurm_nodes.py runs MPI across two."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_foundation import IMAGE
from test_mpi import mpi_image  # noqa: F401 - the fixture that builds the MPI image

REPO = Path(__file__).resolve().parents[2]
SLURM_SH = REPO / "scripts" / "testbed" / "slurm.sh"
PMIX_LIB = Path("/usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so")

pytestmark = pytest.mark.skipif(
    not all(shutil.which(b) for b in ("slurmctld", "slurmd", "srun", "munged")),
    reason="Slurm is not installed (scripts/setup.sh installs slurmctld, slurmd, munge)",
)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "PYHPC_SLURM_DIR": str(state)}
    up = subprocess.run([str(SLURM_SH), "up"], env=env, capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    env["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run([str(SLURM_SH), "down"], env=env, capture_output=True, timeout=60)


def policy(tmp: Path, *lines: str) -> Path:
    path = tmp / "pyhpc.hcl"
    body = "\n".join(f"    {line}" for line in ('image_mount_linger = "0"', *lines))
    path.write_text(f'plugin "pyhpc" {{\n  config {{\n{body}\n  }}\n}}\n')
    return path


def srun(env: dict[str, str], *args: str, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["srun", *args, "sh", "-c", script], env=env, capture_output=True, text=True, timeout=180
    )


PYHPC_RUN = f"exec {sys.executable} -m nomad_driver.cli.main run"


def test_each_tasks_slurm_variables_reach_its_container_as_the_site_allows(
    slurm: dict[str, str], tmp_path: Path
) -> None:
    show = "echo rank $SLURM_PROCID of $SLURM_NTASKS on $(hostname)"
    for allowed in (True, False):
        config = policy(tmp_path, 'env_passthrough = ["SLURM_*"]' if allowed else "")
        done = srun(slurm, "-n2", script=f"{PYHPC_RUN} --config {config} {IMAGE} -- sh -c '{show}'")
        assert done.returncode == 0, done.stdout + done.stderr
        lines = sorted(done.stdout.splitlines())
        if allowed:
            assert lines == ["rank 0 of 2 on busybox", "rank 1 of 2 on busybox"], done.stdout
        else:  # the control: nothing of the caller's crosses unless the site says so
            assert lines == ["rank of on busybox"] * 2, done.stdout


@pytest.mark.skipif(
    not PMIX_LIB.exists(), reason="Slurm's PMIx plugin needs libpmix-dev (scripts/setup.sh)"
)
def test_srun_mpi_pmix_wires_up_the_images_open_mpi(
    slurm: dict[str, str],
    tmp_path: Path,
    mpi_image: str,  # noqa: F811
) -> None:
    # The step's PMIx directory is root's, 0700, as the srun caller here is root: the
    # container's root must be the host's (a user's job step maps the user to itself).
    config = policy(
        tmp_path,
        'env_passthrough = ["SLURM_*", "PMIX_*", "PMI_*"]',
        f'mount_dirs = ["{Path(slurm["SLURM_CONF"]).parent / "spool"}"]',
        "user_namespace = false",
    )
    run = f'{PYHPC_RUN} --config {config} --mount "$PMIX_SERVER_TMPDIR" {mpi_image}'
    done = srun(slurm, "--mpi=pmix", "-n2", script=f"{run} -- /opt/mpi/openmpi/hello")
    assert done.returncode == 0, done.stdout + done.stderr
    ranks = sorted(re.findall(r"hello from rank (\d) of 2", done.stdout))
    assert ranks == ["0", "1"], done.stdout + done.stderr
