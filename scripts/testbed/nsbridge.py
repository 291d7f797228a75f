"""Carry TCP from 127.0.0.1:PORT inside network namespaces to 127.0.0.1:PORT of this one
(or to 127.0.0.1:OUTSIDE, for INSIDE:OUTSIDE).

The test bed's Nomad server (and Consul) listen on 127.0.0.1 only; a client agent in its own
network namespace (a second "node" on this machine) reaches them through this bridge. One
process: it enters each namespace to open a listener there, comes back, and connects out from
here (a socket keeps the namespace it was made in).

    python3 nsbridge.py PORT|INSIDE:OUTSIDE[,...] NETNS [NETNS...]   (as root; until killed)
"""

from __future__ import annotations

import ctypes
import os
import selectors
import socket
import sys
import threading

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def listener_in(netns: str, port: int) -> socket.socket:
    home = f"/proc/self/task/{threading.get_native_id()}/ns/net"
    keep = os.open(home, os.O_RDONLY)
    try:
        setns(f"/run/netns/{netns}")
        sock = socket.create_server(("127.0.0.1", port))
    finally:
        if _libc.setns(keep, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back")
        os.close(keep)
    return sock


def pipe(a: socket.socket, b: socket.socket) -> None:
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(ports: dict[int, int], netns: list[str]) -> None:
    sel = selectors.DefaultSelector()
    for name in netns:
        for inside, outside in ports.items():
            sel.register(listener_in(name, inside), selectors.EVENT_READ, outside)
    for inside, outside in ports.items():
        print(f"nsbridge: 127.0.0.1:{inside} in {', '.join(netns)} -> 127.0.0.1:{outside}")
    sys.stdout.flush()
    while True:
        for key, _ in sel.select():
            inside, _ = key.fileobj.accept()  # type: ignore[union-attr]
            try:
                outside = socket.create_connection(("127.0.0.1", key.data), timeout=5)
                outside.settimeout(None)
            except OSError:
                inside.close()
                continue
            for a, b in ((inside, outside), (outside, inside)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    pairs = [spec.partition(":") for spec in sys.argv[1].split(",")]
    serve({int(a): int(b or a) for a, _, b in pairs}, sys.argv[2:])
