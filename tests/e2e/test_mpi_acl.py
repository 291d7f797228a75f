"""MPI across allocations on a Nomad cluster with ACLs: the launcher's remote shell (`nomad
alloc exec` into each worker) runs with the job's own credentials, its workload identity,
given rights by an ACL policy linked to the launcher task. Without that policy the run fails
and says why. A Nomad agent of its own (server and client, ACLs on, loopback ports 5646-5648)
loads the test bed's pyhpc plugin; nothing of the shared test bed changes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from test_mpi import mpi_image  # noqa: F401 - the fixture that builds the MPI image

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "jobspecs" / "mpi-multi.nomad"
ADDR = "http://127.0.0.1:5646"
POLICY = """namespace "default" {
  capabilities = ["read-job", "alloc-exec", "alloc-lifecycle"]
}
"""


class AclAgent:
    def __init__(self, cluster: Any, state: Path) -> None:
        self.bin = str(cluster.nomad_bin)
        self.state = state
        self.env = {**cluster.env, "NOMAD_ADDR": ADDR}
        self.http = requests.Session()
        self.http.trust_env = False

    def nomad(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.bin, *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0 or not check, f"nomad {args}: {done.stdout}{done.stderr}"
        return done

    def get(self, path: str) -> Any:
        r = self.http.get(
            f"{ADDR}/v1/{path}", headers={"X-Nomad-Token": self.env["NOMAD_TOKEN"]}, timeout=10
        )
        r.raise_for_status()
        return r.json()

    def logs(self, alloc_id: str, task: str, kind: str) -> str:
        return self.nomad("alloc", "logs", *(["-stderr"] if kind == "stderr" else []),
                          alloc_id, task, check=False).stdout  # fmt: skip

    def run(self, name: str, timeout: float = 120) -> tuple[str, str, str]:
        """Run mpi-multi as job NAME (1 worker of 2 ranks, Open MPI hello) to its end: the
        launcher's status, stdout and stderr."""
        path = self.state / f"{name}.nomad.hcl"
        path.write_text(SPEC.read_text().replace('job "mpi-multi"', f'job "{name}"'))
        self.nomad("job", "run", "-detach", "-var", "workers=1", "-var", "node_pool=default",
                   str(path))  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            stubs = [a for a in self.get(f"job/{name}/allocations") if a["TaskGroup"] == "launcher"]
            if stubs and stubs[0]["ClientStatus"] in ("complete", "failed"):
                break
            assert time.monotonic() < deadline, self.get(f"job/{name}/allocations")
            time.sleep(0.5)
        time.sleep(1)  # the last lines reach the log after the task's end
        alloc = stubs[0]["ID"]
        return (stubs[0]["ClientStatus"], self.logs(alloc, "launcher", "stdout"),
                self.logs(alloc, "launcher", "stderr"))  # fmt: skip


@pytest.fixture(scope="module")
def acl_agent(cluster: Any, mpi_image: str) -> Iterator[AclAgent]:  # noqa: F811
    state = Path(tempfile.mkdtemp(prefix="pyhpc-acl-"))
    run_dir = "/run/pyhpc-acl"
    plugin = (cluster.state_dir / "nomad" / "pyhpc.hcl").read_text()
    for option, value in (("run_dir", run_dir), ("mpi_nomad_address", ADDR)):
        plugin, found = re.subn(rf"(?m)^    {option} = .*$", f'    {option} = "{value}"', plugin)
        assert found == 1, (option, plugin)
    (state / "pyhpc.hcl").write_text(plugin)
    (state / "agent.hcl").write_text(f"""
data_dir  = "{state}/data"
bind_addr = "127.0.0.1"
disable_update_check = true
advertise {{
  http = "127.0.0.1"
  rpc  = "127.0.0.1"
  serf = "127.0.0.1"
}}
ports {{
  http = 5646
  rpc  = 5647
  serf = 5648
}}
server {{
  enabled          = true
  bootstrap_expect = 1
}}
client {{
  enabled           = true
  network_interface = "lo"
  cgroup_parent     = "pyhpc-acl"
  options {{
    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean"
  }}
}}
acl {{
  enabled = true
}}
consul {{
  address          = "127.0.0.1:1"
  auto_advertise   = false
  server_auto_join = false
  client_auto_join = false
}}
plugin_dir = "{cluster.state_dir / "plugins"}"
""")
    log = open(state / "agent.log", "wb")  # noqa: SIM115 - closed below
    agent = subprocess.Popen(
        [str(cluster.nomad_bin), "agent", "-config", str(state / "agent.hcl"),
         "-config", str(state / "pyhpc.hcl")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    me = AclAgent(cluster, state)
    try:
        deadline = time.monotonic() + 60
        while True:
            boot = me.nomad("acl", "bootstrap", "-t", "{{.SecretID}}", check=False)
            if boot.returncode == 0:
                me.env["NOMAD_TOKEN"] = boot.stdout.strip()
                break
            assert agent.poll() is None, (state / "agent.log").read_text()[-3000:]
            assert time.monotonic() < deadline, boot.stderr
            time.sleep(0.5)
        while True:  # the node, with pyhpc healthy
            nodes = me.get("nodes")
            if nodes and nodes[0]["Status"] == "ready":
                node = me.get(f"node/{nodes[0]['ID']}")
                if node["Drivers"].get("pyhpc", {}).get("Healthy"):
                    break
            assert time.monotonic() < deadline, nodes
            time.sleep(0.5)
        yield me
    finally:
        for job in ("e2e-acl-denied", "e2e-acl"):
            me.nomad("job", "stop", "-purge", job, check=False)
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGINT)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
        log.close()
        # The client's task directories keep their secrets/private tmpfs mounts after it stops.
        with open("/proc/mounts", encoding="utf-8") as f:
            mounts = [line.split()[1] for line in f]
        for mount in sorted((m for m in mounts if m.startswith(f"{state}/")), reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def test_launcher_without_rights_fails_naming_the_denied_exec(acl_agent: AclAgent) -> None:
    status, out, err = acl_agent.run("e2e-acl-denied")
    assert status == "failed", out + err
    # The launcher says what Nomad answered and what the task lacks, before mpirun starts.
    assert "cannot reach worker allocation" in err and ADDR in err, err
    assert "403 (Permission denied)" in err, err
    assert "needs a token with read-job, alloc-exec and alloc-lifecycle" in err, err
    assert "ORTE" not in err and "hello from" not in out, out + err


def test_launcher_execs_with_its_workload_identity_given_a_task_policy(
    acl_agent: AclAgent,
) -> None:
    policy = acl_agent.state / "mpi-launcher.hcl"
    policy.write_text(POLICY)
    link = ("-namespace", "default", "-job", "e2e-acl", "-group", "launcher", "-task", "launcher")
    acl_agent.nomad("acl", "policy", "apply", *link, "mpi-launcher", str(policy))
    status, out, err = acl_agent.run("e2e-acl")
    assert status == "complete", out + err
    assert sorted(re.findall(r"hello from rank (\d+) of 2", out)) == ["0", "1"], out
