"""Thin ctypes wrappers for the Linux calls the standard library lacks on Python 3.11
(mount, umount2, unshare, setns, pivot_root, sethostname, prctl, capset). Errors raise OSError
naming the call and the path."""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # find_library would spawn ldconfig

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 2
PR_SET_DUMPABLE = 4

# x86_64 numbers; the new mount API (open_tree, move_mount, mount_setattr) is the same on arm64.
SYS_PIVOT_ROOT = 155
if os.uname().machine == "aarch64":
    SYS_PIVOT_ROOT = 41
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR, SYS_OPENAT2 = 428, 429, 442, 437
OPEN_TREE_CLONE = 1
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_IDMAP = 0x00100000
# openat2's resolve flags (linux/openat2.h).
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
# Beneath a directory, no symlink of any kind on the way: what a root process uses on paths a
# tenant can change.
STRICT = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS


def libc() -> ctypes.CDLL:
    """The C library, loaded once, before any pivot_root hides the host's files."""
    return _libc


def _check(result: int, what: str, path: str = "") -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path or None)


def mount(
    source: str, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {fstype or 'bind'} {source}",
        target,
    )


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), "umount", target)


def idmapped_bind(source: str, target: str, userns_fd: int) -> None:
    """Bind source at target with its file owners shown through the user namespace's id map
    (so files owned by 0 in the image belong to the container's root, whoever that is on the
    host)."""
    tree = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, source.encode(), OPEN_TREE_CLONE)
    if tree < 0:
        _check(-1, "open_tree", source)
    try:
        attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
        _check(
            _libc.syscall(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH, attr, ctypes.sizeof(attr)),
            "mount_setattr idmap",
            source,
        )
        _check(
            _libc.syscall(
                SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH
            ),
            "move_mount",
            target,
        )
    finally:
        os.close(tree)


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): path resolved from dirfd under the RESOLVE_* rules, atomically, by the kernel.
    O_CLOEXEC is always added. Raises OSError naming the path."""
    how = (ctypes.c_uint64 * 3)(flags | os.O_CLOEXEC, mode, resolve)
    fd = _libc.syscall(SYS_OPENAT2, dirfd, path.encode(), how, ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def clone_tree(fd: int, recursive: bool = True) -> int:
    """A detached copy of the mount tree at the opened object fd (open_tree OPEN_TREE_CLONE):
    what a bind mount of it would attach, taken from the descriptor, never from a path."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    tree = _libc.syscall(SYS_OPEN_TREE, fd, b"", flags)
    if tree < 0:
        _check(-1, "open_tree", f"/proc/self/fd/{fd}")
    return int(tree)


def set_mount_attr(tree: int, set_flags: int, clear: int = 0, recursive: bool = True) -> None:
    """mount_setattr(2) on a mount given by descriptor, on every mount below it too when
    recursive (a read-only bind is then read-only all the way down)."""
    attr = (ctypes.c_uint64 * 4)(set_flags, clear, 0, 0)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    _check(
        _libc.syscall(SYS_MOUNT_SETATTR, tree, b"", flags, attr, ctypes.sizeof(attr)),
        "mount_setattr",
    )


def attach_tree(tree: int, target_fd: int) -> None:
    """Attach a detached mount tree onto the object target_fd was opened on (both by
    descriptor: no path is resolved)."""
    flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH
    _check(_libc.syscall(SYS_MOVE_MOUNT, tree, b"", target_fd, b"", flags), "move_mount")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(
        _libc.syscall(SYS_PIVOT_ROOT, new_root.encode(), put_old.encode()), "pivot_root", new_root
    )


def sethostname(name: str) -> None:
    raw = name.encode()[:64]
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def prctl(option: int, arg: int, what: str) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), what)


LINUX_CAPABILITY_VERSION_3 = 0x20080522


def capset(mask: int) -> None:
    """Set effective, permitted and inheritable capabilities of this thread to mask."""
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    low, high = mask & 0xFFFFFFFF, mask >> 32
    data = (ctypes.c_uint32 * 6)(low, low, 0, high, high, 0)
    _check(_libc.capset(header, data), "capset")
