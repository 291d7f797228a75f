"""Doing a file operation as the user a root process acts for: in a child process with that
user's ids and groups alone, so the kernel's own permission checks decide (a root process
checking permissions itself, then opening, is the race this avoids)."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable, Iterable

LIMIT = 1 << 20


def children_in_own_pid_namespace() -> None:
    """After a container's PID namespace (unshared for it) ended, fork fails with ENOMEM:
    children go in our own PID namespace again."""
    fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, 0x20000000) != 0:  # CLONE_NEWPID
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)


def fork_blocked() -> tuple[int, set[int | signal.Signals]]:
    """os.fork() with every signal blocked, and the mask to restore. No handler of this root
    process may run in the child (it would carry on, as root or as the user, outside what it
    was forked for): there signals stay blocked until it exits. The parent restores the mask
    where a stop may come, that is where it is ready to end the child."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        return os.fork(), blocked
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        raise


def run_as(uid: int, gid: int, groups: Iterable[int], work: Callable[[], bytes]) -> bytes:
    """work()'s bytes, as it returned them in a child running as uid/gid/groups; its OSError
    raised here (errno and text, no path beyond what work put in the message). Root (uid 0)
    runs work here, as itself."""
    if uid == 0:
        return work()
    if os.geteuid() == 0:
        children_in_own_pid_namespace()
    r, w = os.pipe()
    try:
        pid, blocked = fork_blocked()
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    if pid == 0:
        try:
            os.close(r)
            try:
                os.setgroups(sorted(set(groups)))
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
                out = b"+" + work()
            except OSError as err:
                out = f"-{err.errno or errno.EIO} {err.strerror or err}".encode()
            except BaseException as err:  # noqa: BLE001 - reported, then the child ends
                out = f"-{errno.EIO} {err}".encode()
            view = memoryview(out)
            while view:
                view = view[os.write(w, view) :]
        finally:
            os._exit(0)  # whatever happened (a parent gone: EPIPE), never past here
    chunks = []
    try:
        os.close(w)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a pending handler may run here
        while chunk := os.read(r, 1 << 16):
            chunks.append(chunk)
    except BaseException:
        os.kill(pid, signal.SIGKILL)  # the child does not outlive a parent that gave up
        raise
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    said = b"".join(chunks)
    if said[:1] == b"+":
        return said[1:]
    code, _, text = said[1:].decode(errors="replace").partition(" ")
    raise OSError(int(code) if code.isdigit() else errno.EIO, text or "the child died")


def read_as(path: str, uid: int, gid: int, groups: Iterable[int], limit: int = LIMIT) -> bytes:
    """The file at path as the user may read it (never a FIFO or device: a regular file
    only), at most limit bytes (OSError EFBIG past it)."""

    def read() -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            import stat

            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            data = os.read(fd, limit + 1)
        finally:
            os.close(fd)
        if len(data) > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes")
        return data

    return run_as(uid, gid, groups, read)


def write_new_as(
    path: str, source_fd: int, uid: int, gid: int, groups: Iterable[int], mode: int = 0o644
) -> None:
    """Create path anew as the user (never through a symlink, never over a file) with the
    contents of source_fd, opened by the caller. Whole or not at all: written unnamed
    (O_TMPFILE) and linked in only once complete, so a write cut short (the child killed when
    the run is stopped) leaves nothing. Where the filesystem has no O_TMPFILE (NFS), written
    under a hidden name, linked in when complete, and on any failure or stop the hidden name
    is removed, as the user, by a second child."""
    hidden = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.pyhpc-{os.getpid()}")

    def write() -> bytes:
        where = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        name = os.path.basename(path)
        try:
            try:
                unnamed_flags = os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC
                out, temp = os.open(".", unnamed_flags, mode, dir_fd=where), ""
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.EISDIR):
                    raise
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                temp = os.path.basename(hidden)
                out = os.open(temp, flags, mode, dir_fd=where)
            try:
                os.lseek(source_fd, 0, os.SEEK_SET)
                while os.sendfile(out, source_fd, None, 1 << 24):
                    pass
                os.fsync(out)
                # link(): never over what is at name (EEXIST); for the unnamed file, linkat
                # following its descriptor's link.
                source = temp or f"/proc/self/fd/{out}"
                os.link(source, name, src_dir_fd=where if temp else None, dst_dir_fd=where)
            finally:
                os.close(out)
                if temp:
                    os.unlink(temp, dir_fd=where)
        finally:
            os.close(where)
        return b""

    def forget() -> bytes:
        try:
            os.unlink(hidden)
        except FileNotFoundError:
            pass
        return b""

    try:
        run_as(uid, gid, groups, write)
    except BaseException:
        try:  # the child may have been killed mid-write: its hidden name goes, as the user
            run_as(uid, gid, groups, forget)
        except OSError:
            pass
        raise
