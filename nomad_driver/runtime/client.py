"""The plugin's side of a task supervisor: start one, wait for it, signal it, read its result.

Everything goes through the task's run directory (spec, state, exit file and control socket),
so a plugin process that did not start the supervisor can still drive it.
"""

from __future__ import annotations

import functools
import json
import os
import select
import shutil
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from nomad_driver.runtime.container import ContainerError
from nomad_driver.runtime.imagefile import ImageError, ImageFile, open_image
from nomad_driver.runtime.imagemount import SharedImages
from nomad_driver.runtime.spec import BindMount, ContainerSpec, ExitStatus
from nomad_driver.runtime.supervisor import EXIT_FILE, SOCKET_FILE, SPEC_FILE, STARTED_FILE
from nomad_driver.util.errors import PyhpcError

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))


@functools.cache
def helper_path() -> str:
    """Our helpers run with `python -S` (no site: 5 MB less per task), so they get the few
    directories they import from explicitly: this package's and pyseccomp's. Worked out on
    first use: `pyhpc run` starts no helper."""
    import importlib.util

    paths = [PACKAGE_PARENT]
    spec = importlib.util.find_spec("pyseccomp")
    if spec is not None and spec.origin:
        origin = os.path.realpath(spec.origin)
        # A package's origin is its __init__.py; a plain module's is the file itself.
        up = 2 if spec.submodule_search_locations else 1
        for _ in range(up):
            origin = os.path.dirname(origin)
        paths.append(origin)
    return ":".join(dict.fromkeys(paths))


# -S: no site module; -E is not used because PYTHONPATH carries helper_path().
PYTHON = [sys.executable, "-S"]


class StartError(PyhpcError):
    """The container did not start; the message says why, for the task's events.
    recoverable: a retry may succeed (the node was slow), unlike a bad image or command."""

    def __init__(self, message: str, recoverable: bool = False) -> None:
        super().__init__(message)
        self.recoverable = recoverable


@dataclass(frozen=True)
class Started:
    run_dir: str
    supervisor_pid: int
    init_pid: int
    started_at: float


def helper_env() -> dict[str, str]:
    """Environment of our helper processes (supervisor, exec): nothing of the plugin's own."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": helper_path()}


def acquire_image(
    spec: ContainerSpec,
    owner: str,
    image: ImageFile | None,
    datasets: Sequence[tuple[ImageFile, str]] = (),
) -> ContainerSpec:
    """spec with its image mounted (shared per digest) and referenced by owner. image: the
    file as the policy opened and checked it; None opens spec.image, a path the caller
    trusts (tests, benchmarks), the same way. Either way the mount comes from the descriptor.
    datasets: (opened SquashFS, container path) pairs, mounted the same way and bound
    read-only into the container."""
    images = SharedImages(spec.images_dir)
    opened = image or open_image(spec.image)
    try:
        root = images.acquire(opened, owner)
        binds = [BindMount(images.acquire(f, owner), path, True) for f, path in datasets]
    finally:
        if image is None:
            opened.close()
    access = opened.access if image is not None else spec.image_access
    return spec._replace(image_root=root, image_access=access, mounts=(*spec.mounts, *binds))


def start(
    spec: ContainerSpec,
    run_dir: str,
    timeout: float = 60.0,
    image: ImageFile | None = None,
    datasets: Sequence[tuple[ImageFile, str]] = (),
) -> Started:
    """Launch a supervisor for spec and return once the task's command is running.
    datasets: (opened SquashFS, container path) pairs, mounted as images are (once per digest,
    shared) and bound read-only into the container."""
    os.makedirs(run_dir, mode=0o700, exist_ok=False)
    images, owner = SharedImages(spec.images_dir), os.path.basename(run_dir)
    try:
        spec = acquire_image(spec.with_seccomp_bpf(), owner, image, datasets)
    except (ContainerError, ImageError, FileNotFoundError) as err:
        images.release(owner)
        raise StartError(str(err)) from err
    try:
        return _start_supervisor(spec, run_dir, timeout)
    except BaseException:
        images.release(owner)
        raise


class _ForkServer:
    """This process's forkserver (see forkserver.py), started on first use and again if it
    died; one request at a time."""

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()
        self.sock: socket.socket | None = None

    def spawn(self, run_dir: str, ready: int, log: int) -> int:
        """A supervisor for run_dir, handed ready and log; its pid."""
        with self.lock:
            for attempt in range(2):
                if self.sock is None:
                    self.sock = self._start()
                try:
                    socket.send_fds(self.sock, [os.fsencode(run_dir)], [ready, log])
                    reply = b""
                    while not reply.endswith(b"\n"):
                        chunk = self.sock.recv(256)
                        if not chunk:
                            raise ConnectionResetError("the forkserver ended")
                        reply += chunk
                except OSError:
                    self.sock.close()
                    self.sock = None
                    if attempt:
                        raise
                    continue
                word, _, rest = reply.decode().strip().partition(" ")
                if word != "pid":
                    raise OSError(f"the forkserver could not fork a supervisor: {rest}")
                return int(rest)
        raise AssertionError("unreachable")

    @staticmethod
    def _start() -> socket.socket:
        import subprocess
        import threading

        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [*PYTHON, "-m", "nomad_driver.runtime.forkserver", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                # Its own session: neither the agent's Ctrl-C nor the plugin's death reaches
                # it or the supervisors it forks.
                start_new_session=True,
                env=helper_env(),
            )
        finally:
            theirs.close()
        threading.Thread(target=proc.wait, name="forkserver-reaper", daemon=True).start()
        return ours


_FORK_SERVER = _ForkServer()


def _start_supervisor(spec: ContainerSpec, run_dir: str, timeout: float) -> Started:
    with open(os.path.join(run_dir, SPEC_FILE), "w", encoding="utf-8") as f:
        f.write(spec.to_json())
    ready_r, ready_w = os.pipe()
    log = os.open(
        os.path.join(run_dir, "supervisor.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
    )
    try:
        pid = _FORK_SERVER.spawn(run_dir, ready_w, log)
    except OSError as err:
        os.close(ready_r)
        raise StartError(f"cannot start the task supervisor: {err}", recoverable=True) from err
    finally:
        os.close(ready_w)
        os.close(log)
    try:
        line = _read_line(ready_r, timeout)
    finally:
        os.close(ready_r)
    if not line:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        raise StartError(
            f"the task supervisor did not report within {timeout:.0f}s; "
            f"see {run_dir}/supervisor.log",
            recoverable=True,
        )
    message = json.loads(line)
    if "error" in message:
        raise StartError(str(message["error"]))
    return Started(run_dir, pid, int(message["init_pid"]), float(message["started_at"]))


def read_spec(run_dir: str) -> ContainerSpec:
    with open(os.path.join(run_dir, SPEC_FILE), encoding="utf-8") as f:
        return ContainerSpec.from_json(f.read())


def adopt(run_dir: str, timeout: float = 15.0) -> Started | None:
    """The task an earlier start in run_dir launched, if its command got to run (a plugin killed
    in the middle of StartTask leaves that start's supervisor going); None when it never will,
    after which the directory is the caller's to clear (`discard`)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(os.path.join(run_dir, STARTED_FILE), encoding="utf-8") as f:
                record = json.loads(f.read())
            pid = _supervisor_of(run_dir)
            return Started(run_dir, pid or 0, int(record["init_pid"]), float(record["started_at"]))
        except FileNotFoundError:
            pass
        if _supervisor_of(run_dir) is None or time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _supervisor_of(run_dir: str) -> int | None:
    """The pid of the supervisor process serving run_dir, if one runs."""
    return supervisors().get(run_dir)


def supervisors() -> dict[str, int]:
    """Every running task supervisor on this node: run directory -> pid. (A container init is a
    fork of its supervisor with the same command line, in the task's PID namespace.)"""
    marker = b"nomad_driver.runtime.supervisor\0"
    forked = b"nomad_driver.runtime.forkserver\0"  # its supervisors work in their run dirs
    by_dir: dict[str, dict[int, int]] = {}
    own_pid_ns = os.readlink("/proc/self/ns/pid")
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
                if marker not in cmdline and forked not in cmdline:
                    continue
                # A task can name itself anything: only host root in the host's PID namespace
                # is a supervisor (a task runs remapped, or in its own PID namespace).
                # Every uid root, not only the effective one: a setuid-root program a tenant
                # started (su at its password prompt) keeps the arguments the tenant gave it.
                if not _all_root(entry) or os.readlink(f"/proc/{entry}/ns/pid") != own_pid_ns:
                    continue
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if marker in cmdline:
                run_dir = cmdline.split(marker, 1)[1].split(b"\0")[0].decode(errors="replace")
            else:
                try:
                    run_dir = os.readlink(f"/proc/{entry}/cwd").removesuffix(" (deleted)")
                except OSError:
                    continue
                if run_dir == "/" or not run_dir.startswith("/"):
                    continue  # the forkserver itself
            by_dir.setdefault(run_dir, {})[int(entry)] = ppid
    return {
        run_dir: min(p for p, parent in pids.items() if parent not in pids)
        for run_dir, pids in by_dir.items()
        if any(parent not in pids for parent in pids.values())
    }


def _all_root(pid: str) -> bool:
    """Real, effective, saved and filesystem uid all 0 (/proc/PID/status)."""
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("Uid:"):
                return line.split()[1:] == ["0", "0", "0", "0"]
    return False


def discard(run_dir: str, images_dir: str) -> None:
    """Clear a start that never ran its command: its image reference and its directory."""
    SharedImages(images_dir).release(os.path.basename(run_dir))
    remove(run_dir)


def _read_line(fd: int, timeout: float) -> str:
    data = b""
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return ""
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace")


def exit_status(run_dir: str) -> ExitStatus | None:
    try:
        with open(os.path.join(run_dir, EXIT_FILE), encoding="utf-8") as f:
            return ExitStatus.from_json(f.read())
    except FileNotFoundError:
        return None


def _request(run_dir: str, line: str, timeout: float | None) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.path.join(run_dir, SOCKET_FILE))
        sock.sendall((line + "\n").encode())
        return sock.makefile("r").readline().strip()


def wait(run_dir: str) -> ExitStatus:
    """Block until the task has exited and return how."""
    done = exit_status(run_dir)
    if done is not None:
        return done
    try:
        reply = _request(run_dir, "wait", None)
    except OSError:
        reply = ""
    if reply:
        return ExitStatus.from_json(reply)
    # The supervisor went away: it wrote the exit file first, unless it was killed itself.
    done = exit_status(run_dir)
    if done is not None:
        return done
    return ExitStatus(exit_code=-1, err="the task supervisor died; the task's exit status is lost")


def alive(run_dir: str) -> bool:
    return os.path.exists(os.path.join(run_dir, SOCKET_FILE)) and exit_status(run_dir) is None


def send_signal(run_dir: str, signum: int) -> None:
    if exit_status(run_dir) is not None:
        return
    reply = _request(run_dir, "kill" if signum == signal.SIGKILL else f"signal {signum}", 5.0)
    if reply != "ok":
        raise OSError(f"supervisor refused the signal: {reply}")


def pause(run_dir: str, paused: bool) -> None:
    """Freeze every process of the task (or let them go on), through its cgroup's freezer."""
    reply = _request(run_dir, "pause" if paused else "resume", 5.0)
    if reply != "ok":
        raise OSError(reply.removeprefix("error "))


def start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (/proc/PID/stat field 22): with
    the pid, what names one process for good (a later one with the pid starts later)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def run_name(pid: int) -> str:
    """A `pyhpc run`'s run directory name: run-PID-STARTTICKS-NS."""
    return f"run-{pid}-{start_ticks(pid)}-{time.time_ns()}"


def _running_since(pid: int, ticks: str) -> bool:
    """Whether the process that made a run still runs: the pid's process started at the very
    tick recorded in the run's name. A process that got the pid later (pids wrap; a tenant can
    make one land on a given pid) does not keep a dead run's leftovers alive."""
    return ticks.isdigit() and start_ticks(pid) == int(ticks)


def clear_dead_runs(tasks_dir: str, images_dir: str, prefix: str = "run-") -> list[str]:
    """Clear what `pyhpc run`s killed outright left (run directory, image reference, cgroups):
    runs named PREFIX<pid>-..., whose pid is gone and whose cgroups are empty (a container
    still running keeps its run). Returns the runs cleared."""
    from nomad_driver.runtime import cgroups
    from nomad_driver.runtime.supervisor import CGROUPS_FILE

    cleared: list[str] = []
    try:
        names = [n for n in os.listdir(tasks_dir) if n.startswith(prefix)]
    except OSError:
        return cleared
    for name in names:
        pid, _, when = name[len(prefix) :].partition("-")
        if not pid.isdigit() or _running_since(int(pid), when.partition("-")[0]):
            continue
        run_dir = os.path.join(tasks_dir, name)
        try:
            with open(os.path.join(run_dir, CGROUPS_FILE), encoding="utf-8") as f:
                made = [str(p) for p in json.load(f)]
        except FileNotFoundError:
            made = []
        except (OSError, ValueError):
            continue
        for path in made:
            ours = os.path.basename(path).startswith(cgroups.PREFIX) and ".." not in path
            if ours and path.startswith(cgroups.ROOT + "/"):
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    pass
                except OSError:
                    break  # still in use: the container runs on
        if any(os.path.isdir(p) for p in made):
            continue
        SharedImages(images_dir).release(name)
        shutil.rmtree(run_dir, ignore_errors=True)
        cleared.append(name)
    return cleared


def remove(run_dir: str) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
