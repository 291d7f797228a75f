"""Files written so readers never see half of them."""

from __future__ import annotations

import _thread
import os


def write_atomic(path: str, text: str) -> None:
    """Write a file so readers see the old content or the new, never half of it."""
    # Unique per thread too: two threads of the plugin may write the same file at once.
    tmp = f"{path}.tmp.{os.getpid()}.{_thread.get_ident()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
