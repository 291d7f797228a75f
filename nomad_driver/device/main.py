"""`pyhpc-gpu`: the device plugin executable Nomad launches from its plugin_dir."""

from __future__ import annotations

import sys
import threading

import grpc

from nomad_driver.goplugin import hclog, server
from nomad_driver.goplugin.server import NOMAD_HANDSHAKE


def _register(grpc_server: grpc.Server, stop: threading.Event) -> None:
    from nomad_driver.device.service import DeviceService
    from nomad_driver.proto import base_pb2_grpc, device_pb2_grpc

    service = DeviceService(stop)
    base_pb2_grpc.add_BasePluginServicer_to_server(service, grpc_server)
    device_pb2_grpc.add_DevicePluginServicer_to_server(service, grpc_server)


def main() -> int:
    hclog.setup_from_env("pyhpc-gpu", "INFO", "/var/log/pyhpc/gpu-plugin.log")
    return server.serve(NOMAD_HANDSHAKE, _register)


if __name__ == "__main__":
    sys.exit(main())
