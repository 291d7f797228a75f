"""`pyhpc dispatch` against the real Nomad: instances followed to their end, idempotency tokens,
failed runs reported, failover from a region that cannot be reached."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def pyhpc_dispatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nomad_driver.cli.main", "dispatch", "hpc", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"NOMAD_ADDR": "http://127.0.0.1:4646", "PATH": "/usr/bin:/bin"},
    )


def children(cluster: Any) -> set[str]:
    return {j["ID"] for j in cluster.api("jobs", prefix="hpc/dispatch-")}


def test_dispatch_follows_runs_and_a_retry_with_the_token_starts_nothing_new(cluster: Any) -> None:
    cluster.nomad("job", "run", str(REPO / "jobspecs" / "hpc.nomad"))
    token = uuid.uuid4().hex
    done = pyhpc_dispatch(
        "--count", "2", "--meta", "size=100", "--meta", "hold=0", "--idempotency-token", token
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 of 2 completed successfully" in done.stdout
    last_table = done.stdout.rsplit("  #  REGION", 1)[1]  # the table is printed at each change
    assert last_table.count(" complete ") == 2, done.stdout
    before = children(cluster)
    again = pyhpc_dispatch(
        "--count", "2", "--meta", "size=100", "--meta", "hold=0", "--idempotency-token", token
    )
    assert again.returncode == 0 and children(cluster) == before


def test_a_failed_run_fails_the_command_with_its_exit_code(cluster: Any) -> None:
    cluster.nomad("job", "run", str(REPO / "jobspecs" / "hpc.nomad"))
    done = pyhpc_dispatch("--meta", "size=not-a-number", "--meta", "hold=0")
    assert done.returncode == 1
    assert " failed " in done.stdout and "0 of 1 completed successfully" in done.stdout
    assert done.stdout.splitlines()[-3].split()[4] == "2"  # the task's own exit code


def test_an_unreachable_region_fails_over_to_the_next(cluster: Any) -> None:
    cluster.nomad("job", "run", str(REPO / "jobspecs" / "hpc.nomad"))
    done = pyhpc_dispatch(
        "--region",
        "mars",
        "--region",
        "global",
        "--count",
        "1",
        "--meta",
        "size=10",
        "--meta",
        "hold=0",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failed over from mars" in done.stdout and "global" in done.stdout
    best = pyhpc_dispatch("--placement", "best", "--meta", "size=10", "--meta", "hold=0")
    assert best.returncode == 0 and "1 of 1 completed successfully" in best.stdout


def pyhpc_job_sync(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nomad_driver.cli.main", "job", "sync", str(path), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"NOMAD_ADDR": "http://127.0.0.1:4646", "PATH": "/usr/bin:/bin"},
    )


def test_job_sync_shows_the_diff_then_registers_only_what_changes(
    cluster: Any, tmp_path: Path
) -> None:
    name = f"e2e-sync-{uuid.uuid4().hex[:6]}"
    spec = tmp_path / "job.nomad"
    spec.write_text(
        (REPO / "jobspecs" / "hello.nomad").read_text().replace('job "hello"', f'job "{name}"')
    )
    dry = pyhpc_job_sync(spec, "--dry-run")
    assert dry.returncode == 0 and "+ new job" in dry.stdout
    assert cluster.api("jobs", prefix=name) == []  # a dry run writes nothing
    done = pyhpc_job_sync(spec)
    assert done.returncode == 0 and "region global: registered" in done.stdout
    assert [j["ID"] for j in cluster.api("jobs", prefix=name)] == [name]
    assert "region global: no change" in pyhpc_job_sync(spec).stdout
    spec.write_text(spec.read_text().replace("memory = 64", "memory = 96"))
    changed = pyhpc_job_sync(spec, "--region", "global", "--region", "mars")
    assert "region east" not in changed.stdout + changed.stderr  # only the regions named
    assert "~ MemoryMB: '64' => '96'" in changed.stdout
    assert "region global: registered" in changed.stdout
    assert changed.returncode == 1 and "region mars: not synced" in changed.stderr
    cluster.stop_job(name)
    cluster.nomad("job", "stop", "-region", "east", "-purge", "-yes", "-detach", name)


def test_job_sync_takes_variables_as_nomad_job_run_does(cluster: Any, tmp_path: Path) -> None:
    """NOMAD_VAR_* below -var-file below -var, each giving the job's memory in turn."""
    name = f"e2e-syncvar-{uuid.uuid4().hex[:6]}"
    spec = tmp_path / "job.nomad"
    hello = (REPO / "jobspecs" / "hello.nomad").read_text().replace('job "hello"', f'job "{name}"')
    assert "memory = 64" in hello
    spec.write_text(
        'variable "mem" {\n  type    = number\n  default = 64\n}\n'
        + hello.replace("memory = 64", "memory = var.mem")
    )
    values = tmp_path / "prod.vars.hcl"
    values.write_text("mem = 80\n")

    def memory_after(*args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "nomad_driver.cli.main", "job", "sync", str(spec),
             "--region", "global", "--dry-run", *args],
            capture_output=True, text=True, timeout=120,
            env={"NOMAD_ADDR": "http://127.0.0.1:4646", "PATH": "/usr/bin:/bin", **(env or {})},
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    assert pyhpc_job_sync(spec, "--region", "global").returncode == 0  # registered at 64
    try:
        assert "no change" in memory_after()  # the default
        assert "'64' => '72'" in memory_after(env={"NOMAD_VAR_mem": "72"})
        assert "'64' => '80'" in memory_after("-var-file", str(values), env={"NOMAD_VAR_mem": "72"})
        assert "'64' => '96'" in memory_after("-var-file", str(values), "-var", "mem=96")
        bad = pyhpc_job_sync(spec, "-var", "mem")
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "NAME=VALUE" in bad.stderr
    finally:
        cluster.stop_job(name)
