"""Private registries through the real Nomad: a task's own `auth {}` block fed from a Vault-
style template secret, the node's credential helper (the test bed's docker-credential-
pyhpc-testbed, on the agent's PATH), and the shared store never handing a private image to a
task whose login the registry would refuse (the attack), while a task that may read it still
gets it from the store (the control)."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_foundation import IMAGE, events_text, job, refused

from tests.images.ocitools import layout_from_dir
from tests.registry import run_registry

PRIVATE = "127.0.0.1:5001"  # allowed by the test bed's image_sources (scripts/testbed/cluster.sh)
STATE = Path(os.environ.get("PYHPC_CLUSTER_DIR", "/tmp/pyhpc-cluster"))
LOGINS = STATE / "registry-logins.json"  # what the test bed's credential helper answers with
CONFIG = {"Env": ["PATH=/bin"], "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo private-ok"]}
SECRET_TEMPLATE = """
      template {
        data        = "REGISTRY_PASSWORD=@PASSWORD@\\n"
        destination = "secrets/registry.env"
        env         = true
      }
"""


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    """The private registry with one fresh repository, tagged once per test."""
    work = tmp_path_factory.mktemp("e2e-private")
    rootfs = work / "rootfs"
    subprocess.run(["unsquashfs", "-q", "-d", str(rootfs), IMAGE], check=True)
    layout = layout_from_dir(rootfs, work / "layout", CONFIG, "1")
    name = f"e2e/private-{uuid.uuid4().hex[:8]}"
    with run_registry(work / "registry", auth=True, port=int(PRIVATE.split(":")[1])) as reg:
        for tag in ("block", "helper"):
            subprocess.run(
                ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
                + ["--dest-creds", f"{reg.username}:{reg.password}"]
                + [f"oci:{layout}:1", f"docker://{PRIVATE}/{name}:{tag}"],
                check=True,
                capture_output=True,
            )
        try:
            yield reg, name
        finally:
            LOGINS.unlink(missing_ok=True)


def private_job(name: str, image: str, auth: str = "", extra: str = "") -> str:
    spec = job(name, "unused", command=None, config_extra=auth, task_extra=extra)
    return spec.replace(f'"{IMAGE}"', f'"{image}"').replace('args  = ["-c", "unused"]', "")


def run_to_end(cluster: Any, spec: str) -> tuple[dict[str, Any], str]:
    job_id = cluster.run_job(spec)
    alloc = cluster.wait_alloc(job_id, {"complete", "failed"}, timeout=180)
    out = cluster.alloc_logs(alloc["ID"], "t") if alloc["ClientStatus"] == "complete" else ""
    text = events_text(cluster, alloc)
    cluster.stop_job(job_id)
    return alloc, out + text


def test_a_task_logs_in_with_its_auth_block_and_the_password_is_never_shown(
    cluster: Any, private: tuple[Any, str]
) -> None:
    reg, name = private
    image = f"docker://{PRIVATE}/{name}:block"
    LOGINS.unlink(missing_ok=True)
    refused(cluster, private_job("e2e-auth-none", image), f"registry {PRIVATE} needs a login")
    auth = f'auth {{\n username = "{reg.username}"\n password = "${{REGISTRY_PASSWORD}}"\n }}'
    alloc, text = run_to_end(
        cluster,
        private_job(
            "e2e-auth-block", image, auth, SECRET_TEMPLATE.replace("@PASSWORD@", reg.password)
        ),
    )
    assert alloc["ClientStatus"] == "complete", text
    assert "private-ok" in text
    # Neither the events nor the plugin's log lines (in the agent's log) show it. (Nomad's own
    # template runner logs the template's text at DEBUG: that line is Nomad's, not ours.)
    assert reg.password not in text
    for log in (STATE / "logs").glob("nomad*.log"):
        ours = [line for line in log.read_text(errors="replace").splitlines() if "pyhpc" in line]
        assert ours and not [
            line for line in ours if reg.password in line and "(runner)" not in line
        ]


def test_the_node_helper_logs_in_and_the_store_keeps_a_private_image_private(
    cluster: Any, private: tuple[Any, str]
) -> None:
    reg, name = private
    image = f"docker://{PRIVATE}/{name}:helper"
    LOGINS.write_text(json.dumps({PRIVATE: [reg.username, reg.password]}))
    LOGINS.chmod(0o600)
    alloc, text = run_to_end(cluster, private_job("e2e-auth-helper", image))
    assert alloc["ClientStatus"] == "complete", text
    assert "private-ok" in text and "Image: merging" in text
    # The attack: the helper no longer has a login (another tenant, without one, names the
    # image the node already stored). The store asks the registry first, and it says no.
    LOGINS.unlink()
    refused(cluster, private_job("e2e-auth-attack", image), "is private, and its registry")
    wrong = 'auth {\n username = "tester"\n password = "not-the-password"\n }'
    refused(cluster, private_job("e2e-auth-wrong", image, wrong), "is private")
    # The control: a task whose login the registry takes gets the stored image, no new pull.
    right = f'auth {{\n username = "{reg.username}"\n password = "{reg.password}"\n }}'
    alloc, text = run_to_end(cluster, private_job("e2e-auth-right", image, right))
    assert alloc["ClientStatus"] == "complete", text
    assert "private-ok" in text and "Image: merging" not in text


def test_a_task_may_name_only_the_helpers_the_plugin_allows(
    cluster: Any, private: tuple[Any, str]
) -> None:
    _, name = private
    image = f"docker://{PRIVATE}/{name}:block"
    refused(
        cluster,
        private_job("e2e-auth-badhelper", image, 'auth {\n helper = "ecr-login"\n }'),
        "credential helper 'ecr-login' is not one of the plugin's auth.task_helpers",
    )
