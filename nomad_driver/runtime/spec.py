"""What the runtime needs to start one container, and what it reports back.

Immutable typed records that round-trip through JSON: the plugin writes a ContainerSpec for
the per-task supervisor, and the supervisor writes an ExitStatus that any later plugin reads.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

from nomad_driver.runtime.cgroups import Limits
from nomad_driver.runtime.ids import DEFAULT_GIDS, DEFAULT_UIDS


# NamedTuple rather than dataclass here: this module is loaded by every task supervisor,
# and dataclasses (through inspect) costs each of them 1.6 MB of memory.
class BindMount(NamedTuple):
    host_path: str
    task_path: str
    read_only: bool = False
    # The admin's directory host_path was allowed under: the source is opened beneath it with
    # no symlink on the way (a tenant can change what is below). Empty: a path the caller
    # trusts whole (Nomad's task directories, its volumes, the GPU driver's files).
    beneath: str = ""


class ContainerSpec(NamedTuple):
    """One task's container, in host paths."""

    task_id: str
    hostname: str
    image: str
    command: str
    args: tuple[str, ...]
    env: dict[str, str]
    work_dir: str
    user: str
    stdout_path: str
    stderr_path: str
    mounts: tuple[BindMount, ...]
    capabilities: tuple[str, ...] = ()
    # A checked Docker-format seccomp profile; None runs the task unconfined.
    seccomp: dict[str, Any] | None = None
    limits: Limits | None = None
    writable: str = "tmpfs"  # "tmpfs", "disk" (upper layer in upper_dir) or "none"
    upper_dir: str = ""
    disk_max_mb: int = 0  # writable = "disk": the layer's own filesystem of this size; 0: none
    network: str = "host"  # "host" or "none"
    devices: tuple[BindMount, ...] = ()
    netns_path: str = ""  # a network namespace to join (Nomad's group network), else network
    # Where images are mounted once per digest and shared (see imagemount); image_root is this
    # task's image there, filled in by client.start.
    images_dir: str = "/run/pyhpc/images"
    image_root: str = ""
    image_linger: float = 0.0  # seconds the image's mount stays after its last task (0: none)
    # (first host id, count) that container ids 0.. map to when the task runs as root: a user
    # namespace with root remapping. A non-root task gets its own ids mapped to themselves.
    # None: no user namespace (container root is host root, with capabilities bounded).
    userns: tuple[int, int] | None = None
    stdin_path: str = ""  # the task's stdin; empty: /dev/null (Nomad tasks have none)
    seccomp_bpf: str = ""  # seccomp compiled to BPF, base64 (see with_seccomp_bpf)
    # (uid, gid, mode) of each directory below the admin's image directory and of the image
    # file: the task's user must be able to read the image it names (checked once the user
    # is resolved). Empty: an image from the store or a trusted caller.
    image_access: tuple[tuple[int, int, int], ...] = ()
    # Host ids a non-root task user may have (inclusive ranges): the plugin's allowed_uids and
    # allowed_gids, checked by ids.check where the user is resolved.
    allowed_uids: tuple[tuple[int, int], ...] = DEFAULT_UIDS
    allowed_gids: tuple[tuple[int, int], ...] = DEFAULT_GIDS

    def with_seccomp_bpf(self) -> ContainerSpec:
        """Compiled here, before any container step: the init and exec only load it."""
        if self.seccomp is None or self.seccomp_bpf:
            return self
        import base64

        from nomad_driver.runtime.security import compile_seccomp

        return self._replace(seccomp_bpf=base64.b64encode(compile_seccomp(self.seccomp)).decode())

    def to_json(self) -> str:
        raw = self._asdict()
        raw["mounts"] = [m._asdict() for m in self.mounts]
        raw["devices"] = [d._asdict() for d in self.devices]
        raw["limits"] = self.limits._asdict() if self.limits else None
        return json.dumps(raw, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ContainerSpec:
        raw: dict[str, Any] = json.loads(text)
        raw["args"] = tuple(raw["args"])
        raw["mounts"] = tuple(BindMount(**m) for m in raw["mounts"])
        raw["devices"] = tuple(BindMount(**d) for d in raw.get("devices", ()))
        raw["capabilities"] = tuple(raw.get("capabilities", ()))
        raw["limits"] = Limits(**raw["limits"]) if raw.get("limits") else None
        raw["userns"] = tuple(raw["userns"]) if raw.get("userns") else None
        raw["image_access"] = tuple(tuple(a) for a in raw.get("image_access", ()))
        for key in ("allowed_uids", "allowed_gids"):
            if key in raw:
                raw[key] = tuple((low, high) for low, high in raw[key])
        return cls(**raw)


class ExitStatus(NamedTuple):
    """How a task ended. Killed by signal N means signal=N and exit_code=128+N (Nomad's rule)."""

    exit_code: int
    signal: int = 0
    oom_killed: bool = False
    err: str = ""
    completed_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(self._asdict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ExitStatus:
        return cls(**json.loads(text))

    @classmethod
    def from_wait_status(cls, status: int, completed_at: float) -> ExitStatus:
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            return cls(exit_code=128 + sig, signal=sig, completed_at=completed_at)
        return cls(exit_code=os.waitstatus_to_exitcode(status), completed_at=completed_at)
