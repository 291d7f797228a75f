"""`pyhpc run --save`: a finished container's writable layer, over its image, as a new SquashFS
image (what pyxis calls --container-save and `enroot export` does for a container).

In a child process with a mount namespace of its own, the image is mounted read-only from the
descriptor the run was checked on, the layer (its ext4 file, read-only, or its directory) is
put over it as a second read-only overlay lower, so overlay itself applies the layer's
whiteouts and opaque directories, and the merged tree is walked by descriptor (no symlink
followed, devices refused, as a `dir:` import) into tar2sqfs. Files the container made carry
host ids of its user namespace; they are written back as the container's ids.
"""

from __future__ import annotations

import os
import signal
import stat
import tempfile
from collections.abc import Callable

from nomad_driver.images import squashfs
from nomad_driver.images.reference import Reference
from nomad_driver.images.sources import DirTree, LocalAccess, SourceError
from nomad_driver.runtime import linux
from nomad_driver.runtime.container import attach_loop, fd_path, mount_image
from nomad_driver.util.asuser import children_in_own_pid_namespace, fork_blocked
from nomad_driver.util.errors import PyhpcError


class SaveError(PyhpcError, RuntimeError):
    """The layer could not be saved; the message says why."""


def id_mapper(first: int | None, count: int) -> Callable[[int], int]:
    """Host id -> the container's: a remapped root's range goes back to 0..count-1."""
    if first is None:
        return lambda i: i
    return lambda i: i - first if first <= i < first + count else i


def save(
    image_fd: int,
    image_name: str,
    layer: str,
    disk_file: bool,
    ids: Callable[[int], int],
    work: str,
    level: int = squashfs.DEFAULT_LEVEL,
) -> str:
    """Build the SquashFS of image + layer into a root-private file under work (a directory
    the caller owns and trusts); returns its path. layer: the task's layer directory (with
    upper/), or with disk_file its ext4 file."""
    out = os.path.join(work, "saved.sqsh")
    children_in_own_pid_namespace()
    errors_r, errors_w = os.pipe()
    pid, blocked = fork_blocked()
    if pid == 0:  # the child: its mounts go with it
        code = 1
        try:
            os.close(errors_r)
            try:
                _build(image_fd, image_name, layer, disk_file, ids, work, out, level)
                code = 0
            except BaseException as err:  # noqa: BLE001 - reported to the parent, then exit
                os.write(errors_w, str(err).encode(errors="replace")[:4000])
        finally:
            os._exit(code)  # whatever happened (a stop, a parent gone), never past here
    os.close(errors_w)
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a pending stop may land here
        with os.fdopen(errors_r, "rb") as errors:
            said = errors.read().decode(errors="replace")
    except BaseException:
        os.kill(pid, signal.SIGKILL)  # a stopped run leaves no builder behind
        os.waitpid(pid, 0)
        raise
    _, status = os.waitpid(pid, 0)
    if status != 0 or not os.path.isfile(out):
        raise SaveError(f"cannot save the container: {said or 'the builder died'}")
    return out


def _build(
    image_fd: int,
    image_name: str,
    layer: str,
    disk_file: bool,
    ids: Callable[[int], int],
    work: str,
    out: str,
    level: int,
) -> None:
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
    scratch = tempfile.mkdtemp(prefix="save-", dir=work)
    image, lower, merged = (os.path.join(scratch, n) for n in ("image", "layer", "merged"))
    for d in (image, lower, merged):
        os.mkdir(d, 0o700)
    mount_image(image_fd, image_name, image)
    flags = linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    if disk_file:
        fd = os.open(layer, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0:
            raise SaveError(f"the layer {layer} is not root's regular file")
        device, loop = attach_loop(fd, layer, read_only=True)
        try:
            linux.mount(device, lower, "ext4", flags, "noload")
        finally:
            os.close(loop)
            os.close(fd)
        upper_root = lower
    else:
        upper_root = layer
    top = os.open(upper_root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        upper = linux.openat2(top, "upper", os.O_PATH | os.O_DIRECTORY, linux.STRICT)
    except OSError as err:
        raise SaveError(f"the container left no layer to save ({err.strerror})") from err
    finally:
        os.close(top)
    below = os.open(image, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    linux.mount("overlay", merged, "overlay", flags, f"lowerdir={fd_path(upper)}:{fd_path(below)}")
    root = os.open(merged, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    tree = DirTree(Reference("dir", path="/"), root, LocalAccess(), ids)
    try:
        squashfs.from_tar(tree, out, level)
    except (squashfs.BuildError, SourceError) as err:
        raise SaveError(str(err)) from err
