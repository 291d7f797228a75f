"""`pyhpc run`: the driver's container runtime from the command line (enroot start / ch-run).

Same policy as the Nomad driver: the admin's `plugin "pyhpc"` block (default
/etc/pyhpc/pyhpc.hcl) decides which images, mounts, devices, capabilities and seccomp choices
are allowed, and whether root is remapped. This process supervises the container itself (no
helper process), forwards signals to it and exits with its exit code.

Under sudo it is a user's tool: the caller is SUDO_UID, not root, and may choose nothing the
system policy does not offer (no --config, no --layer-dir written as root, no other user's ids).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import signal
import sys
from typing import Any

from nomad_driver.cli.signals import FORWARDED, PENDING, Interrupted, stop_on_signals
from nomad_driver.cli.signals import check as check_stopped
from nomad_driver.driver import choices
from nomad_driver.util.errors import PyhpcError

DEFAULT_CONFIG = "/etc/pyhpc/pyhpc.hcl"


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "run",
        help="run a command in a SquashFS image, as the driver would",
        description="Run COMMAND (default: the image's Entrypoint and Cmd, else /bin/sh) in a "
        "container of IMAGE, under the same policy as the Nomad driver. Exits with the "
        "command's exit code (128+N when killed by signal N).",
        epilog="example: pyhpc run --mount /scratch/me:/data --env OMP_NUM_THREADS=8 "
        "/var/lib/pyhpc/images/busybox.sqsh -- sh -c 'ls /data'",
    )
    p.add_argument(
        "image",
        metavar="IMAGE",
        nargs="?",
        help="SquashFS file, or a reference (docker://, oras://, oci:, ...) allowed by the "
        "policy's image_sources, imported into the store on first use",
    )
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")
    p.add_argument(
        "--config",
        metavar="FILE|DIR",
        help="a Nomad agent configuration (HCL1 or JSON file, or a directory such as "
        f'/etc/nomad.d) with the plugin "pyhpc" block (default {DEFAULT_CONFIG} if it exists, '
        "else the built-in defaults)",
    )
    p.add_argument(
        "--writable",
        choices=choices.WRITABLE,
        default=choices.WRITABLE[0],
        help="writable layer over the image (default tmpfs; disk: in --layer-dir)",
    )
    p.add_argument("--layer-dir", metavar="DIR", help="where --writable disk keeps its layer")
    p.add_argument(
        "--provenance",
        metavar="FILE",
        help="when the command ends, write its provenance record (image digest and sources, "
        "signatures, node, command, environment, mounts, result) to FILE, as you",
    )
    p.add_argument(
        "--replay",
        metavar="FILE",
        help="run again what a provenance record (a task's, or --provenance's) ran: the same "
        "image digest, command, environment, datasets and options; refused when the image or "
        "a dataset is no longer the same bytes, or a signature no longer verifies",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --replay: run even if the image or a dataset changed, with a warning",
    )
    p.add_argument(
        "--save",
        metavar="FILE.sqsh",
        help="when the command ends, save the container (the image and what the command "
        "changed) as a new SquashFS image, written as you (a new file, never replaced)",
    )
    p.add_argument("--network", choices=choices.NETWORK, default=choices.NETWORK[0])
    p.add_argument(
        "--seccomp",
        default="default",
        metavar="default|unconfined|NAME|PROFILE.json",
        help="a profile NAME or path must be in the policy's seccomp_profile_dirs",
    )
    p.add_argument("--cap-add", action="append", default=[], metavar="CAP")
    p.add_argument("--cap-drop", action="append", default=[], metavar="CAP")
    p.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="SRC[:DST[:ro|rw]]",
        help="bind a host directory (must be in the policy's mount_dirs)",
    )
    p.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="SOURCE:/PATH",
        help="mount a SquashFS dataset read-only at PATH (SOURCE as IMAGE is given, under the "
        "same policy)",
    )
    p.add_argument(
        "--gpus",
        metavar="all|N|UUID,...",
        help="NVIDIA GPUs for the container (their device nodes, the host driver's libraries "
        "and tools, NVIDIA/CUDA_VISIBLE_DEVICES), as the pyhpc-gpu device plugin gives a task",
    )
    p.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="PATH[:DST]",
        help="pass a host device through (must be in the policy's allow_devices)",
    )
    p.add_argument(
        "--env", "-e", action="append", default=[], metavar="K=V|K",
        help="set K in the container; a bare K passes this shell's value (as docker run -e K), "
        "e.g. --env SLURM_PROCID --env PMIX_RANK under srun",
    )  # fmt: skip
    p.add_argument(
        "--env-file", action="append", default=[], metavar="FILE",
        help="K=V lines (# comments, blank lines, bare K passed through), as docker --env-file",
    )  # fmt: skip
    p.add_argument("--workdir", "-w", default="", metavar="DIR", help="default: the image's")
    p.add_argument("--hostname", default="", help="default: the image file's name")
    who = p.add_mutually_exclusive_group()
    who.add_argument(
        "--root",
        action="store_true",
        help="run as the container's root (remapped to the policy's root_id_range)",
    )
    who.add_argument(
        "--user",
        "-u",
        metavar="UID[:GID]",
        help="run as this user, mapped to itself (default: the sudo caller, else root)",
    )


def _fail(message: str, code: int = 125) -> int:
    print(f"pyhpc run: {message}", file=sys.stderr)
    return code


def _gpus(choice: str) -> tuple[dict[str, str], tuple[Any, ...], tuple[Any, ...]]:
    """The same reservation the device plugin makes, for `--gpus all|N|UUID,...`."""
    from nomad_driver.device import nvml
    from nomad_driver.runtime.spec import BindMount

    gpus, why = nvml.from_proc(), ""
    if not gpus:
        gpus, why = nvml.probe()
    if not gpus:
        raise ValueError(f"--gpus {choice}: no NVIDIA GPU on this node ({why or 'none found'})")
    if choice == "all":
        ids = [g.uuid for g in gpus]
    elif choice.isdigit():
        if int(choice) > len(gpus):
            raise ValueError(f"--gpus {choice}: this node has {len(gpus)} GPU(s)")
        ids = [g.uuid for g in gpus[: int(choice)]]
    else:
        ids = [i.strip() for i in choice.split(",") if i.strip()]
    try:
        res = nvml.reservation(gpus, ids)
    except KeyError as err:
        raise ValueError(f"--gpus {choice}: {err.args[0]}") from err
    mounts = tuple(BindMount(host, task, read_only=True) for host, task in res["mounts"])
    devices = tuple(BindMount(node, node) for node in res["devices"])
    return res["envs"], mounts, devices


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who asked for the container: root, or the user sudo ran us for (SUDO_UID, which sudo
    sets itself), with their primary and supplementary groups."""

    uid: int
    gid: int
    groups: frozenset[int]

    @property
    def root(self) -> bool:
        return self.uid == 0


ROOT = Caller(0, 0, frozenset({0}))


def image_argument(text: str) -> str:
    """IMAGE as the policy sees it: a reference (a transport before any '/': docker://, oci:)
    as written, anything else as an absolute path. Decided by its form alone: asking the
    filesystem, as root, would tell a sudo caller what exists where it cannot look."""
    head = text.split("/", 1)[0]
    return text if ":" in head else os.path.abspath(text)


def caller() -> Caller:
    uid = os.getuid()
    sudo_uid, sudo_gid = os.environ.get("SUDO_UID", ""), os.environ.get("SUDO_GID", "")
    if uid == 0 and sudo_uid.isdigit():
        uid = int(sudo_uid)
    if uid == 0:
        return ROOT
    gid = int(sudo_gid) if sudo_gid.isdigit() else uid
    groups = {gid}
    try:
        import pwd

        groups.update(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except (KeyError, OSError):
        pass  # a uid without a passwd entry has its primary group only
    return Caller(uid, gid, frozenset(groups))


def refusals(args: argparse.Namespace, who: Caller) -> list[str]:
    """What a non-root caller asked for that only root may choose, one line each: the policy
    file (it decides user namespaces, mounts, capabilities), a layer directory (written as
    root), and any uid or gid but the caller's own."""
    if who.root:
        return []
    own = f"a sudo caller (uid {who.uid})"
    out = []
    if args.config:
        out.append(
            f"--config {args.config}: {own} runs under the system policy only "
            f"({DEFAULT_CONFIG} or the built-in defaults); only root may name another"
        )
    if args.layer_dir:
        out.append(
            f"--layer-dir {args.layer_dir}: {own} may not choose where root writes the layer; "
            "--writable disk keeps it in the task's own run directory"
        )
    if args.user:
        name, _, group = str(args.user).partition(":")
        if not name.isdigit() or int(name) != who.uid:
            out.append(
                f"--user {args.user}: {own} may run as uid {who.uid} only (numeric), "
                "or as the container's root with --root"
            )
        elif group and (not group.isdigit() or int(group) not in who.groups):
            out.append(
                f"--user {args.user}: {own} may use its own groups only "
                f"({', '.join(str(g) for g in sorted(who.groups))})"
            )
    return out


def _default_user(args: argparse.Namespace, who: Caller) -> str:
    if args.root:
        return "0"  # the container's (remapped) root, whatever the image's User says
    if args.user:
        return str(args.user)
    if not who.root:
        return f"{who.uid}:{who.gid}"
    return ""


class _Refused(PyhpcError):
    """What `pyhpc run` refuses, in one line (exit 125)."""


def run(args: argparse.Namespace) -> int:
    from nomad_driver.driver import policy

    if os.geteuid() != 0:
        return _fail("needs root for loop mounts and namespaces; run it with sudo")
    who = caller()
    refused = refusals(args, who)
    if refused:
        for line in refused:
            _fail(line)
        return 125
    try:
        replayed, command, env = _request(args, who)
        plugin = _policy(args, who)
        save_to = _save_target(args, who)
        task = _task(args, command)
        reader = (who.uid, who.gid) if not who.root else (0, 0)
        image = policy.resolve_image(plugin, task.image, _progress, reader=reader)
        datasets = policy.resolve_datasets(plugin, task, _progress, reader=reader)
        if not command and not (image.config.get("Entrypoint") or image.config.get("Cmd")):
            task = dataclasses.replace(task, command="/bin/sh")  # a shell, as enroot start
        # Apart from the driver's tasks/: clear_dead_runs takes a run-<pid>-... it finds there
        # for a dead `pyhpc run`, and a Nomad task may be named run-99999 (red team).
        from nomad_driver.runtime.client import run_name

        run_dir = os.path.join(plugin.run_dir, RUNS_DIR, run_name(os.getpid()))
        ctx = _context(args, who, task, env, args.layer_dir or os.path.join(run_dir, "layer"))
        # The verifier, made on first use and shared by every check.
        verifier = functools.cache(functools.partial(policy.verifier, plugin))
        if replayed is not None:
            _check_replay(args, replayed, plugin, image, datasets)
        signatures: list[dict[str, Any]] = []
        for checked in policy.check_signatures(plugin, verifier, image, datasets, signatures):
            print(f"pyhpc run: {checked}", file=sys.stderr)
        spec = policy.container_spec(plugin, task, image, ctx)
        record: dict[str, Any] = {}
        if args.provenance:
            record = _record(args, who, plugin, spec, image, datasets, signatures)
    except (PyhpcError, ValueError) as err:  # a refusal, a bad option, an image not to be had
        return _fail(str(err))
    except OSError as err:
        return _fail(f"{err.filename}: {err.strerror}" if err.filename else str(err))

    def finished(result: Any) -> None:
        """After the command: the saved image, then the provenance record (as the caller)."""
        if save_to and not result.err:
            _save(spec, image, plugin, run_dir, save_to, who)
        if args.provenance:
            _write_provenance(args.provenance, record, result, who)

    opened = [image, *(d.image for d in datasets)]
    try:
        return supervise(
            spec,
            run_dir,
            image.file,
            [(d.image.file, d.path) for d in datasets if d.image.file],
            finished if (save_to or args.provenance) else None,
        )
    finally:
        for file in (o.file for o in opened if o.file is not None):
            file.close()


def _progress(message: str) -> None:
    print(f"pyhpc run: {message}", file=sys.stderr)


def _request(
    args: argparse.Namespace, who: Caller
) -> tuple[dict[str, Any] | None, list[str], dict[str, str]]:
    """What is asked: the replayed record (--replay), the command, the environment."""
    replayed: dict[str, Any] | None = None
    if args.replay:
        try:
            replayed = replay(args, who)
        except ValueError as err:
            raise _Refused(f"--replay {args.replay}: {err}") from err
    elif not args.image:
        raise _Refused("give IMAGE (a SquashFS file or a reference), or --replay FILE")
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    env = {"TERM": os.environ.get("TERM", "xterm"), **environment(args.env, args.env_file, who)}
    return replayed, command, env


def _policy(args: argparse.Namespace, who: Caller) -> Any:
    """The system policy (--config for root), or the built-in defaults where there is none."""
    from nomad_driver.driver import config
    from nomad_driver.wire import schema

    config_path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    if config_path:
        plugin = load_policy(config_path)
    else:
        plugin = schema.load(config.PluginConfig, {}, "built-in defaults")
    if args.root and not who.root and not plugin.user_namespace:
        raise _Refused(
            "--root: the system policy has user_namespace = false, so the container's "
            f"root would be the host's; a sudo caller (uid {who.uid}) may not use it"
        )
    return plugin


def _save_target(args: argparse.Namespace, who: Caller) -> str:
    """--save's file, absolute, checked as the caller to be new; the layer then on disk."""
    if not args.save:
        return ""
    save_to = os.path.abspath(args.save)
    if args.writable == "none":
        raise _Refused("--save: --writable none leaves nothing to save")
    from nomad_driver.util.asuser import run_as

    try:  # asked as the caller: root tells no one what exists where they cannot look
        there = run_as(who.uid, who.gid, who.groups, lambda: b"%d" % os.path.lexists(save_to))
    except OSError as err:
        raise _Refused(f"--save {args.save}: {err.strerror}") from err
    if there == b"1":
        raise _Refused(f"--save {args.save}: the file exists; name a new one")
    args.writable = "disk"  # the layer outlives the container, to be saved
    return str(save_to)


def _task(args: argparse.Namespace, command: list[str]) -> Any:
    """The command line as a task config, checked by the driver's own schema."""
    from nomad_driver.driver import config
    from nomad_driver.wire import schema

    return schema.load(
        config.TaskConfig,
        {
            "image": image_argument(args.image),
            "command": command[0] if command else "",
            "args": command[1:],
            "work_dir": args.workdir or "",
            "writable": args.writable,
            "network": args.network,
            "mounts": args.mount,
            "datasets": args.dataset,
            "devices": args.device,
            "cap_add": args.cap_add,
            "cap_drop": args.cap_drop,
            "seccomp": args.seccomp,
        },
        "command line",
    )


def _context(
    args: argparse.Namespace, who: Caller, task: Any, env: dict[str, str], layer: str
) -> Any:
    """The task context the driver would get from Nomad, made from the command line."""
    from nomad_driver.driver import policy
    from nomad_driver.runtime.cgroups import CALLER, Limits

    tail = task.image.rstrip("/").rsplit("/", 1)[-1]
    name = args.hostname or tail.split(".")[0].split(":")[0] or "pyhpc"
    gpu_mounts, gpu_devices = (), ()
    if args.gpus:
        gpu_env, gpu_mounts, gpu_devices = _gpus(args.gpus)
        env = {**gpu_env, **env}
    return policy.TaskContext(
        task_id=f"pyhpc-run/{os.getpid()}",
        hostname=name,
        env=env,
        mounts=gpu_mounts,
        devices=gpu_devices,
        user=_default_user(args, who),
        stdin_path="/proc/self/fd/0",
        stdout_path="/proc/self/fd/1",
        stderr_path="/proc/self/fd/2",
        # Under the caller's own cgroup: a Slurm job's (or a session's) limits bound it.
        limits=Limits(cgroup_parent=CALLER),
        upper_dir=layer,
    )


def _check_replay(
    args: argparse.Namespace, replayed: dict[str, Any], plugin: Any, image: Any, datasets: Any
) -> None:
    """--replay: refused where the image or a dataset changed since the record, unless
    --force (then a warning)."""
    from nomad_driver.runtime.imagemount import images_dir

    for problem in changed_since(replayed, image, datasets, images_dir(plugin.run_dir)):
        if not args.force:
            raise _Refused(f"--replay {args.replay}: {problem}; --force runs it anyway")
        print(f"pyhpc run: WARNING: {problem} (--force)", file=sys.stderr)


def _record(
    args: argparse.Namespace,
    who: Caller,
    plugin: Any,
    spec: Any,
    image: Any,
    datasets: Any,
    signatures: list[dict[str, Any]],
) -> dict[str, Any]:
    """The provenance record as the run starts (--provenance)."""
    from nomad_driver.driver import policy, provenance

    where: dict[str, Any] = {"node": os.uname().nodename, "caller_uid": who.uid}
    where.update({k: v for k, v in os.environ.items() if k in SLURM_WHERE})
    options = {
        "mounts": args.mount, "datasets": args.dataset, "writable": args.writable,
        "network": args.network, "hostname": args.hostname, "work_dir": args.workdir,
        "cap_add": args.cap_add, "cap_drop": args.cap_drop, "seccomp": args.seccomp,
        "gpus": args.gpus, "replay_of": args.replay or "",
    }  # fmt: skip
    # What the command line or the image or the site set is the caller's to see; the
    # caller's own environment passed through by name only.
    given = {e.partition("=")[0] for e in args.env if "=" in e}
    seen = {*policy.image_env(image.config), *policy.site_env(plugin, {}), *given}
    return dict(
        provenance.record(spec, image, datasets, signatures, where, options, seen.__contains__)
    )


def _save(spec: Any, image: Any, plugin: Any, run_dir: str, save_to: str, who: Caller) -> None:
    """--save: the image and what the command changed, written new as the caller."""
    from nomad_driver.images import save as saving
    from nomad_driver.runtime.container import DISK_SUFFIX
    from nomad_driver.util.asuser import write_new_as

    assert image.file is not None and isinstance(spec.upper_dir, str)
    disk = spec.disk_max_mb > 0
    built = saving.save(
        image.file.fd,
        image.file.path,
        spec.upper_dir + DISK_SUFFIX if disk else spec.upper_dir,
        disk,
        saving.id_mapper(*(spec.userns or (None, 0))),
        run_dir,
        int(plugin.image_zstd_level),
    )
    fd = os.open(built, os.O_RDONLY | os.O_CLOEXEC)
    try:
        write_new_as(save_to, fd, who.uid, who.gid, who.groups)
    except OSError as err:
        raise saving.SaveError(f"cannot write the saved image: {save_to}: {err.strerror}") from err
    finally:
        os.close(fd)
    print(f"pyhpc run: saved the container as {save_to}", file=sys.stderr)


def _write_provenance(path: str, record: dict[str, Any], result: Any, who: Caller) -> None:
    """--provenance: the record, completed with how the run ended, written new as the caller."""
    from nomad_driver.driver import provenance
    from nomad_driver.util.asuser import write_new_as

    data = json.dumps(provenance.finish(record, result), indent=1, sort_keys=True)
    fd = os.memfd_create("provenance", os.MFD_CLOEXEC)
    try:
        os.write(fd, data.encode() + b"\n")
        write_new_as(os.path.abspath(path), fd, who.uid, who.gid, who.groups)
    except OSError as err:
        raise RuntimeError(f"--provenance {path}: {err.strerror}") from err
    finally:
        os.close(fd)


RUNS_DIR = "runs"  # under the policy's run_dir: `pyhpc run`'s run directories, only those
SLURM_WHERE = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_CLUSTER_NAME")


def replay(args: argparse.Namespace, who: Caller) -> dict[str, Any]:
    """Fill args from the provenance record --replay names (read as the caller); returns the
    record. ValueError says what cannot be replayed."""
    from nomad_driver.driver import provenance
    from nomad_driver.util.asuser import read_as

    if args.image or args.argv:
        raise ValueError("runs what the record ran: give no IMAGE or COMMAND with it")
    try:
        data = json.loads(read_as(args.replay, who.uid, who.gid, who.groups))
    except OSError as err:
        raise ValueError(str(err.strerror)) from err
    if not isinstance(data, dict) or data.get("format") != provenance.FORMAT:
        raise ValueError(f"not a pyhpc provenance record ({provenance.FORMAT})")
    image, options = data.get("image") or {}, data.get("options") or {}
    text = str(image.get("reference") or "")
    if text.startswith("docker://") and image.get("registry_digest"):
        from nomad_driver.images import reference

        ref = reference.parse(text)  # the very manifest it was imported from
        text = f"docker://{ref.registry}/{ref.repository}@{image['registry_digest']}"
    args.image = text
    args.argv = ["--", *[str(a) for a in data.get("command") or []]]
    withheld = [str(k) for k in data.get("env_withheld") or []]
    given = {e.partition("=")[0] for e in args.env}
    missing = [k for k in withheld if k not in os.environ and k not in given]
    if missing:
        raise ValueError(
            f"it names variables whose values were not recorded: set {', '.join(missing)} "
            "(or give them with --env) to replay it"
        )
    recorded = [f"{k}={v}" for k, v in (data.get("env") or {}).items()]
    args.env = [*recorded, *withheld, *args.env]  # given on this command line: wins
    args.mount = [str(m) for m in options.get("mounts") or []]  # the task's own binds
    args.dataset = list(options.get("datasets") or [])
    for name in ("writable", "network", "hostname", "gpus"):
        if options.get(name):
            setattr(args, name, options[name])
    args.workdir = str(data.get("work_dir") or "")
    args.cap_add = list(options.get("cap_add") or [])
    args.cap_drop = list(options.get("cap_drop") or [])
    args.seccomp = str(options.get("seccomp") or args.seccomp)
    return data


def changed_since(
    data: dict[str, Any], image: Any, datasets: Any, images_dir_path: str
) -> list[str]:
    """What is no longer the bytes the record ran: the image, the datasets (by path)."""
    from nomad_driver.util.digest import fd_digest

    cache = os.path.join(images_dir_path, ".digests")
    then = {"": (data.get("image") or {}).get("digest", "")}
    then.update(
        {
            m["path"]: m["dataset"].get("digest", "")
            for m in data.get("mounts") or []
            if isinstance(m, dict) and "dataset" in m
        }
    )
    now = {"": fd_digest(image.file.fd, cache)}
    now.update({d.path: fd_digest(d.image.file.fd, cache) for d in datasets})
    return [
        f"{'the image' if path == '' else 'the dataset at ' + path} changed: recorded "
        f"{then.get(path) or 'none'}, now {digest}"
        for path, digest in now.items()
        if then.get(path) != digest
    ]


POLICY_CACHE = "/run/pyhpc/.policy-cache"  # util.rootcache.DIR; tests move it


def load_policy(path: str) -> Any:
    """The plugin block of an agent configuration: a file, or a directory the agent would load
    (/etc/nomad.d), its *.hcl and *.json files merged in lexical order, a later file's block
    winning (agentconfig). Parsing HCL costs 100 ms, more than starting the container, so the
    decoded options are kept in a root-only cache keyed on what proves every file read
    unchanged (as image digests are), and checked again on every load. An entry is believed
    only from a root-owned directory nobody else can write, in a root-owned file opened
    without following a symlink."""
    import json

    from nomad_driver.driver import agentconfig, config
    from nomad_driver.util import rootcache
    from nomad_driver.wire import schema

    files, key = _policy_files(path)
    try:
        cached = json.loads(rootcache.read(key, POLICY_CACHE) or b"{}")
        if cached.get("path") == os.path.realpath(path):
            return schema.load(config.PluginConfig, cached["options"], path)
    except (ValueError, KeyError, AttributeError, schema.ConfigError):
        pass
    plugin = agentconfig.plugin_config(files, path)
    options = {
        name: list(value) if isinstance(value, tuple) else value
        for name, value in plugin.__dict__.items()
    }
    rootcache.write(
        key, json.dumps({"path": os.path.realpath(path), "options": options}).encode(), POLICY_CACHE
    )
    return plugin


def _policy_files(path: str) -> tuple[list[str], str]:
    """The files to load for path, and the cache key that proves them all unchanged: a file's
    own unchanged_key; for a directory, a digest of its key (taken before it is listed, so a
    file added, removed or renamed after that changes it) and every file's."""
    import hashlib

    from nomad_driver.driver import agentconfig
    from nomad_driver.util.digest import unchanged_key

    first = unchanged_key(os.stat(path))
    files = agentconfig.config_files(path)
    if files == [path]:
        return files, first.replace(":", "-")
    keys = [first] + [f"{os.path.basename(f)} {unchanged_key(os.stat(f))}" for f in files]
    return files, "dir-" + hashlib.sha256("\n".join(keys).encode()).hexdigest()


def environment(given: list[str], files: list[str], who: Caller = ROOT) -> dict[str, str]:
    """--env-file lines, then --env, as Docker takes them: K=V sets, a bare K passes this
    process's value (and is left out where it has none). The files are read as the caller
    (root reads nothing for a sudo caller that the caller could not). ValueError names what
    is wrong."""
    from nomad_driver.util.asuser import read_as

    items: list[tuple[str, str]] = []
    for path in files:
        try:
            lines = read_as(path, who.uid, who.gid, who.groups).decode().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--env-file {path}: {getattr(err, 'strerror', None) or err}") from err
        items += [
            (f"--env-file {path}:{n}", line.strip())
            for n, line in enumerate(lines, 1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    items += [("--env", item) for item in given]
    env: dict[str, str] = {}
    for where, item in items:
        key, sep, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"{where}: {item!r} is not NAME=VALUE or NAME")
        if sep:
            env[key] = value
        elif key in os.environ:
            env[key] = os.environ[key]
    return env


def supervise(
    spec: object, run_dir: str, image: Any = None, datasets: Any = (), finished: Any = None
) -> int:
    """Run the container to its end in this process; finished(result), if given, runs after
    the command and before the run directory (and its layer) goes."""
    import shutil

    # Loaded here, before the fork, so the container's init finds them already in memory.
    from nomad_driver.runtime import container, security  # noqa: F401
    from nomad_driver.runtime.client import acquire_image, clear_dead_runs
    from nomad_driver.runtime.container import ContainerError
    from nomad_driver.runtime.imagefile import ImageError
    from nomad_driver.runtime.imagemount import SharedImages
    from nomad_driver.runtime.spec import ContainerSpec
    from nomad_driver.runtime.supervisor import Supervisor

    assert isinstance(spec, ContainerSpec)
    # From here signals are held, not raised, until the init exists, then forwarded: a command
    # may run (and print) before start() returns, and nothing made on the way is left half-made.
    init: list[int] = []  # a pidfd of the init: never another process that got its pid
    held: list[int] = []  # before the init exists

    def forward(signum: int, _frame: object) -> None:
        if not init:
            held.append(signum)
            return
        try:
            signal.pidfd_send_signal(init[0], signum)
        except ProcessLookupError:  # the command has ended: the signal stops the run instead
            PENDING.append(signum)

    for s in FORWARDED:
        signal.signal(s, forward)
    check_stopped()  # a stop that Python swallowed earlier still stops the run, here
    if spec.limits is not None:
        from nomad_driver.runtime import cgroups

        cgroups.prewarm()  # the wait the attach below would start, started now
    # What earlier runs killed outright left behind (their supervisor was this process).
    clear_dead_runs(os.path.dirname(run_dir), spec.images_dir)
    images = SharedImages(spec.images_dir)
    owner = os.path.basename(run_dir)
    try:
        try:
            os.makedirs(run_dir, mode=0o700)
            spec = acquire_image(spec, owner, image, datasets)
            supervisor = Supervisor(run_dir, spec)
            supervisor.start()
        except (OSError, ContainerError, ImageError, RuntimeError) as err:
            images.release(owner)
            return _fail(str(err))
        # The init is this process's child, not yet reaped: the pidfd is of it.
        init.append(os.pidfd_open(supervisor.init_pid))
        for signum in held:
            forward(signum, None)
        result = supervisor.finish()
        # The command has ended: from here (saving, the provenance record) a signal stops
        # the run, and nothing is sent on; one that came while it was ending does too.
        stop_on_signals()
        check_stopped()
        if finished is not None:
            from nomad_driver.images.save import SaveError

            try:
                finished(result)
            except (SaveError, RuntimeError) as err:
                return _fail(str(err))
    finally:
        # The clean-up is not cut short: a signal now waits until the run dir is gone. One
        # already pending runs its handler as the mask changes (Python checks then): its stop
        # is acted on after the clean-up.
        late: Interrupted | None = None
        try:
            stopped = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        except Interrupted as stop:
            late, stopped = stop, signal.pthread_sigmask(signal.SIG_BLOCK, [])
            stopped -= set(FORWARDED)
        for fd in init:
            os.close(fd)
        shutil.rmtree(run_dir, ignore_errors=True)
        signal.pthread_sigmask(signal.SIG_SETMASK, stopped)
        if late is not None:
            raise late
    if result.err:
        return _fail(result.err)
    return result.exit_code
