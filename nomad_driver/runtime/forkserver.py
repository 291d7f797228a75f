"""Task supervisors forked from one warm process instead of each starting Python afresh.

A supervisor started as `python -S -m nomad_driver.runtime.supervisor` spent 35 ms of every
task start loading the interpreter and the runtime before it did any work. This server loads
them once, per plugin (or `client.start` caller), and forks a supervisor for each request: it
is single-threaded (forking a threaded gRPC process is not safe), and talks only over the
socketpair its starter made, so nothing else on the node can ask it for anything.

A forked supervisor is what the exec'd one was: its own session, stdin /dev/null, stdout and
stderr its log, the ready descriptor it was handed; it runs supervisor.main. Its command line is
this server's, so it makes its run directory its working directory, which is how
client.supervisors() tells which task it serves. The server ignores SIGCHLD (the kernel reaps
what it forked) and ends when its starter's end of the socket closes; supervisors live on.

Run as: python -S -m nomad_driver.runtime.forkserver FD
"""

from __future__ import annotations

import os
import signal
import socket
import sys

# Everything a supervisor and its container init use, loaded before the first fork.
from nomad_driver.runtime import (  # noqa: F401
    cgroups,
    container,
    ids,
    imagemount,
    linux,
    security,
    spec,
    supervisor,
)

MARKER = "nomad_driver.runtime.forkserver"


def serve(sock: socket.socket) -> None:
    import gc

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.chdir("/")
    gc.collect()
    gc.freeze()  # what is loaded stays shared with the children, untouched by their GC
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, 4096, 2)
        except (ConnectionResetError, InterruptedError):
            return
        if not message:
            return
        try:
            run_dir = os.fsdecode(message)
            ready, log = fds
            pid = os.fork()
        except (ValueError, OSError) as err:
            for fd in fds:
                os.close(fd)
            sock.sendall(f"error {err}\n".encode())
            continue
        if pid == 0:
            sock.close()
            _child(run_dir, ready, log)
        os.close(ready)
        os.close(log)
        sock.sendall(f"pid {pid}\n".encode())


def _child(run_dir: str, ready: int, log: int) -> None:
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the supervisor waits for its init
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        for fd in (null, log):
            os.close(fd)
        os.set_inheritable(ready, False)
        os.chdir(run_dir)  # client.supervisors() finds the task it serves here
        code = supervisor.main(["supervisor", run_dir, str(ready)])
    except BaseException as err:  # noqa: BLE001 - a supervisor never returns into the server
        try:
            os.write(2, f"supervisor: {err!r}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(code)


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])))
