"""A hostile tenant against the start path: each test performs one attack of the security issue
(B1-B3, B7-B9 and the weaker points W2-W4 and W7-W9 in SECURITY.md), the races with a real racing
process and a bounded number of tries, and each runs the benign control beside it, so that a
setup that never worked cannot pass as "held"."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nomad_driver.driver import config, policy
from nomad_driver.runtime import client
from nomad_driver.runtime.client import StartError
from nomad_driver.runtime.container import ContainerError
from nomad_driver.runtime.imagefile import ImageFile
from nomad_driver.runtime.imagemount import SharedImages
from nomad_driver.runtime.security import PolicyError
from nomad_driver.runtime.spec import BindMount
from nomad_driver.signing.verify import mode_for
from nomad_driver.util.digest import fd_digest, sha256_file
from nomad_driver.wire import schema
from tests.runtime.racer import racing
from tests.runtime.test_supervisor import make_spec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containers need root here")
TRIES = 50
TENANT = 1000


def tries(*counts: list[int]) -> Iterator[int]:
    """TRIES attempts, and more (up to 4x) until every outcome counted in counts was seen
    once: on a loaded 2-core machine the racer's timing varies, the verdict must not."""
    for i in range(4 * TRIES):
        if i >= TRIES and all(c[0] for c in counts):
            return
        yield i


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A scratch directory the tenant (uid 1000, the racer) can reach: pytest's own sits in a
    directory only root may enter."""
    where = Path(tempfile.mkdtemp(prefix="pyhpc-t-", dir="/tmp"))
    where.chmod(0o755)
    yield where
    shutil.rmtree(where, ignore_errors=True)


def plugin(tmp: Path, **options: object) -> config.PluginConfig:
    base = {"image_dirs": [str(tmp / "images")], "store_dir": str(tmp / "store")}
    return schema.load(config.PluginConfig, {**base, **options}, "test")


def tenant_dir(path: Path, uid: int = TENANT) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    path.chmod(0o755)
    return path


def marked(tmp: Path, base: Path, marker: str) -> Path:
    """The busybox image with /marker holding `marker`: which image ran is then visible."""
    root = tmp / f"root-{marker}"
    subprocess.run(["unsquashfs", "-q", "-d", str(root), str(base)], check=True)
    (root / "marker").write_text(marker)
    out = tmp / f"{marker}.sqsh"
    subprocess.run(
        ["mksquashfs", str(root), str(out), "-noappend", "-quiet", "-all-root"], check=True
    )
    shutil.rmtree(root)
    out.chmod(0o644)
    return out


def run(tmp: Path, opened: ImageFile | None, script: str, name: str, **overrides: object) -> str:
    """Start a container running script from the opened image (None: overrides["image"], a
    trusted path), wait for it, and return its stdout."""
    path = opened.path if opened else str(overrides.pop("image"))
    spec = make_spec(tmp, Path(path), "/bin/sh", "-c", script)
    spec = spec._replace(images_dir=str(tmp / "mounts"), **overrides)
    (tmp / "out").write_text("")
    started = client.start(spec, str(tmp / f"run-{name}"), image=opened)
    client.wait(started.run_dir)
    client.remove(started.run_dir)
    return (tmp / "out").read_text()


# B1: a tenant's writable copy of the victim's image must never back the victim's task.
def test_b1_a_tenants_writable_copy_never_backs_another_tasks_image(
    tmp_path: Path, busybox_image: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    victim = images / "victim.sqsh"
    shutil.move(marked(tmp_path, busybox_image, "victim"), victim)
    evil = marked(tmp_path, busybox_image, "evil")
    copy = tenant_dir(images / "tenant") / "copy.sqsh"
    shutil.copyfile(victim, copy)
    os.chown(copy, TENANT, TENANT)

    # Control: the victim's image runs as itself.
    opened = policy.open_image(plugin(tmp_path), str(victim))
    assert run(tmp_path, opened, "cat /marker", "control") == "victim"
    opened.close()
    # The tenant's copy (same digest, its own writable file) is refused by default...
    with pytest.raises(PolicyError, match=f"can be changed by uid {TENANT}"):
        policy.open_image(plugin(tmp_path), str(copy))
    # ...and the runtime refuses to mount such a file whoever asks.
    fd = os.open(copy, os.O_RDONLY)
    with pytest.raises(ContainerError, match="only images owned by root"):
        SharedImages(str(tmp_path / "mounts")).acquire(ImageFile(fd, str(copy), os.fstat(fd)), "x")
    os.close(fd)
    # With untrusted_images = "copy" the tenant's task runs from a root-owned copy in the store,
    # and holds the shared mount of the digest while the tenant rewrites its file in place.
    copying = plugin(tmp_path, untrusted_images="copy")
    held = policy.open_image(copying, str(copy))
    assert held.path.startswith(str(tmp_path / "store")) and held.trusted
    spec = make_spec(tmp_path, Path(held.path), "/bin/sleep", "30")
    spec = spec._replace(images_dir=str(tmp_path / "mounts"))
    holder = client.start(spec, str(tmp_path / "run-holder"), image=held)
    try:
        with open(copy, "r+b") as f:  # the tenant's in-place rewrite
            f.write(evil.read_bytes())
        for attempt in range(3):
            opened = policy.open_image(plugin(tmp_path), str(victim))
            assert run(tmp_path, opened, "cat /marker", f"victim-{attempt}") == "victim"
            opened.close()
    finally:
        client.send_signal(holder.run_dir, 9)
        client.wait(holder.run_dir)
        held.close()


# B2 (a): the digest that is checked is the digest that is mounted, while a racing tenant
# renames another (root-owned, validly built) image over the path.
def test_b2_the_checked_digest_is_the_mounted_one_under_a_rename_race(
    tmp_path: Path, busybox_image: Path
) -> None:
    images = tmp_path / "images"
    tenant = tenant_dir(images / "tenant")
    first, second = tenant / "x.sqsh", tenant / "y.sqsh"
    shutil.move(marked(tmp_path, busybox_image, "good"), first)
    shutil.move(marked(tmp_path, busybox_image, "evil"), second)
    markers = {sha256_file(str(first)): "good", sha256_file(str(second)): "evil"}
    cfg = plugin(tmp_path)
    seen: set[str] = set()
    good, evil = [0], [0]
    with racing(first, second):
        for i in tries(good, evil):
            opened = policy.open_image(cfg, str(first))
            digest = fd_digest(opened.fd, str(tmp_path / "digests"))  # what the signature covers
            ran = run(tmp_path, opened, "cat /marker", str(i))
            opened.close()
            assert ran == markers[digest], f"try {i}: checked {markers[digest]}, ran {ran}"
            seen.add(ran)
            (good if ran == "good" else evil)[0] += 1
    assert seen == {"good", "evil"}, f"the race never swapped the files: {seen}"


# B2 (b): signature rules match the normalised path on whole components.
def test_b2_signature_rules_match_normalised_paths_on_whole_components() -> None:
    rules = ("/img/dev/=off", "/img/prod/=enforce", "docker://r:5000/dev/=off")
    assert mode_for("/img/prod/x.sqsh", "enforce", rules) == "enforce"
    assert mode_for("/img/dev/x.sqsh", "enforce", rules) == "off"  # control: the rule works
    assert mode_for("/img/dev/../prod/x.sqsh", "enforce", rules) == "enforce"
    assert mode_for("/img//prod/x.sqsh", "enforce", rules) == "enforce"
    assert mode_for("/img/dev2/x.sqsh", "enforce", ("/img/dev=off",)) == "enforce"
    assert mode_for("/img/dev/x.sqsh", "enforce", ("/img/dev=off",)) == "off"


def test_b2_the_path_a_rule_sees_is_the_opened_files_real_path(
    tmp_path: Path, busybox_image: Path
) -> None:
    images = tmp_path / "images"
    (images / "prod").mkdir(parents=True)
    (images / "dev").mkdir()
    shutil.copyfile(busybox_image, images / "prod" / "x.sqsh")
    image = policy.resolve_image(plugin(tmp_path), f"{images}/dev/../prod/x.sqsh")
    assert image.reference == f"{images}/prod/x.sqsh"
    assert image.file is not None
    image.file.close()


# B2 (c): `pyhpc run` applies signature_mode as the driver does.
def test_b2_pyhpc_run_enforces_signatures(tmp_path: Path, busybox_image: Path) -> None:
    import sys

    images = tmp_path / "images"
    images.mkdir()
    shutil.copyfile(busybox_image, images / "unsigned.sqsh")
    results = {}
    for mode in ("enforce", "off"):
        conf = tmp_path / f"{mode}.hcl"
        conf.write_text(
            f'plugin "pyhpc" {{\n  config {{\n    image_dirs = ["{images}"]\n'
            f'    signature_mode = "{mode}"\n    signature_keys = ["images"]\n'
            '    vault_address = "http://127.0.0.1:1"\n  }\n}\n'
        )
        results[mode] = subprocess.run(
            [sys.executable, "-m", "nomad_driver.cli.main", "run", "--config", str(conf)]
            + [str(images / "unsigned.sqsh"), "--", "echo", "ran"],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if k != "SUDO_UID"},
        )
    assert results["off"].stdout == "ran\n", results["off"].stderr  # control
    enforced = results["enforce"]
    assert enforced.returncode == 125 and enforced.stdout == ""
    assert "signature check failed (signature_mode enforce)" in enforced.stderr
    assert "is not signed" in enforced.stderr and "Traceback" not in enforced.stderr


# B3: a bind source swapped for a symlink to a host directory between check and mount.
def test_b3_a_bind_source_swapped_for_a_symlink_never_mounts_the_target(
    tmp_path: Path, busybox_image: Path
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    tenant = tenant_dir(scratch / "t")
    data = tenant_dir(tenant / "data")
    (data / "benign").write_text("ok")
    secret = tmp_path / "host-secret"
    secret.mkdir(mode=0o700)
    (secret / "SECRET").write_text("host")
    link = tenant / "link"
    link.symlink_to(secret)
    os.chown(link, TENANT, TENANT, follow_symlinks=False)
    image = policy.open_image(plugin(tmp_path, image_dirs=[str(busybox_image.parent)]),
                              str(busybox_image))  # fmt: skip
    benign, refused = [0], [0]
    with racing(data, link):
        for i in tries(benign, refused):
            try:
                binds = policy.allowed_binds(
                    (f"{data}:/data",), (str(scratch),), "mounts", "mount_dirs"
                )
                out = run(tmp_path, image, "ls /data", str(i), mounts=tuple(binds))
            except (PolicyError, StartError) as err:
                assert "symlink" in str(err), err
                refused[0] += 1
                continue
            assert "SECRET" not in out, f"try {i}: the host directory was mounted"
            benign[0] += "benign" in out
            assert "benign" in out or out == "", out
    image.close()
    assert benign[0] > 0, f"no start ever ran: the setup is broken ({refused} refused)"
    assert refused[0] > 0, "the racer never won a check: the race did not run"


# B7: a task's bind over /etc/hosts must not make root write (or chown) the bound file.
def test_b7_a_file_bound_over_etc_hosts_is_never_written_or_taken(
    tmp_path: Path, busybox_image: Path
) -> None:
    scratch = tmp_path / "scratch"
    victim = tenant_dir(scratch / "victim", 1001) / "private"
    victim.write_text("private")
    os.chown(victim, 1001, 1001)
    victim.chmod(0o600)
    control = run(tmp_path, None, "cat /etc/hosts", "control", image=str(busybox_image))
    assert control == Path("/etc/hosts").read_text()
    binds = policy.allowed_binds((f"{victim}:/etc/hosts",), (str(scratch),), "mounts", "x")
    run(tmp_path, None, "true", "attack", image=str(busybox_image), mounts=tuple(binds))
    st = victim.stat()
    assert (victim.read_text(), st.st_uid, st.st_mode & 0o777) == ("private", 1001, 0o600)


# B8: a mount target under a tenant's directory swapped for a symlink to a host directory.
def test_b8_a_mount_target_swapped_for_a_symlink_creates_nothing_on_the_host(
    tmp_path: Path, busybox_image: Path
) -> None:
    scratch = tmp_path / "scratch"
    tenant = tenant_dir(scratch / "t")
    outer = tenant_dir(tenant / "outer")
    sub = tenant_dir(outer / "sub")
    inner = tenant_dir(tenant / "inner")
    (inner / "benign").write_text("ok")
    host = tmp_path / "host-etc"
    host.mkdir()
    evil = outer / "evil"
    evil.symlink_to(host)
    os.chown(evil, TENANT, TENANT, follow_symlinks=False)
    binds = tuple(
        policy.allowed_binds(
            (f"{outer}:/data", f"{inner}:/data/sub/x"), (str(scratch),), "mounts", "mount_dirs"
        )
    )
    benign, refused = [0], [0]
    with racing(sub, evil):
        for i in tries(benign, refused):
            try:
                out = run(tmp_path, None, "ls /data/sub/x", str(i), image=str(busybox_image),
                          mounts=binds)  # fmt: skip
            except StartError as err:
                assert "symlink" in str(err), err
                refused[0] += 1
                continue
            benign[0] += "benign" in out
    assert list(host.iterdir()) == [], "root created a mount target on the host"
    assert benign[0] > 0, "no start ever ran: the setup is broken"
    assert refused[0] > 0, "the racer never won a check: the race did not run"


# B9: the plugin must not lend a task an image its user cannot read, nor say what is there.
@pytest.mark.parametrize(
    ("mode", "group", "user", "allowed"),
    [
        (0o600, 0, "1000:1000", False),
        (0o600, 0, "", False),  # root, remapped to an unprivileged host uid
        (0o640, 1000, "1000:1000", True),
        (0o644, 0, "1000:1000", True),
        (0o644, 0, "", True),
    ],
)
def test_b9_a_private_image_runs_only_for_a_user_who_can_read_it(
    tmp_path: Path, busybox_image: Path, mode: int, group: int, user: str, allowed: bool
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    image = images / "private.sqsh"
    shutil.copyfile(busybox_image, image)
    os.chown(image, 0, group)
    image.chmod(mode)
    cfg = plugin(tmp_path)
    reader = policy.image_reader(cfg, user)
    if not allowed:
        with pytest.raises(PolicyError, match="may not read it"):
            policy.open_image(cfg, str(image), reader)
        return
    opened = policy.open_image(cfg, str(image), reader)
    try:
        out = run(tmp_path, opened, "echo ran", "ok", user=user, userns=(100000, 65536))
        assert out == "ran\n"
    finally:
        opened.close()


def test_b9_another_users_private_directory_tells_nothing_and_runs_nothing(
    tmp_path: Path, busybox_image: Path
) -> None:
    private = tmp_path / "images" / "alice"
    tenant_dir(private, 1001).chmod(0o700)
    shutil.copyfile(busybox_image, private / "x.sqsh")
    (private / "notes.txt").write_text("not an image")
    cfg = plugin(tmp_path)
    refusals = set()
    for name in ("x.sqsh", "missing.sqsh", "notes.txt"):  # exists, does not, is no image
        with pytest.raises(PolicyError, match="may not read it") as err:
            policy.open_image(cfg, str(private / name), (1000, 1000))
        refusals.add(str(err.value).replace(name, "NAME"))
    assert len(refusals) == 1, refusals
    # A name is resolved later, in the image: until then only what everyone may read opens.
    with pytest.raises(PolicyError, match="everyone"):
        policy.open_image(cfg, str(private / "x.sqsh"), policy.image_reader(cfg, "alice"))
    opened = policy.open_image(cfg, str(private / "x.sqsh"), (1001, 1001))  # the control
    try:
        assert run(tmp_path, opened, "echo ran", "alice", user="1001:1001") == "ran\n"
        # The runtime checks again once the user is resolved: opened for alice, run as bob.
        with pytest.raises(StartError, match="may not read it"):
            run(tmp_path, opened, "true", "bob", user="1000:1000")
    finally:
        opened.close()


def test_b9_an_untrusted_image_is_checked_before_it_is_copied(
    tmp_path: Path, busybox_image: Path
) -> None:
    private = tenant_dir(tmp_path / "images" / "alice", 1001)
    private.chmod(0o700)
    image = private / "mine.sqsh"
    shutil.copyfile(busybox_image, image)
    os.chown(image, 1001, 1001)
    image.chmod(0o600)
    cfg = plugin(tmp_path, untrusted_images="copy")
    with pytest.raises(PolicyError, match="may not read it") as err:
        policy.open_image(cfg, str(image), (1000, 1000))
    assert "store" not in str(err.value)
    assert not (tmp_path / "store" / "sha256").exists() or not any(
        (tmp_path / "store" / "sha256").iterdir()
    ), "the refused image was copied into the store"
    with pytest.raises(PolicyError, match="outside the plugin's image_dirs"):
        policy.open_image(cfg, str(tmp_path / "store" / "sha256" / "x.sqsh"), (1000, 1000))
    opened = policy.open_image(cfg, str(image), (1001, 1001))  # the owner: copied and run
    try:
        assert opened.origin == str(image) and opened.path.startswith(str(tmp_path / "store"))
        assert run(tmp_path, opened, "echo ran", "alice", user="1001:1001") == "ran\n"
    finally:
        opened.close()


# W2: read-only binds are read-only all the way down; every bind is nosuid and nodev.
def test_w2_read_only_binds_are_recursive_and_binds_are_nosuid_nodev(
    tmp_path: Path, busybox_image: Path
) -> None:
    scratch = tmp_path / "scratch"
    ro = tenant_dir(scratch / "ro")
    sub = tenant_dir(ro / "sub")
    rw = tenant_dir(scratch / "rw")
    rw.chmod(0o777)  # the control writes here as a root without capabilities
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0777", "tmpfs", str(sub)], check=True)
    try:
        binds = policy.allowed_binds(
            (f"{ro}:/ro:ro", f"{rw}:/rw"), (str(scratch),), "mounts", "mount_dirs"
        )
        out = run(
            tmp_path,
            None,
            "touch /ro/sub/f 2>/dev/null && echo sub-written; touch /rw/f && echo rw-written; "
            "grep -E ' /(ro|rw)(/sub)? ' /proc/self/mountinfo | cut -d' ' -f5,6",
            "w2",
            image=str(busybox_image),
            mounts=tuple(binds),
        )
    finally:
        subprocess.run(["umount", "-l", str(sub)], check=True)
    lines = out.splitlines()
    assert "sub-written" not in lines and "rw-written" in lines, out  # rw: the control
    options = dict(line.split(" ", 1) for line in lines[1:])
    assert set(options) == {"/ro", "/ro/sub", "/rw"}, out
    for where, opts in options.items():
        assert {"nosuid", "nodev"} <= set(opts.split(",")), (where, opts)
        assert ("ro" in opts.split(",")) == where.startswith("/ro"), (where, opts)


# W3: an image whose /etc/passwd is a FIFO must not block the host-root init.
def test_w3_a_fifo_passwd_in_the_image_neither_blocks_nor_leaks(
    tmp_path: Path, busybox_image: Path
) -> None:
    root = tmp_path / "fifo-root"
    subprocess.run(["unsquashfs", "-q", "-d", str(root), str(busybox_image)], check=True)
    (root / "etc" / "passwd").unlink()
    os.mkfifo(root / "etc" / "passwd")
    image = tmp_path / "fifo.sqsh"
    subprocess.run(["mksquashfs", str(root), str(image), "-noappend", "-quiet"], check=True)
    outcome: list[object] = []

    def attempt(user: str, name: str) -> None:
        try:
            outcome.append(run(tmp_path, None, "echo started", name, image=str(image), user=user))
        except StartError as err:
            outcome.append(err)

    for user, name in (("1000", "control"), ("nobody", "attack")):
        worker = threading.Thread(target=attempt, args=(user, name), daemon=True)
        worker.start()
        worker.join(30)
        assert not worker.is_alive(), f"user {user!r}: the start hung on the FIFO"
    assert outcome[0] == "started\n"  # a numeric user needs no passwd: the image works
    assert isinstance(outcome[1], StartError) and "does not exist" in str(outcome[1])


# W4: a sparse multi-gigabyte "image" is refused before anything hashes it.
def test_w4_sparse_and_oversized_images_are_refused_without_hashing(
    tmp_path: Path, busybox_image: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    padded = images / "padded.sqsh"
    shutil.copyfile(busybox_image, padded)
    os.truncate(padded, 8 << 30)
    claims = images / "claims.sqsh"
    shutil.copyfile(busybox_image, claims)
    with open(claims, "r+b") as f:  # a superblock that says 8 GiB, over holes
        f.seek(40)
        f.write(struct.pack("<Q", 8 << 30))
    os.truncate(claims, 8 << 30)
    shutil.copyfile(busybox_image, images / "good.sqsh")
    policy.open_image(plugin(tmp_path), str(images / "good.sqsh")).close()  # control
    with pytest.raises(PolicyError, match="its SquashFS superblock says"):
        policy.open_image(plugin(tmp_path), str(padded))
    with pytest.raises(PolicyError, match="sparse file"):
        policy.open_image(plugin(tmp_path), str(claims))


# W7: the log directory swapped for a symlink while the supervisor opens the log.
def test_w7_log_directory_swapped_mid_open_never_writes_elsewhere(
    tmp_path: Path, busybox_image: Path
) -> None:
    alloc = tenant_dir(tmp_path / "allocdir")
    logs = tenant_dir(alloc / "logs")
    (logs / "t.stdout").touch()
    host = tmp_path / "host"
    host.mkdir()
    (host / "t.stdout").write_text("untouched")
    evil = alloc / "evil"
    evil.symlink_to(host)
    os.chown(evil, TENANT, TENANT, follow_symlinks=False)
    wrote, refused = [0], [0]
    with racing(logs, evil):
        for i in tries(wrote, refused):
            try:
                run(tmp_path, None, "echo overwritten", str(i), image=str(busybox_image),
                    stdout_path=str(logs / "t.stdout"))  # fmt: skip
                wrote[0] += 1
            except StartError as err:
                assert "symlink" in str(err), err
                refused[0] += 1
    assert (host / "t.stdout").read_text() == "untouched"
    assert wrote[0] > 0 and refused[0] > 0, (wrote, refused)


# W8: writable = "none" must not tell whether a host path exists.
def test_w8_a_read_only_root_reveals_nothing_of_the_host(
    tmp_path: Path, busybox_image: Path
) -> None:
    from tests.runtime.test_cve import variant

    probe = tmp_path / "probe-target"
    image = variant(tmp_path, busybox_image, ("probe", str(probe)))
    data = tmp_path / "data"
    data.mkdir()
    outcomes = []
    for exists in (False, True):
        if exists:
            (probe / "sub").mkdir(parents=True)
        try:
            run(tmp_path, None, "true", f"w8-{exists}", image=str(image), writable="none",
                mounts=(BindMount(str(data), "/probe/sub"),))  # fmt: skip
            outcomes.append("ran")
        except StartError as err:
            outcomes.append(str(err))
    assert outcomes[0] == outcomes[1], outcomes
    assert "is a symlink in the image" in outcomes[0]


# W9: a ',' in the task's name (run directory) cannot add overlay options.
def test_w9_a_comma_in_the_task_name_adds_no_overlay_option(
    tmp_path: Path, busybox_image: Path
) -> None:
    elsewhere = tmp_path / "e"
    elsewhere.mkdir()
    name = f"x,upperdir={elsewhere},workdir={elsewhere}"
    assert run(tmp_path, None, "echo hi > /f; cat /f", "plain", image=str(busybox_image)) == "hi\n"
    assert run(tmp_path, None, "echo hi > /f; cat /f", name, image=str(busybox_image)) == "hi\n"
    assert list(elsewhere.iterdir()) == []


# W5: a disk layer cannot fill the node's disk.
def test_w5_a_disk_layer_stops_at_its_cap(tmp_path: Path, busybox_image: Path) -> None:
    script = (
        "dd if=/dev/zero of=/small bs=1M count=4 2>/dev/null && echo small-ok; "
        "dd if=/dev/zero of=/big bs=1M count=64 2>&1 | grep -o 'No space left' | head -1"
    )
    out = run(tmp_path, None, script, "w5", image=str(busybox_image), writable="disk",
              upper_dir=str(tmp_path / "layer"), disk_max_mb=32)  # fmt: skip
    assert out.split("\n")[:2] == ["small-ok", "No space left"], out
    layer = tmp_path / "layer.ext4"
    assert layer.stat().st_size == 32 << 20 and layer.stat().st_uid == 0
    assert layer.stat().st_blocks * 512 <= 32 << 20  # on the host, never more than the cap


# Found by the red team (F1): a numeric user is that uid, whatever the image's passwd says.
def test_a_numeric_user_is_never_renamed_by_the_images_passwd(
    tmp_path: Path, busybox_image: Path
) -> None:
    root = tmp_path / "passwd-root"
    subprocess.run(["unsquashfs", "-q", "-d", str(root), str(busybox_image)], check=True)
    with open(root / "etc" / "passwd", "a") as f:
        f.write("1000:x:0:0:a name that is a number:/:/bin/sh\n")
    image = tmp_path / "renamed.sqsh"
    subprocess.run(["mksquashfs", str(root), str(image), "-noappend", "-quiet"], check=True)
    out = run(tmp_path, None, "id -u; id -g", "numeric", image=str(image), user="1000")
    assert out.split() == ["1000", "1000"], out
    named = run(tmp_path, None, "id -u", "named", image=str(image), user="nobody")
    assert named.split() == ["65534"], named  # the control: names are looked up


# Found by the red team (F2): a bind over the container's root would put the runtime's own
# /dev, /proc and /sys steps inside a directory the tenant can swap.
def test_a_bind_over_the_containers_root_is_refused(tmp_path: Path, busybox_image: Path) -> None:
    scratch = tmp_path / "scratch"
    mine = tenant_dir(scratch / "t")
    for dst in ("/", "//", "/.", "/./"):
        with pytest.raises(PolicyError, match="may not be /"):
            policy.allowed_binds((f"{mine}:{dst}",), (str(scratch),), "mounts", "mount_dirs")
    with pytest.raises(StartError, match="would cover the container's root"):
        run(tmp_path, None, "true", "root", image=str(busybox_image),
            mounts=(BindMount(str(mine), "/"),))  # fmt: skip
    assert sorted(p.name for p in mine.iterdir()) == []  # root made nothing in it
    binds = policy.allowed_binds((f"{mine}:/data",), (str(scratch),), "mounts", "mount_dirs")
    out = run(tmp_path, None, "touch /data/f && echo ok", "control", image=str(busybox_image),
              mounts=tuple(binds), user=f"{TENANT}:{TENANT}")  # fmt: skip
    assert out == "ok\n"


# Found by the red team (F4): an untrusted image copied into the store is judged by the
# signature rules of where it came from, and its signature is looked for beside it.
def test_a_copied_image_is_held_to_its_origins_signature_rule(
    tmp_path: Path, busybox_image: Path
) -> None:
    images = tmp_path / "images"
    image = tenant_dir(images / "u1000") / "evil.sqsh"
    shutil.copyfile(busybox_image, image)
    os.chown(image, TENANT, TENANT)

    def check(rules: list[str]) -> str:
        cfg = plugin(
            tmp_path,
            untrusted_images="copy",
            signature_rules=rules,
            signature_keys=["images"],
            vault_address="http://127.0.0.1:1",
        )
        resolved = policy.resolve_image(cfg, str(image), reader=(TENANT, TENANT))
        assert resolved.file is not None and resolved.reference == str(image)
        try:
            return policy.check_signature(cfg, lambda: policy.verifier(cfg), resolved)
        finally:
            resolved.file.close()

    assert check([]) == ""  # the control: no rule, no check
    with pytest.raises(policy.SignatureRefused, match="is not signed"):
        check([f"{images}/=enforce"])
