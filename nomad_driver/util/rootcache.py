"""A cache only root writes and only root's entries are believed from: decoded policy for
`pyhpc run`, compiled seccomp filters. Whoever could write an entry would choose the policy or
the filter, so an entry counts only from a root-owned directory nobody else may write, in a
root-owned file nobody else may write, opened without following a symlink. Written atomically,
by descriptor. A cache and nothing more: any doubt reads as a miss."""

from __future__ import annotations

import os

DIR = "/run/pyhpc/.policy-cache"


def _open_dir(directory: str, create: bool) -> int:
    """The directory, opened without following a symlink; -1 if absent or not to be trusted."""
    if create:
        try:
            os.makedirs(os.path.dirname(directory), mode=0o755, exist_ok=True)
            os.mkdir(directory, 0o700)
        except OSError:
            pass
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return -1
    st = os.fstat(fd)
    if st.st_uid != 0 or st.st_mode & 0o022:
        os.close(fd)
        return -1
    return fd


def read(name: str, directory: str = "", limit: int = 1 << 20) -> bytes | None:
    """The entry name (in directory, default DIR), or None."""
    cache = _open_dir(directory or DIR, create=False)
    if cache < 0:
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=cache)
    except OSError:
        return None
    finally:
        os.close(cache)
    try:
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_mode & 0o022 or not (st.st_mode & 0o170000 == 0o100000):
            return None
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def write(name: str, data: bytes, directory: str = "") -> None:
    """Store data as name (in directory, default DIR), whole or not at all."""
    cache = _open_dir(directory or DIR, create=True)
    if cache < 0:
        return
    tmp = f".{name}.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=cache)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, name, src_dir_fd=cache, dst_dir_fd=cache)
    except BaseException as err:  # a signal that stops the run, too: no half-written entry
        try:
            os.unlink(tmp, dir_fd=cache)
        except OSError:
            pass
        if not isinstance(err, OSError):  # a cache that cannot be written is only slower
            raise
    finally:
        os.close(cache)
