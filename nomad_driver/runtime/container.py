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
import struct
from typing import NamedTuple

from nomad_driver.runtime import linux
from nomad_driver.runtime.spec import BindMount, ContainerSpec

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")


class ContainerError(Exception):
    """A step failed; the message names the step and the path involved."""


def enter_namespaces(spec: ContainerSpec) -> None:
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


def attach_loop(image: str) -> tuple[str, int]:
    """Attach the image read-only to a free loop device that frees itself on the last unmount.

    Returns the device and an open descriptor on it: closing that descriptor before the
    device is mounted would detach it again (autoclear)."""
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(16):  # another process may grab the free device first
                number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                device = f"/dev/loop{number}"
                if not os.path.exists(device):
                    os.mknod(device, 0o660 | 0o060000, os.makedev(7, number))
                loop = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
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
                        LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
                        image.encode()[:63],
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
    finally:
        os.close(fd)
    raise ContainerError(f"no free loop device for {image}")


def mount_image(image: str, target: str) -> None:
    device, loop = attach_loop(image)
    try:
        linux.mount(device, target, "squashfs", linux.MS_RDONLY | linux.MS_NODEV | linux.MS_NOSUID)
    except OSError as err:
        raise ContainerError(f"image {image} is not a readable SquashFS file ({err})") from err
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


def make_rootfs(
    spec: ContainerSpec, scratch: str, image_root: str, userns: tuple[int, IdMaps] | None = None
) -> str:
    """The image, read-only, under the writable layer the task asked for:
    tmpfs (default), disk (upper layer in spec.upper_dir) or none (read-only root).
    The image itself never changes. With root remapping the image is seen through the user
    namespace's id map, so the container's root owns what the image's root owns."""
    linux.mount("tmpfs", scratch, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0755")
    image, root = os.path.join(scratch, "image"), os.path.join(scratch, "root")
    os.mkdir(root)
    remapped = userns is not None and userns[1].root_on_host is not None
    if userns is not None and remapped:
        os.mkdir(image)
        linux.idmapped_bind(image_root, image, userns[0])
    else:
        image = image_root
    flags = linux.MS_NOSUID | linux.MS_NODEV
    if spec.writable == "none":
        # A read-only overlay: a small layer of mount points over the image.
        skel = os.path.join(scratch, "skel")
        for path in ("dev", "proc", "sys", ".oldroot", *(m.task_path for m in spec.mounts)):
            target = _inside(skel, path)
            if os.path.exists(os.path.join(image, path.lstrip("/"))) or os.path.exists(target):
                continue
            source = next((m.host_path for m in spec.mounts if m.task_path == path), "")
            if source and not os.path.isdir(source):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                open(target, "a").close()  # noqa: SIM115
            else:
                os.makedirs(target)
        linux.mount("overlay", root, "overlay", flags | linux.MS_RDONLY, f"lowerdir={skel}:{image}")
        return root
    layer = spec.upper_dir if spec.writable == "disk" else os.path.join(scratch, "layer")
    upper, work = os.path.join(layer, "upper"), os.path.join(layer, "work")
    os.makedirs(upper, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    if remapped:
        # The upper directory is the root directory's inode: same owner as the image's root
        # (as the id-mapped view shows it), so the container's root owns its "/".
        st = os.stat(image)
        os.chown(upper, st.st_uid, st.st_gid)
        os.chmod(upper, st.st_mode & 0o7777)
    linux.mount(
        "overlay", root, "overlay", flags, f"lowerdir={image},upperdir={upper},workdir={work}"
    )
    return root


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


def bind_mounts(root: str, mounts: tuple[BindMount, ...]) -> None:
    for m in mounts:
        target = _inside(root, m.task_path)
        if os.path.isdir(m.host_path):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.exists(target):
                open(target, "a").close()  # noqa: SIM115
        linux.mount(m.host_path, target, None, linux.MS_BIND | linux.MS_REC)
        if m.read_only:
            flags = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID
            linux.mount("none", target, None, flags | linux.MS_NODEV)


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
    """Name resolution as on the host (host networking is the HPC default)."""
    etc = os.path.join(root, "etc")
    if not os.path.isdir(etc) or os.path.islink(etc):
        return
    for name in ("resolv.conf", "hosts"):
        src, dst = os.path.join("/etc", name), os.path.join(etc, name)
        if os.path.isfile(src) and not os.path.islink(dst):
            shutil.copyfile(src, dst)
            # Owned like /etc itself: the container's root, under root remapping too.
            st = os.stat(etc)
            os.chown(dst, st.st_uid, st.st_gid)


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
    spec: ContainerSpec, scratch: str, image_root: str, userns: tuple[int, IdMaps] | None = None
) -> None:
    """All the steps, in order, leaving the calling process inside the container's root.
    userns: the user namespace (descriptor, maps) the task will run in; the init stays outside."""
    enter_namespaces(spec)
    root = make_rootfs(spec, scratch, image_root, userns)
    bind_mounts(root, spec.mounts)
    make_dev(root)
    bind_mounts(root, spec.devices)  # after make_dev: its tmpfs would hide them
    make_sys(root)
    if spec.writable != "none":
        copy_host_files(root)
    pivot_into(root)


def passwd_entries(root: str = "/") -> list[list[str]]:
    """The image's /etc/passwd, split into fields; nothing if it is missing or a link out of
    the image (never the host's)."""
    passwd = os.path.realpath(os.path.join(root, "etc/passwd"))
    if not passwd.startswith(os.path.realpath(root).rstrip("/") + "/"):
        return []
    try:
        with open(passwd, encoding="utf-8", errors="replace") as f:
            return [fields for line in f if len(fields := line.rstrip("\n").split(":")) >= 4]
    except OSError:
        return []


def resolve_user(user: str, root: str = "/") -> tuple[int, int]:
    """uid and gid of "name", "uid" or "name:gid", looked up in the container's own files."""
    if not user:
        return 0, 0
    name, _, group = user.partition(":")
    uid = int(name) if name.isdigit() else -1
    gid = -1
    for fields in passwd_entries(root):
        if name in (fields[0], fields[2]) and fields[2].isdigit() and fields[3].isdigit():
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
