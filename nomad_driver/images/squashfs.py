"""Building a SquashFS file from a tar stream (squashfs-tools-ng's tar2sqfs) or a directory
(mksquashfs), multi-threaded, zstd at a level chosen for speed."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable
from typing import IO

from nomad_driver.util.errors import PyhpcError

DEFAULT_LEVEL = 3


class BuildError(PyhpcError, RuntimeError):
    def __init__(self, message: str, written: int = 0) -> None:
        super().__init__(message)
        self.written = written  # the most of dest seen on disk (gone: the builder removes it)


class _Growth(threading.Thread):
    """Watches how large a file being written gets (tar2sqfs deletes its output on failure;
    this is how a full disk can still be told apart from another I/O error). It holds the file
    open from when it appears, so finish() reads the size it last had even after the unlink,
    however the sampling thread was scheduled."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True, name="sqfs-growth")
        self.path, self.peak, self.done = path, 0, threading.Event()
        self.fd: int | None = None

    def run(self) -> None:
        while not self.done.wait(0.01):
            try:
                if self.fd is None:
                    self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                self.peak = max(self.peak, os.fstat(self.fd).st_size)
            except OSError:
                continue

    def finish(self) -> int:
        """Stop watching; the largest size seen, the last included. Lets go of the file."""
        self.done.set()
        self.join()
        if self.fd is not None:
            self.peak = max(self.peak, os.fstat(self.fd).st_size)
            os.close(self.fd)
            self.fd = None
        return self.peak


def from_tar(write: Callable[[IO[bytes]], object], dest: str, level: int = DEFAULT_LEVEL) -> None:
    """Run write(stdin_of_tar2sqfs); dest is complete only if both succeed."""
    jobs = str(max(1, len(os.sched_getaffinity(0))))
    proc = subprocess.Popen(
        [
            "tar2sqfs",
            "--quiet",
            "--no-skip",
            "--force",
            "-j",
            jobs,
            "-c",
            "zstd",
            "-X",
            f"level={level}",
            "--defaults",
            "mode=0755",
            dest,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        bufsize=1 << 20,  # the tar writer's 10 KB records reach the pipe 1 MB at a time
    )
    assert proc.stdin is not None and proc.stderr is not None
    growth = _Growth(dest)
    growth.start()
    try:
        write(proc.stdin)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # tar2sqfs stopped early: its own message says why
    except BaseException:
        proc.kill()
        proc.wait()
        growth.finish()
        raise
    err = proc.stderr.read().decode(errors="replace").strip()
    failed = proc.wait() != 0
    peak = growth.finish()  # after tar2sqfs is done: its last size, even once it deleted it
    if failed:
        raise BuildError(f"tar2sqfs failed: {err or 'exit ' + str(proc.returncode)}", peak)


def from_directory(root: str, dest: str, level: int = DEFAULT_LEVEL) -> None:
    jobs = str(max(1, len(os.sched_getaffinity(0))))
    done = subprocess.run(
        [
            "mksquashfs",
            root,
            dest,
            "-noappend",
            "-quiet",
            "-no-progress",
            "-comp",
            "zstd",
            "-Xcompression-level",
            str(level),
            "-processors",
            jobs,
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise BuildError(f"mksquashfs failed: {done.stderr.strip() or done.stdout.strip()}")
