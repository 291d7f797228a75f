"""The C heap of a long-lived process with many short threads (the driver): glibc gives threads
arenas of their own and hands freed memory back to the kernel only from the top of each, so a
burst of calls leaves the process larger for good. Bounding the arenas and trimming now and then
returns it (bench/results/memory.md). Nothing happens where the C library is not glibc."""

from __future__ import annotations

import ctypes
import functools

M_ARENA_MAX = -8


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def limit_arenas(count: int) -> None:
    """At most count malloc arenas; call before threads start."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, count)


def trim() -> None:
    """Give the free parts of the heap back to the kernel."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
