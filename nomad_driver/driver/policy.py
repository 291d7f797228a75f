"""The admin's plugin config applied to one task's config: the checks and the ContainerSpec.

Shared by the Nomad driver and `pyhpc run`, so a container started by hand obeys the same
policy file as one started by Nomad. No gRPC here; refusals raise PolicyError naming the option.
"""

from __future__ import annotations

import os
import stat
from typing import NamedTuple

from nomad_driver.driver.config import PluginConfig, TaskConfig, parse_id_range
from nomad_driver.runtime import security
from nomad_driver.runtime.cgroups import Limits
from nomad_driver.runtime.paths import parse_bind, within
from nomad_driver.runtime.security import PolicyError
from nomad_driver.runtime.spec import BindMount, ContainerSpec


class TaskContext(NamedTuple):
    """What the caller (Nomad, or the command line) knows about the task beyond its config."""

    task_id: str
    hostname: str
    env: dict[str, str]
    user: str
    stdout_path: str
    stderr_path: str
    stdin_path: str = ""
    mounts: tuple[BindMount, ...] = ()  # /alloc, /local, /secrets, Nomad volumes
    devices: tuple[BindMount, ...] = ()  # reserved by Nomad device plugins
    limits: Limits = Limits()
    upper_dir: str = ""  # where writable = "disk" keeps its layer
    netns_path: str = ""


def checked_image(plugin: PluginConfig, image: str) -> str:
    """The image's real path, inside image_dirs and a file; PolicyError otherwise."""
    real = within(image, plugin.image_dirs)
    if real is None:
        raise PolicyError(
            f"option 'image' = {image!r} is outside the plugin's image_dirs "
            f"{list(plugin.image_dirs)}"
        )
    if not os.path.isfile(real):
        raise FileNotFoundError(f"option 'image' = {image!r}: no such file")
    return real


def allowed_binds(
    items: tuple[str, ...], allowed: tuple[str, ...], field: str, allowlist: str
) -> list[BindMount]:
    """Task mounts and devices, each checked against the admin's list; PolicyError names it."""
    binds = []
    for item in items:
        try:
            src, dst, read_only = parse_bind(item, field)
        except ValueError as err:
            raise PolicyError(str(err)) from err
        real = within(src, allowed)
        if real is None:
            raise PolicyError(
                f"{field}: {src!r} is outside the plugin's {allowlist} {list(allowed)}"
            )
        if not os.path.exists(real):
            raise PolicyError(f"{field}: {src!r} does not exist on this node")
        mode = os.stat(real).st_mode
        if field == "devices" and not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
            raise PolicyError(f"devices: {src!r} is not a device")
        binds.append(BindMount(real, dst, read_only))
    return binds


def container_spec(
    plugin: PluginConfig, cfg: TaskConfig, image: str, ctx: TaskContext
) -> ContainerSpec:
    """image: the checked real path (checked_image), so a symlink swapped later cannot
    redirect the mount."""
    mounts = [*ctx.mounts, *allowed_binds(cfg.mounts, plugin.mount_dirs, "mounts", "mount_dirs")]
    devices = [
        *ctx.devices,
        *allowed_binds(cfg.devices, plugin.allow_devices, "devices", "allow_devices"),
    ]
    return ContainerSpec(
        task_id=ctx.task_id,
        hostname=ctx.hostname[:63],
        image=image,
        command=cfg.command,
        args=cfg.args,
        env=ctx.env,
        work_dir=cfg.work_dir,
        user=ctx.user,
        stdout_path=ctx.stdout_path or os.devnull,
        stderr_path=ctx.stderr_path or os.devnull,
        stdin_path=ctx.stdin_path,
        mounts=tuple(mounts),
        capabilities=tuple(security.capability_set(cfg.cap_add, cfg.cap_drop, plugin.allow_caps)),
        seccomp=security.seccomp_policy(cfg.seccomp, plugin.allow_unconfined_seccomp),
        limits=ctx.limits._replace(pids_max=int(plugin.pids_max)),
        writable=cfg.writable,
        upper_dir=ctx.upper_dir if cfg.writable == "disk" else "",
        network=cfg.network,
        devices=tuple(devices),
        netns_path=ctx.netns_path,
        images_dir=os.path.join(plugin.run_dir, "images"),
        userns=parse_id_range(plugin.root_id_range) if plugin.user_namespace else None,
    )
