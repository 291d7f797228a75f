"""Local sources are read by root for a tenant: beneath the allowed directory, never through a
symlink, never a file that not every user could read (unless root imports by hand). Each attack
is run next to its benign twin, so a broken setup cannot pass."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from nomad_driver.images.sources import LocalAccess
from nomad_driver.images.store import Store, StoreError
from tests.images.ocitools import layer_tar, write_layout

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="imports keep ownership: root")
SECRET = b"root-only-secret-4b1d\n"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """tmp_path/allowed (the admin's source directory, world-readable) with rootfs/ in it, and
    tmp_path/secret/shadow (root only, 0600) outside it."""
    os.chmod(tmp_path, 0o755)
    rootfs = tmp_path / "allowed" / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "hostname").write_text("benign\n")
    (rootfs / "sub").mkdir()
    (rootfs / "sub" / "data").write_text("public\n")
    for path in (tmp_path / "allowed", rootfs, rootfs / "etc", rootfs / "sub"):
        os.chmod(path, 0o755)
    for path in (rootfs / "etc" / "hostname", rootfs / "sub" / "data"):
        os.chmod(path, 0o644)
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    (secret / "shadow").write_bytes(SECRET)
    os.chmod(secret / "shadow", 0o600)
    return tmp_path


def extracted(image: str, into: Path) -> dict[str, bytes | str]:
    """Every entry of the image: a file's bytes, a symlink's target, '<dir>' or '<fifo>'."""
    subprocess.run(["unsquashfs", "-q", "-n", "-d", str(into), image], check=True)
    out: dict[str, bytes | str] = {}
    for top, dirs, files in os.walk(into):
        for name in dirs + files:
            path = os.path.join(top, name)
            rel = os.path.relpath(path, into)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                out[rel] = os.readlink(path)
            elif stat.S_ISDIR(mode):
                out[rel] = "<dir>"
            elif stat.S_ISFIFO(mode):
                out[rel] = "<fifo>"
            else:
                out[rel] = Path(path).read_bytes()
    return out


def no_secret(entries: dict[str, bytes | str]) -> bool:
    return not any(isinstance(v, bytes) and SECRET.strip() in v for v in entries.values())


def test_a_symlink_in_a_dir_source_is_recorded_and_never_followed(site: Path) -> None:
    rootfs = site / "allowed" / "rootfs"
    os.symlink(site / "secret" / "shadow", rootfs / "etc" / "shadow")
    os.symlink(site / "secret", rootfs / "secretdir")
    store = Store(str(site / "store"))
    # As root by hand (no readability rule): only not following the links keeps it out.
    image = store.ensure(f"dir:{rootfs}", local=LocalAccess(str(site / "allowed")))
    entries = extracted(image.path, site / "out")
    assert entries["etc/hostname"] == b"benign\n"  # the benign part is there
    assert entries["etc/shadow"] == str(site / "secret" / "shadow")  # a symlink, as it was
    assert entries["secretdir"] == str(site / "secret")
    assert no_secret(entries)


RACER = """
import os, sys, time
sub, real, link_to = sys.argv[1:4]
swaps, end = 0, time.monotonic() + float(sys.argv[4])
while time.monotonic() < end:
    os.rename(sub, real)
    os.symlink(link_to, sub)
    os.unlink(sub)
    os.rename(real, sub)
    swaps += 1
print(swaps)
"""


def test_a_subdirectory_swapped_for_a_symlink_mid_import_never_brings_the_secret_in(
    site: Path,
) -> None:
    rootfs = site / "allowed" / "rootfs"
    for i in range(200):  # a tree that takes a while to walk: a wide race window
        (rootfs / "sub" / f"f{i:03}").write_text("x")
    (site / "secret" / "data").write_bytes(SECRET)  # the name the walker will look for
    store = Store(str(site / "store"))
    access = LocalAccess(str(site / "allowed"))
    benign = extracted(store.ensure(f"dir:{rootfs}", local=access).path, site / "benign")
    assert benign["sub/data"] == b"public\n"  # control: without a racer the tree is there
    racer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            RACER,
            str(rootfs / "sub"),
            str(rootfs / "sub.real"),
            str(site / "secret"),
            "120",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    outcomes = {"imported": 0, "refused": 0, "saw a swap": 0}
    try:
        for attempt in range(50):
            try:
                image = store.pull(f"dir:{rootfs}", local=access)
            except StoreError as err:
                assert "changed while it was read" in str(err) or "gone" in str(err), err
                outcomes["refused"] += 1
                outcomes["saw a swap"] += 1
                continue
            outcomes["imported"] += 1
            entries = extracted(image.path, site / f"out{attempt}")
            assert no_secret(entries), attempt
            if entries.get("sub") != "<dir>" or "sub.real" in entries:
                outcomes["saw a swap"] += 1  # the link (recorded, not followed) or the rename
    finally:
        racer.kill()
        racer.wait()
    assert outcomes["imported"] + outcomes["refused"] == 50
    assert outcomes["saw a swap"] > 0, outcomes  # the racer really raced the walker


def test_a_source_not_readable_by_every_user_is_refused_for_tasks_but_root_may_import_it(
    site: Path,
) -> None:
    rootfs = site / "allowed" / "rootfs"
    private = rootfs / "etc" / "private"
    private.write_bytes(SECRET)
    os.chmod(private, 0o600)
    store = Store(str(site / "store"))
    public_only = LocalAccess(str(site / "allowed"), public_only=True)
    with pytest.raises(StoreError, match=r"'etc/private' has mode 0600: .*readable by every user"):
        store.ensure(f"dir:{rootfs}", local=public_only)
    assert store.images() == []
    os.chmod(private, 0o644)
    os.chmod(rootfs / "sub", 0o700)  # a directory others cannot list: refused as well
    with pytest.raises(StoreError, match=r"'sub' has mode 0700"):
        store.ensure(f"dir:{rootfs}", local=public_only)
    os.chmod(rootfs / "sub", 0o755)
    assert store.ensure(f"dir:{rootfs}", local=public_only).digest  # control: all public
    os.chmod(private, 0o600)
    by_hand = Store(str(site / "store-by-hand")).ensure(f"dir:{rootfs}")  # root, by hand
    assert extracted(by_hand.path, site / "out")["etc/private"] == SECRET


def test_fifos_are_recorded_without_opening_and_device_nodes_refused(site: Path) -> None:
    rootfs = site / "allowed" / "rootfs"
    os.mkfifo(rootfs / "pipe")  # opening it for reading would block the import forever
    store = Store(str(site / "store"))
    image = store.ensure(f"dir:{rootfs}", local=LocalAccess(str(site / "allowed"), True))
    assert extracted(image.path, site / "out")["pipe"] == "<fifo>"
    os.mknod(rootfs / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    with pytest.raises(StoreError, match="device node 'null' is not allowed"):
        store.pull(f"dir:{rootfs}", local=LocalAccess(str(site / "allowed"), True))


def test_archives_and_layouts_are_opened_beneath_the_allowed_directory_without_symlinks(
    site: Path,
) -> None:
    allowed = site / "allowed"
    outside = site / "outside"
    outside.mkdir(mode=0o755)
    layout = write_layout(outside / "layout", [layer_tar([("hello", "file", b"hi\n")])])
    archive = outside / "img.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(layout, arcname=".")
    os.symlink(archive, allowed / "link.tar")
    os.symlink(layout, allowed / "linked-layout")
    subprocess.run(["cp", "-a", str(layout), str(allowed / "layout")], check=True)
    index = allowed / "layout" / "index.json"
    index.rename(allowed / "layout" / "index.real")
    os.symlink(allowed / "layout" / "index.real", index)  # even a link inside is not followed
    subprocess.run(["chmod", "-R", "a+rX", str(site)], check=True)
    store = Store(str(site / "store"))
    access = LocalAccess(str(allowed), public_only=True)
    for text in (
        f"oci-archive:{allowed}/link.tar",
        f"oci:{allowed}/linked-layout",
        f"oci:{allowed}/layout",
    ):
        with pytest.raises(StoreError, match="symlink, which an import never follows"):
            store.ensure(text, local=access)
    os.replace(archive, allowed / "img.tar")  # controls: the same sources, really inside
    index.unlink()
    (allowed / "layout" / "index.real").rename(index)
    assert store.ensure(f"oci-archive:{allowed}/img.tar", local=access).digest
    assert store.ensure(f"oci:{allowed}/layout", local=access).digest
