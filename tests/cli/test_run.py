"""`pyhpc run` end to end: a real container from the command line, under a real policy file."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containers need root here")
PYHPC = [sys.executable, "-m", "nomad_driver.cli.main", "run"]


def pyhpc_run(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PYHPC, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**AS_ROOT, **(env or {})},
    )


# The test run's own environment, minus what sudo would have set: the caller is root unless a
# test says otherwise.
AS_ROOT = {k: v for k, v in os.environ.items() if k not in ("SUDO_UID", "SUDO_GID", "SUDO_USER")}


def policy(tmp: Path, text: str) -> Path:
    path = tmp / "pyhpc.hcl"
    path.write_text(f'plugin "pyhpc" {{\n  config {{\n{text}\n  }}\n}}\n')
    return path


def test_output_input_and_exit_code_pass_through_with_root_remapped(busybox_image: Path) -> None:
    done = pyhpc_run(
        str(busybox_image),
        "--",
        "sh",
        "-c",
        "read line; echo got $line; cat /proc/self/uid_map; exit 7",
        stdin="hello\n",
    )
    assert done.returncode == 7, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "got hello"
    assert lines[1].split() == ["0", "100000", "65536"]


def test_user_under_sudo_is_mapped_to_itself(busybox_image: Path) -> None:
    done = pyhpc_run(str(busybox_image), "--", "id", env={"SUDO_UID": "1234", "SUDO_GID": "100"})
    assert done.stdout.startswith("uid=1234 gid=100"), done.stdout + done.stderr
    root = pyhpc_run("--root", str(busybox_image), "--", "id", env={"SUDO_UID": "1234"})
    assert root.stdout.startswith("uid=0(root)"), root.stdout


def test_the_policy_file_is_obeyed_and_its_changes_seen(
    tmp_path: Path, busybox_image: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("shared\n")
    config = policy(tmp_path, "    mount_dirs = []")
    refused = pyhpc_run(
        "--config", str(config), "--mount", f"{data}:/data", str(busybox_image), "true"
    )
    assert refused.returncode == 125
    assert f"mounts: '{data}' is outside the plugin's mount_dirs []" in refused.stderr
    time.sleep(0.01)  # a new mtime even on coarse clocks
    config = policy(tmp_path, f'    mount_dirs = ["{tmp_path}"]')
    allowed = pyhpc_run(
        "--config", str(config), "--mount", f"{data}:/data:ro", str(busybox_image), "cat", "/data/f"
    )
    assert (allowed.returncode, allowed.stdout) == (0, "shared\n"), allowed.stderr


def test_bad_options_are_refused_naming_them(tmp_path: Path, busybox_image: Path) -> None:
    for args, message in (
        (["--cap-add", "SYS_ADMIN"], "cap_add: SYS_ADMIN not in the plugin's allow_caps"),
        (["--cap-add", "FLY"], "unknown capabilities ['FLY']"),
        (["--seccomp", "unconfined"], "allow_unconfined_seccomp is false"),
        (["--env", "BAD KEY=1"], "--env: 'BAD KEY=1' is not NAME=VALUE or NAME"),
    ):
        done = pyhpc_run(*args, str(busybox_image), "true")
        assert done.returncode == 125 and message in done.stderr, (args, done.stderr)
    bad = pyhpc_run(str(busybox_image.parent / "missing.sqsh"), "true")
    assert bad.returncode == 125 and "no such file" in bad.stderr


def test_seccomp_profile_outside_the_policys_dirs_is_refused_and_one_inside_applies(
    tmp_path: Path, busybox_image: Path
) -> None:
    tenant = tmp_path / "tenant.json"
    tenant.write_text('{"defaultAction": "SCMP_ACT_ALLOW"}')
    os.chown(tenant, 1000, 1000)
    admin = tmp_path / "profiles"
    admin.mkdir(mode=0o755)
    rule = {"names": ["chmod", "fchmodat", "fchmodat2"], "action": "SCMP_ACT_ERRNO"}
    (admin / "no-chmod.json").write_text(
        json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [rule]})
    )
    config = policy(tmp_path, f'    seccomp_profile_dirs = ["{admin}"]')
    refused = pyhpc_run(
        "--config", str(config), "--seccomp", str(tenant), str(busybox_image), "true"
    )
    assert refused.returncode == 125
    assert "is not a profile in the plugin's seccomp_profile_dirs" in refused.stderr
    script = "chmod 700 /tmp && echo changed"
    applied = pyhpc_run(
        "--config", str(config), "--seccomp", "no-chmod", str(busybox_image), "sh", "-c", script
    )
    assert applied.returncode != 0 and "Operation not permitted" in applied.stderr, applied
    control = pyhpc_run("--config", str(config), str(busybox_image), "sh", "-c", script)
    assert (control.returncode, control.stdout) == (0, "changed\n"), control.stderr


def test_a_signal_to_pyhpc_run_reaches_the_command(busybox_image: Path) -> None:
    proc = subprocess.Popen(
        [
            *PYHPC,
            str(busybox_image),
            "--",
            "sh",
            "-c",
            "trap 'echo term; exit 3' TERM; echo up; while true; do sleep 0.1; done",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "up\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 3
    assert proc.stdout.read() == "term\n"


def test_gpus_on_a_node_without_any_are_refused_clearly(busybox_image: Path) -> None:
    pytest.importorskip("pynvml")
    from nomad_driver.device import nvml

    if nvml.probe()[0]:
        pytest.skip("this node has GPUs: scripts/gpu-check.sh covers it")
    done = pyhpc_run("--gpus", "all", str(busybox_image), "true")
    assert done.returncode == 125
    assert "--gpus all: no NVIDIA GPU on this node" in done.stderr


SUDO_1000 = {"SUDO_UID": "1000", "SUDO_GID": "1000", "SUDO_USER": "someone"}


def test_a_sudo_caller_cannot_choose_the_policy_a_layer_dir_or_another_user(
    tmp_path: Path, busybox_image: Path
) -> None:
    hostile = policy(tmp_path, '    user_namespace = false\n    mount_dirs = ["/"]')
    layer = tmp_path / "layer"
    for args, named in (
        (["--config", str(hostile), "--mount", "/:/host"], f"--config {hostile}: "),
        (["--writable", "disk", "--layer-dir", str(layer)], f"--layer-dir {layer}: "),
        (["--user", "0"], "--user 0: "),
        (["--user", "root"], "--user root: "),
        (["--user", "1001"], "--user 1001: "),
        (["--user", "1000:0"], "--user 1000:0: "),
    ):
        done = pyhpc_run(*args, str(busybox_image), "id", env=SUDO_1000)
        assert done.returncode == 125, (args, done.stdout, done.stderr)
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"pyhpc run: {named}"), (args, lines)
        assert done.stdout == "" and not layer.exists()
    # Control: real root may use the same hostile file, and it does take effect.
    as_root = pyhpc_run("--config", str(hostile), str(busybox_image), "cat", "/proc/self/uid_map")
    assert as_root.returncode == 0, as_root.stderr
    assert as_root.stdout.split() == ["0", "0", "4294967295"]  # no user namespace: host root


def test_a_sudo_caller_runs_as_itself_under_the_system_policy(busybox_image: Path) -> None:
    own = pyhpc_run(str(busybox_image), "--", "sh", "-c", "id -u; id -g", env=SUDO_1000)
    assert (own.returncode, own.stdout) == (0, "1000\n1000\n"), own.stderr
    named = pyhpc_run("--user", "1000:1000", str(busybox_image), "id", "-u", env=SUDO_1000)
    assert (named.returncode, named.stdout) == (0, "1000\n"), named.stderr
    root = pyhpc_run("--root", str(busybox_image), "cat", "/proc/self/uid_map", env=SUDO_1000)
    assert root.returncode == 0 and root.stdout.split() == ["0", "100000", "65536"], root.stderr


def test_a_dir_source_imports_and_runs_but_cannot_climb_out(
    tmp_path: Path, busybox_image: Path
) -> None:
    os.chmod(tmp_path, 0o755)
    allowed = tmp_path / "srv"
    allowed.mkdir(mode=0o755)
    rootfs = allowed / "rootfs"
    subprocess.run(["unsquashfs", "-q", "-n", "-d", str(rootfs), str(busybox_image)], check=True)
    os.chmod(rootfs, 0o755)  # mktemp made the image root 0700: not every user could read it
    (rootfs / "etc" / "motd").write_text("from a dir source\n")
    os.chmod(rootfs / "etc" / "motd", 0o644)
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    (secret / "shadow").write_text("root:secret-hash\n")
    os.chmod(secret / "shadow", 0o600)
    config = policy(
        tmp_path, f'    image_sources = ["dir:{allowed}/"]\n    store_dir = "{tmp_path}/store"'
    )
    climbing = pyhpc_run("--config", str(config), f"dir:{allowed}/../secret", "cat", "/shadow")
    assert climbing.returncode == 125 and "'..' component is not accepted" in climbing.stderr
    ran = pyhpc_run("--config", str(config), f"dir:{rootfs}", "cat", "/etc/motd")
    assert (ran.returncode, ran.stdout) == (0, "from a dir source\n"), ran.stderr


def test_a_policy_cache_entry_is_believed_only_from_a_root_owned_private_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from nomad_driver.cli import run
    from nomad_driver.util.digest import unchanged_key

    config = policy(tmp_path, "    user_namespace = true")
    cache = tmp_path / "cache"
    monkeypatch.setattr(run, "POLICY_CACHE", str(cache))
    assert run.load_policy(str(config)).user_namespace  # parsed, and now cached
    entry = cache / unchanged_key(config.stat()).replace(":", "-")
    forged = json.loads(entry.read_text())
    forged["options"]["user_namespace"] = False
    entry.write_text(json.dumps(forged))
    assert not run.load_policy(str(config)).user_namespace  # control: the cache is read
    os.chown(cache, 1000, 1000)  # a user's directory (planted, or made writable for them)
    assert run.load_policy(str(config)).user_namespace
    os.chown(cache, 0, 0)
    os.chmod(cache, 0o777)
    assert run.load_policy(str(config)).user_namespace
    os.chmod(cache, 0o700)
    os.chown(entry, 1000, 1000)  # an entry someone else wrote
    assert run.load_policy(str(config)).user_namespace


def test_a_sudo_caller_learns_nothing_of_root_only_paths(busybox_image: Path) -> None:
    # Found by the red team (F5): `pyhpc run` asked, as root, whether IMAGE exists.
    sudo = {"SUDO_UID": "1000", "SUDO_GID": "1000"}
    there = pyhpc_run("../../../../../../root/.bashrc", "true", env=sudo)
    absent = pyhpc_run("../../../../../../root/no-such-file", "true", env=sudo)
    assert there.returncode == absent.returncode == 125
    assert there.stderr.replace(".bashrc", "X") == absent.stderr.replace("no-such-file", "X")
    assert "outside the plugin's image_dirs" in there.stderr


def test_the_callers_cgroup_limits_bound_the_container(busybox_image: Path) -> None:
    """Under Slurm (or any session with limits) `pyhpc run`, root through sudo, must not leave
    the caller's cgroup for one of its own: a job limited to 64 MiB keeps the container to it."""
    import uuid

    from nomad_driver.runtime.cgroups import Cgroup, Limits

    job = Cgroup(f"t-slurm-job-{uuid.uuid4().hex[:8]}")
    job.create(Limits(memory_bytes=64 << 20, memory_max_bytes=64 << 20))

    def in_job(script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*PYHPC, str(busybox_image), "/bin/sh", "-c", script],
            capture_output=True, text=True, timeout=60, env=AS_ROOT, preexec_fn=job.join,
        )  # fmt: skip

    try:
        hold = "x=$(head -c {} /dev/zero | tr '\\0' a); echo held"
        small = in_job(hold.format(16 << 20) + "; cat /proc/self/cgroup")
        assert small.returncode == 0 and "held" in small.stdout, small.stderr  # the control
        assert all(line.endswith(":/") for line in small.stdout.split("held\n")[1].split())
        big = in_job(hold.format(256 << 20))
        assert big.returncode != 0 and "held" not in big.stdout, big.stdout + big.stderr
        print(big.returncode, big.stderr)
        assert big.returncode == 137 or "OOM" in big.stderr, big.stderr
    finally:
        job.kill()
        job.remove()


def test_a_run_killed_outright_is_cleared_by_the_next(busybox_image: Path) -> None:
    """kill -9 of `pyhpc run` (or the OOM killer taking it in a full job) leaves its cgroups
    nested in the caller's, its run directory and its image reference; once its container has
    ended, the next `pyhpc run` on the node clears them (else a Slurm job's cgroup could not be
    removed, and the image's mount stays pinned)."""
    import json
    import signal
    import time

    proc = subprocess.Popen(
        [*PYHPC, str(busybox_image), "/bin/sleep", "1"],
        env=AS_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    tasks = Path("/run/pyhpc/runs")  # the default run_dir's; the test policy keeps it
    deadline = time.monotonic() + 20
    run_dir = None
    while run_dir is None:
        found = list(tasks.glob(f"run-{proc.pid}-*"))
        if found and (found[0] / "cgroups.json").exists():
            run_dir = found[0]
        assert time.monotonic() < deadline, "the run never made its cgroups"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # A process that takes the dead run's pid at once (a tenant can make one land there: red
    # team) does not keep its leftovers: it is not the process that made the run.
    taken = fork_at(proc.pid)
    assert taken is not None, f"pid {proc.pid} could not be taken again"
    made = json.loads((run_dir / "cgroups.json").read_text())
    assert made and run_dir.exists()
    time.sleep(2)  # the container's sleep ends; its cgroups are empty, still there
    assert all(Path(p).is_dir() for p in made)  # the control: the kill left them
    # A Nomad task named run-99999 has a run directory that looks like a dead run's (red
    # team): the driver's live tasks/ is never cleared by `pyhpc run`.
    nomad_task = Path("/run/pyhpc/tasks/run-99999-1a20adf0167e723c")
    nomad_task.mkdir(parents=True, exist_ok=True)
    try:
        assert pyhpc_run(str(busybox_image), "/bin/true").returncode == 0
        assert nomad_task.is_dir()
    finally:
        nomad_task.rmdir()
        os.kill(taken[0], signal.SIGKILL)
        os.waitpid(taken[0], 0)
        os.close(taken[1])
    assert not run_dir.exists()  # the control: the dead run's own directory was cleared
    assert not any(Path(p).exists() for p in made)


def test_a_caller_whose_cgroup_cannot_be_told_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail closed: a hierarchy missing from /proc/self/cgroup (or with `..`, as a cgroup
    namespace shows it) must not put the container at the hierarchy's root."""
    from nomad_driver.runtime import cgroups
    from nomad_driver.runtime.cgroups import CALLER, Cgroup, CgroupError, Limits

    real = cgroups._own_cgroups()
    assert Cgroup("x", Limits(cgroup_parent=CALLER)).caller == real  # the control
    monkeypatch.setattr(
        cgroups, "_own_cgroups", lambda: {k: v for k, v in real.items() if k != "memory"}
    )
    if cgroups.version() == 2:
        monkeypatch.setattr(cgroups, "_own_cgroups", lambda: {})
    with pytest.raises(CgroupError, match="cannot tell the caller's own cgroup"):
        Cgroup("x", Limits(cgroup_parent=CALLER))


def test_env_and_env_file_take_values_and_pass_names_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As Docker: K=V sets, a bare K passes the caller's value (srun's SLURM_* and PMIx
    variables), files first, --env last; a malformed line is named with its file and line."""
    from nomad_driver.cli.run import environment

    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    env_file = tmp_path / "job.env"
    env_file.write_text("# the job's settings\nOMP_NUM_THREADS=4\n\nSLURM_PROCID\nMODE=file\n")
    got = environment(["MODE=flag", "NOT_SET_HERE", "EMPTY="], [str(env_file)])
    assert got == {"OMP_NUM_THREADS": "4", "SLURM_PROCID": "3", "MODE": "flag", "EMPTY": ""}
    env_file.write_text("GOOD=1\nbad key=2\n")
    with pytest.raises(ValueError, match=r"--env-file .*job.env:2: 'bad key=2'"):
        environment([], [str(env_file)])
    with pytest.raises(ValueError, match="--env-file .*missing.env: No such file"):
        environment([], [str(tmp_path / "missing.env")])


def test_a_passed_through_variable_reaches_the_command(busybox_image: Path) -> None:
    done = pyhpc_run(
        "--env", "SLURM_PROCID", str(busybox_image), "/bin/sh", "-c", "echo rank=$SLURM_PROCID",
        env={"SLURM_PROCID": "7"},
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "rank=7", done.stderr


def test_a_dataset_mounts_read_only_and_one_outside_image_dirs_is_refused(
    tmp_path: Path, busybox_image: Path
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "facts.txt").write_text("dataset-facts\n")
    dataset = busybox_image.parent / f"test-dataset-{os.getpid()}.sqsh"
    subprocess.run(
        ["mksquashfs", str(tree), str(dataset), "-quiet", "-all-root", "-noappend"], check=True
    )
    dataset.chmod(0o644)
    try:
        script = "cat /data/facts.txt; touch /data/x 2>/dev/null && echo WRITABLE; true"
        done = pyhpc_run(f"--dataset={dataset}:/data", str(busybox_image), "--", "sh", "-c", script)
        assert (done.returncode, done.stdout) == (0, "dataset-facts\n"), done.stderr
        outside = tmp_path / "elsewhere.sqsh"
        shutil.copyfile(dataset, outside)
        done = pyhpc_run(f"--dataset={outside}:/data", str(busybox_image), "--", "true")
        assert done.returncode != 0
        assert done.stderr.strip().splitlines() == [
            f"pyhpc run: option 'datasets' = '{outside}' is outside the plugin's image_dirs "
            "['/var/lib/pyhpc/images']"
        ]
    finally:
        dataset.unlink()


def test_save_turns_what_the_command_changed_into_an_image_written_as_the_caller(
    tmp_path: Path, busybox_image: Path
) -> None:
    saved = tmp_path / "saved.sqsh"
    script = (
        "echo made-here > /made.txt; rm /bin/true; mkdir -p /opt/d; chown 5:6 /opt/d; "
        "ln -s /made.txt /opt/link"
    )
    done = pyhpc_run("--save", str(saved), str(busybox_image), "--", "sh", "-c", script)
    assert done.returncode == 0, done.stderr
    assert f"saved the container as {saved}" in done.stderr
    assert saved.stat().st_uid == 0 and saved.stat().st_mode & 0o777 == 0o644
    listing = subprocess.run(
        ["unsquashfs", "-lln", str(saved)], capture_output=True, text=True, check=True
    ).stdout
    lines = {line.split()[-1] if "->" not in line else line.split()[-3]: line
             for line in listing.splitlines() if "squashfs-root" in line}  # fmt: skip
    assert "squashfs-root/made.txt" in lines and "squashfs-root/bin/true" not in lines
    assert "squashfs-root/bin/sh" in lines  # the image is all there under the change
    assert lines["squashfs-root/opt/d"].split()[1] == "5/6"  # the container's ids, not host's
    assert lines["squashfs-root/made.txt"].split()[1] == "0/0"
    assert "-> /made.txt" in lines["squashfs-root/opt/link"]
    # Saved again over it: refused before anything runs; a sudo caller writes as itself.
    again = pyhpc_run("--save", str(saved), str(busybox_image), "--", "true")
    assert again.returncode != 0 and "the file exists" in again.stderr
    public = Path(tempfile.mkdtemp(prefix="pyhpc-save-"))  # /tmp: searchable by uid 1000
    try:
        public.chmod(0o755)
        mine = public / "mine"
        mine.mkdir()
        os.chown(mine, 1000, 100)
        as_user = {"SUDO_UID": "1000", "SUDO_GID": "100"}
        out = mine / "u.sqsh"
        done = pyhpc_run("--save", str(out), str(busybox_image), "--", "true", env=as_user)
        assert done.returncode == 0, done.stderr
        assert (out.stat().st_uid, out.stat().st_gid) == (1000, 100)
        # A directory the caller may not write, and a symlink it planted: root writes neither.
        (mine / "planted.sqsh").symlink_to(public / "root-only")
        for dest in (public / "x.sqsh", mine / "planted.sqsh"):
            done = pyhpc_run("--save", str(dest), str(busybox_image), "--", "true", env=as_user)
            assert done.returncode != 0, dest
        assert not (public / "x.sqsh").exists() and not (public / "root-only").exists()
    finally:
        shutil.rmtree(public)


def test_a_sudo_caller_cannot_read_root_only_files_through_env_file(busybox_image: Path) -> None:
    """The attack: --env-file names a file only root may read; its lines would come back in
    the refusal (a malformed line is quoted) or in the container's environment. The file is
    read as the caller, so the kernel says no. The control: a file the caller may read."""
    secret_dir = Path(tempfile.mkdtemp(prefix="pyhpc-envfile-"))
    try:
        secret_dir.chmod(0o755)
        shadow_like = secret_dir / "root-only.env"
        shadow_like.write_text("root:$6$hash-of-root:19000:0:99999\nDB_PASSWORD=hunter2-root\n")
        shadow_like.chmod(0o600)
        as_user = {"SUDO_UID": "1000", "SUDO_GID": "100"}
        done = pyhpc_run(f"--env-file={shadow_like}", str(busybox_image), "--", "env",
                         env=as_user)  # fmt: skip
        assert done.returncode != 0
        assert "hash-of-root" not in done.stderr + done.stdout
        assert "hunter2" not in done.stderr + done.stdout
        assert f"--env-file {shadow_like}: Permission denied" in done.stderr
        fifo = secret_dir / "fifo.env"
        os.mkfifo(fifo)
        fifo.chmod(0o666)
        done = pyhpc_run(f"--env-file={fifo}", str(busybox_image), "--", "true", env=as_user)
        assert done.returncode != 0 and "not a regular file" in done.stderr  # and no hang
        readable = secret_dir / "mine.env"
        readable.write_text("MODE=user\n")
        readable.chmod(0o644)
        done = pyhpc_run(f"--env-file={readable}", str(busybox_image), "--", "sh", "-c",
                         "echo $MODE", env=as_user)  # fmt: skip
        assert (done.returncode, done.stdout) == (0, "user\n"), done.stderr
    finally:
        shutil.rmtree(secret_dir)


def test_provenance_records_the_run_and_replay_reruns_it_until_the_image_changes(
    tmp_path: Path, busybox_image: Path
) -> None:
    image = busybox_image.parent / f"test-replay-{os.getpid()}.sqsh"
    shutil.copyfile(busybox_image, image)
    image.chmod(0o644)
    record = tmp_path / "run.provenance.json"
    script = "echo $GREETING $API_TOKEN; md5sum /bin/busybox | cut -c1-8"
    try:
        first = pyhpc_run(
            "--provenance", str(record), "--env", "GREETING=hello", "--env", "API_TOKEN=s3cr3t",
            str(image), "--", "sh", "-c", script,
        )  # fmt: skip
        assert first.returncode == 0, first.stderr
        data = json.loads(record.read_text())
        assert data["format"] == "pyhpc.provenance/v1"
        assert data["image"]["reference"] == str(image)
        assert data["image"]["digest"].startswith("sha256:")
        assert data["command"] == ["sh", "-c", script]
        assert data["env"]["GREETING"] == "hello"  # given on the command line: the caller's
        assert "API_TOKEN" not in data["env"] and "API_TOKEN" in data["env_withheld"]
        assert "s3cr3t" not in record.read_text()
        assert data["exit"]["code"] == 0 and data["ended_at"] >= data["started_at"]
        for field in ("pyhpc", "kernel", "cpu_model", "gpu"):
            assert field in data["host"], field
        # A redacted secret must come from the caller again; then the same output.
        refused = pyhpc_run("--replay", str(record))
        assert refused.returncode != 0 and "set API_TOKEN (or give" in refused.stderr
        again = pyhpc_run("--replay", str(record), env={"API_TOKEN": "s3cr3t"})
        assert (again.returncode, again.stdout) == (0, first.stdout), again.stderr
        # The image changes under the same path: refused, unless forced.
        changed = pyhpc_run("--save", str(tmp_path / "changed.sqsh"), str(image), "--", "true")
        assert changed.returncode == 0, changed.stderr
        shutil.copyfile(tmp_path / "changed.sqsh", image)
        again = pyhpc_run("--replay", str(record), env={"API_TOKEN": "s3cr3t"})
        assert again.returncode != 0
        assert "the image changed: recorded sha256:" in again.stderr
        forced = pyhpc_run("--replay", str(record), "--force", env={"API_TOKEN": "s3cr3t"})
        assert forced.returncode == 0 and "WARNING: the image changed" in forced.stderr
    finally:
        image.unlink(missing_ok=True)


def own_cgroups() -> list[Path]:
    """This process's cgroup directory in every hierarchy (v1 and v2)."""
    found = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        names = [c.removeprefix("name=") for c in controllers.split(",") if c]
        base = Path("/sys/fs/cgroup", names[0] if names else "")
        if controllers == "" and not (base / "cgroup.controllers").exists():
            continue
        found.append(base / path.lstrip("/"))
    return [p for p in found if p.is_dir()]


def leftovers(run_dir: Path, image: Path) -> list[str]:
    """What a `pyhpc run` leaves behind when it is gone: run dirs, mounts under run_dir, loop
    devices of the image, cgroups in the caller's own."""
    left = [str(p) for p in (run_dir / "runs").glob("*")]
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        left += [m for line in f if (m := line.split()[4]).startswith(f"{run_dir}/")]
    loops = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
    left += loops.stdout.splitlines()
    left += [str(p) for cg in own_cgroups() for p in cg.glob("pyhpc-*")]
    return left


def test_a_signal_at_any_point_of_a_start_leaves_nothing_behind(
    tmp_path: Path, busybox_image: Path
) -> None:
    """SIGTERM or SIGINT at 50 random moments from the interpreter's start to the command's
    end: each run ends, with the command's or the signal's status, and nothing of any run is
    left (run dir, mount, loop device, cgroup). The control: the same runs unsignalled."""
    import random

    run_dir = Path(f"/run/pyhpc-signals-{os.getpid()}")
    config = policy(tmp_path, f'    run_dir = "{run_dir}"\n    image_mount_linger = "0"')
    # A copy of its own: any loop device of this file is one of these runs'.
    image = busybox_image.with_name(f"signals-{os.getpid()}.sqsh")
    shutil.copyfile(busybox_image, image)
    os.chmod(image, 0o644)
    argv = [*PYHPC, "--config", str(config), str(image), "sh", "-c", "sleep 0.05"]
    try:
        control = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=AS_ROOT)
        assert control.returncode == 0, control.stderr
        assert leftovers(run_dir, image) == []
        rng = random.Random(20261203)
        statuses = []
        for _ in range(50):
            signum = rng.choice([signal.SIGTERM, signal.SIGINT])
            proc = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=AS_ROOT
            )
            time.sleep(rng.uniform(0, 0.3))
            proc.send_signal(signum)
            _, err = proc.communicate(timeout=30)
            statuses.append(proc.returncode)
            # While Python starts and imports, before any pyhpc function has run, SIGINT
            # ends it Python's way (KeyboardInterrupt); nothing was made yet.
            frames = re.findall(r'File "[^"]*nomad_driver/[^"]*", line \d+, in (\S+)', err)
            starting = proc.returncode in (1, -signum) and "KeyboardInterrupt" in err
            starting = starting and all(f == "<module>" for f in frames)
            assert starting or proc.returncode in (0, 128 + signum, -signum), (signum, err)
            # Python swallows an exception raised in an import-lock callback, saying so: the
            # stop then comes at pyhpc's next check, still with the signal's status.
            swallowed = "Exception ignored in" in err and proc.returncode == 128 + signum
            assert starting or swallowed or "Traceback" not in err, err
            assert leftovers(run_dir, image) == [], (signum, proc.returncode, err)
        # The signals did land at different points: some before the command, some after.
        assert len(set(statuses)) >= 2, statuses
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        image.unlink()


def fork_at(pid: int, tries: int = 50) -> tuple[int, int] | None:
    """A child of this process with exactly that pid (as root: ns_last_pid), recording in a
    pipe each SIGINT or SIGTERM it gets; (pid, the pipe's read end), or None."""
    r, w = os.pipe()
    for _ in range(tries):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        child = os.fork()
        if child == 0:
            try:
                if os.getpid() == pid:

                    def got(signum: int, _frame: object) -> None:
                        os.write(w, b"%d\n" % signum)

                    signal.signal(signal.SIGINT, got)
                    signal.signal(signal.SIGTERM, got)
                    os.write(w, b"ready\n")
                    time.sleep(60)
            finally:
                os._exit(0)
        if child == pid:
            os.close(w)
            assert os.read(r, 6) == b"ready\n"
            return child, r
        os.waitpid(child, 0)
    os.close(r)
    os.close(w)
    return None


def test_once_the_command_ended_no_signal_reaches_a_process_that_took_the_inits_pid(
    tmp_path: Path, busybox_image: Path
) -> None:
    """Red team: while --save built the image after the command, pyhpc run (root) forwarded
    the caller's ^C and a scheduler's SIGTERM to the init's pid, by then anyone's. Here
    another process takes that pid during the save; the signals stop the run and it gets
    none. The control: the same process does get a signal sent to it."""
    import select

    out = tmp_path / "saved.sqsh"
    script = "head -c 150000000 /dev/urandom >/tmp/big"
    proc = subprocess.Popen(
        [*PYHPC, "--save", str(out), str(busybox_image), "--", "sh", "-c", script],
        stderr=subprocess.PIPE, text=True, env=AS_ROOT,
    )  # fmt: skip
    init = 0
    deadline = time.monotonic() + 30
    while not init:
        assert time.monotonic() < deadline, "no container init seen"
        for task in Path(f"/proc/{proc.pid}/task").glob("*"):
            for child in (task / "children").read_text().split():
                status = Path(f"/proc/{child}/status").read_text()
                if re.search(r"^NSpid:\t\d+\t1$", status, re.M):
                    init = int(child)
        time.sleep(0.005)
    while Path(f"/proc/{init}").exists():  # the command runs, then its init is reaped
        assert time.monotonic() < deadline + 60, "the command did not end"
        time.sleep(0.005)
    assert proc.poll() is None, "the save ended before it could be interrupted"
    taken = fork_at(init)
    if taken is None:
        proc.kill()
        pytest.skip(f"pid {init} could not be taken again (another process got it first)")
    victim, pipe = taken
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and "pyhpc run: stopped by SIGINT" in err, err
        assert select.select([pipe], [], [], 0.5)[0] == [], os.read(pipe, 64)
        assert not out.exists()  # no half-written image
        os.kill(victim, signal.SIGINT)  # the control
        assert select.select([pipe], [], [], 5)[0] == [pipe]
        assert os.read(pipe, 64) == b"2\n"
    finally:
        os.kill(victim, signal.SIGKILL)
        os.waitpid(victim, 0)
        os.close(pipe)
