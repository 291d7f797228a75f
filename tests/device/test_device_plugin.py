"""The device plugin process as Nomad sees it on a node without GPUs: a DEVICE plugin that
answers Fingerprint at once with no devices, keeps the stream open, and refuses unknown ids."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest

from nomad_driver.proto import base_pb2, base_pb2_grpc, device_pb2, device_pb2_grpc
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
    with pytest.raises(grpc.RpcError) as refused:
        device.Reserve(device_pb2.ReserveRequest(device_ids=["GPU-nope"]), timeout=10)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown device IDs: GPU-nope" in refused.value.details()
