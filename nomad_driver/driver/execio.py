"""Plumbing for `nomad alloc exec`: pipes or a pty between the gRPC stream and a process."""

from __future__ import annotations

import fcntl
import os
import pty
import selectors
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

import grpc

from nomad_driver.proto import driver_pb2

CHUNK = 16 * 1024
# After the command exits, a background child may still hold the output open: drain for a
# moment, then finish so the session does not hang (Nomad's conformance rule).
DRAIN_SECONDS = 0.2


def _resize(fd: int, height: int, width: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def _feed(requests: Iterator[Any], stdin: IO[bytes], tty: bool) -> None:
    """Copy stdin and resize requests into the process until the client closes its side. The
    thread owns stdin (its own descriptor: a dup of the pty's master, or the pipe) and closes
    it, once: a descriptor number closed twice, or written after its close, could be another
    thread's by then (a supervisor socket, another session's pipe)."""
    open_stdin = True
    try:
        for req in requests:
            if req.HasField("tty_size") and tty:
                _resize(stdin.fileno(), req.tty_size.height, req.tty_size.width)
            if req.HasField("stdin") and open_stdin:
                if req.stdin.data:
                    stdin.write(req.stdin.data)
                    stdin.flush()
                if req.stdin.close:
                    if tty:
                        stdin.write(b"\x04")  # end of file for a terminal
                        stdin.flush()
                    else:
                        open_stdin = False
                        stdin.close()
    except (OSError, grpc.RpcError, ValueError):
        pass
    finally:
        try:
            stdin.close()
        except OSError:
            pass


def _out(
    channel: str, data: bytes = b"", close: bool = False
) -> driver_pb2.ExecTaskStreamingResponse:
    op = driver_pb2.ExecTaskStreamingIOOperation(data=data, close=close)
    if channel == "stdout":
        return driver_pb2.ExecTaskStreamingResponse(stdout=op)
    return driver_pb2.ExecTaskStreamingResponse(stderr=op)


def stream(
    argv: list[str],
    env: dict[str, str],
    tty: bool,
    requests: Iterator[Any],
    context: grpc.ServicerContext,
) -> Iterator[Any]:
    if tty:
        master, slave = pty.openpty()
        _resize(master, 24, 80)
        proc = subprocess.Popen(
            argv, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True
        )
        os.close(slave)
        outputs = {master: "stdout"}
        stdin: IO[bytes] = os.fdopen(os.dup(master), "wb", buffering=0)
    else:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert proc.stdin and proc.stdout and proc.stderr
        outputs = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
        stdin = proc.stdin
    threading.Thread(target=_feed, args=(requests, stdin, tty), daemon=True).start()

    def cancel() -> None:
        if proc.poll() is None:
            proc.kill()

    context.add_callback(cancel)
    sel = selectors.DefaultSelector()
    for fd in outputs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    drain_until: float | None = None
    while outputs:
        if drain_until is None and proc.poll() is not None:
            drain_until = time.monotonic() + DRAIN_SECONDS
        if drain_until is not None and time.monotonic() > drain_until:
            break
        for key, _ in sel.select(timeout=0.05):
            fd = int(key.fd)
            try:
                data = os.read(fd, CHUNK)
            except BlockingIOError:
                continue
            except OSError:  # EIO: the pty's other side is closed
                data = b""
            if data:
                yield _out(outputs[fd], data)
            else:
                sel.unregister(fd)
                outputs.pop(fd)
    sel.close()
    code = proc.wait()
    yield _out("stdout", close=True)
    yield _out("stderr", close=True)
    result = driver_pb2.ExitResult(
        exit_code=128 - code if code < 0 else code, signal=-code if code < 0 else 0
    )
    yield driver_pb2.ExecTaskStreamingResponse(exited=True, result=result)
    if tty:
        os.close(master)  # the feeding thread closes its own dup
    else:
        for out in (proc.stdout, proc.stderr):
            if out is not None:
                out.close()
