# The pyhpc task driver, as the Nomad agent loads it from plugin_dir.
# The block label must equal the file name in plugin_dir ("pyhpc", see `pyhpc install-plugin`).
# Every option is here, and listed by `pyhpc config-reference` (docs/reference.md); a bad value
# stops the agent with a message naming the option. Commented-out options show their default.
plugin "pyhpc" {
  config {
    # Per-task supervisor sockets and exit status live here; keep it on a local disk or tmpfs.
    run_dir = "/run/pyhpc"

    # How often the driver re-checks the node (root, loop devices, squashfs, overlay).
    fingerprint_period = "30s"

    # Where task images may come from. Symlinks are resolved and whole path components
    # compared, so "/var/lib/pyhpc/images" does not admit "/var/lib/pyhpc/images2".
    image_dirs = ["/var/lib/pyhpc/images"]

    # An image file someone other than root can change: "refuse" it, or "copy" it into the
    # store first and run the copy (so users may run images from their own directories).
    # untrusted_images = "refuse"

    # Image references a jobspec may name instead of a SquashFS path, as prefixes, e.g.
    # ["docker://registry.example.org:5000/hpc/", "oras://registry.example.org:5000/"].
    # They are imported into store_dir on first use, once per node. Empty: files only.
    image_sources = []
    store_dir     = "/var/lib/pyhpc/store"
    # Most megabytes the store may hold (0: no cap; an import past it first evicts the least
    # recently used images no task uses), the zstd level of imported images (1 fastest,
    # 19 smallest), and the PEM file of your registries' CA (default: the system's trust store).
    # store_max_mb     = 0
    # image_zstd_level = 3
    # registry_ca_file = ""
    # Every image_gc_interval ("0": never), images no task has used for image_gc_min_age are
    # deleted (never one in use or being imported); `pyhpc image ls` shows when each was used.
    # image_gc_interval = "1h"
    # image_gc_min_age  = "24h"
    # An image's mount stays this long after its last task ended, so the next task of it
    # neither mounts it again nor reads its files cold ("0": unmount at once).
    # image_mount_linger = "2m"

    # Registry logins for every task on this node: a credential helper
    # (docker-credential-NAME on the agent's PATH) and/or a Docker config.json or containers
    # auth.json read as root. A task may bring its own login (`auth { username, password }`)
    # or name one of task_helpers. The driver never reads root's ~/.docker or auth.json.
    # auth {
    #   helper       = "ecr-login"
    #   config       = "/etc/pyhpc/registry-auth.json"
    #   task_helpers = []
    # }

    # Host directories a jobspec may bind in with `mounts = ["/scratch/me:/data:ro"]`.
    # Empty: none. Same path rules as image_dirs.
    mount_dirs = []

    # What every task gets from the site: binds (inside mount_dirs, as a task's `mounts`),
    # variables, and variables passed through from the environment the container starts from
    # (names, or prefixes ending in "*"; under Slurm, ["SLURM_*", "PMIX_*", "PMI_*"]).
    # default_mounts  = []
    # default_env     = []
    # env_passthrough = []
    # Hooks: the admin's executables, run at every start, that answer with binds, devices and
    # variables to add (see contrib/hooks/ and docs/admin.md).
    # hooks_dir    = ""
    # hook_timeout = "30s"

    # What every task gets from the site: binds (inside mount_dirs, as a task's `mounts`),
    # variables, and variables passed through from the environment the container starts from
    # (names, or prefixes ending in "*"; under Slurm, ["SLURM_*", "PMIX_*", "PMI_*"]).
    # default_mounts  = []
    # default_env     = []
    # env_passthrough = []
    # Hooks: the admin's executables, run at every start, that answer with binds, devices and
    # variables to add (see contrib/hooks/ and docs/admin.md).
    # hooks_dir    = ""
    # hook_timeout = "30s"

    # Host devices (or directories of them) a jobspec may pass through with `devices`,
    # e.g. ["/dev/infiniband"]. Devices reserved by Nomad device plugins need no entry.
    allow_devices = []

    # Most processes and threads one task may have; 0 lifts the limit.
    pids_max = 16384

    # Size of a `writable = "disk"` layer, its own sparse ext4 file (0: a plain directory,
    # no cap).
    # disk_layer_max_mb = 10240

    # Capabilities a task may add with cap_add. Tasks start with Docker's default set; listing
    # more here (e.g. "SYS_PTRACE" for debuggers) lets jobspecs ask for them.
    allow_caps = ["AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                  "NET_BIND_SERVICE", "NET_RAW", "SETFCAP", "SETGID", "SETPCAP", "SETUID",
                  "SYS_CHROOT"]

    # Tasks run in a user namespace. A task running as root (no `user` in the jobspec) is
    # remapped: container ids 0..COUNT-1 are host ids FIRST..; its capabilities count only
    # inside, and image files owned by root are its own. A task with `user = "1000"` is
    # mapped to uid 1000 alone. Keep the range clear of real users' ids (like /etc/subuid).
    user_namespace = true
    root_id_range  = "100000:65536"

    # Host ids a task's `user` may be ("FIRST-LAST" or one id); root is always allowed
    # (remapped), and no id inside root_id_range. 100 is "users".
    # allowed_uids = ["1000-65534"]
    # allowed_gids = ["100", "1000-65534"]

    # Image signatures (keys in Vault's transit engine; see `pyhpc vault setup` and
    # `pyhpc image sign`). "enforce": an unsigned, changed or wrongly signed image does not
    # start; "warn": it starts with a warning event; "off"; "cosign": a docker:// image must
    # carry a cosign signature by one of cosign_keys (PEM files or "hashivault://NAME").
    # signature_rules set a mode per source prefix ("PREFIX=MODE"), the longest match winning.
    signature_mode  = "off"
    signature_rules = []
    signature_keys  = []
    # cosign_keys   = []
    vault_address   = ""
    vault_auth      = "token"
    vault_token_file = ""
    # How long fetched public keys are used before Vault is asked again, the transit mount,
    # the AppRole (vault_auth = "approle") and JWT (vault_auth = "jwt") logins, Vault's CA
    # (default $VAULT_CACERT) and Enterprise namespace (default $VAULT_NAMESPACE).
    # signature_key_ttl    = "5m"
    # vault_transit_mount  = "transit"
    # vault_role_id        = ""
    # vault_secret_id_file = ""
    # vault_jwt_role       = ""
    # vault_jwt_file       = ""
    # vault_ca_file        = ""
    # vault_namespace      = ""

    # Whether a jobspec may say seccomp = "unconfined". Keep false on shared clusters.
    allow_unconfined_seccomp = false

    # Where the Docker-format seccomp profiles a jobspec may choose live: seccomp = "mpi" is
    # mpi.json in the first of these that has it; an absolute path must lie inside one. The
    # directories and the profiles must be root's and writable by root alone; symlinks are
    # refused. A path anywhere else (say, a file an earlier job wrote) is never read.
    seccomp_profile_dirs = ["/etc/pyhpc/seccomp"]

    # Where an MPI launcher task (mpi mode "launcher") reaches this node's Nomad agent, to
    # start the MPI daemons in the workers' containers through the exec API.
    mpi_nomad_address = "http://127.0.0.1:4646"
  }
}
