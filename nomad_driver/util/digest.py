"""SHA-256 digests of image files, hashed once and then remembered.

A multi-gigabyte SquashFS must not be re-read on every task start. The cache key is what proves
the file is unchanged: device, inode, size, mtime and ctime (ctime cannot be set by a user, so
`touch -d` cannot fake an old entry). The cache lives in a directory only root can write.
"""

from __future__ import annotations

import os

from nomad_driver.util.files import write_atomic

CHUNK = 1 << 20


def sha256_file(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return sha256_fd(fd)
    finally:
        os.close(fd)


def sha256_fd(fd: int) -> str:
    """The digest of an open file's whole content, read from offset 0 (its offset is kept)."""
    import hashlib  # OpenSSL: 4 MB and milliseconds, paid only when a file must be hashed

    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return "sha256:" + digest.hexdigest()


def unchanged_key(st: os.stat_result) -> str:
    """What proves a file unchanged since it was last read (ctime: not settable by users)."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def file_digest(path: str, cache_dir: str | None = None) -> str:
    """ "sha256:<hex>" of the file at path, from the cache when the file is provably unchanged."""
    if cache_dir is None:
        return sha256_file(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fd_digest(fd, cache_dir)
    finally:
        os.close(fd)


def fd_digest(fd: int, cache_dir: str) -> str:
    """ "sha256:<hex>" of an open file, from the cache when the inode is provably unchanged.
    Only meaningful for a file nobody else can write (the caller's check): such a file's
    bytes are the ones hashed for as long as the descriptor is used."""
    st = os.fstat(fd)
    entry = os.path.join(cache_dir, f"{st.st_dev}-{st.st_ino}")
    key = unchanged_key(st)
    try:
        with open(entry, encoding="ascii") as f:
            cached_key, _, cached = f.read().strip().partition(" ")
        if cached_key == key and cached.startswith("sha256:"):
            return cached
    except (OSError, UnicodeDecodeError):
        pass
    digest = sha256_fd(fd)
    if unchanged_key(os.fstat(fd)) == key:  # not changed while we read it
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        write_atomic(entry, f"{key} {digest}\n")
    return digest


def remember(path: str, digest: str, cache_dir: str) -> None:
    """Record a digest just computed for path (e.g. by the writer of the file), so the next
    file_digest need not read it again."""
    st = os.stat(path)
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    write_atomic(
        os.path.join(cache_dir, f"{st.st_dev}-{st.st_ino}"), f"{unchanged_key(st)} {digest}\n"
    )
