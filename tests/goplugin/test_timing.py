"""PYHPC_RPC_TIMING: each unary call is timed, streams pass through untimed, SIGUSR1 dumps."""

from __future__ import annotations

import json
import os
import signal
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nomad_driver.goplugin import timing


def test_unary_calls_are_timed_and_dumped_on_sigusr1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYHPC_RPC_TIMING", str(tmp_path))
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        interceptors = timing.from_env()
        server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=interceptors)
        servicer = health.HealthServicer()
        servicer.set("plugin", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(3):
                reply = stub.Check(health_pb2.HealthCheckRequest(service="plugin"))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:  # a failing call is timed too
                stub.Check(health_pb2.HealthCheckRequest(service="nope"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            stream = stub.Watch(health_pb2.HealthCheckRequest(service="plugin"))
            assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
            stream.cancel()
        os.kill(os.getpid(), signal.SIGUSR1)
        server.stop(0)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    calls = json.loads((tmp_path / f"{os.getpid()}.json").read_text())
    assert [c[0] for c in calls] == ["/grpc.health.v1.Health/Check"] * 4
    assert all(0 <= c[2] < 5 for c in calls)


def test_nothing_is_timed_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYHPC_RPC_TIMING", raising=False)
    assert timing.from_env() == []


def test_a_directory_that_cannot_take_the_dump_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The dump runs as a signal handler in the plugin's main thread: raising there would end
    the plugin."""
    missing = tmp_path / "nowhere"
    timing.Timing(str(missing)).dump()
    assert not missing.exists()
    assert "PYHPC_RPC_TIMING: cannot write" in caplog.text
