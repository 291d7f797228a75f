"""The store under its cap evicts the least recently used images that nothing uses or holds,
never one a running task uses (mounted, or marked as the driver marks it) or an import holds;
it keeps every reference an image was imported from; every digest form `image ls` prints
finds the image again."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from nomad_driver.images.store import Store, StoredImage, StoreError
from nomad_driver.runtime import client
from nomad_driver.runtime.imagemount import SharedImages, process_identity
from tests.runtime.test_supervisor import make_spec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="imports keep ownership: root")


def rootfs(tmp: Path, name: str) -> str:
    """dir:ROOT of a tree with 48 KiB of noise: an image of its own, about that size."""
    root = tmp / "sources" / name
    root.mkdir(parents=True)
    (root / "noise").write_bytes(os.urandom(48 << 10))
    return f"dir:{root}"


def size(image: StoredImage) -> int:
    return os.path.getsize(image.path)


def present(store: Store) -> set[str]:
    return {image.digest for image in store.images()}


def mark_used_like_the_driver(run_dir: Path, digest: str) -> None:
    """A reference file naming a live process (this one), as SharedImages.acquire writes."""
    refs = run_dir / "images" / digest.partition(":")[2] / "refs"
    refs.mkdir(parents=True)
    (refs / "task-1").write_text(process_identity(os.getpid()))


def test_eviction_takes_the_least_recently_used_and_never_one_in_use_or_held(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    shared = SharedImages(str(run_dir / "images"))
    store = Store(str(tmp_path / "store"), in_use=lambda d: bool(shared.users(d)))
    names = {n: rootfs(tmp_path, n) for n in "abcdefg"}
    a, b, c = (store.ensure(names[n]) for n in "abc")
    for image, when in ((a, 1000), (b, 2000), (c, 3000)):
        os.utime(Path(store.root) / "meta" / f"{image.digest[7:]}.json", (when, when))
    biggest = max(size(a), size(b), size(c))
    store.max_bytes = size(a) + size(b) + size(c) + biggest // 2  # three fit, four do not
    assert store.ensure(names["a"]).digest == a.digest  # a start uses a: now the most recent

    said: list[str] = []
    d = store.ensure(names["d"], said.append)  # the least recently used, b, makes room
    assert present(store) == {a.digest, c.digest, d.digest}
    assert names["b"] not in store.references() and store.lookup(names["b"]) is None
    assert any(s.startswith(f"evicted {b.digest[:19]}") for s in said), said
    assert store.size() <= store.max_bytes

    mark_used_like_the_driver(run_dir, c.digest)  # a running task uses c (the oldest now)
    with store.hold(a.digest):  # a start is opening a
        e = store.ensure(names["e"])  # neither c nor a may go: d does
        assert present(store) == {a.digest, c.digest, e.digest}

        with store.hold(e.digest):  # everything left is in use or held: refused, cleanly
            with pytest.raises(StoreError) as refused:
                store.ensure(names["f"])
    message = str(refused.value)
    assert "\n" not in message and "over its cap" in message and c.digest[:19] in message
    assert present(store) == {a.digest, c.digest, e.digest}
    assert names["f"] not in store.references()
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
    assert (run_dir / "images" / c.digest[7:] / "refs" / "task-1").exists()

    g = store.ensure(names["g"])  # held no longer, a (used before e came) is the one to go
    assert present(store) == {c.digest, e.digest, g.digest}


def test_an_image_attached_to_a_loop_device_is_never_evicted(tmp_path: Path) -> None:
    """The driver's own Store has no in_use callable: a mounted image is in use by itself."""
    store = Store(str(tmp_path / "store"))
    first, second = store.ensure(rootfs(tmp_path, "x")), store.ensure(rootfs(tmp_path, "y"))
    os.utime(Path(store.root) / "meta" / f"{first.digest[7:]}.json", (1000, 1000))
    store.max_bytes = size(first) + size(second) + 1000
    mount = tmp_path / "mnt"
    mount.mkdir()
    subprocess.run(["mount", "-o", "loop,ro", first.path, str(mount)], check=True)
    try:
        assert store.used(first.digest) and not store.used(second.digest)
        third = store.ensure(rootfs(tmp_path, "z"))  # first is older, but mounted
        assert present(store) == {first.digest, third.digest}
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    assert not store.used(first.digest)  # the control: unmounted, it is free to go
    store.ensure(rootfs(tmp_path, "w"))
    assert first.digest not in present(store)


def test_a_running_tasks_image_is_never_evicted(tmp_path: Path, busybox_image: Path) -> None:
    run_dir = tmp_path / "run"
    shared = SharedImages(str(run_dir / "images"))
    store = Store(str(tmp_path / "store"), in_use=lambda d: bool(shared.users(d)))
    running = store.ensure(str(busybox_image))
    other = store.ensure(rootfs(tmp_path, "other"))
    os.utime(Path(store.root) / "meta" / f"{running.digest[7:]}.json", (1000, 1000))
    store.max_bytes = size(running) + size(other) + 1000
    spec = make_spec(tmp_path, Path(running.path), "/bin/sh", "-c", "sleep 30")._replace(
        images_dir=str(run_dir / "images")
    )
    started = client.start(spec, str(tmp_path / "task"))
    try:
        assert shared.users(running.digest)  # marked as the driver marks it
        newer = store.ensure(rootfs(tmp_path, "newer"))  # the oldest is the running one
        assert present(store) == {running.digest, newer.digest}
    finally:
        client.send_signal(started.run_dir, 9)
        client.wait(started.run_dir)


def test_concurrent_imports_under_the_cap_never_pass_it(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    one = store.ensure(rootfs(tmp_path, "one"))
    store.max_bytes = size(one) * 3 + size(one) // 2
    names = [rootfs(tmp_path, f"n{i}") for i in range(6)]
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            store.ensure(name)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(present(store)) == 3 and store.size() <= store.max_bytes


def test_every_reference_an_image_was_imported_from_is_kept(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    source = Path(rootfs(tmp_path, "same").partition(":")[2])
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(source), str(copy)], check=True)
    first = store.ensure(f"dir:{source}")
    second = store.ensure(f"dir:{copy}")
    assert first.digest == second.digest
    meta = store.lookup(first.digest).meta  # type: ignore[union-attr]
    assert meta["sources"] == [f"dir:{source}", f"dir:{copy}"]
    assert meta["source"] == f"dir:{copy}"  # the latest import's provenance
    assert store.references() == {f"dir:{source}": first.digest, f"dir:{copy}": first.digest}
    store.pull(f"dir:{source}")  # again: listed once, now the latest
    assert store.lookup(first.digest).meta["sources"] == [f"dir:{copy}", f"dir:{source}"]  # type: ignore[union-attr]


def test_every_digest_form_ls_prints_finds_the_image(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    image = store.ensure(rootfs(tmp_path, "p"))
    forms = [image.digest, image.digest[:19], image.digest[7:19], image.digest[7:]]
    for form in [*forms, "sha256:" + image.digest[7:11].upper()]:
        assert store.resolve(form).digest == image.digest, form
    # Another image whose digest starts with the same 12 digits: the short form is ambiguous.
    twin = image.digest[:19] + ("0" if image.digest[19] != "0" else "1") * 52
    (tmp_path / "store" / "sha256" / f"{twin[7:]}.sqsh").write_bytes(b"x")
    (tmp_path / "store" / "meta" / f"{twin[7:]}.json").write_text('{"size": 1}')
    with pytest.raises(StoreError, match=r"is the start of 2 images' digests .*give more of it"):
        store.resolve(image.digest[:19])
    assert store.resolve(image.digest[:21]).digest == image.digest  # a little more: unique
    with pytest.raises(StoreError, match="no image 'sha256:f+' in the store"):
        store.resolve("sha256:" + "f" * 64)
    with pytest.raises(StoreError, match="not a sha256 digest"):
        store.resolve("sha256:xyz")
    with pytest.raises(StoreError, match="name the registry host explicitly"):
        store.resolve("docker://ubuntu:22.04")
    name = rootfs(tmp_path, "r")
    named = store.ensure(name)
    assert store.resolve(name).digest == named.digest
    assert store.remove(named.digest[:19]) == [named.digest]  # a short digest removes it too
    assert named.digest not in present(store) and name not in store.references()


def test_periodic_gc_deletes_images_unused_for_min_age_never_one_in_use_or_held(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    shared = SharedImages(str(run_dir / "images"))
    store = Store(str(tmp_path / "store"), in_use=lambda d: bool(shared.users(d)))
    old, used, held, fresh = (store.ensure(rootfs(tmp_path, n)) for n in ("o", "u", "h", "f"))
    for image in (old, used, held):  # three untouched for two days; fresh used just now
        when = os.path.getmtime(Path(store.root) / "meta" / f"{image.digest[7:]}.json") - 2 * 86400
        os.utime(Path(store.root) / "meta" / f"{image.digest[7:]}.json", (when, when))
    mark_used_like_the_driver(run_dir, used.digest)  # a running task uses it
    with store.hold(held.digest):  # a start is opening it
        assert store.collect(86400) == [old.digest]
    assert present(store) == {used.digest, held.digest, fresh.digest}
    assert old.digest not in store.references().values()
    assert store.collect(86400) == [held.digest]  # released, it goes on the next round
    assert store.collect(0) == [fresh.digest]  # min_age 0: everything not in use
    assert present(store) == {used.digest}
