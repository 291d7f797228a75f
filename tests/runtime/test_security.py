"""What a task cannot do, checked from inside real containers: capabilities, no_new_privs,
seccomp (default and Docker-format profiles), setuid binaries, leaked descriptors."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from nomad_driver.runtime import client, security
from nomad_driver.runtime.spec import ContainerSpec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containers need root here")
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox, the syscall probe, and a setuid-root copy of busybox."""
    work = tmp_path_factory.mktemp("secimage")
    root = work / "root"
    for d in ("bin", "etc", "tmp"):
        (root / d).mkdir(parents=True)
    busybox = shutil.which("busybox") or "/bin/busybox"
    shutil.copy(busybox, root / "bin" / "busybox")
    for applet in ("sh", "id", "cat", "ls", "chmod", "echo", "grep", "readlink"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "suid").mkdir()
    shutil.copy(busybox, root / "suid" / "busybox")
    os.chmod(root / "suid" / "busybox", 0o4755)
    (root / "suid" / "id").symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n")
    subprocess.run(
        [
            "gcc",
            "-static",
            "-O2",
            "-o",
            str(root / "bin" / "probe"),
            str(HERE / "probe" / "probe.c"),
        ],
        check=True,
    )
    out = work / "sec.sqsh"
    subprocess.run(
        ["mksquashfs", str(root), str(out), "-noappend", "-quiet", "-all-root"],
        check=True,
        capture_output=True,
    )
    os.chmod(out, 0o644)
    return out


@pytest.fixture(params=[None, (100000, 65536)], ids=["host-root", "remapped-root"], autouse=True)
def userns(request: pytest.FixtureRequest) -> object:
    """Every check holds with and without a user namespace (the admin may turn it off)."""
    USERNS[0] = request.param
    return request.param


USERNS: list[tuple[int, int] | None] = [None]


def run(
    tmp: Path,
    image: Path,
    script: str,
    *,
    user: str = "",
    seccomp: object = "default",
    caps: tuple[str, ...] | None = None,
) -> tuple[int, str]:
    (tmp / "out").write_text("")
    profile = security.default_profile() if seccomp == "default" else seccomp
    spec = ContainerSpec(
        task_id="a/t/1",
        hostname="sec",
        image=str(image),
        command="/bin/sh",
        args=("-c", script),
        env={"PATH": "/bin"},
        work_dir="/",
        user=user,
        stdout_path=str(tmp / "out"),
        stderr_path=str(tmp / "out"),
        mounts=(),
        capabilities=tuple(sorted(security.DEFAULT_CAPS)) if caps is None else caps,
        seccomp=profile,  # type: ignore[arg-type]
        images_dir=str(tmp / "images"),
        userns=USERNS[0],
    )
    run_dir = tmp / f"run-{len(list(tmp.glob('run-*')))}"
    started = client.start(spec, str(run_dir))
    return client.wait(started.run_dir).exit_code, (tmp / "out").read_text()


def test_default_profile_refuses_dangerous_syscalls_with_eperm(tmp_path: Path, image: Path) -> None:
    code, out = run(
        tmp_path, image, "probe reboot mount unshare kexec_load init_module keyctl setns getpid"
    )
    results = dict(line.split() for line in out.splitlines())
    for name in ("reboot", "mount", "unshare", "kexec_load", "init_module", "keyctl", "setns"):
        assert results[name] == "EPERM", out
    assert results["getpid"] == "OK"


def test_docker_format_profile_denying_chmod(tmp_path: Path, image: Path) -> None:
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [
            {
                "names": ["chmod", "fchmod", "fchmodat", "fchmodat2"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": errno.EPERM,
            }
        ],
    }
    checked = security.check_profile(profile, "deny-chmod.json")
    code, out = run(tmp_path, image, "chmod 777 -R /etc", seccomp=checked)
    assert code != 0 and "Operation not permitted" in out
    code, out = run(tmp_path, image, "chmod 777 -R /etc")  # default profile, writable layer
    assert code == 0, out


def test_capabilities_are_the_default_set_and_no_new_privs_is_on(
    tmp_path: Path, image: Path
) -> None:
    code, out = run(
        tmp_path, image, "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status"
    )
    fields = dict(line.split(":\t") for line in out.splitlines())
    expected = sum(1 << security.CAP_NUMBER[c] for c in security.DEFAULT_CAPS)
    assert int(fields["CapEff"], 16) == expected
    assert int(fields["CapBnd"], 16) == expected
    assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2"


def test_setuid_root_binary_gains_nothing(tmp_path: Path, image: Path) -> None:
    code, out = run(
        tmp_path, image, "ls -l /suid/busybox; /suid/id -u; /suid/id -ru", user="nobody"
    )
    lines = out.splitlines()
    assert lines[0].startswith("-rwsr-xr-x"), "the image lost its setuid bit: test is void"
    assert lines[1:] == ["65534", "65534"]


def test_task_sees_only_its_three_descriptors(tmp_path: Path, image: Path) -> None:
    code, out = run(tmp_path, image, "ls /proc/self/fd")
    # ls itself opens one descriptor to read the directory.
    assert sorted(out.split()) == ["0", "1", "2", "3"]


def test_proc_self_exe_is_the_containers_own_binary(tmp_path: Path, image: Path) -> None:
    code, out = run(tmp_path, image, "readlink /proc/self/exe; readlink /proc/1/exe; ls /proc")
    lines = out.splitlines()
    assert lines[0] == "/bin/busybox"
    pids = [x for x in " ".join(lines[2:]).split() if x.isdigit()]
    assert len(pids) <= 3, f"host processes are visible: {pids}"


@pytest.mark.parametrize(
    ("add", "drop", "allowed", "message"),
    [
        (
            ["SYS_ADMIN"],
            [],
            sorted(security.DEFAULT_CAPS),
            "SYS_ADMIN not in the plugin's allow_caps",
        ),
        (["CAP_BOGUS"], [], ["ALL"], "cap_add: unknown capability 'CAP_BOGUS'"),
        ([], ["NOPE"], [], "cap_drop: unknown capability 'NOPE'"),
    ],
)
def test_bad_capabilities_are_refused_by_name(
    add: list[str], drop: list[str], allowed: list[str], message: str
) -> None:
    with pytest.raises(security.PolicyError, match=message.replace("(", r"\(")):
        security.capability_set(add, drop, allowed)


def test_cap_add_within_the_allowlist_and_drop_all() -> None:
    assert "SYS_PTRACE" in security.capability_set(["cap_sys_ptrace"], [], ["SYS_PTRACE"])
    assert security.capability_set([], ["ALL"], []) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"defaultAction": "ALLOW_ALL"}', "defaultAction 'ALLOW_ALL' is not one of"),
        (
            '{"defaultAction": "SCMP_ACT_ALLOW", '
            '"syscalls": [{"names": ["chmod"], "action": "X"}]}',
            r"syscalls\[0\].action 'X'",
        ),
        (
            '{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["nosuchcall"], '
            '"action": "SCMP_ACT_ERRNO"}]}',
            "no syscall of",
        ),
        (
            '{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["chmod"], '
            '"action": "SCMP_ACT_ERRNO", '
            '"args": [{"index": 9, "value": 1, "op": "SCMP_CMP_EQ"}]}]}',
            r"args\[0\].index must be 0 to 5",
        ),
    ],
)
def test_malformed_profiles_are_refused_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(security.PolicyError, match=message):
        security.load_profile(text, "p.json")


def test_unconfined_needs_the_admins_permission(tmp_path: Path) -> None:
    with pytest.raises(security.PolicyError, match="allow_unconfined_seccomp"):
        security.seccomp_policy("unconfined", allow_unconfined=False)
    assert security.seccomp_policy("unconfined", allow_unconfined=True) is None
    with pytest.raises(security.PolicyError, match="cannot read it"):
        security.seccomp_policy(str(tmp_path / "missing.json"), allow_unconfined=False)
    good = tmp_path / "p.json"
    good.write_text(json.dumps(security.default_profile()))
    assert security.seccomp_policy(str(good), False)["defaultAction"] == "SCMP_ACT_ALLOW"
