"""A secured federation beside the loopback test bed, as a production site runs one: a private
CA; two Nomad regions ("secure", authoritative, and "secure2") with mutual TLS
(verify_server_hostname, verify_https_client), ACLs bootstrapped and replicated, a namespace;
Consul with TLS (clients verified too) and ACLs (default deny), Nomad holding its own Consul
token; Vault behind TLS holding the image-signing key. Every agent is the test bed's own build;
the Nomad clients load the test bed's pyhpc plugin with a plugin config that reaches Vault over
TLS. Ports: Nomad 4846-4848 and 4946-4948, Consul 8700-8702 and 8743 (https), Vault a free
one. On request (mpi_nodes_up), a pool of MPI nodes in region "secure", each in a network
namespace of its own with a Consul client agent of its own (https 8751+, serf 8761+)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from tests.vaultbed import TOKEN as VAULT_TOKEN
from tests.vaultbed import dev_vault

REGIONS = {"secure": 4846, "secure2": 4946}  # http; rpc and serf the next two
CONSUL_HTTPS = 8743
MPI_NET, MPI_PREFIX = "10.98.0", "pyhpc-smpi"  # the MPI nodes' network (scripts/testbed/netns.sh)
TESTBED = Path(__file__).resolve().parents[2] / "scripts" / "testbed"
NSBRIDGE, NETNS_SH = TESTBED / "nsbridge.py", TESTBED / "netns.sh"
NAMESPACE = "hpc"
SIGNED_DIR = Path("/var/lib/pyhpc/images/secured")
SIGNING_KEY = "pyhpc-secured"

NOMAD_CONSUL_POLICY = """
agent_prefix "" { policy = "read" }
node_prefix "" { policy = "write" }
service_prefix "" { policy = "write" }
key_prefix "" { policy = "read" }
"""


class SecureBed:
    def __init__(self, root: Path, bins: dict[str, Path], plugins: Path) -> None:
        self.root, self.bins, self.plugins = root, bins, plugins
        self.certs = root / "certs"
        self.management = ""
        self.consul_management = str(uuid.uuid4())
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []
        self.vault_address = ""
        self._vault: Any = None
        self.nomad_consul_token = ""
        self.mpi_procs: list[subprocess.Popen[bytes]] = []

    # -- what a user of the bed needs -------------------------------------------------------

    def address(self, region: str = "secure") -> str:
        return f"https://127.0.0.1:{REGIONS[region]}"

    def tls_env(self, token: str = "", region: str = "secure") -> dict[str, str]:
        """NOMAD_* for the CLI certificate: what an operator's shell holds."""
        c = self.certs
        env = {
            "PATH": "/usr/bin:/bin",
            "CHECKPOINT_DISABLE": "1",
            "NOMAD_ADDR": self.address(region),
            "NOMAD_CACERT": str(c / "nomad-agent-ca.pem"),
            "NOMAD_CLIENT_CERT": str(c / "secure-cli-nomad.pem"),
            "NOMAD_CLIENT_KEY": str(c / "secure-cli-nomad-key.pem"),
        }
        if token:
            env["NOMAD_TOKEN"] = token
        return env

    def nomad(self, *args: str, token: str = "", check: bool = True) -> str:
        done = subprocess.run(
            [str(self.bins["nomad"]), *args],
            env=self.tls_env(token or self.management),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"nomad {' '.join(args)}: {done.stderr or done.stdout}")
        return done.stdout

    def token_for(self, name: str, rules: str) -> str:
        """A global ACL token (replicated to every region) with one policy of these rules."""
        policy = self.root / f"{name}.hcl"
        policy.write_text(rules)
        self.nomad("acl", "policy", "apply", name, str(policy))
        made = self.nomad(
            "acl", "token", "create", f"-name={name}", f"-policy={name}", "-global", "-json"
        )
        return str(json.loads(made)["SecretID"])

    def consul(self, method: str, path: str, token: str = "", **kw: Any) -> Any:
        c = self.certs
        reply = requests.request(
            method,
            f"https://127.0.0.1:{CONSUL_HTTPS}{path}",
            headers={"X-Consul-Token": token or self.consul_management},
            verify=str(c / "consul-agent-ca.pem"),
            cert=(str(c / "dc1-client-consul-0.pem"), str(c / "dc1-client-consul-0-key.pem")),
            timeout=10,
            **kw,
        )
        reply.raise_for_status()
        return reply.json() if reply.content else None

    def vault(self) -> Any:
        from nomad_driver.signing.vault import Auth, Vault

        if self._vault is None:
            ca = str(self.certs / "vault" / "vault-ca.pem")
            self._vault = Vault(
                address=self.vault_address, auth=Auth(token=VAULT_TOKEN), ca_file=ca
            )
        return self._vault

    # -- bring-up ---------------------------------------------------------------------------

    def up(self) -> None:
        self.certs.mkdir(parents=True)
        self._make_certs()
        self._start_vault()
        self._start_consul()
        self.nomad_consul_token = self._consul_token_for_nomad()
        self._start_nomad("secure", self.nomad_consul_token, replication="")
        self._bootstrap()
        self._start_nomad("secure2", self.nomad_consul_token, replication=self.management)
        self._wait_federated()
        self.nomad("namespace", "apply", "-description", "pyhpc tests", NAMESPACE)
        for region in REGIONS:
            self._wait_node(region)

    def _run(self, *argv: str, cwd: Path) -> None:
        subprocess.run(list(argv), cwd=cwd, check=True, capture_output=True, timeout=60)

    def _make_certs(self) -> None:
        nomad, consul, c = str(self.bins["nomad"]), str(self.bins["consul"]), self.certs
        self._run(nomad, "tls", "ca", "create", cwd=c)
        for region in REGIONS:
            self._run(nomad, "tls", "cert", "create", "-server", "-region", region, cwd=c)
        self._run(nomad, "tls", "cert", "create", "-cli", "-region", "secure", cwd=c)
        self._run(nomad, "tls", "cert", "create", "-client", "-region", "secure", cwd=c)
        self._run(consul, "tls", "ca", "create", cwd=c)
        self._run(consul, "tls", "cert", "create", "-server", "-dc", "dc1", cwd=c)
        self._run(consul, "tls", "cert", "create", "-client", "-dc", "dc1", cwd=c)

    def _daemon(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - open while it runs
        self.logs.append(log)
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "CHECKPOINT_DISABLE": "1"},
        )
        self.procs.append(proc)
        return proc

    def _start_vault(self) -> None:
        self._vault_cm = dev_vault(str(self.certs / "vault"))
        (self.certs / "vault").mkdir()
        self.vault_address, _ = self._vault_cm.__enter__()
        self.vault().setup(SIGNING_KEY)
        token_file = self.root / "vault-token"
        token_file.write_text(VAULT_TOKEN + "\n")
        token_file.chmod(0o600)

    def _start_consul(self) -> None:
        config = self.root / "consul.hcl"
        config.write_text(f"""
datacenter  = "dc1"
node_name   = "pyhpc-secure"
bind_addr   = "127.0.0.1"
client_addr = "127.0.0.1"
ports {{
  http     = -1
  https    = {CONSUL_HTTPS}
  grpc     = -1
  grpc_tls = -1
  dns      = -1
  server   = 8700
  serf_lan = 8701
  serf_wan = 8702
}}
{self._consul_security("dc1-server-consul-0", "initial_management")}
""")
        self._daemon(
            "consul", [str(self.bins["consul"]), "agent", "-dev", f"-config-file={config}"]
        )
        self._until(lambda: bool(self.consul("GET", "/v1/status/leader")), "Consul's leader")

    def _consul_security(self, cert: str, token: str) -> str:
        """A Consul agent's TLS (clients verified too) and ACLs (default deny), the
        management token given as its TOKEN ("initial_management" or "agent")."""
        c = self.certs
        return f"""tls {{
  defaults {{
    ca_file         = "{c / "consul-agent-ca.pem"}"
    cert_file       = "{c / f"{cert}.pem"}"
    key_file        = "{c / f"{cert}-key.pem"}"
    verify_incoming = true
    verify_outgoing = true
  }}
  internal_rpc {{
    verify_server_hostname = true
  }}
}}
acl {{
  enabled        = true
  default_policy = "deny"
  tokens {{
    {token} = "{self.consul_management}"
  }}
}}"""

    def _consul_token_for_nomad(self) -> str:
        """Nomad's own Consul token, as a site gives it: services and nodes, nothing else."""
        self.consul("PUT", "/v1/acl/policy", json={"Name": "nomad", "Rules": NOMAD_CONSUL_POLICY})
        made = self.consul("PUT", "/v1/acl/token", json={"Policies": [{"Name": "nomad"}]})
        return str(made["SecretID"])

    def _start_nomad(self, region: str, consul_token: str, replication: str) -> None:
        port, data = REGIONS[region], self.root / region
        data.mkdir()
        join = (
            ""
            if region == "secure"
            else f'server_join {{ retry_join = ["127.0.0.1:{REGIONS["secure"] + 2}"] }}'
        )
        replicate = f'replication_token = "{replication}"' if replication else ""
        (data / "agent.hcl").write_text(f"""
{self._agent(f"pyhpc-{region}", region, f"{region}-dc", data, "127.0.0.1")}
ports {{
  http = {port}
  rpc  = {port + 1}
  serf = {port + 2}
}}
server {{
  enabled              = true
  bootstrap_expect     = 1
  authoritative_region = "secure"
  {join}
}}
client {{
  enabled           = true
  network_interface = "lo"
  cgroup_parent     = "/nomad-{region}"
  options {{
    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean"
  }}
}}
acl {{
  enabled = true
  {replicate}
}}
{self._tls_block(f"{region}-server-nomad")}
{self._consul_block(CONSUL_HTTPS, consul_token)}
{self._plugin()}
""")
        self._daemon(
            f"nomad-{region}", [str(self.bins["nomad"]), "agent", f"-config={data / 'agent.hcl'}"]
        )

    def _agent(self, name: str, region: str, datacenter: str, data: Path, address: str) -> str:
        """The head of a Nomad agent's config: who it is, where it keeps its state, the
        test bed's plugins, and the address it gives others."""
        return f"""name       = "{name}"
region     = "{region}"
datacenter = "{datacenter}"
data_dir   = "{data / "data"}"
plugin_dir = "{self.plugins}"
bind_addr  = "127.0.0.1"
disable_update_check = true
advertise {{
  http = "{address}"
  rpc  = "{address}"
  serf = "{address}"
}}"""

    def _plugin(self, **extra: str) -> str:
        """The pyhpc plugin block every secured client loads: Vault over TLS for signatures."""
        c = self.certs
        options = {
            "vault_address": self.vault_address,
            "vault_ca_file": str(c / "vault" / "vault-ca.pem"),
            "vault_token_file": str(self.root / "vault-token"),
            "image_mount_linger": "0",  # as the test bed's: no mount outlives its last task
            **extra,
        }
        lines = "".join(f'    {k} = "{v}"\n' for k, v in options.items())
        return f"""plugin "pyhpc" {{
  config {{
{lines}    signature_keys  = ["{SIGNING_KEY}"]
    signature_rules = ["{SIGNED_DIR}/=enforce"]
  }}
}}"""

    def _consul_block(self, port: int, token: str) -> str:
        """A Nomad agent's consul block: HTTPS with a client certificate, and its token."""
        c = self.certs
        return f"""consul {{
  address   = "127.0.0.1:{port}"
  ssl       = true
  ca_file   = "{c / "consul-agent-ca.pem"}"
  cert_file = "{c / "dc1-client-consul-0.pem"}"
  key_file  = "{c / "dc1-client-consul-0-key.pem"}"
  token     = "{token}"
  client_auto_join = false
  server_auto_join = false
}}"""

    def _tls_block(self, cert: str) -> str:
        c = self.certs
        return f"""tls {{
  http                   = true
  rpc                    = true
  ca_file                = "{c / "nomad-agent-ca.pem"}"
  cert_file              = "{c / f"{cert}.pem"}"
  key_file               = "{c / f"{cert}-key.pem"}"
  verify_server_hostname = true
  verify_https_client    = true
}}"""

    def _bootstrap(self) -> None:
        def bootstrap() -> bool:
            done = subprocess.run(
                [str(self.bins["nomad"]), "acl", "bootstrap", "-json"],
                env=self.tls_env(),
                capture_output=True,
                text=True,
                timeout=30,
            )
            if done.returncode == 0:
                self.management = json.loads(done.stdout)["SecretID"]
            return done.returncode == 0

        self._until(bootstrap, "the ACL bootstrap of region secure")

    def _wait_federated(self) -> None:
        self._until(
            lambda: (
                sorted(json.loads(self.nomad("operator", "api", "/v1/regions"))) == sorted(REGIONS)
            ),
            "both secured regions federated",
        )

    def _wait_node(self, region: str) -> None:
        def ready() -> bool:
            out = self.nomad("node", "status", "-region", region, "-json", check=False)
            nodes = json.loads(out) if out.strip().startswith("[") else []
            return any(
                n.get("Status") == "ready"
                and (n.get("Drivers") or {}).get("pyhpc", {}).get("Healthy")
                for n in nodes
            )

        self._until(ready, f"region {region}'s client with a healthy pyhpc driver")

    def _until(self, check: Any, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if check():
                    return
            except Exception:  # noqa: BLE001, S110 - not up yet
                pass
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"a secured agent exited while waiting for {what}:\n{self.log_tails()}"
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} after {timeout:.0f}s:\n{self.log_tails()}")
            time.sleep(0.5)

    def log_tails(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + p.read_text(errors="replace")[-1500:]
            for p in self.root.glob("*.log")
        )

    # -- a pool of MPI nodes in region "secure" ---------------------------------------------

    def mpi_nodes_up(self, count: int = 2) -> None:
        """COUNT more clients of region "secure", node pool "mpi", each in a network namespace
        of its own (address MPI_NET.I on a bridge, as scripts/testbed/mpi-nodes.sh makes them
        for the plain bed), each with a Consul client agent of its own (TLS, ACLs: a Nomad
        client removes from its agent the Nomad services it did not register). The server's
        RPC port and the node's Consul HTTPS port reach the namespace through nsbridge.py.
        Their plugin reaches the node's agent over HTTPS for the MPI launchers' remote shell."""
        run = self._run_quiet
        run(str(NETNS_SH), "up", MPI_PREFIX, "smpi", MPI_NET, str(count))
        for i in range(1, count + 1):
            ns, veth = f"{MPI_PREFIX}-{i}", f"smpi{i}"
            self._start_consul_client(i)
            self.mpi_procs.append(
                self._daemon(
                    f"bridge-mpi-{i}",
                    [sys.executable, str(NSBRIDGE), f"{REGIONS['secure'] + 1},8501:{8750 + i}", ns],
                )
            )
            self._start_mpi_node(i, ns, veth)
        self._until(lambda: len(self.mpi_node_names()) >= count, f"{count} secured MPI nodes")

    def mpi_node_names(self) -> list[str]:
        out = self.nomad("node", "status", "-filter", 'NodePool == "mpi"', "-json", check=False)
        nodes = json.loads(out) if out.strip().startswith("[") else []
        return sorted(
            n["Name"]
            for n in nodes
            if n.get("Status") == "ready"
            and (n.get("Drivers") or {}).get("pyhpc", {}).get("Healthy")
        )

    def _run_quiet(self, *argv: str) -> None:
        subprocess.run(list(argv), check=True, capture_output=True, timeout=60)

    def _start_consul_client(self, i: int) -> None:
        data = self.root / f"consul-mpi-{i}"
        data.mkdir()
        (data / "agent.hcl").write_text(f"""
datacenter     = "dc1"
node_name      = "secure-mpi-{i}"
data_dir       = "{data}"
bind_addr      = "127.0.0.1"
client_addr    = "127.0.0.1"
advertise_addr = "127.0.0.1"
retry_join     = ["127.0.0.1:8701"]
ports {{
  http     = -1
  https    = {8750 + i}
  grpc     = -1
  grpc_tls = -1
  dns      = -1
  serf_lan = {8760 + i}
}}
{self._consul_security("dc1-client-consul-0", "agent")}
""")
        self.mpi_procs.append(
            self._daemon(
                f"consul-mpi-{i}",
                [str(self.bins["consul"]), "agent", f"-config-file={data / 'agent.hcl'}"],
            )
        )

    def _start_mpi_node(self, i: int, ns: str, veth: str) -> None:
        data = self.root / f"mpi-{i}"
        data.mkdir()
        v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        cgroup = f"nomad-smpi-{i}.slice" if v2 else f"/nomad-smpi-{i}"
        plugin = self._plugin(
            run_dir=f"/run/pyhpc-smpi-{i}", mpi_nomad_address="https://127.0.0.1:4646"
        )
        (data / "agent.hcl").write_text(f"""
{self._agent(f"secure-mpi-{i}", "secure", "secure-dc", data, f"{MPI_NET}.{i}")}
client {{
  enabled           = true
  servers           = ["127.0.0.1:{REGIONS["secure"] + 1}"]
  node_pool         = "mpi"
  network_interface = "{veth}"
  cgroup_parent     = "{cgroup}"
  options {{
    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean"
  }}
}}
acl {{
  enabled = true
}}
{self._tls_block("secure-client-nomad")}
{self._consul_block(8501, self.nomad_consul_token)}
{plugin}
""")
        self.mpi_procs.append(
            self._daemon(
                f"nomad-mpi-{i}",
                [
                    "nsenter",
                    f"--net=/run/netns/{ns}",
                    str(self.bins["nomad"]),
                    "agent",
                    f"-config={data / 'agent.hcl'}",
                ],
            )  # fmt: skip
        )

    def mpi_nodes_down(self) -> None:
        """Stop the MPI nodes' agents (their jobs stopped first: tasks outlive agents), their
        bridges and Consul agents, then remove the namespaces and purge the nodes."""
        ids = self.nomad("node", "status", "-filter", 'NodePool == "mpi"', "-t",
                         "{{range .}}{{.ID}} {{end}}", check=False).split()  # fmt: skip
        for proc in reversed(self.mpi_procs):
            self._stop(proc)
            self.procs.remove(proc)
        self.mpi_procs.clear()
        # The nodes' supervisors and tasks, should a job have been left running.
        subprocess.run(["pkill", "-f", f"{self.root}/mpi-"], check=False)
        subprocess.run([str(NETNS_SH), "down", MPI_PREFIX], check=False, capture_output=True)
        for i in range(1, 17):
            unmount_under(Path(f"/run/pyhpc-smpi-{i}"))
            shutil.rmtree(f"/run/pyhpc-smpi-{i}", ignore_errors=True)
        for node in ids:
            self.nomad("node", "purge", node, check=False)

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # -- tear-down --------------------------------------------------------------------------

    def down(self) -> None:
        if self.mpi_procs:
            self.mpi_nodes_down()
        for proc in reversed(self.procs):
            self._stop(proc)
        for log in self.logs:
            log.close()
        if self.vault_address:
            self._vault_cm.__exit__(None, None, None)
        # The clients' alloc dirs keep their secrets tmpfs and bind mounts after they stop.
        unmount_under(self.root)
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(SIGNED_DIR, ignore_errors=True)


def unmount_under(root: Path) -> None:
    """Lazily unmount every mount below ROOT, the deepest first."""
    for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
        target = line.split()[1]
        if target.startswith(f"{root}/"):
            subprocess.run(["umount", "-l", target], check=False)
