"""A task's user may be root (remapped, or host root with bounded capabilities) or a host id
the admin allowed; never gid 0 or a remapped root's host id unless the admin says so."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from nomad_driver.driver import config, policy
from nomad_driver.runtime import client, ids
from nomad_driver.runtime.container import ContainerError
from nomad_driver.runtime.spec import ContainerSpec
from nomad_driver.wire import schema
from tests.runtime.test_supervisor import make_spec, run_script

REMAP = (100000, 65536)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="containers need root here")


@pytest.fixture(scope="module")
def games_image(busybox_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox with a passwd entry for a system account: games, uid 5."""
    tmp = tmp_path_factory.mktemp("games")
    root = tmp / "root"
    subprocess.run(["unsquashfs", "-q", "-d", str(root), str(busybox_image)], check=True)
    with open(root / "etc" / "passwd", "a", encoding="utf-8") as f:
        f.write("games:x:5:60:games:/:/bin/sh\n")
    out = tmp / "games.sqsh"
    subprocess.run(["mksquashfs", str(root), str(out), "-noappend", "-quiet"], check=True)
    return out


def start(tmp: Path, image: Path, user: str, **overrides: object) -> client.Started:
    settings = {"images_dir": str(tmp / "images"), "userns": REMAP, **overrides}
    spec = make_spec(tmp, image, "/bin/id", user=user)._replace(**settings)
    return client.start(spec, str(tmp / f"run-{len(list(tmp.glob('run-*')))}"))


@needs_root
@pytest.mark.parametrize(
    "user, expected",
    [
        (
            "1000:0",
            r"user '1000:0' is gid 0, outside the plugin's allowed_gids \['100', '1000-65534'\]",
        ),
        ("100005", r"user '100005' is uid 100005, inside the plugin's root_id_range 100000:65536"),
        ("1000:100007", "is gid 100007, inside the plugin's root_id_range"),
        ("games", r"user 'games' is uid 5, outside the plugin's allowed_uids \['1000-65534'\]"),
    ],
)
def test_a_user_outside_the_allowed_ids_is_refused(
    tmp_path: Path, games_image: Path, user: str, expected: str
) -> None:
    with pytest.raises(client.StartError, match=expected):
        start(tmp_path, games_image, user)
    assert not (tmp_path / "out").read_text()


@needs_root
@pytest.mark.parametrize(
    "user, userns, expected",
    [
        ("0:0", REMAP, "uid=0(root) gid=0(root)"),  # remapped root: the whole range is its own
        ("1000:1000", REMAP, "uid=1000 gid=1000"),
        ("1000:1000", None, "uid=1000 gid=1000"),
        ("nobody", REMAP, "uid=65534(nobody) gid=65534"),
    ],
)
def test_root_and_allowed_users_run(
    tmp_path: Path, games_image: Path, user: str, userns: object, expected: str
) -> None:
    started = start(tmp_path, games_image, user, userns=userns)
    assert client.wait(started.run_dir).exit_code == 0
    assert (tmp_path / "out").read_text().startswith(expected)


@needs_root
def test_an_admin_may_allow_a_system_account(tmp_path: Path, games_image: Path) -> None:
    started = start(
        tmp_path, games_image, "games", allowed_uids=((5, 5),), allowed_gids=((60, 60),)
    )
    assert client.wait(started.run_dir).exit_code == 0
    assert (tmp_path / "out").read_text().startswith("uid=5(games) gid=60")


@needs_root
def test_a_passwd_changed_in_a_disk_layer_is_checked_again_inside(
    tmp_path: Path, busybox_image: Path
) -> None:
    # The disk layer outlives a task: its root edits /etc/passwd, and the next start resolves
    # "nobody" there, not in the image. Host root mode: uid 5 would be the host's uid 5.
    layer = tmp_path / "layer"
    edit = "sed -i 's/^nobody:x:65534:65534/nobody:x:5:5/' /etc/passwd && grep ^nobody /etc/passwd"
    result, out = run_script(
        tmp_path, busybox_image, edit, writable="disk", upper_dir=str(layer), userns=None
    )
    assert result.exit_code == 0 and out.startswith("nobody:x:5:5"), out
    with pytest.raises(client.StartError, match="user 'nobody' is uid 5, outside"):
        run_script(
            tmp_path, busybox_image, "id", writable="disk", upper_dir=str(layer), user="nobody"
        )


@needs_root
def test_exec_checks_the_user_as_resolved_inside_the_container(
    tmp_path: Path, busybox_image: Path
) -> None:
    # Host root (no user namespace) edits its tmpfs layer's /etc/passwd: "root" is now uid 5.
    # An exec as the task's user resolves it there, and must not run as the host's uid 5.
    from nomad_driver.runtime import enter

    spec = make_spec(tmp_path, busybox_image, "/bin/sleep", "60", user="root")
    started = client.start(spec, str(tmp_path / "run"))

    def exec_(*command: str) -> subprocess.CompletedProcess[str]:
        argv = enter.argv(started.run_dir, started.init_pid, list(command))
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    try:
        before = exec_("/bin/id", "-u")
        assert (before.returncode, before.stdout) == (0, "0\n"), before
        edit = exec_("/bin/sed", "-i", "s/^root:x:0:0/root:x:5:5/", "/etc/passwd")
        assert edit.returncode == 0, edit
        after = exec_("/bin/id", "-u")
        assert after.returncode == 127 and after.stdout == "", after
        assert "user 'root' is uid 5, outside the plugin's allowed_uids" in after.stderr, after
    finally:
        client.send_signal(started.run_dir, 9)
        client.wait(started.run_dir)


def test_ranges_parse_and_refuse_nonsense() -> None:
    assert ids.parse_ranges(["1000-65534", " 70000 "]) == ((1000, 65534), (70000, 70000))
    for bad in ("1000-", "-5", "x", "9-1", "1-4294967295"):
        with pytest.raises(ValueError, match=repr(bad)):
            ids.parse_ranges([bad])
    with pytest.raises(schema.ConfigError, match="allowed_gids"):
        schema.load(config.PluginConfig, {"allowed_gids": ["0-x"]}, "test")


def test_check_allows_root_and_listed_ids_only() -> None:
    allowed = ((1000, 1999),)
    ids.check("root", 0, 0, (), (), REMAP)  # root: remapped or bounded host root
    ids.check("u", 1500, 1000, allowed, allowed, REMAP)
    ids.check("u", 1500, 1000, ((1000, 200000),), allowed, None)  # no remapped roots to guard
    with pytest.raises(ContainerError, match="is uid 100000, inside the plugin's root_id_range"):
        ids.check("u", 100000, 1000, ((1000, 200000),), allowed, REMAP)
    with pytest.raises(ContainerError, match=r"is uid 999, outside the plugin's allowed_uids"):
        ids.check("u", 999, 1000, allowed, allowed, None)
    with pytest.raises(ContainerError, match=r"^user 'u' is gid 0, outside .* \['1000-1999'\]$"):
        ids.check("u", 1000, 0, allowed, allowed, None)


def test_the_allowed_ids_options_reach_the_spec(tmp_path: Path) -> None:
    image = tmp_path / "img.sqsh"
    image.write_bytes(b"x")
    task = schema.load(config.TaskConfig, {"image": str(image), "command": "true"}, "t")
    ctx = policy.TaskContext("t1", "host", {}, "", "/dev/null", "/dev/null")

    def spec(**options: object) -> ContainerSpec:
        plugin = schema.load(config.PluginConfig, options, "test")
        return policy.container_spec(plugin, task, str(image), ctx)

    default = spec()
    assert default.allowed_uids == ids.DEFAULT_UIDS == ((1000, 65534),)
    assert default.allowed_gids == ids.DEFAULT_GIDS == ((100, 100), (1000, 65534))
    custom = spec(allowed_uids=["5", "2000-2999"], allowed_gids=["0"])
    assert (custom.allowed_uids, custom.allowed_gids) == (((5, 5), (2000, 2999)), ((0, 0),))
    assert custom.from_json(custom.to_json()) == custom
