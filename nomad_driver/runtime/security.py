"""What a task may do once it runs: capabilities, no_new_privs and a seccomp filter.

Profiles use Docker's JSON format (defaultAction, syscalls[].names/action/args, architectures),
so existing profiles carry over. Parsing happens in the plugin, before a task starts, so a bad
profile is refused with its path and field; only the parsed, checked form reaches the runtime.
A task names a profile; the plugin reads it only from the admin's seccomp_profile_dirs, through
a descriptor, so nothing a tenant wrote becomes the policy root applies.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from nomad_driver.runtime import linux
from nomad_driver.util.errors import Refused

CAPABILITIES = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE "
    "NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO "
    "SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME "
    "SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG "
    "WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE"
).split()
CAP_NUMBER = {name: number for number, name in enumerate(CAPABILITIES)}
# Docker's default set: what ordinary container images expect root to be able to do.
DEFAULT_CAPS = frozenset(
    "CHOWN DAC_OVERRIDE FSETID FOWNER MKNOD NET_RAW SETGID SETUID SETFCAP SETPCAP "
    "NET_BIND_SERVICE SYS_CHROOT KILL AUDIT_WRITE".split()
)

# Refused with EPERM by the default profile: what Docker's default profile blocks for a
# container without CAP_SYS_ADMIN, plus the new mount API and io_uring (the operations a ring
# carries are not seen by seccomp, so a task could do through it what the filter refuses).
# ptrace and process_vm_readv/writev are allowed, as Docker allows them on kernels >= 4.8
# (where ptrace cannot bypass seccomp): they reach only the task's own processes (its user
# namespace; the container init is not dumpable), and MPI's single-copy shared-memory
# transport (CMA) needs them.
DEFAULT_DENIED = (
    "acct add_key bpf clock_adjtime clock_settime create_module delete_module finit_module "
    "fsconfig fsmount fsopen fspick get_kernel_syms get_mempolicy init_module "
    "io_uring_enter io_uring_register io_uring_setup ioperm iopl "
    "kcmp kexec_file_load kexec_load keyctl lookup_dcookie mbind mount move_mount "
    "move_pages name_to_handle_at nfsservctl open_by_handle_at open_tree perf_event_open "
    "pivot_root query_module quotactl reboot "
    "request_key set_mempolicy setns settimeofday stime swapoff swapon sysfs _sysctl syslog "
    "umount umount2 unshare uselib userfaultfd ustat vm86 vm86old"
).split()
# clone() flags that create namespaces: denied like unshare().
NAMESPACE_FLAGS = (
    0x00020000,
    0x04000000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
    0x02000000,
)
# personality() values the default profile allows, Docker's: PER_LINUX, PER_LINUX_32BIT,
# UNAME26, UNAME26|PER_LINUX_32BIT and 0xffffffff (query). Others, ADDR_NO_RANDOMIZE among
# them, turn off protections for the programs the task runs next.
PERSONALITY_ALLOWED = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

ACTIONS = {
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_LOG",
}
OPERATORS = {
    "SCMP_CMP_NE",
    "SCMP_CMP_LT",
    "SCMP_CMP_LE",
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
}


class PolicyError(Refused, ValueError):
    """A capability name or seccomp profile that cannot be used; the message says which."""


def capability_set(
    add: Iterable[str], drop: Iterable[str], allowed: Iterable[str], host_root: bool = False
) -> list[str]:
    """The task's capabilities: the default set, plus add, minus drop, within the admin's list.
    host_root (no user namespace): the default set has no MKNOD, since a device node made by
    host root would be the host's device (inside a user namespace mknod makes none anyway)."""

    def normalise(names: Iterable[str], field: str) -> set[str]:
        out = set()
        for raw in names:
            name = raw.strip().upper().removeprefix("CAP_")
            if name == "ALL":
                out |= set(CAPABILITIES)
            elif name not in CAP_NUMBER:
                raise PolicyError(f"{field}: unknown capability {raw!r}")
            else:
                out.add(name)
        return out

    permitted = normalise(allowed, "allow_caps")
    wanted = normalise(add, "cap_add")
    defaults = DEFAULT_CAPS - {"MKNOD"} if host_root else DEFAULT_CAPS
    beyond = sorted(wanted - permitted - defaults)
    if beyond:
        raise PolicyError(f"cap_add: {', '.join(beyond)} not in the plugin's allow_caps")
    return sorted((defaults | wanted) - normalise(drop, "cap_drop"))


def default_profile() -> dict[str, Any]:
    """The default seccomp profile, in the same Docker JSON form custom profiles use."""
    rules: list[dict[str, Any]] = [
        {"names": list(DEFAULT_DENIED), "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM},
        # glibc falls back to clone() when clone3 is missing; clone's flags can be checked.
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS},
    ]
    for flag in NAMESPACE_FLAGS:
        rules.append(_eperm_if("clone", "SCMP_CMP_MASKED_EQ", flag, flag))
    rules += [_eperm_if("personality", *test) for test in _personality_refused()]
    return {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}


def _eperm_if(name: str, op: str, value: int, value_two: int = 0) -> dict[str, Any]:
    """EPERM for `name` when its first argument passes one comparison (Docker JSON rule)."""
    arg = {"index": 0, "value": value, "valueTwo": value_two, "op": op}
    return {"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM, "args": [arg]}


def _personality_refused() -> list[tuple[str, int, int]]:
    """Comparisons whose union is every personality() argument not in PERSONALITY_ALLOWED.

    Docker allows the values under a default of ERRNO; ours is ALLOW, and libseccomp takes
    neither a rule whose action is the default nor two comparisons of one argument in a rule
    (runc splits those into separate rules, OR, so such a profile would mean something else
    there too). So the refusal is spelled as one-comparison rules: anything above 32 bits;
    the three other values with every bit outside the flags 0x20008 set; and, for the rest,
    a set bit followed by a clear bit among those 30 bits in a cycle, which every value that is
    neither all zeros nor all ones there has (all zeros leaves only the allowed flag values).
    """
    flags = 0
    for value in PERSONALITY_ALLOWED[:-1]:
        flags |= value
    free = [bit for bit in range(32) if not flags >> bit & 1]
    tests = [("SCMP_CMP_GT", 0xFFFFFFFF, 0)]
    all_free = sum(1 << bit for bit in free)
    tests += [
        ("SCMP_CMP_EQ", all_free | low, 0)
        for low in PERSONALITY_ALLOWED[:-1]
        if all_free | low not in PERSONALITY_ALLOWED
    ]
    for i, bit in enumerate(free):
        after = free[(i + 1) % len(free)]
        tests.append(("SCMP_CMP_MASKED_EQ", (1 << bit) | (1 << after), 1 << bit))
    return tests


def check_profile(profile: Any, source: str) -> dict[str, Any]:
    """Validate a Docker-format profile; return it as the runtime will apply it."""

    def fail(what: str) -> PolicyError:
        return PolicyError(f"seccomp profile {source}: {what}")

    if not isinstance(profile, Mapping):
        raise fail("must be a JSON object")
    if profile.get("defaultAction") not in ACTIONS:
        raise fail(
            f"defaultAction {profile.get('defaultAction')!r} is not one of {sorted(ACTIONS)}"
        )
    syscalls = profile.get("syscalls", [])
    if not isinstance(syscalls, list):
        raise fail("syscalls must be a list")
    import pyseccomp

    for i, rule in enumerate(syscalls):
        where = f"syscalls[{i}]"
        if not isinstance(rule, Mapping):
            raise fail(f"{where} must be an object")
        names = rule.get("names") or ([rule["name"]] if "name" in rule else [])
        if not names or not all(isinstance(n, str) for n in names):
            raise fail(f"{where}.names must be a non-empty list of syscall names")
        if rule.get("action") not in ACTIONS:
            raise fail(f"{where}.action {rule.get('action')!r} is not one of {sorted(ACTIONS)}")
        for j, arg in enumerate(rule.get("args") or []):
            if not isinstance(arg, Mapping) or arg.get("op") not in OPERATORS:
                raise fail(f"{where}.args[{j}].op must be one of {sorted(OPERATORS)}")
            if not isinstance(arg.get("index"), int) or not 0 <= arg["index"] <= 5:
                raise fail(f"{where}.args[{j}].index must be 0 to 5")
        known = [n for n in names if _resolves(pyseccomp, n)]
        if not known:
            raise fail(f"{where}: no syscall of {names} exists on this architecture")
    return dict(profile)


def _resolves(pyseccomp: Any, name: str) -> bool:
    try:
        return int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)) >= 0
    except (ValueError, RuntimeError, TypeError, OSError):
        return False


def load_profile(text: str, source: str) -> dict[str, Any]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise PolicyError(f"seccomp profile {source}: not valid JSON ({err})") from err
    return check_profile(raw, source)


# ---- applied in the task's process, just before exec --------------------------------------

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


def limit_bounding_set(keep: Iterable[str]) -> None:
    """Drop every capability not kept from the bounding set (needs CAP_SETPCAP: call as root)."""
    kept = {CAP_NUMBER[name] for name in keep}
    for number in range(64):
        if number in kept:
            continue
        try:
            linux.prctl(PR_CAPBSET_DROP, number, "drop capability")
        except OSError as err:
            if err.errno == errno.EINVAL:  # past the last capability this kernel knows
                break
            raise
    linux.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clear ambient capabilities")


def set_capabilities(keep: Iterable[str]) -> None:
    """Effective, permitted and inheritable become exactly `keep` (for a root task)."""
    linux.capset(sum(1 << CAP_NUMBER[name] for name in set(keep)))


def set_no_new_privs() -> None:
    linux.prctl(PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")


def load_libseccomp() -> None:
    """Import pyseccomp without letting ctypes.util.find_library spawn ldconfig: this runs
    inside the container's PID namespace, where a stray child would take PID 2."""
    import ctypes.util

    known = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}
    original = ctypes.util.find_library
    ctypes.util.find_library = lambda name: known.get(name) or original(name)
    try:
        import pyseccomp  # noqa: F401
    finally:
        ctypes.util.find_library = original


def apply_seccomp(profile: Mapping[str, Any]) -> None:
    """Load a checked Docker-format profile into the kernel for this process and its children."""
    load_bpf(compile_seccomp(profile))


PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


def load_bpf(program: bytes) -> None:
    """Install a compiled filter (compile_seccomp). no_new_privs must be set already. Needs
    neither libseccomp nor Python's ctypes.util: it runs in the container's init and exec."""
    import ctypes

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    if not program or len(program) % 8:
        raise PolicyError("compiled seccomp filter is empty or malformed")
    prog = Fprog(len(program) // 8, program)
    if linux.libc().prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp filter: {os.strerror(err)}")


_COMPILED: dict[str, bytes] = {}


def compile_seccomp(profile: Mapping[str, Any]) -> bytes:
    """The profile as a BPF program, compiled once per distinct profile: the plugin compiles,
    each container only loads (no libseccomp inside). Kept in this process and in the root-only
    cache, keyed on the profile, this machine and this boot, so a `pyhpc run` skips the 8 ms
    of loading libseccomp and compiling."""
    import hashlib

    from nomad_driver.util import rootcache

    key = json.dumps(profile, sort_keys=True)
    if key not in _COMPILED:
        name = "seccomp-" + hashlib.sha256(f"{_boot_id()} {key}".encode()).hexdigest()
        cached = rootcache.read(name)
        if cached and len(cached) % 8 == 0:
            _COMPILED[key] = cached
            return cached
        load_libseccomp()
        flt = _build_filter(profile)
        fd = os.memfd_create("pyhpc-seccomp", os.MFD_CLOEXEC)
        with os.fdopen(fd, "w+b") as f:
            flt.export_bpf(f)
            f.seek(0)
            _COMPILED[key] = f.read()
        rootcache.write(name, _COMPILED[key])
    return _COMPILED[key]


def _boot_id() -> str:
    """This boot, machine and compiler: a filter compiled before a reboot (a new kernel, a new
    libseccomp), on another architecture or by another version of this module is never taken
    from the cache."""
    st = os.stat(__file__)
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
        return f"{f.read().strip()} {os.uname().machine} {st.st_ino} {st.st_mtime_ns} {st.st_size}"


def _build_filter(profile: Mapping[str, Any]) -> Any:
    import pyseccomp as sc

    def action(rule: Mapping[str, Any]) -> Any:
        name = rule["action"]
        if name == "SCMP_ACT_ERRNO":
            return sc.ERRNO(int(rule.get("errnoRet", errno.EPERM)))
        return {
            "SCMP_ACT_ALLOW": sc.ALLOW,
            "SCMP_ACT_KILL": sc.KILL,
            "SCMP_ACT_KILL_THREAD": sc.KILL,
            "SCMP_ACT_KILL_PROCESS": sc.KILL_PROCESS,
            "SCMP_ACT_TRAP": sc.TRAP,
            "SCMP_ACT_LOG": sc.LOG,
        }[name]

    ops = {
        "SCMP_CMP_NE": sc.NE,
        "SCMP_CMP_LT": sc.LT,
        "SCMP_CMP_LE": sc.LE,
        "SCMP_CMP_EQ": sc.EQ,
        "SCMP_CMP_GE": sc.GE,
        "SCMP_CMP_GT": sc.GT,
        "SCMP_CMP_MASKED_EQ": sc.MASKED_EQ,
    }
    default = action(
        {
            "action": profile["defaultAction"],
            "errnoRet": profile.get("defaultErrnoRet", errno.EPERM),
        }
    )
    flt = sc.SyscallFilter(defaction=default)
    for rule in profile.get("syscalls", []):
        act = action(rule)
        if act == default:
            continue
        args = []
        for a in rule.get("args") or []:
            if a["op"] == "SCMP_CMP_MASKED_EQ":
                args.append(sc.Arg(a["index"], ops[a["op"]], a["value"], a.get("valueTwo", 0)))
            else:
                args.append(sc.Arg(a["index"], ops[a["op"]], a["value"]))
        for name in rule.get("names") or [rule["name"]]:
            if _resolves(sc, name):
                flt.add_rule(act, name, *args)
    return flt


PROFILE_MAX = 1 << 20  # bytes: far more than any real profile needs
# A profile name in the admin's directories: one path component, not hidden.
PROFILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def seccomp_policy(
    choice: str, allow_unconfined: bool, profile_dirs: Sequence[str] = ()
) -> dict[str, Any] | None:
    """The profile for a task's `seccomp` choice: "default", "unconfined", or a profile named
    or given by path in the admin's profile_dirs (the plugin's seccomp_profile_dirs)."""
    if choice == "default":
        return default_profile()
    if choice == "unconfined":
        if not allow_unconfined:
            raise PolicyError(
                'seccomp = "unconfined" is not allowed on this node '
                "(the plugin's allow_unconfined_seccomp is false)"
            )
        return None
    text, source = read_admin_profile(choice, profile_dirs, allow_unconfined)
    return load_profile(text, source)


def read_admin_profile(
    choice: str, profile_dirs: Sequence[str], allow_unconfined: bool = False
) -> tuple[str, str]:
    """The text of the profile `choice` names, and its path: a name ("mpi" is mpi.json, the
    first directory holding it wins) or an absolute path inside one of profile_dirs.

    Runs as root on a tenant's word, so the kernel resolves the path beneath the admin's
    directory with no symlink, and only the descriptor it gives is checked and read (see
    _read_beneath). Outside the directories every refusal reads the same, whether or not the
    file exists, so a task cannot probe for root-only files."""
    dirs = [d.rstrip("/") or "/" for d in profile_dirs]
    accepted = '"default"' + (', "unconfined"' if allow_unconfined else "")
    outside = PolicyError(
        f"seccomp = {json.dumps(choice)} is not a profile in the plugin's seccomp_profile_dirs "
        f"{json.dumps(dirs)}: use {accepted}, a profile name from those directories or an "
        "absolute path inside them"
    )
    if "\0" in choice:
        raise outside
    if choice.startswith("/"):
        places = [(d, choice[len(d) :].lstrip("/")) for d in dirs if _is_under(choice, d)]
    elif PROFILE_NAME.fullmatch(choice):
        name = choice if choice.endswith(".json") else f"{choice}.json"
        places = [(d, name) for d in dirs]
    else:
        raise outside
    for directory, relative in places:
        source = os.path.join(directory, relative)
        try:
            data = _read_beneath(directory, relative)
        except FileNotFoundError:
            if choice.startswith("/"):
                raise PolicyError(
                    f"seccomp = {json.dumps(choice)}: no such profile in the plugin's "
                    f"seccomp_profile_dirs {json.dumps(dirs)}"
                ) from None
            continue  # a name: the next directory may hold it
        except _Escapes:
            raise outside from None
        except _Unfit as err:
            raise PolicyError(
                f"seccomp = {json.dumps(choice)}: {source} {err} (a profile in the plugin's "
                "seccomp_profile_dirs must be a regular file, not a link, owned by root and "
                f"writable by root alone, at most {PROFILE_MAX} bytes)"
            ) from None
        try:
            return data.decode("utf-8"), source
        except UnicodeDecodeError as err:
            raise PolicyError(f"seccomp profile {source}: not UTF-8 text ({err})") from None
    raise outside


class _Escapes(Exception):
    """The path leaves the directory it must stay beneath."""


class _Unfit(Exception):
    """The file is there but is no profile root may apply; the message says why."""


def _read_beneath(directory: str, relative: str) -> bytes:
    """Read `relative` beneath the admin's `directory`, by descriptor: no symlink anywhere,
    a regular file owned by root, writable by no one else, at most PROFILE_MAX bytes (never
    more is read). FileNotFoundError when the directory or the file is missing."""
    try:
        dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise PolicyError(f"seccomp_profile_dirs: {directory}: {err.strerror}") from None
    try:
        held = os.fstat(dir_fd)
        if held.st_uid != 0 or held.st_mode & 0o022:
            raise PolicyError(
                f"seccomp_profile_dirs: {directory} must be owned by root and writable by "
                "root alone (a profile there could be anyone's)"
            )
        # O_NONBLOCK: a FIFO opens at once (and is refused below) instead of waiting.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
        try:
            fd = linux.openat2(dir_fd, relative, flags, linux.STRICT)
        except OSError as err:
            if err.errno == errno.ENOENT:
                raise FileNotFoundError from None
            if err.errno == errno.EXDEV:
                raise _Escapes from None
            if err.errno == errno.ELOOP:
                raise _Unfit("is a symlink or has one on its path") from None
            raise _Unfit(f"cannot be opened ({err.strerror})") from None
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _Unfit("is not a regular file")
        if info.st_uid != 0:
            raise _Unfit(f"is owned by uid {info.st_uid}, not root")
        if info.st_mode & 0o022:
            raise _Unfit(f"is writable by group or others (mode {info.st_mode & 0o7777:o})")
        data = f.read(PROFILE_MAX + 1) if info.st_size <= PROFILE_MAX else b""
        if info.st_size > PROFILE_MAX or len(data) > PROFILE_MAX:
            raise _Unfit(f"is larger than {PROFILE_MAX} bytes")
        return data


def _is_under(path: str, directory: str) -> bool:
    prefix = directory.rstrip("/") + "/"
    return path.startswith(prefix) and len(path) > len(prefix)
