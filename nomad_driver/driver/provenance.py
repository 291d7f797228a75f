"""What ran, for anyone who publishes a result: one JSON record per task and per `pyhpc run`.

It names the image by the digest of the very file that was mounted, with every reference the
store imported it from and the registry's manifest and config digests; the signature checks and
their keys; the node's software and hardware (pyhpc, Nomad, kernel, CPU model and microcode,
GPU driver, CUDA and GPU UUIDs); the command, its environment (values of variables whose names
say they hold secrets are redacted), mounts with the digests of images and datasets, limits,
where it ran, when, and how it ended. What it cannot capture: the kernel's own
nondeterminism (scheduling, timing), the network and anything reached over it, and the
contents of host directories bound in (their paths only).

The driver keeps the record in the task's root-only run directory and publishes a copy into
the allocation's `alloc/logs/<task>.provenance.json`, a directory the task can write: the copy
is written to a new file beneath it without following any link, then renamed into place.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from typing import Any

from nomad_driver import __version__
from nomad_driver.driver.policy import Dataset, ResolvedImage
from nomad_driver.runtime import linux
from nomad_driver.runtime.spec import ContainerSpec, ExitStatus
from nomad_driver.util.digest import fd_digest
from nomad_driver.util.files import write_atomic

FORMAT = "pyhpc.provenance/v1"
# Never a secret: NOMAD_SECRETS_DIR names where Nomad keeps them (/secrets).
PLAIN = frozenset({"PATH", "TERM", "HOME", "HOSTNAME", "LANG", "TZ", "NOMAD_SECRETS_DIR"})
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|KEY|CREDENTIAL|AUTH|PRIVATE", re.IGNORECASE)
RECORD_FILE = "provenance.json"  # in the task's run directory


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@functools.cache
def host(nomad_binary: str = "") -> dict[str, Any]:
    """The node's software and hardware, read once per process."""
    facts: dict[str, Any] = {
        "pyhpc": __version__,
        "kernel": f"{platform.release()} {platform.version()}",
        "machine": platform.machine(),
        "hostname": platform.node(),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "microcode") and key not in facts:
                    facts["cpu_model" if key == "model name" else "microcode"] = value.strip()
    except OSError:
        pass
    if nomad_binary:
        try:
            out = subprocess.run(
                [nomad_binary, "version"], capture_output=True, text=True, timeout=10
            ).stdout
            facts["nomad"] = out.splitlines()[0].strip() if out else ""
        except (OSError, subprocess.TimeoutExpired):
            facts["nomad"] = ""
    from nomad_driver.device import nvml

    gpus, why = nvml.probe()
    facts["gpu"] = (
        {
            "driver_version": gpus[0].driver_version,
            "cuda_version": gpus[0].cuda_version,
            "devices": [{"uuid": g.uuid, "name": g.name} for g in gpus],
        }
        if gpus
        else {"none": why or "no GPUs"}
    )
    return facts


def environment(env: dict[str, str], visible: Callable[[str], bool]) -> dict[str, Any]:
    """The environment as the record keeps it: the value of a variable that is already
    visible to whoever may read the record (the image's, the site's, what the command line
    said) unless its name says it is a secret; every other variable by name only (a template
    may have put a Vault secret there, under any name)."""
    shown = {
        k: v
        for k, v in sorted(env.items())
        if k in PLAIN or (visible(k) and not SECRET_NAME.search(k))
    }
    return {"env": shown, "env_withheld": sorted(set(env) - set(shown))}


def _image(image: ResolvedImage, cache: str) -> dict[str, Any]:
    meta = image.stored or {}
    out: dict[str, Any] = {
        "reference": image.reference,
        "digest": fd_digest(image.file.fd, cache) if image.file is not None else "",
        "path": image.path,
    }
    if meta:
        # This reference's own import only: the store's other names of the same bytes are
        # other tenants' (and may be private).
        out.update(
            source=meta.get("source", ""),
            manifest_digest=meta.get("manifest_digest", ""),
            config_digest=meta.get("config_digest", ""),
            registry_digest=(meta.get("provenance") or {}).get("resolved_digest", ""),
            imported=meta.get("created", ""),
        )
    return out


def record(
    spec: ContainerSpec,
    image: ResolvedImage,
    datasets: list[Dataset] | tuple[Dataset, ...],
    signatures: list[dict[str, Any]],
    where: dict[str, Any],
    options: dict[str, Any],
    visible: Callable[[str], bool],
    nomad_binary: str = "",
) -> dict[str, Any]:
    """The record of a start; `finish` adds how it ended. visible: which variables' values
    anyone reading the record could see anyway (see `environment`)."""
    cache = os.path.join(spec.images_dir, ".digests")
    data = {d.path: _image(d.image, cache) for d in datasets}
    return {
        "format": FORMAT,
        "image": _image(image, cache),
        "signatures": signatures,
        "command": [spec.command, *spec.args],
        "work_dir": spec.work_dir,
        "user": spec.user,
        "hostname": spec.hostname,
        **environment(spec.env, visible),
        "mounts": [
            {"source": m.host_path, "path": m.task_path, "read_only": m.read_only}
            if m.task_path not in data
            else {"path": m.task_path, "read_only": True, "dataset": data[m.task_path]}
            for m in spec.mounts
        ]
        + [
            {"path": path, "read_only": True, "dataset": d}
            for path, d in data.items()
            if path not in {m.task_path for m in spec.mounts}
        ],
        "devices": [d.host_path for d in spec.devices],
        "options": options,
        "limits": spec.limits._asdict() if spec.limits else {},
        "where": where,
        "host": host(nomad_binary),
        "started_at": now(),
    }


def finish(data: dict[str, Any], result: ExitStatus | None) -> dict[str, Any]:
    ended: dict[str, Any] = {"ended_at": now()}
    if result is not None:
        ended["exit"] = {
            "code": result.exit_code,
            "signal": result.signal,
            "oom_killed": result.oom_killed,
            "error": result.err,
        }
    return {**data, **ended}


def keep(run_dir: str, data: dict[str, Any]) -> None:
    write_atomic(os.path.join(run_dir, RECORD_FILE), json.dumps(data, indent=1, sort_keys=True))


def kept(run_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(run_dir, RECORD_FILE), encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def encode(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode() + b"\n"


def digest_of(text: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(text).hexdigest()


def publish(alloc_dir: str, task: str, data: dict[str, Any]) -> str:
    """Write data as alloc/logs/<task>.provenance.json beneath alloc_dir (Nomad's, trusted) in a
    directory the task can write: created anew with no link followed, renamed into place.
    Returns the digest of what was written (the task could rewrite the copy: the digest, in
    the task's events, is what `pyhpc provenance` checks it against); OSError if the task
    left something in the way (a directory)."""
    name = f"{task}.provenance.json"
    top = os.open(alloc_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        logs = linux.openat2(top, "alloc/logs", os.O_PATH | os.O_DIRECTORY, linux.STRICT)
    finally:
        os.close(top)
    try:
        tmp = f".{name}.{os.getpid()}.{time.monotonic_ns()}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = linux.openat2(logs, tmp, flags, linux.STRICT, 0o644)
        try:
            os.write(fd, encode(data))
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)
        try:
            os.rename(tmp, name, src_dir_fd=logs, dst_dir_fd=logs)
        except OSError:
            os.unlink(tmp, dir_fd=logs)
            raise
    finally:
        os.close(logs)
    return digest_of(encode(data))


RECORD_EVENT = "record sha256:"


def summary(data: dict[str, Any], digest: str) -> str:
    """One line for the task's events, naming the digest of the published record."""
    image = data.get("image", {})
    signed = next((s for s in data.get("signatures", []) if s.get("key")), None)
    how = f", signed with {signed['key']}" if signed else ""
    return (
        f"Provenance: {image.get('digest', '')[:19]} from {image.get('reference')}{how}; "
        f"alloc/logs/{data.get('where', {}).get('task', '')}.provenance.json, "
        f"{RECORD_EVENT}{digest.partition(':')[2]}"
    )
