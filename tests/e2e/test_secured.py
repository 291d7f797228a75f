"""pyhpc's Nomad clients against a secured agent: mutual TLS (verify_https_client and
verify_server_hostname), ACLs bootstrapped, jobs in a namespace other than default. One agent
(server and client, its own region "secure", the test bed's pyhpc plugin) started here, beside
the loopback test bed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_foundation import IMAGE, json_str

PORT = 4846  # http; rpc and serf the next two (4646 and 4746 are the test bed's regions)
ADDRESS = f"https://127.0.0.1:{PORT}"
NAMESPACE = "hpc"

JOB = f"""
job "secured" {{
  datacenters = ["*"]
  namespace   = "{NAMESPACE}"
  type        = "batch"
  parameterized {{
    meta_required = ["word"]
  }}
  group "g" {{
    restart {{
      attempts = 0
      mode     = "fail"
    }}
    task "t" {{
      driver = "pyhpc"
      config {{
        image   = "{IMAGE}"
        command = "/bin/sh"
        args    = ["-c", {json_str('echo "said ${NOMAD_META_word}"')}]
      }}
      resources {{
        cpu    = 100
        memory = 64
      }}
    }}
  }}
}}
"""

DISPATCH_ONLY = f"""
namespace "{NAMESPACE}" {{
  capabilities = ["dispatch-job", "read-job", "list-jobs", "read-logs"]
}}
"""
READ_ONLY = f"""
namespace "{NAMESPACE}" {{
  capabilities = ["read-job", "list-jobs"]
}}
"""


class Secured:
    def __init__(self, root: Path, nomad: Path) -> None:
        self.root, self.nomad_bin = root, nomad
        self.certs = root / "certs"
        self.management = ""

    def tls_env(self, token: str = "") -> dict[str, str]:
        env = {
            "PATH": "/usr/bin:/bin",
            "NOMAD_ADDR": ADDRESS,
            "NOMAD_CACERT": str(self.certs / "nomad-agent-ca.pem"),
            "NOMAD_CLIENT_CERT": str(self.certs / "secure-cli-nomad.pem"),
            "NOMAD_CLIENT_KEY": str(self.certs / "secure-cli-nomad-key.pem"),
        }
        if token:
            env["NOMAD_TOKEN"] = token
        return env

    def nomad(self, *args: str, token: str = "", check: bool = True) -> str:
        done = subprocess.run(
            [str(self.nomad_bin), *args],
            env={**self.tls_env(token or self.management), "CHECKPOINT_DISABLE": "1"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"nomad {' '.join(args)}: {done.stderr or done.stdout}")
        return done.stdout

    def token_for(self, name: str, rules: str) -> str:
        policy = self.root / f"{name}.hcl"
        policy.write_text(rules)
        self.nomad("acl", "policy", "apply", name, str(policy))
        made = self.nomad("acl", "token", "create", f"-name={name}", f"-policy={name}", "-json")
        return str(json.loads(made)["SecretID"])


def pyhpc(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nomad_driver.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture(scope="module")
def secured(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("secured")
    bed = Secured(root, cluster.nomad_bin)
    bed.certs.mkdir()
    for made in (
        ["tls", "ca", "create"],
        ["tls", "cert", "create", "-server", "-region", "secure"],
        ["tls", "cert", "create", "-cli", "-region", "secure"],
    ):
        subprocess.run([str(cluster.nomad_bin), *made], cwd=bed.certs, check=True,
                       capture_output=True, timeout=60)  # fmt: skip
    c = bed.certs
    (root / "agent.hcl").write_text(f"""
name       = "pyhpc-secure"
region     = "secure"
datacenter = "secure1"
data_dir   = "{root / "data"}"
plugin_dir = "{cluster.state_dir / "plugins"}"
bind_addr  = "127.0.0.1"
disable_update_check = true
advertise {{
  http = "127.0.0.1"
  rpc  = "127.0.0.1"
  serf = "127.0.0.1"
}}
ports {{
  http = {PORT}
  rpc  = {PORT + 1}
  serf = {PORT + 2}
}}
server {{
  enabled          = true
  bootstrap_expect = 1
}}
client {{
  enabled           = true
  network_interface = "lo"
  cgroup_parent     = "/nomad-secure"
  options {{
    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean"
  }}
}}
acl {{
  enabled = true
}}
tls {{
  http                   = true
  rpc                    = true
  ca_file                = "{c / "nomad-agent-ca.pem"}"
  cert_file              = "{c / "secure-server-nomad.pem"}"
  key_file               = "{c / "secure-server-nomad-key.pem"}"
  verify_server_hostname = true
  verify_https_client    = true
}}
consul {{
  client_auto_join = false
  server_auto_join = false
  auto_advertise   = false
}}
""")
    log = open(root / "agent.log", "w")  # noqa: SIM115 - open for the agent's whole life
    agent = subprocess.Popen(
        [str(cluster.nomad_bin), "agent", f"-config={root / 'agent.hcl'}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "CHECKPOINT_DISABLE": "1"},
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            done = subprocess.run(
                [str(cluster.nomad_bin), "acl", "bootstrap", "-json"],
                env={**bed.tls_env(), "CHECKPOINT_DISABLE": "1"},
                capture_output=True,
                text=True,
                timeout=30,
            )
            if done.returncode == 0:
                bed.management = json.loads(done.stdout)["SecretID"]
                break
            assert agent.poll() is None, (root / "agent.log").read_text()[-3000:]
            assert time.monotonic() < deadline, done.stderr
            time.sleep(1)
        bed.nomad("namespace", "apply", "-description", "pyhpc tests", NAMESPACE)
        deadline = time.monotonic() + 90
        while "pyhpc" not in bed.nomad("node", "status", "-verbose", "-self", check=False):
            assert time.monotonic() < deadline, "the secured client never fingerprinted pyhpc"
            time.sleep(1)
        jobfile = root / "secured.nomad"
        jobfile.write_text(JOB)
        bed.nomad("job", "run", str(jobfile))
        yield bed
    finally:
        agent.terminate()
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        log.close()
        # The client's alloc dirs keep their secrets tmpfs and bind mounts after it stops.
        for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
            target = line.split()[1]
            if target.startswith(str(root) + "/"):
                subprocess.run(["umount", "-l", target], check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_dispatch_over_mtls_in_a_namespace_with_a_dispatch_only_token(secured: Secured) -> None:
    token = secured.token_for("dispatch-hpc", DISPATCH_ONLY)
    env = {**secured.tls_env(token), "NOMAD_NAMESPACE": NAMESPACE}
    done = pyhpc(env, "dispatch", "secured", "--meta", "word=hello", "--output", "--timeout", "120")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "said hello" in done.stdout and "1 of 1 completed" in done.stdout, done.stdout
    # The same with the flags Nomad's CLI has, instead of the environment.
    flags = [
        f"-address={ADDRESS}", f"-token={token}", f"-namespace={NAMESPACE}",
        f"-ca-cert={env['NOMAD_CACERT']}", f"-client-cert={env['NOMAD_CLIENT_CERT']}",
        f"-client-key={env['NOMAD_CLIENT_KEY']}",
    ]  # fmt: skip
    done = pyhpc({"PATH": "/usr/bin:/bin"}, "dispatch", "secured", *flags, "--meta", "word=again")
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_token_without_dispatch_is_refused_with_nomads_403_named(secured: Secured) -> None:
    token = secured.token_for("read-hpc", READ_ONLY)
    env = {**secured.tls_env(token), "NOMAD_NAMESPACE": NAMESPACE}
    done = pyhpc(env, "dispatch", "secured", "--meta", "word=no")
    assert done.returncode != 0
    message = done.stdout + done.stderr
    assert "HTTP 403" in message and "namespace hpc" in message and "NOMAD_TOKEN" in message
    assert "Traceback" not in message, message


def test_without_the_client_certificate_or_the_ca_one_line_says_what_to_check(
    secured: Secured,
) -> None:
    env = {**secured.tls_env(secured.management), "NOMAD_NAMESPACE": NAMESPACE}
    for missing in ("NOMAD_CLIENT_CERT", "NOMAD_CACERT"):
        partial = {k: v for k, v in env.items() if k != missing}
        done = pyhpc(partial, "dispatch", "secured", "--meta", "word=x")
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1, done.stderr
        assert f"Nomad at {ADDRESS}" in lines[0] and "Traceback" not in done.stderr, lines
    # The control: with both, the same call gets through.
    ok = pyhpc(env, "dispatch", "secured", "--meta", "word=x", "--no-follow")
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_job_sync_plans_and_registers_in_the_namespace(secured: Secured, tmp_path: Path) -> None:
    env = {**secured.tls_env(secured.management), "NOMAD_NAMESPACE": NAMESPACE}
    spec = tmp_path / "secured.nomad"
    spec.write_text(JOB.replace("memory = 64", "memory = 96"))
    dry = pyhpc(env, "job", "sync", str(spec), "--dry-run")
    assert dry.returncode == 0 and "MemoryMB: '64' => '96'" in dry.stdout, dry.stdout + dry.stderr
    done = pyhpc(env, "job", "sync", str(spec))
    assert done.returncode == 0 and "registered" in done.stdout, done.stdout + done.stderr
    job = json.loads(secured.nomad("job", "inspect", "-namespace", NAMESPACE, "secured"))
    assert job["Job"]["TaskGroups"][0]["Tasks"][0]["Resources"]["MemoryMB"] == 96
