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


def main() -> int:
    hclog.setup_from_env("pyhpc", "DEBUG", "/var/log/pyhpc/plugin.log")

    def survives_host() -> bool:
        # Only the agent's real instance (configured with nomad_config) is reattached after
        # an agent crash; fingerprint and validation instances must not outlive the agent.
        return any(getattr(s, "serving_agent", False) for s in _service)

    return server.serve(NOMAD_HANDSHAKE, _register, survives_host=survives_host)


if __name__ == "__main__":
    sys.exit(main())
