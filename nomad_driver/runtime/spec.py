"""What the runtime needs to start one container, and what it reports back.

Plain frozen dataclasses that round-trip through JSON: the plugin writes a ContainerSpec for
the per-task supervisor, and the supervisor writes an ExitStatus that any later plugin reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

from nomad_driver.runtime.cgroups import Limits


@dataclasses.dataclass(frozen=True)
class BindMount:
    host_path: str
    task_path: str
    read_only: bool = False


@dataclasses.dataclass(frozen=True)
class ContainerSpec:
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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ContainerSpec:
        raw: dict[str, Any] = json.loads(text)
        raw["args"] = tuple(raw["args"])
        raw["mounts"] = tuple(BindMount(**m) for m in raw["mounts"])
        raw["capabilities"] = tuple(raw.get("capabilities", ()))
        raw["limits"] = Limits(**raw["limits"]) if raw.get("limits") else None
        return cls(**raw)


@dataclasses.dataclass(frozen=True)
class ExitStatus:
    """How a task ended. Killed by signal N means signal=N and exit_code=128+N (Nomad's rule)."""

    exit_code: int
    signal: int = 0
    oom_killed: bool = False
    err: str = ""
    completed_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ExitStatus:
        return cls(**json.loads(text))

    @classmethod
    def from_wait_status(cls, status: int, completed_at: float) -> ExitStatus:
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            return cls(exit_code=128 + sig, signal=sig, completed_at=completed_at)
        return cls(exit_code=os.waitstatus_to_exitcode(status), completed_at=completed_at)


def write_atomic(path: str, text: str) -> None:
    """Write a file so readers see the old content or the new, never half of it."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
