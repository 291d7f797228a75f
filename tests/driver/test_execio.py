"""`nomad alloc exec` plumbing: each descriptor is closed once, by its one owner. A number
closed twice (or written after its close) is, by then, often another thread's: the supervisor
socket of a SignalTask, another session's pipe (an MPI launcher runs many sessions at once)."""

from __future__ import annotations

import errno
import gc
import socket
import threading
from collections.abc import Iterator
from typing import Any

from nomad_driver.driver import execio
from nomad_driver.proto import driver_pb2


class Context:
    def add_callback(self, callback: Any) -> None:
        self.callback = callback


def session(data: bytes) -> Iterator[Any]:
    yield driver_pb2.ExecTaskStreamingRequest(
        stdin=driver_pb2.ExecTaskStreamingIOOperation(data=data)
    )
    yield driver_pb2.ExecTaskStreamingRequest(
        stdin=driver_pb2.ExecTaskStreamingIOOperation(close=True)
    )


def run(tty: bool, data: bytes) -> bytes:
    out = b""
    for reply in execio.stream(["/bin/cat"], {"PATH": "/bin"}, tty, session(data), Context()):
        if reply.HasField("stdout"):
            out += reply.stdout.data
    return out


def test_stdin_reaches_the_command_and_its_output_comes_back() -> None:
    assert run(False, b"hello\n") == b"hello\n"
    assert b"hello" in run(True, b"hello\n")


def test_no_descriptor_of_another_thread_is_closed_under_it() -> None:
    """Sessions come and go while another thread uses sockets it keeps opening: none of its
    sockets may ever be closed under it (EBADF)."""
    failures: list[OSError] = []
    stop = threading.Event()

    def other_thread() -> None:
        while not stop.is_set():
            a, b = socket.socketpair()
            try:
                for _ in range(20):
                    a.sendall(b"x")
                    b.recv(1)
                    gc.collect(0)
            except OSError as err:
                if err.errno == errno.EBADF:
                    failures.append(err)
            finally:
                for s in (a, b):
                    try:
                        s.close()
                    except OSError:
                        pass

    worker = threading.Thread(target=other_thread)
    worker.start()
    try:
        for i in range(60):
            assert run(i % 4 == 0, b"data\n").strip().endswith(b"data")
            gc.collect()
    finally:
        stop.set()
        worker.join()
    assert failures == []
