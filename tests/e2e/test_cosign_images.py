"""cosign-signed images through the real Nomad: the test bed's rule puts
docker://127.0.0.1:5000/cosigned/ under "cosign", trusting $STATE/cosign/cosign.pub and the Vault
transit key pyhpc-cosign (cosign's hashivault://). An image signed by the real cosign binary runs,
with the verified digest in its events; the same image with no signature beside it is refused,
saying why."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from test_foundation import IMAGE, events_text, refused
from test_images import REGISTRY, image_job

from nomad_driver.images.registry import Registry
from tests.images.ocitools import layout_from_dir, skopeo_push
from tests.signing.test_cosign import PASSWORD, cosign_binary

STATE = Path(os.environ.get("PYHPC_CLUSTER_DIR", "/tmp/pyhpc-cluster"))
CONFIG = {"Env": ["PATH=/bin"], "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo cosigned-ok"]}


def cosign(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    done = subprocess.run(
        [cosign_binary(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "COSIGN_PASSWORD": PASSWORD, **(env or {})},
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def images(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One image under three fresh repositories: signed with the PEM key, signed with the
    Vault key, and not signed at all."""
    work = tmp_path_factory.mktemp("e2e-cosign")
    keys = STATE / "cosign"
    keys.mkdir(exist_ok=True)
    if not (keys / "cosign.pub").exists():
        cosign("generate-key-pair", cwd=keys)
    (keys / "cosign.pub").chmod(0o644)
    vault = {"VAULT_ADDR": cluster.vault_addr, "VAULT_TOKEN": cluster.vault_token}
    mounted = requests.post(
        f"{cluster.vault_addr}/v1/sys/mounts/transit",
        json={"type": "transit"},
        headers={"X-Vault-Token": cluster.vault_token},
        timeout=10,
    )
    assert mounted.ok or "already in use" in mounted.text, mounted.text
    cosign("generate-key-pair", "--kms", "hashivault://pyhpc-cosign", env=vault, cwd=work)
    rootfs = work / "rootfs"
    subprocess.run(["unsquashfs", "-q", "-d", str(rootfs), IMAGE], check=True)
    layout = layout_from_dir(rootfs, work / "layout", CONFIG, "1")
    run = uuid.uuid4().hex[:8]
    repos = {k: f"cosigned/{k}-{run}" for k in ("pem", "vault", "unsigned")}
    for repository in repos.values():
        skopeo_push(layout, "1", f"docker://{REGISTRY}/{repository}:1")
    _, _, digest = Registry(REGISTRY).manifest(repos["pem"], "1")
    for kind, key in (("pem", str(keys / "cosign.key")), ("vault", "hashivault://pyhpc-cosign")):
        cosign(
            "sign", "--key", key, "--tlog-upload=false", "--yes", "--allow-http-registry",
            f"{REGISTRY}/{repos[kind]}@{digest}", env=vault,
        )  # fmt: skip
    return {"digest": digest, **{k: f"docker://{REGISTRY}/{v}:1" for k, v in repos.items()}}


@pytest.mark.parametrize(("kind", "key"), [("pem", "cosign.pub"), ("vault", "hashivault://")])
def test_an_image_cosign_signed_runs_with_the_verified_digest_in_its_events(
    cluster: Any, images: dict[str, str], kind: str, key: str
) -> None:
    job_id = cluster.run_job(image_job(f"e2e-cosign-{kind}", images[kind]))
    alloc = cluster.wait_alloc(job_id, {"complete", "failed"}, timeout=180)
    text = events_text(cluster, alloc)
    cluster.stop_job(job_id)
    assert alloc["ClientStatus"] == "complete", text
    assert f"cosign signature of {images['digest']} verified with" in text and key in text
    assert cluster.alloc_logs(alloc["ID"], "t").strip() == "cosigned-ok"


def test_the_same_image_without_its_signature_is_refused_saying_why(
    cluster: Any, images: dict[str, str]
) -> None:
    alloc = refused(
        cluster,
        image_job("e2e-cosign-unsigned", images["unsigned"]),
        f"cosign signature check failed: no cosign signature for {images['digest'][:19]}",
    )
    assert "trusted cosign keys:" in events_text(cluster, alloc)
