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
