"""Container Device Interface specs (what `nvidia-ctk cdi generate` writes to /etc/cdi and
/var/run/cdi): where a site already describes its GPUs there, a task given one gets the device
nodes, mounts and environment the spec names, not what pyhpc would find itself.

A spec is believed only after checks, because a root process takes it as policy: the file and
its directory must be owned by root and writable by no group or other user; every path must be
absolute, without `..`; a device node's host path must be a character device and a mount's
host path must exist; mounts are bind mounts. A file that fails is skipped with a warning
naming it (a device entry that fails, only that entry), never a crash. Specs are JSON or YAML
(PyYAML's safe loader; an install without PyYAML skips .yaml files with a warning saying so).

Hooks (`containerEdits.hooks`, such as nvidia-ctk's update-ldcache and create-symlinks) are
never run: pyhpc does not start host programs a spec file names. A library mounted at its
host's path is found through LD_LIBRARY_PATH instead, set to the directories of the mounted
libraries where the spec sets none."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from dataclasses import dataclass
from typing import Any

from nomad_driver.device import nvml
from nomad_driver.util.errors import InvalidArgument

KIND = "nvidia.com/gpu"
DEFAULT_DIRS = ("/etc/cdi", "/var/run/cdi")
MAX_SPEC_BYTES = 16 << 20
log = logging.getLogger("pyhpc.device")


@dataclass(frozen=True)
class Node:
    """A device node: `host_path` on the host appears as `path` in the task."""

    host_path: str
    path: str
    permissions: str = "rw"


@dataclass(frozen=True)
class Mount:
    host_path: str
    container_path: str
    read_only: bool


@dataclass(frozen=True)
class Edits:
    """One `containerEdits` as pyhpc applies it (hooks dropped)."""

    env: tuple[tuple[str, str], ...] = ()
    nodes: tuple[Node, ...] = ()
    mounts: tuple[Mount, ...] = ()


@dataclass(frozen=True)
class Spec:
    """One checked spec file of kind nvidia.com/gpu: its devices by name ("0", "0:1", a
    "GPU-..." or "MIG-..." UUID, "all") and its spec-wide edits."""

    path: str
    devices: dict[str, Edits]
    edits: Edits


@dataclass(frozen=True)
class Injection:
    """What a task given some devices gets, and the spec files it came from."""

    env: dict[str, str]
    nodes: tuple[Node, ...]
    mounts: tuple[Mount, ...]
    sources: tuple[str, ...] = ()


class SpecError(InvalidArgument, ValueError):
    """Why a spec, or one device entry of it, is not used."""


def load(dirs: tuple[str, ...] = DEFAULT_DIRS, owner: int = 0) -> list[Spec]:
    """The usable nvidia.com/gpu specs in `dirs`, in order: later directories, and later files
    in one directory, override earlier ones for a device name, as CDI's own registry ranks
    /var/run/cdi over /etc/cdi. `owner` is the uid the files must belong to (root; a test's
    own uid in tests). A missing directory is no spec, silently: most nodes have none."""
    specs = []
    for directory in dirs:
        try:
            names = sorted(os.listdir(directory))
            problem = _untrusted(os.stat(directory), owner)
        except FileNotFoundError:
            continue
        except OSError as err:
            _skipped("CDI directory skipped", directory, err.strerror or str(err))
            continue
        if problem:
            _skipped("CDI directory skipped", directory, problem)
            continue
        for name in names:
            if not name.endswith((".json", ".yaml", ".yml")):
                continue
            path = os.path.join(directory, name)
            try:
                spec = _spec(path, _read(path, owner))
            except SpecError as err:
                _skipped("CDI spec skipped", path, str(err))
                continue
            if spec is not None:
                specs.append(spec)
    return specs


def _skipped(message: str, path: str, reason: str, **more: str) -> None:
    log.warning(message, extra={"kv": {"path": path, **more, "reason": reason}})


def _untrusted(st: os.stat_result, owner: int) -> str:
    if st.st_uid != owner:
        return f"owned by uid {st.st_uid}, not {owner}"
    if st.st_mode & 0o022:
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return ""


def _read(path: str, owner: int) -> Any:
    """A spec file's parsed content, checked on the open descriptor (what is read is what was
    checked, even if the name is replaced meanwhile)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise SpecError(f"cannot open: {err.strerror}") from err
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SpecError("not a regular file")
        if problem := _untrusted(st, owner):
            raise SpecError(problem)
        try:
            data = f.read(MAX_SPEC_BYTES + 1)
        except OSError as err:
            raise SpecError(f"cannot read: {err.strerror}") from err
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"larger than {MAX_SPEC_BYTES >> 20} MiB")
    try:
        if path.endswith(".json"):
            return json.loads(data)
        try:
            import yaml  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            raise SpecError("a YAML spec, and PyYAML is not installed") from None
        return yaml.safe_load(data)
    except SpecError:
        raise
    except Exception as err:  # noqa: BLE001 - json and yaml raise several kinds
        raise SpecError(f"not valid {'JSON' if path.endswith('.json') else 'YAML'}: {err}") from err


def _spec(path: str, raw: Any) -> Spec | None:
    """A parsed file as a Spec; None for another kind (another vendor's devices, not ours)."""
    if not isinstance(raw, dict):
        raise SpecError("not a mapping")
    if not isinstance(raw.get("cdiVersion"), str):
        raise SpecError("no cdiVersion")
    if not isinstance(raw.get("kind"), str):
        raise SpecError("no kind")
    if raw["kind"] != KIND:
        return None
    devices = raw.get("devices")
    if not isinstance(devices, list) or not devices:
        raise SpecError("no devices list")
    wide = edits(raw.get("containerEdits"))
    out: dict[str, Edits] = {}
    for entry in devices:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise SpecError(f"a device entry without a name: {entry!r:.80}")
        try:
            out[entry["name"]] = edits(entry.get("containerEdits"))
        except SpecError as err:
            _skipped("CDI device entry skipped", path, str(err), device=entry["name"])
    return Spec(path, out, wide)


def edits(raw: Any) -> Edits:
    """One containerEdits, checked; SpecError says what is wrong. Hooks are ignored."""
    if raw is None:
        return Edits()
    if not isinstance(raw, dict):
        raise SpecError("containerEdits is not a mapping")
    env = []
    for item in _list(raw, "env"):
        key, sep, value = str(item).partition("=")
        if not isinstance(item, str) or not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise SpecError(f"env entry {item!r} is not NAME=value")
        env.append((key, value))
    nodes = []
    for item in _list(raw, "deviceNodes"):
        path = _path(item, "path", "device node")
        host = _path(item, "hostPath", "device node") if "hostPath" in item else path
        try:
            is_char = stat.S_ISCHR(os.stat(host).st_mode)
        except OSError:
            is_char = False
        if not is_char:
            raise SpecError(f"device node {host} is not a character device on this host")
        permissions = item.get("permissions", "rw")
        if not isinstance(permissions, str) or not permissions or set(permissions) - set("rwm"):
            raise SpecError(f"device node {path}: permissions {permissions!r} are not of r, w, m")
        nodes.append(Node(host, path, permissions))
    mounts = []
    for item in _list(raw, "mounts"):
        host = _path(item, "hostPath", "mount")
        container = _path(item, "containerPath", "mount")
        options = item.get("options") or []
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise SpecError(f"mount {container}: options {options!r} are not a list of strings")
        if item.get("type", "bind") != "bind" and "bind" not in options:
            raise SpecError(f"mount {container}: only bind mounts, not {item.get('type')!r}")
        if not os.path.exists(host):
            raise SpecError(f"mount {container}: host path {host} does not exist")
        mounts.append(Mount(host, container, "ro" in options))
    return Edits(tuple(env), tuple(nodes), tuple(mounts))


def _list(raw: dict[str, Any], key: str) -> list[Any]:
    value = raw.get(key) or []
    if not isinstance(value, list):
        raise SpecError(f"{key} is not a list")
    if key != "env" and not all(isinstance(v, dict) for v in value):
        raise SpecError(f"{key} holds something other than mappings")
    return value


def _path(item: dict[str, Any], key: str, what: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value.startswith("/") or ".." in value.split("/"):
        raise SpecError(f"{what} {key} {value!r} is not an absolute path without '..'")
    return value


def names(gpu: nvml.Gpu) -> list[str]:
    """The names a CDI spec may give a device: its UUID, or its NVML index ("0"; "0:1" for
    the second MIG device of GPU 0), as nvidia-ctk names them."""
    if gpu.nvml_index < 0:
        return [gpu.uuid]
    if gpu.mig is None:
        return [gpu.uuid, str(gpu.nvml_index)]
    return [gpu.uuid, f"{gpu.nvml_index}:{gpu.mig.mig_index}"]


def injection(specs: list[Spec], gpus: list[nvml.Gpu], ids: list[str]) -> Injection | None:
    """What the specs give a task reserved devices `ids` of the fingerprinted `gpus`: each
    device's entry (by UUID or index; "all" when `ids` is every GPU on the node) with the
    spec-wide edits of each spec used, after NVIDIA_VISIBLE_DEVICES and CUDA_VISIBLE_DEVICES
    (the reserved UUIDs, as without CDI) so a spec's own env wins. None, for pyhpc's own
    discovery, where no spec describes every reserved device: half of a reservation from a
    spec and half not would be neither. KeyError names unknown ids."""
    reserved = nvml.reserved(gpus, ids)
    if not reserved or not specs:
        return None
    by_name: dict[str, tuple[Spec, Edits]] = {}
    for spec in specs:
        for name, device in spec.devices.items():
            by_name[name] = (spec, device)
    picked: list[tuple[Spec, Edits]] = []
    if "all" in by_name and {g.uuid for g in gpus} <= set(ids):
        picked = [by_name["all"]]
    else:
        for gpu in reserved:
            hit = next((by_name[n] for n in names(gpu) if n in by_name), None)
            if hit is None:
                return None
            picked.append(hit)
    used = list(dict.fromkeys(spec.path for spec, _ in picked))
    wide = {spec.path: spec.edits for spec, _ in picked}
    parts = [wide[path] for path in used] + [device for _, device in picked]
    visible = ",".join(ids)
    env = {"NVIDIA_VISIBLE_DEVICES": visible, "CUDA_VISIBLE_DEVICES": visible}
    nodes: dict[str, Node] = {}
    mounts: dict[str, Mount] = {}
    for part in parts:
        env.update(part.env)
        for node in part.nodes:
            nodes.setdefault(node.path, node)
        for mount in part.mounts:
            mounts.setdefault(mount.container_path, mount)
    if "LD_LIBRARY_PATH" not in env:
        dirs = [os.path.dirname(p) for p in mounts if re.search(r"\.so(\.\d+)*$", p)]
        if dirs:
            env["LD_LIBRARY_PATH"] = ":".join(dict.fromkeys(dirs))
    return Injection(env, tuple(nodes.values()), tuple(mounts.values()), tuple(used))
