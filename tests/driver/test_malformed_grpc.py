"""Malformed requests from a gRPC client straight to the plugin process: each is answered with
an error status and a message, and the plugin stays healthy (no crash, no hang)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nomad_driver.proto import base_pb2, base_pb2_grpc, driver_pb2, driver_pb2_grpc
from tests.goplugin.test_plugin_process import Plugin, plugin  # noqa: F401 - fixture

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the driver runs as root")


@pytest.fixture
def driver(plugin: Plugin, tmp_path: os.PathLike[str]) -> Iterator[driver_pb2_grpc.DriverStub]:  # noqa: F811
    base = base_pb2_grpc.BasePluginStub(plugin.channel)
    import tempfile

    from nomad_driver.driver import config
    from nomad_driver.wire import cty, schema

    short = tempfile.mkdtemp(prefix="ph-", dir="/tmp")  # unix socket paths are short
    cfg = cty.encode({"run_dir": short}, schema.object_type(config.PluginConfig))
    base.SetConfig(
        base_pb2.SetConfigRequest(msgpack_config=cfg, plugin_api_version="0.1.0"), timeout=10
    )
    yield driver_pb2_grpc.DriverStub(plugin.channel)
    health = health_pb2_grpc.HealthStub(plugin.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="plugin"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING  # still alive after it all
    assert plugin.proc.poll() is None


def expect_error(call: object, *args: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, timeout=15)  # type: ignore[operator]
    assert err.value.code() != grpc.StatusCode.UNKNOWN, err.value.details()  # not a crash
    assert err.value.details()
    return err.value


def test_garbage_task_configs_are_refused_with_a_message(
    driver: driver_pb2_grpc.DriverStub,
) -> None:
    rng = random.Random(7)
    for i in range(40):
        task = driver_pb2.TaskConfig(
            id=f"t{i}",
            name="t",
            alloc_dir="/nonexistent",
            msgpack_driver_config=rng.randbytes(rng.randint(0, 200)),
        )
        expect_error(driver.StartTask, driver_pb2.StartTaskRequest(task=task))


def test_garbage_driver_state_and_unknown_tasks(driver: driver_pb2_grpc.DriverStub) -> None:
    handle = driver_pb2.TaskHandle(
        version=1, config=driver_pb2.TaskConfig(id="x", name="t"), driver_state=b"\xc1\xff garbage"
    )
    expect_error(driver.RecoverTask, driver_pb2.RecoverTaskRequest(task_id="x", handle=handle))
    # Stopping a task that is gone succeeds (Nomad may stop what a restart already ended).
    driver.StopTask(driver_pb2.StopTaskRequest(task_id="nope", signal="SIGTERM"), timeout=15)
    for call, request in (
        (driver.SignalTask, driver_pb2.SignalTaskRequest(task_id="nope", signal="SIGHUP")),
        (driver.InspectTask, driver_pb2.InspectTaskRequest(task_id="nope")),
        (driver.ExecTask, driver_pb2.ExecTaskRequest(task_id="nope", command=["/bin/true"])),
    ):
        expect_error(call, request)


def test_a_bad_plugin_config_is_refused_and_the_old_one_kept(plugin: Plugin) -> None:  # noqa: F811
    base = base_pb2_grpc.BasePluginStub(plugin.channel)
    err = expect_error(base.SetConfig, base_pb2.SetConfigRequest(msgpack_config=b"\x92\x01"))
    assert "plugin" in err.details()
