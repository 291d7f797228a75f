"""Signature policy through the real Nomad and the test bed's Vault: the cluster's plugin config
enforces signatures for docker://127.0.0.1:5000/signed/ and warns for .../warned/."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from test_foundation import IMAGE, events_text, refused
from test_images import REGISTRY, image_job

from tests.images.ocitools import layout_from_dir, skopeo_push

CLI = [sys.executable, "-m", "nomad_driver.cli.main"]
ENV = {**os.environ, "VAULT_ADDR": "http://127.0.0.1:8200", "VAULT_TOKEN": "root"}
CONFIG = {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh", "-c", "echo signed-and-running"]}


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    subprocess.run(
        [*CLI, "vault", "setup", "--key", "pyhpc-images"], env=ENV, check=True, capture_output=True
    )
    work = tmp_path_factory.mktemp("e2e-signing")
    rootfs = work / "rootfs"
    subprocess.run(["unsquashfs", "-q", "-d", str(rootfs), IMAGE], check=True)
    tag = uuid.uuid4().hex[:8]
    names = {
        "signed": f"docker://{REGISTRY}/signed/app-{tag}:1",
        "unsigned": f"docker://{REGISTRY}/signed/other-{tag}:1",  # enforced, never signed
        "warned": f"docker://{REGISTRY}/warned/app-{tag}:1",
    }
    for kind, ref in names.items():
        # Different content each: signatures bind content, and the store shares equal images.
        (rootfs / "etc" / "image-kind").write_text(f"{kind} {tag}\n")
        skopeo_push(layout_from_dir(rootfs, work / f"layout-{kind}", CONFIG, "1"), "1", ref)
    # Import and sign on the node (its store), as an operator would after review.
    store = ["--store", "/var/lib/pyhpc/store"]
    subprocess.run(
        [*CLI, "image", *store, "import", names["signed"]], check=True, capture_output=True
    )
    signed = subprocess.run(
        [*CLI, "image", *store, "sign", names["signed"], "--key", "pyhpc-images"],
        env=ENV,
        check=True,
        capture_output=True,
        text=True,
    )
    assert "with transit/pyhpc-images v" in signed.stdout
    return names


def test_a_signed_image_runs_under_enforce_with_provenance_in_events(
    cluster: Any, repos: dict[str, str]
) -> None:
    job_id = cluster.run_job(image_job("e2e-signed", repos["signed"]))
    alloc = cluster.wait_alloc(job_id, {"complete", "failed"})
    text = events_text(cluster, alloc)
    assert alloc["ClientStatus"] == "complete", text
    assert "verified: signed with transit/pyhpc-images v1" in text and "pyhpc 0." in text
    assert cluster.alloc_logs(alloc["ID"], "t").strip() == "signed-and-running"
    cluster.stop_job(job_id)


def test_an_unsigned_image_is_refused_under_enforce(cluster: Any, repos: dict[str, str]) -> None:
    refused(
        cluster,
        image_job("e2e-unsigned", repos["unsigned"]),
        "signature check failed (signature_mode enforce): image",
    )


def test_an_unsigned_image_starts_with_a_warning_under_warn(
    cluster: Any, repos: dict[str, str]
) -> None:
    job_id = cluster.run_job(image_job("e2e-warned", repos["warned"]))
    alloc = cluster.wait_alloc(job_id, {"complete", "failed"})
    text = events_text(cluster, alloc)
    assert alloc["ClientStatus"] == "complete", text
    assert (
        "WARNING: signature check failed, starting anyway (warn)" in text
        and "is not signed" in text
    )
    cluster.stop_job(job_id)


def test_the_signed_example_runs_a_signed_image_given_as_a_variable(
    cluster: Any, repos: dict[str, str]
) -> None:
    spec = Path(__file__).resolve().parents[2] / "jobspecs" / "signed.nomad"
    cluster.nomad("job", "run", "-detach", "-var", f"image={repos['signed']}", str(spec))
    alloc = cluster.wait_alloc("signed", {"complete", "failed"})
    text = events_text(cluster, alloc, "run")
    assert alloc["ClientStatus"] == "complete", text
    assert "verified: signed with transit/pyhpc-images" in text
    assert cluster.alloc_logs(alloc["ID"], "run").strip() == "signed-and-running"
    cluster.stop_job("signed")
    unsigned = cluster.nomad(
        "job", "run", "-detach", "-var", f"image={repos['unsigned']}", str(spec)
    )
    assert unsigned.returncode == 0
    refused_alloc = cluster.wait_alloc("signed", {"failed"}, fail_fast=False)
    assert "signature check failed" in events_text(cluster, refused_alloc, "run")
    cluster.stop_job("signed")
