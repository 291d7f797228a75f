"""Go-style durations ("30s", "1m30s", "500ms"), as Nomad's configs write them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def parse_duration(text: Any) -> float | None:
    """Seconds in a Go-style duration such as "30s", "1m30s" or "500ms"; None if malformed."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    rest, total = str(text).strip(), 0.0
    if not rest:
        return None
    if rest == "0":  # the one duration Go takes without a unit
        return 0.0
    while rest:
        number = ""
        while rest and (rest[0].isdigit() or rest[0] == "."):
            number, rest = number + rest[0], rest[1:]
        unit = next((u for u in ("ms", "s", "m", "h") if rest.startswith(u)), None)
        if not number or unit is None:
            return None
        try:
            total += float(number) * units[unit]
        except ValueError:
            return None
        rest = rest[len(unit) :]
    return total


def duration(example: str, positive: bool = False) -> Callable[[Any], str | None]:
    """The schema check of a duration option; positive: zero is refused too (a period, a
    timeout), where it could only mean a busy loop or an instant failure."""
    wanted = f'must be a duration like "{example}"' + (", above zero" if positive else "")

    def check(value: Any) -> str | None:
        found = parse_duration(value)
        return None if found is not None and (found > 0 or not positive) else wanted

    return check


def seconds(text: Any) -> float:
    """A duration option's value in seconds, once the schema has checked it: "0s" is 0, never
    replaced by a default; ValueError for what no check would have let through."""
    found = parse_duration(text)
    if found is None:
        raise ValueError(f"not a duration: {text!r}")
    return found
