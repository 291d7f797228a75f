"""The DevicePlugin gRPC service: Fingerprint (a first answer at once, even with no GPU, then
again whenever the set changes; the stream stays open), Reserve and Stats."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from nomad_driver import __version__
from nomad_driver.device import nvml
from nomad_driver.driver.config import duration, parse_duration
from nomad_driver.proto import base_pb2, device_pb2, structs_pb2
from nomad_driver.wire import schema
from nomad_driver.wire.schema import option

PLUGIN_NAME = "pyhpc-gpu"
API_VERSION = "v0.1.0"
log = logging.getLogger("pyhpc.device")


@dataclass(frozen=True)
class DeviceConfig:
    """`plugin "pyhpc-gpu" { config { ... } }` in the Nomad agent configuration."""

    enabled: bool = option("bool", default=True, doc="Report this node's NVIDIA GPUs.")
    ignored_gpu_ids: tuple[str, ...] = option(
        "list(string)", default=(), doc="GPU UUIDs never offered to jobs."
    )
    fingerprint_period: str = option(
        "string",
        default="1m",
        doc="How often the GPUs are looked at again.",
        check=duration("1m"),
    )


def _attribute(value: Any) -> structs_pb2.Attribute:
    if isinstance(value, tuple):
        number, unit = value
        return structs_pb2.Attribute(int_val=int(number), unit=unit)
    return structs_pb2.Attribute(string_val=str(value))


def fingerprint_message(gpus: list[nvml.Gpu], ignored: tuple[str, ...]) -> Any:
    groups = []
    for g in nvml.groups(gpus, ignored):
        groups.append(
            device_pb2.DeviceGroup(
                vendor=g["vendor"],
                device_type=g["type"],
                device_name=g["name"],
                devices=[
                    device_pb2.DetectedDevice(
                        ID=uuid, healthy=True, hw_locality=device_pb2.DeviceLocality(pci_bus_id=bus)
                    )
                    for uuid, bus in g["devices"]
                ],
                attributes={k: _attribute(v) for k, v in g["attributes"].items()},
            )
        )
    return device_pb2.FingerprintResponse(device_group=groups)


class DeviceService:
    def __init__(self, stop: threading.Event, probe: Any = nvml.probe) -> None:
        self.stop = stop
        self.probe = probe
        self.config = DeviceConfig()
        self.gpus: list[nvml.Gpu] = []

    # ---- BasePlugin ----
    def PluginInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return base_pb2.PluginInfoResponse(
            type=base_pb2.DEVICE,
            plugin_api_versions=[API_VERSION],
            plugin_version=__version__,
            name=PLUGIN_NAME,
        )

    def ConfigSchema(self, request: Any, context: grpc.ServicerContext) -> Any:
        return base_pb2.ConfigSchemaResponse(spec=schema.hclspec(DeviceConfig))

    def SetConfig(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            self.config = schema.load(
                DeviceConfig, request.msgpack_config, 'plugin "pyhpc-gpu" config'
            )
        except schema.ConfigError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return base_pb2.SetConfigResponse()

    # ---- DevicePlugin ----
    def _look(self) -> list[nvml.Gpu]:
        if not self.config.enabled:
            return []
        gpus: list[nvml.Gpu]
        gpus, why = self.probe()
        if why:
            log.info("no GPUs reported", extra={"kv": {"reason": why}})
        self.gpus = gpus
        return gpus

    def Fingerprint(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        done = threading.Event()
        context.add_callback(done.set)
        period = parse_duration(self.config.fingerprint_period) or 60.0
        last: list[str] | None = None
        while not done.is_set() and not self.stop.is_set():
            gpus = self._look()
            ids = sorted(g.uuid for g in gpus)
            if ids != last:  # the first answer always goes out, even empty
                last = ids
                yield fingerprint_message(gpus, tuple(self.config.ignored_gpu_ids))
            done.wait(period)

    def Reserve(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            res = nvml.reservation(self.gpus, list(request.device_ids))
        except KeyError as err:
            context.abort(grpc.StatusCode.NOT_FOUND, str(err.args[0]))
        return device_pb2.ReserveResponse(
            container_res=device_pb2.ContainerReservation(
                envs=res["envs"],
                devices=[
                    device_pb2.DeviceSpec(task_path=n, host_path=n, permissions="rw")
                    for n in res["devices"]
                ],
                mounts=[
                    device_pb2.Mount(task_path=t, host_path=h, read_only=True)
                    for h, t in res["mounts"]
                ],
            )
        )

    def Stats(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        done = threading.Event()
        context.add_callback(done.set)
        interval = request.collection_interval.ToTimedelta().total_seconds() or 1.0
        while not done.is_set() and not self.stop.is_set():
            yield device_pb2.StatsResponse(groups=[])  # per-GPU figures: not collected yet
            done.wait(max(interval, 1.0))
