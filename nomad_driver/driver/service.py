"""The Nomad BasePlugin and Driver services: each RPC maps onto the runtime and a TaskHandle.

Rules from Nomad's Go client that shape this file: every sub-message the client dereferences is
always set, long-lived streams never end on their own, StartTask fails with a gRPC error, and
UNAVAILABLE is never used for an application error.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, timestamp_pb2
from google.rpc import status_pb2
from grpc_status import rpc_status

from nomad_driver import __version__
from nomad_driver.device import nvml
from nomad_driver.driver import config, execio, policy, provenance
from nomad_driver.driver.handle import TaskHandle, Usage
from nomad_driver.driver.state import DriverState, StateError
from nomad_driver.goplugin import hclog
from nomad_driver.proto import base_pb2, driver_pb2, structs_pb2
from nomad_driver.runtime import cgroups, client, enter, security
from nomad_driver.runtime.cgroups import Limits
from nomad_driver.runtime.container import ContainerError
from nomad_driver.runtime.imagemount import SharedImages, images_dir
from nomad_driver.runtime.spec import BindMount, ContainerSpec, ExitStatus
from nomad_driver.runtime.stats import cpu_mhz
from nomad_driver.util import heap
from nomad_driver.util.durations import seconds
from nomad_driver.util.errors import PyhpcError
from nomad_driver.wire import schema

log = logging.getLogger("pyhpc.driver")
API_VERSION = "v0.1.0"
HANDLE_VERSION = 1
STOP_GRACE_AFTER_KILL = 10.0


def abort(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    recoverable: bool | None = None,
) -> NoReturn:
    """End the RPC with an error; with recoverable set, Nomad applies the restart policy."""
    if recoverable is None:
        context.abort(code, message)
    detail = any_pb2.Any()
    detail.Pack(structs_pb2.RecoverableError(recoverable=recoverable))
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("unreachable")  # abort_with_status raises


def status_of(err: BaseException) -> tuple[grpc.StatusCode, bool | None]:
    """The one table of how an error reaches Nomad: its gRPC status, and whether the restart
    policy may retry (None: nothing claimed). pyhpc's own errors say it themselves."""
    if isinstance(err, PyhpcError):
        return grpc.StatusCode[err.grpc_status], err.recoverable or None
    if isinstance(err, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, True
    if isinstance(err, FileNotFoundError):
        return grpc.StatusCode.FAILED_PRECONDITION, None
    if isinstance(err, OSError):  # the node's trouble (a full disk, a busy device): try again
        return grpc.StatusCode.FAILED_PRECONDITION, True
    return grpc.StatusCode.FAILED_PRECONDITION, None  # ValueError: what a source said was wrong


def fail(context: grpc.ServicerContext, err: BaseException, message: str) -> NoReturn:
    """End the RPC with err, as status_of says, and message."""
    code, recoverable = status_of(err)
    abort(context, code, message, recoverable)


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def exit_result(status: ExitStatus | None) -> driver_pb2.ExitResult:
    if status is None:
        return driver_pb2.ExitResult(exit_code=0)
    return driver_pb2.ExitResult(
        exit_code=status.exit_code, signal=status.signal, oom_killed=status.oom_killed
    )


def parse_signal(name: str) -> int:
    """ "SIGTERM", "TERM", "sigterm" or "15" to a number; ValueError names what was wrong."""
    text = name.strip().upper()
    if text.isdigit() and 0 < int(text) < signal.NSIG:
        return int(text)
    if text and not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return int(signal.Signals[text])
    except KeyError:
        raise ValueError(f"unknown signal {name!r}") from None


def run_key(task_id: str, name: str) -> str:
    """A short, unique, path-safe directory name for a task id (alloc/task/random)."""
    digest = hashlib.sha256(task_id.encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:24]
    return f"{safe}-{digest}"


def group_netns(task: driver_pb2.TaskConfig, cfg: config.TaskConfig) -> str:
    """The network namespace Nomad created for the group, if the group asked for one."""
    iso = task.network_isolation_spec
    if iso.mode != driver_pb2.NetworkIsolationSpec.GROUP or not iso.path:
        return ""
    if cfg.network == "none":
        raise security.PolicyError(
            'network = "none" conflicts with the group\'s network block; remove one of them'
        )
    return str(iso.path)


def limits_of(resources: driver_pb2.Resources) -> Limits:
    """Nomad's allocation as cgroup limits: memory (soft), memory_max (hard), shares, cores."""
    mib = 1024 * 1024
    memory = resources.allocated_resources.memory
    linux = resources.linux_resources
    return Limits(
        memory_bytes=memory.memory_mb * mib,
        memory_max_bytes=max(memory.memory_max_mb * mib, linux.memory_limit_bytes),
        cpu_shares=linux.cpu_shares or resources.allocated_resources.cpu.cpu_shares,
        cpuset_cpus=linux.cpuset_cpus,
        # In Nomad's cgroup tree, as its exec driver places tasks: the client's parent, and
        # the cpuset cgroup it made for this task (which keeps reserved cores reserved).
        cgroup_parent=cgroups.nomad_parent(linux.cpuset_cgroup, cgroups.version()),
        cpuset_cgroup=linux.cpuset_cgroup,
    )


MEMORY_FIELDS = {  # Nomad's names for the memory figures, as handle.Usage keys them
    "RSS": ("rss", driver_pb2.MemoryUsage.RSS),
    "Cache": ("cache", driver_pb2.MemoryUsage.CACHE),
    "Swap": ("swap", driver_pb2.MemoryUsage.SWAP),
    "Usage": ("usage", driver_pb2.MemoryUsage.USAGE),
    "Max Usage": ("max_usage", driver_pb2.MemoryUsage.MAX_USAGE),
    "Kernel Usage": ("kernel_usage", driver_pb2.MemoryUsage.KERNEL_USAGE),
    "Kernel Max Usage": ("kernel_max_usage", driver_pb2.MemoryUsage.KERNEL_MAX_USAGE),
}


def resource_usage(usage: Usage, mhz: float) -> driver_pb2.TaskResourceUsage:
    """One TaskResourceUsage as Nomad's executor fills it: CPU in percent of one core over the
    interval, TotalTicks the MHz that share is worth, and measured_fields naming exactly what
    this node measured."""
    cpu_fields = [
        driver_pb2.CPUUsage.SYSTEM_MODE,
        driver_pb2.CPUUsage.USER_MODE,
        driver_pb2.CPUUsage.PERCENT,
        driver_pb2.CPUUsage.TOTAL_TICKS,
    ]
    periods, throttled_ns = usage.throttled or (0, 0)
    if usage.throttled is not None:
        cpu_fields += [driver_pb2.CPUUsage.THROTTLED_PERIODS, driver_pb2.CPUUsage.THROTTLED_TIME]
    known = {k: v for k, v in usage.memory.items() if k in MEMORY_FIELDS}
    return driver_pb2.TaskResourceUsage(
        cpu=driver_pb2.CPUUsage(
            percent=usage.percent,
            user_mode=usage.user,
            system_mode=usage.system,
            total_ticks=usage.percent / 100.0 * mhz,
            throttled_periods=periods,
            throttled_time=throttled_ns,
            measured_fields=cpu_fields,
        ),
        memory=driver_pb2.MemoryUsage(
            measured_fields=[MEMORY_FIELDS[k][1] for k in known],
            **{MEMORY_FIELDS[k][0]: v for k, v in known.items()},
        ),
    )


class EventHub:
    """Fan-out of driver task events to every open TaskEvents stream. Events emitted while no
    stream is open (after a plugin restart Nomad calls RecoverTask and opens TaskEvents
    concurrently) are held, at most HELD of them, and go to the next stream that opens."""

    HELD = 256

    def __init__(self) -> None:
        self._subscribers: list[queue.Queue[driver_pb2.DriverTaskEvent]] = []
        self._held: collections.deque[driver_pb2.DriverTaskEvent] = collections.deque(
            maxlen=self.HELD
        )
        self._lock = threading.Lock()

    def subscribe(self) -> queue.Queue[driver_pb2.DriverTaskEvent]:
        q: queue.Queue[driver_pb2.DriverTaskEvent] = queue.Queue()
        with self._lock:
            self._subscribers.append(q)
            while self._held:
                q.put(self._held.popleft())
        return q

    def unsubscribe(self, q: queue.Queue[driver_pb2.DriverTaskEvent]) -> None:
        with self._lock:
            if q in self._subscribers:
                self._subscribers.remove(q)

    def emit(self, handle: TaskHandle, message: str, **annotations: str) -> None:
        self.emit_for(handle.task_id, handle.alloc_id, handle.name, message, **annotations)

    def emit_for(
        self, task_id: str, alloc_id: str, name: str, message: str, **annotations: str
    ) -> None:
        event = driver_pb2.DriverTaskEvent(
            task_id=task_id,
            alloc_id=alloc_id,
            task_name=name,
            timestamp=timestamp(time.time()),
            message=message,
            annotations=annotations,
        )
        with self._lock:
            if not self._subscribers:
                self._held.append(event)
            for q in self._subscribers:
                q.put(event)


def health_problems() -> list[str]:
    """What this node lacks to run pyhpc containers (empty when healthy)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the plugin must run as root (Nomad's client runs as root)")
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            filesystems = f.read().split()
    except OSError:
        filesystems = []
    for fs in ("squashfs", "overlay"):
        if fs not in filesystems:
            problems.append(f"the kernel has no {fs} filesystem")
    if not os.path.exists("/dev/loop-control"):
        problems.append("/dev/loop-control is missing (loop devices are needed to mount images)")
    return problems


class DriverService:
    """Implements both BasePlugin and Driver; registered once for each service."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.config = config.PluginConfig()
        self.serving_agent = False
        self.verifier: Any = None  # built on first use from the config
        self.tasks: dict[str, TaskHandle] = {}
        self.lock = threading.Lock()
        self.events = EventHub()
        self.mhz = cpu_mhz()
        self.gc_due = 0.0  # monotonic time of the next image GC (0: at the first fingerprint)
        self.gc_running = threading.Lock()

    # ---- BasePlugin -------------------------------------------------------------------------

    def PluginInfo(
        self, request: base_pb2.PluginInfoRequest, context: grpc.ServicerContext
    ) -> base_pb2.PluginInfoResponse:
        return base_pb2.PluginInfoResponse(
            type=base_pb2.DRIVER,
            plugin_api_versions=[API_VERSION],
            plugin_version=__version__,
            name=config.PLUGIN_NAME,
        )

    def ConfigSchema(
        self, request: base_pb2.ConfigSchemaRequest, context: grpc.ServicerContext
    ) -> base_pb2.ConfigSchemaResponse:
        return base_pb2.ConfigSchemaResponse(spec=schema.hclspec(config.PluginConfig))

    def SetConfig(
        self, request: base_pb2.SetConfigRequest, context: grpc.ServicerContext
    ) -> base_pb2.SetConfigResponse:
        try:
            loaded = schema.load(
                config.PluginConfig, request.msgpack_config, 'plugin "pyhpc" config'
            )
        except schema.ConfigError as err:
            fail(context, err, str(err))
        self.config = loaded
        self.verifier = None
        self.serving_agent = request.HasField("nomad_config")
        # After an agent restart our stderr pipe is gone: log next to the tasks instead.
        hclog.set_fallback(os.path.join(loaded.run_dir, "plugin.log"))
        log.info("configured", extra={"kv": {"run_dir": loaded.run_dir}})
        return base_pb2.SetConfigResponse()

    # ---- Driver: node-level -----------------------------------------------------------------

    def TaskConfigSchema(
        self, request: driver_pb2.TaskConfigSchemaRequest, context: grpc.ServicerContext
    ) -> driver_pb2.TaskConfigSchemaResponse:
        return driver_pb2.TaskConfigSchemaResponse(spec=schema.hclspec(config.TaskConfig))

    def Capabilities(
        self, request: driver_pb2.CapabilitiesRequest, context: grpc.ServicerContext
    ) -> driver_pb2.CapabilitiesResponse:
        caps = driver_pb2.DriverCapabilities(
            send_signals=True,
            exec=True,
            fs_isolation=driver_pb2.DriverCapabilities.IMAGE,
            network_isolation_modes=[
                driver_pb2.NetworkIsolationSpec.HOST,
                driver_pb2.NetworkIsolationSpec.GROUP,
            ],
            mount_configs=driver_pb2.DriverCapabilities.ANY_MOUNTS,
        )
        return driver_pb2.CapabilitiesResponse(capabilities=caps)

    def _fingerprint(self) -> driver_pb2.FingerprintResponse:
        problems = health_problems()
        attrs = {
            "driver.pyhpc": structs_pb2.Attribute(bool_val=True),
            "driver.pyhpc.version": structs_pb2.Attribute(string_val=__version__),
            "driver.pyhpc.runtime": structs_pb2.Attribute(string_val="squashfs+overlay"),
        }
        for name, value in nvml.driver_attributes(nvml.probe()[0]).items():
            attrs[name] = (
                structs_pb2.Attribute(int_val=value)
                if isinstance(value, int)
                else structs_pb2.Attribute(string_val=value)
            )
        state = driver_pb2.FingerprintResponse.HEALTHY
        description = "Healthy"
        if problems:
            state = driver_pb2.FingerprintResponse.UNHEALTHY
            description = "; ".join(problems)
        return driver_pb2.FingerprintResponse(
            attributes=attrs, health=state, health_description=description
        )

    def _collect_images(self) -> None:
        """Start the periodic image GC when it is due (in its own thread: deleting gigabytes
        must not hold up the fingerprint stream); one at a time."""
        interval = seconds(self.config.image_gc_interval)
        if interval <= 0 or time.monotonic() < self.gc_due or not self.gc_running.acquire(False):
            return
        self.gc_due = time.monotonic() + interval
        plugin = self.config

        def collect() -> None:
            from nomad_driver.images.store import Store

            try:
                if not os.path.isdir(plugin.store_dir):
                    return
                min_age = seconds(plugin.image_gc_min_age)
                for digest in Store(plugin.store_dir).collect(min_age):
                    log.info(
                        "image GC deleted an unused image",
                        extra={"kv": {"digest": digest, "unused_for": plugin.image_gc_min_age}},
                    )
            except OSError as err:
                log.warning("image GC failed", extra={"kv": {"error": str(err)}})
            finally:
                self.gc_running.release()

        threading.Thread(target=collect, name="image gc", daemon=True).start()

    def Fingerprint(
        self, request: driver_pb2.FingerprintRequest, context: grpc.ServicerContext
    ) -> Iterator[driver_pb2.FingerprintResponse]:
        done = threading.Event()
        context.add_callback(done.set)
        period = seconds(self.config.fingerprint_period)
        while not done.is_set() and not self.stop.is_set():
            yield self._fingerprint()
            # Image mounts and cgroups whose tasks' supervisors were killed: found here.
            self._collect_images()
            try:
                SharedImages(images_dir(self.config.run_dir)).sweep()
                cgroups.sweep(lambda: {os.path.basename(d) for d in client.supervisors()})
            except OSError as err:
                log.warning("sweep failed", extra={"kv": {"error": str(err)}})
            heap.trim()  # what a burst of tasks' calls left free in the C heap goes back
            done.wait(period)

    def TaskEvents(
        self, request: driver_pb2.TaskEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[driver_pb2.DriverTaskEvent]:
        q = self.events.subscribe()
        done = threading.Event()
        context.add_callback(done.set)
        try:
            while not done.is_set() and not self.stop.is_set():
                try:
                    yield q.get(timeout=1.0)
                except queue.Empty:
                    continue
        finally:
            self.events.unsubscribe(q)

    # ---- Driver: task lifecycle -------------------------------------------------------------

    def _handle(self, task_id: str, context: grpc.ServicerContext) -> TaskHandle:
        with self.lock:
            handle = self.tasks.get(task_id)
        if handle is None:
            abort(context, grpc.StatusCode.NOT_FOUND, f"task {task_id!r} is not known to pyhpc")
        return handle

    def _verifier(self) -> Any:
        if self.verifier is None:
            self.verifier = policy.verifier(self.config)
        return self.verifier

    def _container_spec(
        self, task: driver_pb2.TaskConfig, cfg: config.TaskConfig, image: policy.ResolvedImage
    ) -> ContainerSpec:
        task_dir = os.path.join(task.alloc_dir, task.name)
        mounts = [
            # Opened beneath the allocation's directory: none of them may be a symlink.
            BindMount(os.path.join(task.alloc_dir, "alloc"), "/alloc", beneath=task.alloc_dir),
            BindMount(os.path.join(task_dir, "local"), "/local", beneath=task.alloc_dir),
            BindMount(os.path.join(task_dir, "secrets"), "/secrets", beneath=task.alloc_dir),
        ]
        mounts += [BindMount(m.host_path, m.task_path, m.readonly) for m in task.mounts]
        ctx = policy.TaskContext(
            task_id=task.id,
            hostname=task.name,
            env=dict(task.env),
            user=task.user,
            stdout_path=task.stdout_path,
            stderr_path=task.stderr_path,
            mounts=tuple(mounts),
            devices=tuple(BindMount(d.host_path, d.task_path) for d in task.devices),
            limits=limits_of(task.resources),
            upper_dir=os.path.join(task_dir, "pyhpc-layer"),
            netns_path=group_netns(task, cfg),
        )
        return policy.container_spec(self.config, cfg, image, ctx)

    def StartTask(
        self, request: driver_pb2.StartTaskRequest, context: grpc.ServicerContext
    ) -> driver_pb2.StartTaskResponse:
        cgroups.prewarm()  # the task's attach then need not wait out a grace period of its own
        task = request.task
        where = f'task "{task.name}" config'
        try:
            cfg = schema.load(config.TaskConfig, task.msgpack_driver_config, where)
        except schema.ConfigError as err:
            fail(context, err, str(err))

        def progress(message: str) -> None:
            self.events.emit_for(task.id, task.alloc_id, task.name, f"Image: {message}")

        reader = policy.image_reader(self.config, task.user)
        timeout = seconds(cfg.image_pull_timeout)
        datasets: list[policy.Dataset] = []
        try:
            image = policy.resolve_image(
                self.config, cfg.image, progress, timeout, reader, cfg.auth, cfg.auth_soft_fail
            )
            try:
                datasets = policy.resolve_datasets(self.config, cfg, progress, timeout, reader)
            except BaseException:
                if image.file is not None:
                    image.file.close()
                raise
        except FileNotFoundError as err:
            fail(context, err, f"{where}: {err} on node {task.node_name!r}")
        except (PyhpcError, TimeoutError, ValueError) as err:
            fail(context, err, f"{where}: {err}")
        try:
            started, adopted = self._start(task, cfg, image, datasets, where, progress, context)
        finally:
            for opened in (image, *(d.image for d in datasets)):
                if opened.file is not None:
                    opened.file.close()
        state = DriverState(
            started.run_dir, started.supervisor_pid, started.init_pid, started.started_at
        )
        handle = TaskHandle(task.id, task.name, task.alloc_id, state, self._exited)
        with self.lock:
            self.tasks[task.id] = handle
        log.info("task started", extra={"kv": {"task_id": task.id, "init_pid": started.init_pid}})
        if adopted:
            self.events.emit(handle, "Task adopted: started before the plugin restarted, not again")
        return driver_pb2.StartTaskResponse(
            result=driver_pb2.StartTaskResponse.SUCCESS,
            handle=driver_pb2.TaskHandle(
                version=HANDLE_VERSION,
                config=task,
                state=driver_pb2.RUNNING,
                driver_state=state.encode(),
            ),
        )

    def _start(
        self,
        task: driver_pb2.TaskConfig,
        cfg: config.TaskConfig,
        image: policy.ResolvedImage,
        datasets: list[policy.Dataset],
        where: str,
        progress: Any,
        context: grpc.ServicerContext,
    ) -> tuple[client.Started, client.Started | None]:
        """The start proper, from the opened image on: its signature and its datasets' (on
        the descriptors that will be mounted), the container spec, and the supervisor."""
        signatures: list[dict[str, Any]] = []
        try:
            said = policy.check_signatures(self.config, self._verifier, image, datasets, signatures)
        except PyhpcError as err:  # refused, or Vault unreachable (then Nomad may retry)
            fail(context, err, f"{where}: {err}")
        for checked in said:
            progress(checked if "WARNING" in checked else f"{checked}; pyhpc {__version__}")
        with self.lock:
            if task.id in self.tasks:
                abort(
                    context, grpc.StatusCode.ALREADY_EXISTS, f"task {task.id!r} is already running"
                )
        try:
            spec = self._container_spec(task, cfg, image)
        except security.PolicyError as err:
            fail(context, err, f"{where}: {err}")
        run_dir = os.path.join(self.config.run_dir, "tasks", run_key(task.id, task.name))
        os.makedirs(os.path.dirname(run_dir), mode=0o700, exist_ok=True)
        adopted = None
        if os.path.exists(run_dir):
            # A start of this task was under way when the plugin died: Nomad asks again. Adopt
            # its container if the command got to run (never start it twice), else clear it.
            adopted = client.adopt(run_dir)
            if adopted is None:
                client.discard(run_dir, spec.images_dir)
        try:
            started = adopted or client.start(
                spec,
                run_dir,
                image=image.file,
                datasets=[(d.image.file, d.path) for d in datasets if d.image.file is not None],
            )
        except (client.StartError, OSError) as err:
            client.remove(run_dir)
            # Recoverable errors let Nomad apply the job's restart policy; a bad image or
            # command would only fail again.
            fail(context, err, f"{where}: {err}")
        if adopted is None:
            self._provenance(task, cfg, spec, image, datasets, signatures, run_dir, progress)
        return started, adopted

    def _provenance(
        self,
        task: driver_pb2.TaskConfig,
        cfg: config.TaskConfig,
        spec: ContainerSpec,
        image: policy.ResolvedImage,
        datasets: list[policy.Dataset],
        signatures: list[dict[str, Any]],
        run_dir: str,
        progress: Any,
    ) -> None:
        """Keep the start's provenance record with the task and publish it into alloc/logs;
        a record that cannot be written is reported, never a reason to stop the task."""
        env = dict(task.env)
        where = {
            "node": task.node_name,
            "node_id": task.node_id,
            "region": env.get("NOMAD_REGION", ""),
            "datacenter": env.get("NOMAD_DC", ""),
            "namespace": env.get("NOMAD_NAMESPACE", ""),
            "job": env.get("NOMAD_JOB_ID", task.job_name),
            "group": env.get("NOMAD_GROUP_NAME", task.task_group_name),
            "task": task.name,
            "alloc_id": task.alloc_id,
            "alloc_dir": task.alloc_dir,
        }
        options = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "auth"}
        # Values anyone who may read the record sees anyway: the image's, the site's and
        # Nomad's own (its token aside); a jobspec's or template's variables by name only.
        seen = {*policy.image_env(image.config), *policy.site_env(self.config, os.environ)}

        def visible(name: str) -> bool:
            return name in seen or (name.startswith("NOMAD_") and name != "NOMAD_TOKEN")

        try:
            data = provenance.record(
                spec, image, datasets, signatures, where, options, visible, self._nomad_binary()
            )
            provenance.keep(run_dir, data)
            digest = provenance.publish(task.alloc_dir, task.name, data)
            self.events.emit_for(
                task.id, task.alloc_id, task.name, provenance.summary(data, digest)
            )
        except OSError as err:
            progress(f"WARNING: no provenance record: {err}")

    def _nomad_binary(self) -> str:
        """The Nomad agent that runs this plugin (its parent), for its version."""
        if not self.serving_agent:
            return ""
        try:
            return os.readlink(f"/proc/{os.getppid()}/exe")
        except OSError:
            return ""

    def RecoverTask(
        self, request: driver_pb2.RecoverTaskRequest, context: grpc.ServicerContext
    ) -> driver_pb2.RecoverTaskResponse:
        task = request.handle.config
        task_id = task.id or request.task_id
        with self.lock:
            if task_id in self.tasks:
                return driver_pb2.RecoverTaskResponse()
        try:
            state = DriverState.decode(request.handle.driver_state)
        except StateError as err:
            fail(context, err, f"cannot recover {task_id!r}: {err}")
        if not os.path.isdir(state.run_dir):
            abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"cannot recover {task_id!r}: its run directory {state.run_dir} is gone",
            )
        if client.exit_status(state.run_dir) is None and not client.alive(state.run_dir):
            abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"cannot recover {task_id!r}: its supervisor is gone and left no exit status",
            )
        handle = TaskHandle(task_id, task.name, task.alloc_id, state, self._exited)
        with self.lock:
            self.tasks.setdefault(task_id, handle)
        log.info("task recovered", extra={"kv": {"task_id": task_id}})
        self.events.emit(handle, "Task recovered by the pyhpc plugin")
        return driver_pb2.RecoverTaskResponse()

    def _exited(self, handle: TaskHandle) -> None:
        """Say in the task's events what Nomad 1.6's own messages leave out; complete the
        provenance record with how the task ended."""
        result = handle.result
        if result is not None and result.oom_killed:
            self.events.emit(handle, "OOM killed: the task used more memory than it was given")
        elif result is not None and result.err:
            self.events.emit(handle, result.err)
        data = provenance.kept(handle.run_dir)
        if data is not None and "ended_at" not in data:
            data = provenance.finish(data, result)
            try:
                provenance.keep(handle.run_dir, data)
                digest = provenance.publish(str(data["where"]["alloc_dir"]), handle.name, data)
                self.events.emit(
                    handle, f"Provenance completed: {provenance.RECORD_EVENT}{digest[7:]}"
                )
            except (OSError, KeyError, TypeError) as err:
                log.warning("provenance record not completed", extra={"kv": {"error": str(err)}})

    def WaitTask(
        self, request: driver_pb2.WaitTaskRequest, context: grpc.ServicerContext
    ) -> driver_pb2.WaitTaskResponse:
        handle = self._handle(request.task_id, context)
        while context.is_active():
            result = handle.wait(1.0)
            if result is not None:
                return driver_pb2.WaitTaskResponse(result=exit_result(result), err=result.err)
        abort(context, grpc.StatusCode.CANCELLED, "wait cancelled")

    def StopTask(
        self, request: driver_pb2.StopTaskRequest, context: grpc.ServicerContext
    ) -> driver_pb2.StopTaskResponse:
        with self.lock:
            handle = self.tasks.get(request.task_id)
        if handle is None or handle.exited.is_set():
            return driver_pb2.StopTaskResponse()
        try:
            signum = parse_signal(request.signal) if request.signal else signal.SIGTERM
        except ValueError as err:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"kill_signal: {err}")
        timeout = (
            request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else 5.0
        )
        self._stop(handle, signum, timeout)
        return driver_pb2.StopTaskResponse()

    def _stop(self, handle: TaskHandle, signum: int, timeout: float) -> None:
        """Signal, wait up to timeout, then SIGKILL the whole container."""
        try:
            if timeout > 0:
                client.send_signal(handle.run_dir, signum)
                self.events.emit(
                    handle, f"Sent {signal.Signals(signum).name}, waiting {timeout:g}s"
                )
                if handle.wait(timeout) is not None:
                    return
            client.send_signal(handle.run_dir, signal.SIGKILL)
            if timeout > 0:
                self.events.emit(handle, f"Task did not stop within {timeout:g}s: sent SIGKILL")
        except OSError:
            pass  # the supervisor is gone: the task has exited
        handle.wait(STOP_GRACE_AFTER_KILL)

    def DestroyTask(
        self, request: driver_pb2.DestroyTaskRequest, context: grpc.ServicerContext
    ) -> driver_pb2.DestroyTaskResponse:
        with self.lock:
            handle = self.tasks.get(request.task_id)
        if handle is None:
            return driver_pb2.DestroyTaskResponse()
        if not handle.exited.is_set():
            if not request.force:
                abort(
                    context,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"task {request.task_id!r} is still running; stop it first or use force",
                )
            self._stop(handle, signal.SIGKILL, 0)
        with self.lock:
            self.tasks.pop(request.task_id, None)
        client.remove(handle.run_dir)
        return driver_pb2.DestroyTaskResponse()

    def InspectTask(
        self, request: driver_pb2.InspectTaskRequest, context: grpc.ServicerContext
    ) -> driver_pb2.InspectTaskResponse:
        handle = self._handle(request.task_id, context)
        result = handle.result if handle.exited.is_set() else None
        status = driver_pb2.TaskStatus(
            id=handle.task_id,
            name=handle.name,
            state=driver_pb2.EXITED if result else driver_pb2.RUNNING,
            started_at=timestamp(handle.state.started_at),
            completed_at=timestamp(result.completed_at if result else 0),
            result=exit_result(result),
        )
        driver = driver_pb2.TaskDriverStatus(attributes={"run_dir": handle.run_dir})
        return driver_pb2.InspectTaskResponse(task=status, driver=driver)

    def TaskStats(
        self, request: driver_pb2.TaskStatsRequest, context: grpc.ServicerContext
    ) -> Iterator[driver_pb2.TaskStatsResponse]:
        with self.lock:
            handle = self.tasks.get(request.task_id)
        if handle is None:
            return
        interval = 1.0
        if request.HasField("collection_interval"):
            interval = max(request.collection_interval.ToTimedelta().total_seconds(), 0.1)
        while context.is_active() and not handle.exited.is_set():
            yield driver_pb2.TaskStatsResponse(stats=self._task_stats(handle))
            handle.exited.wait(interval)

    def _task_stats(self, handle: TaskHandle) -> driver_pb2.TaskStats:
        sample = handle.usage()
        return driver_pb2.TaskStats(
            id=handle.task_id,
            timestamp=timestamp(sample.timestamp),
            agg_resource_usage=resource_usage(sample.total, self.mhz),
            resource_usage_by_pid={
                str(pid): resource_usage(u, self.mhz) for pid, u in sample.by_pid.items()
            },
        )

    def SignalTask(
        self, request: driver_pb2.SignalTaskRequest, context: grpc.ServicerContext
    ) -> driver_pb2.SignalTaskResponse:
        handle = self._handle(request.task_id, context)
        try:
            signum = parse_signal(request.signal)
        except ValueError as err:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if handle.exited.is_set():
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, "the task has already exited")
        try:
            client.send_signal(handle.run_dir, signum)
        except OSError as err:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"cannot signal the task: {err}")
        return driver_pb2.SignalTaskResponse()

    # ---- exec -------------------------------------------------------------------------------

    def _exec_argv(
        self, task_id: str, command: list[str], context: grpc.ServicerContext
    ) -> list[str]:
        handle = self._handle(task_id, context)
        if handle.exited.is_set() or not os.path.exists(f"/proc/{handle.state.init_pid}/ns/mnt"):
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, "the task is not running")
        try:
            return enter.argv(handle.run_dir, handle.state.init_pid, command)
        except ContainerError as err:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))

    def ExecTask(
        self, request: driver_pb2.ExecTaskRequest, context: grpc.ServicerContext
    ) -> driver_pb2.ExecTaskResponse:
        argv = self._exec_argv(request.task_id, list(request.command), context)
        timeout = None
        if request.HasField("timeout") and request.timeout.ToTimedelta().total_seconds() > 0:
            timeout = request.timeout.ToTimedelta().total_seconds()
        try:
            done = subprocess.run(
                argv,
                env=client.helper_env(),
                capture_output=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            return driver_pb2.ExecTaskResponse(
                stdout=err.stdout or b"",
                stderr=err.stderr or b"",
                result=driver_pb2.ExitResult(exit_code=124),
            )
        code = done.returncode
        result = driver_pb2.ExitResult(
            exit_code=128 - code if code < 0 else code, signal=-code if code < 0 else 0
        )
        return driver_pb2.ExecTaskResponse(stdout=done.stdout, stderr=done.stderr, result=result)

    def ExecTaskStreaming(
        self,
        request_iterator: Iterator[driver_pb2.ExecTaskStreamingRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[driver_pb2.ExecTaskStreamingResponse]:
        first = next(request_iterator, None)
        if first is None or not first.HasField("setup"):
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "the first message must be setup")
        setup = first.setup
        argv = self._exec_argv(setup.task_id, list(setup.command), context)
        yield from execio.stream(argv, client.helper_env(), setup.tty, request_iterator, context)

    def CreateNetwork(
        self, request: driver_pb2.CreateNetworkRequest, context: grpc.ServicerContext
    ) -> driver_pb2.CreateNetworkResponse:
        abort(context, grpc.StatusCode.UNIMPLEMENTED, "pyhpc does not create networks")

    def DestroyNetwork(
        self, request: driver_pb2.DestroyNetworkRequest, context: grpc.ServicerContext
    ) -> driver_pb2.DestroyNetworkResponse:
        abort(context, grpc.StatusCode.UNIMPLEMENTED, "pyhpc does not create networks")
