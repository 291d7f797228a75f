"""What a task cannot do, checked from inside real containers: capabilities, no_new_privs,
seccomp (default and Docker-format profiles, read only from the admin's directories),
setuid binaries, leaked descriptors."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
import time
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


def test_unconfined_needs_the_admins_permission() -> None:
    with pytest.raises(security.PolicyError, match="allow_unconfined_seccomp"):
        security.seccomp_policy("unconfined", allow_unconfined=False)
    assert security.seccomp_policy("unconfined", allow_unconfined=True) is None


# ---- profiles a task may name: only the admin's, read by descriptor ------------------------

PERMISSIVE = {"defaultAction": "SCMP_ACT_ALLOW"}
DENY_CHMOD = {
    "defaultAction": "SCMP_ACT_ALLOW",
    "syscalls": [
        {
            "names": ["chmod", "fchmod", "fchmodat", "fchmodat2"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": errno.EPERM,
        }
    ],
}


def write_profile(path: Path, profile: object, uid: int = 0, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile))
    os.chown(path, uid, 0)
    os.chmod(path, mode)
    return path


@pytest.fixture
def admin(tmp_path: Path) -> Path:
    """The admin's seccomp_profile_dirs entry: root's, 0755, holding deny-chmod.json."""
    directory = tmp_path / "admin-profiles"
    directory.mkdir(mode=0o755)
    write_profile(directory / "deny-chmod.json", DENY_CHMOD)
    return directory


def refusal(choice: str, dirs: list[Path], within: float = 1.0) -> str:
    """The PolicyError seccomp_policy gives for choice, which must come within `within`
    seconds (a thread, so a read that never ends fails the test instead of hanging it)."""
    outcome: list[object] = []

    def attempt() -> None:
        try:
            outcome.append(security.seccomp_policy(choice, False, [str(d) for d in dirs]))
        except security.PolicyError as err:
            outcome.append(err)

    worker = threading.Thread(target=attempt, daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(within)
    assert not worker.is_alive(), f"seccomp = {choice!r} still being read after {within} s"
    assert isinstance(outcome[0], security.PolicyError), f"{choice!r} was accepted: {outcome}"
    assert time.monotonic() - started < within
    message = str(outcome[0])
    assert "\n" not in message and "seccomp" in message
    return message


def test_tenant_written_permissive_profile_is_refused_and_the_admins_is_applied(
    tmp_path: Path, image: Path, admin: Path
) -> None:
    # An earlier job left these: in the admin's directory (had it been writable) and outside.
    inside = write_profile(admin / "evil.json", PERMISSIVE, uid=1000)
    outside = write_profile(tmp_path / "alloc" / "evil.json", PERMISSIVE, uid=1000)
    assert "is owned by uid 1000, not root" in refusal(str(inside), [admin])
    assert "is owned by uid 1000, not root" in refusal("evil", [admin])
    assert "is not a profile in the plugin's seccomp_profile_dirs" in refusal(str(outside), [admin])
    # Owned by root is not enough outside the directories, nor writable by others inside.
    os.chown(outside, 0, 0)
    assert "is not a profile in the plugin's seccomp_profile_dirs" in refusal(str(outside), [admin])
    os.chown(inside, 0, 0)
    os.chmod(inside, 0o664)
    assert "is writable by group or others (mode 664)" in refusal("evil", [admin])
    # Control: the admin's own profile, by name and by path, is accepted and takes effect.
    by_name = security.seccomp_policy("deny-chmod", False, [str(admin)])
    by_path = security.seccomp_policy(str(admin / "deny-chmod.json"), False, [str(admin)])
    assert by_name == by_path == DENY_CHMOD
    code, out = run(tmp_path, image, "chmod 777 /etc && echo changed", seccomp=by_name)
    assert code != 0 and "Operation not permitted" in out and "changed" not in out, out
    code, out = run(tmp_path, image, "chmod 777 /etc && echo changed")
    assert (code, out) == (0, "changed\n")


def test_the_first_directory_holding_a_name_wins_and_missing_directories_are_skipped(
    tmp_path: Path, admin: Path
) -> None:
    second = tmp_path / "site-profiles"
    write_profile(second / "deny-chmod.json", PERMISSIVE)
    write_profile(second / "only-here.json", PERMISSIVE)
    os.chmod(second, 0o755)
    dirs = [str(tmp_path / "absent"), str(admin), str(second)]
    assert security.seccomp_policy("deny-chmod", False, dirs) == DENY_CHMOD
    assert security.seccomp_policy("only-here.json", False, dirs) == PERMISSIVE
    os.chmod(second, 0o777)
    assert "must be owned by root and writable by root alone" in refusal("only-here", [second])
    not_a_dir = admin / "deny-chmod.json"
    assert f"seccomp_profile_dirs: {not_a_dir}: Not a directory" in refusal("x", [not_a_dir])


def test_dev_zero_a_fifo_a_device_and_a_huge_file_are_refused_without_hanging(
    tmp_path: Path, admin: Path
) -> None:
    os.mkfifo(admin / "fifo.json", 0o644)
    os.mknod(admin / "zero.json", 0o644 | stat.S_IFCHR, os.makedev(1, 5))
    os.mkfifo(tmp_path / "fifo.json", 0o644)
    with open(admin / "huge.json", "wb") as f:
        f.truncate(security.PROFILE_MAX + 1)
    assert "is not a regular file" in refusal("fifo", [admin])
    assert "is not a regular file" in refusal(str(admin / "zero.json"), [admin])
    assert f"is larger than {security.PROFILE_MAX} bytes" in refusal("huge", [admin])
    for path in ("/dev/zero", str(tmp_path / "fifo.json"), "/dev/stdin"):
        assert "is not a profile in the plugin's" in refusal(path, [admin])
    # Control: a profile of exactly the limit (padded with spaces) is read whole.
    big = json.dumps(DENY_CHMOD).ljust(security.PROFILE_MAX)
    (admin / "big.json").write_text(big)
    os.chmod(admin / "big.json", 0o644)
    assert security.seccomp_policy("big", False, [str(admin)]) == DENY_CHMOD


def test_symlinks_in_the_directory_are_refused(tmp_path: Path, admin: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    write_profile(elsewhere / "good.json", PERMISSIVE)  # root's, 0644: only the link is wrong
    os.chmod(elsewhere, 0o755)
    (admin / "link.json").symlink_to(elsewhere / "good.json")
    (admin / "sub").symlink_to(elsewhere)
    assert "is a symlink" in refusal("link", [admin])
    assert "is a symlink" in refusal(str(admin / "link.json"), [admin])
    assert "is a symlink" in refusal(str(admin / "sub" / "good.json"), [admin])
    escape = f"{admin}/../elsewhere/good.json"
    assert "is not a profile in the plugin's" in refusal(escape, [admin])
    assert security.seccomp_policy(str(elsewhere / "good.json"), False, [str(elsewhere)])


RACER = """
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
a, b = sys.argv[1].encode(), sys.argv[2].encode()
assert libc.renameat2(-100, a, -100, b, 2) == 0  # RENAME_EXCHANGE
print("swapping", flush=True)
end = time.monotonic() + 30
while time.monotonic() < end:
    libc.renameat2(-100, a, -100, b, 2)
"""


def test_a_profile_swapped_for_a_symlink_mid_read_never_loads_another(
    tmp_path: Path, admin: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    write_profile(elsewhere / "evil.json", PERMISSIVE)
    (admin / "swap").symlink_to(elsewhere / "evil.json")
    racer = subprocess.Popen(
        [sys.executable, "-c", RACER, str(admin / "deny-chmod.json"), str(admin / "swap")],
        stdout=subprocess.PIPE,
        text=True,
    )
    outcomes = []
    try:
        assert racer.stdout is not None and racer.stdout.readline() == "swapping\n"
        for _ in range(50):
            time.sleep(0.002)  # let the racer run, even on a busy machine
            try:
                outcomes.append(security.seccomp_policy("deny-chmod", False, [str(admin)]))
            except security.PolicyError as err:
                assert "is a symlink" in str(err), err
                outcomes.append("refused")
    finally:
        racer.kill()
        racer.wait()
    assert PERMISSIVE not in outcomes
    assert outcomes.count("refused") > 0, "the racer never got the symlink in: the test is void"


def test_a_refusal_outside_the_directories_does_not_tell_whether_a_file_exists(
    tmp_path: Path, admin: Path
) -> None:
    secret = tmp_path / "root-only.json"
    write_profile(secret, DENY_CHMOD, mode=0o600)
    missing = f"/root/missing-{random.getrandbits(32):08x}.json"
    assert not os.path.exists(missing)
    texts = {
        path: refusal(path, [admin]).replace(path, "PATH")
        for path in (missing, str(secret), "/etc/shadow", "/root", "/dev/zero")
    }
    assert len(set(texts.values())) == 1, texts
    assert texts[missing] == (
        f'seccomp = "PATH" is not a profile in the plugin\'s seccomp_profile_dirs ["{admin}"]: '
        'use "default", a profile name from those directories or an absolute path inside them'
    )
    # Control: the same root-only file, in the admin's directory, is read.
    os.rename(secret, admin / "root-only.json")
    assert security.seccomp_policy("root-only", False, [str(admin)]) == DENY_CHMOD


def test_no_directories_means_only_default_and_unconfined(tmp_path: Path) -> None:
    good = write_profile(tmp_path / "p.json", DENY_CHMOD)
    assert "seccomp_profile_dirs []" in refusal(str(good), [])
    assert "seccomp_profile_dirs []" in refusal("p", [])
    assert security.seccomp_policy("default", False, []) == security.default_profile()


# ---- the default profile: io_uring and personality ------------------------------------------

PERSONALITIES = {
    "0x0": "OK",
    "0x8": "OK",
    "0x20000": "OK",
    "0x20008": "OK",
    "0xffffffff": "OK",
    "0x40000": "EPERM",  # ADDR_NO_RANDOMIZE
    "0x400000": "EPERM",  # READ_IMPLIES_EXEC
    "0x20040008": "EPERM",
    "0xfffffff7": "EPERM",
    "0x100000000": "EPERM",  # the kernel reads 0 from it: seccomp must see all 64 bits
}


def test_default_profile_refuses_io_uring_and_personalities_docker_refuses(
    tmp_path: Path, image: Path
) -> None:
    calls = "io_uring_setup " + " ".join(f"personality:{v}" for v in PERSONALITIES)
    code, out = run(tmp_path, image, f"probe {calls}")
    results = dict(line.split() for line in out.splitlines())
    expected = {
        "io_uring_setup": "EPERM",
        **{f"personality:{v}": r for v, r in PERSONALITIES.items()},
    }
    assert results == expected, out
    # Control: without the filter this kernel has io_uring and takes every one of them.
    code, out = run(tmp_path, image, f"probe {calls}", seccomp=None)
    assert dict(line.split() for line in out.splitlines()) == dict.fromkeys(expected, "OK"), out


def test_personality_rules_refuse_exactly_what_is_not_allowed() -> None:
    """The default profile's personality rules, evaluated as the filter does, against
    boundary, single-bit and random values (the container test covers the kernel)."""
    rules = [r for r in security.default_profile()["syscalls"] if r["names"] == ["personality"]]

    def refused(x: int) -> bool:
        for rule in rules:
            (arg,) = rule["args"]
            op, value = arg["op"], arg["value"]
            if (
                (op == "SCMP_CMP_GT" and x > value)
                or (op == "SCMP_CMP_EQ" and x == value)
                or (op == "SCMP_CMP_MASKED_EQ" and x & value == arg["valueTwo"])
            ):
                return True
        return False

    samples = {v + d for v in security.PERSONALITY_ALLOWED for d in (-1, 0, 1) if v + d >= 0}
    for bit in range(64):
        samples |= {1 << bit, (1 << bit) | 0x20008, 2**64 - 1 - (1 << bit), 0xFFFFFFFF ^ 1 << bit}
    samples |= {random.getrandbits(64) for _ in range(20000)}
    samples |= {random.getrandbits(32) for _ in range(20000)}
    wrong = [hex(x) for x in samples if refused(x) == (x in security.PERSONALITY_ALLOWED)]
    assert not wrong


def test_compiled_filters_come_from_the_cache_only_when_root_alone_wrote_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached filter would be what every task runs under: an entry another user owns, or
    one others may write, or a symlink, is compiled afresh. The control: root's own entry is
    what compile_seccomp returns (so the cache is read at all)."""
    from nomad_driver.util import rootcache

    cache = tmp_path / "cache"
    monkeypatch.setattr(rootcache, "DIR", str(cache))
    monkeypatch.setattr(security, "_COMPILED", {})
    profile = security.default_profile()
    real = security.compile_seccomp(profile)
    (entry,) = cache.glob("seccomp-*")
    assert entry.read_bytes() == real and entry.stat().st_mode & 0o777 == 0o600
    forged = b"\x06\x00\x00\x00\x00\x00\xff\x7f"  # one instruction: allow everything
    for name, setup in {
        "root's own (the control)": lambda: None,
        "another owner": lambda: os.chown(entry, 1000, 1000),
        "group-writable": lambda: os.chmod(entry, 0o620),
        "a symlink": lambda: (entry.unlink(), (tmp_path / "f").write_bytes(forged),
                              entry.symlink_to(tmp_path / "f")),
    }.items():  # fmt: skip
        entry.unlink(missing_ok=True)
        entry.write_bytes(forged)
        entry.chmod(0o600)
        setup()
        monkeypatch.setattr(security, "_COMPILED", {})
        got = security.compile_seccomp(profile)
        assert got == (forged if name.startswith("root's") else real), name
