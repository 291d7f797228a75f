"""The image store and registry pulls on the test bed: an import through a flaky proxy in front
of the test bed's registry (127.0.0.1:5000), an ORAS artifact named as docker://, the issue's
sign and verify of one digest under two names with the test bed's Vault, and eviction under a
cap that spares the image a running Nomad task uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from test_foundation import IMAGE, events_text, refused, running_alloc
from test_images import REGISTRY, image_job

from nomad_driver.images.store import Store
from tests.images.flaky import flaky_proxy
from tests.images.ocitools import layout_from_dir, skopeo_push

NODE_STORE = "/var/lib/pyhpc/store"
CONFIG = {"Env": ["PATH=/bin"], "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo from-the-store"]}
VAULT = {**os.environ, "VAULT_ADDR": "http://127.0.0.1:8200", "VAULT_TOKEN": "root"}


def image_cli(store: Path | str, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "nomad_driver.cli.main", "image", "--store", str(store), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A fresh repository (REPO:1) and the OCI layout it was pushed from."""
    work = tmp_path_factory.mktemp("e2e-store")
    rootfs = work / "rootfs"
    subprocess.run(["unsquashfs", "-q", "-d", str(rootfs), IMAGE], check=True)
    (rootfs / "etc" / "image-kind").write_text(f"store {uuid.uuid4().hex}\n")  # its own digest
    layout = layout_from_dir(rootfs, work / "layout", CONFIG, "1")
    name = f"e2e/store-{uuid.uuid4().hex[:8]}"
    skopeo_push(layout, "1", f"docker://{REGISTRY}/{name}:1")
    return name, layout


def test_an_import_rides_out_a_flaky_proxy_and_a_dead_one_ends_in_its_timeout(
    cluster: Any, pushed: tuple[str, Path], tmp_path: Path
) -> None:
    name = pushed[0]
    direct = image_cli(tmp_path / "direct", "import", f"docker://{REGISTRY}/{name}:1")
    assert direct.returncode == 0, direct.stderr
    faults = ["drop", "429", "503", "cut", "drop", "503", "cut"]
    with flaky_proxy(REGISTRY, faults) as proxy:
        flaky = image_cli(tmp_path / "flaky", "import", f"docker://{proxy.host}/{name}:1")
    assert flaky.returncode == 0, flaky.stderr
    assert flaky.stdout.split()[0] == direct.stdout.split()[0]  # the same image
    assert proxy.faults == []
    resumed = [s for s in proxy.seen if s.range]
    assert len(resumed) >= 2 and all(s.status == 206 for s in resumed), proxy.seen

    with flaky_proxy(REGISTRY, forever="503") as proxy:
        started = time.monotonic()
        dead = image_cli(
            tmp_path / "dead", "import", "--pull-timeout", "3s", f"docker://{proxy.host}/{name}:1"
        )
        took = time.monotonic() - started
    assert dead.returncode == 1 and took < 10, (took, dead.stderr)
    line = one_line(dead.stderr)
    assert line.startswith(
        f"pyhpc image: importing docker://{proxy.host}/{name}:1: registry {proxy.host}: "
        f"manifest {name}:1: HTTP 503 (Service Unavailable); gave up after "
    )
    assert line.endswith("(pull timeout 3s)"), line
    assert not list((tmp_path / "dead" / "tmp").iterdir())


def test_an_oras_artifact_named_as_docker_says_to_use_oras(
    cluster: Any, pushed: tuple[str, Path], tmp_path: Path
) -> None:
    name = pushed[0]
    store = tmp_path / "store"
    assert image_cli(store, "import", f"docker://{REGISTRY}/{name}:1").returncode == 0
    pushed_out = image_cli(
        store, "push", f"docker://{REGISTRY}/{name}:1", f"oras://{REGISTRY}/{name}-sqsh:1"
    )
    assert pushed_out.returncode == 0, pushed_out.stderr
    wrong = image_cli(tmp_path / "other", "import", f"docker://{REGISTRY}/{name}-sqsh:1")
    line = one_line(wrong.stderr)
    assert wrong.returncode == 1 and "truncated" not in line
    assert line.endswith(
        f"this is an oras:// artifact (a SquashFS pushed by pyhpc), not a "
        f"container image; use oras://{REGISTRY}/{name}-sqsh:1"
    ), line
    refused(
        cluster,
        image_job("e2e-oras-as-docker", f"docker://{REGISTRY}/{name}-sqsh:1"),
        f"this is an oras:// artifact (a SquashFS pushed by pyhpc), not a container image; use "
        f"oras://{REGISTRY}/{name}-sqsh:1",
    )


def test_the_issue_sign_as_docker_and_verify_after_an_oci_import_of_the_same_digest(
    cluster: Any, pushed: tuple[str, Path], tmp_path: Path
) -> None:
    name, layout = pushed
    subprocess.run(
        [sys.executable, "-m", "nomad_driver.cli.main", "vault", "setup", "--key", "pyhpc-images"],
        env=VAULT,
        check=True,
        capture_output=True,
    )
    store = tmp_path / "store"
    docker, oci = f"docker://{REGISTRY}/{name}:1", f"oci:{layout}:1"
    first, second = image_cli(store, "import", docker), image_cli(store, "import", oci)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.split()[0] == second.stdout.split()[0]  # one digest, two names
    signed = image_cli(store, "sign", docker, "--key", "pyhpc-images", env=VAULT)
    assert signed.returncode == 0 and f"as {docker} with transit/pyhpc-images" in signed.stdout
    for name_given in (docker, oci):
        checked = image_cli(store, "verify", name_given, "--key", "pyhpc-images", env=VAULT)
        assert checked.returncode == 0, checked.stderr
        assert json.loads(checked.stdout)["signed_reference"] == docker


def test_eviction_under_a_cap_spares_the_image_a_running_task_uses(
    cluster: Any, pushed: tuple[str, Path], tmp_path: Path
) -> None:
    name = pushed[0]
    ref = f"docker://{REGISTRY}/{name}:1"
    job_id = cluster.run_job(
        image_job("e2e-evict", ref, "echo running; while [ ! -e /alloc/go ]; do sleep 0.2; done")
    )
    try:
        alloc = running_alloc(cluster, job_id, "running", timeout=180)
        node = Store(NODE_STORE)
        running = node.lookup(ref)
        assert running is not None and node.used(running.digest), events_text(cluster, alloc)
        listed = image_cli(NODE_STORE, "ls").stdout
        assert any(
            line.startswith(running.digest[:19]) and " yes " in line for line in listed.splitlines()
        ), listed

        victim_dir, newcomer_dir = tmp_path / "victim", tmp_path / "newcomer"
        for path, size in ((victim_dir, 256 << 10), (newcomer_dir, 64 << 10)):
            path.mkdir()
            (path / "noise").write_bytes(os.urandom(size))
        victim = node.ensure(f"dir:{victim_dir}")
        oldest = min(node.last_used(image.digest) for image in node.images())
        for image, when in ((running, oldest - 2), (victim, oldest - 1)):  # the two LRU
            os.utime(Path(NODE_STORE) / "meta" / f"{image.digest[7:]}.json", (when, when))
        stored = sum(p.stat().st_size for p in Path(NODE_STORE, "sha256").glob("*.sqsh"))
        capped = Store(NODE_STORE, max_bytes=stored + (32 << 10))  # the newcomer won't fit
        said: list[str] = []
        newcomer = capped.ensure(f"dir:{newcomer_dir}", said.append)
        present = {image.digest for image in node.images()}
        assert running.digest in present and newcomer.digest in present
        assert victim.digest not in present, said
        assert [s[:27] for s in said if s.startswith("evicted")] == [
            f"evicted {victim.digest[:19]}"
        ]
        node.remove(f"dir:{newcomer_dir}")
    finally:
        cluster.stop_job(job_id)
        for meta in Path(NODE_STORE, "meta").glob("*.json"):
            if meta.stat().st_mtime < time.time() - 10 * 365 * 86400:
                os.utime(meta)  # no image left looking unused since long ago for other tests


def test_the_periodic_gc_deletes_what_went_unused_for_min_age_never_a_running_tasks_image(
    cluster: Any, pushed: tuple[str, Path], tmp_path: Path
) -> None:
    """The test bed runs the GC every 10 s (image_gc_interval, checked at each 30 s
    fingerprint) with the default image_gc_min_age of 24 h."""
    ref = f"docker://{REGISTRY}/{pushed[0]}:1"
    job_id = cluster.run_job(
        image_job("e2e-gc", ref, "echo running; while [ ! -e /alloc/go ]; do sleep 0.2; done")
    )
    node = Store(NODE_STORE)
    try:
        running_alloc(cluster, job_id, "running", timeout=180)
        running = node.lookup(ref)
        assert running is not None and node.used(running.digest)
        stale_dir, recent_dir = tmp_path / "stale", tmp_path / "recent"
        for path in (stale_dir, recent_dir):
            path.mkdir()
            (path / "noise").write_bytes(os.urandom(32 << 10))
        stale, recent = node.ensure(f"dir:{stale_dir}"), node.ensure(f"dir:{recent_dir}")
        two_days_ago = time.time() - 2 * 86400
        for image in (running, stale):
            meta = Path(NODE_STORE) / "meta" / f"{image.digest[7:]}.json"
            os.utime(meta, (two_days_ago, two_days_ago))
        deadline = time.monotonic() + 120
        while stale.digest in {i.digest for i in node.images()} and time.monotonic() < deadline:
            time.sleep(2)
        present = {image.digest for image in node.images()}
        assert stale.digest not in present, "the GC never deleted the stale image"
        assert running.digest in present and recent.digest in present
        assert node.lookup(f"dir:{stale_dir}") is None
        node.remove(f"dir:{recent_dir}")
    finally:
        cluster.stop_job(job_id)
        image = node.lookup(ref)
        if image is not None:
            os.utime(Path(NODE_STORE) / "meta" / f"{image.digest[7:]}.json")
