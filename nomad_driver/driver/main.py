"""`nomad-driver-pyhpc`: the executable Nomad launches from its plugin_dir."""

from __future__ import annotations

import sys
import threading

import grpc

from nomad_driver.goplugin import hclog, server
from nomad_driver.goplugin.server import NOMAD_HANDSHAKE

_service: list[object] = []


def _register(grpc_server: grpc.Server, stop: threading.Event) -> None:
    from nomad_driver.driver.service import DriverService
    from nomad_driver.proto import base_pb2_grpc, driver_pb2_grpc

    service = DriverService(stop)
    _service.append(service)
    base_pb2_grpc.add_BasePluginServicer_to_server(service, grpc_server)
    driver_pb2_grpc.add_DriverServicer_to_server(service, grpc_server)


def _memory_snapshots(directory: str) -> None:
    """PYHPC_TRACEMALLOC=DIR (a diagnostic, off by default): trace the driver's Python
    allocations; each SIGUSR2 writes a snapshot to DIR/<pid>-<n>.snapshot for
    bench/memory_growth.py to compare."""
    import os
    import signal
    import tracemalloc

    tracemalloc.start(8)
    taken = [0]

    def dump(_signum: int, _frame: object) -> None:
        import gc

        gc.collect()
        taken[0] += 1
        tracemalloc.take_snapshot().dump(
            os.path.join(directory, f"{os.getpid()}-{taken[0]}.snapshot")
        )

    signal.signal(signal.SIGUSR2, dump)


def main() -> int:
    import os

    from nomad_driver.util import heap

    heap.limit_arenas(2)  # before the gRPC threads: every thread its own arena would keep 8 MB
    hclog.setup_from_env("pyhpc", "DEBUG", "/var/log/pyhpc/plugin.log")
    if os.environ.get("PYHPC_TRACEMALLOC"):
        _memory_snapshots(os.environ["PYHPC_TRACEMALLOC"])

    def survives_host() -> bool:
        # Only the agent's real instance (configured with nomad_config) is reattached after
        # an agent crash; fingerprint and validation instances must not outlive the agent.
        return any(getattr(s, "serving_agent", False) for s in _service)

    return server.serve(NOMAD_HANDSHAKE, _register, survives_host=survives_host)


if __name__ == "__main__":
    sys.exit(main())
