"""A real racing process for the time-of-check/time-of-use attacks: it swaps two paths with
renameat2(RENAME_EXCHANGE) as fast as it can, as a hostile tenant's second task would, until
stopped. Run as: python -m tests.runtime.racer A B"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RENAME_EXCHANGE = 2
AT_FDCWD = -100


def exchange_forever(a: str, b: str) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    one, two = a.encode(), b.encode()
    if libc.renameat2(AT_FDCWD, one, AT_FDCWD, two, RENAME_EXCHANGE) != 0:
        sys.exit(f"racer: cannot swap {a} and {b}: {os.strerror(ctypes.get_errno())}")
    while True:
        libc.renameat2(AT_FDCWD, one, AT_FDCWD, two, RENAME_EXCHANGE)


@contextmanager
def racing(a: Path, b: Path, uid: int = 1000) -> Iterator[subprocess.Popen[bytes]]:
    """Swap a and b in a loop from a separate process running as uid (the tenant), while the
    body runs; the swaps stop when it ends. The tenant runs the system's Python on a copy of
    this file it can read (the checkout may sit in a directory only root can enter)."""
    with tempfile.TemporaryDirectory(prefix="pyhpc-racer-") as where:
        os.chmod(where, 0o755)
        script = os.path.join(where, "racer.py")
        shutil.copyfile(__file__, script)
        os.chmod(script, 0o644)
        python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
        proc = subprocess.Popen(
            [python, "-S", script, str(a), str(b)], user=uid, group=uid, extra_groups=[]
        )
        try:
            time.sleep(0.05)
            yield proc
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -9, "the racer died on its own: the race never ran"


if __name__ == "__main__":
    exchange_forever(sys.argv[1], sys.argv[2])
