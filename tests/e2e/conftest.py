"""End-to-end test fixtures: a real Nomad + Consul + Vault cluster on loopback.

The cluster is the one ``scripts/testbed/cluster.sh`` runs, with the binaries that
``scripts/testbed/build.sh`` builds from Go modules (cached outside the checkout).

Environment:
  PYHPC_E2E=skip          skip (instead of fail) when the test-bed binaries are not built
  PYHPC_CLUSTER_REUSE=1   use a cluster that is already up, and leave the cluster up at the
                          end of the session (for quick re-runs during development)
  PYHPC_CLUSTER_DIR       state dir of the cluster (default /tmp/pyhpc-cluster)
  PYHPC_TESTBED_CACHE     binary cache (default ~/.cache/pyhpc/testbed)
  PYHPC_NO_PLUGIN=1       start the cluster without the pyhpc plugin (passed to cluster.sh)

Every test collected under tests/e2e is marked ``e2e`` (deselect with ``-m "not e2e"``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from nomad_driver.federation.nomad import Nomad

REPO = Path(__file__).resolve().parents[2]
# The plugin runs on the interpreter the tests run on (scripts/test.sh sets it too): the
# system python3 lacks the package's dependencies.
os.environ.setdefault("PYHPC_PYTHON", sys.executable)
TESTBED = REPO / "scripts" / "testbed"
CLUSTER_SH = TESTBED / "cluster.sh"
BUILD_CMD = f"{TESTBED / 'build.sh'} all"

NOMAD_ADDR = "http://127.0.0.1:4646"
CONSUL_HTTP_ADDR = "127.0.0.1:8500"
VAULT_ADDR = "http://127.0.0.1:8200"
VAULT_TOKEN = "root"

# ClientStatus values after which an allocation never runs again.
TERMINAL = frozenset({"complete", "failed", "lost"})

_HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    # Registered here too, so the marker works without the project's pytest settings.
    config.addinivalue_line("markers", "e2e: needs the real Nomad test bed (scripts/testbed)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/e2e with ``e2e`` (this hook sees the whole session)."""
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


# --------------------------------------------------------------------------------------
# binaries
# --------------------------------------------------------------------------------------


def _product_version(product: str) -> str:
    """Version of the product pinned in scripts/testbed/<product>/go.mod (without 'v')."""
    gomod = (TESTBED / product / "go.mod").read_text()
    m = re.search(rf"^\s*github\.com/hashicorp/{product}\s+v(\S+)", gomod, re.MULTILINE)
    if not m:
        raise RuntimeError(f"no github.com/hashicorp/{product} requirement in {product}/go.mod")
    return m.group(1)


def testbed_binary(product: str) -> Path:
    """Cache path build.sh writes: <cache>/<product>-<version>/<product>."""
    root = Path(
        os.environ.get("PYHPC_TESTBED_CACHE") or Path.home() / ".cache" / "pyhpc" / "testbed"
    )
    return root / f"{product}-{_product_version(product)}" / product


# --------------------------------------------------------------------------------------
# the cluster handle
# --------------------------------------------------------------------------------------


class NomadCommandError(subprocess.CalledProcessError):
    """A failed ``nomad`` CLI call; the message carries its output."""

    def __str__(self) -> str:
        out, err = self.stdout or "", self.stderr or ""
        return f"{super().__str__()}\n--- stdout:\n{out}\n--- stderr:\n{err}"


class Cluster:
    """Handle on the running test-bed cluster (see module docstring)."""

    nomad_addr = NOMAD_ADDR
    consul_addr = CONSUL_HTTP_ADDR
    vault_addr = VAULT_ADDR
    vault_token = VAULT_TOKEN

    def __init__(self) -> None:
        self.nomad_bin = testbed_binary("nomad")
        self.consul_bin = testbed_binary("consul")
        self.vault_bin = testbed_binary("vault")
        self.state_dir = Path(os.environ.get("PYHPC_CLUSTER_DIR", "/tmp/pyhpc-cluster"))
        self.env = dict(os.environ)
        self.env.update(
            NOMAD_ADDR=NOMAD_ADDR,
            CONSUL_HTTP_ADDR=CONSUL_HTTP_ADDR,
            VAULT_ADDR=VAULT_ADDR,
            VAULT_TOKEN=VAULT_TOKEN,
            CHECKPOINT_DISABLE="1",
        )
        for var in ("NOMAD_TOKEN", "NOMAD_REGION", "NOMAD_NAMESPACE", "CONSUL_HTTP_TOKEN"):
            self.env.pop(var, None)
        self._jobdir = Path(tempfile.mkdtemp(prefix="pyhpc-e2e-jobs-"))
        self._http = requests.Session()
        self._http.trust_env = False  # never route loopback calls through an HTTP(S)_PROXY
        self._nomad = Nomad(NOMAD_ADDR)

    # -- plumbing ----------------------------------------------------------------------

    def script(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run scripts/testbed/cluster.sh ARGS (output captured, never raises)."""
        return subprocess.run(
            [str(CLUSTER_SH), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def api(self, path: str, **params: Any) -> Any:
        """GET NOMAD_ADDR/v1/<path> and return the decoded JSON, through pyhpc's own Nomad
        client (a refusal raises its NomadError, naming the call)."""
        return self._nomad.call("GET", f"/v1/{path.lstrip('/')}", params=params)

    def close(self) -> None:
        """Drop the temporary jobspec files."""
        self._http.close()
        shutil.rmtree(self._jobdir, ignore_errors=True)

    def is_up(self) -> bool:
        try:
            return bool(self._http.get(f"{NOMAD_ADDR}/v1/status/leader", timeout=2).json())
        except (requests.RequestException, ValueError):
            return False

    # -- the fixture API ---------------------------------------------------------------

    def nomad(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the test-bed ``nomad`` CLI with NOMAD_ADDR set; raises on rc != 0 if check."""
        cmd = [str(self.nomad_bin), *args]
        cp = subprocess.run(
            cmd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and cp.returncode != 0:
            raise NomadCommandError(cp.returncode, cmd, cp.stdout, cp.stderr)
        return cp

    def run_job(self, hcl: str) -> str:
        """Register a jobspec (``nomad job run -detach``); returns the ID from ``job "NAME"``."""
        m = re.search(r'^\s*job\s+"([^"]+)"', hcl, re.MULTILINE)
        if not m:
            raise ValueError('jobspec has no job "NAME" block')
        job_id = m.group(1)
        fd, path = tempfile.mkstemp(prefix=f"{job_id}-", suffix=".nomad.hcl", dir=self._jobdir)
        with os.fdopen(fd, "w") as f:
            f.write(hcl)
        self.nomad("job", "run", "-detach", path)
        return job_id

    def allocs(self, job_id: str) -> list[dict[str, Any]]:
        """Allocation stubs of a job (GET /v1/job/<id>/allocations)."""
        result: list[dict[str, Any]] = self.api(f"job/{quote(job_id, safe='')}/allocations")
        return result

    def alloc(self, alloc_id: str) -> dict[str, Any]:
        """Full allocation (GET /v1/allocation/<id>)."""
        result: dict[str, Any] = self.api(f"allocation/{alloc_id}")
        return result

    def wait_alloc(
        self,
        job_id: str,
        states: set[str],
        timeout: float = 60,
        *,
        fail_fast: bool = True,
    ) -> dict[str, Any]:
        """Poll until the job's newest allocation has a ClientStatus in ``states``.

        Returns the full allocation (GET /v1/allocation/<id>, with TaskStates and events).
        Fails with the allocation's task events (or, with no allocation, the job's
        placement failures). With ``fail_fast`` (default), also fails as soon as the
        newest allocation is terminal (complete/failed/lost) and not in ``states``.
        """
        deadline = time.monotonic() + timeout
        newest: dict[str, Any] | None = None
        while True:
            stubs = self.allocs(job_id)
            if stubs:
                newest = max(stubs, key=lambda a: (a["CreateIndex"], a.get("CreateTime", 0)))
                status = newest["ClientStatus"]
                if status in states:
                    return self.alloc(newest["ID"])
                if fail_fast and status in TERMINAL:
                    pytest.fail(self._alloc_report(job_id, newest, states, "ended as"))
            if time.monotonic() >= deadline:
                pytest.fail(self._alloc_report(job_id, newest, states, f"after {timeout}s is"))
            time.sleep(0.5)

    def alloc_logs(self, alloc_id: str, task: str, stderr: bool = False) -> str:
        """Everything the task wrote to stdout (or stderr) so far."""
        args = ["alloc", "logs", *(["-stderr"] if stderr else []), alloc_id, task]
        return self.nomad(*args).stdout

    @staticmethod
    def task_events(alloc: dict[str, Any], task: str) -> list[dict[str, Any]]:
        """The task's events from an allocation dict (empty if the task has no state yet)."""
        state = (alloc.get("TaskStates") or {}).get(task) or {}
        events: list[dict[str, Any]] = state.get("Events") or []
        return events

    def restart_nomad(self, kill: bool) -> None:
        """Restart the Nomad agent on the same data_dir (kill: SIGKILL instead of SIGINT)."""
        cp = self.script("restart-nomad", *(["--kill"] if kill else []), timeout=180)
        if cp.returncode != 0:
            pytest.fail(
                f"cluster.sh restart-nomad failed ({cp.returncode}):\n{cp.stdout}{cp.stderr}"
            )

    def node(self) -> dict[str, Any]:
        """The (only) client node, full record (GET /v1/nodes, then /v1/node/<id>)."""
        nodes = self.api("nodes")
        if not nodes:
            pytest.fail("Nomad has no client node")
        result: dict[str, Any] = self.api(f"node/{nodes[0]['ID']}")
        return result

    def stop_job(self, job_id: str, purge: bool = True, timeout: float = 60) -> None:
        """Stop a job and wait until its allocations have stopped on the client."""
        alloc_ids = [a["ID"] for a in self.allocs(job_id)]
        self.nomad("job", "stop", "-yes", "-detach", *(["-purge"] if purge else []), job_id)
        deadline = time.monotonic() + timeout
        for alloc_id in alloc_ids:
            while True:
                r = self._http.get(f"{NOMAD_ADDR}/v1/allocation/{alloc_id}", timeout=10)
                if r.status_code == 404 or r.json()["ClientStatus"] in TERMINAL:
                    break
                if time.monotonic() >= deadline:
                    pytest.fail(
                        f"allocation {alloc_id} of job {job_id} still "
                        f"{r.json()['ClientStatus']} {timeout}s after stop"
                    )
                time.sleep(0.5)

    # -- failure reports ---------------------------------------------------------------

    def _alloc_report(
        self, job_id: str, stub: dict[str, Any] | None, states: set[str], what: str
    ) -> str:
        want = "/".join(sorted(states))
        if stub is None:
            lines = [f"job {job_id}: no allocation {what} (wanted {want})"]
            try:
                for ev in self.api(f"job/{quote(job_id, safe='')}/evaluations"):
                    lines.append(
                        f"  eval {ev['ID'][:8]} {ev['Status']} {ev.get('StatusDescription', '')}"
                    )
                    for tg, metric in (ev.get("FailedTGAllocs") or {}).items():
                        lines.append(f"    group {tg!r} placement failed: {metric}")
            except requests.RequestException as e:
                lines.append(f"  (cannot read evaluations: {e})")
            return "\n".join(lines)
        try:
            alloc = self.alloc(stub["ID"])
        except requests.RequestException:
            alloc = stub
        lines = [
            f"job {job_id}: newest allocation {alloc['ID']} {what} "
            f"{alloc['ClientStatus']!r} (desired {alloc.get('DesiredStatus')!r}; wanted {want})"
        ]
        if alloc.get("ClientDescription"):
            lines.append(f"  client: {alloc['ClientDescription']}")
        for task, st in (alloc.get("TaskStates") or {}).items():
            lines.append(f"  task {task!r}: state={st.get('State')} failed={st.get('Failed')}")
            for ev in st.get("Events") or []:
                msg = ev.get("DisplayMessage") or ev.get("Message") or ""
                lines.append(f"    - {ev.get('Type')}: {msg}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# the session fixture
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """A running test-bed cluster: ``cluster.sh up`` now, ``cluster.sh down`` at the end."""
    missing = [str(p) for p in map(testbed_binary, ("nomad", "consul", "vault")) if not p.exists()]
    if missing:
        msg = (
            "test-bed binaries are not built: "
            + ", ".join(missing)
            + f"\nbuild them with: {BUILD_CMD}   (or set PYHPC_E2E=skip to skip e2e tests)"
        )
        if os.environ.get("PYHPC_E2E") == "skip":
            pytest.skip(msg)
        pytest.fail(msg, pytrace=False)

    c = Cluster()
    reuse = os.environ.get("PYHPC_CLUSTER_REUSE") == "1"
    if not (reuse and c.is_up()):
        cp = c.script("up", timeout=300)
        if cp.returncode != 0:
            out = (cp.stdout + cp.stderr)[-6000:]
            c.script("down", timeout=120)
            pytest.fail(f"cluster.sh up failed ({cp.returncode}):\n{out}", pytrace=False)
    try:
        yield c
    finally:
        c.close()
        if not reuse:
            cp = c.script("down", timeout=180)
            if cp.returncode != 0:
                # Reported by pytest as an error in the fixture's teardown.
                raise RuntimeError(
                    f"cluster.sh down failed ({cp.returncode}):\n{cp.stdout}{cp.stderr}"
                )
