"""Building a container's root and starting its command, as a sequence of small steps.

Every step runs inside the container's init process, after it entered fresh mount, UTS and IPC
namespaces (and as PID 1 of a fresh PID namespace), so every mount made here disappears with
the namespace: nothing is left on the host when the task ends, however it ends.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import struct
from typing import NamedTuple

from nomad_driver.runtime import linux
from nomad_driver.runtime.spec import BindMount, ContainerSpec
from nomad_driver.util.errors import PyhpcError

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")


class ContainerError(PyhpcError):
    """A step failed; the message names the step and the path involved."""


def enter_namespaces(spec: ContainerSpec) -> None:
    # The cgroup namespace comes later (supervisor.run_init), once the task's cgroup is joined.
    flags = linux.CLONE_NEWNS | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC
    if spec.netns_path:
        # The namespace Nomad made for the task group (bridge mode, Consul service mesh).
        fd = os.open(spec.netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.setns(fd, linux.CLONE_NEWNET)
        finally:
            os.close(fd)
    elif spec.network == "none":
        flags |= linux.CLONE_NEWNET
    linux.unshare(flags)
    # Nothing mounted from here on may propagate back to the host.
    linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
    linux.sethostname(spec.hostname)
    if spec.network == "none" and not spec.netns_path:
        loopback_up()


def loopback_up() -> None:
    """A fresh network namespace has only lo, and it is down."""
    import socket

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH22x", b"lo", flags | iff_up))


def attach_loop(fd: int, name: str, read_only: bool = True) -> tuple[str, int]:
    """Attach the open file fd read-only to a free loop device that frees itself on the last
    unmount (LOOP_CONFIGURE from the descriptor: the path is never opened again).

    Returns the device and an open descriptor on it: closing that descriptor before the
    device is mounted would detach it again (autoclear)."""
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(16):  # another process may grab the free device first
            number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            device = f"/dev/loop{number}"
            if not os.path.exists(device):
                os.mknod(device, 0o660 | 0o060000, os.makedev(7, number))
            loop = os.open(device, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
            try:
                info = struct.pack(
                    "<QQQQQIIII64s64s32sQQ",
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    (LO_FLAGS_READ_ONLY if read_only else 0) | LO_FLAGS_AUTOCLEAR,
                    name.encode()[-63:],
                    b"",
                    b"",
                    0,
                    0,
                )
                config = struct.pack("<II", fd, 0) + info + b"\0" * 64
                fcntl.ioctl(loop, LOOP_CONFIGURE, config)
                return device, loop
            except OSError as err:
                os.close(loop)
                if err.errno != errno.EBUSY:
                    raise
    finally:
        os.close(ctl)
    raise ContainerError(f"no free loop device for {name}")


def mount_image(fd: int, name: str, target: str) -> None:
    """Mount the SquashFS file open at fd (name: for messages) read-only at target."""
    device, loop = attach_loop(fd, name)
    try:
        linux.mount(device, target, "squashfs", linux.MS_RDONLY | linux.MS_NODEV | linux.MS_NOSUID)
    except OSError as err:
        raise ContainerError(f"image {name} is not a readable SquashFS file ({err})") from err
    finally:
        os.close(loop)


class IdMaps(NamedTuple):
    """A container's user namespace: /proc/PID/uid_map and gid_map lines, and the host uid
    and gid its root is (None when container root is not mapped)."""

    uid_map: str
    gid_map: str
    root_on_host: tuple[int, int] | None


def id_maps(root_range: tuple[int, int], uid: int, gid: int) -> IdMaps:
    """Root remapping when the task runs as root (container ids 0.. on host ids first..),
    otherwise the task's own uid and gid mapped to themselves and nothing else."""
    if uid == 0:
        first, count = root_range
        line = f"0 {first} {count}\n"
        return IdMaps(line, line, (first, first))
    return IdMaps(f"{uid} {uid} 1\n", f"{gid} {gid} 1\n", None)


def new_user_namespace(maps: IdMaps) -> int:
    """A user namespace with the given maps, returned as an open descriptor. A short-lived
    child creates it; we write its maps from outside, which needs CAP_SETUID here."""
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    made_r, made_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(go_w)
            os.close(made_r)
            linux.unshare(linux.CLONE_NEWUSER)
            os.write(made_w, b"1")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(made_w)
    os.close(go_r)
    try:
        if os.read(made_r, 1) != b"1":
            raise ContainerError("could not create a user namespace")
        for name, text in (("uid_map", maps.uid_map), ("gid_map", maps.gid_map)):
            try:
                with open(f"/proc/{pid}/{name}", "w", encoding="ascii") as f:
                    f.write(text)
            except OSError as err:
                raise ContainerError(f"cannot write {name} {text.strip()!r}: {err}") from err
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(go_w)
        os.close(made_r)
        os.waitpid(pid, 0)


def open_source(m: BindMount, device: bool = False) -> int:
    """An O_PATH descriptor on a bind's source, opened once: beneath the admin's directory
    with no symlink or '..' on the way when m.beneath is set, so a tenant who swaps a part of
    the path for a symlink gets a refusal, never the symlink's target. Devices must be device
    nodes, checked on the opened inode."""
    try:
        fd = open_beneath(m.host_path, m.beneath)
    except OSError as err:
        why = "a symlink or '..' on its path" if err.errno in (errno.ELOOP, errno.EXDEV) else ""
        raise ContainerError(f"bind source {m.host_path}: {why or err.strerror}") from err
    mode = os.fstat(fd).st_mode
    if device and not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise ContainerError(f"device {m.host_path} is not a device node")
    return fd


def open_beneath(path: str, beneath: str) -> int:
    """O_PATH descriptor on path: opened from the directory `beneath` with no symlink, magic
    link or '..' on the way (the kernel refuses them: ELOOP, EXDEV), its last component never
    followed; with no `beneath`, the trusted path as it resolves."""
    if not beneath:
        return os.open(path, os.O_PATH | os.O_CLOEXEC)
    top = os.open(beneath, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        rel = os.path.relpath(os.path.normpath(path), beneath)
        # No O_NOFOLLOW: with it O_PATH would open a trailing symlink itself; without it,
        # RESOLVE_NO_SYMLINKS makes the kernel refuse the symlink (ELOOP).
        return linux.openat2(top, rel, os.O_PATH, linux.STRICT)
    finally:
        os.close(top)


def fd_path(fd: int) -> str:
    """A path the kernel resolves to the open object itself (mount options take paths)."""
    return f"/proc/self/fd/{fd}"


def make_rootfs(
    spec: ContainerSpec,
    scratch: str,
    image_root: str,
    userns: tuple[int, IdMaps] | None = None,
    sources: tuple[int, ...] = (),
    disk: int = -1,
) -> str:
    """The image, read-only, under the writable layer the task asked for:
    tmpfs (default), disk (upper layer in spec.upper_dir) or none (read-only root).
    The image itself never changes. With root remapping the image is seen through the user
    namespace's id map, so the container's root owns what the image's root owns.
    Overlay options name every directory as /proc/self/fd/N: no path is resolved twice, and
    no ',' or ':' in a task's name can add an option."""
    linux.mount("tmpfs", scratch, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0755")
    image, root = os.path.join(scratch, "image"), os.path.join(scratch, "root")
    os.mkdir(root)
    remapped = userns is not None and userns[1].root_on_host is not None
    if userns is not None and remapped:
        os.mkdir(image)
        linux.idmapped_bind(image_root, image, userns[0])
    else:
        image = image_root
    image_fd = os.open(image, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    flags = linux.MS_NOSUID | linux.MS_NODEV
    if spec.writable == "none":
        # A read-only overlay: a small layer of mount points over the image. Whether the image
        # has a path is asked of the image alone (never of the host through its symlinks).
        skel = os.path.join(scratch, "skel")
        os.mkdir(skel)
        skel_fd = os.open(skel, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        kinds = {
            m.task_path: stat.S_ISDIR(os.fstat(fd).st_mode)
            for m, fd in zip(spec.mounts, sources, strict=True)
        }
        for path in ("dev", "proc", "sys", ".oldroot", *(m.task_path for m in spec.mounts)):
            if in_root(image_fd, path) or in_root(skel_fd, path):
                continue
            os.close(open_target(skel_fd, path, kinds.get(path, True)))
        lower = f"{fd_path(skel_fd)}:{fd_path(image_fd)}"
        linux.mount("overlay", root, "overlay", flags | linux.MS_RDONLY, f"lowerdir={lower}")
        return root
    if spec.writable == "disk" and disk >= 0:
        # A filesystem of its own, in a file of disk_max_mb: the layer cannot outgrow it.
        os.mkdir(os.path.join(scratch, "layer"))
        device, loop = attach_loop(disk, spec.upper_dir + DISK_SUFFIX, read_only=False)
        try:
            linux.mount(device, os.path.join(scratch, "layer"), "ext4", flags)
        finally:
            os.close(loop)
        layer = os.open(os.path.join(scratch, "layer"), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    elif spec.writable == "disk":
        layer = disk_layer(spec.upper_dir)
    else:
        os.mkdir(os.path.join(scratch, "layer"))
        layer = os.open(os.path.join(scratch, "layer"), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    upper, work = (open_target(layer, name, True) for name in ("upper", "work"))
    if remapped:
        # The upper directory is the root directory's inode: same owner as the image's root
        # (as the id-mapped view shows it), so the container's root owns its "/".
        st = os.fstat(image_fd)
        os.chown(fd_path(upper), st.st_uid, st.st_gid)
        os.chmod(fd_path(upper), st.st_mode & 0o7777)
    options = f"lowerdir={fd_path(image_fd)},upperdir={fd_path(upper)},workdir={fd_path(work)}"
    linux.mount("overlay", root, "overlay", flags, options)
    return root


DISK_SUFFIX = ".ext4"


def disk_layer_file(spec: ContainerSpec) -> int:
    """writable = "disk" with a size cap: the layer's filesystem image beside spec.upper_dir,
    opened read-write, made (sparse, ext4) on first use, found again after a restart. Made by
    the supervisor (mkfs must not run inside the container's PID namespace) and inherited by
    the init as a descriptor. A symlink, or a file not root's, is refused."""
    parent, name = os.path.split(os.path.normpath(spec.upper_dir) + DISK_SUFFIX)
    top = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
        fd = linux.openat2(top, name, flags, linux.STRICT, 0o600)
    except OSError as err:
        raise ContainerError(f"writable layer {parent}/{name}: {err.strerror}") from err
    finally:
        os.close(top)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0:
            raise ContainerError(f"writable layer {parent}/{name} is not root's regular file")
        if st.st_size == 0:
            import subprocess

            os.ftruncate(fd, spec.disk_max_mb << 20)
            subprocess.run(
                ["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
                 "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                 f"/proc/self/fd/{fd}"],
                pass_fds=(fd,), check=True, capture_output=True, timeout=60,
            )  # fmt: skip
    except (OSError, ValueError) as err:
        os.close(fd)
        raise ContainerError(f"writable layer {parent}/{name}: cannot make it ({err})") from err
    except BaseException:
        os.close(fd)
        raise
    return fd


def disk_layer(path: str) -> int:
    """writable = "disk": the layer directory, made (or found, after a restart) as a plain
    root-owned directory beneath its parent, which the caller trusts. A symlink or anything
    not root's there is refused: overlay must never write where a tenant points it."""
    parent, name = os.path.split(os.path.normpath(path))
    top = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.mkdir(name, 0o700, dir_fd=top)
        except FileExistsError:
            pass
        try:
            fd = linux.openat2(top, name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, linux.STRICT)
        except OSError as err:
            raise ContainerError(
                f"writable layer {path}: not a plain directory ({err.strerror})"
            ) from err
    finally:
        os.close(top)
    if os.fstat(fd).st_uid != 0:
        os.close(fd)
        raise ContainerError(f"writable layer {path} is not owned by root; refusing to use it")
    return fd


def in_root(root_fd: int, path: str) -> bool:
    """Whether path exists in the tree at root_fd, asked without following any symlink (a
    symlink counts as existing)."""
    rel = path.strip("/") or "."
    try:
        os.close(linux.openat2(root_fd, rel, os.O_PATH | os.O_NOFOLLOW, linux.STRICT))
    except OSError as err:
        return err.errno != errno.ENOENT
    return True


def open_target(root_fd: int, task_path: str, directory: bool) -> int:
    """An O_PATH descriptor on task_path inside the tree at root_fd, made if missing (parents
    as directories, the last as a directory or an empty file). Every component is opened
    from its parent's descriptor with no symlink allowed: an image's `/mnt -> /etc`, or a
    directory a tenant swaps for a symlink mid-start, is refused, never followed."""
    parts = [p for p in task_path.split("/") if p and p != "."]
    if ".." in parts:
        raise ContainerError(f"mount target {task_path!r} leaves the container")
    if not parts:
        raise ContainerError(f"mount target {task_path!r} would cover the container's root")
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            want_dir = directory or not last
            try:
                step = linux.openat2(fd, part, os.O_PATH | os.O_NOFOLLOW, linux.STRICT)
            except FileNotFoundError:
                try:
                    if want_dir:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    else:
                        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                        os.close(os.open(part, flags, 0o644, dir_fd=fd))
                except FileExistsError:
                    pass  # made meanwhile: opened below, with the same checks
                step = linux.openat2(fd, part, os.O_PATH | os.O_NOFOLLOW, linux.STRICT)
            st = os.fstat(step)
            os.close(fd)
            fd = step
            if stat.S_ISLNK(st.st_mode):
                inner = "/" + "/".join(parts[: i + 1])
                raise ContainerError(
                    f"mount target {task_path!r}: {inner} is a symlink in the image"
                )
            if want_dir and not stat.S_ISDIR(st.st_mode) and not last:
                inner = "/" + "/".join(parts[: i + 1])
                raise ContainerError(f"mount target {task_path!r}: {inner} is not a directory")
    except OSError as err:
        os.close(fd)
        raise ContainerError(f"mount target {task_path!r}: {err.strerror}") from err
    except BaseException:
        os.close(fd)
        raise
    return fd


def _inside(root: str, task_path: str) -> str:
    """root/task_path, refused if it leaves root or passes through a symlink of the image:
    before pivot_root an image's `/mnt -> /etc` would resolve to the host's /etc."""
    target = os.path.normpath(os.path.join(root, task_path.lstrip("/")))
    if not target.startswith(root.rstrip("/") + "/"):
        raise ContainerError(f"mount target {task_path!r} leaves the container")
    path = root.rstrip("/")
    for part in target[len(path) + 1 :].split("/"):
        path = os.path.join(path, part)
        if os.path.islink(path):
            inner = "/" + path[len(root.rstrip("/")) + 1 :]
            raise ContainerError(f"mount target {task_path!r}: {inner} is a symlink in the image")
    return target


def bind_mounts(
    root: str, mounts: tuple[BindMount, ...], sources: tuple[int, ...], devices: bool = False
) -> None:
    """Each source (an O_PATH descriptor from open_source) cloned as a detached mount tree,
    its flags set on the whole tree (read-only all the way down for ro; nosuid and nodev
    unless it is a device), then attached onto a target opened inside the new root."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for m, source in zip(mounts, sources, strict=True):
            is_dir = stat.S_ISDIR(os.fstat(source).st_mode)
            target = open_target(root_fd, m.task_path, is_dir)
            tree = linux.clone_tree(source)
            try:
                attrs = linux.MOUNT_ATTR_NOSUID | (
                    linux.MOUNT_ATTR_NOEXEC if devices else linux.MOUNT_ATTR_NODEV
                )
                if m.read_only:
                    attrs |= linux.MOUNT_ATTR_RDONLY
                linux.set_mount_attr(tree, attrs)
                linux.attach_tree(tree, target)
            finally:
                os.close(tree)
                os.close(target)
    finally:
        os.close(root_fd)


def make_dev(root: str) -> None:
    """A minimal /dev: a few host nodes bound in, a private devpts and /dev/shm.

    The tmpfs is nodev, so a node a task makes there (with CAP_MKNOD as host root) opens
    nothing; each bound node is a mount of its own, with its own flags, so it still works."""
    dev = _inside(root, "/dev")
    os.makedirs(dev, exist_ok=True)
    nothing = linux.MS_NOSUID | linux.MS_NOEXEC
    linux.mount("tmpfs", dev, "tmpfs", nothing | linux.MS_NODEV, "mode=0755,size=64k")
    for node in DEV_NODES:
        target = os.path.join(dev, node)
        open(target, "a").close()  # noqa: SIM115
        linux.mount(f"/dev/{node}", target, None, linux.MS_BIND)
        # Set rather than copied from the host's /dev: device access, nothing else.
        linux.mount("none", target, None, linux.MS_BIND | linux.MS_REMOUNT | nothing)
    os.mkdir(os.path.join(dev, "pts"))
    linux.mount(
        "devpts",
        os.path.join(dev, "pts"),
        "devpts",
        linux.MS_NOSUID | linux.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    os.mkdir(os.path.join(dev, "shm"))
    linux.mount(
        "shm", os.path.join(dev, "shm"), "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777"
    )
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, os.path.join(dev, name))


def make_sys(root: str) -> None:
    sys_dir = _inside(root, "/sys")
    os.makedirs(sys_dir, exist_ok=True)
    flags = linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    linux.mount("sysfs", sys_dir, "sysfs", flags)


def copy_host_files(root: str) -> None:
    """Name resolution as on the host (host networking is the HPC default). Written into the
    writable layer before any bind is attached, by descriptor, never across a mount point:
    whatever a task binds at /etc/hosts, root never writes through it."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        etc = linux.openat2(root_fd, "etc", os.O_PATH | os.O_DIRECTORY, linux.STRICT)
    except OSError:
        return  # no /etc, or a symlink: leave it as the image has it
    finally:
        os.close(root_fd)
    try:
        owner = os.fstat(etc)  # the container's root, under root remapping too
        for name in ("resolv.conf", "hosts"):
            try:
                with open(os.path.join("/etc", name), "rb") as f:
                    data = f.read(1 << 20)
            except OSError:
                continue
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                fd = linux.openat2(etc, name, flags, linux.STRICT | linux.RESOLVE_NO_XDEV, 0o644)
            except OSError:
                continue  # a symlink or a directory in the image: keep the image's
            try:
                os.write(fd, data)
                os.fchown(fd, owner.st_uid, owner.st_gid)
            finally:
                os.close(fd)
    finally:
        os.close(etc)


# Docker's masked and read-only /proc paths: host-wide knobs a task must not turn, and
# kernel memory and keys it must not read.
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
PROC_MASKED = ("kcore", "keys", "timer_list", "sched_debug", "latency_stats", "acpi", "scsi")


def pivot_into(root: str) -> None:
    for path in ("/.oldroot", "/proc"):
        _inside(root, path)
    os.chdir(root)
    os.makedirs(".oldroot", exist_ok=True)  # a read-only root brings its own
    linux.pivot_root(".", ".oldroot")
    os.chdir("/")
    linux.umount("/.oldroot", linux.MNT_DETACH)
    try:
        os.rmdir("/.oldroot")
    except OSError:  # read-only root
        pass
    os.makedirs("/proc", exist_ok=True)
    linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    protect_proc("/proc")


def protect_proc(proc: str) -> None:
    for name in PROC_READ_ONLY:
        path = os.path.join(proc, name)
        if os.path.exists(path):
            linux.mount(path, path, None, linux.MS_BIND | linux.MS_REC)
            flags = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID
            linux.mount("none", path, None, flags | linux.MS_NODEV | linux.MS_NOEXEC)
    for name in PROC_MASKED:
        path = os.path.join(proc, name)
        if os.path.isdir(path):
            linux.mount("tmpfs", path, "tmpfs", linux.MS_RDONLY, "size=0")
        elif os.path.exists(path):
            # /dev/null here is the one make_dev bound in from the host, not the image's.
            linux.mount("/dev/null", path, None, linux.MS_BIND)


def build(
    spec: ContainerSpec,
    scratch: str,
    image_root: str,
    userns: tuple[int, IdMaps] | None = None,
    disk: int = -1,
) -> None:
    """All the steps, in order, leaving the calling process inside the container's root.
    userns: the user namespace (descriptor, maps) the task will run in; the init stays outside."""
    enter_namespaces(spec)
    # Opened once, here, in the container's mount namespace (open_tree clones only from it).
    sources = tuple(open_source(m) for m in spec.mounts)
    devices = tuple(open_source(m, device=True) for m in spec.devices)
    root = make_rootfs(spec, scratch, image_root, userns, sources, disk)
    if spec.writable != "none":
        copy_host_files(root)  # before the binds: nothing of the host's is under root yet
    bind_mounts(root, spec.mounts, sources)
    make_dev(root)
    bind_mounts(
        root, spec.devices, devices, devices=True
    )  # after make_dev: its tmpfs would hide them
    make_sys(root)
    for fd in (*sources, *devices):
        os.close(fd)
    pivot_into(root)


def read_in_root(root: str, path: str, limit: int = 1 << 20) -> bytes | None:
    """A small regular file of the image, read as root without trusting the image: resolved
    inside root (its symlinks cannot lead out), never a FIFO or device (they would block or
    never end), at most limit bytes. None when there is no such file."""
    try:
        top = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            resolve = linux.RESOLVE_IN_ROOT | linux.RESOLVE_NO_MAGICLINKS
            fd = linux.openat2(top, path.lstrip("/"), os.O_RDONLY | os.O_NONBLOCK, resolve)
        finally:
            os.close(top)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit)
    finally:
        os.close(fd)


def passwd_entries(root: str = "/") -> list[list[str]]:
    """The image's /etc/passwd, split into fields; nothing if it is missing or not a plain
    file (never the host's: it is resolved inside root)."""
    raw = read_in_root(root, "etc/passwd")
    text = raw.decode("utf-8", errors="replace") if raw else ""
    return [fields for line in text.splitlines() if len(fields := line.split(":")) >= 4]


def resolve_user(user: str, root: str = "/") -> tuple[int, int]:
    """uid and gid of "name", "uid" or "name:gid", looked up in the container's own files."""
    if not user:
        return 0, 0
    name, _, group = user.partition(":")
    uid = int(name) if name.isdigit() else -1
    gid = -1
    # A number is that uid, whatever the image says: an image line named "1000" with uid 0
    # must not turn user "1000" into root. The image only supplies its primary group.
    column = 2 if name.isdigit() else 0
    for fields in passwd_entries(root):
        if fields[column] == name and fields[2].isdigit() and fields[3].isdigit():
            uid, gid = int(fields[2]), int(fields[3])
            break
    if uid < 0:
        raise ContainerError(f"user {name!r} does not exist in the image's /etc/passwd")
    if group:
        if not group.isdigit():
            raise ContainerError(f"group {group!r} in user {user!r} must be numeric")
        gid = int(group)
    return uid, gid if gid >= 0 else uid


def with_home(env: dict[str, str], uid: int, root: str = "/") -> dict[str, str]:
    """env with HOME, as a login would set it, unless the task set its own: the user's home
    in the image's /etc/passwd, else "/" (Open MPI 5, among others, will not start without)."""
    if "HOME" in env:
        return env
    homes = [f[5] for f in passwd_entries(root) if f[2] == str(uid) and len(f) > 5 and f[5]]
    return {**env, "HOME": homes[0] if homes else "/"}


def find_command(command: str, env: dict[str, str]) -> str:
    if "/" in command:
        if not os.path.isfile(command):
            raise ContainerError(f"command {command!r} does not exist in the image")
        if not os.access(command, os.X_OK):
            raise ContainerError(f"command {command!r} is not executable")
        return command
    found = shutil.which(command, path=env.get("PATH", "/usr/local/bin:/usr/bin:/bin"))
    if found is None:
        raise ContainerError(f"command {command!r} was not found in the image's PATH")
    return found
