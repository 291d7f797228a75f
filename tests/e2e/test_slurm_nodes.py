"""`srun --mpi=pmix -N2 -n4 pyhpc run` across two Slurm nodes: two slurmd, each in a network
namespace of its own (scripts/testbed/slurm.sh up 2), the image's Open MPI wired up through
each node's slurmd PMIx server, two ranks on each node, and an allreduce that needs all four."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_mpi import mpi_image  # noqa: F401 - the fixture that builds the MPI image
from test_slurm import PMIX_LIB, PYHPC_RUN, SLURM_SH, policy, srun

pytestmark = pytest.mark.skipif(
    not all(shutil.which(b) for b in ("slurmctld", "slurmd", "srun", "munged"))
    or not PMIX_LIB.exists(),
    reason="Slurm with PMIx is not installed (scripts/setup.sh installs it)",
)


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[dict[str, str]]:
    # Not under /tmp: each node's slurmd has a /tmp of its own.
    state = Path(tempfile.mkdtemp(prefix="pyhpc-slurm-", dir="/var/tmp"))
    env = {**os.environ, "PYHPC_SLURM_DIR": str(state)}
    up = subprocess.run(
        [str(SLURM_SH), "up", "2"], env=env, capture_output=True, text=True, timeout=120
    )
    env["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield env
    finally:
        subprocess.run([str(SLURM_SH), "down"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(state, ignore_errors=True)


def test_an_allreduce_across_two_nodes_through_srun_mpi_pmix(
    two_nodes: dict[str, str],
    tmp_path: Path,
    mpi_image: str,  # noqa: F811
) -> None:
    spool = Path(two_nodes["SLURM_CONF"]).parent / "spool"
    config = policy(
        tmp_path,
        'env_passthrough = ["SLURM_*", "PMIX_*", "PMI_*"]',
        f'mount_dirs = ["{spool}"]',
        "user_namespace = false",  # root's srun: the step directories are root's, 0700
    )
    # The policy where every node reads it (a node's /tmp is its own).
    shared = spool / "policy.hcl"
    shutil.copyfile(config, shared)
    run = (
        f'{PYHPC_RUN} --config {shared} --hostname "$SLURMD_NODENAME" '
        f'--mount "$PMIX_SERVER_TMPDIR" {mpi_image}'
    )
    done = srun(
        two_nodes, "--mpi=pmix", "-N2", "-n4", script=f"{run} -- /opt/mpi/openmpi/allreduce"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.findall(
        r"allreduce rank (\d) of 4 on (\S+): sum 10 \(expected 10\), ok", done.stdout
    )
    assert sorted(found) == [("0", "node1"), ("1", "node1"), ("2", "node2"), ("3", "node2")], (
        done.stdout + done.stderr
    )
