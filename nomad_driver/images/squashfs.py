"""Building a SquashFS file from a tar stream (squashfs-tools-ng's tar2sqfs) or a directory
(mksquashfs), multi-threaded, zstd at a level chosen for speed."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from typing import IO

DEFAULT_LEVEL = 3


class BuildError(RuntimeError):
    pass


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
    )
    assert proc.stdin is not None and proc.stderr is not None
    try:
        write(proc.stdin)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # tar2sqfs stopped early: its own message says why
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    err = proc.stderr.read().decode(errors="replace").strip()
    if proc.wait() != 0:
        raise BuildError(f"tar2sqfs failed: {err or 'exit ' + str(proc.returncode)}")


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
