"""Waiting in tests for what another thread or process makes true."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(check: Callable[[], object], timeout: float = 5.0, every: float = 0.02) -> bool:
    """Whether check() came true within timeout seconds (asked every `every` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return bool(check())
