"""The go-plugin server side: cookie check, handshake line, unix socket and the
infrastructure services (health, controller, stdio, broker) that every go-plugin host expects.

It knows nothing of Nomad's driver API: callers pass a function that registers their services.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nomad_driver.goplugin import timing
from nomad_driver.goplugin.workers import ElasticExecutor
from nomad_driver.proto import goplugin_pb2, goplugin_pb2_grpc
from nomad_driver.util.errors import PyhpcError

log = logging.getLogger("pyhpc.goplugin")

CORE_PROTOCOL_VERSION = 1
# Sized for Nomad's long-lived calls: 4 per plugin plus WaitTask and TaskStats per task,
# plus exec sessions (protocol fact sheet §8.12). Each holds a thread for as long as it lasts:
# at 512, a node stopped starting tasks at about 250 running, every StartTask queued behind
# the streams (bench/results/scale.md). Threads are made only as calls come (workers.py).
MAX_WORKERS = 4096
MAX_MESSAGE = 2**31 - 1


@dataclass(frozen=True)
class Handshake:
    """What a host and plugin agree on before talking gRPC."""

    cookie_key: str
    cookie_value: str
    app_protocol_version: int


# Nomad's own handshake, the same for its driver and device plugins.
NOMAD_HANDSHAKE = Handshake(
    cookie_key="NOMAD_PLUGIN_MAGIC_COOKIE",
    cookie_value="e4327c2e01eabfd75a8a67adb114fb34a757d57eee7728d857a8cec6e91a7255",
    app_protocol_version=2,
)


class HandshakeError(PyhpcError):
    """The process was not started by a go-plugin host that speaks our protocol."""


def check_environment(hs: Handshake, environ: dict[str, str] | os._Environ[str]) -> None:
    """Refuse to run unless the host set the magic cookie and accepts our protocol version."""
    if environ.get(hs.cookie_key) != hs.cookie_value:
        raise HandshakeError(
            "This binary is a plugin. These are not meant to be executed directly.\n"
            "Nomad starts it from its plugin_dir; to install it there run\n"
            "  pyhpc install-plugin --plugin-dir /opt/nomad/plugins"
        )
    offered = environ.get("PLUGIN_PROTOCOL_VERSIONS", "")
    versions = {v.strip() for v in offered.split(",") if v.strip()}
    if versions and str(hs.app_protocol_version) not in versions:
        raise HandshakeError(
            f"the host accepts plugin protocol versions {sorted(versions)}, "
            f"this plugin speaks {hs.app_protocol_version}"
        )


def handshake_line(hs: Handshake, socket_path: str) -> str:
    """CORE|APP|NETWORK|ADDRESS|PROTOCOL: no cert field (Nomad never uses AutoMTLS)."""
    return f"{CORE_PROTOCOL_VERSION}|{hs.app_protocol_version}|unix|{socket_path}|grpc\n"


class _Controller(goplugin_pb2_grpc.GRPCControllerServicer):  # type: ignore[misc]
    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop

    def Shutdown(self, request: object, context: grpc.ServicerContext) -> object:
        log.debug("shutdown requested by the host")
        self._stop.set()
        return goplugin_pb2.Empty()


class _Stdio(goplugin_pb2_grpc.GRPCStdioServicer):  # type: ignore[misc]
    """Nomad discards plugin stdio, so hold the stream open and send nothing."""

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop

    def StreamStdio(self, request: object, context: grpc.ServicerContext) -> Iterator[object]:
        done = threading.Event()
        context.add_callback(done.set)
        while not done.wait(1.0) and not self._stop.is_set():
            pass
        return iter(())


class _Broker(goplugin_pb2_grpc.GRPCBrokerServicer):  # type: ignore[misc]
    """Nomad never brokers sub-connections; drain the stream until the host closes it."""

    def StartStream(
        self, request_iterator: Iterator[object], context: grpc.ServicerContext
    ) -> Iterator[object]:
        for _ in request_iterator:
            pass
        return iter(())


SOCKET_DIR_PREFIX = "pyhpc-plugin-"


def remove_stale_socket_dirs(parent: str) -> None:
    """Remove socket directories left by plugin processes that no longer exist."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        pid_text = name.removeprefix(SOCKET_DIR_PREFIX).split("-")[0]
        if not name.startswith(SOCKET_DIR_PREFIX) or not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def serve(
    hs: Handshake,
    register: Callable[[grpc.Server, threading.Event], None],
    *,
    survives_host: Callable[[], bool] = lambda: True,
) -> int:
    """Run a plugin until the host asks it to stop. Returns the process exit status.

    survives_host() is asked when the host process goes away: a plugin the host may reattach
    to keeps running; one that was only started for a fingerprint or validation pass exits.
    """
    # Ctrl-C in the agent's terminal reaches the whole process group; go plugins ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        check_environment(hs, os.environ)
    except HandshakeError as err:
        sys.stderr.write(f"{err}\n")
        return 1

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sock_dir = tempfile.mkdtemp(prefix=f"{SOCKET_DIR_PREFIX}{os.getpid()}-")
    sock_path = os.path.join(sock_dir, "plugin.sock")
    server = grpc.server(
        # grpc takes any futures.Executor; its stubs name ThreadPoolExecutor.
        ElasticExecutor(MAX_WORKERS, name="rpc"),  # type: ignore[arg-type]
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
        interceptors=timing.from_env(),
    )
    health_servicer = health.HealthServicer()
    health_servicer.set("plugin", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    goplugin_pb2_grpc.add_GRPCControllerServicer_to_server(_Controller(stop), server)
    goplugin_pb2_grpc.add_GRPCStdioServicer_to_server(_Stdio(stop), server)
    goplugin_pb2_grpc.add_GRPCBrokerServicer_to_server(_Broker(), server)
    register(server, stop)
    server.add_insecure_port(f"unix:{sock_path}")
    server.start()

    sys.stdout.write(handshake_line(hs, sock_path))
    sys.stdout.flush()
    # The host discards stdout after the handshake and the pipe dies with an agent restart:
    # point fd 1 at /dev/null so a stray print can neither block nor raise.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    log.debug("plugin serving", extra={"kv": {"address": sock_path, "pid": os.getpid()}})
    # After the handshake, so the host is not kept waiting: a plugin the host SIGKILLed could
    # not remove its socket directory.
    remove_stale_socket_dirs(os.path.dirname(sock_dir))

    host = os.getppid()
    while not stop.wait(0.2):
        if os.getppid() != host and not survives_host():
            log.info("the host exited before configuring this plugin; stopping")
            break
    # The host SIGKILLs us 2 s after Shutdown: clean up first, then stop serving.
    shutil.rmtree(sock_dir, ignore_errors=True)
    server.stop(grace=0.3).wait(0.5)
    return 0
