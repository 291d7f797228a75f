"""The driver's RPCs in process, without Nomad: a DriverService configured as the agent would
(SetConfig with msgpack), called with Nomad's own request messages and a stand-in for the gRPC
context, starting real containers from a real SquashFS image in a temporary run dir. Start,
wait, inspect, stop, destroy, signal, exec, recover (a new service for a restarted plugin)
and adopt (a start asked again while its container runs), and the errors Nomad sees for each.
The e2e suite shows the same through the real agent."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from nomad_driver.driver import config
from nomad_driver.driver.service import DriverService
from nomad_driver.proto import base_pb2, driver_pb2
from nomad_driver.wire import cty, schema
from tests.waiting import eventually

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the driver's containers need root (loop mounts, namespaces)"
)


class Aborted(Exception):
    """What context.abort raised: the status Nomad would get."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


class Context:
    """A grpc.ServicerContext as a server gives one to a handler, for the calls made here."""

    def __init__(self) -> None:
        self.active = True

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)

    def abort_with_status(self, status: Any) -> None:
        raise Aborted(status.code, status.details)

    def is_active(self) -> bool:
        return self.active

    def add_callback(self, callback: Any) -> bool:
        return True

    def invocation_metadata(self) -> tuple[()]:
        return ()


def plugin_config(run_dir: Path, images: Path) -> bytes:
    values = {"run_dir": str(run_dir), "image_dirs": [str(images)], "image_mount_linger": "0"}
    return cty.encode(values, schema.object_type(config.PluginConfig))


def new_service(run_dir: Path, images: Path) -> DriverService:
    service = DriverService(threading.Event())
    request = base_pb2.SetConfigRequest(msgpack_config=plugin_config(run_dir, images))
    service.SetConfig(request, Context())
    return service


class Bed:
    """A configured service, a node's alloc dirs and a task's request, as Nomad makes them."""

    def __init__(self, root: Path, image: Path) -> None:
        self.root, self.image = root, image
        self.run_dir = Path(f"/run/pyhpc-inproc-{os.getpid()}")
        self.service = new_service(self.run_dir, image.parent)

    def task(self, name: str, script: str, **options: Any) -> Any:
        alloc_dir = self.root / f"alloc-{name}"
        for d in ("alloc/logs", "t/local", "t/secrets"):
            (alloc_dir / d).mkdir(parents=True, exist_ok=True)
            (alloc_dir / d).chmod(0o777)  # as Nomad makes them: the task's user writes there
        (alloc_dir / "alloc").chmod(0o777)
        for stream in ("stdout", "stderr"):  # Nomad's are FIFOs its log collector reads
            (alloc_dir / f"alloc/logs/t.{stream}.0").touch()
        values = {"image": str(self.image), "command": "/bin/sh", "args": ["-c", script]}
        values.update(options)
        resources = driver_pb2.Resources(
            allocated_resources=driver_pb2.AllocatedTaskResources(
                cpu=driver_pb2.AllocatedCpuResources(cpu_shares=100),
                memory=driver_pb2.AllocatedMemoryResources(memory_mb=64),
            )
        )
        return driver_pb2.TaskConfig(
            id=f"{name}/t/0001",
            name="t",
            alloc_id=name,
            alloc_dir=str(alloc_dir),
            stdout_path=str(alloc_dir / "alloc/logs/t.stdout.0"),
            stderr_path=str(alloc_dir / "alloc/logs/t.stderr.0"),
            msgpack_driver_config=cty.encode(values, schema.object_type(config.TaskConfig)),
            resources=resources,
            env={"PATH": "/bin"},
            node_name="inproc",
        )

    def start(self, task: Any, service: DriverService | None = None) -> Any:
        request = driver_pb2.StartTaskRequest(task=task)
        return (service or self.service).StartTask(request, Context())

    def wait(self, task: Any, service: DriverService | None = None) -> Any:
        request = driver_pb2.WaitTaskRequest(task_id=task.id)
        return (service or self.service).WaitTask(request, Context())

    def stdout(self, task: Any) -> str:
        return Path(task.stdout_path).read_text()

    def events(self, service: DriverService | None = None) -> list[str]:
        hub = (service or self.service).events
        seen = []
        q = hub.subscribe()
        hub.unsubscribe(q)
        while not q.empty():
            seen.append(q.get_nowait().message)
        return seen


@pytest.fixture
def bed(tmp_path: Path, busybox_image: Path) -> Iterator[Bed]:
    # The image where the policy allows it, root's and not writable by others.
    images = Path(f"/var/lib/pyhpc/inproc-{os.getpid()}")
    images.mkdir(parents=True, exist_ok=True)
    image = images / "busybox.sqsh"
    shutil.copyfile(busybox_image, image)
    os.chmod(image, 0o644)
    made = Bed(tmp_path, image)
    try:
        yield made
    finally:
        for handle in list(made.service.tasks.values()):
            request = driver_pb2.DestroyTaskRequest(task_id=handle.task_id, force=True)
            made.service.DestroyTask(request, Context())
        shutil.rmtree(made.run_dir, ignore_errors=True)
        shutil.rmtree(images, ignore_errors=True)


def aborted(call: Any, *args: Any) -> Aborted:
    with pytest.raises(Aborted) as err:
        call(*args, Context())
    return err.value


def test_start_wait_inspect_and_destroy(bed: Bed) -> None:
    task = bed.task("a1", "echo hello from $(hostname); exit 7")
    started = bed.start(task)
    assert started.result == driver_pb2.StartTaskResponse.SUCCESS
    assert started.handle.state == driver_pb2.RUNNING and started.handle.driver_state
    done = bed.wait(task)
    assert (done.result.exit_code, done.err) == (7, "")
    assert bed.stdout(task) == "hello from t\n"
    inspect = bed.service.InspectTask(driver_pb2.InspectTaskRequest(task_id=task.id), Context())
    assert inspect.task.state == driver_pb2.EXITED and inspect.task.result.exit_code == 7
    run_dir = inspect.driver.attributes["run_dir"]
    assert os.path.isdir(run_dir)
    # The provenance record beside the task's logs, completed with how it ended.
    assert (Path(task.alloc_dir) / "alloc/logs/t.provenance.json").is_file()
    bed.service.DestroyTask(driver_pb2.DestroyTaskRequest(task_id=task.id), Context())
    assert not os.path.exists(run_dir) and task.id not in bed.service.tasks
    err = aborted(bed.service.WaitTask, driver_pb2.WaitTaskRequest(task_id=task.id))
    assert err.code == grpc.StatusCode.NOT_FOUND and task.id in err.details


def test_stop_signals_waits_then_kills_and_destroy_needs_force(bed: Bed) -> None:
    polite = bed.task("a2", "trap 'echo bye; exit 3' TERM; echo up; while :; do sleep 0.1; done")
    stubborn = bed.task("a3", "trap '' TERM; echo up; while :; do sleep 0.1; done")
    for task in (polite, stubborn):
        bed.start(task)
    assert eventually(lambda: all("up" in bed.stdout(t) for t in (polite, stubborn)), 10)
    # Destroying a running task without force is refused and changes nothing.
    err = aborted(bed.service.DestroyTask, driver_pb2.DestroyTaskRequest(task_id=polite.id))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and "still running" in err.details
    grace = duration_pb2.Duration(seconds=5)
    stop = driver_pb2.StopTaskRequest(task_id=polite.id, signal="SIGTERM", timeout=grace)
    bed.service.StopTask(stop, Context())
    assert bed.wait(polite).result.exit_code == 3 and bed.stdout(polite) == "up\nbye\n"
    short = duration_pb2.Duration(nanos=300_000_000)
    stop = driver_pb2.StopTaskRequest(task_id=stubborn.id, signal="SIGTERM", timeout=short)
    bed.service.StopTask(stop, Context())
    assert bed.wait(stubborn).result.signal == 9
    events = bed.events()
    assert "Task did not stop within 0.3s: sent SIGKILL" in events, events
    bad = driver_pb2.StopTaskRequest(task_id=polite.id, signal="SIGNOPE")
    assert bed.service.StopTask(bad, Context()) is not None  # exited: nothing to signal


def test_signal_and_exec_reach_the_running_task(bed: Bed) -> None:
    task = bed.task("a4", "trap 'echo usr1' USR1; echo up; while :; do sleep 0.1; done")
    bed.start(task)
    assert eventually(lambda: "up" in bed.stdout(task), 10)
    signal = driver_pb2.SignalTaskRequest(task_id=task.id, signal="SIGUSR1")
    bed.service.SignalTask(signal, Context())
    assert eventually(lambda: "usr1" in bed.stdout(task), 10)
    err = aborted(
        bed.service.SignalTask, driver_pb2.SignalTaskRequest(task_id=task.id, signal="SIGNOPE")
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "SIGNOPE" in err.details
    err = aborted(
        bed.service.SignalTask, driver_pb2.SignalTaskRequest(task_id="nope", signal="SIGUSR1")
    )
    assert err.code == grpc.StatusCode.NOT_FOUND
    request = driver_pb2.ExecTaskRequest(
        task_id=task.id, command=["/bin/sh", "-c", "cat /proc/self/uid_map; hostname; exit 4"]
    )
    done = bed.service.ExecTask(request, Context())
    assert done.result.exit_code == 4
    uid_map, hostname = done.stdout.decode().splitlines()
    assert uid_map.split() == ["0", "100000", "65536"] and hostname == "t"
    stop = driver_pb2.StopTaskRequest(task_id=task.id, signal="SIGKILL")
    bed.service.StopTask(stop, Context())
    err = aborted(bed.service.ExecTask, request)
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and "not running" in err.details


def test_a_restarted_plugin_recovers_its_tasks_from_their_handles(bed: Bed) -> None:
    task = bed.task("a5", "echo up; sleep 1; exit 5")
    handle = bed.start(task).handle
    restarted = new_service(bed.run_dir, bed.image.parent)
    recover = driver_pb2.RecoverTaskRequest(task_id=task.id, handle=handle)
    restarted.RecoverTask(recover, Context())
    assert "Task recovered by the pyhpc plugin" in bed.events(restarted)
    assert bed.wait(task, restarted).result.exit_code == 5
    # A handle it cannot read, and one whose run dir is gone, are refused with the reason.
    garbage = driver_pb2.TaskHandle(config=task, driver_state=b"\x00not a state")
    other = new_service(bed.run_dir, bed.image.parent)
    err = aborted(other.RecoverTask, driver_pb2.RecoverTaskRequest(task_id=task.id, handle=garbage))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "cannot recover" in err.details
    restarted.DestroyTask(driver_pb2.DestroyTaskRequest(task_id=task.id), Context())
    err = aborted(other.RecoverTask, recover)
    assert err.code == grpc.StatusCode.NOT_FOUND and "is gone" in err.details


def test_a_start_asked_again_adopts_the_running_container(bed: Bed) -> None:
    task = bed.task("a6", "echo once >>/alloc/started; exec sleep 30")
    first = bed.start(task)
    # The plugin died after the start; Nomad, holding no handle, asks a new one to start it.
    restarted = new_service(bed.run_dir, bed.image.parent)
    again = bed.start(task, restarted)
    assert again.handle.driver_state == first.handle.driver_state
    assert "Task adopted: started before the plugin restarted, not again" in bed.events(restarted)
    time.sleep(0.5)
    assert (Path(task.alloc_dir) / "alloc/started").read_text() == "once\n"
    run_dir = restarted.tasks[task.id].run_dir
    restarted.DestroyTask(driver_pb2.DestroyTaskRequest(task_id=task.id, force=True), Context())
    assert not os.path.exists(run_dir)
    bed.service.tasks.clear()  # the first service's view of it is stale now


def test_refusals_name_what_was_wrong_with_the_code_nomad_acts_on(bed: Bed) -> None:
    bad = bed.task("a7", "true", writable="sometimes")
    err = aborted(bed.service.StartTask, driver_pb2.StartTaskRequest(task=bad))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "option 'writable' = 'sometimes'" in err.details
    elsewhere = bed.task("a8", "true", image="/tmp/elsewhere.sqsh")
    err = aborted(bed.service.StartTask, driver_pb2.StartTaskRequest(task=elsewhere))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and "image_dirs" in err.details
    missing = bed.task("a9", "true", image=str(bed.image.parent / "missing.sqsh"))
    err = aborted(bed.service.StartTask, driver_pb2.StartTaskRequest(task=missing))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and "inproc" in err.details
    twice = bed.task("a10", "exec sleep 30")
    bed.start(twice)
    err = aborted(bed.service.StartTask, driver_pb2.StartTaskRequest(task=twice))
    assert err.code == grpc.StatusCode.ALREADY_EXISTS
    config_err = aborted(
        DriverService(threading.Event()).SetConfig,
        base_pb2.SetConfigRequest(
            msgpack_config=cty.encode(
                {"run_dir": "relative"}, schema.object_type(config.PluginConfig)
            )
        ),
    )
    assert config_err.code == grpc.StatusCode.INVALID_ARGUMENT and "run_dir" in config_err.details


def test_stats_and_fingerprint_stream_while_asked(bed: Bed) -> None:
    task = bed.task("a11", "echo up; exec sleep 30")
    bed.start(task)
    assert eventually(lambda: "up" in bed.stdout(task), 10)
    context = Context()
    interval = duration_pb2.Duration(nanos=200_000_000)
    request = driver_pb2.TaskStatsRequest(task_id=task.id, collection_interval=interval)
    stream = bed.service.TaskStats(request, context)
    first, second = next(stream), next(stream)
    memory = second.stats.agg_resource_usage.memory
    assert first.stats.id == task.id and memory.rss > 0, memory
    assert driver_pb2.MemoryUsage.RSS in memory.measured_fields
    assert second.stats.timestamp.ToNanoseconds() > first.stats.timestamp.ToNanoseconds()
    context.active = False
    assert list(stream) == []  # the stream ends once Nomad stops asking
    node = next(bed.service.Fingerprint(driver_pb2.FingerprintRequest(), Context()))
    assert node.health == driver_pb2.FingerprintResponse.HEALTHY, node.health_description
    assert node.attributes["driver.pyhpc"].bool_val
