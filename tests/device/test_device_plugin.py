"""The device plugin process as Nomad sees it on a node without GPUs: a DEVICE plugin that
answers Fingerprint at once with no devices, keeps the stream open, and refuses unknown ids.
And its Stats stream over gRPC with recorded NVML answers: on Nomad's interval, NVML started
once per stream, ended by a cancel or by the plugin stopping."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from nomad_driver.device import nvml
from nomad_driver.device.service import DeviceService
from nomad_driver.proto import base_pb2, base_pb2_grpc, device_pb2, device_pb2_grpc
from tests.device.test_nvml import recorded_nvml
from tests.goplugin.test_plugin_process import Plugin, host_env


@pytest.fixture
def gpu_plugin(tmp_path: os.PathLike[str]) -> Iterator[Plugin]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "nomad_driver.device.main"],
        env=host_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    p = Plugin(proc, proc.stdout.readline().decode())
    yield p
    p.channel.close()
    proc.kill()
    proc.wait()


def test_a_device_plugin_with_no_gpus_fingerprints_empty_and_stays_open(gpu_plugin: Plugin) -> None:
    info = base_pb2_grpc.BasePluginStub(gpu_plugin.channel).PluginInfo(
        base_pb2.PluginInfoRequest(), timeout=10
    )
    assert (info.type, info.name, list(info.plugin_api_versions)) == (
        base_pb2.DEVICE,
        "pyhpc-gpu",
        ["v0.1.0"],
    )
    device = device_pb2_grpc.DevicePluginStub(gpu_plugin.channel)
    stream = device.Fingerprint(device_pb2.FingerprintRequest(), timeout=4)
    first = next(stream)
    assert list(first.device_group) == []
    with pytest.raises(grpc.RpcError) as err:  # no second message, and no end of stream
        next(stream)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stats = device.Stats(device_pb2.StatsRequest(collection_interval=every(1)), timeout=4)
    assert list(next(stats).groups) == []  # no GPU, no figures, but an answer
    stats.cancel()
    with pytest.raises(grpc.RpcError) as refused:
        device.Reserve(device_pb2.ReserveRequest(device_ids=["GPU-nope"]), timeout=10)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown device IDs: GPU-nope" in refused.value.details()


def every(seconds: float) -> duration_pb2.Duration:
    interval = duration_pb2.Duration()
    interval.FromTimedelta(timedelta(seconds=seconds))
    return interval


def test_stats_stream_on_nomads_interval_and_end_on_cancel_or_stop(tmp_path: Path) -> None:
    fake = recorded_nvml()
    stop = threading.Event()
    service = DeviceService(stop, probe=lambda: nvml.probe(fake), nvml_module=fake)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    device_pb2_grpc.add_DevicePluginServicer_to_server(service, server)
    server.add_insecure_port(f"unix:{tmp_path}/device.sock")
    server.start()
    channel = grpc.insecure_channel(f"unix:{tmp_path}/device.sock")
    try:
        device = device_pb2_grpc.DevicePluginStub(channel)
        fingerprint = device.Fingerprint(device_pb2.FingerprintRequest(), timeout=30)
        next(fingerprint)  # as Nomad does: the devices first, then their stats
        fingerprint.cancel()
        assert fake.calls == ["init", "shutdown"]
        stream = device.Stats(device_pb2.StatsRequest(collection_interval=every(1.2)), timeout=30)
        arrived = []
        for message in stream:
            arrived.append(time.monotonic())
            assert sum(len(g.instance_stats) for g in message.groups) == 3
            if len(arrived) == 3:
                break
        gaps = [b - a for a, b in zip(arrived, arrived[1:], strict=False)]
        assert all(1.1 < gap < 1.5 for gap in gaps), gaps
        stream.cancel()
        deadline = time.monotonic() + 5
        while fake.calls[-1] != "shutdown" and time.monotonic() < deadline:
            time.sleep(0.05)
        # NVML started once for three samples, and shut down when Nomad hung up.
        assert fake.calls == ["init", "shutdown", "init", "shutdown"]

        stream = device.Stats(device_pb2.StatsRequest(collection_interval=every(0)), timeout=30)
        next(stream)
        began = time.monotonic()
        next(stream)  # an interval under a second (or none) means one second
        assert 0.9 < time.monotonic() - began < 1.4
        stop.set()  # the plugin stops: the stream ends within an interval, NVML shut down
        assert list(stream) == []
        assert stream.code() == grpc.StatusCode.OK
        assert fake.calls[-2:] == ["init", "shutdown"] and len(fake.calls) == 6
    finally:
        channel.close()
        server.stop(grace=0).wait(5)
