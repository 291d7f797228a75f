"""An image file opened once, by descriptor, and everything later done through that descriptor.

Root must never check an image path and then open the path again: between the two, a tenant
can rename another file over it or rewrite it in place. So an image is opened here once
(beneath the admin's directory, no symlink on the way, never a FIFO or device), checked on the
opened inode, hashed from the descriptor, and the loop device is attached from the same
descriptor. Only files nobody but root can change are mounted ("trusted"): their bytes stay the
bytes that were hashed and signed, so one mount per digest can be shared between tenants.
"""

from __future__ import annotations

import os
import stat
import struct
from typing import NamedTuple

from nomad_driver.runtime import linux
from nomad_driver.util.errors import PyhpcError

SQUASHFS_MAGIC = b"hsqs"
SUPERBLOCK = 96
# mksquashfs pads the file to 4 KiB unless told not to; anything beyond is not SquashFS.
PAD = 4096


class ImageError(PyhpcError):
    """The file cannot be used as an image; the message names it and the reason."""


class Access(NamedTuple):
    """Owner, group and mode of one directory or file on an image's path (for the task user's
    read check, made once the user is known)."""

    uid: int
    gid: int
    mode: int


class ImageFile(NamedTuple):
    fd: int  # O_RDONLY, close-on-exec: what is hashed and what the loop device is attached to
    path: str  # the opened file's real path, for messages and signature rules
    st: os.stat_result
    # Directories below the admin's image directory and the file itself, in order.
    access: tuple[Access, ...] = ()
    # For a copy in the store: the real path of the file it was copied from, which signature
    # rules and the signature envelope (beside it) refer to. Empty: path itself.
    origin: str = ""

    @property
    def trusted(self) -> bool:
        """Owned by root and writable by nobody else: its bytes cannot change under a mount."""
        return self.st.st_uid == 0 and not self.st.st_mode & 0o022

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


# A reader that owns nothing and is in no group: what everybody may do ("other" bits).
ANYONE = (-1, -1)


def open_image(path: str, beneath: str = "", reader: tuple[int, int] | None = None) -> ImageFile:
    """Open the image at path: beneath the directory `beneath` (an admin's, trusted) with no
    symlink and no '..' out of it, or, with no `beneath`, the trusted path itself (its last
    component not a symlink). With a reader (host uid, gid; ANYONE when not known yet), each
    directory must let it search and the file let it read, checked before anything below is
    looked at: root tells a tenant nothing about what that tenant could not see itself.
    Raises ImageError or FileNotFoundError."""
    if not path.startswith("/"):
        raise ImageError(f"image {path!r}: not an absolute path")
    steps: list[Access] = []
    if beneath:
        rel = os.path.relpath(os.path.normpath(path), beneath)
        if rel == "." or rel.startswith("../") or rel == "..":
            raise ImageError(f"image {path!r} is not inside {beneath}")
        try:
            parent = os.open(beneath, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise _refusal(err, path) from err
        try:
            *dirs, name = rel.split("/")
            for part in dirs:
                fd = _open_step(parent, part, os.O_PATH | os.O_DIRECTORY, path)
                os.close(parent)
                parent = fd
                st = os.fstat(parent)
                steps.append(Access(st.st_uid, st.st_gid, st.st_mode))
                _may(reader, steps, path)
            fd = _open_step(parent, name, os.O_RDONLY | os.O_NONBLOCK, path)
        finally:
            os.close(parent)
    else:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            raise _refusal(err, path) from err
    try:
        st = os.fstat(fd)
        _may(reader, [*steps, Access(st.st_uid, st.st_gid, st.st_mode)], path)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"image {path!r} is not a regular file")
        check_squashfs(fd, st, path)
        real = os.readlink(f"/proc/self/fd/{fd}")
    except BaseException:
        os.close(fd)
        raise
    return ImageFile(fd, real, st, (*steps, Access(st.st_uid, st.st_gid, st.st_mode)))


def _may(reader: tuple[int, int] | None, steps: list[Access], path: str) -> None:
    if reader is not None and not may_read(tuple(steps), *reader, whole=False):
        who = "everyone" if reader == ANYONE else f"host uid {reader[0]}, gid {reader[1]}"
        raise ImageError(f"image {path!r}: the task's user ({who}) may not read it")


def _open_step(parent: int, name: str, flags: int, path: str) -> int:
    try:
        return linux.openat2(parent, name, flags | os.O_NOFOLLOW, linux.STRICT)
    except OSError as err:
        raise _refusal(err, path) from err


def _refusal(err: OSError, path: str) -> Exception:
    import errno

    if err.errno == errno.ENOENT:
        return FileNotFoundError(f"option 'image' = {path!r}: no such file")
    if err.errno in (errno.ELOOP, errno.EXDEV):
        return ImageError(f"image {path!r}: a symlink on its path (images are opened without)")
    if err.errno == errno.ENOTDIR:
        return ImageError(f"image {path!r}: a part of its path is not a directory")
    return ImageError(f"image {path!r}: {err.strerror}")


def check_squashfs(fd: int, st: os.stat_result, path: str) -> None:
    """A SquashFS superblock, and no more file than the filesystem it describes: a sparse
    multi-gigabyte "image" is refused before anything hashes it."""
    head = os.pread(fd, SUPERBLOCK, 0)
    if len(head) < SUPERBLOCK or head[:4] != SQUASHFS_MAGIC:
        raise ImageError(f"image {path!r} is not a SquashFS file")
    used = struct.unpack_from("<Q", head, 40)[0]
    if used > st.st_size or st.st_size > -(-used // PAD) * PAD:
        raise ImageError(
            f"image {path!r}: {st.st_size} bytes, but its SquashFS superblock says {used}"
        )
    if st.st_blocks * 512 < used // 2:
        raise ImageError(f"image {path!r} is a sparse file (mostly holes), not a built image")


def may_read(access: tuple[Access, ...], uid: int, gid: int, whole: bool = True) -> bool:
    """Whether uid:gid (no supplementary groups: tasks run without) may search every directory
    and read the file of an image's path, as the kernel's permission bits decide it. whole:
    access ends with the file; else with a step whose kind its mode tells."""
    if uid == 0:  # host root: CAP_DAC_OVERRIDE
        return True
    for i, step in enumerate(access):
        last = i == len(access) - 1
        want = 0o4 if last and (whole or not stat.S_ISDIR(step.mode)) else 0o1
        if step.uid == uid:
            bits = step.mode >> 6
        elif step.gid == gid:
            bits = step.mode >> 3
        else:
            bits = step.mode
        if not bits & want:
            return False
    return True
