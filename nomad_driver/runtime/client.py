"""The plugin's side of a task supervisor: start one, wait for it, signal it, read its result.

Everything goes through the task's run directory (spec, state, exit file and control socket),
so a plugin process that did not start the supervisor can still drive it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from nomad_driver.runtime.container import ContainerError
from nomad_driver.runtime.imagemount import SharedImages
from nomad_driver.runtime.spec import ContainerSpec, ExitStatus
from nomad_driver.runtime.supervisor import EXIT_FILE, SOCKET_FILE, SPEC_FILE

PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


def _helper_path() -> str:
    """Our helpers run with `python -S` (no site: 5 MB less per task), so they get the few
    directories they import from explicitly: this package's and pyseccomp's."""
    paths = [PACKAGE_PARENT]
    spec = importlib.util.find_spec("pyseccomp")
    if spec is not None and spec.origin:
        origin = Path(spec.origin).resolve()
        # A package's origin is its __init__.py; a plain module's is the file itself.
        paths.append(str(origin.parents[1] if spec.submodule_search_locations else origin.parent))
    return ":".join(dict.fromkeys(paths))


HELPER_PATH = _helper_path()
# -S: no site module; -E is not used because PYTHONPATH carries HELPER_PATH.
PYTHON = [sys.executable, "-S"]


class StartError(Exception):
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
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": HELPER_PATH}


def start(spec: ContainerSpec, run_dir: str, timeout: float = 60.0) -> Started:
    """Launch a supervisor for spec and return once the task's command is running."""
    os.makedirs(run_dir, mode=0o700, exist_ok=False)
    images, owner = SharedImages(spec.images_dir), os.path.basename(run_dir)
    try:
        spec = spec.with_seccomp_bpf()._replace(image_root=images.acquire(spec.image, owner))
    except ContainerError as err:
        raise StartError(str(err)) from err
    try:
        return _start_supervisor(spec, run_dir, timeout)
    except BaseException:
        images.release(owner)
        raise


def _start_supervisor(spec: ContainerSpec, run_dir: str, timeout: float) -> Started:
    with open(os.path.join(run_dir, SPEC_FILE), "w", encoding="utf-8") as f:
        f.write(spec.to_json())
    ready_r, ready_w = os.pipe()
    log = os.open(
        os.path.join(run_dir, "supervisor.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
    )
    try:
        proc = subprocess.Popen(
            [*PYTHON, "-m", "nomad_driver.runtime.supervisor", run_dir, str(ready_w)],
            pass_fds=(ready_w,),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            # Its own session: neither the agent's Ctrl-C nor the plugin's death reaches it.
            start_new_session=True,
            env=helper_env(),
        )
    finally:
        os.close(ready_w)
        os.close(log)
    # Reap it while this plugin lives; after a plugin restart init does.
    threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()
    try:
        line = _read_line(ready_r, timeout)
    finally:
        os.close(ready_r)
    if not line:
        proc.kill()
        raise StartError(
            f"the task supervisor did not report within {timeout:.0f}s; "
            f"see {run_dir}/supervisor.log",
            recoverable=True,
        )
    message = json.loads(line)
    if "error" in message:
        raise StartError(str(message["error"]))
    return Started(run_dir, proc.pid, int(message["init_pid"]), float(message["started_at"]))


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


def remove(run_dir: str) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
