"""The foundation, end to end: the real Nomad agent loads pyhpc from its plugin_dir and drives
tasks through it. Each test names the behaviour a cluster operator relies on."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import leaks
import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = "/var/lib/pyhpc/images/busybox.sqsh"
NO_RETRY = """
    restart {
      attempts = 0
      mode     = "fail"
    }
    reschedule {
      attempts  = 0
      unlimited = false
    }
"""


@pytest.fixture(scope="module", autouse=True)
def demo_image() -> str:
    subprocess.run(
        [str(REPO / "scripts" / "make-demo-image.sh"), IMAGE], check=True, capture_output=True
    )
    return IMAGE


def job(
    name: str,
    script: str,
    *,
    type_: str = "batch",
    task_extra: str = "",
    config_extra: str = "",
    command: str | None = "/bin/sh",
    image: str = IMAGE,
    job_extra: str = "",
    cpu: int = 100,
    memory: int = 64,
    cores: int = 0,
) -> str:
    """A one-task job (group and task "g" and "t") that is never retried, running SCRIPT
    with /bin/sh in IMAGE; cores > 0 reserves whole cores instead of cpu MHz."""
    command_line = f'command = "{command}"' if command else ""
    amount = f"cores = {cores}" if cores else f"cpu    = {cpu}"
    return f"""
job "{name}" {{
  datacenters = ["*"]
  type        = "{type_}"
{job_extra}
  group "g" {{
{NO_RETRY}
    task "t" {{
      driver = "pyhpc"
{task_extra}
      config {{
        image = "{image}"
        {command_line}
        args  = ["-c", {json_str(script)}]
{config_extra}
      }}
      resources {{
        {amount}
        memory = {memory}
      }}
    }}
  }}
}}
"""


def json_str(text: str) -> str:
    import json

    # HCL would interpolate ${...}; escape it so shell variables reach the task untouched.
    return json.dumps(text).replace("${", "$${")


def events_text(cluster: Any, alloc: dict[str, Any], task: str = "t") -> str:
    return "\n".join(
        f"{e['Type']}: {e.get('DisplayMessage', '')} {e.get('Details', {})}"
        for e in cluster.task_events(alloc, task)
    )


def completed(cluster: Any, spec: str) -> tuple[str, str]:
    """Run a jobspec whose task must succeed; its stdout and stderr."""
    job_id = cluster.run_job(spec)
    alloc = cluster.wait_alloc(job_id, {"complete"})
    logs = cluster.alloc_logs(alloc["ID"], "t"), cluster.alloc_logs(alloc["ID"], "t", stderr=True)
    cluster.stop_job(job_id)
    return logs


def refused(cluster: Any, spec: str, expected: str) -> dict[str, Any]:
    """Run a jobspec whose task must fail before it starts, with `expected` in its events."""
    job_id = cluster.run_job(spec)
    alloc = cluster.wait_alloc(job_id, {"failed"})
    text = events_text(cluster, alloc)
    assert expected in text, text
    assert "Traceback" not in text
    assert "Started" not in [e["Type"] for e in cluster.task_events(alloc, "t")], text
    cluster.stop_job(job_id)
    return alloc


def running_alloc(
    cluster: Any, job_id: str, marker: str = "", timeout: float = 60
) -> dict[str, Any]:
    alloc = cluster.wait_alloc(job_id, {"running"}, timeout=timeout)
    deadline = time.monotonic() + timeout
    while marker and marker not in cluster.alloc_logs(alloc["ID"], "t"):
        assert time.monotonic() < deadline, f"task never printed {marker!r}"
        time.sleep(0.3)
    return alloc


def release(cluster: Any, alloc_id: str) -> None:
    """Let a waiting task finish: it polls for /alloc/go."""
    cluster.nomad("alloc", "exec", "-t=false", "-task", "t", alloc_id, "/bin/touch", "/alloc/go")


def kill_plugin_and_await_recovery(cluster: Any, *allocs: dict[str, Any]) -> None:
    """kill -9 the plugin; return once Nomad relaunched it and it recovered every alloc."""
    before = leaks.plugin_pids(cluster.state_dir)
    assert before, "no pyhpc plugin process found"
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not (set(leaks.plugin_pids(cluster.state_dir)) - set(before)):
        assert time.monotonic() < deadline, "Nomad did not relaunch the plugin"
        time.sleep(0.5)
    for alloc in allocs:
        while "recovered" not in events_text(cluster, cluster.alloc(alloc["ID"])):
            assert time.monotonic() < deadline, "the task was not recovered"
            time.sleep(0.5)
        assert cluster.alloc(alloc["ID"])["ClientStatus"] == "running"


def test_node_lists_pyhpc_detected_and_healthy_with_attributes(cluster: Any) -> None:
    out = cluster.nomad("node", "status", "-self", "-verbose").stdout
    line = next(x for x in out.splitlines() if x.split()[:1] == ["pyhpc"])
    assert line.split()[1:4] == ["true", "true", "Healthy"], line
    assert "driver.pyhpc.version" in out
    assert "driver.pyhpc.runtime" in out


def test_batch_job_output_reaches_alloc_logs(cluster: Any) -> None:
    out, err = completed(
        cluster, job("e2e-hello", 'echo "out from $(hostname)"; echo "err line" >&2')
    )
    assert out == "out from t\n"
    assert err == "err line\n"


def test_nonzero_exit_fails_the_allocation_with_the_exit_code_in_events(cluster: Any) -> None:
    job_id = cluster.run_job(job("e2e-exit3", "exit 3"))
    alloc = cluster.wait_alloc(job_id, {"failed"})
    terminated = [e for e in cluster.task_events(alloc, "t") if e["Type"] == "Terminated"]
    assert terminated and terminated[-1]["ExitCode"] == 3, events_text(cluster, alloc)
    assert "Exit Code: 3" in cluster.nomad("alloc", "status", alloc["ID"]).stdout
    cluster.stop_job(job_id)


def test_job_stop_sends_kill_signal_then_sigkill_after_kill_timeout(cluster: Any) -> None:
    polite = job(
        "e2e-polite",
        "trap 'echo got USR1; exit 0' USR1; echo ready; while true; do sleep 0.2; done",
        type_="service",
        task_extra='      kill_signal = "SIGUSR1"\n      kill_timeout = "10s"',
    )
    stubborn = job(
        "e2e-stubborn",
        "trap '' TERM; echo ready; while true; do sleep 0.2; done",
        type_="service",
        task_extra='      kill_timeout = "2s"',
    )
    for spec, name in ((polite, "e2e-polite"), (stubborn, "e2e-stubborn")):
        cluster.run_job(spec)
        running_alloc(cluster, name, "ready")
    polite_alloc = cluster.wait_alloc("e2e-polite", {"running"})
    stubborn_alloc = cluster.wait_alloc("e2e-stubborn", {"running"})

    started = time.monotonic()
    cluster.stop_job("e2e-polite", purge=False)
    assert time.monotonic() - started < 8, "SIGUSR1 should have ended the task at once"
    assert "got USR1" in cluster.alloc_logs(polite_alloc["ID"], "t")

    started = time.monotonic()
    cluster.stop_job("e2e-stubborn", purge=False)
    assert time.monotonic() - started >= 2, "SIGKILL came before kill_timeout"
    done = cluster.alloc(stubborn_alloc["ID"])
    killed = [e for e in cluster.task_events(done, "t") if e["Type"] == "Terminated"]
    assert killed and killed[-1]["Signal"] == signal.SIGKILL, events_text(cluster, done)
    assert "SIGKILL" in events_text(cluster, done)
    for name in ("e2e-polite", "e2e-stubborn"):
        cluster.stop_job(name)


def test_alloc_signal_exec_and_stats_on_a_running_task(cluster: Any) -> None:
    job_id = cluster.run_job(
        job(
            "e2e-running",
            "trap 'echo got HUP' HUP; echo ready; while true; do i=0; "
            "while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 0.1; done",
            type_="service",
        )
    )
    alloc = running_alloc(cluster, job_id, "ready")
    alloc_id = alloc["ID"]

    cluster.nomad("alloc", "signal", "-s", "SIGHUP", alloc_id, "t")
    deadline = time.monotonic() + 15
    while "got HUP" not in cluster.alloc_logs(alloc_id, "t"):
        assert time.monotonic() < deadline, "SIGHUP never reached the task"
        time.sleep(0.3)

    # exec without a tty: exit code, stdout, stdin passthrough.
    done = cluster.nomad(
        "alloc",
        "exec",
        "-i",
        "-t=false",
        "-task",
        "t",
        alloc_id,
        "/bin/sh",
        "-c",
        "head -n1; hostname; exit 43",
        check=False,
        input="first line\nsecond line\n",
    )
    assert done.returncode == 43, done.stderr
    assert done.stdout.splitlines() == ["first line", "t"]
    # The exec'd command is held by the task's cgroup(s), as the task is: no escape from its
    # limits. In the task's cgroup namespace, any other cgroup would show as a path, not "/".
    groups = cluster.nomad("alloc", "exec", "-t=false", "-task", "t", alloc_id, "/bin/sh", "-c",
                           "cat /proc/self/cgroup; echo; cat /proc/1/cgroup").stdout  # fmt: skip
    own, task = groups.split("\n\n")
    assert own.strip() == task.strip(), groups
    assert all(line.endswith(":/") for line in own.strip().splitlines()), groups

    # exec with a tty, inside a real pseudo-terminal of 40x100: stty size sees it.
    nomad = shlex.join(
        [str(cluster.nomad_bin), "alloc", "exec", "-t", "-task", "t", alloc_id, "/bin/stty", "size"]
    )
    tty = subprocess.run(
        ["script", "-qec", f"stty rows 40 cols 100; {nomad}", "/dev/null"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert "40 100" in tty.stdout, tty.stdout + tty.stderr
    no_tty = cluster.nomad(
        "alloc", "exec", "-t=false", "-task", "t", alloc_id, "/bin/stty", "size", check=False
    )
    assert no_tty.returncode != 0

    deadline = time.monotonic() + 30
    while True:
        stats = cluster.nomad("alloc", "status", "-stats", alloc_id).stdout
        usage = stats.split("Task Resources:")[1].splitlines()[2]
        cpu, memory = usage.split()[0], usage.split()[1]
        if int(cpu.split("/")[0]) > 0 and not memory.startswith("0 B"):
            break
        assert time.monotonic() < deadline, f"no CPU/memory in alloc status -stats:\n{stats}"
        time.sleep(1)
    assert "RSS" in stats
    cluster.stop_job(job_id)


def test_task_survives_kill_9_of_the_plugin_and_reports_its_real_exit_code(cluster: Any) -> None:
    job_id = cluster.run_job(
        job(
            "e2e-plugin-crash",
            "echo ready; while [ ! -f /alloc/go ]; do sleep 0.2; done; echo finishing; exit 5",
        )
    )
    try:  # a task left running would hold the node's CPU and image for the tests after this
        alloc = running_alloc(cluster, job_id, "ready")
        kill_plugin_and_await_recovery(cluster, alloc)
        release(cluster, alloc["ID"])
        done = cluster.wait_alloc(job_id, {"failed"})
        terminated = [e for e in cluster.task_events(done, "t") if e["Type"] == "Terminated"]
        assert terminated and terminated[-1]["ExitCode"] == 5, events_text(cluster, done)
        assert "finishing" in cluster.alloc_logs(alloc["ID"], "t")
    finally:
        cluster.stop_job(job_id)


@pytest.mark.parametrize("kill", [False, True], ids=["graceful", "sigkill"])
def test_task_survives_an_agent_restart(cluster: Any, kill: bool) -> None:
    name = f"e2e-agent-restart-{'kill' if kill else 'int'}"
    job_id = cluster.run_job(
        job(
            name,
            "echo ready; while [ ! -f /alloc/go ]; do sleep 0.2; done; echo finishing; exit 6",
        )
    )
    try:
        alloc = running_alloc(cluster, job_id, "ready")
        cluster.restart_nomad(kill=kill)
        alloc = cluster.wait_alloc(job_id, {"running"}, timeout=60)
        release(cluster, alloc["ID"])
        done = cluster.wait_alloc(job_id, {"failed"}, timeout=60)
        terminated = [e for e in cluster.task_events(done, "t") if e["Type"] == "Terminated"]
        assert terminated and terminated[-1]["ExitCode"] == 6, events_text(cluster, done)
        assert "finishing" in cluster.alloc_logs(alloc["ID"], "t")
    finally:
        cluster.stop_job(job_id)


@pytest.mark.parametrize(
    ("name", "spec_kwargs", "config_extra", "expected"),
    [
        ("e2e-bad-missing", {"command": None}, "", "command"),
        ("e2e-bad-type", {}, '        work_dir = ["not", "a", "string"]', "work_dir"),
        ("e2e-bad-unknown", {}, '        colour = "blue"', "colour"),
        ("e2e-bad-image", {}, "", "image"),
    ],
)
def test_bad_task_config_fails_the_task_with_the_field_named(
    cluster: Any, name: str, spec_kwargs: dict[str, Any], config_extra: str, expected: str
) -> None:
    spec = job(name, "true", config_extra=config_extra, **spec_kwargs)
    if name == "e2e-bad-image":
        spec = spec.replace(IMAGE, "/var/lib/pyhpc/images/does-not-exist.sqsh")
    refused(cluster, spec, expected)
    assert cluster.node()["Drivers"]["pyhpc"]["Healthy"], "bad input hurt the driver"


def test_bad_plugin_config_stops_the_agent_with_our_message(cluster: Any, tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "nomad_driver.cli.main",
            "install-plugin",
            "--plugin-dir",
            str(plugins),
        ],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    config = tmp_path / "agent.hcl"
    config.write_text(
        "ports {\n  http = 7646\n  rpc = 7647\n  serf = 7648\n}\n"
        'plugin "pyhpc" {\n  config {\n    run_dir = "relative/dir"\n  }\n}\n'
    )
    done = subprocess.run(
        [
            str(cluster.nomad_bin),
            "agent",
            "-dev",
            "-bind=127.0.0.1",
            f"-plugin-dir={plugins}",
            f"-config={config}",
            f"-data-dir={tmp_path / 'data'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=cluster.env,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "run_dir" in output and "must be an absolute path" in output, output[-3000:]
    assert "Traceback" not in output
    # The plugin instances that agent started must not outlive it.
    deadline = time.monotonic() + 5
    while subprocess.run(["pgrep", "-f", str(plugins)], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "plugin processes outlived the agent that failed"
        time.sleep(0.2)
