"""The plugin executable as a go-plugin host sees it: cookie, handshake, health, shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nomad_driver.goplugin.server import NOMAD_HANDSHAKE
from nomad_driver.proto import base_pb2, base_pb2_grpc, goplugin_pb2, goplugin_pb2_grpc

PLUGIN = [sys.executable, "-m", "nomad_driver.driver.main"]


def host_env(tmp_path: os.PathLike[str]) -> dict[str, str]:
    env = dict(os.environ)
    env[NOMAD_HANDSHAKE.cookie_key] = NOMAD_HANDSHAKE.cookie_value
    env["PLUGIN_PROTOCOL_VERSIONS"] = "2"
    env["PYHPC_LOG_FILE"] = os.path.join(str(tmp_path), "plugin.log")
    return env


class Plugin:
    def __init__(self, proc: subprocess.Popen[bytes], line: str) -> None:
        self.proc = proc
        self.line = line
        self.address = line.split("|")[3]
        self.channel = grpc.insecure_channel(f"unix:{self.address}")


@pytest.fixture
def plugin(tmp_path: os.PathLike[str]) -> Iterator[Plugin]:
    proc = subprocess.Popen(
        PLUGIN, env=host_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    p = Plugin(proc, line)
    yield p
    p.channel.close()
    proc.kill()
    proc.wait()


def test_started_by_hand_explains_and_exits_1() -> None:
    env = {k: v for k, v in os.environ.items() if k != NOMAD_HANDSHAKE.cookie_key}
    done = subprocess.run(PLUGIN, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "This binary is a plugin" in done.stderr
    assert "install-plugin" in done.stderr


def test_wrong_protocol_version_is_refused(tmp_path: os.PathLike[str]) -> None:
    env = host_env(tmp_path)
    env["PLUGIN_PROTOCOL_VERSIONS"] = "1,3"
    done = subprocess.run(PLUGIN, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "speaks 2" in done.stderr


def test_handshake_line_is_the_first_stdout_line(plugin: Plugin) -> None:
    core, app, network, address, protocol = plugin.line.rstrip("\n").split("|")
    assert (core, app, network, protocol) == ("1", "2", "unix", "grpc")
    assert address.startswith("/") and len(address) < 107
    assert os.path.exists(address)


def test_health_reports_plugin_serving(plugin: Plugin) -> None:
    stub = health_pb2_grpc.HealthStub(plugin.channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service="plugin"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_plugin_info_names_the_driver(plugin: Plugin) -> None:
    stub = base_pb2_grpc.BasePluginStub(plugin.channel)
    info = stub.PluginInfo(base_pb2.PluginInfoRequest(), timeout=10)
    assert info.type == base_pb2.DRIVER
    assert list(info.plugin_api_versions) == ["v0.1.0"]
    assert info.name == "pyhpc"
    assert info.plugin_version.count(".") == 2


def test_sigint_is_ignored_and_shutdown_exits_within_two_seconds(plugin: Plugin) -> None:
    plugin.proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert plugin.proc.poll() is None, "SIGINT must not stop a plugin (agent's process group)"
    stub = goplugin_pb2_grpc.GRPCControllerStub(plugin.channel)
    started = time.monotonic()
    stub.Shutdown(goplugin_pb2.Empty(), timeout=5)
    plugin.proc.wait(timeout=5)
    assert time.monotonic() - started < 2.0
    assert plugin.proc.returncode == 0
    assert not os.path.exists(plugin.address)


def test_logs_are_hclog_json_on_stderr(plugin: Plugin) -> None:
    import json

    stub = goplugin_pb2_grpc.GRPCControllerStub(plugin.channel)
    stub.Shutdown(goplugin_pb2.Empty(), timeout=5)
    assert plugin.proc.stderr is not None
    lines = [json.loads(x) for x in plugin.proc.stderr.read().decode().splitlines() if x]
    assert lines, "the plugin logged nothing"
    for line in lines:
        assert isinstance(line["@message"], str) and isinstance(line["@level"], str)
        assert line["@level"] in {"trace", "debug", "info", "warn", "error"}
        # Go layout 2006-01-02T15:04:05.000000Z07:00: exactly six fractional digits.
        assert len(line["@timestamp"].split(".")[1].split("+")[0].rstrip("Z")) == 6


def test_socket_dirs_of_dead_plugins_are_removed(tmp_path: os.PathLike[str]) -> None:
    import tempfile
    from pathlib import Path

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = Path(tempfile.gettempdir()) / f"pyhpc-plugin-{dead.pid}-abc"
    stale.mkdir(exist_ok=True)
    (stale / "plugin.sock").touch()
    alive = Path(tempfile.gettempdir()) / f"pyhpc-plugin-{os.getpid()}-abc"
    alive.mkdir(exist_ok=True)
    try:
        proc = subprocess.Popen(
            PLUGIN, env=host_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert proc.stdout is not None
        proc.stdout.readline()
        deadline = time.monotonic() + 10
        while stale.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.kill()
        proc.wait()
        assert not stale.exists()
        assert alive.exists(), "a live process's directory was removed"
    finally:
        alive.rmdir()
