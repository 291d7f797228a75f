"""The DevicePlugin gRPC service: Fingerprint (a first answer at once, even with no GPU, then
again whenever the set changes; the stream stays open), Reserve (from the node's CDI specs
where they describe the reserved devices, else from pyhpc's own discovery) and Stats (each
GPU's figures, under the names and units Nomad's own nvidia plugin uses, on the interval Nomad
asks for)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import timestamp_pb2, wrappers_pb2

from nomad_driver import __version__
from nomad_driver.device import cdi, nvml
from nomad_driver.proto import base_pb2, device_pb2, structs_pb2
from nomad_driver.util.durations import duration, seconds
from nomad_driver.wire import schema
from nomad_driver.wire.schema import option

PLUGIN_NAME = "pyhpc-gpu"
API_VERSION = "v0.1.0"
log = logging.getLogger("pyhpc.device")


def _absolute_dirs(value: Any) -> str | None:
    wrong = [v for v in value if not str(v).startswith("/")]
    return f"{wrong} must be absolute paths" if wrong else None


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
        check=duration("1m", positive=True),
    )
    cdi_spec_dirs: tuple[str, ...] = option(
        "list(string)",
        default=cdi.DEFAULT_DIRS,
        doc="Directories of CDI specs (root-owned, not group/other-writable; JSON, or YAML "
        "where PyYAML is installed) whose nvidia.com/gpu entries Reserve uses for the devices "
        "they describe; hooks are never run. An empty list turns CDI off.",
        check=_absolute_dirs,
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


def _stat(number: int | None, unit: str, desc: str, of: int | None = None) -> Any:
    """A StatValue `number` (of `of`, when known), or None where there is no number."""
    if number is None:
        return None
    value = structs_pb2.StatValue(
        int_numerator_val=wrappers_pb2.Int64Value(value=number), unit=unit, desc=desc
    )
    if of is not None:
        value.int_denominator_val.value = of
    return value


def device_stats(t: nvml.Telemetry, when_ns: int) -> Any:
    """One GPU's DeviceStats: the figures NVML gave (a missing one is left out, not zero), with
    memory used of total as the summary `nomad node status` shows beside the device."""
    memory = _stat(t.memory_used_mib, "MiB", "Used / total memory", t.memory_total_mib)
    figures = {
        "GPU utilization": _stat(
            t.gpu_utilization_pct, "%", "Time in the last sample period a kernel was running"
        ),
        "Memory utilization": _stat(
            t.memory_utilization_pct,
            "%",
            "Time in the last sample period memory was read or written",
        ),
        "Memory state": memory,
        "Temperature": _stat(t.temperature_c, "C", "GPU die temperature"),
        "Power usage": _stat(t.power_w, "W", "Power draw / enforced power limit", t.power_limit_w),
        "BAR1 buffer state": _stat(
            t.bar1_used_mib, "MiB", "Used / total BAR1 memory", t.bar1_total_mib
        ),
        "ECC single-bit errors": _stat(
            t.ecc_single_bit, "#", "Corrected memory errors since the driver loaded"
        ),
        "ECC double-bit errors": _stat(
            t.ecc_double_bit, "#", "Uncorrected memory errors since the driver loaded"
        ),
    }
    return device_pb2.DeviceStats(
        summary=memory,
        stats=structs_pb2.StatObject(
            attributes={k: v for k, v in figures.items() if v is not None}
        ),
        timestamp=timestamp_pb2.Timestamp(
            seconds=when_ns // 1_000_000_000, nanos=when_ns % 1_000_000_000
        ),
    )


def stats_message(
    gpus: list[nvml.Gpu],
    ignored: tuple[str, ...],
    figures: dict[str, nvml.Telemetry],
    when_ns: int,
) -> Any:
    """A StatsResponse grouped as the fingerprint groups the GPUs (so ignored ones are absent),
    each GPU with figures under its UUID."""
    groups = []
    for g in nvml.groups(gpus, ignored):
        instances = {
            uuid: device_stats(figures[uuid], when_ns)
            for uuid, _ in g["devices"]
            if uuid in figures
        }
        if instances:
            groups.append(
                device_pb2.DeviceGroupStats(
                    vendor=g["vendor"], type=g["type"], name=g["name"], instance_stats=instances
                )
            )
    return device_pb2.StatsResponse(groups=groups)


class DeviceService:
    def __init__(
        self,
        stop: threading.Event,
        probe: Any = nvml.probe,
        nvml_module: Any = None,
        cdi_owner: int = 0,
    ) -> None:
        self.stop = stop
        self.probe = probe
        self.nvml_module = nvml_module  # None: pynvml
        self.cdi_owner = cdi_owner  # the uid CDI specs must belong to: root (tests: their own)
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
        period = seconds(self.config.fingerprint_period)
        last: list[str] | None = None
        while not done.is_set() and not self.stop.is_set():
            gpus = self._look()
            ids = sorted(g.uuid for g in gpus)
            if ids != last:  # the first answer always goes out, even empty
                last = ids
                yield fingerprint_message(gpus, tuple(self.config.ignored_gpu_ids))
            done.wait(period)

    def Reserve(self, request: Any, context: grpc.ServicerContext) -> Any:
        ids = list(request.device_ids)
        try:
            given = self._reserve(ids)
        except KeyError as err:
            context.abort(grpc.StatusCode.NOT_FOUND, str(err.args[0]))
        except nvml.Unavailable as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        return device_pb2.ReserveResponse(
            container_res=device_pb2.ContainerReservation(
                envs=given.env,
                devices=[
                    device_pb2.DeviceSpec(
                        task_path=n.path, host_path=n.host_path, permissions=n.permissions
                    )
                    for n in given.nodes
                ],
                mounts=[
                    device_pb2.Mount(
                        task_path=m.container_path, host_path=m.host_path, read_only=m.read_only
                    )
                    for m in given.mounts
                ],
            )
        )

    def _reserve(self, ids: list[str]) -> cdi.Injection:
        """From the CDI specs where they describe every reserved device, else pyhpc's own."""
        dirs = tuple(self.config.cdi_spec_dirs)
        given = cdi.injection(cdi.load(dirs, self.cdi_owner), self.gpus, ids) if dirs else None
        if given is not None:
            log.info("devices from CDI", extra={"kv": {"ids": ids, "specs": given.sources}})
            return given
        res = nvml.reservation(self.gpus, ids)
        return cdi.Injection(
            env=res["envs"],
            nodes=tuple(cdi.Node(n, n) for n in res["devices"]),
            mounts=tuple(cdi.Mount(h, t, read_only=True) for h, t in res["mounts"]),
        )

    def Stats(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        done = threading.Event()
        context.add_callback(done.set)
        interval = max(request.collection_interval.ToTimedelta().total_seconds(), 1.0)
        # NVML's start takes 80 ms or more: once per stream, not once per sample.
        with nvml.opened(self.nvml_module) as (lib, why):
            if why:
                log.debug("no GPU figures", extra={"kv": {"reason": f"NVML unavailable: {why}"}})
            due = time.monotonic()
            while not done.is_set() and not self.stop.is_set():
                ignored = tuple(self.config.ignored_gpu_ids)
                uuids = [g.uuid for g in nvml.offered(self.gpus, ignored)]
                figures = nvml.telemetry(lib, uuids) if lib is not None else {}
                yield stats_message(self.gpus, ignored, figures, time.time_ns())
                # On a steady beat (sampling time does not add up); after a stall, from now.
                due = max(due + interval, time.monotonic())
                done.wait(due - time.monotonic())
