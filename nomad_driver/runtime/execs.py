"""Running an extra command inside a running container (`nomad alloc exec`, script checks).

nsenter joins the container init's namespaces and root; it is a small C program, so this works
from the plugin's threads without forking a multi-threaded Python process.
"""

from __future__ import annotations

import os

from nomad_driver.runtime.container import ContainerError, resolve_user


def exec_argv(init_pid: int, command: list[str], work_dir: str, user: str) -> list[str]:
    """The argv that runs command in the container whose init is init_pid, as the task's user."""
    if not command:
        raise ContainerError("exec needs a command")
    root = f"/proc/{init_pid}/root"
    uid, gid = resolve_user(user, root)
    return [
        "nsenter",
        f"--target={init_pid}",
        "--mount",
        "--uts",
        "--ipc",
        "--pid",
        "--root",
        f"--wd={work_dir}",
        f"--setuid={uid}",
        f"--setgid={gid}",
        "--",
        *command,
    ]


def container_running(init_pid: int) -> bool:
    return os.path.exists(f"/proc/{init_pid}/ns/mnt")
