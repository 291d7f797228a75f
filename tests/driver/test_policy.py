"""The admin's policy applied to a task config: refusals name what was wrong."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from nomad_driver.driver import config, policy
from nomad_driver.images.store import StoreError
from nomad_driver.runtime.security import PolicyError
from nomad_driver.wire import schema


def plugin(**options: object) -> config.PluginConfig:
    return schema.load(config.PluginConfig, options, "test")


def test_a_missing_device_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="devices: '/dev/nonexistent0' does not exist"):
        policy.allowed_binds(("/dev/nonexistent0",), ("/dev",), "devices", "allow_devices")


def test_a_file_that_is_not_a_device_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="is not a device"):
        policy.allowed_binds(("/dev/shm",), ("/dev",), "devices", "allow_devices")


def test_image_outside_image_dirs_and_missing_image(tmp_path: Path) -> None:
    cfg = plugin(image_dirs=[str(tmp_path / "images")])
    with pytest.raises(PolicyError, match="outside the plugin's image_dirs"):
        policy.open_image(cfg, "/etc/passwd")
    with pytest.raises(FileNotFoundError, match="no such file"):
        policy.open_image(cfg, str(tmp_path / "images" / "absent.sqsh"))


def test_user_namespace_settings_reach_the_spec(tmp_path: Path) -> None:
    image = tmp_path / "img.sqsh"
    image.write_bytes(b"x")
    task = schema.load(config.TaskConfig, {"image": str(image), "command": "true"}, "t")
    ctx = policy.TaskContext("t1", "host", {}, "", "/dev/null", "/dev/null")
    on = policy.container_spec(plugin(root_id_range="200000:1000"), task, str(image), ctx)
    off = policy.container_spec(plugin(user_namespace=False), task, str(image), ctx)
    assert (on.userns, off.userns) == ((200000, 1000), None)
    with pytest.raises(schema.ConfigError, match="root_id_range"):
        plugin(root_id_range="0:65536")


def test_new_plugin_options_refuse_nonsense_naming_each() -> None:
    bad = {
        "vault_address": "vault:8200",
        "vault_transit_mount": "/",
        "vault_auth": "kerberos",
        "vault_token_file": "relative/token",
        "signature_mode": "strict",
        "signature_rules": ["docker://r/=maybe"],
        "signature_key_ttl": "soon",
        "image_zstd_level": 40,
        "store_max_mb": -1,
        "root_id_range": "0:65536",
        "store_dir": "store",
        "mpi_nomad_address": "127.0.0.1:4646",
    }
    with pytest.raises(schema.ConfigError) as err:
        plugin(**bad)
    for name in bad:
        assert f"option {name!r}" in str(err.value), name


def test_a_zero_duration_means_zero_where_it_means_anything_and_is_refused_elsewhere() -> None:
    # "0s" once became the default (300 s) where it was read: it must reach the verifier.
    no_cache = plugin(signature_key_ttl="0s", vault_address="http://127.0.0.1:8200")
    assert policy.verifier(no_cache).ttl == 0.0
    assert policy.verifier(plugin(vault_address="http://127.0.0.1:8200")).ttl == 300.0
    for name in ("fingerprint_period", "hook_timeout"):
        with pytest.raises(schema.ConfigError) as err:
            plugin(**{name: "0s"})
        assert f"option {name!r}" in str(err.value) and "above zero" in str(err.value)
    for name in ("image_mount_linger", "image_gc_interval", "image_gc_min_age"):
        assert getattr(plugin(**{name: "0"}), name) == "0"  # off / none: allowed
    with pytest.raises(schema.ConfigError) as err:
        schema.load(config.TaskConfig, {"image": "/i.sqsh", "image_pull_timeout": "0s"}, "task")
    assert "option 'image_pull_timeout'" in str(err.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="root-owned profiles need root")
def test_seccomp_reads_profiles_only_from_the_plugins_profile_dirs(tmp_path: Path) -> None:
    image = tmp_path / "img.sqsh"
    image.write_bytes(b"x")
    admin = tmp_path / "profiles"
    admin.mkdir(mode=0o755)
    strict = {"defaultAction": "SCMP_ACT_ERRNO"}
    (admin / "strict.json").write_text(json.dumps(strict))
    tenant = tmp_path / "alloc" / "allow.json"
    tenant.parent.mkdir()
    tenant.write_text('{"defaultAction": "SCMP_ACT_ALLOW"}')
    os.chown(tenant, 1000, 1000)
    cfg = plugin(seccomp_profile_dirs=[str(admin)])
    ctx = policy.TaskContext("t1", "host", {}, "", "/dev/null", "/dev/null")

    def spec(choice: str) -> object:
        task = schema.load(
            config.TaskConfig, {"image": str(image), "command": "true", "seccomp": choice}, "t"
        )
        return policy.container_spec(cfg, task, str(image), ctx).seccomp

    with pytest.raises(PolicyError, match="is not a profile in the plugin's seccomp_profile_dirs"):
        spec(str(tenant))
    assert spec("strict") == spec(str(admin / "strict.json")) == strict
    assert spec("default")["defaultAction"] == "SCMP_ACT_ALLOW"  # type: ignore[index]
    for bad in (".hidden", "../strict", "a/b", "x\0y"):
        with pytest.raises(schema.ConfigError, match="option 'seccomp'"):
            schema.load(config.TaskConfig, {"image": str(image), "seccomp": bad}, "t")
    with pytest.raises(schema.ConfigError, match="seccomp_profile_dirs"):
        plugin(seccomp_profile_dirs=["profiles"])


def mpi_task(image: Path, **mpi: object) -> config.TaskConfig:
    return schema.load(
        config.TaskConfig,
        {"image": str(image), "command": "/opt/app", "args": ["x"], "mpi": [mpi]},
        "t",
    )


def test_mpi_modes_give_the_command_env_and_mounts_each_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "img.sqsh"
    image.write_bytes(b"x")
    # Not run by a Nomad agent here: the launcher's Nomad CLI is then the one on PATH.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nomad").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "nomad").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    ctx = policy.TaskContext("t1", "host", {}, "", "/dev/null", "/dev/null")
    task = mpi_task(image, implementation="openmpi", ranks_per_node=2)
    local = policy.container_spec(plugin(), task, str(image), ctx)
    assert [local.command, *local.args] == ["mpirun", "-n", "2", "/opt/app", "x"]
    assert local.env["OMPI_MCA_plm_rsh_agent"] == "false"
    assert not any(k.startswith("PYHPC_MPI_") for k in local.env)
    assert "PYHPC_NOMAD_ADDR" not in local.env
    assert not [m for m in local.mounts if m.task_path.startswith("/usr/local/pyhpc")]

    launcher = policy.container_spec(
        plugin(mpi_nomad_address="http://10.0.0.1:4646"),
        mpi_task(
            image,
            implementation="mpich",
            mode="launcher",
            workers=3,
            hosts_file="local/peers",
            barrier_timeout="90s",
        ),  # fmt: skip
        str(image),
        ctx,
    )
    # The ranks run under pyhpc-mpi-rank, which records a failed one for the launcher.
    assert [launcher.command, *launcher.args] == [
        "/usr/local/pyhpc/bin/pyhpc-mpi-launch", "mpiexec.hydra",
        "/usr/local/pyhpc/bin/pyhpc-mpi-rank", "/opt/app", "x"
    ]  # fmt: skip
    env = launcher.env
    assert (env["PYHPC_MPI_WORKERS"], env["PYHPC_MPI_HOSTS"], env["PYHPC_MPI_TIMEOUT"]) == (
        "3", "/local/peers", "90"
    )  # fmt: skip
    assert env["PYHPC_NOMAD_ADDR"] == "http://10.0.0.1:4646"
    bound = {m.task_path: m for m in launcher.mounts}
    helpers = bound["/usr/local/pyhpc/bin"]
    assert helpers.read_only and Path(helpers.host_path, "pyhpc-rsh").is_file()
    assert bound["/usr/local/pyhpc/libexec/nomad"].read_only
    assert bound["/usr/local/pyhpc/libexec/nomad"].host_path == str(tmp_path / "bin" / "nomad")

    worker = policy.container_spec(
        plugin(), mpi_task(image, implementation="openmpi", mode="worker"), str(image), ctx
    )
    # A worker runs pyhpc's wait, whatever the command says; it gets the scripts, not Nomad.
    assert [worker.command, *worker.args] == ["/usr/local/pyhpc/bin/pyhpc-mpi-worker"]
    # Open MPI 4 and 5 (PRRTE) each read their own name for the remote shell.
    assert worker.env["OMPI_MCA_plm_rsh_agent"] == "/usr/local/pyhpc/bin/pyhpc-rsh"
    assert worker.env["PRTE_MCA_plm_ssh_agent"] == "/usr/local/pyhpc/bin/pyhpc-rsh"
    openmpi_launcher = policy.container_spec(
        plugin(), mpi_task(image, implementation="openmpi", mode="launcher", workers=2),
        str(image), ctx,
    )  # fmt: skip
    assert openmpi_launcher.args[1:] == ("/usr/local/pyhpc/bin/pyhpc-mpi-rank", "/opt/app", "x")
    assert [m.task_path for m in worker.mounts if m.task_path.startswith("/usr/local/pyhpc")] == [
        "/usr/local/pyhpc/bin"
    ]


def test_mpi_launcher_without_workers_and_bad_options_are_refused(tmp_path: Path) -> None:
    image = tmp_path / "img.sqsh"
    image.write_bytes(b"x")
    ctx = policy.TaskContext("t1", "host", {}, "", "/dev/null", "/dev/null")
    with pytest.raises(PolicyError, match='mode "launcher" needs workers = N'):
        policy.container_spec(
            plugin(), mpi_task(image, implementation="openmpi", mode="launcher"), str(image), ctx
        )
    with pytest.raises(schema.ConfigError) as err:
        mpi_task(image, implementation="openmpi", mode="leader", barrier_timeout="soon")
    assert err.value.problems == [
        'mpi block: option \'mode\' = \'leader\': must be "local", "launcher" or "worker"',
        "mpi block: option 'barrier_timeout' = 'soon': must be a duration like \"5m\", above zero",
    ]
    with pytest.raises(schema.ConfigError, match="option 'hostname' = '-x'"):
        schema.load(config.TaskConfig, {"image": "/i", "hostname": "-x"}, "t")
    named = schema.load(
        config.TaskConfig, {"image": "/i", "command": "true", "hostname": "mpi-1"}, "t"
    )
    spec = policy.container_spec(plugin(), named, str(image), ctx)
    assert spec.hostname == "mpi-1"


def test_image_sources_match_whole_components_of_the_parsed_reference(tmp_path: Path) -> None:
    reg = "reg.example.org:5000"
    cfg = plugin(
        image_sources=[f"docker://{reg}/hpc/", f"oras://{reg}/tools", "dir:/srv/rootfs/"],
        store_dir=str(tmp_path / "store"),
    )
    outside = "is not from the plugin's image_sources"
    for text, why in (
        (f"docker://{reg}/hpc/../prod/x:1", "must be lower-case path components"),
        (f"docker://{reg}//hpc/app:1", "must be lower-case path components"),
        (f"docker://{reg}/hpcx/app:1", outside),  # a raw prefix let these two through
        (f"oras://{reg}/toolsx/app:1", outside),
        ("docker://other.example.org:5000/hpc/app:1", outside),
        (f"docker://{reg}/hpc", outside),  # "hpc/": strictly beneath
        ("dir:/srv/rootfs", outside),
        (f"oras://{reg}/hpc/app:1", outside),  # another transport
        ("dir:/srv/rootfs/../../../etc", "'..' component is not accepted"),
        ("dir:/srv/rootfs/./../x", "'..' component is not accepted"),
        ("dir:/srv/rootfs2/x", outside),
        ("oci:/srv/rootfs/layout", outside),
    ):
        with pytest.raises(PolicyError, match=re.escape(why)):
            policy.resolve_image(cfg, text)
    from nomad_driver.images import reference

    for text in (  # controls: what the entries do allow
        f"docker://{reg}/hpc/app:1",
        f"docker://{reg.upper()}/hpc/team/app@sha256:" + "0" * 64,
        f"oras://{reg}/tools/x:2",
        f"oras://{reg}/tools:1",  # no trailing '/': the entry itself too
        "dir:/srv/rootfs//a/./b/",
    ):
        assert reference.allowed_by(reference.parse(text), cfg.image_sources), text
    assert str(reference.parse("dir:/srv/rootfs//a/./b/")) == "dir:/srv/rootfs/a/b"


@pytest.mark.skipif(os.geteuid() != 0, reason="imports keep ownership: root")
def test_a_dir_source_cannot_climb_out_of_image_sources_to_a_secret(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    allowed, secret = tmp_path / "srv" / "rootfs", tmp_path / "etc"
    (allowed / "app" / "etc").mkdir(parents=True)
    (allowed / "app" / "etc" / "motd").write_text("hello\n")
    subprocess.run(["chmod", "-R", "a+rX", str(tmp_path / "srv")], check=True)
    secret.mkdir(mode=0o700)
    (secret / "shadow").write_text("root:$6$secret-hash:19000::::::\n")
    os.chmod(secret / "shadow", 0o600)
    store = tmp_path / "store"
    cfg = plugin(image_sources=[f"dir:{allowed}/"], store_dir=str(store))
    climbing = f"dir:{allowed}/../../etc"
    with pytest.raises(PolicyError, match=r"'\.\.' component is not accepted"):
        policy.resolve_image(cfg, climbing)
    # The same secret put beneath the allowed directory by a symlink is not read either.
    os.symlink(secret, allowed / "linked")
    with pytest.raises(StoreError, match="symlink, which an import never follows"):
        policy.resolve_image(cfg, f"dir:{allowed}/linked")
    # Nor is a root-only copy of it (what a hard link or a careless copy would give).
    (allowed / "app" / "etc" / "shadow").write_text("root:$6$secret-hash:19000::::::\n")
    os.chmod(allowed / "app" / "etc" / "shadow", 0o600)
    with pytest.raises(StoreError, match="has mode 0600: .*readable by every user"):
        policy.resolve_image(cfg, f"dir:{allowed}/app")
    os.unlink(allowed / "app" / "etc" / "shadow")
    image = policy.resolve_image(cfg, f"dir:{allowed}/app")  # control: the benign source
    listing = subprocess.run(
        ["unsquashfs", "-lc", image.path], check=True, capture_output=True, text=True
    ).stdout
    assert "squashfs-root/etc/motd" in listing and "shadow" not in listing
    for sqsh in store.rglob("*.sqsh"):
        cat = subprocess.run(["unsquashfs", "-cat", str(sqsh), "etc/motd"], capture_output=True)
        assert b"secret-hash" not in cat.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/var/lib/pyhpc/images/genome.sqsh:/data", ("/var/lib/pyhpc/images/genome.sqsh", "/data")),
        ("docker://reg:5000/ds/genome:1:/data/", ("docker://reg:5000/ds/genome:1", "/data")),
        ("oci:/srv/layout:v2:/ref", ("oci:/srv/layout:v2", "/ref")),
    ],
)
def test_a_dataset_is_source_then_container_path(text: str, expected: tuple[str, str]) -> None:
    assert policy.parse_dataset(text) == expected


@pytest.mark.parametrize("text", ["/a.sqsh", "/a.sqsh:data", ":/data", "/a.sqsh:/x/../etc"])
def test_a_malformed_dataset_is_named_in_one_line(text: str) -> None:
    with pytest.raises(policy.PolicyError, match=r"option 'datasets': .* must be SOURCE:/PATH"):
        policy.parse_dataset(text)


def test_site_defaults_reach_every_task_under_the_task_allowlists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "img.sqsh"
    image.write_bytes(b"x")
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("PMIX_RANK", "3")
    monkeypatch.setenv("HOME_SECRET", "not-passed")
    cfg = plugin(
        mount_dirs=[str(tmp_path)],
        default_mounts=[f"{site}:/opt/site:ro"],
        default_env=["OMP_PROC_BIND=close", "MODE=site"],
        env_passthrough=["SLURM_*", "PMIX_RANK"],
    )
    task = schema.load(config.TaskConfig, {"image": str(image), "command": "true"}, "t")
    ctx = policy.TaskContext("t1", "host", {"MODE": "task"}, "", "/dev/null", "/dev/null")
    spec = policy.container_spec(cfg, task, str(image), ctx)
    assert {k: spec.env.get(k) for k in ("SLURM_JOB_ID", "SLURM_PROCID", "PMIX_RANK")} == {
        "SLURM_JOB_ID": "42", "SLURM_PROCID": "3", "PMIX_RANK": "3"
    }  # fmt: skip
    assert spec.env["OMP_PROC_BIND"] == "close" and spec.env["MODE"] == "task"  # the task wins
    assert "HOME_SECRET" not in spec.env
    assert any(m.task_path == "/opt/site" and m.read_only for m in spec.mounts)
    outside = plugin(mount_dirs=[str(site)], default_mounts=["/etc:/host-etc"])
    with pytest.raises(
        PolicyError, match="default_mounts: '/etc' is outside the plugin's mount_dirs"
    ):
        policy.container_spec(outside, task, str(image), ctx)
    with pytest.raises(schema.ConfigError, match="'OMP' must be NAME=VALUE"):
        plugin(default_env=["OMP"])
    with pytest.raises(schema.ConfigError, match="'SLURM_\\*X' must be a NAME or PREFIX"):
        plugin(env_passthrough=["SLURM_*X"])


def test_without_a_timeout_the_import_runs_in_the_callers_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pyhpc run` (no timeout) imports in its own thread, so a signal that stops it unwinds
    the import and its clean-up runs; a worker thread would be frozen at exit with its work
    directory left (red team). The driver's (a timeout) uses a worker: the control."""
    import threading

    from nomad_driver.images import store as store_module

    seen: list[threading.Thread] = []

    def ensure(self: object, text: str, progress: object, **kw: object) -> None:
        seen.append(threading.current_thread())
        raise StoreError("stopped here")

    monkeypatch.setattr(store_module.Store, "ensure", ensure)
    (tmp_path / "src").mkdir()
    cfg = plugin(store_dir=str(tmp_path / "store"), image_sources=[f"dir:{tmp_path}/"])
    for timeout in (None, 5.0):
        with pytest.raises(StoreError):
            policy.resolve_image(cfg, f"dir:{tmp_path}/src", None, timeout)
    assert seen[0] is threading.current_thread(), seen
    assert seen[1] is not threading.current_thread(), seen
