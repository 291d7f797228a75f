"""Site hooks: the admin's executables in `hooks_dir`, run at every container start (the
driver's and `pyhpc run`'s), that add binds, devices and variables to the container.

A hook never touches the container's root: it runs on the host, as root, before the container
exists, is told about the task as JSON on its stdin (whose values, the task's environment
above all, are the tenant's: data, never code), and answers on stdout, one line each:

    mount SRC[:DST[:ro|rw]]     bind a host path (default: the same path, read-only)
    device HOST[:CONTAINER]     pass a device node through
    env NAME=VALUE              set a variable (the task's own wins)

and nothing else (blank lines and `#` comments aside). pyhpc makes the binds with the same
descriptor-based, no-symlink code as every other bind, so an image's symlinks cannot turn a
hook's bind into a write on the host. A hook that exits non-zero, says anything else, or
outlives `hook_timeout` fails the start, with its last lines of output in the task's events.

Hooks are the regular files in hooks_dir that are executable, owned by root and writable by
no one else, in a directory likewise root's alone, run in name order (names starting with "."
or ending in "~" are skipped). Anything else there refuses every start, saying which file.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from collections.abc import Sequence
from typing import Any

from nomad_driver.runtime.paths import parse_bind
from nomad_driver.runtime.security import PolicyError
from nomad_driver.runtime.spec import BindMount, ContainerSpec

OUTPUT_LIMIT = 64 << 10
ENV_LINE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")


def _root_only(st: os.stat_result) -> bool:
    return st.st_uid == 0 and not st.st_mode & 0o022


def find(hooks_dir: str) -> list[str]:
    """The hooks in hooks_dir, in order; PolicyError if the directory or a file in it is not
    the admin's alone."""
    if not hooks_dir:
        return []
    try:
        top = os.open(hooks_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise PolicyError(f"hooks_dir {hooks_dir}: {err.strerror}") from err
    try:
        if not _root_only(os.fstat(top)):
            raise PolicyError(f"hooks_dir {hooks_dir} must be root's and writable by root alone")
        found = []
        for name in sorted(os.listdir(top)):
            if name.startswith(".") or name.endswith("~"):
                continue
            st = os.stat(name, dir_fd=top, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or not _root_only(st) or not st.st_mode & 0o100:
                raise PolicyError(
                    f"hook {hooks_dir}/{name} must be an executable regular file (not a link), "
                    "owned by root and writable by root alone"
                )
            found.append(os.path.join(hooks_dir, name))
        return found
    finally:
        os.close(top)


def _ask(hook: str, question: bytes, timeout: float) -> list[str]:
    try:
        done = subprocess.run(
            [hook],
            input=question,
            capture_output=True,
            timeout=timeout,
            env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
            cwd="/",
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise PolicyError(f"hook {hook} did not finish within {timeout:g}s") from err
    except OSError as err:
        raise PolicyError(f"hook {hook}: {err.strerror}") from err
    said = done.stdout[:OUTPUT_LIMIT].decode(errors="replace")
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-OUTPUT_LIMIT:].decode(errors="replace")
        last = " | ".join(line for line in tail.strip().splitlines()[-5:])
        said_last = f": {last}" if last else ""
        raise PolicyError(f"hook {hook} failed (exit {done.returncode}){said_last}")
    return [line.strip() for line in said.splitlines()]


def apply(spec: ContainerSpec, hooks: Sequence[str], image: str, timeout: float) -> ContainerSpec:
    """spec with what each hook asked for (in order; a later hook sees the earlier ones' and
    its variables win over theirs; the task's own variables win over every hook's)."""
    own, added = dict(spec.env), {}
    for hook in hooks:
        question: dict[str, Any] = {
            "task_id": spec.task_id,
            "hostname": spec.hostname,
            "user": spec.user,
            "image": image,
            "env": spec.env,
            "mounts": [m.task_path for m in spec.mounts],
            "devices": [d.task_path for d in spec.devices],
            "uid_map": list(spec.userns) if spec.userns else None,
        }
        mounts, devices, env = [], [], {}
        for n, line in enumerate(_ask(hook, json.dumps(question).encode(), timeout), 1):
            verb, _, rest = line.partition(" ")
            rest = rest.strip()
            where = f"hook {hook} line {n}"
            if not line or line.startswith("#"):
                continue
            if verb == "mount":
                parts = rest.split(":")
                parts += [parts[0], "ro"][len(parts) - 1 :]  # DST is SRC, read-only: defaults
                try:
                    src, dst, read_only = parse_bind(":".join(parts), where)
                except ValueError as err:
                    raise PolicyError(str(err)) from err
                mounts.append(BindMount(src, dst, read_only))
            elif verb == "device":
                host, _, inside = rest.partition(":")
                if not host.startswith("/dev/") or (inside and not inside.startswith("/dev/")):
                    raise PolicyError(f"{where}: {rest!r} is not /dev/HOST[:/dev/CONTAINER]")
                devices.append(BindMount(host, inside or host))
            elif verb == "env" and ENV_LINE.fullmatch(rest):
                name, _, value = rest.partition("=")
                env[name] = value
            else:
                raise PolicyError(
                    f"{where}: {line[:80]!r} is not `mount SRC[:DST[:ro|rw]]`, "
                    "`device HOST[:CONTAINER]` or `env NAME=VALUE`"
                )
        spec = spec._replace(
            mounts=(*spec.mounts, *mounts),
            devices=(*spec.devices, *devices),
        )
        added.update(env)
        spec = spec._replace(env={**added, **own})
    return spec
