"""The per-task supervisor: a small process that outlives the plugin.

It starts the container's init, answers `wait`, `signal N` and `kill` on a unix socket in the
task's run directory, and writes the exit status to `exit.json` there before it exits, so a
plugin started later (after a crash or an agent restart) can still learn how the task ended.

Run as: python -m nomad_driver.runtime.supervisor RUN_DIR READY_FD
"""

from __future__ import annotations

import base64
import errno
import json
import os
import selectors
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, NoReturn

from nomad_driver.runtime.cgroups import Cgroup
from nomad_driver.runtime.imagemount import SharedImages
from nomad_driver.runtime.spec import ContainerSpec, ExitStatus
from nomad_driver.util.files import write_atomic

if TYPE_CHECKING:
    from nomad_driver.runtime.container import IdMaps

SPEC_FILE = "spec.json"
EXIT_FILE = "exit.json"
SOCKET_FILE = "control.sock"
CGROUPS_FILE = "cgroups.json"  # the cgroup directories this run made
NOT_JOINED = "the supervisor could not move the init into the task's cgroup"
STARTED_FILE = "started.json"  # written once the command runs: who to adopt after a crash
# Signals the init passes on to the task; SIGKILL and SIGSTOP cannot be caught, SIGCHLD is ours.
FORWARDED = [
    s
    for s in signal.valid_signals()
    if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD) and s < signal.SIGRTMIN
]


def _write_line(fd: int, message: dict[str, object]) -> None:
    os.write(fd, (json.dumps(message) + "\n").encode())


def _build(
    spec: ContainerSpec, scratch: str, userns: tuple[int, IdMaps] | None, joined_r: int, disk: int
) -> tuple[int, int, dict[str, str], str]:
    """In the init: the container's root built and entered; the task's uid, gid, environment
    and resolved command; the init in the task's cgroups and a cgroup namespace of its own."""
    from nomad_driver.runtime import container, ids, linux

    container.build(spec, scratch, spec.image_root, userns, disk)
    uid, gid = container.resolve_user(spec.user)
    ids.check_user(spec, uid, gid)  # again: a disk layer's /etc/passwd may differ
    env = container.with_home(spec.env, uid)
    path = container.find_command(spec.command, env)
    if not os.path.isdir(spec.work_dir):
        raise container.ContainerError(
            f"work_dir {spec.work_dir!r} is not a directory in the image"
        )
    # In the task's cgroup before the task exists, so every process of it is counted;
    # then a cgroup namespace rooted there: the task sees "/" in /proc/self/cgroup.
    if joined_r >= 0 and os.read(joined_r, 1) != b"1":
        raise container.ContainerError(NOT_JOINED)
    linux.unshare(linux.CLONE_NEWCGROUP)
    return uid, gid, env, path


def _exec_task(
    spec: ContainerSpec,
    userns: tuple[int, IdMaps] | None,
    stdio: tuple[int, int, int],
    exec_w: int,
    task_ids: tuple[int, int],
    path: str,
    env: dict[str, str],
) -> NoReturn:
    """In the task's first process (a child of the init): its stdio, nothing else of ours,
    the user namespace, the work dir, the restrictions, then the command. What stopped it is
    written to exec_w."""
    from nomad_driver.runtime import linux

    try:
        for s in FORWARDED:
            signal.signal(s, signal.SIG_DFL)
        os.setsid()
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        # Nothing of the plugin or supervisor crosses into the task but fds 0-2; closed
        # before the chdir, so no work_dir can be /proc/self/fd/N of a host directory.
        close_all_but(exec_w, *(userns[:1] if userns else ()))
        if userns is not None:
            linux.setns(userns[0], linux.CLONE_NEWUSER)
            os.close(userns[0])
        enter_work_dir(spec.work_dir)
        restrict(spec, *task_ids)
        os.execve(path, [spec.command, *spec.args], env)
    except BaseException as error:  # noqa: BLE001 - report whatever stopped the exec
        why = str(error)
        if isinstance(error, FileNotFoundError) and os.path.exists(path):
            # execve's ENOENT for a file that is there: its #! interpreter or its ELF
            # loader (ld-linux) is missing from the image.
            why = "its interpreter or dynamic loader is not in the image"
        os.write(exec_w, f"cannot start {spec.command!r}: {why}".encode())
    os._exit(127)


def run_init(
    spec: ContainerSpec,
    scratch: str,
    userns: tuple[int, IdMaps] | None,
    ready_w: int,
    status_w: int,
    stdio: tuple[int, int, int],
    joined_r: int = -1,
    disk: int = -1,
) -> None:
    """PID 1 of the container: build the root, start the command, forward signals, reap.
    joined_r: where the supervisor says "1" once this process is in the task's cgroup (it
    moves it there while the root is built: a cgroup-v1 move waits out an RCU grace period)."""
    # Loaded here, in the init only (the long-lived supervisor stays small), and before
    # pivot_root: from inside the container the package is out of sight (restrict() needs
    # security then).
    from nomad_driver.runtime import container, ids, linux, security  # noqa: F401

    app_pid = 0

    def forward(signum: int, _frame: object) -> None:
        if app_pid:
            try:
                os.kill(app_pid, signum)
            except ProcessLookupError:
                pass

    # Installed first: PID 1 ignores every signal it has no handler for.
    for s in FORWARDED:
        signal.signal(s, forward)
    try:
        uid, gid, env, path = _build(spec, scratch, userns, joined_r, disk)
    except (OSError, container.ContainerError) as error:
        _write_line(ready_w, {"error": str(error)})
        os._exit(127)
    # The task must not reach this host-root process through /proc/1 (CVE-2019-5736 style).
    linux.prctl(linux.PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE")

    exec_r, exec_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        _exec_task(spec, userns, stdio, exec_w, (uid, gid), path, env)
    app_pid = pid
    if userns is not None:
        os.close(userns[0])
    os.close(exec_w)
    for fd in stdio:
        os.close(fd)
    failure = b""
    while chunk := os.read(exec_r, 4096):
        failure += chunk
    if failure:
        _write_line(ready_w, {"error": failure.decode(errors="replace")})
        os.waitpid(pid, 0)
        os._exit(127)
    _write_line(ready_w, {"ok": True})
    os.close(ready_w)
    while True:
        try:
            reaped, status = os.wait()
        except ChildProcessError:
            os._exit(0)
        if reaped == app_pid:
            os.write(status_w, f"{status}\n".encode())
            os._exit(0)


def close_all_but(*keep: int) -> None:
    """Close every descriptor from 3 up except those in keep."""
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 65536)


def enter_work_dir(path: str) -> None:
    os.chdir(path)
    if not os.getcwd().startswith("/"):  # "(unreachable)/...": outside this root
        raise PermissionError(f"work_dir {path!r} is outside the container")


def restrict(spec: ContainerSpec, uid: int, gid: int) -> None:
    """Become the task's user with only its capabilities, no_new_privs and seccomp: last steps."""
    from nomad_driver.runtime import security

    os.setgroups([])
    security.limit_bounding_set(spec.capabilities)
    os.setgid(gid)
    os.setuid(uid)
    if uid == 0:
        security.set_capabilities(spec.capabilities)
    security.set_no_new_privs()
    if spec.seccomp is not None:
        security.load_bpf(base64.b64decode(spec.seccomp_bpf))


class Supervisor:
    def __init__(self, run_dir: str, spec: ContainerSpec) -> None:
        self.run_dir = run_dir
        self.spec = spec.with_seccomp_bpf()
        self.init_pid = 0
        self.started_at = 0.0
        self.status_r = -1
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.waiters: list[socket.socket] = []
        self.cgroup = Cgroup(os.path.basename(run_dir), spec.limits) if spec.limits else None
        self.images = SharedImages(spec.images_dir)
        self.owner = os.path.basename(run_dir)

    def path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def start(self) -> None:
        """Start the container; raise RuntimeError with the reason if it could not start."""
        self.check_image_access()
        sock = self.path(SOCKET_FILE)
        if os.path.exists(sock):
            os.unlink(sock)
        self.listener.bind(sock)
        os.chmod(sock, 0o600)
        self.listener.listen(16)
        out = _open_stdio(self.spec.stdout_path, os.O_WRONLY)
        err = _open_stdio(self.spec.stderr_path, os.O_WRONLY)
        stdin = _open_stdio(self.spec.stdin_path or os.devnull, os.O_RDONLY)
        ready_r, ready_w = os.pipe()
        self.status_r, status_w = os.pipe()
        joined_r, joined_w = os.pipe() if self.cgroup is not None else (-1, -1)
        devices = [(d.host_path, d.read_only) for d in self.spec.devices]
        if self.cgroup is not None and self.spec.limits is not None:
            self.cgroup.create(self.spec.limits, devices, host_root=self.spec.userns is None)
            if self.cgroup.caller:
                # Nested in its caller's cgroup, where no sweep looks: what was made, for the
                # next `pyhpc run` to clear if this one dies unannounced (client.clear_dead_runs).
                write_atomic(self.path(CGROUPS_FILE), json.dumps(self.cgroup.owned()))
        try:
            scratch = self.path("mnt")
            os.makedirs(scratch, exist_ok=True)
            # The image's and datasets' mounts stay while this process lives, whatever happens
            # to the plugin.
            self.images.hold(self.owner, os.getpid())
            userns = self.user_namespace()
            disk = self.disk_layer()
            _unshare_pid()  # our next child is PID 1 of a new PID namespace
        except BaseException:
            self._abandon()
            raise
        pid = os.fork()
        if pid == 0:
            self.listener.close()
            for fd in (ready_r, self.status_r, joined_w):
                if fd >= 0:
                    os.close(fd)
            stdio = (stdin, out, err)
            run_init(self.spec, scratch, userns, ready_w, status_w, stdio, joined_r, disk)
            os._exit(0)
        self.init_pid = pid
        for fd in (ready_w, status_w, stdin, out, err, joined_r):
            if fd >= 0:
                os.close(fd)
        not_joined = ""
        if self.cgroup is not None:
            try:  # while the init builds the root; it waits for this before the task starts
                self.cgroup.join(pid)
                os.write(joined_w, b"1")
            except OSError as error:  # the init says why it stopped, or that it was not moved
                not_joined = f"cannot move the task into its cgroup: {error.strerror or error}"
            finally:
                os.close(joined_w)
        if userns is not None:
            os.close(userns[0])
        if disk >= 0:
            os.close(disk)
        with os.fdopen(ready_r, "r") as ready:
            line = ready.readline()
        message = json.loads(line) if line.strip() else {"error": "container init exited early"}
        if "error" in message:
            os.waitpid(pid, 0)
            self._abandon()
            raise RuntimeError(not_joined if message["error"] == NOT_JOINED else message["error"])
        self.started_at = time.time()

    def disk_layer(self) -> int:
        """The capped disk layer's file, made here (outside the PID namespace) for the init."""
        if self.spec.writable != "disk" or not self.spec.disk_max_mb:
            return -1
        from nomad_driver.runtime import container

        return container.disk_layer_file(self.spec)

    def check_image_access(self) -> None:
        """The task's user, as the host sees it, must be able to read the image it named: the
        plugin mounts as root, so it must not lend a tenant another user's private image."""
        if not self.spec.image_access:
            return
        from nomad_driver.runtime import container
        from nomad_driver.runtime.imagefile import Access, may_read

        uid, gid = container.resolve_user(self.spec.user, self.spec.image_root)
        if self.spec.userns is not None and uid == 0:
            uid = gid = self.spec.userns[0]  # the remapped root
        access = tuple(Access(*a) for a in self.spec.image_access)
        if not may_read(access, uid, gid):
            raise container.ContainerError(
                f"image {self.spec.image}: the task's user (host uid {uid}, gid {gid}) may not "
                "read it; the file and the directories above it must allow that user"
            )

    def _abandon(self) -> None:
        """Undo a start that failed: nothing of it may stay on the host."""
        if self.cgroup is not None:
            self.cgroup.remove()
        self.images.release(self.owner)

    def user_namespace(self) -> tuple[int, IdMaps] | None:
        """Made here, before the PID namespace: its short-lived creator must not be PID 1."""
        from nomad_driver.runtime import container, ids

        uid, gid = container.resolve_user(self.spec.user, self.spec.image_root)
        ids.check_user(self.spec, uid, gid)
        if self.spec.userns is None:
            return None
        maps = container.id_maps(self.spec.userns, uid, gid)
        return container.new_user_namespace(maps), maps

    def serve(self) -> ExitStatus:
        """Answer control requests until the container's init exits."""
        sel = selectors.DefaultSelector()
        pidfd = os.pidfd_open(self.init_pid)
        sel.register(self.listener, selectors.EVENT_READ, "accept")
        sel.register(pidfd, selectors.EVENT_READ, "exit")
        while True:
            for key, _ in sel.select():
                if key.data == "exit":
                    return self.finish()
                conn, _ = self.listener.accept()
                self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(2.0)
        try:
            request = conn.makefile("r").readline().split()
        except OSError:
            conn.close()
            return
        reply = "ok"
        if request == ["wait"]:
            self.waiters.append(conn)
            return
        if request == ["kill"]:
            # The whole cgroup at once (freezer or cgroup.kill), then the PID namespace's init,
            # whose end takes whatever the cgroup did not hold.
            if self.cgroup is not None:
                self.cgroup.kill()
            os.kill(self.init_pid, signal.SIGKILL)
        elif request in (["pause"], ["resume"]):
            if self.cgroup is None or self.cgroup.freezer() is None:
                reply = "error this node has no freezer for the task's cgroup"
            elif not self.cgroup.freeze(request == ["pause"]):
                reply = "error the task did not stop within a second (a process waits on I/O)"
        elif len(request) == 2 and request[0] == "signal" and request[1].isdigit():
            os.kill(self.init_pid, int(request[1]))
        else:
            reply = f"error unknown request {' '.join(request)!r}"
        try:
            conn.sendall((reply + "\n").encode())
        except OSError:
            pass
        conn.close()

    def finish(self) -> ExitStatus:
        _, init_status = os.waitpid(self.init_pid, 0)
        now = time.time()
        os.set_blocking(self.status_r, False)
        try:
            raw = os.read(self.status_r, 64).decode().strip()
        except BlockingIOError:
            raw = ""
        # The init reports the task's own wait status; if the init itself was killed
        # (SIGKILL ends the whole PID namespace), its status is the task's.
        result = ExitStatus.from_wait_status(int(raw) if raw else init_status, now)
        if self.cgroup is not None:
            if self.cgroup.oom_kills() > 0:
                result = result._replace(oom_killed=True)
            self.cgroup.remove()
        self.images.release(self.owner, self.spec.image_linger)
        write_atomic(self.path(EXIT_FILE), result.to_json())
        for conn in self.waiters:
            try:
                conn.sendall((result.to_json() + "\n").encode())
            except OSError:
                pass
            conn.close()
        self.listener.close()
        try:
            os.unlink(self.path(SOCKET_FILE))
        except FileNotFoundError:
            pass
        return result


def _open_stdio(path: str, flags: int) -> int:
    """/proc/self/fd/N is this process's own descriptor N, shared (with its file offset) rather
    than reopened: `pyhpc run > file` then writes where the shell expects.

    Nomad's log FIFOs sit in alloc/logs, which the task can write: a task restarted in the same
    allocation could have left a symlink there, for the file or the directory (exec2's
    CVE-2026-8052), or swap one in while we open it. So the file is opened from the directory
    above its own (alloc, whose entries a task cannot rename) with no symlink on the way."""
    prefix = "/proc/self/fd/"
    if path.startswith(prefix) and path[len(prefix) :].isdigit():
        return os.dup(int(path[len(prefix) :]))
    if path == os.devnull:  # root's own /dev: nothing a task can swap
        return os.open(path, flags | os.O_CLOEXEC)
    from nomad_driver.runtime import linux

    directory, name = os.path.split(os.path.normpath(path))
    anchor, sub = os.path.split(directory)
    try:
        top = os.open(anchor or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # Logmon holds the read ends of Nomad's FIFOs; opening for writing returns at once.
            rel = os.path.join(sub, name) if sub else name
            return linux.openat2(top, rel, flags | os.O_NOFOLLOW, linux.STRICT)
        finally:
            os.close(top)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EXDEV):
            raise PermissionError(f"{path}: a symlink on its path; refusing to open it") from err
        raise


def _unshare_pid() -> None:
    from nomad_driver.runtime import linux

    linux.unshare(linux.CLONE_NEWPID)


def main(argv: list[str]) -> int:
    run_dir, ready_fd = argv[1], int(argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        with open(os.path.join(run_dir, SPEC_FILE), encoding="utf-8") as f:
            spec = ContainerSpec.from_json(f.read())
        supervisor = Supervisor(run_dir, spec)
        supervisor.start()
    except Exception as error:  # noqa: BLE001 - every failure goes back to the plugin
        _write_line(ready_fd, {"error": str(error)})
        return 1
    started: dict[str, object] = {
        "init_pid": supervisor.init_pid,
        "started_at": supervisor.started_at,
    }
    write_atomic(os.path.join(run_dir, STARTED_FILE), json.dumps(started))
    try:
        _write_line(ready_fd, started)
    except BrokenPipeError:
        pass  # the plugin that started us died; the next one adopts us through STARTED_FILE
    os.close(ready_fd)
    result = supervisor.serve()
    print(f"task exited: {result.to_json()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
