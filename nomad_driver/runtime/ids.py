"""Which host uids and gids a task may run as: the admin's allowed_uids and allowed_gids, never
the ids remapped roots use. Checked where the task's user is finally resolved."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nomad_driver.runtime.spec import ContainerSpec

# The ids of ordinary users, and nobody/nogroup (65534), which many images run as: not root's
# group, not the system accounts below 1000 that own host files and daemons. Groups also
# allow 100, "users": the primary group of every user where there are no per-user groups.
DEFAULT_UIDS = ((1000, 65534),)
DEFAULT_GIDS = ((100, 100), (1000, 65534))


def parse_ranges(values: Iterable[str]) -> tuple[tuple[int, int], ...]:
    """["1000-65534", "70000"] -> ((1000, 65534), (70000, 70000)); ValueError names the item."""
    ranges = []
    for value in values:
        low, sep, high = str(value).strip().partition("-")
        if not (low.isdigit() and (high.isdigit() or not sep)):
            raise ValueError(f'{value!r} is not "FIRST-LAST" or one id')
        first, last = int(low), int(high) if sep else int(low)
        if first > last or last > 2**32 - 2:
            raise ValueError(f"{value!r} is not a range of ids 0-{2**32 - 2}")
        ranges.append((first, last))
    return tuple(ranges)


def format_ranges(ranges: Iterable[tuple[int, int]]) -> list[str]:
    return [f"{a}-{b}" if a != b else str(a) for a, b in ranges]


def check(
    user: str,
    uid: int,
    gid: int,
    allowed_uids: Iterable[tuple[int, int]],
    allowed_gids: Iterable[tuple[int, int]],
    root_range: tuple[int, int] | None,
) -> None:
    """Refuse a non-root task user outside the allowed ranges or inside root_range (the host
    ids of every remapped root). uid 0 is the task's root: remapped, or host root with bounded
    capabilities when there is no user namespace, as the plugin's user_namespace decides."""
    from nomad_driver.runtime.container import ContainerError

    if uid == 0:
        return
    for kind, number, allowed, option in (
        ("uid", uid, tuple(allowed_uids), "allowed_uids"),
        ("gid", gid, tuple(allowed_gids), "allowed_gids"),
    ):
        if root_range is not None and root_range[0] <= number < root_range[0] + root_range[1]:
            first, count = root_range
            raise ContainerError(
                f"user {user!r} is {kind} {number}, inside the plugin's root_id_range "
                f"{first}:{count} (the host ids of remapped root)"
            )
        if not any(low <= number <= high for low, high in allowed):
            raise ContainerError(
                f"user {user!r} is {kind} {number}, outside the plugin's {option} "
                f"{format_ranges(allowed)}"
            )


def check_user(spec: ContainerSpec, uid: int, gid: int) -> None:
    """check() for the task of spec, its user resolved to uid and gid."""
    check(spec.user, uid, gid, spec.allowed_uids, spec.allowed_gids, spec.userns)
