"""Run an extra command inside a running container, under the task's own restrictions.

`nomad alloc exec` and script checks use this instead of a bare nsenter: the command joins the
container's namespaces, root and cgroup(s), and gets the same user, capabilities, no_new_privs
and seccomp filter as the task itself: what it runs counts against the task's memory, CPU and
process limits, as the task's own processes do. A separate small process, so the plugin's
threads never fork.

Run as: python -m nomad_driver.runtime.enter RUN_DIR INIT_PID -- COMMAND [ARGS...]
"""

from __future__ import annotations

import json
import os
import signal
import sys

from nomad_driver.runtime import container, ids, linux, security
from nomad_driver.runtime.cgroups import Cgroup
from nomad_driver.runtime.spec import ContainerSpec
from nomad_driver.runtime.supervisor import SPEC_FILE, enter_work_dir, restrict

NAMESPACES = (
    ("cgroup", linux.CLONE_NEWCGROUP),
    ("net", linux.CLONE_NEWNET),
    ("ipc", linux.CLONE_NEWIPC),
    ("uts", linux.CLONE_NEWUTS),
    ("pid", linux.CLONE_NEWPID),
    ("mnt", linux.CLONE_NEWNS),
)


def argv(run_dir: str, init_pid: int, command: list[str]) -> list[str]:
    """The command line the plugin spawns for one exec session."""
    if not command:
        raise container.ContainerError("exec needs a command")
    return [
        sys.executable,
        "-m",
        "nomad_driver.runtime.enter",
        run_dir,
        str(init_pid),
        "--",
        *command,
    ]


def task_user_namespace(init_pid: int) -> int:
    """The task runs in a user namespace its init stays out of: take it from init's child."""
    with open(f"/proc/{init_pid}/task/{init_pid}/children", encoding="ascii") as f:
        children = f.read().split()
    if not children:
        raise OSError(f"the container's init (pid {init_pid}) has no task process")
    return os.open(f"/proc/{children[0]}/ns/user", os.O_RDONLY)


def main(args: list[str]) -> int:
    run_dir, init_pid, command = args[1], int(args[2]), args[4:]
    with open(os.path.join(run_dir, SPEC_FILE), encoding="utf-8") as f:
        spec = ContainerSpec.from_json(f.read()).with_seccomp_bpf()  # before the chroot
    fds = [(os.open(f"/proc/{init_pid}/ns/{name}", os.O_RDONLY), kind) for name, kind in NAMESPACES]
    root = os.open(f"/proc/{init_pid}/root", os.O_RDONLY | os.O_DIRECTORY)
    userns = task_user_namespace(init_pid) if spec.userns is not None else -1
    # Opened here, written by the child: the cgroup files are out of reach after the chroot, and
    # this waiting parent stays out of the task's accounting.
    cgroups = [
        os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)
        for path in (Cgroup(os.path.basename(run_dir), spec.limits).paths() if spec.limits else [])
    ]
    for fd, kind in fds:
        linux.setns(fd, kind)
        os.close(fd)
    os.fchdir(root)
    os.chroot(".")
    os.close(root)
    pid = os.fork()  # only a child lands in the container's PID namespace
    if pid == 0:
        try:
            for fd in cgroups:
                os.write(fd, b"0")
            uid, gid = container.resolve_user(spec.user)
            ids.check_user(spec, uid, gid)
            env = container.with_home(spec.env, uid)
            path = container.find_command(command[0], env)
            if userns >= 0:  # as the task's init does: checks first, as host root
                linux.setns(userns, linux.CLONE_NEWUSER)
            enter_work_dir(spec.work_dir)
            restrict(spec, uid, gid)
            os.execve(path, command, env)
        except (OSError, container.ContainerError, security.PolicyError) as err:
            sys.stderr.write(f"pyhpc exec: {err}\n")
        os._exit(127)
    for fd in cgroups:
        os.close(fd)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, lambda s, _f: os.kill(pid, s))
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):  # end as the command did (SIGKILL and SIGSTOP need no reset)
        if os.WTERMSIG(status) not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except (OSError, ValueError, IndexError, json.JSONDecodeError) as error:
        # Most often an exec racing the task's end (its namespaces are being torn down).
        ended = len(sys.argv) > 2 and not os.path.exists(f"/proc/{sys.argv[2]}/ns/mnt")
        why = "the task has ended" if ended else str(error)
        sys.stderr.write(f"pyhpc exec: cannot enter the container: {why}\n")
        sys.exit(126)
