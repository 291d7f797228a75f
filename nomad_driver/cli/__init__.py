"""The `pyhpc` command line."""

from __future__ import annotations


def pairs(items: list[str], flag: str, shape: str = "KEY=VALUE") -> dict[str, str]:
    """Repeated `--flag KEY=VALUE` arguments as a mapping; ValueError naming the first that is
    not of that shape."""
    found = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {item!r}: expected {shape}")
        found[key] = value
    return found
