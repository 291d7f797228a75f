"""The plugin's two configurations, each declared once: the agent's `plugin "pyhpc" { config {} }`
block and a task's `config {}` block. Their hclspec, decoding and docs all come from here."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from nomad_driver.driver import choices
from nomad_driver.runtime import ids
from nomad_driver.runtime.security import CAP_NUMBER, DEFAULT_CAPS, PROFILE_NAME
from nomad_driver.util.durations import duration
from nomad_driver.wire.schema import Check, block, option

PLUGIN_NAME = "pyhpc"


def _under(prefix: str) -> Check:
    """A check that a path, or every path of a list, starts with prefix."""

    def check(value: Any) -> str | None:
        if isinstance(value, (list, tuple)):
            wrong = [v for v in value if not str(v).startswith(prefix)]
            return f"{wrong} must be absolute paths under {prefix}" if wrong else None
        return None if str(value).startswith(prefix) else "must be an absolute path"

    return check


_absolute = _under("/")


def _optional(check: Check) -> Check:
    """check, for an option whose empty value means "not set"."""
    return lambda value: None if not value else check(value)


def _one_of(*choices: str) -> Check:
    quoted = [f'"{c}"' for c in choices]
    wanted = ", ".join(quoted[:-1]) + f" or {quoted[-1]}"
    return lambda value: None if value in choices else f"must be {wanted}"


def _whole(low: int, high: int | None = None) -> Check:
    wanted = f"a whole number >= {low}" if high is None else f"a whole number {low}-{high}"
    return lambda v: (
        None if int(v) == v and v >= low and (high is None or v <= high) else f"must be {wanted}"
    )


MODES = ("enforce", "warn", "off", "cosign")


def _absolute_dir_name(value: Any) -> str | None:
    if problem := _absolute(value):
        return problem
    if len(os.path.join(str(value), "tasks", "x" * 40, "control.sock")) > 107:
        return (
            "is too long for the task control sockets (unix socket paths are limited to 107 bytes)"
        )
    return None


def _image_reference(value: Any) -> str | None:
    from nomad_driver.images.reference import ReferenceError, parse

    try:
        parse(str(value))
    except ReferenceError as err:
        return str(err).removeprefix(f"image {str(value)!r}: ")
    return None


def _capabilities(value: Any) -> str | None:
    unknown = [v for v in value if str(v).upper().removeprefix("CAP_") not in (*CAP_NUMBER, "ALL")]
    return f"unknown capabilities {unknown}" if unknown else None


def _seccomp(value: Any) -> str | None:
    text = str(value)
    if "\0" not in text and (text.startswith("/") or PROFILE_NAME.fullmatch(text)):
        return None
    return (
        'must be "default", "unconfined", or the name (letters, digits, "-", "_", ".", not '
        'starting with ".") or absolute path of a profile in the plugin\'s seccomp_profile_dirs'
    )


def _binds(value: Any) -> str | None:
    from nomad_driver.runtime.paths import parse_bind

    try:
        for item in value:
            parse_bind(str(item), "")
    except ValueError as err:
        return str(err).lstrip(": ")
    return None


def _url(example: str) -> Check:
    wanted = f'must be a URL like "{example}"'
    return lambda v: None if str(v).startswith(("http://", "https://")) else wanted


def _hostname(value: Any) -> str | None:
    # "${node.unique.name}": Nomad interpolates it before the driver sees it (and checks again).
    if value == "" or "${" in value or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}", value):
        return None
    return "must be a host name: letters, digits, '.' and '-', at most 63, not starting with '-'"


def _no_nul(value: Any) -> str | None:
    items = value if isinstance(value, (list, tuple)) else [value]
    return "must not contain NUL bytes" if any("\0" in str(v) for v in items) else None


def parse_id_range(value: str) -> tuple[int, int] | None:
    """ "FIRST:COUNT" host ids, FIRST > 0, inside the 32-bit id space; None if malformed."""
    first, sep, count = str(value).partition(":")
    if not (sep and first.isdigit() and count.isdigit()):
        return None
    start, size = int(first), int(count)
    return (start, size) if start > 0 and size > 0 and start + size <= 2**32 - 1 else None


def _id_ranges(value: Any) -> str | None:
    try:
        ids.parse_ranges(value)
    except ValueError as err:
        return f'{err}, e.g. ["1000-65534"]'
    return None


def _helper(value: Any) -> str | None:
    from nomad_driver.images.credentials import check_helper_name  # subprocess: not per start

    return check_helper_name(value) if value else None


@dataclass(frozen=True)
class PluginAuth:
    """`auth { ... }` in the plugin's config: the node's registry logins."""

    config: str = option(
        "string",
        default="",
        doc="A Docker config.json or containers auth.json (`auths`, `credHelpers`, "
        "`credsStore`) read as root for every pull. Default: none (root's own ~/.docker and "
        "auth.json files are not read by the driver).",
        check=_optional(_absolute),
    )
    helper: str = option(
        "string",
        default="",
        doc='A credential helper asked for every registry: "ecr-login" runs '
        "`docker-credential-ecr-login` from the agent's PATH.",
        check=_helper,
    )
    task_helpers: tuple[str, ...] = option(
        "list(string)",
        default=(),
        doc="Credential helpers a task's `auth { helper }` may name (none unless listed).",
        check=lambda v: next((p for p in map(_helper, v) if p), None),
    )


@dataclass(frozen=True)
class PluginConfig:
    """`plugin "pyhpc" { config { ... } }` in the Nomad agent configuration."""

    run_dir: str = option(
        "string",
        default="/run/pyhpc",
        doc="Where task supervisors keep their sockets and exit status (one directory per task).",
        check=_absolute_dir_name,
    )
    fingerprint_period: str = option(
        "string",
        default="30s",
        doc='How often the driver re-checks its health, as a duration ("30s", "1m").',
        check=duration("30s", positive=True),
    )

    image_dirs: tuple[str, ...] = option(
        "list(string)",
        default=("/var/lib/pyhpc/images",),
        doc="Directories a task may name SquashFS images from (imported images are named by "
        "reference). An image is opened beneath one of them with no symlink on the way, and the "
        "task's user must be able to read it; never list `/`.",
        check=_absolute,
    )
    untrusted_images: str = option(
        "string",
        default="refuse",
        doc='An image file that someone other than root can change: "refuse" it, or "copy" it '
        "into the store first and run the copy (its bytes can then no longer change under a "
        "mount that other tasks share).",
        check=_one_of("refuse", "copy"),
    )
    mount_dirs: tuple[str, ...] = option(
        "list(string)",
        default=(),
        doc="Host directories tasks may bind in with `mounts` (none unless listed), "
        'e.g. ["/scratch", "/projects"]; symlinks resolved, whole path components compared.',
        check=_absolute,
    )
    default_mounts: tuple[str, ...] = option(
        "list(string)",
        default=(),
        doc='Binds every task gets, "SRC[:DST[:ro|rw]]" as a task\'s `mounts` (and inside '
        'mount_dirs like them), e.g. ["/opt/site/bin:/opt/site/bin:ro"].',
        check=_binds,
    )
    default_env: tuple[str, ...] = option(
        "list(string)",
        default=(),
        doc='Environment every task gets, "NAME=VALUE" (a task\'s own env wins), e.g. '
        '["OMP_PROC_BIND=close", "UCX_TLS=rc,sm"].',
        check=lambda v: next(
            (f"{e!r} must be NAME=VALUE" for e in v if not re.fullmatch(r"[A-Za-z_]\w*=.*", e)),
            None,
        ),
    )
    env_passthrough: tuple[str, ...] = option(
        "list(string)",
        default=(),
        doc="Variables passed from the environment the container is started from (the agent's; "
        "`pyhpc run`'s caller's) into every task: names, or prefixes ending in \"*\", e.g. "
        '["SLURM_*", "PMIX_*", "PMI_*"] for `srun ... pyhpc run`.',
        check=lambda v: next(
            (
                f"{e!r} must be a NAME or PREFIX*"
                for e in v
                if not re.fullmatch(r"[A-Za-z_]\w*\*?", e)
            ),
            None,
        ),
    )
    hooks_dir: str = option(
        "string",
        default="",
        doc="The site's hooks: executables run at every container start that add binds, "
        "devices and variables (see docs/admin.md); root's, writable by root alone. "
        "Empty: none.",
        check=_optional(_absolute),
    )
    hook_timeout: str = option(
        "string",
        default="30s",
        doc="How long a hook may take before the start fails.",
        check=duration("30s", positive=True),
    )
    allow_devices: tuple[str, ...] = option(
        "list(string)",
        default=(),
        doc="Host devices (or directories of them) tasks may pass through, "
        'e.g. ["/dev/infiniband"].',
        check=_under("/dev/"),
    )
    store_dir: str = option(
        "string",
        default="/var/lib/pyhpc/store",
        doc="The node's image store: SquashFS files imported from image references, by digest.",
        check=_absolute,
    )
    image_sources: tuple[str, ...] = option(
        "list(string)",
        default=(),
        doc="Image references tasks may import from, matched on whole components of the parsed "
        "reference, e.g. "
        '["docker://registry.example.org:5000/hpc/", "oras://registry.example.org:5000/"]; '
        "empty: only SquashFS files in image_dirs.",
        check=_no_nul,
    )
    store_max_mb: int = option(
        "number",
        default=0,
        doc="Most megabytes of images the store may hold; an import that would pass it first "
        "evicts the least recently used images no task uses or import holds, and fails only "
        "when that is not enough. 0: no cap.",
        check=_whole(0),
    )
    image_gc_interval: str = option(
        "string",
        default="1h",
        doc="How often the driver deletes stored images no task has used for image_gc_min_age "
        '(never one in use or being imported); "0" turns the periodic GC off.',
        check=duration("1h"),
    )
    image_gc_min_age: str = option(
        "string",
        default="24h",
        doc="How long an image must have gone unused before the periodic GC deletes it.",
        check=duration("24h"),
    )
    image_mount_linger: str = option(
        "string",
        default="2m",
        doc="How long an image's mount stays after the last task using it ended, so the next "
        "task of that image starts without mounting it again and finds its files in the page "
        'cache; the periodic sweep (or the next task\'s end) unmounts it after that. "0" '
        "unmounts at once.",
        check=duration("2m"),
    )
    image_zstd_level: int = option(
        "number",
        default=3,
        doc="zstd level of the SquashFS images imports build: 1 is fastest, 19 smallest.",
        check=_whole(1, 22),
    )
    auth: PluginAuth | None = block(
        PluginAuth,
        doc='Registry logins for every task on the node: `auth { helper = "ecr-login" }` or '
        '`auth { config = "/etc/pyhpc/registry-auth.json" }`.',
    )
    registry_ca_file: str = option(
        "string",
        default="",
        doc="PEM file of the CA that signs your registries' TLS certificates "
        "(default: the system's trust store).",
        check=_optional(_absolute),
    )
    disk_layer_max_mb: int = option(
        "number",
        default=10240,
        doc='Size of a `writable = "disk"` layer: its own ext4 filesystem in a sparse file '
        "beside the task, so a task cannot fill the node's disk. 0: a plain directory, no cap.",
        check=_whole(0),
    )
    pids_max: int = option(
        "number",
        default=16384,
        doc="Most processes and threads one task may have (a fork bomb stops there); 0: no limit.",
        check=_whole(0),
    )
    allow_caps: tuple[str, ...] = option(
        "list(string)",
        default=tuple(sorted(DEFAULT_CAPS)),
        doc="Capabilities a task may ask for with cap_add (Docker's default set unless changed).",
        check=_capabilities,
    )
    user_namespace: bool = option(
        "bool",
        default=True,
        doc="Run tasks in a user namespace: a task running as root becomes the host ids of "
        "root_id_range (its capabilities count only inside), any other user is mapped to itself "
        "alone. false: container root is host root, with capabilities still bounded (MKNOD only "
        "through cap_add), in a devices cgroup (cgroup v1 only: v2 nodes refuse such tasks).",
    )
    root_id_range: str = option(
        "string",
        default="100000:65536",
        doc='Host uids and gids that container ids 0.. map to for root tasks, as "FIRST:COUNT"; '
        "keep it clear of real users' ids.",
        check=lambda v: None if parse_id_range(v) else 'must be "FIRST:COUNT", e.g. "100000:65536"',
    )
    allowed_uids: tuple[str, ...] = option(
        "list(string)",
        default=tuple(ids.format_ranges(ids.DEFAULT_UIDS)),
        doc='Host uids a task\'s `user` may be, as ranges "FIRST-LAST" or single ids; root (uid 0) '
        "is always allowed (remapped, or bounded host root); with user_namespace, no id inside "
        "root_id_range.",
        check=_id_ranges,
    )
    allowed_gids: tuple[str, ...] = option(
        "list(string)",
        default=tuple(ids.format_ranges(ids.DEFAULT_GIDS)),
        doc='Host gids a non-root task user may have, as allowed_uids (100 is "users"); gid 0 only '
        "if listed.",
        check=_id_ranges,
    )
    signature_mode: str = option(
        "string",
        default="off",
        doc='Image signature policy: "enforce" (unsigned, changed or wrongly signed images do not '
        'start), "warn" (they start, with a warning event), "off", or "cosign" (docker:// images '
        "must carry a cosign signature by one of cosign_keys).",
        check=_one_of(*MODES),
    )
    signature_rules: tuple[str, ...] = option(
        "list(string)",
        default=(),
        doc='Per-source modes, "PREFIX=MODE" (the longest matching prefix of the image reference '
        'or path wins), e.g. ["docker://registry.example.org:5000/prod/=enforce"].',
        check=lambda v: next(
            (
                f"{r!r} must be PREFIX=enforce|warn|off"
                for r in v
                if r.rpartition("=")[2] not in MODES or "=" not in r
            ),
            None,
        ),
    )
    signature_keys: tuple[str, ...] = option(
        "list(string)",
        default=(),
        doc="Vault transit keys whose signatures this node trusts (every version at or above the "
        "key's min_decryption_version).",
        check=_no_nul,
    )
    cosign_keys: tuple[str, ...] = option(
        "list(string)",
        default=(),
        doc='Keys whose cosign signatures images under a "cosign" rule must carry: PEM public '
        'key files (root\'s, as `cosign generate-key-pair` writes them) or "hashivault://NAME" '
        "(a transit key in the node's Vault, as cosign names it).",
        check=lambda v: next(
            (
                f"{k!r} must be an absolute PEM path or hashivault://NAME"
                for k in v
                if not (k.startswith("/") or (k.startswith("hashivault://") and k[13:]))
            ),
            None,
        ),
    )
    signature_key_ttl: str = option(
        "string",
        default="5m",
        doc="How long public keys fetched from Vault are used before asking again (when Vault is "
        'unreachable, cached keys keep verifying); "0s" asks at every start.',
        check=duration("5m"),
    )
    vault_address: str = option(
        "string",
        default="",
        doc="Vault's address (default: $VAULT_ADDR of the agent).",
        check=_optional(_url("https://vault.example.org:8200")),
    )
    vault_transit_mount: str = option(
        "string",
        default="transit",
        doc="Mount path of Vault's transit engine.",
        check=lambda v: None if str(v).strip("/") else "must name the transit mount",
    )
    vault_auth: str = option(
        "string",
        default="token",
        doc='How the plugin logs in to Vault: "token" (vault_token_file, else $VAULT_TOKEN), '
        '"approle" (vault_role_id, vault_secret_id_file) or "jwt" (vault_jwt_role, '
        "vault_jwt_file).",
        check=_one_of("token", "approle", "jwt"),
    )
    vault_token_file: str = option(
        "string",
        default="",
        doc="File holding a Vault token (read-only policy is enough).",
        check=_optional(_absolute),
    )
    vault_role_id: str = option("string", default="", doc="AppRole role_id.")
    vault_secret_id_file: str = option(
        "string",
        default="",
        doc="File holding the AppRole secret_id.",
        check=_optional(_absolute),
    )
    vault_jwt_role: str = option("string", default="", doc="Role of Vault's JWT auth method.")
    vault_jwt_file: str = option(
        "string",
        default="",
        doc="File holding the JWT (e.g. a Nomad workload identity).",
        check=_optional(_absolute),
    )
    vault_ca_file: str = option(
        "string",
        default="",
        doc="PEM file of the CA of Vault's TLS certificate (default $VAULT_CACERT).",
        check=_optional(_absolute),
    )
    vault_namespace: str = option(
        "string",
        default="",
        doc="Vault Enterprise namespace of the transit keys (default $VAULT_NAMESPACE).",
    )
    allow_unconfined_seccomp: bool = option(
        "bool",
        default=False,
        doc='Whether a task may turn seccomp off with seccomp = "unconfined".',
    )
    seccomp_profile_dirs: tuple[str, ...] = option(
        "list(string)",
        default=(),
        doc="Directories of Docker-format seccomp profiles tasks may choose, by name "
        '(seccomp = "mpi" is mpi.json, the first directory holding it wins) or by path '
        'inside them, e.g. ["/etc/pyhpc/seccomp"]. The directories and profiles must be owned '
        "by root and writable by root alone; symlinks are refused. Empty: only the default.",
        check=_absolute,
    )
    mpi_nomad_address: str = option(
        "string",
        default="http://127.0.0.1:4646",
        doc='The Nomad agent\'s HTTP API as an MPI launcher (mpi mode "launcher") reaches it '
        "from its node, to start the MPI daemons in the workers' containers through the exec "
        "API. With ACLs, the launcher uses the job's own credentials: its workload identity "
        "(`identity { env = true }`) and an ACL policy linked to the task. With TLS, an "
        "https:// address; the launcher then needs NOMAD_CACERT (and, where agents verify "
        "HTTPS clients, NOMAD_CLIENT_CERT and NOMAD_CLIENT_KEY) in its environment: "
        "jobspecs/mpi-multi.nomad's `nomad_tls` variable renders them from a Nomad Variable.",
        check=_url("http://127.0.0.1:4646"),
    )

    # Typed views of options the schema has checked: one decoding, used wherever they are.

    @property
    def root_ids(self) -> tuple[int, int]:
        """root_id_range as (first host id, count)."""
        found = parse_id_range(self.root_id_range)
        if found is None:
            raise ValueError(f"root_id_range {self.root_id_range!r} was not checked")
        return found

    @property
    def store_max_bytes(self) -> int:
        """store_max_mb in bytes (0: no cap)."""
        return int(self.store_max_mb) * 1_000_000


MPI_LAUNCHERS = {"openmpi": "mpirun", "mpich": "mpiexec.hydra"}
MPI_MODES = ("local", "launcher", "worker")


@dataclass(frozen=True)
class MpiConfig:
    """`mpi { ... }` inside a task's config: run the command as MPI ranks."""

    implementation: str = option(
        "string",
        doc='"openmpi" or "mpich": the MPI in the image the command was built against.',
        check=_one_of(*MPI_LAUNCHERS),
    )
    ranks_per_node: int = option(
        "number",
        default=1,
        doc="Ranks started in this task's container; they share its namespaces, so shared "
        "memory and single-copy (CMA) transports work between them.",
        check=_whole(1, 4096),
    )
    launcher: str = option(
        "string",
        default="",
        doc='The image\'s MPI launcher. Default: "mpirun" for openmpi, "mpiexec.hydra" for mpich.',
        check=_no_nul,
    )
    launcher_args: tuple[str, ...] = option(
        "list(string)", default=(), doc="Extra launcher arguments, before the command.",
        check=_no_nul,
    )  # fmt: skip
    mode: str = option(
        "string",
        default="local",
        doc='"local": every rank in this container. Across allocations: "launcher" (the task '
        'that runs the launcher, once `workers` have registered) or "worker" (holds ranks the '
        "launcher starts through Nomad's exec API; its command is ignored, and it ends when "
        "the launcher does).",
        check=_one_of(*MPI_MODES),
    )
    workers: int = option(
        "number",
        default=0,
        doc='mode "launcher": how many worker allocations to wait for (the start barrier).',
        check=_whole(0, 10000),
    )
    hosts_file: str = option(
        "string",
        default="local/mpi-hosts",
        doc="The file a `template` renders the peers into, one `ADDRESS ALLOC_ID` line each, "
        'from the Nomad service of the workers (mode "launcher") or of the launcher '
        '(mode "worker"); relative to the task directory.',
        check=_no_nul,
    )
    barrier_timeout: str = option(
        "string",
        default="5m",
        doc="How long the launcher waits for all workers, and a worker for the launcher, "
        "before failing with the count it saw.",
        check=duration("5m", positive=True),
    )
    worker_task: str = option(
        "string",
        default="worker",
        doc="The task name of the workers, where the launcher execs the MPI daemons.",
        check=_no_nul,
    )


@dataclass(frozen=True)
class TaskAuth:
    """`auth { ... }` in a task's config: its own registry login."""

    username: str = option("string", default="", doc="Registry user name.", check=_no_nul)
    password: str = option(
        "string",
        default="",
        doc="Its password or token; keep it out of the jobspec with a `template` that has "
        '`env = true` and `password = "${REGISTRY_PASSWORD}"`.',
        check=_no_nul,
        secret=True,
    )
    helper: str = option(
        "string",
        default="",
        doc="A credential helper instead (one of the plugin's auth.task_helpers).",
        check=_helper,
    )


@dataclass(frozen=True)
class TaskConfig:
    """`config { ... }` of a task with `driver = "pyhpc"`."""

    image: str = option(
        "string",
        doc="The SquashFS file on the client node (absolute path), or a reference imported into "
        "the node's store on first use: docker://HOST/REPO:TAG, oras://HOST/REPO:TAG, oci:DIR, "
        "oci-archive:FILE, docker-archive:FILE (each allowed by the plugin's image_sources).",
        check=_image_reference,
    )
    command: str = option(
        "string",
        default="",
        doc="Program to run inside the image: an absolute path or a name looked up in PATH. "
        "Default: the image's Entrypoint and Cmd.",
        check=_no_nul,
    )
    auth: TaskAuth | None = block(
        TaskAuth,
        doc="The login for a private registry: "
        '`auth { username = "me"  password = "${REGISTRY_PASSWORD}" }`, or `auth { helper }`.',
    )
    auth_soft_fail: bool = option(
        "bool",
        default=False,
        doc="When the login fails (refused, or the helper breaks), pull without one instead of "
        "failing the task.",
    )
    image_pull_timeout: str = option(
        "string",
        default="5m",
        doc="How long the first start on a node may wait for the image import.",
        check=duration("5m", positive=True),
    )
    args: tuple[str, ...] = option(
        "list(string)", default=(), doc="Arguments passed to the command.", check=_no_nul
    )
    work_dir: str = option(
        "string",
        default="",
        doc="Working directory inside the container. Default: the image's WorkingDir, or /.",
        check=_optional(_absolute),
    )
    hostname: str = option(
        "string",
        default="",
        doc="The container's host name. Default: the task's name. E.g. \"${node.unique.name}\", "
        "so that MPI ranks report the node they run on.",
        check=_hostname,
    )
    writable: str = option(
        "string",
        default=choices.WRITABLE[0],
        doc='Writable layer over the image: "tmpfs" (in memory), "disk" (in the task directory) '
        'or "none" (read-only root; /alloc, /local and /secrets stay writable).',
        check=_one_of(*choices.WRITABLE),
    )
    network: str = option(
        "string",
        default=choices.NETWORK[0],
        doc='"host" (the node\'s network, the HPC default) or "none" (loopback only).',
        check=_one_of(*choices.NETWORK),
    )
    mounts: tuple[str, ...] = option(
        "list(string)",
        default=(),
        doc='Host directories to bind in, "SRC[:DST[:ro|rw]]"; SRC must be inside the plugin\'s '
        "mount_dirs.",
        check=_binds,
    )
    datasets: tuple[str, ...] = option(
        "list(string)",
        default=(),
        doc='SquashFS datasets mounted read-only, "SOURCE:/PATH": SOURCE is what `image` takes '
        "(a file in image_dirs, or a reference from image_sources), checked, signed and shared "
        'per digest as images are, e.g. "/var/lib/pyhpc/images/genome.sqsh:/data".',
        check=_no_nul,
    )
    devices: tuple[str, ...] = option(
        "list(string)",
        default=(),
        doc='Host devices to pass through, "HOST[:CONTAINER]" (e.g. "/dev/infiniband/uverbs0"); '
        "each must be in the plugin's allow_devices.",
        check=_binds,
    )
    cap_add: tuple[str, ...] = option(
        "list(string)",
        default=(),
        doc="Capabilities added to Docker's default set; each must be in the plugin's allow_caps.",
        check=_capabilities,
    )
    cap_drop: tuple[str, ...] = option(
        "list(string)",
        default=(),
        doc='Capabilities removed from the default set ("ALL" drops every one).',
        check=_capabilities,
    )
    seccomp: str = option(
        "string",
        default="default",
        doc='"default" (blocks what Docker\'s default blocks), "unconfined" (if the plugin allows '
        "it), or a Docker-format JSON profile from the plugin's seccomp_profile_dirs: its name "
        '("mpi" for mpi.json) or its absolute path there.',
        check=_seccomp,
    )

    mpi: MpiConfig | None = block(
        MpiConfig,
        doc="Run the command as MPI ranks inside this one container: "
        '`mpi { implementation = "openmpi"  ranks_per_node = 4 }`.',
    )
