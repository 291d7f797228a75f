"""The admin's plugin config applied to one task's config: the checks and the ContainerSpec.

Shared by the Nomad driver and `pyhpc run`, so a container started by hand obeys the same
policy file as one started by Nomad. No gRPC here; refusals raise PolicyError naming the option.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from nomad_driver.driver.config import (
    MPI_LAUNCHERS,
    MpiConfig,
    PluginAuth,
    PluginConfig,
    TaskAuth,
    TaskConfig,
)
from nomad_driver.runtime import container, ids, imagefile, security
from nomad_driver.runtime.cgroups import Limits
from nomad_driver.runtime.imagefile import ImageFile
from nomad_driver.runtime.imagemount import images_dir
from nomad_driver.runtime.paths import parse_bind
from nomad_driver.runtime.security import PolicyError
from nomad_driver.runtime.spec import BindMount, ContainerSpec
from nomad_driver.util.durations import seconds

if TYPE_CHECKING:
    from nomad_driver.images.credentials import Keychain

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


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


class ResolvedImage(NamedTuple):
    path: str  # the SquashFS file to mount
    config: dict[str, Any]  # the OCI config's Env, Entrypoint, Cmd, WorkingDir, User ({} if none)
    # The file, opened once and checked (open_image); the caller closes it after the start.
    file: ImageFile | None = None
    reference: str = ""  # what signature rules match: the normalised reference or real path
    # A registry image: the manifest digests it was imported from (what the tag named, then
    # the platform's), as the store recorded them, and the client that reaches its registry.
    digests: tuple[str, ...] = ()
    registry: Any = None
    stored: dict[str, Any] | None = None  # an image of the store: its metadata there


def keychain(plugin: PluginConfig, auth: TaskAuth | None, soft_fail: bool = False) -> Keychain:
    """Where a task's registry login comes from: its own auth block, then the node's (the
    plugin's auth block). Never root's home directory or the agent's environment."""
    from nomad_driver.images.credentials import Credentials, Keychain

    node = plugin.auth or PluginAuth()
    login, helper = None, node.helper
    if auth is not None and auth.helper:
        if auth.helper not in node.task_helpers:
            raise PolicyError(
                f"option 'auth': credential helper {auth.helper!r} is not one of the plugin's "
                f"auth.task_helpers {list(node.task_helpers)}"
            )
        helper = auth.helper
    if auth is not None and (auth.username or auth.password):
        if not auth.username:
            raise PolicyError("option 'auth': a password needs its username")
        login = Credentials(auth.username, auth.password, "the task's auth block")
    return Keychain(
        login=login,
        helper=helper,
        files=(node.config,) if node.config else (),
        environment=False,
        soft_fail=soft_fail,
    )


def resolve_image(
    plugin: PluginConfig,
    text: str,
    progress: Callable[[str], None] | None = None,
    timeout: float | None = None,
    reader: tuple[int, int] = imagefile.ANYONE,
    auth: TaskAuth | None = None,
    auth_soft_fail: bool = False,
    option: str = "image",
) -> ResolvedImage:
    """A task's `image`: a SquashFS file in image_dirs as it is (opened for reader, see
    open_image), or a reference allowed by image_sources, imported into the store on first
    use (once per node, whoever asks; a private one handed out again only to a login its
    registry lets read it). auth: the task's own registry login."""
    if text.startswith("/"):
        opened = open_image(plugin, text, reader, option)
        return ResolvedImage(text, {}, opened, opened.origin or opened.path)
    from nomad_driver.images import reference
    from nomad_driver.images.registry import Registry
    from nomad_driver.images.sources import LocalAccess
    from nomad_driver.images.store import Store

    try:
        ref = reference.parse(text)
    except reference.ReferenceError as err:
        raise PolicyError(f"option '{option}': {err}") from err
    name = str(ref)
    # Compared as parsed references on whole components, never as text ("dir:/a/../etc").
    entry = reference.allowed_by(ref, plugin.image_sources)
    if entry is None:
        raise PolicyError(
            f"option '{option}' = {text!r} is not from the plugin's image_sources "
            f"{list(plugin.image_sources)}"
        )
    store = Store(
        plugin.store_dir,
        max_bytes=plugin.store_max_bytes,
        level=int(plugin.image_zstd_level),
    )
    kw: dict[str, Any] = {}
    if ref.remote:
        kw["registry"] = Registry(
            ref.registry,
            keychain(plugin, auth, auth_soft_fail),
            ca_file=plugin.registry_ca_file or None,
        )
    if not ref.remote:
        # Read beneath the allowed directory, and only what every user may read.
        kw["local"] = LocalAccess(reference.entry_directory(entry), public_only=True)
    elif timeout:
        kw["pull_timeout"] = timeout  # the registry's retries stop within the task's budget
    outcome: list[Any] = []

    def work() -> None:
        try:
            outcome.append(store.ensure(text, progress, **kw))
        except Exception as err:  # noqa: BLE001 - handed to the caller below
            outcome.append(err)

    if timeout is None:
        # Here, in this thread: a signal that stops `pyhpc run` unwinds the import, which
        # then removes its work directory (a thread would be frozen at exit with it).
        work()
    else:
        worker = threading.Thread(target=work, name=f"import {name}", daemon=True)
        worker.start()
        worker.join(timeout)
    if not outcome:
        raise TimeoutError(
            f"importing {name} took longer than image_pull_timeout ({timeout:g}s); it goes on "
            "in the background and the next start uses it"
        )
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    opened = open_stored(plugin, outcome[0].path)
    meta = outcome[0].meta
    digests = (meta.get("provenance", {}).get("resolved_digest", ""), meta.get("manifest_digest"))
    return ResolvedImage(
        opened.path,
        outcome[0].config,
        opened,
        name,
        tuple(str(d) for d in digests if d) if ref.transport == "docker" else (),
        kw.get("registry"),
        meta,
    )


class Dataset(NamedTuple):
    """A SquashFS dataset a task mounts read-only at path: an image in all but use."""

    image: ResolvedImage
    path: str


def parse_dataset(text: str) -> tuple[str, str]:
    """ "SOURCE:/path" -> (SOURCE, /path); SOURCE is what `image` takes (its own colons stay)."""
    source, sep, path = text.rpartition(":")
    if not sep or not source or not path.startswith("/") or ".." in path.split("/"):
        raise PolicyError(
            f"option 'datasets': {text!r} must be SOURCE:/PATH (an image file or reference, "
            "then an absolute path inside the container with no '..')"
        )
    return source, os.path.normpath(path)


def resolve_datasets(
    plugin: PluginConfig,
    cfg: TaskConfig,
    progress: Callable[[str], None] | None = None,
    timeout: float | None = None,
    reader: tuple[int, int] = imagefile.ANYONE,
) -> list[Dataset]:
    """A task's datasets, each resolved as its image is (image_dirs or image_sources, the
    same ownership and reader checks, imported into the store on first use). On failure,
    the ones already opened are closed."""
    found: list[Dataset] = []
    try:
        for entry in cfg.datasets:
            source, path = parse_dataset(entry)
            resolved = resolve_image(
                plugin, source, progress, timeout, reader, cfg.auth, cfg.auth_soft_fail, "datasets"
            )
            found.append(Dataset(resolved, path))
    except BaseException:
        for dataset in found:
            if dataset.image.file is not None:
                dataset.image.file.close()
        raise
    return found


def command_line(cfg: TaskConfig, image: dict[str, Any]) -> list[str]:
    """Docker's rule: the task's command replaces Entrypoint and Cmd; without one, the task's
    args replace Cmd after the image's Entrypoint."""
    if cfg.mpi and cfg.mpi.mode == "worker":
        return mpi_launch(cfg.mpi, [])
    if cfg.command:
        argv = [cfg.command, *cfg.args]
    else:
        argv = [
            str(a)
            for a in [*(image.get("Entrypoint") or []), *(cfg.args or image.get("Cmd") or [])]
        ]
    if not argv:
        raise PolicyError(
            "option 'command' is required: the image defines no Entrypoint or Cmd to run"
        )
    return mpi_launch(cfg.mpi, argv) if cfg.mpi else argv


# Multi-node MPI: pyhpc's helper scripts (nomad_driver/mpi/) and the Nomad agent's own binary,
# bound read-only into launcher and worker containers.
MPI_HELPERS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "mpi")
MPI_BIN = "/usr/local/pyhpc/bin"
MPI_NOMAD = "/usr/local/pyhpc/libexec/nomad"


def mpi_launch(mpi: MpiConfig, argv: list[str]) -> list[str]:
    """argv as MPI ranks: mpi.ranks_per_node of them under one launcher in this container
    (mode "local"); the launcher over every worker's ranks, after the start barrier
    (mode "launcher"); or the worker's wait for the launcher (mode "worker")."""
    launcher = mpi.launcher or MPI_LAUNCHERS[mpi.implementation]
    if mpi.mode == "worker":
        return [f"{MPI_BIN}/pyhpc-mpi-worker"]
    if mpi.mode == "launcher":
        if mpi.workers < 1:
            raise PolicyError('mpi block: mode "launcher" needs workers = N (at least 1)')
        # The ranks run under pyhpc-mpi-rank, which records a failed one for the launcher.
        rank = f"{MPI_BIN}/pyhpc-mpi-rank"
        return [f"{MPI_BIN}/pyhpc-mpi-launch", launcher, *mpi.launcher_args, rank, *argv]
    return [launcher, "-n", str(mpi.ranks_per_node), *mpi.launcher_args, *argv]


def mpi_env(mpi: MpiConfig | None, nomad_address: str) -> dict[str, str]:
    """What the launcher needs in a container: Open MPI refuses uid 0 (the container's root is
    an unprivileged uid on the host) and would look for ssh, which is never used here: across
    allocations its remote shell is pyhpc-rsh, through Nomad's exec API."""
    if mpi is None:
        return {}
    env = {}
    if mpi.mode != "local":
        timeout = seconds(mpi.barrier_timeout)
        env = {
            "PYHPC_MPI_IMPLEMENTATION": mpi.implementation,
            "PYHPC_MPI_RANKS_PER_NODE": str(mpi.ranks_per_node),
            "PYHPC_MPI_WORKERS": str(mpi.workers),
            "PYHPC_MPI_HOSTS": "/" + mpi.hosts_file.lstrip("/"),
            "PYHPC_MPI_TIMEOUT": str(int(timeout)),
            "PYHPC_MPI_WORKER_TASK": mpi.worker_task,
            "PYHPC_NOMAD": MPI_NOMAD,
            "PYHPC_NOMAD_ADDR": nomad_address,
        }
    if mpi.implementation == "openmpi":
        agent = "false" if mpi.mode == "local" else f"{MPI_BIN}/pyhpc-rsh"
        # Open MPI 4 reads OMPI_MCA_plm_rsh_*; Open MPI 5 starts its daemons through PRRTE,
        # which reads PRTE_MCA_plm_ssh_*. Each ignores the other's.
        env.update(
            OMPI_ALLOW_RUN_AS_ROOT="1",
            OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
            OMPI_MCA_plm_rsh_agent=agent,
            PRTE_MCA_plm_ssh_agent=agent,
        )
        if mpi.mode != "local":
            # Every daemon is started from the launcher, where the remote shell is.
            env["OMPI_MCA_plm_rsh_no_tree_spawn"] = "1"
            env["PRTE_MCA_plm_ssh_no_tree_spawn"] = "1"
    return env


def mpi_mounts(mpi: MpiConfig | None) -> list[BindMount]:
    """The helper scripts, and for the launcher the Nomad agent's binary (its CLI is the remote
    shell), read-only."""
    if mpi is None or mpi.mode == "local":
        return []
    mounts = [BindMount(MPI_HELPERS, MPI_BIN, True)]
    if mpi.mode == "launcher":
        mounts.append(BindMount(nomad_binary(), MPI_NOMAD, True))
    return mounts


def nomad_binary() -> str:
    """The Nomad agent that runs this plugin (its parent), else `nomad` on PATH."""
    try:
        parent = os.readlink(f"/proc/{os.getppid()}/exe")
    except OSError:
        parent = ""
    if os.path.basename(parent).startswith("nomad"):
        return parent
    import shutil

    found = shutil.which("nomad")
    if not found:
        raise PolicyError(
            'mpi mode "launcher" needs the Nomad binary for its remote shell: the plugin\'s '
            "parent is not a Nomad agent and there is no nomad on PATH"
        )
    return os.path.realpath(found)


def image_env(image: dict[str, Any]) -> dict[str, str]:
    env = {}
    for item in image.get("Env") or []:
        key, sep, value = str(item).partition("=")
        if sep and key:
            env[key] = value
    return env


def open_image(
    plugin: PluginConfig,
    image: str,
    reader: tuple[int, int] = imagefile.ANYONE,
    option: str = "image",
) -> ImageFile:
    """The image file a task named, opened once beneath image_dirs with no symlink on the way,
    each step checked for the reader (the task's host uid and gid, ANYONE until known) before
    anything below it is looked at, and the file checked on the opened inode. A file someone
    other than root can change is refused, or copied into the store as untrusted_images says
    (after the reader's check). PolicyError, FileNotFoundError otherwise."""
    normal = os.path.normpath(image)
    top = _allowed_dir(normal, plugin.image_dirs)
    if top is None or top == normal:
        raise PolicyError(
            f"option '{option}' = {image!r} is outside the plugin's image_dirs "
            f"{list(plugin.image_dirs)}"
        )
    try:
        opened = imagefile.open_image(normal, top, reader)
    except imagefile.ImageError as err:
        raise PolicyError(f"option '{option}': {err}") from err
    if opened.trusted:
        return opened
    try:
        if plugin.untrusted_images != "copy":
            raise PolicyError(
                f"option '{option}' = {image!r} can be changed by uid {opened.st.st_uid} (mode "
                f"{opened.st.st_mode & 0o7777:o}); this node runs only images owned by root and "
                'writable by no one else (the plugin\'s untrusted_images = "refuse")'
            )
        from nomad_driver.images.store import Store

        stored = Store(plugin.store_dir, max_bytes=plugin.store_max_bytes)
        copy = open_stored(plugin, stored.copy_in(opened.fd, opened.path).path)
        # Run from the copy; the task's user must still be able to read the original, and the
        # original's path is what signature rules and its signature envelope refer to.
        return copy._replace(access=opened.access, origin=opened.path)
    finally:
        opened.close()


def open_stored(plugin: PluginConfig, path: str) -> ImageFile:
    """An image of the store, reached through a reference the policy allowed (never named by
    path in a task: the store holds other tasks' private copies too)."""
    try:
        opened = imagefile.open_image(path, os.path.normpath(plugin.store_dir))
        return opened._replace(access=())  # imported by policy: any task may run it
    except imagefile.ImageError as err:
        raise PolicyError(f"option 'image': {err}") from err


def image_reader(plugin: PluginConfig, user: str) -> tuple[int, int]:
    """Who a task's image is opened for, on the host: root (remapped when the plugin uses user
    namespaces), a numeric uid[:gid], or ANYONE for a name (resolved later, in the image)."""
    if not user:
        if plugin.user_namespace:
            first = plugin.root_ids[0]
            return first, first
        return 0, 0
    name, _, group = user.partition(":")
    if name.isdigit() and (not group or group.isdigit()):
        return int(name), int(group or name)
    return imagefile.ANYONE


def allowed_binds(
    items: tuple[str, ...], allowed: tuple[str, ...], field: str, allowlist: str
) -> list[BindMount]:
    """Task mounts and devices, each checked against the admin's list; PolicyError names it.
    Each bind carries the allowed directory it lies beneath: the container's init opens the
    source again from there with no symlink on the way, so a part of the path swapped for a
    symlink after this check is refused there, not followed."""
    binds = []
    for item in items:
        try:
            src, dst, read_only = parse_bind(item, field)
        except ValueError as err:
            raise PolicyError(str(err)) from err
        normal = os.path.normpath(src)
        top = _allowed_dir(normal, allowed)
        if top is None:
            raise PolicyError(
                f"{field}: {src!r} is outside the plugin's {allowlist} {list(allowed)}"
            )
        try:
            fd = container.open_beneath(normal, top)
        except FileNotFoundError as err:
            raise PolicyError(f"{field}: {src!r} does not exist on this node") from err
        except OSError as err:
            raise PolicyError(
                f"{field}: {src!r}: a symlink or '..' on its path below {top} (binds are opened "
                "without following them)"
                if err.errno in (errno.ELOOP, errno.EXDEV)
                else f"{field}: {src!r}: {err.strerror}"
            ) from err
        try:
            mode = os.fstat(fd).st_mode
        finally:
            os.close(fd)
        if field == "devices" and not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
            raise PolicyError(f"devices: {src!r} is not a device")
        binds.append(BindMount(normal, dst, read_only, beneath=top))
    return binds


def _allowed_dir(normal: str, allowed: tuple[str, ...]) -> str | None:
    """The admin's directory (as written, or resolved) that the normalised path lies in."""
    for raw in allowed:
        for top in (os.path.normpath(raw), os.path.realpath(raw)):
            if normal == top or normal.startswith(top.rstrip("/") + "/"):
                return top
    return None


def site_env(plugin: PluginConfig, outside: Mapping[str, str]) -> dict[str, str]:
    """The site's variables for every task: env_passthrough from outside (the environment
    the container is started from), then default_env."""
    wanted = plugin.env_passthrough
    passed = {
        name: value
        for name, value in outside.items()
        if any(name == w or (w.endswith("*") and name.startswith(w[:-1])) for w in wanted)
    }
    return {**passed, **dict(e.partition("=")[::2] for e in plugin.default_env)}


def container_spec(
    plugin: PluginConfig, cfg: TaskConfig, image: str | ResolvedImage, ctx: TaskContext
) -> ContainerSpec:
    """image: the checked real path (checked_image or resolve_image), so a symlink swapped
    later cannot redirect the mount; its OCI config supplies what the task leaves out."""
    resolved = image if isinstance(image, ResolvedImage) else ResolvedImage(image, {})
    argv = command_line(cfg, resolved.config)
    mounts = [
        *ctx.mounts,
        *allowed_binds(plugin.default_mounts, plugin.mount_dirs, "default_mounts", "mount_dirs"),
        *allowed_binds(cfg.mounts, plugin.mount_dirs, "mounts", "mount_dirs"),
        *mpi_mounts(cfg.mpi),
    ]
    devices = [
        *ctx.devices,
        *allowed_binds(cfg.devices, plugin.allow_devices, "devices", "allow_devices"),
    ]
    spec = ContainerSpec(
        task_id=ctx.task_id,
        hostname=(cfg.hostname or ctx.hostname)[:63],
        image=resolved.path,
        command=argv[0],
        args=tuple(argv[1:]),
        env={
            "PATH": DEFAULT_PATH,
            **image_env(resolved.config),
            **site_env(plugin, os.environ),
            **mpi_env(cfg.mpi, plugin.mpi_nomad_address),
            **ctx.env,
        },
        work_dir=cfg.work_dir or str(resolved.config.get("WorkingDir") or "/"),
        user=ctx.user or str(resolved.config.get("User") or ""),
        stdout_path=ctx.stdout_path or os.devnull,
        stderr_path=ctx.stderr_path or os.devnull,
        stdin_path=ctx.stdin_path,
        mounts=tuple(mounts),
        capabilities=tuple(
            security.capability_set(
                cfg.cap_add, cfg.cap_drop, plugin.allow_caps, host_root=not plugin.user_namespace
            )
        ),
        seccomp=security.seccomp_policy(
            cfg.seccomp, plugin.allow_unconfined_seccomp, plugin.seccomp_profile_dirs
        ),
        limits=ctx.limits._replace(pids_max=int(plugin.pids_max)),
        writable=cfg.writable,
        upper_dir=ctx.upper_dir if cfg.writable == "disk" else "",
        disk_max_mb=int(plugin.disk_layer_max_mb) if cfg.writable == "disk" else 0,
        network=cfg.network,
        devices=tuple(devices),
        netns_path=ctx.netns_path,
        images_dir=images_dir(plugin.run_dir),
        image_linger=seconds(plugin.image_mount_linger),
        userns=plugin.root_ids if plugin.user_namespace else None,
        allowed_uids=ids.parse_ranges(plugin.allowed_uids),
        allowed_gids=ids.parse_ranges(plugin.allowed_gids),
    )
    if not plugin.hooks_dir:
        return spec
    from nomad_driver.driver import hooks

    timeout = seconds(plugin.hook_timeout)
    return hooks.apply(
        spec, hooks.find(plugin.hooks_dir), resolved.reference or resolved.path, timeout
    )


class SignatureRefused(PolicyError):
    """signature_mode "enforce" refused the image."""


def check_signature(
    plugin: PluginConfig,
    verifier: Callable[[], Any],
    image: ResolvedImage,
    record: dict[str, Any] | None = None,
) -> str:
    """The image's signature, checked as signature_mode and signature_rules ask, on the very
    descriptor that will be mounted. Returns what to tell the user ("" when the mode is off);
    raises SignatureRefused under "enforce". verifier: gives the Verifier, made on first use.
    record: filled with what was checked (mode, key, version, when), for provenance."""
    import time

    from nomad_driver.signing import mode_for  # the checker only where a rule asks for it

    mode = mode_for(image.reference, plugin.signature_mode, plugin.signature_rules)
    out = record if record is not None else {}
    out.update(mode=mode, image=image.reference)
    if mode == "off" or image.file is None:
        return ""
    from nomad_driver.signing.verify import SignatureError

    out["checked_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if mode == "cosign":
        return _check_cosign(verifier, image, out)
    try:
        verified = verifier().verify(image.file, image.reference)
    except SignatureError as err:
        if mode == "enforce":
            raise SignatureRefused(
                f"signature check failed (signature_mode enforce): {err}"
            ) from err
        out["failed"] = str(err)
        return f"WARNING: signature check failed, starting anyway (warn): {err}"
    out.update(
        key=verified.key,
        version=verified.version,
        signed_at=verified.signed_at,
        signed_reference=verified.reference,
    )
    return (
        f"{verified.digest} verified: signed with {verified.key} v{verified.version} at "
        f"{verified.signed_at}"
    )


def _check_cosign(verifier: Callable[[], Any], image: ResolvedImage, out: dict[str, Any]) -> str:
    from nomad_driver.images import reference
    from nomad_driver.signing.cosign import CosignError

    if not image.digests or image.registry is None:
        raise SignatureRefused(
            f'{image.reference} must carry a cosign signature (signature rule "cosign"), '
            "and only docker:// images can"
        )
    ref = reference.parse(image.reference)
    try:
        verified = verifier().verify_cosign(image.registry, ref.repository, image.digests)
    except CosignError as err:
        raise SignatureRefused(f"cosign signature check failed: {err}") from err
    out.update(key=verified.key, manifest_digest=verified.manifest_digest)
    return f"cosign signature of {verified.manifest_digest} verified with {verified.key}"


def check_signatures(
    plugin: PluginConfig,
    verifier: Callable[[], Any],
    image: ResolvedImage,
    datasets: list[Dataset] | tuple[Dataset, ...] = (),
    records: list[dict[str, Any]] | None = None,
) -> list[str]:
    """check_signature for the image and each dataset; what to tell the user, each message
    naming the dataset it is about. SignatureRefused names it too. records: one per image
    checked, the image's first (for provenance)."""
    said = []
    for checking in (image, *(d.image for d in datasets)):
        what = "" if checking is image else f"dataset {checking.reference}: "
        record: dict[str, Any] = {}
        try:
            checked = check_signature(plugin, verifier, checking, record)
        except SignatureRefused as err:
            raise SignatureRefused(f"{what}{err}") from err
        if records is not None:
            records.append(record)
        if checked:
            said.append(what + checked)
    return said


def verifier(plugin: PluginConfig) -> Any:
    """The signature checker the plugin config describes (keys cached under run_dir)."""
    from nomad_driver.signing.vault import Auth, Vault
    from nomad_driver.signing.verify import Verifier, cache_dir

    auth = Auth(
        method=plugin.vault_auth,
        token_file=plugin.vault_token_file,
        role_id=plugin.vault_role_id,
        secret_id_file=plugin.vault_secret_id_file,
        role=plugin.vault_jwt_role,
        jwt_file=plugin.vault_jwt_file,
    )
    vault = Vault(
        plugin.vault_address,
        plugin.vault_transit_mount,
        auth,
        plugin.vault_ca_file,
        plugin.vault_namespace,
    )
    return Verifier(
        vault,
        tuple(plugin.signature_keys),
        cache_dir(plugin.run_dir),
        ttl=seconds(plugin.signature_key_ttl),
        cosign_keys=tuple(plugin.cosign_keys),
    )
