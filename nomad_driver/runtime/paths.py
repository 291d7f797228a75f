"""Path checks an admin's allowlists rely on: symlinks resolved, whole path components only,
so an allowed "/scratch" never admits "/scratch2" or "/scratch/../etc"."""

from __future__ import annotations

import os
from collections.abc import Iterable


def within(path: str, allowed: Iterable[str]) -> str | None:
    """The real path of `path` if it lies inside one of the allowed directories, else None."""
    real = os.path.realpath(path)
    for directory in allowed:
        top = os.path.realpath(directory)
        if real == top or real.startswith(top.rstrip("/") + "/"):
            return real
    return None


def parse_bind(text: str, field: str) -> tuple[str, str, bool]:
    """ "SRC:DST[:ro|rw]" (DST defaults to SRC) -> (src, dst, read_only); ValueError names it."""
    parts = text.split(":")
    if len(parts) > 3 or not parts[0]:
        raise ValueError(f"{field}: {text!r} is not SRC[:DST[:ro|rw]]")
    src = parts[0]
    dst = parts[1] if len(parts) > 1 and parts[1] else src
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise ValueError(f"{field}: {text!r}: the mode must be ro or rw, not {mode!r}")
    if not src.startswith("/") or not dst.startswith("/"):
        raise ValueError(f"{field}: {text!r}: both paths must be absolute")
    if ".." in dst.split("/"):
        raise ValueError(f"{field}: {text!r}: the container path may not contain '..'")
    if os.path.normpath("/" + dst.lstrip("/")) == "/":
        raise ValueError(f"{field}: {text!r}: the container path may not be / (the image is)")
    return src, dst, mode == "ro"
