"""`pyhpc image` reads its store from the system policy as `pyhpc run` does; takes back every
digest form `image ls` prints; tells a user who cannot write the store so in one line; signs
the reference the user names and verifies any signed reference of the same digest; exports a
stored image as a file, whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nomad_driver.cli import run as run_cli
from nomad_driver.cli.main import main
from nomad_driver.signing.vault import Auth, Vault
from nomad_driver.util.digest import file_digest
from tests.images.ocitools import layer_tar, write_layout
from tests.registry import RunningRegistry, run_registry
from tests.vaultbed import TOKEN, dev_vault

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="imports keep ownership: root")
CONFIG = {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}


@pytest.fixture(autouse=True)
def private_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A system policy of this test's own (its store in tmp_path, a short run_dir: socket
    paths are limited), at the place `pyhpc run` and `pyhpc image` look for it, and no
    $PYHPC_STORE to override it."""
    run_dir = tempfile.mkdtemp(prefix="pyhpc-run-")
    policy = tmp_path / "pyhpc.hcl"
    policy.write_text(
        'plugin "pyhpc" {\n  config {\n'
        f'    store_dir = "{tmp_path / "policy-store"}"\n'
        f'    run_dir = "{run_dir}"\n'
        "  }\n}\n"
    )
    monkeypatch.setattr(run_cli, "DEFAULT_CONFIG", str(policy))
    monkeypatch.setattr(run_cli, "POLICY_CACHE", str(tmp_path / "policy-cache"))
    monkeypatch.delenv("PYHPC_STORE", raising=False)
    yield policy
    shutil.rmtree(run_dir, ignore_errors=True)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["image", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("cli-layout")
    layers = [layer_tar([("etc/hostname", "file", b"cli\n")]), layer_tar([("bin/x", "file", b"x")])]
    return write_layout(work / "x", layers, CONFIG, tag="latest")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, layout: Path) -> Iterator[RunningRegistry]:
    with run_registry(tmp_path_factory.mktemp("cli-registry")) as reg:
        subprocess.run(
            [
                "skopeo",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                f"oci:{layout}:latest",
                f"docker://{reg.host}/team/busybox:1",
            ],
            check=True,
            capture_output=True,
        )
        yield reg


def test_ls_inspect_push_and_rm_use_the_policys_store_and_take_back_each_digest_form(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: Path, registry: RunningRegistry
) -> None:
    code, out, err = cli(capsys, "import", f"oci:{layout}:latest")
    assert code == 0, err
    digest, path = out.split()[:2]
    assert path.startswith(str(tmp_path / "policy-store") + "/")  # the policy's store_dir
    code, listed, _ = cli(capsys, "ls")
    assert code == 0 and f"oci:{layout}:latest" in listed
    short = listed.splitlines()[1].split()[0]
    assert short == digest[:19]
    for form in (short, short.removeprefix("sha256:"), digest):
        code, shown, err = cli(capsys, "inspect", form)
        assert code == 0, err
        assert json.loads(shown)["references"] == [f"oci:{layout}:latest"]
    code, out, err = cli(capsys, "push", short, f"oras://{registry.host}/team/pushed:1")
    assert code == 0 and "@sha256:" in out, err
    code, out, err = cli(capsys, "rm", short)
    assert code == 0 and out.strip() == f"deleted {digest}", err
    assert cli(capsys, "ls")[1].strip().splitlines()[1:] == []
    # Bad names: one line each, naming what was wrong.
    for argv, expected in (
        (["inspect", short], f"no image {short!r} in the store {tmp_path / 'policy-store'}"),
        (["inspect", "sha256:xyz"], "'sha256:xyz' is not a sha256 digest"),
        (["rm", "docker://ubuntu:22.04"], "name the registry host explicitly"),
        (["push", "nonsense", "oras://h:5000/a:1"], "expected an absolute SquashFS path"),
        (["import", "--pull-timeout", "soon", "/x.sqsh"], "--pull-timeout 'soon'"),
    ):
        code, _, err = cli(capsys, *argv)
        assert code == 1 and expected in one_line(err), (argv, err)


def test_an_option_or_the_environment_wins_over_the_policy(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    layout: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, out, _ = cli(capsys, "--store", str(tmp_path / "given"), "import", f"oci:{layout}")
    assert code == 0 and out.split()[1].startswith(str(tmp_path / "given") + "/")
    monkeypatch.setenv("PYHPC_STORE", str(tmp_path / "env"))
    code, out, _ = cli(capsys, "import", f"oci:{layout}")
    assert code == 0 and out.split()[1].startswith(str(tmp_path / "env") + "/")
    broken = tmp_path / "broken.hcl"
    broken.write_text('plugin "pyhpc" {\n  config {\n    store_dir = "relative"\n  }\n}\n')
    code, _, err = cli(capsys, "--config", str(broken), "ls")
    assert code == 1 and "store_dir" in one_line(err)


def as_user(uid: int, argv: list[str]) -> tuple[int, str]:
    """main(argv) in a child that has become uid (the interpreter is loaded already: a user
    could not read this one from /root)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            os.close(read)
            os.dup2(write, 1)
            os.dup2(write, 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            code = main(argv)
        except BaseException:  # noqa: BLE001 - shown to the parent
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        output = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), output


def test_a_user_who_cannot_write_the_default_store_is_told_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    busybox_image: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cli(capsys, "--store", str(tmp_path / "s"), "import", str(busybox_image))  # loads modules
    monkeypatch.setattr(run_cli, "DEFAULT_CONFIG", str(tmp_path / "absent.hcl"))  # defaults
    code, output = as_user(65534, ["image", "import", str(busybox_image)])
    assert code == 1, output
    line = one_line(output)
    assert line.startswith("pyhpc image: cannot write the image store /var/lib/pyhpc/store as uid")
    assert line.endswith("run it as root, or name a store of yours with --store")
    # The control: the same user with a store of its own imports a file it can read.
    own = Path(tempfile.mkdtemp(prefix="pyhpc-user-"))
    try:
        os.chmod(own, 0o777)
        shutil.copyfile(busybox_image, own / "mine.sqsh")
        os.chmod(own / "mine.sqsh", 0o644)
        code, output = as_user(
            65534, ["image", "--store", str(own / "store"), "import", str(own / "mine.sqsh")]
        )
        assert code == 0 and output.startswith("sha256:"), output
    finally:
        shutil.rmtree(own)


@pytest.fixture(scope="module")
def vault() -> Iterator[str]:
    with dev_vault() as (address, _):
        v = Vault(address=address, auth=Auth(token=TOKEN))
        v.setup("images")
        v.setup("other")
        yield address


def test_sign_binds_the_reference_named_and_verify_takes_any_signed_name_of_the_digest(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    layout: Path,
    registry: RunningRegistry,
    vault: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The issue: the same digest imported as docker://.../busybox:1 and then oci:/.../x, and
    `verify docker://.../busybox:1` answered "image oci:...:latest is not signed"."""
    monkeypatch.setenv("VAULT_ADDR", vault)
    monkeypatch.setenv("VAULT_TOKEN", TOKEN)
    docker = f"docker://{registry.host}/team/busybox:1"
    oci = f"oci:{layout}:latest"
    first = cli(capsys, "import", docker)
    second = cli(capsys, "import", oci)
    assert first[0] == second[0] == 0 and first[1].split()[0] == second[1].split()[0]
    digest = first[1].split()[0]

    code, _, err = cli(capsys, "verify", docker, "--key", "images")  # not signed yet
    assert code == 1 and f"image {docker} is not signed" in one_line(err)  # the name given

    code, out, err = cli(capsys, "sign", docker, "--key", "images")
    assert code == 0 and f"signed {digest} as {docker} with transit/images v1" in out, err
    code, out, err = cli(capsys, "verify", docker, "--key", "images")
    assert code == 0, err
    assert json.loads(out)["signed_reference"] == docker
    code, out, err = cli(capsys, "verify", oci, "--key", "images")  # the same bytes
    assert code == 0 and json.loads(out)["signed_reference"] == docker, err

    code, out, err = cli(capsys, "sign", oci, "--key", "other")  # a second name, another key
    assert code == 0, err
    envelope = json.loads(
        (Path(second[1].split()[1]).parent / f"{digest[7:]}.sqsh.dsse.json").read_text()
    )
    assert isinstance(envelope, list) and len(envelope) == 2  # both signed names kept
    code, out, err = cli(capsys, "verify", oci, "--key", "other")
    assert code == 0 and json.loads(out)["signed_reference"] == oci, err
    code, out, err = cli(capsys, "verify", docker, "--key", "images")  # still the first
    assert code == 0 and json.loads(out)["signed_reference"] == docker, err
    code, out, err = cli(capsys, "verify", digest[:19], "--key", "other")  # by short digest
    assert code == 0, err

    code, _, err = cli(capsys, "verify", docker, "--key", "nobody-trusts-this")
    line = one_line(err)
    assert code == 1 and line.startswith(f"pyhpc image: verify: image {docker}: signed by")
    assert "a key this node does not trust" in line


def test_export_writes_the_image_and_its_signature_whole_or_not_at_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], busybox_image: Path
) -> None:
    code, out, err = cli(capsys, "import", str(busybox_image))
    assert code == 0, err
    digest, stored = out.split()[:2]
    Path(stored + ".dsse.json").write_text('{"payloadType": "x"}')  # stands for a signature
    dest = tmp_path / "out" / "busybox.sqsh"
    dest.parent.mkdir()
    code, out, err = cli(capsys, "export", digest[:19], "-o", str(dest))
    assert code == 0 and out.split() == [digest, str(dest)], err
    assert file_digest(str(dest)) == digest
    assert (dest.parent / "busybox.sqsh.dsse.json").read_text() == '{"payloadType": "x"}'
    assert sorted(p.name for p in dest.parent.iterdir()) == [
        "busybox.sqsh",
        "busybox.sqsh.dsse.json",
    ]

    code, _, err = cli(capsys, "export", digest, "-o", str(dest))
    assert code == 1 and "exists; give --force to replace it" in one_line(err)
    dest.write_bytes(b"old")
    code, _, err = cli(capsys, "export", digest, "-o", str(dest), "--force")
    assert code == 0 and file_digest(str(dest)) == digest, err
    code, _, err = cli(capsys, "export", digest, "-o", str(tmp_path / "nowhere" / "x.sqsh"))
    assert code == 1 and "No such file or directory" in one_line(err)
    assert not (tmp_path / "nowhere").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == [
        "busybox.sqsh",
        "busybox.sqsh.dsse.json",
    ]
