"""Image mounts shared by every container of one image digest, counted by who uses them.

One read-only SquashFS mount per digest under DIR/<hex>/root, used as the lower layer of each
container's overlay. Each user holds a reference file DIR/<hex>/refs/<owner> naming its process
(pid and start time); the mount goes when the last live reference goes. The counts are the files
themselves, checked against the live processes, so they survive a plugin restart unchanged and a
killed user's reference is found stale by the next `sweep`.

Unmounting is lazy (MNT_DETACH) and the loop device clears itself: a container that still uses
the image keeps its view, and the kernel frees the device after the last user is gone. A release
may ask for the mount to linger: kept that many seconds after its last user went (until the time
in DIR/<hex>/linger, the latest any release asked for), so the next task of that digest neither
mounts again nor reads its files cold; a later release or sweep past that time unmounts it.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from nomad_driver.runtime import linux
from nomad_driver.runtime.imagefile import ImageFile

LOCK_FILE = ".lock"
DIGEST_CACHE = ".digests"
LINGER_FILE = "linger"  # in DIR/<hex>: until when (epoch seconds) the unused mount stays
MAX_LINGERING = 8  # unused mounts kept at most, whatever their linger


def _unreferenced(base: str) -> bool:
    """No reference file at all, live or stale: the mount only lingers."""
    refs = os.path.join(base, "refs")
    return not (os.path.isdir(refs) and os.listdir(refs))


def _linger_until(base: str) -> float:
    try:
        with open(os.path.join(base, LINGER_FILE), encoding="ascii") as f:
            return float(f.read())
    except (OSError, ValueError):
        return 0.0


def images_dir(run_dir: str) -> str:
    """Where a driver (or `pyhpc run`) with this run_dir keeps its shared image mounts."""
    return os.path.join(run_dir, "images")


def process_identity(pid: int) -> str:
    """pid plus its start time: a reused pid is a different process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
        return f"{pid} {fields[19]}"
    except (OSError, IndexError):
        return ""


def _write_ref(refs: str, owner: str, identity: str) -> None:
    with open(os.path.join(refs, owner), "w", encoding="ascii") as f:
        f.write(identity)


class SharedImages:
    def __init__(self, directory: str) -> None:
        self.directory = directory

    @contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.directory, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def acquire(self, image: ImageFile, owner: str, pid: int | None = None) -> str:
        """Mount the opened image (once per digest) and hold a reference for owner, kept while
        process pid (default: the caller) lives. Returns the mounted root.

        A mount is shared by every task of its digest, so only an image whose bytes nobody but
        root can change is mounted: another tenant's writable copy of the same bytes would
        otherwise become what every later task of that digest runs."""
        if "/" in owner or owner.startswith("."):
            raise ValueError(f"bad image reference owner {owner!r}")
        from nomad_driver.runtime.container import ContainerError, mount_image
        from nomad_driver.util.digest import fd_digest  # hashlib: not in every supervisor

        if not image.trusted:
            raise ContainerError(
                f"image {image.path} can be changed by uid {image.st.st_uid} (mode "
                f"{image.st.st_mode & 0o7777:o}): only images owned by root and writable by no "
                "one else are mounted"
            )
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            digest = fd_digest(image.fd, os.path.join(self.directory, DIGEST_CACHE))
            base = os.path.join(self.directory, digest.partition(":")[2])
            root, refs = os.path.join(base, "root"), os.path.join(base, "refs")
            identity = process_identity(os.getpid() if pid is None else pid)
            with self._locked():
                os.makedirs(root, exist_ok=True)
                os.makedirs(refs, exist_ok=True)
                if not os.path.ismount(root):
                    try:
                        mount_image(image.fd, image.path, root)
                    except BaseException:
                        self._unmount_if_unused(base)
                        raise
                _write_ref(refs, owner, identity)
        except OSError as err:
            where = f" ({err.filename})" if err.filename and err.filename != image.path else ""
            raise ContainerError(
                f"cannot use image {image.path}: {err.strerror or err}{where}"
            ) from err
        return root

    def hold(self, owner: str, pid: int) -> None:
        """Hand every reference owner has (its image, its datasets) over to process pid."""
        identity = process_identity(pid)
        with self._locked():
            for base in self._bases():
                if os.path.exists(os.path.join(base, "refs", owner)):
                    _write_ref(os.path.join(base, "refs"), owner, identity)

    def release(self, owner: str, linger: float = 0.0) -> None:
        """Drop owner's references; a mount left unused stays linger seconds more. Mounts
        whose linger has run out go too."""
        with self._locked():
            for base in self._bases():
                try:
                    os.unlink(os.path.join(base, "refs", owner))
                except FileNotFoundError:
                    if not linger:
                        continue
                else:
                    if linger:
                        until = max(_linger_until(base), time.time() + linger)
                        with open(os.path.join(base, LINGER_FILE), "w", encoding="ascii") as f:
                            f.write(f"{until:.3f}")
                self._unmount_if_unused(base)
            if linger:
                self._bound_lingering()

    def _bound_lingering(self) -> None:
        """At most MAX_LINGERING unused mounts stay (a loop device each): the ones to expire
        soonest go first. A tenant who can make many digests cannot hold the node's loop
        devices for the linger (red team)."""
        unused = sorted(filter(_unreferenced, self._bases()), key=_linger_until)
        for base in unused[: max(0, len(unused) - MAX_LINGERING)]:
            self._unmount_if_unused(base, lingering=False)

    def sweep(self, lingering: bool = True) -> list[str]:
        """Drop references of processes that are gone; unmount what nobody uses (a lingering
        mount once its time is up, or with lingering=False at once). Returns the digests
        unmounted."""
        return self._sweep(lambda base: self._unmount_if_unused(base, lingering))

    def drop_lingering(self) -> list[str]:
        """Unmount, now, the mounts that only linger: no reference at all, live or stale (a
        node quiesced for a count of what it holds)."""

        return self._sweep(
            lambda base: _unreferenced(base) and self._unmount_if_unused(base, lingering=False)
        )

    def _sweep(self, unmounted: Callable[[str], bool]) -> list[str]:
        if not os.path.isdir(self.directory):
            return []
        with self._locked():
            return ["sha256:" + os.path.basename(b) for b in self._bases() if unmounted(b)]

    def users(self, digest: str) -> list[str]:
        refs = os.path.join(self.directory, digest.partition(":")[2], "refs")
        return sorted(os.listdir(refs)) if os.path.isdir(refs) else []

    def _bases(self) -> list[str]:
        return [
            os.path.join(self.directory, name)
            for name in os.listdir(self.directory)
            if not name.startswith(".")
        ]

    def _unmount_if_unused(self, base: str, lingering: bool = True) -> bool:
        refs = os.path.join(base, "refs")
        live = 0
        for owner in os.listdir(refs) if os.path.isdir(refs) else ():
            path = os.path.join(refs, owner)
            try:
                with open(path, encoding="ascii") as f:
                    identity = f.read().strip()
            except OSError:
                continue
            pid = identity.partition(" ")[0]
            if pid.isdigit() and process_identity(int(pid)) == identity:
                live += 1
            else:
                os.unlink(path)
        if live:
            return False
        if lingering and time.time() < _linger_until(base):
            return False
        root = os.path.join(base, "root")
        if os.path.ismount(root):
            linux.umount(root, linux.MNT_DETACH)
        try:
            os.unlink(os.path.join(base, LINGER_FILE))
        except FileNotFoundError:
            pass
        for path in (refs, root, base):
            try:
                os.rmdir(path)
            except OSError:
                pass
        return True
