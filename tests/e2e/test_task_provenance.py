"""Provenance through the real Nomad: a task's record in alloc/logs, read back with
`pyhpc provenance ALLOC`, has every field; `pyhpc run --replay` of it prints what the task
printed; once the image's bytes change under the same path, the replay is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from test_datasets import dataset  # noqa: F401 - a fixture used below
from test_foundation import IMAGE, events_text, job

PYHPC = [sys.executable, "-m", "nomad_driver.cli.main"]
SCRIPT = "echo $GREETING; md5sum /bin/busybox | cut -c1-8; cat /data/facts.txt"


def test_a_tasks_provenance_is_complete_and_replays_until_its_image_changes(
    cluster: Any,
    tmp_path: Path,
    dataset: Path,  # noqa: F811 - the fixture
) -> None:
    image = Path(IMAGE).parent / f"e2e-provenance-{os.getpid()}.sqsh"
    shutil.copyfile(IMAGE, image)
    image.chmod(0o644)
    try:
        spec = job(
            "e2e-provenance",
            SCRIPT,
            task_extra='      env {\n        GREETING = "hello-provenance"\n      }',
            config_extra=f'datasets = ["{dataset}:/data"]',
        ).replace(f'"{IMAGE}"', f'"{image}"')
        job_id = cluster.run_job(spec)
        alloc = cluster.wait_alloc(job_id, {"complete", "failed"}, timeout=180)
        out = cluster.alloc_logs(alloc["ID"], "t")
        assert alloc["ClientStatus"] == "complete", events_text(cluster, alloc)
        assert "Provenance: sha256:" in events_text(cluster, alloc)
        shown = subprocess.run(
            [*PYHPC, "provenance", alloc["ID"][:8], "--json"],
            capture_output=True, text=True, env=cluster.env, timeout=60,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        data = json.loads(shown.stdout)
        assert data["image"]["reference"] == str(image)
        assert data["image"]["digest"].startswith("sha256:")
        assert data["command"] == ["/bin/sh", "-c", SCRIPT]
        # A jobspec's (or a template's) variable by name only; the site's and Nomad's shown.
        assert "GREETING" in data["env_withheld"] and "hello-provenance" not in shown.stdout
        assert data["env"]["PYHPC_SITE"] == "testbed"  # the test bed's default_env
        assert data["env"]["NOMAD_ALLOC_ID"] == alloc["ID"]
        [mounted] = [m for m in data["mounts"] if m["path"] == "/data"]
        assert mounted["dataset"]["digest"].startswith("sha256:") and mounted["read_only"]
        where = data["where"]
        assert (where["job"], where["task"], where["alloc_id"]) == (
            "e2e-provenance",
            "t",
            alloc["ID"],
        )
        assert where["region"] and where["datacenter"] and where["node"]
        assert "Nomad v1.6.3" in data["host"]["nomad"]
        assert data["host"]["kernel"] and data["host"]["cpu_model"] and "gpu" in data["host"]
        assert data["limits"]["memory_bytes"] == 64 << 20 and data["limits"]["cpu_shares"]
        assert data["exit"] == {"code": 0, "signal": 0, "oom_killed": False, "error": ""}
        human = subprocess.run(
            [*PYHPC, "provenance", alloc["ID"]], capture_output=True, text=True,
            env=cluster.env, timeout=60,
        )  # fmt: skip
        assert f"image      {data['image']['digest']}" in human.stdout, human.stderr
        # The attack (red team): the task (or anyone who can write alloc/logs) rewrites the
        # copy there; the digest in the driver's events, which the task cannot write, tells.
        copy = Path(data["where"]["alloc_dir"]) / "alloc" / "logs" / "t.provenance.json"
        forged = json.loads(copy.read_text())
        forged["image"]["digest"] = "sha256:" + "f" * 64
        copy.write_text(json.dumps(forged, indent=1, sort_keys=True) + "\n")
        caught = subprocess.run(
            [*PYHPC, "provenance", alloc["ID"]], capture_output=True, text=True,
            env=cluster.env, timeout=60,
        )  # fmt: skip
        assert caught.returncode == 1 and "is not the record the driver wrote" in caught.stderr
        assert "ffffffff" not in caught.stdout
        cluster.stop_job(job_id)

        record = tmp_path / "task.provenance.json"
        record.write_text(shown.stdout)
        replayed = subprocess.run(
            [*PYHPC, "run", "--replay", str(record), "--env", "GREETING=hello-provenance"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert (replayed.returncode, replayed.stdout) == (0, out), replayed.stderr
        with open(image, "r+b") as f:  # other bytes under the same path
            f.seek(os.path.getsize(image) - 1)
            f.write(b"\x01")
        refused = subprocess.run(
            [*PYHPC, "run", "--replay", str(record), "--env", "GREETING=x"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert refused.returncode != 0 and "the image changed: recorded" in refused.stderr
    finally:
        image.unlink(missing_ok=True)
