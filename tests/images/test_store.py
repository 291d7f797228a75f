"""Importing into the store from every source, through a real registry too; atomic, once per
reference, with provenance; prune never touches an image in use."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from nomad_driver.images import publish
from nomad_driver.images.credentials import Credentials
from nomad_driver.images.registry import Registry
from nomad_driver.images.store import Store, StoredImage, StoreError
from tests.images.ocitools import layer_tar, sha, write_layout
from tests.images.test_merge import BASE, TOP, UPPER
from tests.registry import run_registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="imports keep ownership: root")
CONFIG = {
    "Env": ["PATH=/usr/bin:/bin", "GREETING=hi"],
    "Entrypoint": ["/usr/bin/tool"],
    "Cmd": ["--help"],
    "WorkingDir": "/etc",
    "User": "0",
}


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    blobs = [layer_tar(BASE), layer_tar(UPPER), layer_tar(TOP)]
    return write_layout(tmp_path_factory.mktemp("layout") / "img", blobs, CONFIG, tag="1.0")


def listing(path: str) -> list[str]:
    out = subprocess.run(["unsquashfs", "-lln", path], check=True, capture_output=True, text=True)
    return sorted(
        " ".join(line.split()[:2] + line.split()[5:]) for line in out.stdout.splitlines()[1:]
    )


def test_oci_layout_and_archive_give_the_same_image_with_provenance(
    tmp_path: Path, layout: Path
) -> None:
    store = Store(str(tmp_path / "store"))
    first = store.ensure(f"oci:{layout}:1.0")
    archive = tmp_path / "img.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(layout, arcname=".")
    second = store.ensure(f"oci-archive:{archive}:1.0")
    assert first.digest == second.digest  # reproducible: same layers, same SquashFS
    assert first.config["Entrypoint"] == ["/usr/bin/tool"] and first.config["WorkingDir"] == "/etc"
    assert first.meta["manifest_digest"].startswith("sha256:")
    assert first.meta["source"] == f"oci:{layout}:1.0"
    assert os.stat(first.path).st_mode & 0o222 == 0  # read-only in the store
    assert [p.name for p in (tmp_path / "store" / "tmp").iterdir()] == []


def test_docker_archive_and_dir_and_squashfs_sources(tmp_path: Path, busybox_image: Path) -> None:
    store = Store(str(tmp_path / "store"))
    layer = layer_tar([("bin/hello", "file", b"hi\n")], compress=False)
    config = json.dumps(
        {"config": {"Cmd": ["/bin/hello"]}, "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}
    ).encode()
    archive = tmp_path / "saved.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in (
            ("abc/layer.tar", layer),
            ("cfg.json", config),
            (
                "manifest.json",
                json.dumps(
                    [{"Config": "cfg.json", "RepoTags": ["x:1"], "Layers": ["abc/layer.tar"]}]
                ).encode(),
            ),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, __import__("io").BytesIO(data))
    saved = store.ensure(f"docker-archive:{archive}")
    assert "bin/hello" in " ".join(listing(saved.path)) and saved.config["Cmd"] == ["/bin/hello"]
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "x").write_text("x")
    assert "etc/x" in " ".join(listing(store.ensure(f"dir:{rootfs}").path))
    copied = store.ensure(str(busybox_image))
    assert copied.digest == sha(busybox_image.read_bytes())


def test_a_bad_layer_leaves_nothing_and_a_retry_works(tmp_path: Path, layout: Path) -> None:
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-a", str(layout), str(broken)], check=True)
    manifest_digest = json.loads((broken / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((broken / "blobs/sha256" / manifest_digest.split(":")[1]).read_text())
    blob = broken / "blobs/sha256" / manifest["layers"][1]["digest"].split(":")[1]
    good = blob.read_bytes()
    store = Store(str(tmp_path / "store"))
    for damage, message in (
        (good[: len(good) // 2], "layer 2 sha256:.*not a readable tar stream"),  # truncated
        (layer_tar([("other", "file", b"o")]), "layer 2 sha256:.*digest mismatch"),  # swapped
    ):
        blob.write_bytes(damage)
        with pytest.raises(StoreError, match=message):
            store.ensure(f"oci:{broken}:1.0")
        assert store.images() == [] and list((tmp_path / "store" / "tmp").iterdir()) == []
    blob.write_bytes(good)
    assert store.ensure(f"oci:{broken}:1.0").digest


def test_traversal_layer_is_refused_naming_layer_and_path(tmp_path: Path) -> None:
    evil = write_layout(
        tmp_path / "evil",
        [layer_tar([("ok", "file", b"")]), layer_tar([("../../etc/pwned", "file", b"x")])],
    )
    with pytest.raises(StoreError, match=r"layer 2 sha256:.*'../../etc/pwned' climbs out"):
        Store(str(tmp_path / "store")).ensure(f"oci:{evil}:latest")
    assert not Path("/etc/pwned").exists()


@pytest.mark.parametrize(
    ("auth", "tls"),
    [(False, False), (True, False), (True, True)],
    ids=["plain", "auth", "auth+tls"],
)
def test_registry_pull_push_and_pull_back(
    tmp_path: Path, layout: Path, auth: bool, tls: bool
) -> None:
    with run_registry(tmp_path / "registry", auth=auth, tls=tls) as reg:
        env = {"SSL_CERT_FILE": reg.ca_file} if tls else {}
        creds = ["--dest-creds", f"{reg.username}:{reg.password}"] if auth else []
        subprocess.run(
            [
                "skopeo",
                "copy",
                "--quiet",
                *creds,
                f"--dest-tls-verify={'true' if tls else 'false'}",
                *(["--dest-cert-dir", str(Path(reg.ca_file).parent)] if tls else []),
                f"oci:{layout}:1.0",
                f"docker://{reg.host}/team/app:1.0",
            ],
            check=True,
            capture_output=True,
            env={**os.environ, **env},
        )
        client = Registry(
            reg.host,
            Credentials(reg.username, reg.password) if auth else None,
            insecure=not tls,
            ca_file=reg.ca_file or None,
        )
        store = Store(str(tmp_path / "store"))
        pulled = store.ensure(f"docker://{reg.host}/team/app:1.0", registry=client)
        local = Store(str(tmp_path / "local")).ensure(f"oci:{layout}:1.0")
        assert pulled.digest == local.digest  # same layers, same image, by either road
        pushed = publish.push(pulled, f"oras://{reg.host}/team/app-sqsh:1.0", registry=client)
        other = Store(str(tmp_path / "other")).ensure(
            f"oras://{reg.host}/team/app-sqsh:1.0", registry=client
        )
        assert other.digest == pulled.digest and "@sha256:" in pushed
        assert other.config["Entrypoint"] == ["/usr/bin/tool"]
        if auth:
            anonymous = Registry(
                reg.host,
                Credentials("tester", "wrong"),
                insecure=not tls,
                ca_file=reg.ca_file or None,
            )
            with pytest.raises(StoreError, match="authentication failed"):
                Store(str(tmp_path / "anon")).ensure(
                    f"docker://{reg.host}/team/app:1.0", registry=anonymous
                )


def test_concurrent_imports_of_one_reference_happen_once(tmp_path: Path, layout: Path) -> None:
    store = Store(str(tmp_path / "store"))
    calls: list[str] = []
    results: list[str] = []

    def work() -> None:
        results.append(store.ensure(f"oci:{layout}:1.0", progress=calls.append).digest)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 3
    assert sum(1 for c in calls if c.startswith("merging")) == 1


def test_prune_and_rm_never_touch_an_image_in_use(
    tmp_path: Path, layout: Path, busybox_image: Path
) -> None:
    store = Store(str(tmp_path / "store"))
    used = store.ensure(str(busybox_image))
    other = store.ensure(f"oci:{layout}:1.0")
    with pytest.raises(StoreError, match="in use by a running task"):
        store.remove(str(busybox_image), lambda d: d == used.digest)
    assert os.path.exists(used.path)
    assert store.prune(lambda d: d == used.digest, everything=True) == [other.digest]
    assert os.path.exists(used.path) and not os.path.exists(other.path)


@pytest.mark.parametrize(("disk", "noise"), [("64k", 1 << 20), ("16m", 48 << 20)])
def test_a_full_store_disk_fails_clearly_and_leaves_nothing(
    tmp_path: Path, disk: str, noise: int
) -> None:
    """tar2sqfs says only "I/O error" and deletes its output: the store tells a full disk by
    the size the output reached (16 MB filled in a moment, between two samples of it)."""
    big = write_layout(tmp_path / "big", [layer_tar([("noise", "file", os.urandom(noise))])])
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={disk}", "tmpfs", str(small)], check=True)
    try:
        store = Store(str(small / "store"))
        with pytest.raises(StoreError, match="no space left in the store"):
            store.ensure(f"oci:{big}:latest")
        assert store.images() == [] and list((small / "store" / "tmp").iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_truncated_download_is_refused_and_a_retry_works(tmp_path: Path, layout: Path) -> None:
    with run_registry(tmp_path / "registry") as reg:
        subprocess.run(
            [
                "skopeo",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                f"oci:{layout}:1.0",
                f"docker://{reg.host}/team/app:1.0",
            ],
            check=True,
            capture_output=True,
        )
        index = json.loads((layout / "index.json").read_text())
        manifest = json.loads(
            (layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text()
        )
        layer = manifest["layers"][0]["digest"][7:]
        biggest = next(
            (tmp_path / "registry" / "data").rglob(f"blobs/sha256/{layer[:2]}/{layer}/data")
        )
        good = biggest.read_bytes()
        biggest.write_bytes(good[: len(good) // 2])
        store = Store(str(tmp_path / "store"))
        with pytest.raises(
            StoreError, match=r"layer 1 sha256:.*truncated: \d+ of \d+ bytes arrived"
        ):
            store.ensure(f"docker://{reg.host}/team/app:1.0")
        assert store.images() == [] and list((tmp_path / "store" / "tmp").iterdir()) == []
        biggest.write_bytes(good)
        assert store.ensure(f"docker://{reg.host}/team/app:1.0").digest


def test_a_multi_arch_index_resolves_to_this_nodes_platform(tmp_path: Path, layout: Path) -> None:
    """An index naming several platforms; only linux/<this machine> is importable."""
    index = json.loads((layout / "index.json").read_text())
    image = index["manifests"][0]
    machine = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    multi = tmp_path / "multi"
    subprocess.run(["cp", "-a", str(layout), str(multi)], check=True)
    nested = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {**image, "annotations": {}, "platform": {"os": "linux", "architecture": "s390x"}},
            {**image, "annotations": {}, "platform": {"os": "linux", "architecture": machine}},
        ],
    }
    data = json.dumps(nested).encode()
    (multi / "blobs/sha256" / sha(data)[7:]).write_bytes(data)
    top = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": nested["mediaType"],
                "digest": sha(data),
                "size": len(data),
                "annotations": {"org.opencontainers.image.ref.name": "multi"},
            }
        ],
    }
    (multi / "index.json").write_text(json.dumps(top))
    got = Store(str(tmp_path / "store")).ensure(f"oci:{multi}:multi")
    assert got.digest == Store(str(tmp_path / "s2")).ensure(f"oci:{layout}:1.0").digest
    nested["manifests"] = nested["manifests"][:1]  # s390x only
    data = json.dumps(nested).encode()
    (multi / "blobs/sha256" / sha(data)[7:]).write_bytes(data)
    top["manifests"][0].update(digest=sha(data), size=len(data))
    (multi / "index.json").write_text(json.dumps(top))
    with pytest.raises(StoreError, match=f"no linux/{machine} image in the index .*linux/s390x"):
        Store(str(tmp_path / "s3")).ensure(f"oci:{multi}:multi")


def test_an_image_larger_than_the_cap_is_refused_and_leaves_nothing(
    tmp_path: Path, layout: Path
) -> None:
    store = Store(str(tmp_path / "store"), max_bytes=1000)
    with pytest.raises(StoreError, match=r"is larger than the store's cap of 0\.0 MB"):
        store.ensure(f"oci:{layout}:1.0")
    assert store.images() == [] and list((tmp_path / "store" / "tmp").iterdir()) == []


def test_a_damaged_stored_image_is_found_removed_and_imported_again(
    tmp_path: Path, layout: Path
) -> None:
    store = Store(str(tmp_path / "store"))
    good = store.ensure(f"oci:{layout}:1.0")
    digests = tmp_path / "store" / "digests"
    assert len(list(digests.iterdir())) == 1  # the import recorded the digest: no second read
    os.chmod(good.path, 0o644)
    with open(good.path, "r+b") as f:  # one flipped byte in the middle, as a bad disk would
        f.seek(os.path.getsize(good.path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    said: list[str] = []
    again = store.ensure(f"oci:{layout}:1.0", progress=said.append)
    assert again.digest == good.digest and again.path == good.path
    assert (
        subprocess.run(["sha256sum", again.path], capture_output=True, text=True).stdout.split()[0]
        == good.digest.partition(":")[2]
    )
    assert any("no longer matches its digest (damaged on disk)" in s for s in said), said
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


def test_another_image_of_the_same_layers_never_changes_what_a_reference_runs(
    tmp_path: Path,
) -> None:
    """The attack (found by the red team): same layers, another config: the same SquashFS
    digest, so a store that kept one config per digest ran the attacker's Entrypoint, Env
    and User in the victim's task. Each reference keeps what its own import saw."""
    layers = [layer_tar(BASE)]
    victim = write_layout(tmp_path / "victim", layers, {**CONFIG, "Cmd": ["victim"]}, tag="1")
    evil = {**CONFIG, "Entrypoint": ["/bin/evil"], "Env": ["DB_PASSWORD=attacker-set"]}
    attacker = write_layout(tmp_path / "attacker", layers, evil, tag="1")
    store = Store(str(tmp_path / "store"))
    first = store.ensure(f"oci:{victim}:1")
    second = store.ensure(f"oci:{attacker}:1")
    assert first.digest == second.digest  # the same bytes
    again = store.ensure(f"oci:{victim}:1")
    assert again.config["Entrypoint"] == ["/usr/bin/tool"] and again.config["Cmd"] == ["victim"]
    assert "DB_PASSWORD=attacker-set" not in again.config.get("Env", [])
    assert again.meta["manifest_digest"] == first.meta["manifest_digest"]
    assert again.meta["manifest_digest"] != second.meta["manifest_digest"]
    assert store.ensure(f"oci:{attacker}:1").config["Entrypoint"] == ["/bin/evil"]  # control
    # A reference recorded before references kept their own is imported again, not trusted.
    key = next((tmp_path / "store" / "refs").glob("*.json"))
    legacy = json.loads(key.read_text())
    key.write_text(json.dumps({"ref": legacy["ref"], "digest": legacy["digest"]}))
    assert store.lookup(legacy["ref"], strict=True) is None
    assert store.ensure(legacy["ref"]).config["Entrypoint"] in (["/usr/bin/tool"], ["/bin/evil"])


def test_an_oras_artifacts_own_claims_are_kept_apart_from_what_the_import_saw(
    tmp_path: Path, layout: Path
) -> None:
    """An artifact's config is the pusher's word: its "provenance" must not become the
    digests this node checks signatures against (a forged resolved_digest vouched for
    unsigned bytes under a cosign rule)."""
    with run_registry(tmp_path / "registry") as reg:
        skopeo_copy = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
        subprocess.run(
            [*skopeo_copy, f"oci:{layout}:1.0", f"docker://{reg.host}/team/app:1"],
            check=True, capture_output=True,
        )  # fmt: skip
        store = Store(str(tmp_path / "store"))
        pulled = store.ensure(f"docker://{reg.host}/team/app:1")
        resolved = pulled.meta["provenance"]["resolved_digest"]
        assert resolved.startswith("sha256:")
        publish.push(pulled, f"oras://{reg.host}/team/app-sqsh:1")
        other = Store(str(tmp_path / "other")).ensure(f"oras://{reg.host}/team/app-sqsh:1")
        claims = other.meta["provenance"]["artifact"]
        assert claims["manifest_digest"] == pulled.meta["manifest_digest"]  # kept, apart
        assert "resolved_digest" not in other.meta["provenance"]
        assert "manifest_digest" not in other.meta["provenance"]


def test_a_local_reference_is_imported_again_when_another_tree_takes_its_path(
    tmp_path: Path,
) -> None:
    """The attack (red team): tenant B makes dir:/shared/app and runs it, deletes it; tenant
    A makes its own at the same path: the store served A the first import, B's bytes (for
    oci:, B's Entrypoint, Env and User). The control: an unchanged source is not imported
    again."""
    from nomad_driver.images.sources import LocalAccess

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(shared, 0o1777)
    access = LocalAccess(str(shared), public_only=True)
    store = Store(str(tmp_path / "store"))
    ref = f"dir:{shared}/app"

    def tree(who: str, uid: int) -> None:
        root = shared / "app"
        root.mkdir(mode=0o755)
        (root / "WHO").write_text(who)
        (root / "WHO").chmod(0o644)
        os.lchown(root / "WHO", uid, 100)
        os.chown(root, uid, 100)

    def who(image: StoredImage) -> str:
        out = subprocess.run(["unsquashfs", "-cat", image.path, "WHO"], capture_output=True)
        return out.stdout.decode()

    tree("tenant B", 1001)
    first = store.ensure(ref, local=access)
    assert who(first) == "tenant B"
    assert store.ensure(ref, local=access).digest == first.digest  # the control: a store hit
    shutil.rmtree(shared / "app")
    tree("tenant A", 1000)
    assert who(store.ensure(ref, local=access)) == "tenant A"


@pytest.mark.parametrize("entry", ["moving", "sha256:" + "A" * 64, None, "sha256:abc"])
def test_an_index_entry_must_name_its_manifest_by_digest(entry: str | None) -> None:
    """An index (pinned by digest) whose entry for this platform names a tag would be fetched
    by that tag, which its publisher can move after the pin: refused; a digest is taken."""
    from nomad_driver.images.registry import RegistryError, select_platform

    machine = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    platform = {"os": "linux", "architecture": machine}
    with pytest.raises(RegistryError, match=f"index entry for linux/{machine} has digest"):
        select_platform({"manifests": [{"digest": entry, "platform": platform}]}, "ref")
    good = "sha256:" + "a" * 64
    assert select_platform({"manifests": [{"digest": good, "platform": platform}]}, "ref") == good


@pytest.mark.parametrize(
    ("diff_ids", "message"),
    [
        (["sha256:" + "0" * 64], "uncompressed content does not match sha256:000"),
        ([], "1 layers but 0 rootfs.diff_ids"),
        (["moving"], "rootfs.diff_ids are not all sha256 digests"),
    ],
)
def test_the_configs_diff_ids_are_checked_against_each_layer(
    tmp_path: Path, diff_ids: list[str], message: str
) -> None:
    """An image whose config names other uncompressed content than its layers hold is refused
    (the image's identity rests on both); the same image with the right diff_ids imports."""
    layer = layer_tar([("etc/motd", "file", b"hi\n")])
    bad = write_layout(tmp_path / "bad", [layer], tag="1", diff_ids=diff_ids)
    with pytest.raises(StoreError, match=message):
        Store(str(tmp_path / "s1")).ensure(f"oci:{bad}:1")
    good = write_layout(tmp_path / "good", [layer], tag="1")
    assert Store(str(tmp_path / "s2")).ensure(f"oci:{good}:1").digest
