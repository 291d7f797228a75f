"""One mount per image digest, shared by its containers and gone with the last of them,
including when a supervisor is killed and its reference is found stale."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from nomad_driver.runtime import client
from nomad_driver.runtime.imagefile import ImageFile
from nomad_driver.runtime.imagemount import SharedImages
from tests.runtime.test_supervisor import loop_devices_of, make_spec
from tests.waiting import eventually

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containers need root here")


def mounts_under(directory: Path) -> list[str]:
    return [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(str(directory) + "/")
    ]


def start_sleeper(tmp: Path, image: Path, name: str, images: Path) -> client.Started:
    spec = make_spec(tmp, image, "/bin/sh", "-c", "sleep 60")._replace(images_dir=str(images))
    return client.start(spec, str(tmp / name))


def test_tasks_of_one_image_share_one_mount_released_after_the_last(
    tmp_path: Path, busybox_image: Path
) -> None:
    images = tmp_path / "images"
    first = start_sleeper(tmp_path, busybox_image, "run-a", images)
    second = start_sleeper(tmp_path, busybox_image, "run-b", images)
    try:
        assert len(mounts_under(images)) == 1
        assert len(loop_devices_of(busybox_image)) == 1
        client.send_signal(first.run_dir, signal.SIGKILL)
        client.wait(first.run_dir)
        assert len(mounts_under(images)) == 1  # the second task still uses it
    finally:
        client.send_signal(second.run_dir, signal.SIGKILL)
        client.wait(second.run_dir)
    assert mounts_under(images) == []
    assert eventually(lambda: loop_devices_of(busybox_image) == [])
    assert [p.name for p in images.iterdir() if not p.name.startswith(".")] == []


def test_reference_of_a_killed_supervisor_is_swept(tmp_path: Path, busybox_image: Path) -> None:
    images = tmp_path / "images"
    started = start_sleeper(tmp_path, busybox_image, "run", images)
    shared = SharedImages(str(images))
    assert shared.sweep() == []  # a live reference keeps the mount
    os.kill(started.supervisor_pid, signal.SIGKILL)
    os.kill(started.init_pid, signal.SIGKILL)  # the whole container goes with its init
    assert eventually(lambda: not Path(f"/proc/{started.supervisor_pid}").exists())
    assert len(shared.sweep()) == 1
    assert mounts_under(images) == []
    assert eventually(lambda: loop_devices_of(busybox_image) == [])


def test_a_file_that_is_not_squashfs_leaves_nothing_behind(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.sqsh"
    bogus.write_bytes(b"\0" * 8192)
    images = tmp_path / "images"
    fd = os.open(bogus, os.O_RDONLY)  # past open_image's own check, to test the mount's
    try:
        with pytest.raises(Exception, match="not a readable SquashFS file"):
            SharedImages(str(images)).acquire(ImageFile(fd, str(bogus), os.fstat(fd)), "t1")
    finally:
        os.close(fd)
    assert mounts_under(images) == []
    assert [p.name for p in images.iterdir() if not p.name.startswith(".")] == []
    assert loop_devices_of(bogus) == []


def test_a_dataset_is_one_shared_read_only_mount_kept_by_the_supervisors(
    tmp_path: Path, busybox_image: Path
) -> None:
    """Two tasks mount one dataset at /data: one mount for both, read-only inside, held by
    each supervisor (not the process that started it) and gone after the last task."""
    import subprocess

    from nomad_driver.runtime.imagefile import open_image

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "genome.txt").write_text("ACGT\n")
    dataset = tmp_path / "genome.sqsh"
    subprocess.run(
        ["mksquashfs", str(tree), str(dataset), "-quiet", "-all-root", "-noappend"], check=True
    )
    images = tmp_path / "images"
    script = "cat /data/genome.txt; touch /data/x 2>/dev/null && echo WRITABLE; sleep 60"
    started = []
    for name in ("run-a", "run-b"):
        (tmp_path / name).mkdir()
        spec = make_spec(tmp_path / name, busybox_image, "/bin/sh", "-c", script)
        opened = open_image(str(dataset))
        try:
            started.append(
                client.start(
                    spec._replace(images_dir=str(images)),
                    str(tmp_path / name / f"task-{name}"),
                    datasets=[(opened, "/data")],
                )
            )
        finally:
            opened.close()
    try:
        assert len(mounts_under(images)) == 2  # the image's and the dataset's, one each
        assert len(loop_devices_of(dataset)) == 1
        digest = next(p.name for p in images.iterdir() if (p / "root" / "genome.txt").exists())
        assert SharedImages(str(images)).users(f"sha256:{digest}") == ["task-run-a", "task-run-b"]
        for name in ("run-a", "run-b"):
            out = tmp_path / name / "out"
            assert eventually(lambda out=out: out.read_text() != "")
            assert out.read_text() == "ACGT\n"  # and never WRITABLE
        for one in started:
            held = (images / digest / "refs" / os.path.basename(one.run_dir)).read_text()
            assert held.split()[0] == str(one.supervisor_pid)
    finally:
        for one in started:
            client.send_signal(one.run_dir, signal.SIGKILL)
            client.wait(one.run_dir)
    assert mounts_under(images) == []
    assert eventually(lambda: loop_devices_of(dataset) == [])


def test_a_lingering_mount_serves_the_next_task_and_goes_once_its_time_is_up(
    tmp_path: Path, busybox_image: Path
) -> None:
    """image_mount_linger: the mount stays after its last task (the next one of that digest
    reuses it, on the same loop device), and a sweep past the linger unmounts it. The control:
    a sweep within the linger keeps it."""
    images = tmp_path / "images"
    spec = make_spec(tmp_path, busybox_image, "/bin/true")._replace(
        images_dir=str(images), image_linger=60.0
    )
    first = client.start(spec, str(tmp_path / "run-a"))
    assert client.wait(first.run_dir).exit_code == 0
    assert len(mounts_under(images)) == 1  # no task uses it, and it stays
    device = loop_devices_of(busybox_image)
    assert len(device) == 1
    second = client.start(spec, str(tmp_path / "run-b"))
    assert client.wait(second.run_dir).exit_code == 0
    assert loop_devices_of(busybox_image) == device  # the same mount served the second
    shared = SharedImages(str(images))
    assert shared.sweep() == [] and len(mounts_under(images)) == 1
    (until,) = images.glob("*/linger")
    assert 55 < float(until.read_text()) - time.time() <= 60
    until.write_text(f"{time.time() - 1:.3f}")  # as if the last task ended 61 s ago
    assert len(shared.sweep()) == 1
    assert mounts_under(images) == []
    assert eventually(lambda: loop_devices_of(busybox_image) == [])
    # A node quiesced for a count drops a lingering mount at once, and only an unused one.
    third = client.start(spec, str(tmp_path / "run-c"))
    assert client.wait(third.run_dir).exit_code == 0
    assert len(mounts_under(images)) == 1
    assert len(shared.drop_lingering()) == 1 and mounts_under(images) == []


def test_lingering_mounts_are_bounded_the_soonest_to_expire_going_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tenant who can make many digests must not hold a loop device per digest for the whole
    linger (red team): past MAX_LINGERING unused mounts, the ones to expire soonest go. The
    control: at the bound, all stay."""
    import subprocess

    from nomad_driver.runtime import imagemount
    from nomad_driver.runtime.imagefile import open_image

    monkeypatch.setattr(imagemount, "MAX_LINGERING", 2)
    images = tmp_path / "images"
    shared = SharedImages(str(images))
    digests = []
    for i in range(4):
        tree = tmp_path / f"tree-{i}"
        tree.mkdir()
        (tree / "marker").write_text(str(i))
        image = tmp_path / f"image-{i}.sqsh"
        subprocess.run(["mksquashfs", str(tree), str(image), "-quiet", "-noappend"], check=True)
        opened = open_image(str(image))
        try:
            shared.acquire(opened, f"owner-{i}")
        finally:
            opened.close()
        shared.release(f"owner-{i}", linger=60.0 + i)  # the later, the longer it lingers
        digests.append(sorted(p.name for p in images.iterdir() if not p.name.startswith(".")))
        assert len(mounts_under(images)) == min(i + 1, 2), i  # at the bound: all stay
    kept = {p.name for p in images.iterdir() if not p.name.startswith(".")}
    assert len(kept) == 2 and not kept & set(digests[1])  # images 2 and 3 remain, 0 and 1 went
    shared.drop_lingering()
    assert mounts_under(images) == []
